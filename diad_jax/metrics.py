"""Anomaly-detection metrics: I-/P-AUROC, AP, F1max and AUPRO, per class and averaged over classes.

Seven numbers per class (names as used everywhere in diad_jax):

    i_auroc, i_ap, i_f1max   image level: one score per image, label = "the mask has an anomalous pixel"
    p_auroc, p_ap, p_f1max   pixel level: every pixel of the class, label = mask > 0
    aupro                    area under the per-region-overlap curve up to FPR 0.3, normalised to [0, 1]

The image score is an input here: DiAD's (the max of the anomaly map average-pooled 8 times) is computed in
`diad_jax.scoring`. Maps are float arrays (N, H, W); masks are (N, H, W) with anything > 0 anomalous
({0, 1}, {0, 255} and resized float masks all work).

Two variants:

* ``variant="standard"`` (default): the textbook definitions. AUROC as the Mann-Whitney statistic
  (ties count one half), equal to sklearn's ``roc_auc_score``; AP and F1max as sklearn's
  ``average_precision_score`` / ``precision_recall_curve`` compute them; AUPRO as in the MVTec AD
  evaluation code: every distinct score is a threshold (exact, no grid), PRO = mean over the 8-connected
  ground-truth regions of the covered fraction, FPR over normal pixels, the curve starts at (0, 0), is
  linear between points, is integrated up to FPR = 0.3 (interpolated there) and divided by 0.3.
* ``variant="reference"``: what DiAD's ``utils/eval_helper.py`` computes, to compare with published
  numbers: every AUROC below 0.5 is replaced by 1 - AUROC, and AUPRO uses the thresholds
  ``np.arange(min, max, (max - min) / 200)`` over the class's map values (200 or, through float rounding,
  201 of them; a pixel is positive when its score is > the threshold), keeps the points with FPR < 0.3,
  divides their FPR by the largest kept FPR and integrates with the trapezoid rule. AP and F1max are the
  same in both variants.

Undefined values (no anomalous or no normal sample, a constant map for the reference AUPRO) are NaN and
raise an `UndefinedMetricWarning`; the mean over classes skips NaN classes (with a warning).

Everything is computed from one sort of the scores per class (plus a sort of the anomalous ones, which
are few), with integer counts, so ties are exact and there is no per-threshold loop over pixels.
"""
from __future__ import annotations

import logging
import math
import warnings
from functools import cached_property
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

IMAGE_METRICS = ("i_auroc", "i_ap", "i_f1max")
PIXEL_METRICS = ("p_auroc", "p_ap", "p_f1max", "aupro")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS
VARIANTS = ("standard", "reference")
METRIC_TITLES = {
    "i_auroc": "I-AUROC", "i_ap": "I-AP", "i_f1max": "I-F1max",
    "p_auroc": "P-AUROC", "p_ap": "P-AP", "p_f1max": "P-F1max", "aupro": "AUPRO",
}

# 8-connectivity inside each image and none across images (skimage.measure.label's default in 2-D).
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the data given (e.g. a class without anomalous samples); it is NaN."""


def _undefined(what: str, why: str) -> float:
    warnings.warn(f"{what} is undefined ({why}); reporting NaN", UndefinedMetricWarning, stacklevel=3)
    return math.nan


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def _as_scores(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype == np.float16:
        return x.astype(np.float32)
    if x.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise TypeError(f"{name} must be numeric, got dtype {x.dtype}")
        return x.astype(np.float64)
    return x


def _check_finite_sorted(sorted_scores: np.ndarray, name: str) -> None:
    # NaN sorts last and +-inf to the ends, so the two ends tell.
    if sorted_scores.size and not np.isfinite(sorted_scores[[0, -1]]).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _distinct(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an ascending array and the index of each one's first occurrence."""
    if sorted_values.size == 0:
        return sorted_values, np.zeros(0, dtype=np.int64)
    first = np.empty(sorted_values.size, dtype=bool)
    first[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return sorted_values[starts], starts


def _count_greater(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """#values > t for each float64 threshold t, exactly, without casting the big array to float64."""
    n = sorted_values.size
    if sorted_values.dtype == thresholds.dtype:
        return n - np.searchsorted(sorted_values, thresholds, side="right")
    t = thresholds.astype(sorted_values.dtype)  # nearest representable value
    rounded_up = t.astype(thresholds.dtype) > thresholds  # then x > threshold <=> x >= t
    left = np.searchsorted(sorted_values, t, side="left")
    right = np.searchsorted(sorted_values, t, side="right")
    return n - np.where(rounded_up, left, right)


class _Ranking:
    """One binary scoring problem, sorted once: every score ascending, and the positives' scores ascending.

    All of AUROC, AP and F1max follow from counts at the distinct positive scores u (ascending):
    how many positives / negatives score >= u, and how many negatives score < u or == u.
    """

    def __init__(self, all_sorted: np.ndarray, pos_sorted: np.ndarray, name: str = "scores"):
        _check_finite_sorted(all_sorted, name)
        self.all_sorted = all_sorted
        self.pos_sorted = pos_sorted
        self.n = all_sorted.size
        self.n_pos = pos_sorted.size
        self.n_neg = self.n - self.n_pos

    @classmethod
    def from_scores(cls, scores, labels, name: str = "scores") -> "_Ranking":
        scores = _as_scores(scores, name).ravel()
        labels = np.asarray(labels).ravel()
        if scores.shape != labels.shape:
            raise ValueError(f"{name} has {scores.size} values but the labels have {labels.size}")
        if scores.size == 0:
            raise ValueError(f"{name} is empty")
        return cls(np.sort(scores), np.sort(scores[labels > 0]), name)

    @cached_property
    def _distinct_pos(self) -> tuple[np.ndarray, np.ndarray]:
        return _distinct(self.pos_sorted)

    @property
    def distinct_pos(self) -> np.ndarray:
        """The distinct positive scores, ascending (the index of `counts`)."""
        return self._distinct_pos[0]

    def negatives_above(self, value) -> tuple[int, int]:
        """(#negatives > value, #negatives >= value)."""
        def above(side):  # all scores above value, minus the positive ones
            return ((self.n - int(np.searchsorted(self.all_sorted, value, side)))
                    - (self.n_pos - int(np.searchsorted(self.pos_sorted, value, side))))

        return above("right"), above("left")

    def kth_largest_negative(self, k: int):
        """The k-th highest negative score (1 <= k <= n_neg), by bisection over the sorted scores."""
        # #negatives >= all_sorted[i] falls as i grows; the answer is all_sorted[i] for the largest i
        # where it is still >= k.
        lo, hi = 0, self.n - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.negatives_above(self.all_sorted[mid])[1] >= k:
                lo = mid
            else:
                hi = mid - 1
        return self.all_sorted[lo]

    @cached_property
    def counts(self) -> dict[str, np.ndarray]:
        u, first = self._distinct_pos
        count = np.diff(np.append(first, self.n_pos))
        pos_ge = self.n_pos - first
        all_lt = np.searchsorted(self.all_sorted, u, side="left")
        all_le = np.searchsorted(self.all_sorted, u, side="right")
        return dict(
            count=count,
            pos_ge=pos_ge,
            neg_ge=(self.n - all_lt) - pos_ge,
            neg_lt=all_lt - first,
            neg_eq=(all_le - all_lt) - count,
        )


def _auroc(r: _Ranking, variant: str, what: str = "AUROC") -> float:
    if r.n_pos == 0 or r.n_neg == 0:
        return _undefined(what, f"{r.n_pos} anomalous and {r.n_neg} normal samples")
    c = r.counts
    # Mann-Whitney U, doubled to stay in integers: a tie counts one half.
    u2 = int(np.sum(c["count"] * (2 * c["neg_lt"] + c["neg_eq"])))
    value = u2 / (2 * r.n_pos * r.n_neg)
    if variant == "reference" and value < 0.5:
        value = 1.0 - value
    return float(value)


def _average_precision(r: _Ranking, what: str = "AP") -> float:
    if r.n_pos == 0:
        return _undefined(what, "no anomalous samples")
    c = r.counts
    precision = c["pos_ge"] / (c["pos_ge"] + c["neg_ge"])
    # sum over distinct positive scores of (recall step) * precision, as sklearn's step integral.
    return float(np.sum(c["count"] * precision) / r.n_pos)


def _f1max(r: _Ranking, what: str = "F1max") -> float:
    if r.n_pos == 0:
        return _undefined(what, "no anomalous samples")
    c = r.counts
    # F1 = 2PR/(P+R) = 2TP/(TP+FP+P). Lowering a threshold past negatives only lowers F1, so the best
    # threshold is one of the distinct positive scores.
    return float(np.max(2 * c["pos_ge"] / (c["pos_ge"] + c["neg_ge"] + r.n_pos)))


def f1_optimal_threshold(scores, labels) -> tuple[float, float]:
    """(threshold, F1): the score t maximising F1 of "anomalous when score >= t" (labels > 0 are
    anomalous); among thresholds of equal F1, the highest. Needs at least one anomalous sample."""
    r = _Ranking.from_scores(scores, labels, "scores")
    if r.n_pos == 0:
        raise ValueError("an F1-optimal threshold needs at least one anomalous sample")
    c = r.counts
    f1 = 2 * c["pos_ge"] / (c["pos_ge"] + c["neg_ge"] + r.n_pos)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))  # the last (highest) of the maxima
    return float(r.distinct_pos[best]), float(f1[best])


# ---------------------------------------------------------------------------------------------------
# AUPRO


def _region_weights(anomalous: np.ndarray) -> tuple[np.ndarray, int]:
    """For each anomalous pixel (in C order, as maps[anomalous]): 1 / (its region's size * #regions).

    Summed over the pixels above a threshold this is the mean over regions of the covered fraction (PRO).
    """
    labels, num = ndimage.label(anomalous, structure=_REGION_STRUCTURE)
    region = labels[anomalous]
    del labels
    if num == 0:
        return np.zeros(0), 0
    sizes = np.bincount(region, minlength=num + 1)
    return 1.0 / (sizes[region] * float(num)), num


def _aupro_standard(r: _Ranking, pos_values: np.ndarray, pos_weights: np.ndarray, fpr_limit: float) -> float:
    """Exact AUPRO at the continuum: thresholds at every distinct score, score >= t is positive.

    The curve is the polyline from (0, 0) through (FPR(>= u), PRO(>= u)) for every distinct score u,
    descending. Each normal pixel with score v widens it by 1 / n_neg at height (PRO(> v) + PRO(>= v)) / 2,
    so the area left of the segment that crosses the limit is a weighted Mann-Whitney sum over the
    anomalous pixels: sum of w_p * (#normal pixels above that segment scoring < p, + 1/2 per tie) / n_neg.
    No pass over the normal pixels is needed beyond the counts the AUROC uses.
    """
    n_neg = r.n_neg
    # The crossing segment ends at u_end, the k-th highest normal score, k the fewest with k / n_neg >= limit.
    k = min(max(1, math.ceil(fpr_limit * n_neg)), n_neg)
    while k > 1 and (k - 1) / n_neg >= fpr_limit:
        k -= 1
    while k < n_neg and k / n_neg < fpr_limit:
        k += 1
    u_end = r.kth_largest_negative(k)
    neg_gt, neg_ge = r.negatives_above(u_end)
    x0, x1 = neg_gt / n_neg, neg_ge / n_neg  # x0 < limit <= x1
    above = pos_values > u_end
    y0 = float(np.sum(pos_weights[above]))
    y1 = y0 + float(np.sum(pos_weights[pos_values == u_end]))
    c = r.counts
    idx = np.searchsorted(r.distinct_pos, pos_values[above])  # distinct value of each anomalous pixel
    below = neg_gt - c["neg_ge"][idx] + 0.5 * c["neg_eq"][idx]
    area = float(np.sum(pos_weights[above] * below)) / n_neg
    y_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    area += (fpr_limit - x0) * (y0 + y_at_limit) / 2
    return area / fpr_limit


def reference_thresholds(lo: float, hi: float, num_thresholds: int = 200) -> np.ndarray:
    """The reference's AUPRO thresholds: ``np.arange(lo, hi, (hi - lo) / num)`` in float64.

    Through rounding this has ``num`` or ``num + 1`` entries (the reference's maps are float64, so its
    arithmetic is float64 whatever the maps' dtype here).
    """
    lo, hi = float(lo), float(hi)
    return np.arange(lo, hi, (hi - lo) / num_thresholds)


def _aupro_reference(r: _Ranking, pos_values: np.ndarray, pos_weights: np.ndarray, fpr_limit: float,
                     num_thresholds: int, what: str) -> float:
    lo, hi = r.all_sorted[0], r.all_sorted[-1]
    if lo == hi:
        return _undefined(what, "the maps are constant, so the reference has no thresholds")
    th = reference_thresholds(lo, hi, num_thresholds)
    k = th.size
    # A pixel with score s is positive at the thresholds below s: th[i] < s <=> i < idx.
    idx = np.searchsorted(th, pos_values.astype(np.float64), side="left")
    pos_gt = np.cumsum(np.bincount(idx, minlength=k + 1)[::-1])[::-1][1:]
    pro = np.cumsum(np.bincount(idx, weights=pos_weights, minlength=k + 1)[::-1])[::-1][1:]
    fpr = (_count_greater(r.all_sorted, th) - pos_gt) / r.n_neg
    kept = fpr < fpr_limit
    x, y = fpr[kept], pro[kept]
    if x.size < 2:
        return _undefined(what, f"fewer than 2 of the reference's thresholds give FPR < {fpr_limit}")
    if x.max() == 0:
        return _undefined(what, "every kept threshold has FPR 0, which the reference divides by")
    x = x / x.max()
    # sklearn.metrics.auc: trapezoid, sign flipped for a decreasing x (FPR falls as thresholds rise).
    dx = np.diff(x)
    area = np.sum(dx * (y[1:] + y[:-1]) / 2.0)
    return float(-area if np.any(dx < 0) else area)


def _aupro(r: _Ranking, anomalous: np.ndarray, pos_values: np.ndarray, variant: str, fpr_limit: float,
           num_thresholds: int, what: str) -> float:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if r.n_pos == 0:
        return _undefined(what, "no anomalous pixels")
    if r.n_neg == 0:
        return _undefined(what, "no normal pixels")
    weights, _ = _region_weights(anomalous)
    if variant == "reference":
        return _aupro_reference(r, pos_values, weights, fpr_limit, num_thresholds, what)
    return _aupro_standard(r, pos_values, weights, fpr_limit)


# ---------------------------------------------------------------------------------------------------
# Public functions on one set of scores


def auroc(scores, labels, *, variant: str = "standard") -> float:
    """Area under the ROC curve (labels > 0 are positive). ``variant="reference"`` maps x < 0.5 to 1 - x."""
    _check_variant(variant)
    return _auroc(_Ranking.from_scores(scores, labels), variant)


def average_precision(scores, labels) -> float:
    """Average precision, as sklearn's ``average_precision_score`` (labels > 0 are positive)."""
    return _average_precision(_Ranking.from_scores(scores, labels))


def f1max(scores, labels) -> float:
    """Best F1 over all thresholds (the max of 2PR/(P+R) over sklearn's precision-recall curve)."""
    return _f1max(_Ranking.from_scores(scores, labels))


def aupro(maps, masks, *, variant: str = "standard", fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit``; maps and masks are (N, H, W) or (H, W).

    Regions are the 8-connected components of ``masks > 0`` in each image. ``num_thresholds`` is used by
    the reference variant only (the standard one is exact).
    """
    _check_variant(variant)
    maps, anomalous = _check_maps(maps, masks)
    r, pos_values = _pixel_ranking(maps, anomalous)
    return _aupro(r, anomalous, pos_values, variant, fpr_limit, num_thresholds, "AUPRO")


def image_metrics(scores, labels, *, variant: str = "standard", name: str = "") -> dict[str, float]:
    """i_auroc, i_ap, i_f1max of one set of image scores (labels > 0 are anomalous)."""
    _check_variant(variant)
    r = _Ranking.from_scores(scores, labels, "image scores")
    where = f" of class {name!r}" if name else ""
    return {
        "i_auroc": _auroc(r, variant, "i_auroc" + where),
        "i_ap": _average_precision(r, "i_ap" + where),
        "i_f1max": _f1max(r, "i_f1max" + where),
    }


def pixel_metrics(maps, masks, *, variant: str = "standard", fpr_limit: float = 0.3,
                  num_thresholds: int = 200, name: str = "") -> dict[str, float]:
    """p_auroc, p_ap, p_f1max and aupro of one class's maps (N, H, W) and masks (anything > 0 anomalous)."""
    _check_variant(variant)
    maps, anomalous = _check_maps(maps, masks)
    r, pos_values = _pixel_ranking(maps, anomalous)
    where = f" of class {name!r}" if name else ""
    return {
        "p_auroc": _auroc(r, variant, "p_auroc" + where),
        "p_ap": _average_precision(r, "p_ap" + where),
        "p_f1max": _f1max(r, "p_f1max" + where),
        "aupro": _aupro(r, anomalous, pos_values, variant, fpr_limit, num_thresholds, "aupro" + where),
    }


def _check_maps(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    maps = _as_scores(maps, "pixel maps")
    masks = np.asarray(masks)
    if maps.shape != masks.shape:
        raise ValueError(f"pixel maps have shape {maps.shape} but masks have shape {masks.shape}")
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.ndim != 3 or maps.size == 0:
        raise ValueError(f"pixel maps must be (N, H, W) or (H, W) and non-empty, got shape {maps.shape}")
    anomalous = masks if masks.dtype == bool else masks > 0
    return maps, anomalous


def _pixel_ranking(maps: np.ndarray, anomalous: np.ndarray) -> tuple[_Ranking, np.ndarray]:
    pos_values = maps[anomalous]
    r = _Ranking(np.sort(maps, axis=None), np.sort(pos_values), "pixel maps")
    return r, pos_values


# ---------------------------------------------------------------------------------------------------
# Per class and mean


def compute_metrics(image_scores, image_labels, pixel_maps, masks, class_names=None, *,
                    variant: str = "standard", fpr_limit: float = 0.3, num_thresholds: int = 200,
                    has_mask=None) -> dict[str, dict[str, float]]:
    """The seven metrics per class and their mean over classes.

    Args:
      image_scores: (N,) image anomaly scores, or None to skip the image metrics.
      image_labels: (N,) labels (> 0 anomalous), or None to derive them from the masks (any pixel > 0).
      pixel_maps: (N, H, W) float anomaly maps, or None to skip the pixel metrics.
      masks: (N, H, W) ground truth, anything > 0 anomalous; needed for the pixel metrics.
      class_names: (N,) class of each image; None puts every image in one class called "all".
      variant: "standard" or "reference" (see the module docstring).
      has_mask: (N,) bool, False for anomalous images without a ground-truth mask: they count in the
        image metrics (with image_labels) and are left out of the pixel metrics. Default: all True.

    Returns:
      {class_name: {metric: value}} in order of first appearance, then "mean": the mean over the classes
      where the metric is defined. Values are floats in [0, 1] (NaN where undefined).
    """
    _check_variant(variant)
    if image_scores is None and pixel_maps is None:
        raise ValueError("give image_scores, pixel_maps, or both")
    if pixel_maps is not None and masks is None:
        raise ValueError("pixel metrics need masks")
    if image_scores is not None and image_labels is None and masks is None:
        raise ValueError("image metrics need image_labels or masks to derive them from")

    sizes = {}
    for name, x in (("image_scores", image_scores), ("image_labels", image_labels),
                    ("pixel_maps", pixel_maps), ("masks", masks), ("class_names", class_names)):
        if x is not None:
            sizes[name] = len(x)
    if len(set(sizes.values())) != 1:
        raise ValueError(f"inputs disagree on the number of images: {sizes}")
    n = next(iter(sizes.values()))
    if image_scores is not None:
        image_scores = _as_scores(image_scores, "image_scores").reshape(n)
    if image_labels is not None:
        image_labels = np.asarray(image_labels).reshape(n) > 0
    if pixel_maps is not None:
        pixel_maps = _as_scores(pixel_maps, "pixel_maps")
        masks = np.asarray(masks)
        if pixel_maps.ndim != 3 or pixel_maps.shape != masks.shape:
            raise ValueError(f"pixel_maps {pixel_maps.shape} and masks {masks.shape} must both be (N, H, W)")
    elif masks is not None:
        masks = np.asarray(masks)
    has_mask = np.ones(n, bool) if has_mask is None else np.asarray(has_mask, bool).reshape(n)
    if not has_mask.all() and image_scores is not None and image_labels is None:
        raise ValueError("images without masks need image_labels (their labels cannot come from the masks)")

    names = np.asarray(["all"] * n if class_names is None else [str(c) for c in class_names])
    if np.any(names == "mean"):
        raise ValueError("a class may not be called 'mean': that key holds the mean over classes")
    _, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    results: dict[str, dict[str, float]] = {}
    for code in np.argsort(first, kind="stable"):
        idx = np.flatnonzero(inverse == code)
        cls = str(names[idx[0]])
        sel = slice(idx[0], idx[-1] + 1) if idx[-1] - idx[0] + 1 == idx.size else idx  # view if contiguous
        res: dict[str, float] = {}
        anomalous = None
        if masks is not None:
            anomalous = masks[sel] > 0
        if image_scores is not None:
            from_masks = anomalous.any(axis=(1, 2)) if anomalous is not None else None
            labels = image_labels[sel] if image_labels is not None else from_masks
            disagree = 0 if image_labels is None or from_masks is None else int(
                np.sum((labels != from_masks) & has_mask[sel]))
            if disagree:
                log.warning("class %r: %d image labels disagree with 'mask has an anomalous pixel'; "
                            "using the labels given", cls, disagree)
            res.update(image_metrics(image_scores[sel], labels, variant=variant, name=cls))
        if pixel_maps is not None:
            keep = has_mask[sel]
            maps_c, anomalous_c = (pixel_maps[sel], anomalous) if keep.all() else (pixel_maps[sel][keep],
                                                                                   anomalous[keep])
            res.update(pixel_metrics(maps_c, anomalous_c, variant=variant, fpr_limit=fpr_limit,
                                     num_thresholds=num_thresholds, name=cls))
        del anomalous
        results[cls] = res

    mean: dict[str, float] = {}
    for metric in METRIC_NAMES:
        values = {cls: res[metric] for cls, res in results.items() if metric in res}
        if not values:
            continue
        defined = [v for v in values.values() if not math.isnan(v)]
        if len(defined) < len(values):
            missing = [cls for cls, v in values.items() if math.isnan(v)]
            warnings.warn(f"mean {metric} is over {len(defined)} of {len(values)} classes; undefined for "
                          f"{missing}", UndefinedMetricWarning, stacklevel=2)
        mean[metric] = float(np.mean(defined)) if defined else math.nan
    results["mean"] = mean
    return results


def format_table(results: Mapping[str, Mapping[str, float]], *, metrics: Sequence[str] | None = None,
                 percent: bool = True, digits: int = 1) -> str:
    """A markdown table: one row per class then "mean", one column per metric (in percent by default)."""
    if metrics is None:
        present = {m for res in results.values() for m in res}
        metrics = [m for m in METRIC_NAMES if m in present]
    scale = 100.0 if percent else 1.0
    lines = ["| class | " + " | ".join(METRIC_TITLES.get(m, m) for m in metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for cls, res in results.items():
        cells = []
        for m in metrics:
            v = res.get(m, math.nan)
            cells.append("-" if math.isnan(v) else f"{scale * v:.{digits}f}")
        name = f"**{cls}**" if cls == "mean" else cls
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "IMAGE_METRICS", "METRIC_NAMES", "METRIC_TITLES", "PIXEL_METRICS", "VARIANTS", "UndefinedMetricWarning",
    "aupro", "auroc", "average_precision", "compute_metrics", "f1_optimal_threshold", "f1max", "format_table",
    "image_metrics",
    "pixel_metrics", "reference_thresholds",
]
