"""Score images with a DiAD checkpoint and write verdicts: no dataset, labels or masks needed.

Examples:
  # a folder (searched recursively) or files; the model of `make demo`
  python scripts/predict.py --checkpoint runs/demo/diad/checkpoints/2250 --input new_images/ --out preds
  python scripts/predict.py --checkpoint checkpoints/diad_mvtec --input a.png b.png --class bottle --out preds

Outputs in --out:
  predictions.csv, predictions.json  file, score, and -- when the checkpoint is calibrated
                                     (scripts/evaluate.py --calibrate) -- normalised score (0.5 = threshold),
                                     threshold, label (1 anomalous); files that could not be read are listed
                                     with their error (they never stop the run)
  overlays/<n>_<name>.png            input | anomaly map over the input | predicted mask contour, with a caption
  masks/<n>_<name>.png               the binary anomaly mask at the input's size (calibrated checkpoints)
Without --class, the global threshold applies; with it, that class's.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path

from diad_jax import cli

log = logging.getLogger("diad_jax.predict")

COLUMNS = ("file", "class", "score", "normalized_score", "threshold", "label", "error")


def build_parser():
    ap = cli.Parser(description=__doc__)
    cli.add_checkpoint_arg(ap)
    ap.add_argument("--input", nargs="+", required=True, help="image files and/or folders (recursive)")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--class", dest="class_name", help="use this class's threshold (calibrated checkpoints)")
    ap.add_argument("--no-overlays", action="store_true", help="write no overlay PNGs")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_eval_args(ap)
    return ap


@cli.command(build_parser)
def main(args: argparse.Namespace, ap: cli.Parser) -> int:
    cli.setup_logging()
    from diad_jax.data.inputs import collect_inputs

    checkpoint, eval_config = cli.scoring_checkpoint(args)
    items = list(collect_inputs(args.input))  # a missing input or an empty folder fails here, before --out is made
    cli.check_writable(args.out, "out")
    detector = cli.load_detector(args, checkpoint, eval_config)
    cal = detector.calibration
    if cal is None:
        log.warning("%s has no thresholds: scores only (calibrate with diad-jax evaluate --calibrate)", checkpoint)
    elif args.class_name is not None:
        cal.image_threshold(args.class_name)  # an unknown class fails before scoring
    (args.out / "overlays").mkdir(exist_ok=True)
    if cal is not None and cal.pixel is not None:
        (args.out / "masks").mkdir(exist_ok=True)
    rows, failed = [], 0
    t0 = time.perf_counter()
    for n, p in enumerate(detector.iter_predict_items(items, class_name=args.class_name, original_size=True,
                                                      progress=not args.no_progress)):
        rows.append({"file": p.name, "class": args.class_name or "", "score": p.score,
                     "normalized_score": p.normalized_score, "threshold": p.threshold, "label": p.label,
                     "error": p.error or ""})
        if p.error is not None:
            failed += 1
            continue
        _write_images(args, n, p)
    elapsed = time.perf_counter() - t0
    _write_tables(args.out, rows, detector, checkpoint)
    scored = len(rows) - failed
    summary = (f"{scored} image(s) scored in {elapsed:.1f}s ({scored / max(elapsed, 1e-9):.1f} images/s incl. "
               f"compilation)")
    if cal is not None:
        summary += f"; {sum(r['label'] == 1 for r in rows)} anomalous"
    if failed:
        summary += f"; {failed} unreadable (listed with their errors in predictions.csv)"
    print(f"{summary}\nresults in {args.out}/")
    return 0


def _write_images(args, n: int, p) -> None:
    import numpy as np
    from PIL import Image

    from diad_jax.data.imageio import resize_map
    from diad_jax.visualize import prediction_panel

    stem = f"{n:05d}_{Path(p.name).stem}"
    if p.mask is not None:
        Image.fromarray(p.mask.astype(np.uint8) * 255).save(args.out / "masks" / f"{stem}.png")
    if not args.no_overlays:
        mask = p.mask if p.mask is None or p.mask.shape == p.anomaly_map.shape else (
            resize_map(p.mask.astype(np.float32), p.anomaly_map.shape) >= 0.5)
        caption = f"{Path(p.name).name}  score {p.score:.4g}"
        if p.label is not None:
            caption += f"  threshold {p.threshold:.4g}  -> {'ANOMALOUS' if p.label else 'normal'}"
        Image.fromarray(prediction_panel(p.image, p.anomaly_map, mask, caption)).save(
            args.out / "overlays" / f"{stem}.png")


def _write_tables(out: Path, rows: list[dict], detector, checkpoint: str) -> None:
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    (out / "predictions.json").write_text(json.dumps({
        "checkpoint": checkpoint, "eval_config": detector.eval_config.to_dict(), "notes": detector.notes,
        "calibration": detector.calibration.to_dict() if detector.calibration else None,
        "predictions": rows}, indent=1))

