"""Write a diad_jax model checkpoint back as an ldm-layout .safetensors the reference loads.

  python convert/flax_to_torch.py --checkpoint checkpoints/diad_mvtec --out diad_mvtec.safetensors

Keys: model.diffusion_model.*, control_model.*, first_stage_model.*, and pretrained_model.* (the
ResNet-50 layer1..3) when the checkpoint has it. The CLIP text tower is not stored in diad_jax
checkpoints (only its output for the empty prompt), so load the result in the reference with
strict=False, as its test.py does.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from diad_jax import cli
from diad_jax.checkpoints import load_model, resolve
from diad_jax.convert.ldm import params_to_ldm
from diad_jax.errors import ConfigError

log = logging.getLogger("diad_jax.convert")


def build_parser() -> cli.Parser:
    ap = cli.Parser(description=__doc__)
    ap.add_argument("--checkpoint", type=Path, required=True, help="diad_jax model checkpoint directory")
    ap.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    ap.add_argument("--no-resnet", action="store_true", help="leave out pretrained_model.*")
    ap.add_argument("--overwrite", action="store_true")
    return ap


@cli.command(build_parser)
def main(args: argparse.Namespace, ap: cli.Parser) -> int:
    cli.setup_logging()
    if args.out.exists() and not args.overwrite:
        raise ConfigError(f"--out {args.out} exists; pass --overwrite to replace it")
    if args.out.suffix != ".safetensors":
        raise ConfigError(f"--out {args.out}: the output must be a .safetensors file")
    ckpt = load_model(resolve(args.checkpoint, "checkpoint"))
    tree = dict(ckpt.params)
    if ckpt.resnet is not None and not args.no_resnet:
        tree["resnet"] = ckpt.resnet
    sd = params_to_ldm(tree)
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(args.out),
              metadata={"format": "ldm", "source": "diad_jax"})
    log.info("wrote %d tensors to %s", len(sd), args.out)
    return 0

