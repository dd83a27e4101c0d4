"""Model checkpoints: one orbax directory every entry point loads.

    <dir>/state          orbax StandardSave of {"params": {unet, sg, vae}, "context": (1, L, D),
                         "resnet": {...} (optional)}
    <dir>/model_config   JSON: the ModelConfig plus metadata (source files, conversion date)
    <dir>/model_config.json  the same JSON, for people (written beside the orbax items)

Training checkpoints (diad_jax/train/checkpoint.py) write the same items through `model_items`
beside their train state, so a converted checkpoint initialises training and a trained one evaluates.
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import re
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from diad_jax import sharding as shd
from diad_jax.configs import ModelConfig
from diad_jax.errors import CheckpointError
from diad_jax.models.diad import DiAD
from diad_jax.models.resnet import resnet_abstract_params

log = logging.getLogger(__name__)


@dataclass
class ModelCheckpoint:
    config: ModelConfig
    params: dict
    context: Any
    resnet: dict | None = None
    metadata: dict = field(default_factory=dict)


# the file orbax's JsonSave writes an item to (<checkpoint>/<item>/metadata)
_JSON_ITEM_FILE = "metadata"


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_model(path: str | Path, *, config: ModelConfig, params: dict, context, kind: str,
               resnet: dict | None = None, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write a model checkpoint directory (see module docstring); `kind` says what it is (`KINDS`)."""
    path = Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        shutil.rmtree(path)
    context = np.asarray(context, np.float32)
    expected = (config.context_len, config.unet.context_dim)
    if context.ndim != 3 or context.shape[0] != 1 or context.shape[1:] != expected:
        raise ValueError(f"context has shape {context.shape}, expected (1, {expected[0]}, {expected[1]}) "
                         f"for this model config")
    meta = model_metadata(config, resnet is not None, kind=kind, **(metadata or {}))
    _checkpointer().save(path, args=ocp.args.Composite(**model_items(params, context, resnet, meta)))
    (path / "model_config.json").write_text(json.dumps(meta, indent=2))
    return path


# What a model checkpoint is, recorded in it: a trained anomaly detector (diad-jax train, or a
# converted DiAD .ckpt), an autoencoder fine-tuning's (diad-jax finetune-autoencoder: the VAE
# trained, the UNet and SG network as they started), or the start of training (diad-jax convert
# --sd-ckpt: SD v1.5 + a VAE, the SG network copied from the UNet encoder).
KINDS = ("detector", "autoencoder", "init")
_NOT_A_DETECTOR = {
    "autoencoder": "an autoencoder fine-tuning checkpoint (diad-jax finetune-autoencoder): only its VAE is trained, "
                   "its UNet and SG network never were",
    "init": "a start-of-training checkpoint (diad-jax convert --sd-ckpt: SD v1.5 + a VAE): its SG network is "
            "untrained",
}


def model_metadata(config: ModelConfig, has_resnet: bool, *, kind: str, **extra) -> dict:
    """The model_config item of a model checkpoint: the ModelConfig, whether a ResNet-50 is stored,
    what the checkpoint is (`KINDS`) and what else the writer records (e.g. "eval_config", "source")."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    return {"model_config": config.to_dict(), "has_resnet": has_resnet, "kind": kind, **extra}


def checkpoint_kind(meta: dict) -> str:
    """What a checkpoint is (`KINDS`). Checkpoints written before the kind was recorded: a training
    run's without an eval config is an autoencoder fine-tuning's; any other is taken as a detector."""
    if "kind" in meta:
        return meta["kind"]
    return "autoencoder" if meta.get("source") == "diad_jax.train" and "eval_config" not in meta else "detector"


def require_detector(meta: dict, path: str | Path) -> None:
    """A CheckpointError unless the checkpoint of `meta` (at `path`) is a trained anomaly detector,
    saying what it is and what to do with it."""
    kind = checkpoint_kind(meta)
    if kind != "detector":
        raise CheckpointError(f"{path} is {_NOT_A_DETECTOR.get(kind, f'a {kind!r} checkpoint')}, so it cannot "
                              f"score; train DiAD from it (diad-jax train --init-checkpoint {path}) and score that "
                              f"run's checkpoint (in its workdir)")


def model_items(params: dict, context, resnet: dict | None, metadata: dict) -> dict:
    """The items of a model checkpoint as orbax save args: "state" {"params", "context",
    "resnet"?} and "model_config" (`model_metadata`). The one writer of this layout: `save_model`
    and the training checkpoints (diad_jax/train/checkpoint.py) both use it."""
    state = {"params": params, "context": context}
    if resnet is not None:
        state["resnet"] = resnet
    return dict(state=ocp.args.StandardSave(state), model_config=ocp.args.JsonSave(metadata))


def step_dirs(directory: Path) -> list[Path]:
    """The finished step folders (`<directory>/<int>`) of a training run's checkpoint folder, oldest first."""
    if not directory.is_dir():
        return []
    steps = [p for p in directory.iterdir() if p.name.isdigit() and (p / "model_config").exists()]
    return sorted(steps, key=lambda p: int(p.name))


def resolve(path: str | Path, field: str | None = None) -> Path:
    """A model checkpoint folder from what a user may pass: the checkpoint itself, a training
    directory (a training run's workdir: its best checkpoint if it has one, else the newest), or
    its checkpoints/ folder (the newest). Raises CheckpointError naming the path and the config
    field or argument (`field`) it was given as."""
    path = Path(path).absolute()
    fields = [field] if field else []
    where = f"{{0}} {path}" if field else str(path)
    if (path / "model_config").exists():
        return path
    if not path.exists():
        raise CheckpointError(f"{where}: no such checkpoint folder", fields=fields)
    for candidates, which in ((step_dirs(path / "best"), "best"), (step_dirs(path / "checkpoints"), "newest"),
                              (step_dirs(path), "newest")):
        if candidates:
            log.info("%s is a training directory: using its %s checkpoint %s", path, which, candidates[-1])
            return candidates[-1]
    raise CheckpointError(f"{where}: not a diad_jax model checkpoint (no model_config item) nor a training "
                          f"directory (no checkpoints/<step>); create one with `diad-jax convert` "
                          f"or `diad-jax train`", fields=fields)


def read_metadata(path: str | Path, field: str | None = None) -> dict:
    """The model_config item of a model checkpoint (`path` as `resolve` accepts it), read as the
    plain JSON file it is: no JAX backend or orbax machinery is touched, so a multi-host command can
    check its flags before `jax.distributed.initialize`. `field`: as `resolve` takes it."""
    path = resolve(path, field)
    item = path / "model_config" / _JSON_ITEM_FILE
    try:
        meta = json.loads(item.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{item}: cannot read the checkpoint's model_config item "
                              f"({getattr(e, 'strerror', None) or e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{item}: not a diad_jax model_config item (no \"model_config\" object)")
    return meta


@contextlib.contextmanager
def restoring(path: str | Path, what: str):
    """Turns any failure of the orbax restore inside into one CheckpointError naming the checkpoint,
    the item and, where the storage layer says so, the array and the cause (a missing or damaged
    file). The echoes of the reads a failure aborts are silenced while the restore runs
    (`_aborted_reads_silenced`)."""
    with _aborted_reads_silenced() as settle:
        try:
            yield
        except Exception as e:  # orbax/tensorstore raise ValueError, KeyError, FileNotFoundError, Exception
            settle(e)
            raise CheckpointError(f"{path}: cannot restore {what}: {_storage_reason(e)}") from e


def _storage_reason(e: BaseException) -> str:
    """One line from an orbax/tensorstore exception chain: the array that failed and why."""
    messages = []
    while e is not None and len(messages) < 10:
        messages.append(str(e) or type(e).__name__)
        e = e.__cause__ or e.__context__
    for m in messages:
        hit = re.search(r'Error (?:reading|opening)[^"]*"([^"]+)".*?: (.+?)(?:;|\[tensorstore_spec|$)', m, re.S)
        if hit:
            return (f'array "{hit.group(1).split("/")[0]}" is unreadable ({hit.group(2).strip()}): a file of the '
                    f"checkpoint is missing, truncated or damaged")
    return messages[-1].strip().splitlines()[0][:300]


@contextlib.contextmanager
def _aborted_reads_silenced(quiet_s: float = 0.25, limit_s: float = 5.0):
    """When one read of an orbax restore fails, orbax closes its event loop while tensorstore still
    completes the other reads: each one then reports 'Event loop is closed' or, when its orbax
    coroutine is collected, its own read error (both through sys.unraisablehook), 'exception was
    never retrieved' (asyncio's logger) or 'coroutine was never awaited' (a warning) -- hundreds of
    tracebacks after the one error that matters. Inside this context exactly those are dropped;
    everything else passes through. It yields `settle(error)`, which a failed restore calls to let
    the aborted reads report before the context ends: it clears the local variables of the frames
    `error` passed through (they hold the reads' futures; the traceback itself is kept) and collects
    garbage until no echo came for `quiet_s` (at most `limit_s`). On exit, sys.unraisablehook,
    asyncio's log filters and the warning filters are what they were."""
    previous_hook = sys.unraisablehook
    dropped = [0.0]  # time.monotonic() of the last echo dropped

    def hook(unraisable):
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
            unraisable.exc_value)
        orbax_read = inspect.iscoroutine(unraisable.object) and "orbax" in unraisable.object.cr_code.co_filename
        if closed_loop or orbax_read:
            dropped[0] = time.monotonic()
        else:
            previous_hook(unraisable)

    def never_retrieved(record: logging.LogRecord) -> bool:
        if "exception was never retrieved" in record.getMessage():
            dropped[0] = time.monotonic()
            return False
        return True

    def settle(error: BaseException):
        seen = set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            traceback.clear_frames(error.__traceback__)
            error = error.__cause__ or error.__context__
        began = dropped[0] = time.monotonic()
        while time.monotonic() - dropped[0] < quiet_s and time.monotonic() - began < limit_s:
            gc.collect()  # the aborted coroutines report now, not at some later collection
            time.sleep(0.05)

    asyncio_log = logging.getLogger("asyncio")
    sys.unraisablehook = hook
    asyncio_log.addFilter(never_retrieved)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
            yield settle
    finally:
        asyncio_log.removeFilter(never_retrieved)
        sys.unraisablehook = previous_hook


def load_model(path: str | Path, mesh: Mesh | None = None, *,
               min_shard_size: int = shd.MIN_SHARD_SIZE) -> ModelCheckpoint:
    """Load a model checkpoint (`path` as `resolve` accepts it) with every array read straight onto
    the devices of `mesh` (default: the first local device) where it is used: the model params
    placed by the partition rules (`sharding.param_shardings`: sharded when the mesh has an fsdp
    axis > 1), the context and ResNet-50 replicated. The one load-and-place path of scoring
    (`diad_jax.load`) and training (--init-checkpoint): no full host copy, and any mesh or process
    count, whatever topology the checkpoint was saved from."""
    path = resolve(path)
    meta = read_metadata(path)
    config = ModelConfig.from_dict(meta["model_config"])
    target = state_target(config, bool(meta.get("has_resnet")), mesh or shd.single_device_mesh(), min_shard_size)
    with restoring(path, "the model weights (state item)"):
        restored = _checkpointer().restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    state = restored["state"]
    return ModelCheckpoint(config=config, params=state["params"], context=state["context"],
                           resnet=state.get("resnet"), metadata=meta)


def state_target(config: ModelConfig, has_resnet: bool, mesh: Mesh, min_shard_size: int = shd.MIN_SHARD_SIZE):
    """The restore target of a checkpoint's "state" item on `mesh`: {"params", "context",
    "resnet"?} as ShapeDtypeStructs carrying the partition rules' shardings (`load_model` and the
    training checkpoints restore through it, so both place every array the same way)."""
    abstract = {"params": DiAD(config).abstract_params(),
                "context": jax.ShapeDtypeStruct((1, config.context_len, config.unet.context_dim), np.float32)}
    if has_resnet:
        abstract["resnet"] = resnet_abstract_params()
    return shd.with_shardings(abstract, shd.param_shardings(abstract, mesh, min_shard_size=min_shard_size))


def default_context(config: ModelConfig) -> np.ndarray:
    """The text context used when no CLIP output is at hand (the tiny embedded default): zeros of
    shape (1, context_len, context_dim). The prompt is constant in DiAD, so any fixed context works
    as long as training and scoring use the same one."""
    return np.zeros((1, config.context_len, config.unet.context_dim), np.float32)
