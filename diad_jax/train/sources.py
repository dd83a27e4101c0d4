"""Where a training run's model and data come from, and the checks made before any step: the
model source (an init checkpoint or a fresh config), the prepared dataset and its per-host
iterator, batch sizes against the mesh, and the ResNet-50 an evaluating run needs."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diad_jax import data as data_lib
from diad_jax import sharding as shd
from diad_jax.checkpoints import default_context, load_model, model_metadata, read_metadata, resolve
from diad_jax.configs import NO_WEIGHTS_COMPARATOR, DataConfig, ModelConfig, TrainConfig
from diad_jax.errors import ConfigError
from diad_jax.train.task import Task

log = logging.getLogger(__name__)

DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)}  # prepare()'s arguments of these names

Params = dict[str, Any]


def default_data_dir() -> str:
    return os.environ.get("DIAD_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "diad_jax", "data")


def validates(cfg: TrainConfig, task: Task) -> bool:
    """Whether the run evaluates: the task trains an anomaly detector and cfg.validation is active."""
    return task.detects_anomalies and cfg.validation.active


def check_eval_resnet(cfg: TrainConfig, has_resnet: bool) -> None:
    """An evaluating run that compares with ResNet-50 features needs its weights (from
    the init checkpoint) or the explicit opt-in to a random one; nothing random is substituted silently."""
    if (cfg.validation.active and cfg.eval.needs_resnet and not has_resnet
            and cfg.validation.resnet != "random"):
        where = f"{{0}} {cfg.init_checkpoint} has" if cfg.init_checkpoint else "a run without {0} has"
        raise ConfigError(f"{where} no ResNet-50 weights for the evaluation: convert them into the checkpoint "
                          f"(diad-jax convert --resnet), opt in to a randomly initialised ResNet-50 "
                          f"with {{1}} (maps then compare random features), compare without it ({{2}}), or "
                          f"evaluate nothing ({{3}})",
                          fields=["init_checkpoint", "validation.resnet=random",
                                  f"eval.comparator={NO_WEIGHTS_COMPARATOR}", "validation.split=none"])


def check_batch(cfg: TrainConfig, mesh: Mesh, evaluates: bool) -> None:
    """The global batch sizes split evenly into the step's micro-batches, each over the mesh's devices,
    and over the processes."""
    n_dev, n_proc, k = shd.batch_size_multiple(mesh), jax.process_count(), cfg.optimizer.grad_accum
    if cfg.data.batch_size % (k * n_dev):
        per = f"{k} micro-batches ({{1}}) x " if k > 1 else ""
        raise ConfigError(f"{{0}} {cfg.data.batch_size} must be a multiple of {per}the {n_dev} devices of the "
                          f"mesh ({shd.describe_mesh(mesh)}) = {k * n_dev}",
                          fields=["data.batch_size", "optimizer.grad_accum"])
    if cfg.data.batch_size % n_proc:
        raise ConfigError(f"{{0}} {cfg.data.batch_size} must be a multiple of the {n_proc} processes",
                          fields=["data.batch_size"])
    if evaluates and cfg.eval.batch_size % n_dev:
        raise ConfigError(f"{{0}} {cfg.eval.batch_size} must be a multiple of the {n_dev} devices",
                          fields=["eval.batch_size"])


@dataclasses.dataclass
class ModelSource:
    """The model a run starts from: its config (the run's overrides applied) and where its weights
    come from: `checkpoint` (the init checkpoint, resolved; None: initialise fresh), which may
    hold a ResNet-50 (`has_resnet`). Building one reads only the checkpoint's JSON metadata;
    `load` reads the weights, straight onto the run's mesh."""

    config: ModelConfig
    checkpoint: str | None
    has_resnet: bool

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "ModelSource":
        if cfg.init_checkpoint:
            path = resolve(cfg.init_checkpoint, "init_checkpoint")
            meta = read_metadata(path)
            source = cls(ModelConfig.from_dict(meta["model_config"], f"{path}: model_config"), str(path),
                         bool(meta.get("has_resnet")))
        else:
            source = cls(ModelConfig.from_spec(cfg.model), None, False)
            log.warning("no init_checkpoint: %s model with the reference's random initialisation (SG network "
                        "copied from the UNet encoder) and a zero context in place of CLIP(\"\")", cfg.model)
        overrides = {k: getattr(cfg, k) for k in ("only_mid_control", "fusion") if getattr(cfg, k) is not None}
        source.config = dataclasses.replace(source.config, **overrides)
        return source

    def load(self, mesh: Mesh, min_shard_size: int) -> tuple[Params | None, Any, Params | None]:
        """(params placed on `mesh` by the partition rules, or None: initialise fresh; the text
        context; the ResNet-50 replicated, or None)."""
        if self.checkpoint is None:
            return None, default_context(self.config), None
        ckpt = load_model(self.checkpoint, mesh, min_shard_size=min_shard_size)
        log.info("initialising from %s (context and%s ResNet from the checkpoint)", self.checkpoint,
                 "" if ckpt.resnet is not None else " NO")
        return ckpt.params, ckpt.context, ckpt.resnet

    def metadata(self, cfg: TrainConfig, task: Task) -> dict:
        """The model checkpoints' metadata; for an anomaly detector also how the run scores it (its
        eval config, and the opt-in to a random ResNet-50), so that `diad_jax.load` scores it the same way."""
        extra = {}
        if task.detects_anomalies:
            extra["eval_config"] = cfg.eval.to_dict()
            if not self.has_resnet and cfg.validation.resnet == "random" and cfg.eval.needs_resnet:
                extra["resnet"] = "random"
        return model_metadata(self.config, self.has_resnet, kind="detector" if task.detects_anomalies else task.name,
                              source="diad_jax.train", init_checkpoint=cfg.init_checkpoint, **extra)


def prepare_data(cfg: TrainConfig, image_size: int, overwrite: bool = False) -> data_lib.PreparedDataset:
    """The training dataset, prepared once by process 0 (the others wait, then open it, or prepare
    their own copy when data_dir is host-local)."""
    d = cfg.data
    data_dir = d.data_dir or default_data_dir()
    kw = dict(manual_dir=d.manual_dir, classes=d.classes, image_size=image_size, skip_bad=d.skip_bad, **d.options)
    try:
        if jax.process_index() == 0:
            ds = data_lib.prepare(d.dataset, data_dir, overwrite=overwrite, **kw)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("diad_jax.train: dataset prepared")
        if jax.process_index() != 0:
            ds = data_lib.prepare(d.dataset, data_dir, **kw)
    except data_lib.DataError as e:  # prepare's arguments are the fields of the run's data section
        raise e.renamed(lambda field: f"data.{field}" if field in DATA_FIELDS else field) from e
    n = len(ds.indices(d.train_split, d.classes))
    log.info("dataset %s at %s: %d %s images of %d classes; %d steps per epoch", d.dataset, ds.path, n,
             d.train_split, len(ds.class_names), n // d.batch_size)
    return ds


def train_iterator(cfg: TrainConfig, dataset: data_lib.PreparedDataset, image_size: int, start_step: int = 0):
    """This process's share of every global batch from global step `start_step` on, shuffled per
    epoch: a function of the step alone, so a resumed run continues exactly, on any number of processes."""
    n_proc = jax.process_count()
    return iter(data_lib.train_dataset(dataset, cfg.data.batch_size // n_proc, split=cfg.data.train_split,
                                       classes=cfg.data.classes, image_size=image_size, seed=cfg.seed,
                                       shard_index=jax.process_index(), shard_count=n_proc, start_step=start_step))
