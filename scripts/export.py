#!/usr/bin/env python
"""`diad-jax export` from a checkout: the code is diad_jax/commands/export.py (see --help)."""
import sys

from diad_jax.commands.export import build_parser, main  # noqa: F401  (build_parser: for the tests)

if __name__ == "__main__":
    sys.exit(main())
