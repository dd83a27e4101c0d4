"""A detector exported for deployment: the compiled scoring program, its weights and a manifest,
scored without the model code (this module imports no flax and no diad_jax.models, diffusion or
scoring). The folder's format is defined here, once: `save` writes it (`Detector.export` hands it the
program and the weights), `load` reads it, and both check the manifest with the same field table.

    det = diad_jax.load("checkpoints/diad_mvtec")     # where the library's model code is
    det.export("deploy/diad_mvtec")                    # or: diad-jax export --checkpoint ... --out ...

    from diad_jax import exported                      # on the machine that scores
    ex = exported.load("deploy/diad_mvtec")
    out = ex.score(images)        # uint8 (N, S, S, 3) RGB at the model's size S (resizing is the caller's)
    out.scores, out.maps          # (N,) and (N, S, S); labels, normalised scores and masks when calibrated

The folder:
  program.bin          `jax.export` serialisation of the Detector's own denoise-and-score program
                       (`Scorer.export`) for a fixed batch of `batch_size` images, lowered for each
                       platform of the manifest. Its arguments: the weights, float32 (B, 3, S, S) NCHW
                       images normalised as (x / 255 - mean) / std, the raw uint32 PRNG key and int32
                       (B,) image ids (image i's noise comes from fold_in(key, id)); it returns
                       {"maps", "scores", "reconstructions"} ("reconstructions" not under the
                       inversion method, which makes none).
  weights.safetensors  the weights, flat, keyed by "/"-joined pytree paths; the manifest lists the keys
                       in the program's argument order.
  manifest.json        format version, versions, model and eval configs, input size, normalisation,
                       batch size, platforms, seed and key, thresholds, and the files' sizes and SHA-256.
  manifest.sha256      the manifest's own SHA-256, in `sha256sum` format (`sha256sum -c manifest.sha256`
                       checks it without Python): an edited manifest is refused, since its values (the
                       key, the normalisation, the thresholds) change the scores without the program
                       or the weights changing.

Why a fixed batch: it is the very module the Detector compiles for that batch size, so the two give
the same numbers (tests/test_export.py). A batch-polymorphic export of the same program lowers too,
but it is a module the Detector never runs, and each new batch size would compile again on loading
anyway. `score` pads a call to whole batches; image i's noise depends only on its id, so padding and
batching change nothing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from safetensors.numpy import load_file, save as to_bytes

from diad_jax import __version__
from diad_jax.calibration import Calibration
from diad_jax.configs import IMAGENET_MEAN, IMAGENET_STD, EvalConfig, ModelConfig
from diad_jax.errors import UserError

FORMAT_VERSION = 2  # 2: manifest.sha256 added, every manifest field checked
MANIFEST, DIGEST, PROGRAM, WEIGHTS = "manifest.json", "manifest.sha256", "program.bin", "weights.safetensors"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for
MAX_ID = 2**31 - 1  # the program takes int32 image ids, and pads a batch with id -1


class ExportError(UserError):
    """An exported folder that is missing, incomplete, damaged, edited or of another format version,
    or whose manifest disagrees with its program."""


@dataclasses.dataclass
class Scores:
    """The results of one `ExportedDetector.score` call, one row per image."""

    scores: np.ndarray                          # (N,) float32 image anomaly scores
    maps: np.ndarray                            # (N, S, S) float32 anomaly maps
    labels: np.ndarray | None = None            # (N,) 1 anomalous / 0 normal (exported with thresholds)
    normalized_scores: np.ndarray | None = None  # (N,) in [0, 1], 0.5 at the threshold
    masks: np.ndarray | None = None             # (N, S, S) bool, map >= the pixel threshold


class ExportedDetector:
    """An exported detector, loaded (`load`): the program deserialised, the weights on the default
    device once. `score` gives the same scores and maps as the Detector that exported it."""

    def __init__(self, path: Path, manifest: dict, program: jax.export.Exported, weights: list[np.ndarray]):
        self.path, self.manifest = path, manifest
        self.image_size = manifest["image_size"]
        self.batch_size = manifest["batch_size"]
        self.calibration = _calibration(path / MANIFEST, manifest["calibration"])
        self.notes = list(manifest["notes"])
        self._program = program
        self._weights = jax.device_put(weights)
        self._key = np.asarray(manifest["key"], np.uint32)
        self._mean = np.asarray(manifest["normalization"]["mean"], np.float32)
        self._std = np.asarray(manifest["normalization"]["std"], np.float32)
        self._call = jax.jit(program.call)

    def score(self, images, *, index=None, class_name: str | None = None) -> Scores:
        """Scores `images`: uint8 RGB arrays at the model's input size, stacked (N, S, S, 3) or a list
        of (S, S, 3). Resizing is the caller's (diad_jax resizes with PIL bilinear). Image i draws its
        noise from id `index[i]`, an integer in 0..MAX_ID (default i, as `Detector.predict` numbers the
        images of a call). `class_name` picks that class's threshold (exported with thresholds)."""
        x = self._check_images(images)
        n = len(x)
        index = np.arange(n) if index is None else np.asarray(index)
        if index.shape != (n,) or (n and index.dtype.kind not in "iu"):
            raise UserError(f"index: {index.dtype}{list(index.shape)}; expected {n} integer image ids")
        bad = np.flatnonzero((index < 0) | (index > MAX_ID))
        if len(bad):
            raise UserError(f"index[{bad[0]}]: image id {index[bad[0]]} is outside 0..{MAX_ID} (the program takes "
                            f"int32 ids; -1 pads a batch)")
        threshold = None
        if self.calibration is not None:
            threshold = self.calibration.image_threshold(class_name)
        elif class_name is not None:
            raise UserError(f"class {class_name!r} given, but {self.path} was exported without thresholds")
        x = np.moveaxis((x.astype(np.float32) / 255.0 - self._mean) / self._std, -1, -3)  # data.pipeline.normalize
        b, maps, scores = self.batch_size, [], []
        for start in range(0, n, b):
            chunk, ids = x[start:start + b], index[start:start + b]
            pad = b - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
            ids = np.concatenate([ids, np.full(pad, -1)]).astype(np.int32)  # as Detector.score_batch pads
            args, kwargs = jax.tree.unflatten(self._program.in_tree, [*self._weights, chunk, self._key, ids])
            out = jax.device_get(self._call(*args, **kwargs))
            maps.append(out["maps"][:b - pad])
            scores.append(out["scores"][:b - pad])
        size = self.image_size
        out = Scores(np.concatenate(scores) if n else np.zeros(0, np.float32),
                     np.concatenate(maps) if n else np.zeros((0, size, size), np.float32))
        if threshold is not None:
            out.labels = (out.scores >= threshold.value).astype(np.int64)
            out.normalized_scores = threshold.normalize(out.scores)
        if self.calibration is not None and self.calibration.pixel is not None:
            out.masks = out.maps >= self.calibration.pixel.value
        return out

    def _check_images(self, images) -> np.ndarray:
        s = self.image_size
        expected = f"uint8 (N, {s}, {s}, 3) RGB arrays at the model's input size (resize them first)"
        if isinstance(images, (list, tuple)):
            for i, im in enumerate(images):
                im = np.asarray(im)
                if im.dtype != np.uint8 or im.shape != (s, s, 3):
                    raise UserError(f"images[{i}]: {im.dtype} {im.shape}; expected uint8 ({s}, {s}, 3) RGB at the "
                                    f"model's input size (resize it first)")
            images = np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8)
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise UserError(f"images: {images.dtype} {images.shape}; expected {expected}")
        return images


def save(path: str | Path, program: bytes, weights: dict[str, np.ndarray], *, model_config: ModelConfig,
         eval_config: EvalConfig, batch_size: int, platforms: Sequence[str], key: np.ndarray,
         calibration: Calibration | None, source: str | None, notes: Sequence[str]) -> Path:
    """Writes an exported folder (`Detector.export` calls this): `program` (Exported.serialize() of
    the scoring program for `batch_size` images, lowered for `platforms`), `weights` (flat, in the
    program's argument order) and the manifest: the format version, versions, both configs, the
    input size and normalisation, the seed and `key` (the raw PRNG key the program takes), the
    thresholds, `source` and `notes`, the weight keys and the files' sizes and checksums, checked
    as `read_manifest` checks it, then its own checksum (DIGEST). The manifest is written last, so
    a folder that has one is complete."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MANIFEST).unlink(missing_ok=True)
    (path / PROGRAM).write_bytes(program)
    # written as bytes so the file gets the umask's permissions like the others (save_file makes it 0600)
    (path / WEIGHTS).write_bytes(to_bytes({k: np.ascontiguousarray(v) for k, v in weights.items()}))
    size = model_config.image_size
    manifest = {
        "format_version": FORMAT_VERSION, "diad_jax_version": __version__, "jax_version": jax.__version__,
        "source": source, "notes": list(notes),
        "model_config": model_config.to_dict(), "eval_config": eval_config.to_dict(),
        "image_size": size, "batch_size": batch_size, "platforms": list(platforms),
        "input": {"images": f"uint8 (N, {size}, {size}, 3) RGB at the model's size, normalised by the loader",
                  "program": f"weights, float32 ({batch_size}, 3, {size}, {size}) NCHW (x / 255 - mean) / std, "
                             f"key, int32 ({batch_size},) image ids (noise of image i: fold_in(key, id); padding: -1)"},
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "seed": eval_config.seed, "key": np.asarray(key).tolist(),
        "calibration": calibration.to_dict() if calibration is not None else None,
        "weights": list(weights), "files": {name: _fingerprint(path / name) for name in (PROGRAM, WEIGHTS)},
    }
    _check_fields(path / MANIFEST, manifest)
    text = json.dumps(manifest, indent=1).encode()
    (path / DIGEST).write_text(f"{hashlib.sha256(text).hexdigest()}  {MANIFEST}\n")  # sha256sum's format
    (path / MANIFEST).write_bytes(text)
    return path


def load(path: str | Path) -> ExportedDetector:
    """An exported folder (`Detector.export`, `diad-jax export`), ready to score. A folder of another
    format version, a file that is missing, truncated or changed since the export (the manifest
    included), a manifest field of the wrong type or range or that disagrees with the program, or a
    program this jax cannot read is refused with an ExportError naming the file and field."""
    path = Path(path)
    manifest = read_manifest(path)
    for name in (PROGRAM, WEIGHTS):
        _check_file(path / name, manifest["files"][name])
    try:
        program = jax.export.deserialize(bytearray((path / PROGRAM).read_bytes()))
    except Exception as e:  # whatever the reader finds wrong: name the file instead of a raw traceback
        raise ExportError(f"{path / PROGRAM}: not a program this jax ({jax.__version__}; exported with "
                          f"{manifest['jax_version']}) can read ({type(e).__name__}: {e})") from e
    try:
        stored = load_file(str(path / WEIGHTS))
    except Exception as e:
        raise ExportError(f"{path / WEIGHTS}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    missing = [k for k in manifest["weights"] if k not in stored]
    if missing:
        raise ExportError(f"{path / WEIGHTS}: {len(missing)} weight(s) the manifest lists are missing: "
                          f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    weights = [stored[k] for k in manifest["weights"]]
    _check_program(path, manifest, program, weights)
    _check_manifest_unchanged(path)  # last: a field the checks above can name is named rather than just refused
    return ExportedDetector(path, manifest, program, weights)


def read_manifest(path: Path) -> dict:
    """The manifest of the exported folder `path`, checked: this format version, every field present,
    of its type and in its range (`load` checks it against the program and its checksum too)."""
    file = path / MANIFEST
    if not file.is_file():
        raise ExportError(f"{path}: no {MANIFEST}; not an exported detector (Detector.export, diad-jax export), "
                          f"or an export that did not finish")
    try:
        manifest = json.loads(file.read_text())
        version = manifest["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{file}: not a readable manifest ({type(e).__name__}: {e})") from e
    if version != FORMAT_VERSION:
        raise ExportError(f"{file}: format version {version!r} (written by diad_jax "
                          f"{manifest.get('diad_jax_version')}); this diad_jax ({__version__}) reads version "
                          f"{FORMAT_VERSION}: export the model again, or load it with the version that wrote it")
    _check_fields(file, manifest)
    return manifest


def _check_fields(file: Path, manifest: dict) -> None:
    """Every field of `manifest` (the one `file` holds) present, of its type and in its range."""
    missing = [k for k in (*_FIELDS, "calibration") if k not in manifest]
    if missing:
        raise ExportError(f"{file}: missing {', '.join(missing)}")
    for key, (valid, expected) in _FIELDS.items():
        if not valid(manifest[key]):
            text = json.dumps(manifest[key])
            raise ExportError(f"{file}: {key} is {text if len(text) <= 80 else text[:77] + '...'}; expected {expected}")
    _calibration(file, manifest["calibration"])


def _is_int(v, low: int, high: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v and (high is None or v <= high)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_list(v, valid, length: int | None = None) -> bool:
    return isinstance(v, list) and (length is None or len(v) == length) and all(valid(x) for x in v)


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_file_record(r) -> bool:
    return (isinstance(r, dict) and set(r) == {"bytes", "sha256"} and _is_int(r["bytes"], 0)
            and _is_str(r["sha256"]) and len(r["sha256"]) == 64 and set(r["sha256"]) <= set("0123456789abcdef"))


# every manifest field but format_version (read first) and calibration (`_calibration`): a test of its
# value, and what it must be; `_check_program` then checks batch_size, image_size, platforms, key and
# weights against the program
_FIELDS = {
    "diad_jax_version": (_is_str, "a string"),
    "jax_version": (_is_str, "a string"),
    "source": (lambda v: v is None or _is_str(v), "a string or null"),
    "notes": (lambda v: _is_list(v, _is_str), "a list of strings"),
    "model_config": (lambda v: isinstance(v, dict), "an object"),
    "eval_config": (lambda v: isinstance(v, dict), "an object"),
    "input": (lambda v: isinstance(v, dict), "an object"),
    "image_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "platforms": (lambda v: _is_list(v, lambda p: p in PLATFORMS) and len(v) > 0,
                  f"a list of some of {', '.join(PLATFORMS)}"),
    "normalization": (lambda v: isinstance(v, dict) and set(v) == {"mean", "std"} and _is_list(v["mean"], _is_number, 3)
                      and _is_list(v["std"], lambda s: _is_number(s) and s > 0, 3),
                      '{"mean": [3 finite numbers], "std": [3 finite numbers > 0]}'),
    "seed": (lambda v: _is_int(v, -2**63, 2**64 - 1), "a 64-bit integer"),
    "key": (lambda v: _is_list(v, lambda k: _is_int(k, 0, 2**32 - 1)), "a list of uint32 integers (0..4294967295)"),
    "weights": (lambda v: _is_list(v, _is_str) and len(set(v)) == len(v), "a list of distinct weight names"),
    "files": (lambda v: isinstance(v, dict) and set(v) == {PROGRAM, WEIGHTS} and all(map(_is_file_record, v.values())),
              f'{{"{PROGRAM}": ..., "{WEIGHTS}": ...}}, each {{"bytes": integer >= 0, "sha256": 64 hex digits}}'),
}


def _calibration(file: Path, value) -> Calibration | None:
    """The manifest's calibration field (null or Calibration.to_dict()), checked: its thresholds are
    finite numbers."""
    if value is None:
        return None
    try:
        calibration = Calibration.from_dict(value)
    except (AttributeError, KeyError, TypeError) as e:
        raise ExportError(f"{file}: calibration is not null or the thresholds Calibration.to_dict() writes "
                          f"({type(e).__name__}: {e})") from e
    thresholds = {"image": calibration.image, **{f"per_class.{k}": t for k, t in calibration.per_class.items()},
                  **({"pixel": calibration.pixel} if calibration.pixel is not None else {})}
    for name, t in thresholds.items():
        if not all(map(_is_number, (t.value, t.low, t.high))):
            raise ExportError(f"{file}: calibration.{name}: value {t.value!r}, low {t.low!r}, high {t.high!r}; "
                              f"expected finite numbers")
    return calibration


def _check_program(path: Path, manifest: dict, program: jax.export.Exported, weights: list[np.ndarray]) -> None:
    """The manifest and weights against the program's own signature: the weights' shapes and dtypes,
    batch_size, image_size, key and platforms."""
    file, avals = path / MANIFEST, program.in_avals
    if len(avals) != len(weights) + 3:
        raise ExportError(f"{path / PROGRAM} takes {len(avals)} arrays, {file} lists {len(weights)} "
                          f"weights (+ images, key, index): the files come from different exports")
    for key, w, a in zip(manifest["weights"], weights, avals):
        if w.shape != a.shape or w.dtype != a.dtype:
            raise ExportError(f"{path / WEIGHTS}: {key!r} is {w.dtype}{list(w.shape)}, the program takes "
                              f"{a.dtype}{list(a.shape)}: the files come from different exports")
    images, key = avals[-3], avals[-2]  # float32 (B, 3, S, S), the raw uint32 key
    size = manifest["image_size"]
    agrees = {"batch_size": manifest["batch_size"] == images.shape[0],
              "image_size": images.shape[2:] == (size, size),
              "key": key.shape == (len(manifest["key"]),),
              "platforms": tuple(manifest["platforms"]) == program.platforms}
    wrong = [field for field, ok in agrees.items() if not ok]
    if wrong:
        raise ExportError(f"{file}: {', '.join(f'{k} is {json.dumps(manifest[k])}' for k in wrong)}, but {PROGRAM} "
                          f"takes {images.dtype}{list(images.shape)} images and a {key.dtype}{list(key.shape)} key, "
                          f"lowered for {', '.join(program.platforms)}: the manifest was edited or comes from another "
                          f"export; export the model again")


def _check_manifest_unchanged(path: Path) -> None:
    """The manifest's SHA-256 against the one DIGEST records (save writes it)."""
    digest = path / DIGEST
    if not digest.is_file():
        raise ExportError(f"{digest}: missing from the exported folder (it holds the SHA-256 of {MANIFEST})")
    if digest.read_text().split() != [_fingerprint(path / MANIFEST)["sha256"], MANIFEST]:
        raise ExportError(f"{path / MANIFEST}: changed since the export (its SHA-256 is not the one {DIGEST} "
                          f"records); a manifest's values change the scores, so an edited one is refused: export "
                          f"the model again")


def _fingerprint(file: Path) -> dict:
    with open(file, "rb") as f:
        return {"bytes": file.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _check_file(file: Path, recorded: dict) -> None:
    if not file.is_file():
        raise ExportError(f"{file}: missing from the exported folder")
    size = file.stat().st_size
    if size != recorded["bytes"]:
        raise ExportError(f"{file}: {size} bytes, the manifest records {recorded['bytes']}: truncated or replaced "
                          f"since the export; export the model again")
    if _fingerprint(file)["sha256"] != recorded["sha256"]:
        raise ExportError(f"{file}: damaged (its SHA-256 differs from the manifest's); export the model again")


__all__ = ["ExportError", "ExportedDetector", "FORMAT_VERSION", "MAX_ID", "PLATFORMS", "Scores", "load",
           "read_manifest", "save"]
