"""Time the seven metrics on an MVTec-AD-sized synthetic test set: diad_jax.metrics vs the reference's way.

The reference (DiAD utils/eval_helper.py) computes, per class, sklearn's roc_curve + auc,
average_precision_score and precision_recall_curve on the flattened pixels, and AUPRO with a Python loop
over 200 thresholds that, for every threshold, binarises the class's maps and sums the covered pixels of
every skimage region (labelled with skimage.measure.label + regionprops). The baseline here does exactly
that, except that it labels each mask once instead of once per threshold (the labels do not depend on the
threshold; ``--literal`` labels per threshold as the reference does), so the speed-up is conservative.

Data: 15 classes with MVTec AD's test-set sizes (1725 images) at 256x256, ~73% anomalous images with 1-3
irregular blobs each, maps = smooth background noise + a soft bump of random strength over each blob
(some defects are faint), float32, image score = the map's max. ``--quick`` uses a tenth of the images
at 128x128.

    python benchmarks/bench_metrics.py            # full size (the baseline takes a few minutes)
    python benchmarks/bench_metrics.py --quick
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diad_jax import metrics as M  # noqa: E402

# MVTec AD test images per class (sum 1725).
MVTEC_TEST_SIZES = {
    "bottle": 83, "cable": 150, "capsule": 132, "carpet": 117, "grid": 78, "hazelnut": 110, "leather": 124,
    "metal_nut": 115, "pill": 167, "screw": 160, "tile": 117, "toothbrush": 42, "transistor": 100,
    "wood": 79, "zipper": 151,
}


def synthetic_set(scale: float, size: int, seed: int):
    """(image_scores, pixel_maps, masks, class_names) like an MVTec AD test set."""
    rng = np.random.default_rng(seed)
    counts = {c: max(4, round(n * scale)) for c, n in MVTEC_TEST_SIZES.items()}
    n = sum(counts.values())
    names = np.concatenate([[c] * k for c, k in counts.items()])
    maps = np.empty((n, size, size), np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    # ~73% anomalous, and every class has at least one normal and one anomalous image.
    anomalous = rng.random(n) < 0.73
    first = np.cumsum([0] + list(counts.values()))[:-1]
    anomalous[first], anomalous[first + 1] = False, True
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    chunk = 64
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        k = stop - start
        # Smooth background: 16x16 noise, bilinearly upsampled; a second field makes blob edges irregular.
        low = rng.normal(size=(2, k, 16, 16)).astype(np.float32)
        field = ndimage.zoom(low, (1, 1, size / 16, size / 16), order=1, mode="nearest")
        m = 0.15 * field[0] + 0.3
        for i in range(k):
            if not anomalous[start + i]:
                continue
            blob = np.zeros((size, size), bool)
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.uniform(0.15, 0.85, 2)
                a, b = rng.uniform(0.02, 0.12, 2)
                t = rng.uniform(0, np.pi)
                u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
                v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
                d2 = u * u + v * v
                blob |= d2 + 0.5 * field[1, i] < 1
                m[i] += rng.uniform(0.05, 0.8) * np.exp(-d2 / 3)
            masks[start + i] = blob
        maps[start:stop] = m
    scores = maps.reshape(n, -1).max(axis=1)
    return scores, maps, masks, names


# ------------------------------------------------------------------------------------------------------
# The reference's way (sklearn + skimage + a per-threshold loop)


def baseline(scores, maps, masks, names, literal: bool):
    from skimage import measure
    from sklearn import metrics as skm

    def roc_auc(y, s):
        fpr, tpr, _ = skm.roc_curve(y, s, pos_label=1)
        a = skm.auc(fpr, tpr)
        return 1 - a if a < 0.5 else a

    def f1max(y, s):
        p, r, _ = skm.precision_recall_curve(y, s)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = 2 * p * r / (p + r)
        return np.max(f[np.isfinite(f)])

    def compute_pro(masks, amaps, num_th=200):
        amaps = amaps.astype(np.float64)  # the reference's maps are float64
        masks = masks.astype(np.float64)
        regions = None if literal else [measure.regionprops(measure.label(m)) for m in masks]
        binary_amaps = np.zeros_like(amaps, dtype=bool)
        min_th, max_th = amaps.min(), amaps.max()
        delta = (max_th - min_th) / num_th
        inverse_masks = 1 - masks
        rows = []
        for th in np.arange(min_th, max_th, delta):
            binary_amaps[amaps <= th] = 0
            binary_amaps[amaps > th] = 1
            pros = []
            for i, (binary_amap, mask) in enumerate(zip(binary_amaps, masks)):
                for region in (measure.regionprops(measure.label(mask)) if literal else regions[i]):
                    tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                    pros.append(tp_pixels / region.area)
            fpr = np.logical_and(inverse_masks, binary_amaps).sum() / inverse_masks.sum()
            rows.append((statistics.mean(pros), fpr))
        pro, fpr = np.array(rows).T
        keep = fpr < 0.3
        return skm.auc(fpr[keep] / fpr[keep].max(), pro[keep])

    times = dict.fromkeys(["image (3 metrics)", "p_auroc", "p_ap", "p_f1max", "aupro"], 0.0)
    results = {}
    for cls in dict.fromkeys(names):
        sel = names == cls
        preds, gts = maps[sel], masks[sel]
        labels = (gts.reshape(len(gts), -1).sum(axis=1) != 0).astype(int)
        flat_p = np.concatenate([p.flatten() for p in preds])
        flat_m = np.concatenate([m.flatten() for m in gts])
        flat_m[flat_m > 0] = 1
        res = {}
        t0 = time.perf_counter()
        res["i_auroc"] = roc_auc(labels, scores[sel])
        res["i_ap"] = skm.average_precision_score(labels, scores[sel])
        res["i_f1max"] = f1max(labels, scores[sel])
        t1 = time.perf_counter()
        res["p_auroc"] = roc_auc(flat_m, flat_p)
        t2 = time.perf_counter()
        res["p_ap"] = skm.average_precision_score(flat_m, flat_p)
        t3 = time.perf_counter()
        res["p_f1max"] = f1max(flat_m, flat_p)
        t4 = time.perf_counter()
        res["aupro"] = compute_pro((gts > 0).astype(np.uint8), preds)
        t5 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[key] += dt
        results[cls] = {k: float(v) for k, v in res.items()}
        print(f"  baseline {cls}: {t5 - t0:.1f} s", file=sys.stderr, flush=True)
    results["mean"] = {k: float(np.mean([r[k] for r in results.values()])) for k in M.METRIC_NAMES}
    return results, times


# ------------------------------------------------------------------------------------------------------


def _diff(a: float, b: float) -> float:
    if np.isnan(a) or np.isnan(b):
        return 0.0 if np.isnan(a) and np.isnan(b) else float("inf")
    return abs(a - b)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tenth of the images at 128x128")
    parser.add_argument("--scale", type=float, default=None, help="fraction of MVTec's image counts (default 1)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (the best is reported)")
    parser.add_argument("--skip-baseline", action="store_true", help="time ours only")
    parser.add_argument("--literal", action="store_true",
                        help="baseline labels the masks at every threshold, as the reference does (slow)")
    args = parser.parse_args(argv)
    scale = args.scale if args.scale is not None else (0.1 if args.quick else 1.0)
    size = args.size if args.size is not None else (128 if args.quick else 256)

    t = time.perf_counter()
    scores, maps, masks, names = synthetic_set(scale, size, args.seed)
    anomalous_images = masks.reshape(len(masks), -1).any(1).mean()
    print(f"generated {len(maps)} images of {size}x{size} ({maps.size / 1e6:.0f} M pixels, "
          f"{anomalous_images:.0%} anomalous, {(masks > 0).mean():.2%} anomalous pixels) "
          f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    rss_data = peak_rss_gib()

    ours, ours_times, first_times = {}, {}, {}
    for variant in M.VARIANTS:
        runs = []
        for _ in range(max(1, args.repeats)):
            t = time.perf_counter()
            ours[variant] = M.compute_metrics(scores, None, maps, masks, names, variant=variant)
            runs.append(time.perf_counter() - t)
        first_times[variant], ours_times[variant] = runs[0], min(runs)
    rss_ours = peak_rss_gib()

    import scipy
    versions = f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}"
    lines = [
        f"Machine: {machine()}; {versions}",
        f"Data: {len(maps)} images, {size}x{size}, {len(set(names))} classes "
        f"({maps.size / 1e6:.0f} M pixels, float32, {anomalous_images:.0%} anomalous images)",
        f"Ours: best of {max(1, args.repeats)} runs (first run: "
        + ", ".join(f"{v} {first_times[v]:.2f} s" for v in M.VARIANTS) + ")",
        f"Peak RSS: {rss_data:.2f} GiB after generating the data, {rss_ours:.2f} GiB after ours",
        "",
    ]
    if args.skip_baseline:
        lines += ["| implementation | variant | time (s) |", "|---|---|---:|"]
        for variant in M.VARIANTS:
            lines.append(f"| diad_jax.metrics.compute_metrics | {variant} | {ours_times[variant]:.2f} |")
        lines.append("")
    else:
        import sklearn
        import skimage
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            ref, ref_times = baseline(scores, maps, masks, names, args.literal)
            ref_total = time.perf_counter() - t
        lines[0] += f", scikit-learn {sklearn.__version__}, scikit-image {skimage.__version__}"
        how = "labels per threshold" if args.literal else "labels once per mask"
        lines += [
            "| implementation | variant | time (s) | speed-up |",
            "|---|---|---:|---:|",
        ]
        for variant in M.VARIANTS:
            lines.append(f"| diad_jax.metrics.compute_metrics | {variant} | {ours_times[variant]:.2f} | "
                         f"{ref_total / ours_times[variant]:.0f}x |")
        lines.append(f"| sklearn + skimage, 200-threshold loop ({how}) | reference | {ref_total:.1f} | 1x |")
        lines += ["", "Baseline time by metric (s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in ref_times.items()), ""]
        diffs = {k: max(_diff(ours["reference"][c][k], ref[c][k]) for c in ref) for k in M.METRIC_NAMES}
        lines += ["Max abs difference, ours (reference variant) vs baseline, over classes and mean:", "",
                  "| " + " | ".join(M.METRIC_TITLES[k] for k in M.METRIC_NAMES) + " |",
                  "|" + "---:|" * len(M.METRIC_NAMES),
                  "| " + " | ".join(f"{diffs[k]:.1e}" for k in M.METRIC_NAMES) + " |", ""]
    lines += ["Our numbers (mean over classes, %):", "",
              "| variant | " + " | ".join(M.METRIC_TITLES[k] for k in M.METRIC_NAMES) + " |",
              "|---|" + "---:|" * len(M.METRIC_NAMES)]
    for variant in M.VARIANTS:
        lines.append(f"| {variant} | " + " | ".join(f"{100 * ours[variant]['mean'][k]:.2f}"
                                                   for k in M.METRIC_NAMES) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
