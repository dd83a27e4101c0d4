"""The flags of the scoring programs (evaluate, predict, export) and how they become a checkpoint
and an EvalConfig: the checkpoint's own scoring settings, then the flags given."""
from __future__ import annotations

import argparse
import dataclasses
import logging

from diad_jax.cli.flags import S, add_eval_config_flags
from diad_jax.configs import EvalConfig, ModelConfig


def add_checkpoint_arg(ap: argparse.ArgumentParser) -> None:
    """--checkpoint of the scoring programs (read with `scoring_checkpoint`)."""
    ap.add_argument("--checkpoint", required=True,
                    help="model checkpoint (diad-jax convert), a training --workdir of diad-jax train (its best "
                         "checkpoint if it has one, else the newest), or random:tiny (random weights)")


def add_eval_args(ap: argparse.ArgumentParser) -> None:
    """The scoring flags: one per EvalConfig field (`--<field>`, the same as diad-jax train's
    `--eval-<field>`), the fast preset and the footprint scaling applied under them, and the loading
    choices. Each one given overrides the checkpoint's recorded eval config (`scoring_checkpoint`)."""
    g = ap.add_argument_group("scoring (default: what the checkpoint records, else the reference's)")
    g.add_argument("--preset", choices=["fast", "inversion"], default=None,
                   help="fast: ONE network pass per image (pred_x0 at t=700) instead of 10 DDIM steps; inversion: "
                        "InvAD's reconstruction-free scoring (5 DDIM-inversion passes); both measured on the demo and "
                        "one set of photographs only (README, 'Scoring'); the flags below still apply on top")
    g.add_argument("--scaled-footprint", action="store_true",
                   help="scale sigma and the pool window with the image size (5 and 8 at 256 px; 64 px: 1.25 and 2)")
    add_eval_config_flags(g)
    g.add_argument("--no-dedupe", dest="dedupe_guidance", action="store_false", default=S,
                   help="deprecated alias of --dedupe-guidance false")
    g.add_argument("--bf16", dest="dtype", action="store_const", const="bfloat16", default=S,
                   help="deprecated alias of --dtype bfloat16")
    g.add_argument("--random-resnet", dest="resnet", action="store_const", const="random", default="checkpoint",
                   help="opt in to a randomly initialised ResNet-50 when the checkpoint has none (maps then "
                        "compare random features)")
    g.add_argument("--accept-calibration-mismatch", action="store_true",
                   help="label with the checkpoint's thresholds although the flags above score differently from "
                        "how they were calibrated (refused without it: the labels would be wrong)")


def scoring_checkpoint(args: argparse.Namespace) -> tuple[str, EvalConfig]:
    """--checkpoint as a model checkpoint folder (a training workdir resolved to its checkpoint; a
    random:<model> spec kept as given) and the EvalConfig to score it with: the one its thresholds
    were calibrated with, else the one it records, else the default (`detector.scoring_settings`),
    with the flags of `add_eval_args` applied. Reads only the checkpoint's metadata, so bad flag
    values are found before any weights are read."""
    from diad_jax import checkpoints
    from diad_jax.calibration import Calibration
    from diad_jax.detector import RANDOM_PREFIX, scoring_settings

    checkpoint = args.checkpoint
    if checkpoint.startswith(RANDOM_PREFIX):
        recorded = {}
        image_size = ModelConfig.from_spec(checkpoint[len(RANDOM_PREFIX):], field="checkpoint").image_size
    else:
        checkpoint = str(checkpoints.resolve(checkpoint, "checkpoint"))
        meta = checkpoints.read_metadata(checkpoint, "checkpoint")
        checkpoints.require_detector(meta, checkpoint)  # before anything is created or loaded
        recorded, image_size = scoring_settings(meta, Calibration.load(checkpoint)), meta["model_config"]["image_size"]
    ec = EvalConfig.from_dict(recorded, f"{checkpoint}: eval_config")
    if args.preset is not None:  # before the explicit sampler flags
        ec = ec.fast() if args.preset == "fast" else ec.inversion()
    if args.scaled_footprint:  # before an explicit --sigma / --pool-window
        ec = ec.scaled_footprint(image_size)
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(args, f.name)}
    return checkpoint, dataclasses.replace(ec, **changes)


def load_detector(args: argparse.Namespace, checkpoint: str, eval_config: EvalConfig, mesh=None):
    """`diad_jax.load` of what `scoring_checkpoint` gave, with --random-resnet's opt-in; logs what
    the detector notes (e.g. a random ResNet-50)."""
    from diad_jax.detector import load

    detector = load(checkpoint, mesh=mesh, eval_config=eval_config,
                    resnet=args.resnet,
                    accept_calibration_mismatch=args.accept_calibration_mismatch)
    for note in detector.notes:
        logging.getLogger("diad_jax.detector").warning(note)
    return detector
