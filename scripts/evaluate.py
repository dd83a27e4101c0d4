#!/usr/bin/env python
"""Denoise-and-score a dataset with a DiAD checkpoint; print and save the seven metrics per class
and their mean, and heat-map overlays (input | reconstruction | map | ground truth).

Examples:
  # the embedded default: the tiny model (random weights unless --checkpoint) on the generated dataset
  python scripts/evaluate.py

  # a converted reference checkpoint on MVTec-AD (official folder layout), reference metric variants
  python scripts/evaluate.py --checkpoint checkpoints/diad_mvtec --dataset mvtec_ad \\
      --manual-dir /data/mvtec_anomaly_detection --data-dir /data/diad_prepared --variant reference

Outputs go to --out: results.json (metrics, per-image scores, timings), results.md (the table),
heatmaps/<class>/*.png.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diad_jax import checkpoints, cli
from diad_jax import data as dataio
from diad_jax.configs import REFERENCE_MAP_SIZE, DiffusionConfig
from diad_jax.errors import ConfigError
from diad_jax.evaluation import evaluate
from diad_jax.scoring import Scorer

log = logging.getLogger("diad_jax.evaluate")


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="model checkpoint (convert/torch_to_flax.py), or a training "
                    "--workdir of scripts/train.py (its best checkpoint if it has one, else the newest); "
                    "default: the tiny model with random weights")
    ap.add_argument("--dataset", default="synthetic", choices=sorted(dataio.DATASETS),
                    help="dataset builder (default: the generated one)")
    ap.add_argument("--data-dir", type=Path, default=Path("data_cache"), help="prepared-data directory")
    ap.add_argument("--manual-dir", type=Path, help="raw dataset folder (MVTec-AD / VisA / folder layout)")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip unreadable images and anomalous images without a mask while preparing (each one "
                         "logged, and listed in results.json) instead of stopping at the first")
    ap.add_argument("--overwrite-data", action="store_true",
                    help="delete the prepared copy of the dataset and prepare it again from --manual-dir")
    ap.add_argument("--classes", nargs="+", help="evaluate only these classes")
    ap.add_argument("--limit-per-class", type=cli.positive_int,
                    help="score at most N test images per class (quick runs)")
    ap.add_argument("--batch-size", type=cli.positive_int, default=8)
    ap.add_argument("--ddim-steps", type=int, default=10)
    ap.add_argument("--schedule", choices=["official", "consistent"], default="official",
                    help="official: noise to t=999 then DDIM 901..1 as the reference; consistent: noise to 901")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    ap.add_argument("--guidance-scale", type=float, default=9.0)
    ap.add_argument("--no-dedupe", action="store_true",
                    help="run the reference's duplicate guidance half even though both contexts are equal")
    ap.add_argument("--image-score", choices=["pooled", "max"], default="pooled",
                    help="pooled: max after eight 8x8 average pools (the reference); max: plain max")
    ap.add_argument("--sigma", type=cli.positive_float, default=None,
                    help="anomaly-map Gaussian blur sigma (default: the reference's 5, or scaled with "
                         "--scaled-footprint)")
    ap.add_argument("--pool-window", type=cli.positive_int, default=None,
                    help="image-score average-pool window (default: the reference's 8, or scaled)")
    ap.add_argument("--scaled-footprint", action="store_true",
                    help="scale sigma and the pool window with the image size (5 and 8 at 256 px; the demo "
                         "model's 64 px: 1.25 and 2)")
    ap.add_argument("--variant", choices=["standard", "reference"], default="standard",
                    help="metric definitions: standard, or the reference's (AUROC flip, AUPRO normalisation)")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 compute (maps and metrics stay float32)")
    ap.add_argument("--data-parallel", type=cli.nonnegative_int, default=0,
                    help="shard each batch over this many devices (default: the most devices that divide the batch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heatmaps", type=cli.nonnegative_int, default=4, help="heat-map PNGs per class (0: none)")
    ap.add_argument("--out", type=Path, default=Path("outputs/eval"),
                    help="results folder (checked for writability before anything is scored)")
    ap.add_argument("--synthetic-train", type=cli.positive_int, default=60,
                    help="generated dataset: train images per class")
    ap.add_argument("--synthetic-test", type=cli.positive_int, default=40,
                    help="generated dataset: test images per class")
    return ap


@cli.entry_point
def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    cli.setup_logging()
    # everything that can be wrong with the arguments is found before the model is loaded
    try:
        diffusion = DiffusionConfig(ddim_steps=args.ddim_steps, schedule=args.schedule, ddim_eta=args.eta,
                                    guidance_scale=args.guidance_scale)
    except ConfigError as e:
        ap.error(str(e))
    if args.dataset != "synthetic" and args.manual_dir is None and args.overwrite_data:
        ap.error("--overwrite-data needs --manual-dir (the folder to prepare the dataset from again)")
    checkpoint = checkpoints.resolve(args.checkpoint, "--checkpoint") if args.checkpoint else None
    cli.check_writable(args.out, "--out")
    config, bundle, notes = checkpoints.load_for_scoring(checkpoint)
    for n in notes:
        log.warning(n)
    opts = {}
    if args.dataset == "synthetic":
        opts = dict(train_per_class=args.synthetic_train, test_per_class=args.synthetic_test)
    prepared = dataio.prepare(args.dataset, args.data_dir, manual_dir=args.manual_dir, classes=args.classes,
                              image_size=config.image_size, skip_bad=args.skip_bad, overwrite=args.overwrite_data,
                              **opts)
    mesh = None
    n_dev = args.data_parallel or math.gcd(args.batch_size, jax.device_count())
    if n_dev > 1:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("data",))
    footprint = Scorer.footprint(config.image_size if args.scaled_footprint else REFERENCE_MAP_SIZE)
    if args.sigma is not None:
        footprint["sigma"] = args.sigma
    if args.pool_window is not None:
        footprint["pool_window"] = args.pool_window
    result = evaluate(bundle, config, prepared, batch_size=args.batch_size, diffusion=diffusion, **footprint,
                      image_score=args.image_score, variant=args.variant,
                      dtype=jnp.bfloat16 if args.bf16 else jnp.float32, mesh=mesh, seed=args.seed,
                      classes=args.classes, heatmaps_per_class=args.heatmaps,
                      limit_per_class=args.limit_per_class, dedupe_guidance=not args.no_dedupe)
    result.info.update(checkpoint=str(checkpoint) if checkpoint else None, dataset=args.dataset,
                       prepared_copy=prepared.path, source=prepared.source, skipped=list(prepared.skipped),
                       notes=notes)
    t = result.timings
    print(f"\n{result.table}\n")
    print(f"{t['images']} images scored in {t['score_s']:.1f}s ({t['per_image_s'] * 1e3:.0f} ms/image after "
          f"the first batch, which took {t['first_batch_s']:.1f}s incl. compilation); metrics in "
          f"{t['metrics_s']:.2f}s")
    try:
        out = result.save(args.out)
    except OSError as e:  # the folder was writable at the start; keep the results anyway
        out = result.save(tempfile.mkdtemp(prefix="diad_eval_"))
        log.error("could not write the results to %s (%s); saved them to %s instead", args.out, e, out)
        return 1
    print(f"results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
