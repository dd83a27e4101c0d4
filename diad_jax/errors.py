"""The errors a user's input can cause. Every entry point prints their message on one line (the
first line names the flag, file, key or shape at fault) and exits with status 2, without a
traceback (`diad_jax.cli.entry_point`); anything else is a bug and keeps its traceback.

The library speaks in config fields and argument names, never in flags: an error about a value
the user chose names it by its field path (`optimizer.ema_decay`, `eval.sigma`) or by the argument
of the public function that took it (`manual_dir`), written in the message as `{0}`, `{1}`, ... and
listed in `fields`. `str(error)` names them as they are; the commands name them by their flags
(`error.message(name)`), so `import diad_jax` users never read a flag and `diad-jax` users always do.

The more specific errors live beside the code that raises them and derive from `UserError`:
`data.DataError` (a dataset on disk), `sharding.MeshError` (a mesh the devices cannot form),
`convert.ldm.ConversionError` and `convert.torch_io.CheckpointReadError` (reference checkpoints),
`exported.ExportError` (an exported detector's folder).
"""
from __future__ import annotations

from typing import Callable, Sequence


class UserError(ValueError):
    """Something the user gave (a config field, an argument, a file) is wrong; the message says
    what and where. `fields`: the field paths or argument names the message names as {0}, {1}, ..."""

    def __init__(self, message: str, *, fields: Sequence[str] = ()):
        self.template, self.fields = message, tuple(fields)
        super().__init__(self.message())

    def message(self, name: Callable[[str], str] = str) -> str:
        """The message with each of its fields written as `name(field)` (default: the field itself)."""
        text = self.template
        for i, field in enumerate(self.fields):
            text = text.replace(f"{{{i}}}", name(field))
        return text

    def renamed(self, rename: Callable[[str], str]) -> UserError:
        """The same error with each field `f` named `rename(f)` (e.g. as the caller calls it)."""
        error = type(self)(self.template, fields=[rename(f) for f in self.fields])
        error.__cause__ = self.__cause__
        return error

    def under(self, section: str) -> UserError:
        """The same error raised by the part of a config at `section` (its fields prefixed `section.`)."""
        return self.renamed(lambda field: f"{section}.{field}")


class ConfigError(UserError):
    """A configuration value that is out of range, of the wrong kind, or inconsistent with another."""


class CheckpointError(UserError):
    """A diad_jax checkpoint that is missing, incomplete, damaged, or does not fit this run."""


class NonFiniteError(UserError):
    """NaN or inf where numbers must be finite: a training loss, weights, anomaly maps."""
