"""Evaluate a DiAD model on a prepared dataset: denoise-and-score every test image, then the
seven metrics per class and their mean, plus heat-map overlays.

    detector = diad_jax.load("checkpoints/diad_mvtec")
    result = evaluate(detector, prepared, split="test")
    print(result.table)           # markdown: per class + mean
    result.save("outputs/eval")   # results.json, results.md, heatmaps/<class>/*.png
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
from tqdm import tqdm

from diad_jax import sharding as shd
from diad_jax.metrics import compute_metrics, format_table
from diad_jax.scoring import check_finite_maps
from diad_jax.visualize import evaluation_panel

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]
    variant: str
    image_scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    file_names: list[str]
    timings: dict[str, float]
    maps: np.ndarray | None = None      # (N, S, S) anomaly maps
    masks: np.ndarray | None = None     # (N, S, S) bool ground truth
    has_mask: np.ndarray | None = None  # (N,) False: anomalous without a mask (image metrics only)
    panels: dict[str, list[tuple[str, np.ndarray]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def table(self) -> str:
        return format_table(self.metrics)

    def save(self, out_dir: str | Path) -> Path:
        from PIL import Image
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({
            "metrics": self.metrics, "variant": self.variant, "timings": self.timings, "info": self.info,
            "images": [{"file": f, "class": c, "label": int(l), "score": float(s)}
                       for f, c, l, s in zip(self.file_names, self.class_names, self.labels, self.image_scores)],
        }, indent=1, default=float))
        (out / "results.md").write_text(f"# DiAD evaluation ({self.variant} metrics, %)\n\n{self.table}\n")
        for cls, panels in self.panels.items():
            d = out / "heatmaps" / cls
            d.mkdir(parents=True, exist_ok=True)
            for name, panel in panels:
                Image.fromarray(panel).save(d / f"{name}.png")
        return out


def evaluate(detector, data, *, split: str = "test", classes: Iterable[str] | str | None = None,
             limit_per_class: int | None = None, heatmaps_per_class: int = 0,
             progress: bool = True) -> EvalResult:
    """Denoise-and-score the `split` of a prepared dataset (diad_jax.data) with a `Detector` and
    compute the seven metrics per class (the detector's eval config: batch size, metric variant).

    The one evaluation loop of diad_jax (scripts/evaluate.py, the demo and the Trainer's periodic
    evaluation use it): every process reads its share of each batch, the maps and scores are
    gathered, and image i of the split gets the noise of fold_in(key(seed), i) -- the same map and
    score as `detector.predict` gives it, at any batch size and number of devices or processes.
    Anomalous images without a ground-truth mask count in the image metrics only (`info["no_mask"]`)."""
    from diad_jax import data as dataio  # (grain: imported when a dataset is evaluated)

    ec = detector.eval_config
    n_proc = jax.process_count()
    if data.image_size != detector.image_size:
        log.info("dataset prepared at %d px; the pipeline resizes to the model's %d px", data.image_size,
                 detector.image_size)
    indices = (balanced_subset(data, split, classes, limit_per_class) if limit_per_class is not None
               else data.indices(split, classes))
    if not len(indices):
        raise ValueError(f"no images to evaluate in split {split!r} (classes={classes})")
    ds = dataio.eval_dataset(data, ec.batch_size // n_proc, split=split, indices=indices,
                             image_size=detector.image_size, shard_index=jax.process_index(), shard_count=n_proc)
    has_mask_split = data.has_mask.get(split)
    maps, scores, masks, labels, cls_index, index = [], [], [], [], [], []
    keep: dict[str, list] = defaultdict(list)
    t0 = time.perf_counter()
    t_first = None
    bar = tqdm(total=len(indices), desc="denoise-and-score", unit="img", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    local_names: dict[int, str] = {}  # this process's rows: the pipeline already read their file names
    for batch in ds:
        local_names.update((int(i), dataio.as_text(f)) for i, f in zip(batch["index"], batch["filename"]) if i >= 0)
        out = detector.score_batch(batch["image"], batch["index"], reconstructions=heatmaps_per_class > 0)
        meta = shd.gather_to_host({"mask": np.asarray(batch["mask"][:, 0]) > 0, "label": batch["label"],
                                   "class_index": batch["class_index"], "index": batch["index"],
                                   "valid": batch["valid"]})
        if t_first is None:
            t_first = time.perf_counter() - t0
        v = np.asarray(meta["valid"], bool)
        maps.append(out["maps"][v])
        scores.append(out["scores"][v])
        masks.append(np.asarray(meta["mask"])[v])
        labels.append(np.asarray(meta["label"])[v])
        cls_index.append(np.asarray(meta["class_index"])[v])
        index.append(np.asarray(meta["index"])[v])
        if heatmaps_per_class:
            images = shd.gather_to_host(np.asarray(batch["image"]))
            for j in np.flatnonzero(v):
                c = data.class_names[int(meta["class_index"][j])]
                lab = int(meta["label"][j])
                if sum(it[0] == lab for it in keep[c]) < heatmaps_per_class:
                    ex = data[split][int(meta["index"][j])]
                    keep[c].append((lab, dataio.as_text(ex["filename"]), dataio.as_text(ex["defect_type"]),
                                    dataio.denormalize(images[j]),
                                    dataio.denormalize(out["reconstructions"][j]) if "reconstructions" in out else None,
                                    out["maps"][j], np.asarray(meta["mask"][j])))
        bar.update(int(v.sum()))
    bar.close()
    t_score = time.perf_counter() - t0
    maps, scores, index = np.concatenate(maps), np.concatenate(scores), np.concatenate(index)
    # other processes' rows (several hosts only) are looked up in the prepared copy
    files = [local_names.get(int(i)) or dataio.as_text(data[split][int(i)]["filename"]) for i in index]
    check_finite_maps(maps, scores, files.__getitem__)
    has_mask = has_mask_split[index] if has_mask_split is not None else np.ones(len(index), bool)
    labels, masks = np.concatenate(labels), np.concatenate(masks)
    cls_names = [data.class_names[int(c)] for c in np.concatenate(cls_index)]
    t1 = time.perf_counter()
    metrics = compute_metrics(scores, labels, maps, masks, cls_names, variant=ec.variant, has_mask=has_mask)
    t_metrics = time.perf_counter() - t1
    panels = {}
    for c, items in keep.items():
        items = sorted(items, key=lambda it: -it[0])[:heatmaps_per_class]  # anomalous first
        panels[c] = [(f"{k:02d}_{defect}_{Path(f).stem}",
                      evaluation_panel(img, rec, mp, mk, f"{c} {defect} {Path(f).name}"))
                     for k, (lab, f, defect, img, rec, mp, mk) in enumerate(items)]
    n = len(maps)
    b = ec.batch_size
    timings = {"images": n, "score_s": t_score, "first_batch_s": t_first or 0.0,
               "per_image_s": (t_score - (t_first or 0.0)) / max(n - b, 1) if n > b else t_score / n,
               "metrics_s": t_metrics}
    no_mask = int((~has_mask).sum())
    if no_mask:
        log.warning("%d anomalous image(s) without a ground-truth mask: in the image metrics, left out of the "
                    "pixel metrics", no_mask)
    info = {"eval_config": ec.to_dict(), "split": split, "no_mask": no_mask, "notes": list(detector.notes),
            "only_mid_control": detector.config.only_mid_control, "checkpoint": detector.source}
    return EvalResult(metrics, ec.variant, scores, labels, cls_names, files, timings, maps, masks, has_mask,
                      panels, info)


def balanced_subset(data, split: str, classes, per_class: int) -> np.ndarray:
    """At most `per_class` test images of each class, half anomalous and half good where
    possible (evenly spaced through each group), for quick evaluations."""
    chosen = []
    lab = data.labels[split]
    for c in (data.class_names if classes is None else ([classes] if isinstance(classes, str) else classes)):
        idx = data.indices(split, c)
        groups = [idx[lab[idx] == 1], idx[lab[idx] == 0]]
        n_anom = min(len(groups[0]), (per_class + 1) // 2)
        n_good = min(len(groups[1]), per_class - n_anom)
        n_anom = min(len(groups[0]), per_class - n_good)
        for g, n in zip(groups, (n_anom, n_good)):
            if n:
                chosen.append(g[np.linspace(0, len(g) - 1, n).round().astype(int)])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
