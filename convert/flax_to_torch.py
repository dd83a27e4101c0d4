#!/usr/bin/env python
"""`diad-jax convert-to-torch` from a checkout: the code is diad_jax/commands/convert_to_torch.py (see --help)."""
import sys

from diad_jax.commands.convert_to_torch import main

if __name__ == "__main__":
    sys.exit(main())
