"""Model checkpoints: one orbax directory every entry point loads.

    <dir>/state          orbax StandardSave of {"params": {unet, sg, vae}, "context": (1, L, D),
                         "resnet": {...} (optional)}
    <dir>/model_config   JSON: the ModelConfig plus metadata (source files, conversion date)
    <dir>/model_config.json  the same JSON, for people (written beside the orbax items)

Training checkpoints (diad_jax/train.py) use an orbax CheckpointManager with the same "params"
naming, so a converted checkpoint initialises training and a trained one evaluates.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from diad_jax.configs import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class ModelCheckpoint:
    config: ModelConfig
    params: dict
    context: Any
    resnet: dict | None = None
    metadata: dict = field(default_factory=dict)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_model(path: str | Path, *, config: ModelConfig, params: dict, context, resnet: dict | None = None,
               metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write a model checkpoint directory (see module docstring)."""
    path = Path(path).absolute()
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        import shutil
        shutil.rmtree(path)
    context = np.asarray(context, np.float32)
    expected = (config.context_len, config.unet.context_dim)
    if context.ndim != 3 or context.shape[0] != 1 or context.shape[1:] != expected:
        raise ValueError(f"context has shape {context.shape}, expected (1, {expected[0]}, {expected[1]}) "
                         f"for this model config")
    state = {"params": params, "context": context}
    if resnet is not None:
        state["resnet"] = resnet
    meta = {"model_config": config.to_dict(), "has_resnet": resnet is not None, **(metadata or {})}
    _checkpointer().save(path, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), model_config=ocp.args.JsonSave(meta)))
    (path / "model_config.json").write_text(json.dumps(meta, indent=2))
    return path


def read_metadata(path: str | Path) -> dict:
    path = Path(path).absolute()
    if not (path / "model_config").exists():
        raise FileNotFoundError(f"{path}: not a diad_jax model checkpoint (no model_config item); "
                                f"create one with `python convert/torch_to_flax.py`")
    meta = _checkpointer().restore(path, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
    return dict(meta["model_config"])


def load_model(path: str | Path, sharding: Callable[[tuple, Any], Any] | None = None) -> ModelCheckpoint:
    """Load a model checkpoint. `sharding(path, shape_dtype) -> Sharding` places each leaf
    (default: numpy arrays on the host)."""
    path = Path(path).absolute()
    meta = read_metadata(path)
    config = ModelConfig.from_dict(meta["model_config"])
    if sharding is None:
        restored = _checkpointer().restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    else:
        from diad_jax.models.diad import DiAD
        from diad_jax.models.resnet import resnet_abstract_params
        abstract = {"params": DiAD(config).abstract_params(),
                    "context": jax.ShapeDtypeStruct((1, config.context_len, config.unet.context_dim), np.float32)}
        if meta.get("has_resnet"):
            abstract["resnet"] = resnet_abstract_params()
        abstract = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(p, x)), abstract)
        restored = _checkpointer().restore(path, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    state = restored["state"]
    return ModelCheckpoint(config=config, params=state["params"], context=state["context"],
                           resnet=state.get("resnet"), metadata=meta)


def default_context(config: ModelConfig) -> np.ndarray:
    """The text context used when no CLIP output is at hand (the tiny embedded default): zeros of
    shape (1, context_len, context_dim). The prompt is constant in DiAD, so any fixed context works
    as long as training and scoring use the same one."""
    return np.zeros((1, config.context_len, config.unet.context_dim), np.float32)


def load_for_scoring(path: str | Path | None, seed: int = 0) -> tuple[ModelConfig, dict, list[str]]:
    """(config, scoring bundle, notes) from a model checkpoint, or the tiny model with random
    weights when `path` is None (the embedded default)."""
    from diad_jax.models.diad import DiAD
    from diad_jax.scoring import make_bundle

    notes = []
    if path is None:
        config = ModelConfig.tiny()
        params = DiAD(config).init(seed)
        notes.append("no --checkpoint: the tiny model with RANDOM weights (the scores are meaningless; "
                     "train one with scripts/train.py or convert one with convert/torch_to_flax.py)")
        return config, make_bundle(params, None, default_context(config), seed), notes + [
            "no ResNet-50 weights: features come from a randomly initialised ResNet-50"]
    ckpt = load_model(path)
    if ckpt.resnet is None:
        notes.append(f"{path} has no ResNet-50 weights: features come from a randomly initialised ResNet-50 "
                     f"(convert with --resnet for the reference's timm resnet50 features)")
    return ckpt.config, make_bundle(ckpt.params, ckpt.resnet, ckpt.context, seed), notes
