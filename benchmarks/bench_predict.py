#!/usr/bin/env python
"""Scoring a folder: `diad_jax.load(...).predict(folder)` (scripts/predict.py's path: weights placed
on the device once, batches padded to fixed buckets) vs the loop it replaces (the host numpy
weights passed into the jitted scorer on every batch, and the last, shorter batch compiled anew).

Both read the same N PNG files from one folder (PIL, resized to the model's size), use the same
random weights, the same batch size and eval config, and run back to back in this process; each
uses a fresh scorer, so its first call includes its compilation. Reported: first-call time
(compilation + first batch), steady-state images/s (excluding the first call), total wall time,
programs compiled, and the max abs score difference between the two (0 up to float rounding: the
noise is per image in both).

  python benchmarks/bench_predict.py --model tiny --images 64 --batch 8
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "demo", "sd15"], default="tiny")
    ap.add_argument("--images", type=int, default=64, help="images in the folder (not a multiple of --batch: "
                                                           "the last batch is shorter)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ddim-steps", type=int, default=10)
    args = ap.parse_args(argv)

    import jax
    from PIL import Image

    import diad_jax
    from diad_jax.configs import EvalConfig
    from diad_jax.data.imageio import read_image, resize_image
    from diad_jax.data.pipeline import normalize
    from diad_jax.scoring import Scorer

    ec = EvalConfig(batch_size=args.batch, ddim_steps=args.ddim_steps)
    det = diad_jax.load(f"random:{args.model}", eval_config=ec.scaled_footprint(
        diad_jax.ModelConfig.from_spec(args.model).image_size))
    ec = det.eval_config
    size = det.image_size
    folder = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    rng = np.random.default_rng(0)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 255, (size + 16, size + 16, 3), np.uint8)).save(folder / f"{i:05d}.png")
    files = sorted(str(p) for p in folder.glob("*.png"))

    # ours: Detector.predict on the folder
    times = []
    t0 = time.perf_counter()
    last = t0
    scores_new = []
    for p in det.iter_predict(folder, progress=False):
        scores_new.append(p.score)
        if len(scores_new) % args.batch == 0 or len(scores_new) == len(files):
            now = time.perf_counter()
            times.append(now - last)
            last = now
    total_new = time.perf_counter() - t0
    first_new, rest_new = times[0], sum(times[1:])
    programs_new = det.scorer.compiled_programs()

    # the replaced loop: host numpy weights into the jitted scorer every batch, unpadded last batch
    host_bundle = jax.device_get(det.bundle)
    scorer = Scorer.from_eval_config(det.config, ec)
    key = jax.random.PRNGKey(ec.seed)
    times, scores_old = [], []
    t0 = time.perf_counter()
    for start in range(0, len(files), args.batch):
        t = time.perf_counter()
        chunk = files[start:start + args.batch]
        images = normalize(np.stack([resize_image(read_image(f), size) for f in chunk]))
        out = scorer(host_bundle, images, key, np.arange(start, start + len(chunk)))
        scores_old.extend(np.asarray(out.scores).tolist())
        times.append(time.perf_counter() - t)
    total_old = time.perf_counter() - t0
    first_old, rest_old = times[0], sum(times[1:])
    programs_old = scorer.compiled_programs()

    # requests of 1, 2, ..., batch images (a service scoring what arrives): buckets vs one program per size
    sizes = list(range(1, args.batch + 1))
    t0 = time.perf_counter()
    for n in sizes:
        det.predict(files[:n])
    requests_new = time.perf_counter() - t0
    requests_programs_new = det.scorer.compiled_programs()
    t0 = time.perf_counter()
    for n in sizes:
        images = normalize(np.stack([resize_image(read_image(f), size) for f in files[:n]]))
        np.asarray(scorer(host_bundle, images, key, np.arange(n)).scores)
    requests_old = time.perf_counter() - t0
    requests_programs_old = scorer.compiled_programs()

    n_rest = len(files) - args.batch
    diff = float(np.max(np.abs(np.asarray(scores_new) - np.asarray(scores_old))))
    print(f"\nmachine: {platform.machine()} {platform.processor() or ''}, {jax.devices()[0].device_kind}, "
          f"backend {jax.default_backend()}, jax {jax.__version__}; model {args.model} ({size} px), "
          f"{len(files)} images, batch {args.batch}, {ec.ddim_steps} DDIM steps\n")
    print("| path | first call (compile + batch) s | images/s after it | total s | programs compiled |")
    print("|---|---:|---:|---:|---:|")
    for name, first, rest, total, progs in (
            ("`Detector.predict` (weights placed once, bucketed batches)", first_new, rest_new, total_new,
             programs_new),
            ("per-batch host weights, last batch unpadded (replaced)", first_old, rest_old, total_old, programs_old)):
        print(f"| {name} | {first:.1f} | {n_rest / rest:.2f} | {total:.1f} | {progs} |")
    print(f"\nsteady-state ratio (ours / replaced): {(n_rest / rest_new) / (n_rest / rest_old):.2f}x; "
          f"max |score difference| {diff:.2e}\n")
    print(f"| then: {len(sizes)} requests of 1..{args.batch} images | total s | programs compiled (cumulative) |")
    print("|---|---:|---:|")
    print(f"| `Detector.predict` | {requests_new:.1f} | {requests_programs_new} |")
    print(f"| per-batch host weights (replaced) | {requests_old:.1f} | {requests_programs_old} |")


if __name__ == "__main__":
    main()
