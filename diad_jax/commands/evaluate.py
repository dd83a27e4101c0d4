"""Denoise-and-score a dataset with a DiAD checkpoint; print and save the seven metrics per class
and their mean, and heat-map overlays (input | reconstruction | map | ground truth). With
--calibrate, also store image and pixel thresholds in the checkpoint (scripts/predict.py then gives
every image a verdict).

Examples:
  # the tiny model with random weights on the generated dataset (everything runs; scores are meaningless)
  python scripts/evaluate.py --checkpoint random:tiny

  # a converted reference checkpoint on MVTec-AD (official folder layout), reference metric variants
  python scripts/evaluate.py --checkpoint checkpoints/diad_mvtec --dataset mvtec_ad \\
      --manual-dir /data/mvtec_anomaly_detection --data-dir /data/diad_prepared --variant reference

  # thresholds from held-out normal images (the 99th percentile of their scores), stored in the checkpoint
  python scripts/evaluate.py --checkpoint runs/mvtec --dataset folder --manual-dir /data/val --split train \\
      --calibrate

The scoring settings (schedule, steps, footprint, seed, ...) default to what the checkpoint records
(a training run records its evaluation settings), else the reference's. Outputs go to --out:
results.json (metrics, per-image scores, timings, settings), results.md (the table), heatmaps/<class>/*.png.
"""
from __future__ import annotations

import argparse
import logging
import math
import tempfile
from pathlib import Path

from diad_jax import cli
from diad_jax.configs import DATASETS

log = logging.getLogger("diad_jax.evaluate")


def build_parser():
    ap = cli.Parser(description=__doc__)
    cli.add_checkpoint_arg(ap)
    ap.add_argument("--dataset", default="synthetic", choices=sorted(DATASETS),
                    help="dataset builder (default: the generated one)")
    ap.add_argument("--data-dir", type=Path, default=Path("data_cache"), help="prepared-data directory")
    ap.add_argument("--manual-dir", type=Path, help="raw dataset folder (the layout of --dataset)")
    ap.add_argument("--dataset-option", dest="options", action="append", default=[], metavar="KEY=JSON",
                    help="a data.prepare option, e.g. require_masks=true for the folder layout")
    ap.add_argument("--skip-bad", action="store_true",
                    help="skip unreadable images and anomalous images without a mask while preparing (each one "
                         "logged, and listed in results.json) instead of stopping at the first")
    ap.add_argument("--overwrite-data", dest="overwrite", action="store_true",
                    help="delete the prepared copy of the dataset and prepare it again from --manual-dir")
    ap.add_argument("--split", default="test",
                    help="the split to score (default test; e.g. train, a split of normal images, to calibrate on)")
    ap.add_argument("--classes", nargs="+", help="evaluate only these classes")
    ap.add_argument("--limit-per-class", type=cli.positive_int,
                    help="score at most N images per class (quick runs)")
    cli.add_eval_args(ap)
    ap.add_argument("--calibrate", action="store_true",
                    help="store thresholds in the checkpoint (calibration.json): per class and global image "
                         "thresholds (F1-optimal, or --percentile of the normal scores when the split has no "
                         "anomalies), a pixel threshold and the score range that normalises scores")
    ap.add_argument("--percentile", type=float, default=99.0,
                    help="percentile of normal scores used as the threshold on splits without anomalies")
    ap.add_argument("--data-parallel", type=cli.nonnegative_int, default=0,
                    help="shard each batch over this many devices (default: the most devices that divide the batch)")
    ap.add_argument("--heatmaps", type=cli.nonnegative_int, default=4, help="heat-map PNGs per class (0: none)")
    ap.add_argument("--out", type=Path, default=Path("outputs/eval"),
                    help="results folder (checked for writability before anything is scored)")
    ap.add_argument("--synthetic-train", type=cli.positive_int, default=60,
                    help="generated dataset: train images per class")
    ap.add_argument("--synthetic-test", type=cli.positive_int, default=40,
                    help="generated dataset: test images per class")
    return ap


@cli.command(build_parser)
def main(args: argparse.Namespace, ap: cli.Parser) -> int:
    cli.setup_logging()
    from diad_jax.detector import RANDOM_PREFIX
    # everything that can be wrong with the arguments is found before the model is loaded
    if args.dataset != "synthetic" and args.manual_dir is None and args.overwrite:
        ap.error("--overwrite-data needs --manual-dir (the folder to prepare the dataset from again)")
    if args.calibrate and args.checkpoint.startswith(RANDOM_PREFIX):
        ap.error("--calibrate stores thresholds in --checkpoint: give a checkpoint folder, not random weights")
    if not 0 < args.percentile <= 100:
        ap.error(f"--percentile must be in (0, 100], got {args.percentile}")
    options = cli.dataset_options(args.options)
    if args.dataset == "synthetic":
        options = dict(train_per_class=args.synthetic_train, test_per_class=args.synthetic_test) | options
    from diad_jax import data as dataio
    dataio.check_options(args.dataset, options)
    checkpoint, eval_config = cli.scoring_checkpoint(args)
    cli.check_writable(args.out, "out")

    import jax
    import numpy as np

    from diad_jax.evaluation import evaluate
    mesh = None
    batch = eval_config.batch_size
    n_dev = args.data_parallel or math.gcd(batch, jax.device_count())
    if n_dev > 1:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), ("data",))
    detector = cli.load_detector(args, checkpoint, eval_config, mesh)
    prepared = dataio.prepare(args.dataset, args.data_dir, manual_dir=args.manual_dir, classes=args.classes,
                              image_size=detector.image_size, skip_bad=args.skip_bad, overwrite=args.overwrite,
                              **options)
    result = evaluate(detector, prepared, split=args.split, classes=args.classes,
                      heatmaps_per_class=args.heatmaps, limit_per_class=args.limit_per_class)
    result.info.update(dataset=args.dataset, prepared_copy=prepared.path, source=prepared.source,
                       skipped=list(prepared.skipped))
    t = result.timings
    print(f"\n{result.table}\n")
    if result.info["no_mask"]:
        print(f"Pixel metrics leave out {result.info['no_mask']} anomalous image(s) without a ground-truth mask.")
    print(f"{t['images']} images scored in {t['score_s']:.1f}s ({t['per_image_s'] * 1e3:.0f} ms/image after "
          f"the first batch, which took {t['first_batch_s']:.1f}s incl. compilation); metrics in "
          f"{t['metrics_s']:.2f}s")
    if args.calibrate:
        from diad_jax.calibration import calibrate
        cal = calibrate(result, args.percentile, source={"dataset": args.dataset, "prepared_copy": prepared.path})
        if jax.process_index() == 0:
            path = cal.save(checkpoint)
            print(f"thresholds stored in {path}: image {cal.image.value:.6g} ({cal.image.method}), "
                  + ", ".join(f"{c} {th.value:.6g}" for c, th in cal.per_class.items())
                  + (f"; pixel {cal.pixel.value:.6g} ({cal.pixel.method})" if cal.pixel else "; no pixel threshold "
                     "(no masks)"))
        result.info["calibration"] = cal.to_dict()
    try:
        out = result.save(args.out)
    except OSError as e:  # the folder was writable at the start; keep the results anyway
        out = result.save(tempfile.mkdtemp(prefix="diad_eval_"))
        log.error("could not write the results to %s (%s); saved them to %s instead", args.out, e, out)
        return 1
    print(f"results in {out}/")
    return 0

