"""Evaluate a DiAD model on a prepared dataset: denoise-and-score every test image, then the
seven metrics per class and their mean, plus heat-map overlays.

    result = evaluate(bundle, config, prepared, batch_size=8)
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
import jax.numpy as jnp
import numpy as np

from diad_jax.configs import REFERENCE_POOL_WINDOW, REFERENCE_SIGMA, DiffusionConfig, ModelConfig
from diad_jax.metrics import compute_metrics, format_table
from diad_jax.scoring import Scorer, check_finite

log = logging.getLogger(__name__)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def to_uint8_image(x: np.ndarray) -> np.ndarray:
    """(3, H, W) ImageNet-normalised -> (H, W, 3) uint8."""
    img = np.transpose(x, (1, 2, 0)) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """A jet colour map for values in [0, 1] -> uint8 RGB (no matplotlib needed)."""
    v = np.clip(values, 0, 1)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], -1) * 255).astype(np.uint8)


def overlay_panel(image: np.ndarray, recon: np.ndarray, amap: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """input | reconstruction | map over input (min-max normalised per image, as the reference's
    heat maps) | ground truth, side by side (H, 4W, 3) uint8."""
    lo, hi = float(amap.min()), float(amap.max())
    heat = jet((amap - lo) / (hi - lo + 1e-12))
    over = (0.5 * heat + 0.5 * image).astype(np.uint8)
    gt = np.repeat((mask > 0).astype(np.uint8)[..., None] * 255, 3, -1)
    return np.concatenate([image, recon, over, gt], axis=1)


@dataclass
class EvalResult:
    metrics: dict[str, dict[str, float]]
    variant: str
    image_scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    file_names: list[str]
    timings: dict[str, float]
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


def evaluate(bundle: dict, config: ModelConfig, data, *, batch_size: int = 8,
             diffusion: DiffusionConfig = DiffusionConfig(), image_score: str = "pooled",
             variant: str = "standard", dtype=jnp.float32, mesh=None, seed: int = 0,
             classes: Iterable[str] | str | None = None, heatmaps_per_class: int = 0,
             limit_per_class: int | None = None, progress: bool = True, dedupe_guidance: bool = True,
             split: str = "test", sigma: float = REFERENCE_SIGMA,
             pool_window: int = REFERENCE_POOL_WINDOW) -> EvalResult:
    """Score the `split` of a prepared dataset (diad_jax.data) and compute the seven metrics.

    The rng of batch i is fold_in(key(seed), i), so a run is reproducible for a given batch size.
    With a mesh, the batch is sharded over its `data` axis (batch_size must divide evenly).
    `sigma`/`pool_window`: the map blur and image-score pool (reference: 5 and 8 at 256 px; see
    `Scorer.footprint` to scale them to a smaller image size)."""
    from diad_jax import data as dataio
    from tqdm import tqdm

    scorer = Scorer(config, diffusion, image_score=image_score, dtype=dtype, mesh=mesh,
                    dedupe_guidance=dedupe_guidance, sigma=sigma, pool_window=pool_window)
    if mesh is not None and batch_size % mesh.shape["data"]:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh's data axis ({mesh.shape['data']})")
    if data.image_size != config.image_size:
        log.info("dataset prepared at %d px; the pipeline resizes to the model's %d px", data.image_size,
                 config.image_size)
    ds = dataio.eval_dataset(data, batch_size, split=split, classes=classes, image_size=config.image_size,
                             shard_index=0, shard_count=1)
    allowed = None
    if limit_per_class is not None:
        allowed = balanced_subset(data, split, classes, limit_per_class)
        n_total = len(allowed)
    else:
        n_total = len(data.indices(split, classes))
    maps, masks, scores, labels, cls_names, files = [], [], [], [], [], []
    keep: dict[str, list] = defaultdict(list)
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    t_first = None
    bar = tqdm(total=n_total, desc="denoise-and-score", unit="img", disable=not progress)
    for i, batch in enumerate(ds):
        valid = np.asarray(batch["valid"], bool)
        if allowed is not None:
            valid &= np.isin(np.asarray(batch["index"]), allowed)
            if not valid.any():
                continue
        out = scorer(bundle, jnp.asarray(batch["image"]), jax.random.fold_in(key, i))
        m = np.asarray(out.maps)
        s = np.asarray(out.scores)
        if t_first is None:
            t_first = time.perf_counter() - t0
        for j in np.flatnonzero(valid):
            c = _str(batch["class_name"][j])
            maps.append(m[j])
            masks.append(np.asarray(batch["mask"][j, 0]) > 0)
            scores.append(float(s[j]))
            labels.append(int(batch["label"][j]))
            cls_names.append(c)
            files.append(_str(batch["filename"][j]))
            if heatmaps_per_class and sum(it[0] == labels[-1] for it in keep[c]) < heatmaps_per_class:
                keep[c].append((labels[-1], files[-1], _str(batch["defect_type"][j]),
                                to_uint8_image(np.asarray(batch["image"][j])),
                                to_uint8_image(np.asarray(out.reconstructions[j])), m[j], masks[-1]))
        bar.update(int(valid.sum()))
    bar.close()
    t_score = time.perf_counter() - t0
    if not maps:
        raise ValueError(f"no images to evaluate in split {split!r} (classes={classes})")
    maps, scores = np.stack(maps), np.asarray(scores)
    check_finite(maps, scores, files.__getitem__)
    t1 = time.perf_counter()
    metrics = compute_metrics(scores, np.asarray(labels), maps, np.stack(masks),
                              cls_names, variant=variant)
    t_metrics = time.perf_counter() - t1
    panels = {}
    for c, items in keep.items():
        items = sorted(items, key=lambda it: -it[0])[:heatmaps_per_class]  # anomalous first
        panels[c] = [(f"{k:02d}_{defect}_{Path(f).stem}", overlay_panel(img, rec, mp, mk))
                     for k, (lab, f, defect, img, rec, mp, mk) in enumerate(items)]
    n = len(maps)
    timings = {"images": n, "score_s": t_score, "first_batch_s": t_first or 0.0,
               "per_image_s": (t_score - (t_first or 0.0)) / max(n - batch_size, 1) if n > batch_size else t_score / n,
               "metrics_s": t_metrics}
    info = {"image_score": image_score, "schedule": diffusion.schedule, "ddim_steps": diffusion.ddim_steps,
            "guidance_scale": diffusion.guidance_scale, "batch_size": batch_size, "seed": seed,
            "dtype": str(jnp.dtype(dtype)), "only_mid_control": config.only_mid_control, "split": split}
    return EvalResult(metrics, variant, np.asarray(scores), np.asarray(labels), cls_names, files, timings,
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


def _str(x) -> str:
    if isinstance(x, bytes):
        return x.decode()
    if isinstance(x, np.ndarray):
        x = x.item()
        return x.decode() if isinstance(x, bytes) else str(x)
    return str(x)
