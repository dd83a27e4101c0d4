#!/usr/bin/env python
"""`diad-jax finetune-autoencoder` from a checkout: the code is diad_jax/commands/finetune_autoencoder.py
(see --help)."""
import sys

from diad_jax.commands.finetune_autoencoder import build_parser, main  # noqa: F401  (build_parser: for the tests)

if __name__ == "__main__":
    sys.exit(main())
