"""Export a DiAD checkpoint for deployment: the compiled scoring program, its weights and a manifest,
which `diad_jax.exported.load` scores without the model code (no flax, no diad_jax.models).

Examples:
  python scripts/export.py --checkpoint checkpoints/diad_mvtec --out deploy/diad_mvtec
  python scripts/export.py --checkpoint random:tiny --out deploy/tiny --batch-size 4 --platforms cpu

The program is the Detector's own, for a fixed batch (--batch-size; calls are padded to it), with
the scoring flags below (default: what the checkpoint records); thresholds of a calibrated checkpoint
travel in the manifest. Writes program.bin, weights.safetensors, manifest.json and manifest.sha256
in --out.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from diad_jax import cli


def build_parser():
    ap = cli.Parser(description=__doc__)
    cli.add_checkpoint_arg(ap)
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--platforms", nargs="+", default=["cpu", "cuda", "tpu"],
                    help="platforms to lower the program for: cpu, cuda, rocm, tpu (default: cpu cuda tpu)")
    cli.add_eval_args(ap)
    return ap


@cli.command(build_parser)
def main(args: argparse.Namespace, ap: cli.Parser) -> int:
    cli.setup_logging()
    from diad_jax.exported import PLATFORMS

    if not set(args.platforms) <= set(PLATFORMS):  # before any weights are read
        ap.error(f"--platforms: choose from {', '.join(PLATFORMS)}, got {' '.join(args.platforms)}")

    checkpoint, eval_config = cli.scoring_checkpoint(args)
    cli.check_writable(args.out, "out")
    detector = cli.load_detector(args, checkpoint, eval_config)
    path = detector.export(args.out, platforms=args.platforms)
    print(f"exported {checkpoint} (batch {eval_config.batch_size}, {', '.join(args.platforms)}"
          f"{', with thresholds' if detector.calibration else ''}) to {path}/")
    return 0

