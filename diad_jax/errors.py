"""The errors a user's input can cause. Every entry point prints their message on one line (the
first line names the flag, file, key or shape at fault) and exits with status 2, without a
traceback (`diad_jax.cli.entry_point`); anything else is a bug and keeps its traceback.

The more specific errors live beside the code that raises them and derive from `UserError`:
`data.DataError` (a dataset on disk), `sharding.MeshError` (a mesh the devices cannot form),
`convert.ldm.ConversionError` and `convert.torch_io.CheckpointReadError` (reference checkpoints),
`exported.ExportError` (an exported detector's folder).
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user gave (a flag, a config, a file) is wrong; the message says what and where."""


class ConfigError(UserError):
    """A configuration value that is out of range, of the wrong kind, or inconsistent with another."""


class CheckpointError(UserError):
    """A diad_jax checkpoint that is missing, incomplete, damaged, or does not fit this run."""


class NonFiniteError(UserError):
    """NaN or inf where numbers must be finite: a training loss, weights, anomaly maps."""
