"""The error boundary of every `diad-jax` program: a command's arguments are parsed by its own
`Parser`, and a user error escaping the command is printed on one line with each config field or
argument it names written as the flag that sets it (`diad_jax.errors`), exit status 2."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from diad_jax.errors import UserError


class StoppedBySignal(Exception):
    """A training run stopped by SIGTERM or SIGINT after saving (`progress.run`); the command exits
    128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that keeps the command's one table from destination (a config field's dotted
    path, or an argument name) to flag, for the arguments added to it or to its groups. The first flag
    added for a destination names it (deprecated aliases come after the flag they stand for)."""

    def __init__(self, **kwargs):
        # dest -> (flag, the value it stores when it takes no value, e.g. --random-resnet's "random")
        self.flags: dict[str, tuple[str, object]] = {}  # set first: ArgumentParser.__init__ adds --help
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def add_argument(self, *args, **kwargs):
        return self._keep(super().add_argument(*args, **kwargs))

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument
        group.add_argument = lambda *a, **k: self._keep(add(*a, **k))
        return group

    def _keep(self, action: argparse.Action) -> argparse.Action:
        if action.option_strings:
            self.flags.setdefault(action.dest, (action.option_strings[0], action.const if action.nargs == 0 else None))
        return action

    def flag_of(self, field: str) -> str:
        """How to set `field` on this command line: `field` is a dotted config path or a library
        argument name (else matched by its last part to the one destination ending in it, e.g.
        "data.options" -> the dest "options" of --dataset-option), optionally with a value
        ("validation.resnet=random" -> "--eval-resnet random"; a flag that stores that value by
        itself stands alone: "resnet=random" -> "--random-resnet"). The field itself if no flag sets it."""
        name, has_value, value = field.partition("=")
        last = name.rpartition(".")[2]
        dests = [name] if name in self.flags else [d for d in self.flags if d.rpartition(".")[2] == last]
        if len(dests) != 1:
            return field
        flag, const = self.flags[dests[0]]
        if not has_value or (const is not None and str(const) == value):
            return flag
        return f"{flag} {value}"


def command(build_parser: Callable[[], Parser]):
    """Makes `run(args, parser) -> int` a program's `main(argv=None) -> int`: the arguments parsed
    by `build_parser()`; a user error (`UserError`: a bad flag, config, file or dataset; `OSError`: a
    missing or unwritable path) prints `error: <message>` (fields named by their flags) on stderr
    and returns 2; Ctrl-C returns 130; a training run stopped (and saved) by a signal returns 128 +
    its number (143 for SIGTERM, 130 for SIGINT); all without a traceback. DIAD_TRACEBACK=1 re-raises
    instead (for bug reports)."""

    def decorate(run: Callable[[argparse.Namespace, Parser], int]) -> Callable[..., int]:
        def main(argv=None) -> int:
            parser = build_parser()
            try:
                return run(parser.parse_args(argv), parser)
            except StoppedBySignal as e:
                print(str(e), file=sys.stderr)
                return 128 + e.signum
            except (UserError, OSError) as e:
                if os.environ.get("DIAD_TRACEBACK") == "1":
                    raise
                print(f"error: {e.message(parser.flag_of) if isinstance(e, UserError) else e}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                if os.environ.get("DIAD_TRACEBACK") == "1":
                    raise
                print("interrupted", file=sys.stderr)
                return 130

        main.__name__, main.__doc__, main.__module__ = run.__name__, run.__doc__, run.__module__
        return main

    return decorate
