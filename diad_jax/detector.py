"""Load a model once, then score arrays, files or folders: `diad_jax.load(path).predict(inputs)`.

    import diad_jax
    det = diad_jax.load("checkpoints/diad_mvtec")          # weights placed on the devices once
    for p in det.predict("new_images/"):                   # a folder (recursive), files, or uint8 arrays
        print(p.name, p.score, p.label)                    # label/mask need a calibrated checkpoint

Every image is read and resized as the data pipeline does (PIL bilinear to the model's size,
ImageNet normalisation). Batches are padded to a few fixed sizes (`Detector.buckets`), so a run
compiles once per bucket, never per batch. Image i of a call gets the noise of fold_in(key(seed), i):
its map and score are the same at any batch size, device count or number of processes, and equal
to what `diad_jax.evaluation.evaluate` reports for the i-th image of a split.

The inputs are collected and read by diad_jax.data.inputs; `Detector.export` lowers the scoring
program and hands it, with the weights, to diad_jax.exported, which writes (and loads) the folder.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from diad_jax import exported
from diad_jax import sharding as shd
from diad_jax.calibration import FILE_NAME as CALIBRATION_FILE, Calibration
from diad_jax.checkpoints import default_context, load_model, read_metadata, require_detector, resolve
from diad_jax.configs import NO_WEIGHTS_COMPARATOR, RESNET_CHOICES, EvalConfig, ModelConfig
from diad_jax.data.imageio import resize_map
from diad_jax.data.inputs import collect_inputs, read_chunks
from diad_jax.data.pipeline import normalize
from diad_jax.errors import CheckpointError, ConfigError, UserError
from diad_jax.models.diad import DiAD
from diad_jax.scoring import Scorer, distinct_uncond_context, make_bundle, random_resnet

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
RANDOM_RESNET_NOTE = ("ResNet-50 randomly initialised (no ImageNet weights): the anomaly maps compare random "
                      "features")


@dataclasses.dataclass
class Prediction:
    """One input's result. `error` is set (and everything else None) when the file could not be read."""

    name: str                                   # the file's path, or "array[i]"
    score: float | None = None                  # image anomaly score
    anomaly_map: np.ndarray | None = None       # (S, S) float32 at the model's size S
    image: np.ndarray | None = None             # the input as scored: uint8 (S, S, 3)
    original_size: tuple[int, int] | None = None  # (height, width) of the input
    original_map: np.ndarray | None = None      # the map resized to original_size (predict(original_size=True))
    normalized_score: float | None = None       # in [0, 1], 0.5 at the threshold (calibrated checkpoints)
    threshold: float | None = None
    label: int | None = None                    # 1 anomalous / 0 normal (calibrated checkpoints)
    mask: np.ndarray | None = None              # bool, map >= the pixel threshold (at the original size if asked)
    class_name: str | None = None               # whose threshold labelled it (None: the global one)
    error: str | None = None


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over (the training mesh's data and fsdp axes, when present)."""
    axes = tuple(a for a in shd.BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ConfigError(f"the mesh has axes {mesh.axis_names}; a scoring mesh needs a 'data' (and optionally "
                          f"'fsdp') axis")
    return axes


def place_bundle(bundle: dict, mesh: Mesh) -> dict:
    """The scoring weights onto `mesh`, once: the model params by the partition rules (sharded when
    the mesh has an fsdp axis > 1, a model too big for one device), ResNet and context replicated."""
    return shd.place(bundle, shd.param_shardings(bundle, mesh))


class Detector:
    """A DiAD model ready to score: weights on the devices, one compiled program per batch bucket.

    Build it with `diad_jax.load` (or, with weights already placed, `Detector(config, bundle, ...)`).
    `eval_config` decides the maps and scores (schedule, steps, footprint, seed, batch size);
    `calibration` (thresholds) adds labels, normalised scores and masks; `notes` say what a user
    must know about these results (e.g. a random ResNet-50) and travel into every report.
    Thresholds belong to the scoring settings they were calibrated with: `predict` and `export`
    refuse a calibration whose eval config differs from `eval_config` in a field that changes scores,
    unless `accept_calibration_mismatch` (then a note says which fields differ).
    `uncond_context` (default: the same as the bundle's context, as in the reference) is compared
    with the context once, here (on every process together when the arrays span several): equal,
    guidance costs one UNet pass per DDIM step; different, both halves run (and a note says so)."""

    def __init__(self, config: ModelConfig, bundle: dict, *, eval_config: EvalConfig = EvalConfig(),
                 mesh: Mesh | None = None, calibration: Calibration | None = None, notes: Sequence[str] = (),
                 source: str | None = None, uncond_context=None, accept_calibration_mismatch: bool = False):
        self.config = config
        self.eval_config = eval_config
        self.mesh = mesh or shd.single_device_mesh()
        self.axes = batch_axes(self.mesh)
        if eval_config.needs_resnet and "resnet" not in bundle:
            raise ConfigError("the 'resnet' comparator needs ResNet-50 weights in the bundle (make_bundle(params, "
                              "resnet, context)); other comparators and the inversion method need none")
        self.bundle = bundle
        self.calibration = calibration
        self.notes = list(notes)
        self.source = source
        self.accept_calibration_mismatch = accept_calibration_mismatch
        mismatch = self.calibration_mismatch()
        if mismatch and accept_calibration_mismatch:
            listed = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in mismatch.items())
            self.notes.append(f"labels use thresholds calibrated with other scoring settings ({listed}); "
                              f"calibrate again with these for labels that mean what they say")
        n_dev = shd.batch_size_multiple(self.mesh, self.axes)
        step = math.lcm(n_dev, jax.process_count())
        if eval_config.batch_size % step:
            raise ConfigError(f"batch size {eval_config.batch_size} must be a multiple of {step} (the {n_dev} "
                              f"devices of the mesh and the {jax.process_count()} processes)")
        # the bucket sizes a batch is padded to: the batch size and its halvings that the devices divide
        sizes, b = {eval_config.batch_size}, eval_config.batch_size
        while b % 2 == 0 and (b // 2) % step == 0:
            b //= 2
            sizes.add(b)
        self.buckets = tuple(sorted(sizes))
        self.scorer = Scorer.from_eval_config(config, eval_config, self.mesh, self.axes)
        # guidance: one UNet pass per DDIM step unless an unconditional context that differs was given
        self.uncond_context = distinct_uncond_context(bundle["context"], uncond_context)
        if self.uncond_context is not None:
            self.notes.append("the unconditional context differs from the conditional one: guidance runs both "
                              "halves (twice the UNet work per DDIM step)")
        self.unet_passes_per_step = 2 if self.uncond_context is not None or not eval_config.dedupe_guidance else 1
        log.info("guidance: %d UNet pass(es) per DDIM step", self.unet_passes_per_step)
        # a raw uint32 key placed like the weights (a host value is not a valid input across processes)
        self._key = shd.place(np.asarray(jax.random.PRNGKey(eval_config.seed)), shd.replicated(self.mesh))

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def calibration_mismatch(self) -> dict[str, tuple]:
        """{} when there are no thresholds or they were calibrated with this detector's scoring
        settings (or do not say: files of older versions); else {field: (calibrated value, this
        value)} of the EvalConfig fields that differ."""
        calibrated = None if self.calibration is None else self.calibration.eval_config
        return {} if calibrated is None else calibrated.scoring_differences(self.eval_config)

    def _check_calibration(self) -> None:
        """Labels only under the scoring settings the thresholds were calibrated with (see the class)."""
        mismatch = self.calibration_mismatch()
        if mismatch and not self.accept_calibration_mismatch:
            where = f"{self.source}/{CALIBRATION_FILE}" if self.source else "the calibration"
            listed = ", ".join(f"{{{i}}}: {a} -> {b}" for i, (a, b) in enumerate(mismatch.values()))
            raise ConfigError(f"{where}: its thresholds were calibrated with other scoring settings than this "
                              f"detector's ({listed}), so its labels would be wrong; score with the calibration's "
                              f"settings (the checkpoint's own eval config), calibrate again with these "
                              f"(diad-jax evaluate --calibrate), or accept the mismatch ({{{len(mismatch)}}})",
                              fields=[*mismatch, "accept_calibration_mismatch"])

    # ---- scoring --------------------------------------------------------------------------------
    def score_batch(self, images: np.ndarray, index: np.ndarray, *, reconstructions: bool = False) -> dict:
        """Scores this process's rows `images` ((b, 3, S, S) normalised) with image ids `index` (b,)
        -> host numpy {"maps", "scores"[, "reconstructions"]} of the WHOLE batch (every process's
        rows, in process order; reconstructions when asked for and the method makes them). One
        process: b rows are padded to the next bucket and the padding is dropped; several: every
        process passes the same b, a bucket size divided by the processes."""
        images = np.asarray(images, np.float32)
        index = np.asarray(index, np.int64)
        b = len(images)
        n_proc = jax.process_count()
        if n_proc == 1:
            size = next((s for s in self.buckets if s >= b), None)
            if size is None:
                raise ValueError(f"a batch of {b} exceeds the largest bucket {self.buckets[-1]}")
            pad = size - b
            if pad:
                images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.float32)])
                index = np.concatenate([index, np.full(pad, -1, np.int64)])
        elif b * n_proc not in self.buckets:
            raise ValueError(f"{n_proc} processes x {b} rows is not one of the batch sizes {self.buckets}")
        g = shd.shard_batch({"image": images, "index": index}, self.mesh, self.axes)
        out = self.scorer(self.bundle, g["image"], self._key, g["index"], self.uncond_context)
        wanted = {"maps": out.maps, "scores": out.scores}
        if reconstructions and out.reconstructions is not None:
            wanted["reconstructions"] = out.reconstructions
        host = shd.gather_to_host(wanted)
        return {k: np.asarray(v)[:b * n_proc] for k, v in host.items()}

    # ---- export ---------------------------------------------------------------------------------
    def export(self, path: str | os.PathLike, *, batch_size: int | None = None,
               platforms: Sequence[str] = ("cpu", "cuda", "tpu")) -> Path:
        """Writes this detector for deployment to the folder `path`: the program `score_batch` runs,
        for a fixed batch of `batch_size` images (default: the eval config's) and lowered for each of
        `platforms`, its weights and a manifest. `diad_jax.exported.load(path)` scores with it
        without the model code (see diad_jax/exported.py). The detector must be on one device."""
        if self.mesh.size != 1 or jax.process_count() != 1:
            raise ConfigError(f"export needs a detector on one device in one process (diad_jax.load(path) without a "
                              f"mesh); this one spans {self.mesh.size} device(s) in {jax.process_count()} process(es)")
        if self.uncond_context is not None:
            raise ConfigError("export: this detector's unconditional context differs from its context; the exported "
                              "program carries only the context (one guidance pass)")
        self._check_calibration()
        batch = self.eval_config.batch_size if batch_size is None else batch_size
        if batch < 1:
            raise ConfigError(f"export: batch_size must be >= 1, got {batch}")
        unknown = [p for p in platforms if p not in exported.PLATFORMS]
        if unknown or not platforms:
            raise ConfigError(f"export: platforms must be some of {exported.PLATFORMS}, got {list(platforms)}")
        size = self.image_size
        g = shd.shard_batch({"image": np.zeros((batch, 3, size, size), np.float32), "index": np.zeros(batch, np.int64)},
                            self.mesh, self.axes)  # the arguments score_batch passes, as zeros
        program = self.scorer.export(self.bundle, g["image"], self._key, g["index"], platforms=tuple(platforms))
        weights = {shd.path_str(p): np.asarray(v)
                   for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(self.bundle))}
        return exported.save(path, program.serialize(), weights, model_config=self.config,
                             eval_config=self.eval_config, batch_size=batch, platforms=platforms,
                             key=np.asarray(jax.device_get(self._key)), calibration=self.calibration,
                             source=self.source, notes=self.notes)

    # ---- prediction -----------------------------------------------------------------------------
    def predict(self, inputs, *, class_name: str | None = None, original_size: bool = False,
                batch_size: int | None = None, progress: bool = False) -> list[Prediction]:
        """Scores `inputs`: a folder (every image file below it, sorted), a file, uint8 HWC arrays
        ((H, W, 3), (H, W), or a stacked (N, H, W, 3)), or a list mixing paths and arrays. Returns one
        Prediction per image in input order; a file that cannot be read gets one with `error` set
        (never dropped). `class_name` picks that class's threshold (calibrated checkpoints);
        `original_size` also resizes the map (and mask) to each input's size; `batch_size` (at most the
        eval config's) scores fewer images per call, e.g. 1 for the lowest latency."""
        return list(self.iter_predict(inputs, class_name=class_name, original_size=original_size,
                                      batch_size=batch_size, progress=progress))

    def iter_predict(self, inputs, *, class_name: str | None = None, original_size: bool = False,
                     batch_size: int | None = None, progress: bool = False) -> Iterator[Prediction]:
        """`predict`, one Prediction at a time (for folders too big to keep every map in memory)."""
        return self.iter_predict_items(list(collect_inputs(inputs)), class_name=class_name,
                                       original_size=original_size, batch_size=batch_size, progress=progress)

    def iter_predict_items(self, items: Sequence[tuple[str, Any]], *, class_name: str | None = None,
                           original_size: bool = False, batch_size: int | None = None,
                           progress: bool = False) -> Iterator[Prediction]:
        """`iter_predict` of what `diad_jax.data.inputs.collect_inputs` gave (folders are not walked
        again): the predict CLI checks its inputs before it loads the model."""
        if jax.process_count() > 1:
            raise UserError("Detector.predict runs in one process; evaluate datasets on several hosts with "
                            "diad_jax.evaluation.evaluate")
        threshold = pixel = None
        if self.calibration is not None:
            self._check_calibration()
            threshold = self.calibration.image_threshold(class_name)
            pixel = self.calibration.pixel
        elif class_name is not None:
            raise UserError(f"class {class_name!r} given, but {self.source or 'this model'} has no thresholds; "
                            f"calibrate it first (diad-jax evaluate --calibrate)")
        bar = None
        if progress:
            bar = tqdm(total=len(items), desc="predict", unit="img", dynamic_ncols=True)
        batch = batch_size or self.eval_config.batch_size
        if not 1 <= batch <= self.eval_config.batch_size:
            raise UserError(f"batch_size {batch_size} must be in 1..{self.eval_config.batch_size} (the eval config's)")
        start = 0
        for loaded in read_chunks(items, self.image_size, batch):  # the next chunk is read while this one is scored
            predictions = [Prediction(r.name, image=r.image, original_size=r.original_size, error=r.error)
                           for r in loaded]
            ok = [j for j, p in enumerate(predictions) if p.error is None]
            if ok:
                images = normalize(np.stack([predictions[j].image for j in ok]))
                out = self.score_batch(images, np.asarray([start + j for j in ok]))
                for row, j in enumerate(ok):
                    _finish(predictions[j], out["maps"][row], float(out["scores"][row]), threshold, pixel,
                            class_name, original_size)
            start += len(predictions)
            for p in predictions:
                if p.error is not None:
                    log.warning("%s", p.error)
                yield p
            if bar is not None:
                bar.update(len(predictions))
        if bar is not None:
            bar.close()


def _finish(p: Prediction, amap: np.ndarray, score: float, threshold, pixel, class_name, original_size: bool):
    p.anomaly_map, p.score = amap, score
    if original_size:
        p.original_map = amap if p.original_size == amap.shape else resize_map(amap, p.original_size)
    if threshold is not None:
        p.threshold = threshold.value
        p.normalized_score = float(threshold.normalize(score))
        p.label = int(score >= threshold.value)
        p.class_name = class_name
    if pixel is not None:
        p.mask = (p.original_map if p.original_map is not None else amap) >= pixel.value


# ---- loading --------------------------------------------------------------------------------------
def load(path: str | os.PathLike, *, mesh: Mesh | None = None, dtype=None, resnet: str = "checkpoint",
         eval_config: EvalConfig | None = None, batch_size: int | None = None,
         accept_calibration_mismatch: bool = False) -> Detector:
    """A Detector from a model checkpoint (convert/torch_to_flax.py), a training checkpoint or
    workdir (scripts/train.py; its best checkpoint, else the newest), or "random:<preset>" (the
    "tiny", "demo" or "sd15" model with random weights and a random ResNet-50, for trying things out).

    mesh: devices to score on (default: one device). With an "fsdp" axis > 1 the model params are
        sharded by the partition rules, as in training; the batch is split over the data (and
        fsdp) axes.
    dtype: compute dtype (jnp.float32 or jnp.bfloat16); default: the eval config's.
    resnet: "checkpoint" (default) needs the checkpoint's ResNet-50 weights; "random" opts in to a
        randomly initialised one when it has none (said in every result). A checkpoint whose
        training run opted in records it, and then loads without this argument.
    eval_config: how to score (default: the one the checkpoint's thresholds were calibrated with, else
        the one the checkpoint records, else EvalConfig());
    batch_size: overrides the eval config's batch size.
    accept_calibration_mismatch: label with thresholds calibrated under other scoring settings (see
        `Detector`; without it, `predict` and `export` refuse).
    """
    if resnet not in RESNET_CHOICES:
        raise ConfigError(f"resnet must be one of {RESNET_CHOICES}, got {resnet!r}")
    mesh = mesh or shd.single_device_mesh()
    notes: list[str] = []
    path = os.fspath(path)
    calibration = None
    random_weights = path.startswith(RANDOM_PREFIX)
    if random_weights:
        preset = path[len(RANDOM_PREFIX):]
        if preset not in ("tiny", "demo", "sd15"):
            raise ConfigError(f"{path!r}: expected random:tiny, random:demo or random:sd15")
        config = ModelConfig.from_spec(preset, field="path")
        params, context, resnet_params, recorded = DiAD(config).init(0), default_context(config), None, {}
        notes.append(f"{path}: RANDOM weights (the scores are meaningless; train a model with diad-jax train or "
                     f"convert one with diad-jax convert)")
        source, resnet = path, "random"
    else:
        resolved = resolve(path)
        meta = read_metadata(resolved)
        require_detector(meta, resolved)
        config = ModelConfig.from_dict(meta["model_config"])
        calibration = Calibration.load(resolved)
        recorded = scoring_settings(meta, calibration)
        source = str(resolved)
        if meta.get("resnet") == "random":  # the training run opted in
            resnet = "random"
    if eval_config is None:
        eval_config = EvalConfig.from_dict(recorded, f"{source}: eval_config") if recorded else EvalConfig()
    overrides = {}
    if dtype is not None:
        overrides["dtype"] = np.dtype(dtype).name
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    eval_config = dataclasses.replace(eval_config, **overrides)
    if not random_weights:
        ckpt = load_model(resolved, mesh)
        params, context, resnet_params = ckpt.params, ckpt.context, ckpt.resnet
    if not eval_config.needs_resnet:
        resnet_params = None  # not needed
    elif resnet_params is None:
        if resnet != "random":
            raise CheckpointError(
                f"{source} has no ResNet-50 weights, which the 'resnet' comparator (the reference's) uses to compare "
                f"the input with its reconstruction: convert the reference's with `diad-jax convert "
                f"--resnet resnet50.pth ...`, score with a comparator that needs no ImageNet weights ({{0}}, the "
                f"best one measured without them), or opt in to a randomly initialised ResNet-50 (maps then compare "
                f"random features): {{1}}", fields=[f"comparator={NO_WEIGHTS_COMPARATOR}", "resnet=random"])
        resnet_params = random_resnet(0)
        notes.append(RANDOM_RESNET_NOTE)
    bundle = place_bundle(make_bundle(params, resnet_params, context), mesh)  # restored leaves: already there
    return Detector(config, bundle, eval_config=eval_config, mesh=mesh, calibration=calibration, notes=notes,
                    source=source, accept_calibration_mismatch=accept_calibration_mismatch)


def scoring_settings(meta: dict, calibration: Calibration | None) -> dict:
    """The eval config (a dict) a checkpoint is scored with by default: the one its thresholds were
    calibrated with, else the one it records (its training run's), else {} (EvalConfig())."""
    if calibration is not None and calibration.eval_config is not None:
        return calibration.eval_config.to_dict()
    return meta.get("eval_config") or {}


__all__ = ["Detector", "Prediction", "load", "place_bundle"]
