"""Thresholds that turn scores into verdicts, and score normalisation, stored with a checkpoint.

    cal = calibrate(result)                    # an EvalResult of a labelled (or all-normal) split
    cal.save("checkpoints/diad_mvtec")         # <checkpoint>/calibration.json
    cal = Calibration.load("checkpoints/diad_mvtec")   # None when the checkpoint has none

Image thresholds, global and per class: the F1-optimal threshold when the split has anomalous
images (an image is anomalous when its score is >= the threshold; among thresholds of equal F1 the
highest, i.e. the fewest false alarms), else the `percentile`-th percentile of the normal scores
(a split of normal images only, e.g. held-out training images, cannot rank anomalies; anomalib
returns a meaningless threshold there). The pixel threshold is chosen the same way over the pixels
of the images that have a ground-truth mask.

Normalised score: `clip((score - threshold) / (max - min) + 0.5, 0, 1)` with the min and max of
the calibration scores (anomalib's min-max normalisation): 0.5 is the threshold.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np

from diad_jax.configs import EvalConfig
from diad_jax.errors import CheckpointError, UserError
from diad_jax.metrics import f1_optimal_threshold

log = logging.getLogger(__name__)

FILE_NAME = "calibration.json"
DEFAULT_PERCENTILE = 99.0
# fewer calibration images than this in a class: its threshold (a 99th percentile, or an F1 optimum
# over a handful of anomalies) is noise, and a warning names the class
MIN_CALIBRATION_IMAGES = 20


@dataclasses.dataclass(frozen=True)
class Threshold:
    """One threshold, how it was chosen and the score range it normalises with."""

    value: float
    method: str          # "f1" or "percentile <q> of normal scores"
    f1: float | None     # the F1 at `value` on the calibration split (F1-optimal thresholds only)
    low: float           # min and max of the calibration scores (normalisation)
    high: float
    images: int          # calibration images (normal, anomalous)
    anomalous: int

    def normalize(self, score):
        span = max(self.high - self.low, 1e-12)
        return np.clip((np.asarray(score, np.float64) - self.value) / span + 0.5, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Calibration:
    image: Threshold                       # over all classes
    per_class: dict[str, Threshold]
    pixel: Threshold | None                # None when no image of the split has a mask
    split: str
    source: dict = dataclasses.field(default_factory=dict)  # dataset, checkpoint, eval config

    @property
    def eval_config(self) -> EvalConfig | None:
        """The scoring settings the thresholds were calibrated with (None: a file of an older version
        that does not record them). Labels are only right under the same ones."""
        recorded = self.source.get("eval_config")
        return EvalConfig.from_dict(recorded, f"{FILE_NAME}: source.eval_config") if recorded else None

    def image_threshold(self, class_name: str | None = None) -> Threshold:
        """The class's threshold, or the global one for `class_name=None`. An unknown class is an error."""
        if class_name is None:
            return self.image
        if class_name not in self.per_class:
            raise UserError(f"no threshold for class {class_name!r}: this checkpoint was calibrated on "
                            f"{sorted(self.per_class)}; leave the class out to use the global threshold")
        return self.per_class[class_name]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(image=Threshold(**d["image"]), per_class={k: Threshold(**v) for k, v in d["per_class"].items()},
                   pixel=Threshold(**d["pixel"]) if d.get("pixel") else None, split=d["split"],
                   source=d.get("source", {}))

    def save(self, checkpoint: str | os.PathLike) -> Path:
        """Writes <checkpoint>/calibration.json (atomically: a reader sees the old or the new file;
        an identical file is left untouched)."""
        path = Path(checkpoint) / FILE_NAME
        text = json.dumps(self.to_dict(), indent=1)
        if path.exists() and path.read_text() == text:
            return path
        tmp = path.with_name(f".{FILE_NAME}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, checkpoint: str | os.PathLike) -> "Calibration | None":
        path = Path(checkpoint) / FILE_NAME
        if not path.exists():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a readable calibration file ({type(e).__name__}: {e}); "
                                  f"delete it or calibrate again (diad-jax evaluate --calibrate)") from e


def threshold(scores, labels, percentile: float = DEFAULT_PERCENTILE) -> Threshold:
    """F1-optimal when `labels` has anomalies (and normal samples), else a percentile of the scores."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0
    if not len(scores):
        raise UserError("calibration needs at least one scored image")
    n_anom = int(labels.sum())
    if n_anom and n_anom < len(labels):
        value, f1 = f1_optimal_threshold(scores, labels)
        method = "f1"
    else:
        if n_anom:
            log.warning("every calibration sample is anomalous: using the %g-th percentile of their scores",
                        percentile)
        value, f1 = float(np.percentile(scores, percentile)), None
        method = f"percentile {percentile:g} of {'anomalous' if n_anom else 'normal'} scores"
    return Threshold(float(value), method, f1, float(scores.min()), float(scores.max()), len(scores), n_anom)


def calibrate(result, percentile: float = DEFAULT_PERCENTILE, source: dict | None = None) -> Calibration:
    """Thresholds from an `evaluation.EvalResult` (its scores, labels, classes, maps and masks),
    recording the eval config it was scored with (`Calibration.eval_config`) and `source`."""
    scores, labels = np.asarray(result.image_scores), np.asarray(result.labels)
    classes = np.asarray(result.class_names)
    per_class = {str(c): threshold(scores[classes == c], labels[classes == c], percentile)
                 for c in dict.fromkeys(result.class_names)}
    few = {c: th.images for c, th in per_class.items() if th.images < MIN_CALIBRATION_IMAGES}
    if few:
        log.warning("calibration: %d class(es) have fewer than %d images, so their thresholds are noisy: %s; "
                    "calibrate on a larger split (or use the global threshold)", len(few), MIN_CALIBRATION_IMAGES,
                    ", ".join(f"{c} ({n})" for c, n in few.items()))
    pixel = None
    with_mask = np.asarray(result.has_mask, bool)
    if with_mask.any():
        pixel = threshold(result.maps[with_mask], result.masks[with_mask], percentile)
    return Calibration(threshold(scores, labels, percentile), per_class, pixel, result.info.get("split", ""),
                       {"eval_config": result.info.get("eval_config"), **(source or {})})
