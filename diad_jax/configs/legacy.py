"""The flat TrainConfig names of older versions, read only where old files are read: a --config
file (diad_jax.cli) and a checkpoint's train_config item when resuming (train/checkpoint.py).
`TrainConfig.from_dict` reads the nested form only."""
from __future__ import annotations

import logging

from diad_jax.configs.serialization import set_path

log = logging.getLogger(__name__)


# The flat field names of TrainConfig before it was nested -> where they live now. Flat config files
# and the train_config items of older checkpoints are read through this table.
FLAT_TRAIN_FIELDS = {
    **{k: f"data.{k}" for k in ("dataset", "data_dir", "manual_dir", "skip_bad", "classes", "train_split",
                                "batch_size")},
    "dataset_options": "data.options",
    **{k: f"optimizer.{k}" for k in ("learning_rate", "weight_decay", "b1", "b2", "eps", "grad_accum", "ema_decay")},
    "mesh_data": "mesh.data", "mesh_fsdp": "mesh.fsdp", "min_shard_size": "mesh.min_shard_size",
    "save_every": "checkpoint.save_every", "keep": "checkpoint.keep", "async_checkpoint": "checkpoint.async_save",
    "resume": "checkpoint.resume",
    "eval_every": "validation.every", "eval_at_end": "validation.at_end", "eval_split": "validation.split",
    "eval_data_dir": "validation.data_dir", "best_metric": "validation.best_metric", "eval_resnet": "validation.resnet",
    "eval_batch_size": "eval.batch_size", "eval_seed": "eval.seed", "metrics_variant": "eval.variant",
    "eval_schedule": "eval.schedule", "eval_sigma": "eval.sigma", "eval_pool_window": "eval.pool_window",
    "eval_comparator": "eval.comparator",
    **{k: f"autoencoder.{k}" for k in ("kl_weight", "perceptual_weight", "lpips_vgg16", "lpips_lin", "disc_start")},
}


# TrainConfig.remat was a bool before it named a policy (constants.REMAT_POLICIES).
REMAT_OF_BOOL = {True: "blocks", False: "none"}


def unflatten_train_dict(d: dict, where: str = "a TrainConfig") -> tuple[dict, dict[str, str]]:
    """A TrainConfig dict that may use the flat field names of older versions (or a bool `remat`)
    -> (the nested dict, {old name: new path} of the names it moved). When it moved any, a warning
    names `where` (the file or checkpoint item read) and where each name lives now."""
    out, moved = {}, {}
    for k, v in d.items():
        if k in FLAT_TRAIN_FIELDS:
            moved[k] = FLAT_TRAIN_FIELDS[k]
            set_path(out, FLAT_TRAIN_FIELDS[k], v)
    for k, v in d.items():
        if k not in FLAT_TRAIN_FIELDS:
            if isinstance(v, dict) and isinstance(out.get(k), dict):  # a section given both ways
                out[k] = {**v, **out[k]}
            else:
                out[k] = v
    if moved:
        log.warning("%s uses the flat TrainConfig names of older versions: %s", where,
                    ", ".join(f"{k} -> {v}" for k, v in moved.items()))
    if isinstance(out.get("remat"), bool):  # before remat policies: on = every block recomputed
        out["remat"] = REMAT_OF_BOOL[out["remat"]]
    return out, moved
