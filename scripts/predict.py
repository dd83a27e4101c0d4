#!/usr/bin/env python
"""`diad-jax predict` from a checkout: the code is diad_jax/commands/predict.py (see --help)."""
import sys

from diad_jax.commands.predict import build_parser, main  # noqa: F401  (build_parser: for the tests)

if __name__ == "__main__":
    sys.exit(main())
