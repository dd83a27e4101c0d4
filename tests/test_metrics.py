"""diad_jax.metrics against scikit-learn, scikit-image and straightforward per-threshold implementations."""
from __future__ import annotations

import math
import statistics
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from diad_jax import metrics as M

# ------------------------------------------------------------------------------------------------------
# Oracles written out the slow, obvious way


def sk_f1max(labels, scores):
    """The reference's F1max: max over sklearn's precision-recall curve of 2PR/(P+R), non-finite dropped."""
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * p * r / (p + r)
    return float(np.max(f1[np.isfinite(f1)]))


def brute_f1max(labels, scores):
    """F1 at every threshold t in the distinct scores (score >= t is positive)."""
    labels = np.asarray(labels).ravel() > 0
    scores = np.asarray(scores).ravel()
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def regions_of(masks):
    """(image index, coords) of every 8-connected region, via skimage (the reference's labelling)."""
    out = []
    for i, m in enumerate(masks):
        for region in measure.regionprops(measure.label((m > 0).astype(np.uint8))):
            out.append((i, region.coords[:, 0], region.coords[:, 1], region.area))
    return out


def reference_aupro_loop(masks, amaps, num_th=200):
    """The reference's compute_pro, step for step (float64 maps as in the reference; pandas left out)."""
    amaps = np.asarray(amaps, dtype=np.float64)
    masks = (np.asarray(masks) > 0).astype(np.float64)
    regions = regions_of(masks)  # the labels do not depend on the threshold: hoisted out of the loop
    inverse = 1 - masks
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / num_th
    pros, fprs = [], []
    for th in np.arange(min_th, max_th, delta):
        binary = amaps > th
        pros.append(statistics.mean(binary[i][r, c].sum() / area for i, r, c, area in regions))
        fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < 0.3
    return sk_auc(fprs[keep] / fprs[keep].max(), pros[keep])


def standard_aupro_loop(masks, maps, limit=0.3):
    """Every distinct score as a threshold (score >= t), curve from (0, 0), interpolated at `limit`."""
    masks = np.asarray(masks) > 0
    regions = regions_of(masks)
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        binary = maps >= t
        xs.append(np.sum(binary & normal) / normal.sum())
        ys.append(np.mean([binary[i][r, c].mean() for i, r, c, _ in regions]))
    xs, ys = np.array(xs), np.array(ys)
    i = int(np.argmax(xs >= limit))
    y_lim = ys[i - 1] + (ys[i] - ys[i - 1]) * (limit - xs[i - 1]) / (xs[i] - xs[i - 1])
    x = np.append(xs[:i], limit)
    y = np.append(ys[:i], y_lim)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / limit)


# ------------------------------------------------------------------------------------------------------
# Data


def blob_data(seed, n=6, size=32, anomalous_frac=0.7, quantise=None, dtype=np.float32):
    """Masks of irregular blobs (thresholded smooth noise: diagonal contacts, holes, several regions)
    and maps that correlate with them."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2))
    masks = (noise > 1.2 * noise.std()).astype(np.uint8)
    masks[rng.random(n) > anomalous_frac] = 0
    maps = ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1, 1)) + 0.3 * rng.normal(size=masks.shape)
    if quantise:
        maps = np.round(maps * quantise) / quantise
    return maps.astype(dtype), masks


# ------------------------------------------------------------------------------------------------------
# AUROC, AP, F1max


@pytest.mark.parametrize("n", [7, 200, 20_000])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ranking_metrics_match_sklearn(n, ties, dtype):
    rng = np.random.default_rng(n + 10 * ties)
    labels = rng.random(n) < 0.3
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + labels
    if ties:
        scores = np.round(scores * 2) / 2  # a handful of distinct values, shared by both classes
    scores = scores.astype(dtype)
    assert M.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert M.average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert M.f1max(scores, labels) == pytest.approx(sk_f1max(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_f1max_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < rng.uniform(0.05, 0.6)
    labels[0] = True
    scores = rng.integers(0, 12 if seed % 2 else 10_000, size=300) + 3 * labels
    assert M.f1max(scores, labels) == pytest.approx(brute_f1max(labels, scores), abs=1e-12)


def test_labels_any_positive_value_and_shapes():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 8, 8))
    masks = (rng.random((3, 8, 8)) > 0.8).astype(np.uint8)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert M.auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert M.auroc(maps, masks * 255) == pytest.approx(expected, abs=1e-12)
    assert M.auroc(maps, masks * 0.25) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="labels"):
        M.auroc(maps, masks[:2])


def test_reference_variant_flips_auroc_below_half():
    rng = np.random.default_rng(1)
    labels = rng.random(500) < 0.4
    scores = rng.normal(size=500) - labels  # anti-correlated: AUROC well below 0.5
    standard = M.auroc(scores, labels)
    assert standard == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert standard < 0.4
    assert M.auroc(scores, labels, variant="reference") == pytest.approx(1 - standard, abs=1e-12)
    good = M.auroc(-scores, labels)
    assert M.auroc(-scores, labels, variant="reference") == good  # >= 0.5: unchanged


def test_reference_variant_flips_pixel_and_image_auroc_in_compute_metrics():
    maps, masks = blob_data(3, n=6)
    maps = -maps
    labels = masks.reshape(6, -1).any(1)
    scores = maps.reshape(6, -1).mean(1)
    std = M.compute_metrics(scores, None, maps, masks)["all"]
    ref = M.compute_metrics(scores, None, maps, masks, variant="reference")["all"]
    assert std["p_auroc"] < 0.5
    assert ref["p_auroc"] == pytest.approx(1 - std["p_auroc"], abs=1e-12)
    assert ref["i_auroc"] == pytest.approx(max(std["i_auroc"], 1 - std["i_auroc"]), abs=1e-12)
    assert std["i_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for k in ("i_ap", "i_f1max", "p_ap", "p_f1max"):
        assert ref[k] == std[k]


def test_non_finite_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        M.auroc(np.array([0.1, np.nan, 0.3]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        M.aupro(np.full((1, 4, 4), np.inf), np.ones((1, 4, 4)))


# ------------------------------------------------------------------------------------------------------
# AUPRO


@pytest.mark.parametrize("seed,quantise,dtype", [(0, None, np.float32), (1, None, np.float64),
                                                 (2, 20, np.float32), (3, 7, np.float64)])
def test_aupro_reference_variant_matches_reference_loop(seed, quantise, dtype):
    maps, masks = blob_data(seed, n=8, size=40, quantise=quantise, dtype=dtype)
    ours = M.aupro(maps, masks, variant="reference")
    expected = reference_aupro_loop(masks, maps)
    assert ours == pytest.approx(expected, abs=1e-12)


def test_aupro_reference_variant_thresholds_on_the_grid_and_201_thresholds():
    # Scores exactly on the thresholds (the reference counts score > threshold) ...
    maps, masks = blob_data(4, n=6, size=32)
    maps = np.round((maps - maps.min()) / (maps.max() - maps.min()) * 200).astype(np.float64)
    assert M.reference_thresholds(maps.min(), maps.max()).size == 200
    assert M.aupro(maps, masks, variant="reference") == pytest.approx(reference_aupro_loop(masks, maps), abs=1e-12)
    # ... and a float32 range for which np.arange's rounding gives 201 thresholds.
    lo, hi = np.float32(0.5118216), np.float32(0.9504637)
    assert M.reference_thresholds(lo, hi).size == 201
    maps, masks = blob_data(5, n=6, size=32)
    maps = (lo + (maps - maps.min()) / (maps.max() - maps.min()) * (hi - lo)).astype(np.float32)
    maps.flat[0], maps.flat[1] = lo, hi
    assert (maps.min(), maps.max()) == (lo, hi)
    assert M.aupro(maps, masks, variant="reference") == pytest.approx(reference_aupro_loop(masks, maps), abs=1e-12)


@pytest.mark.parametrize("seed,quantise,limit", [(0, None, 0.3), (1, 5, 0.3), (2, 10, 0.3), (3, None, 0.05),
                                                 (4, 3, 1.0)])
def test_aupro_standard_exact_against_every_threshold(seed, quantise, limit):
    maps, masks = blob_data(seed, n=4, size=20, quantise=quantise, dtype=np.float64)
    ours = M.aupro(maps, masks, fpr_limit=limit)
    assert ours == pytest.approx(standard_aupro_loop(masks, maps, limit), abs=1e-12)


def test_aupro_uses_8_connectivity():
    # Three pixels in a column and one pixel touching them only at a corner: one 8-connected region of
    # 4 pixels (PRO 1/4 when only the corner pixel is found), two 4-connected regions (PRO 1/2).
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 1:4, 1] = 1
    mask[0, 4, 2] = 1
    maps = np.zeros((1, 8, 8))
    maps[0, 4, 2] = 1.0
    # Standard: (0,0) -> (0, 1/4) -> (1, 1) linearly: PRO(x) = 1/4 + 3x/4, mean over [0, 0.3] = 0.3625.
    assert M.aupro(maps, mask) == pytest.approx(0.25 + 0.75 * 0.15, abs=1e-12)
    assert M.aupro(maps, mask) == pytest.approx(standard_aupro_loop(mask, maps), abs=1e-12)


def test_aupro_single_region():
    yy, xx = np.mgrid[:32, :32]
    mask = (((yy - 12) ** 2 + (xx - 18) ** 2) < 30)[None].astype(np.uint8)
    rng = np.random.default_rng(7)
    maps = (np.exp(-((yy - 13) ** 2 + (xx - 17) ** 2) / 40.0) + 0.2 * rng.random((32, 32)))[None]
    assert M.aupro(maps, mask) == pytest.approx(standard_aupro_loop(mask, maps), abs=1e-12)
    assert M.aupro(maps, mask, variant="reference") == pytest.approx(reference_aupro_loop(mask, maps), abs=1e-12)
    # 2-D input is one image.
    assert M.aupro(maps[0], mask[0]) == M.aupro(maps, mask)


def test_aupro_perfect_map():
    maps, masks = blob_data(8, n=4, size=24)
    perfect = masks.astype(np.float32)
    assert M.aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    # The reference keeps only FPR-0 points here and divides by their largest FPR: NaN.
    with pytest.warns(M.UndefinedMetricWarning, match="FPR 0"):
        assert math.isnan(M.aupro(perfect, masks, variant="reference"))


# ------------------------------------------------------------------------------------------------------
# Edge cases


def test_constant_maps():
    maps, masks = blob_data(9, n=4, size=16)
    const = np.full(maps.shape, 0.7, np.float32)
    prevalence = masks.mean()
    m = M.pixel_metrics(const, masks)
    assert m["p_auroc"] == 0.5
    assert m["p_ap"] == pytest.approx(prevalence, abs=1e-12)
    assert m["p_f1max"] == pytest.approx(2 * prevalence / (1 + prevalence), abs=1e-12)
    assert m["aupro"] == pytest.approx(0.15, abs=1e-12)  # the diagonal from (0, 0) to (1, 1)
    assert m["p_ap"] == pytest.approx(average_precision_score(masks.ravel(), const.ravel()), abs=1e-12)
    with pytest.warns(M.UndefinedMetricWarning, match="constant"):
        assert math.isnan(M.aupro(const, masks, variant="reference"))


def test_class_without_anomalies_gives_nan_with_warning():
    maps_a, masks_a = blob_data(10, n=6)
    maps_b, _ = blob_data(11, n=5)
    masks_b = np.zeros_like(masks_a[:5])
    maps = np.concatenate([maps_a, maps_b])
    masks = np.concatenate([masks_a, masks_b])
    scores = maps.reshape(len(maps), -1).max(1)
    names = ["a"] * 6 + ["b"] * 5
    with pytest.warns(M.UndefinedMetricWarning) as record:
        res = M.compute_metrics(scores, None, maps, masks, names)
    messages = " ".join(str(w.message) for w in record)
    assert "i_auroc of class 'b'" in messages and "aupro of class 'b'" in messages
    assert all(math.isnan(v) for v in res["b"].values())
    assert all(not math.isnan(v) for v in res["a"].values())
    assert res["mean"] == res["a"]  # the mean skips the undefined class
    assert "| b | - | - |" in M.format_table(res)


def test_class_without_normal_images():
    maps, masks = blob_data(12, n=5, anomalous_frac=1.0)
    assert masks.reshape(5, -1).any(1).all()
    scores = maps.reshape(5, -1).max(1)
    with pytest.warns(M.UndefinedMetricWarning, match="i_auroc"):
        res = M.compute_metrics(scores, None, maps, masks)["all"]
    assert math.isnan(res["i_auroc"])
    assert res["i_ap"] == 1.0 and res["i_f1max"] == 1.0
    assert res["p_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_labels_given_but_no_anomalous_pixels():
    maps, _ = blob_data(13, n=4)
    masks = np.zeros(maps.shape, np.uint8)
    with pytest.warns(M.UndefinedMetricWarning):
        res = M.compute_metrics(maps.max(axis=(1, 2)), [0, 1, 0, 1], maps, masks)["all"]
    assert not math.isnan(res["i_auroc"])
    assert all(math.isnan(res[k]) for k in M.PIXEL_METRICS)


def test_no_positive_scores_standalone():
    with pytest.warns(M.UndefinedMetricWarning):
        assert math.isnan(M.auroc([0.1, 0.2], [0, 0]))
    with pytest.warns(M.UndefinedMetricWarning):
        assert math.isnan(M.average_precision([0.1, 0.2], [0, 0]))
    with pytest.warns(M.UndefinedMetricWarning):
        assert math.isnan(M.f1max([0.1, 0.2], [0, 0]))


# ------------------------------------------------------------------------------------------------------
# compute_metrics and the table


def test_compute_metrics_per_class_matches_direct_computation():
    parts = [blob_data(20 + i, n=5 + i) for i in range(3)]
    names_in = ["zipper", "bottle", "cable"]
    maps = np.concatenate([p[0] for p in parts])
    masks = np.concatenate([p[1] for p in parts]) * 255
    names = np.concatenate([[c] * len(p[0]) for c, p in zip(names_in, parts)])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(maps))  # classes interleaved: exercises the non-contiguous path
    maps, masks, names = maps[order], masks[order], names[order]
    scores = maps.reshape(len(maps), -1).max(1) + 0.1 * rng.random(len(maps))
    labels = masks.reshape(len(maps), -1).any(1)
    for variant in M.VARIANTS:
        res = M.compute_metrics(scores, None, maps, masks, names, variant=variant)
        assert list(res) == list(dict.fromkeys(names)) + ["mean"]
        for cls in names_in:
            sel = names == cls
            flip = (lambda v: max(v, 1 - v)) if variant == "reference" else (lambda v: v)
            expected = {
                "i_auroc": flip(roc_auc_score(labels[sel], scores[sel])),
                "i_ap": average_precision_score(labels[sel], scores[sel]),
                "i_f1max": sk_f1max(labels[sel], scores[sel]),
                "p_auroc": flip(roc_auc_score(masks[sel].ravel() > 0, maps[sel].ravel())),
                "p_ap": average_precision_score(masks[sel].ravel() > 0, maps[sel].ravel()),
                "p_f1max": sk_f1max(masks[sel].ravel() > 0, maps[sel].ravel()),
                "aupro": (reference_aupro_loop(masks[sel], maps[sel]) if variant == "reference"
                          else standard_aupro_loop(masks[sel], maps[sel])),
            }
            assert res[cls] == pytest.approx(expected, abs=1e-12)
        for k in M.METRIC_NAMES:
            assert res["mean"][k] == pytest.approx(np.mean([res[c][k] for c in names_in]), abs=1e-15)
    # Labels given explicitly give the same image metrics; image-only and pixel-only calls work.
    res = M.compute_metrics(scores, labels, maps, masks, names)
    only_image = M.compute_metrics(scores, labels, None, None, names)
    only_pixel = M.compute_metrics(None, None, maps, masks, names)
    assert set(only_image["bottle"]) == set(M.IMAGE_METRICS)
    assert set(only_pixel["bottle"]) == set(M.PIXEL_METRICS)
    for cls in names_in:
        assert {**only_image[cls], **only_pixel[cls]} == res[cls]


def test_compute_metrics_input_errors():
    maps, masks = blob_data(30, n=3)
    with pytest.raises(ValueError, match="number of images"):
        M.compute_metrics(np.zeros(2), None, maps, masks)
    with pytest.raises(ValueError, match="masks"):
        M.compute_metrics(None, None, maps, None)
    with pytest.raises(ValueError, match="variant"):
        M.compute_metrics(None, None, maps, masks, variant="published")
    with pytest.raises(ValueError, match="mean"):
        M.compute_metrics(None, None, maps, masks, ["a", "mean", "a"])


def test_format_table():
    res = {"bottle": dict(zip(M.METRIC_NAMES, np.linspace(0.9, 0.96, 7))),
           "mean": dict(zip(M.METRIC_NAMES, [0.5, math.nan, 1, 1, 1, 1, 0.12345]))}
    table = M.format_table(res).splitlines()
    assert table[0] == "| class | I-AUROC | I-AP | I-F1max | P-AUROC | P-AP | P-F1max | AUPRO |"
    assert table[2] == "| bottle | 90.0 | 91.0 | 92.0 | 93.0 | 94.0 | 95.0 | 96.0 |"
    assert table[3] == "| **mean** | 50.0 | - | 100.0 | 100.0 | 100.0 | 100.0 | 12.3 |"


def test_library_does_not_import_sklearn_or_skimage():
    code = ("import sys, diad_jax.metrics; "
            "bad = [m for m in ('sklearn', 'skimage', 'pandas', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_warnings_on_ordinary_data():
    maps, masks = blob_data(31, n=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for variant in M.VARIANTS:
            M.compute_metrics(maps.max(axis=(1, 2)), None, maps, masks, variant=variant)
