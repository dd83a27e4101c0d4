#!/usr/bin/env python
"""`diad-jax evaluate` from a checkout: the code is diad_jax/commands/evaluate.py (see --help)."""
import sys

from diad_jax.commands.evaluate import build_parser, main  # noqa: F401  (build_parser: for the tests)

if __name__ == "__main__":
    sys.exit(main())
