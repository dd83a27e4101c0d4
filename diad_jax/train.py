"""DiAD training: train state, the reference loss, the sharded train step, checkpoints, the loop.

The pieces, each usable alone:

* `make_optimizer(cfg)`: AdamW with torch's defaults (the reference's optimiser), constant lr,
  wrapped in `optax.MultiSteps` for gradient accumulation.
* `diffusion_loss(model, diffusion, trainable, frozen, context, images, index, key)`: the reference's
  eps-MSE (spec section 4). Per-example randomness is keyed by the example's dataset index, so a step
  gives the same result on any mesh and any number of hosts.
* `TrainState` (step, trainable params, optimizer state, optional EMA, rng) and `StepFactory`,
  which builds the `jax.jit`-compiled step with explicit shardings, donating the state.
* `Checkpointer`: an orbax `CheckpointManager` (async saves, keep K) whose step directories are
  also model checkpoints (`checkpoints.load_model(<workdir>/checkpoints/<step>)` works), plus the
  data iterator's state (per-process JSON) and the rng; a second manager keeps the best
  checkpoint by the validation metric.
* `Trainer`: the loop used by scripts/train.py (resume, logging to JSONL + TensorBoard,
  periodic evaluation with `Scorer` + `compute_metrics`).

Parameters are split by `trainable_mask` (SG network + UNet decoder, as the reference trains):
only the trainable part is in the train state and the optimizer; the frozen part (UNet encoder and
middle block, VAE) is a separate, non-donated argument of the step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import Mesh

from diad_jax import sharding as shd
from diad_jax.checkpoints import restoring
from diad_jax.configs import NO_WEIGHTS_COMPARATOR, DiffusionConfig, ModelConfig, TrainConfig
from diad_jax.diffusion import q_sample
from diad_jax.errors import CheckpointError, ConfigError, NonFiniteError
from diad_jax.models.diad import TRAINABLE_MASKS, DiAD, combine, partition

log = logging.getLogger(__name__)

Params = dict[str, Any]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_data_dir() -> str:
    return os.environ.get("DIAD_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "diad_jax", "data")


# ---- optimiser, loss ---------------------------------------------------------------------------
def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW as torch.optim.AdamW(lr, betas, eps, weight_decay) with a constant lr; averaged
    gradient accumulation over `grad_accum` steps (Lightning's accumulate_grad_batches)."""
    opt = optax.adamw(cfg.learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.grad_accum > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=cfg.grad_accum).gradient_transformation()
    return opt


def example_keys(key, index):
    """One independent key per example, from the step key and the example's dataset index."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index.astype(jnp.uint32))


def diffusion_loss(model: DiAD, diffusion: DiffusionConfig, trainable: Params, frozen: Params, context,
                   images, index, key, t_max: int | None = None):
    """The reference's training loss (ldm DDPM p_losses, eps-parameterisation, l2, logvar 0):

        z   = scale_factor * (mean + std * n),  n ~ N(0, I)   (VAE posterior SAMPLE, no gradient)
        t   ~ U{0, ..., T-1} (T = t_max when given),  eps ~ N(0, I),  x_t = q_sample(z, t, eps)
        loss = mean((eps - eps_theta(x_t, t, context, hint=images))^2)

    `images` (B, 3, H, W) normalised are both the VAE input and the hint; `context` (1, L, D) is
    broadcast; `index` (B,) int keys each example's noise (see `example_keys`)."""
    params = combine(trainable, frozen)
    b = images.shape[0]
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(key, index))
    mean, logvar = model.encode_moments(params, images)
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    post_noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys[:, 0])
    # ldm DiagonalGaussianDistribution clamps logvar to [-30, 20]
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    z = jax.lax.stop_gradient(model.config.scale_factor * (mean + std * post_noise))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, t_max or diffusion.num_train_timesteps))(keys[:, 1])
    eps = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(keys[:, 2])
    x_t = q_sample(diffusion, z, t, eps)
    pred = model.eps(params, x_t, t, context, images)
    del b
    return jnp.mean(jnp.square(pred - eps))


@dataclasses.dataclass(frozen=True)
class Task:
    """What a training run optimises: which param groups the step sees, which of them train, the
    loss `loss_fn(model, trainable, frozen, context, batch, key) -> (loss, {name: scalar})` and the
    optimiser. `diad_task(cfg)` is DiAD's; diad_jax/autoencoder.py defines the VAE fine-tuning one."""

    name: str
    groups: tuple[str, ...]
    mask_fn: Callable[[Params], Any]
    loss_fn: Callable[..., Any]
    optimizer_fn: Callable[[TrainConfig], optax.GradientTransformation]
    # Extra frozen inputs of the loss that are not model params (e.g. {"lpips": params}): placed
    # with the partition rules, passed in `frozen`, never checkpointed.
    extra_frozen: dict = dataclasses.field(default_factory=dict)


def diad_task(cfg: TrainConfig) -> Task:
    """DiAD's task: the parameters cfg.trainable names (the reference: SG network + UNet decoder)
    trained with `diffusion_loss` on the noise levels t < cfg.train_t_max (the reference: all 1000)."""
    diffusion = DiffusionConfig()

    def loss(model, trainable, frozen, context, batch, key):
        return diffusion_loss(model, diffusion, trainable, frozen, context, batch["image"], batch["index"], key,
                              t_max=cfg.train_t_max), {}

    return Task("diad", ("unet", "sg", "vae"), TRAINABLE_MASKS[cfg.trainable], loss, make_optimizer)


# ---- train state -------------------------------------------------------------------------------
@struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: batches consumed
    params: Params         # the trainable subset (nested like the full params, missing the frozen leaves)
    opt_state: Any
    ema: Params | None     # EMA of `params` (None when off)
    rng: jax.Array         # uint32 raw key; step s uses fold_in(rng, s)

    def as_dict(self) -> dict:
        d = {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rng": self.rng}
        if self.ema is not None:
            d["ema"] = self.ema
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], ema=d.get("ema"), rng=d["rng"])


def init_train_state(optimizer, trainable: Params, seed: int, ema: bool) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=optimizer.init(trainable),
                      ema=jax.tree.map(jnp.copy, trainable) if ema else None,
                      rng=jax.random.PRNGKey(seed))


@dataclasses.dataclass
class StepFactory:
    """Builds, for one mesh, the shardings of everything the step touches and the jitted step.

        f = StepFactory(model, cfg, mesh)
        trainable, frozen = f.split(params)                # placed with the partition rules
        state = f.init_state(trainable)
        state, metrics = f.step(state, frozen, context, batch)   # batch: {"image", "index"} global arrays

    `task` picks the param groups, trainable subset, loss and optimiser (default: DiAD's)."""

    model: DiAD
    cfg: TrainConfig
    mesh: Mesh
    task: Task | None = None  # None: diad_task(cfg)

    def __post_init__(self):
        if self.task is None:
            self.task = diad_task(self.cfg)
        self.optimizer = self.task.optimizer_fn(self.cfg)
        full = self.model.abstract_params()
        self.abstract_full = full
        abstract = {g: full[g] for g in self.task.groups}
        self.mask = self.task.mask_fn(abstract)
        a_train, a_frozen = partition(abstract, self.mask)
        a_frozen.update(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.task.extra_frozen))
        self.abstract_trainable, self.abstract_frozen = a_train, a_frozen
        self.trainable_shardings = self.param_shardings(a_train)
        self.frozen_shardings = self.param_shardings(a_frozen)
        self.abstract_state = jax.eval_shape(
            lambda p: init_train_state(self.optimizer, p, 0, self.cfg.ema_decay is not None), a_train)
        rep = shd.replicated(self.mesh)
        self.state_shardings = TrainState(
            step=rep, params=self.trainable_shardings,
            opt_state=shd.opt_state_shardings(self.optimizer, self.abstract_state.opt_state,
                                              self.trainable_shardings, self.mesh),
            ema=self.trainable_shardings if self.cfg.ema_decay is not None else None, rng=rep)
        self.batch_shardings = {"image": shd.batch_sharding(self.mesh, 4), "index": shd.batch_sharding(self.mesh, 1)}
        self.step = jax.jit(self._step, in_shardings=(self.state_shardings, self.frozen_shardings, rep,
                                                      self.batch_shardings),
                            out_shardings=(self.state_shardings, rep), donate_argnums=(0,))

    def param_shardings(self, tree):
        return shd.param_shardings(tree, self.mesh, min_shard_size=self.cfg.min_shard_size)

    # ---- placement -----------------------------------------------------------------------------
    def split(self, params: Params) -> tuple[Params, Params]:
        """(trainable, frozen) of the task's groups, placed on the mesh by the partition rules."""
        trainable, frozen = partition({g: params[g] for g in self.task.groups}, self.mask)
        frozen.update(self.task.extra_frozen)
        return shd.place(trainable, self.trainable_shardings), shd.place(frozen, self.frozen_shardings)

    def full_shardings(self):
        """Shardings of the full params (every group, also those the task does not touch)."""
        return self.param_shardings(self.abstract_full)

    def init_state(self, trainable: Params) -> TrainState:
        seed, ema = self.cfg.seed, self.cfg.ema_decay is not None
        return jax.jit(lambda p: init_train_state(self.optimizer, p, seed, ema),
                       in_shardings=(self.trainable_shardings,), out_shardings=self.state_shardings)(trainable)

    def place_context(self, context):
        return shd.place(jnp.asarray(context, jnp.float32), shd.replicated(self.mesh))

    def abstract_state_with_shardings(self) -> TrainState:
        return shd.with_shardings(self.abstract_state, self.state_shardings)

    # ---- the step ------------------------------------------------------------------------------
    def loss(self, trainable, frozen, context, batch, key):
        return self.task.loss_fn(self.model, trainable, frozen, context, batch, key)[0]

    def _step(self, state: TrainState, frozen, context, batch):
        key = jax.random.fold_in(state.rng, state.step)
        (loss, aux), grads = jax.value_and_grad(
            lambda p: self.task.loss_fn(self.model, p, frozen, context, batch, key), has_aux=True)(state.params)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = self.cfg.ema_decay
            applied = (state.step + 1) % self.cfg.grad_accum == 0  # an optimizer update happened
            ema = jax.tree.map(lambda e, p: jnp.where(applied, d * e + (1.0 - d) * p, e), ema, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    def lower(self, batch_size: int):
        """Lower the step on abstract inputs (no arrays materialised), e.g. for memory_analysis()."""
        c = self.model.config
        rep = shd.replicated(self.mesh)
        frozen = shd.with_shardings(self.abstract_frozen, self.frozen_shardings)
        ctx = jax.ShapeDtypeStruct((1, c.context_len, c.unet.context_dim), jnp.float32, sharding=rep)
        batch = {"image": jax.ShapeDtypeStruct((batch_size, 3, c.image_size, c.image_size), jnp.float32,
                                               sharding=self.batch_shardings["image"]),
                 "index": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=self.batch_shardings["index"])}
        return self.step.lower(self.abstract_state_with_shardings(), frozen, ctx, batch)


# ---- checkpoints -------------------------------------------------------------------------------
def model_metadata(config: ModelConfig, has_resnet: bool, **extra) -> dict:
    """The `model_config` item of a model checkpoint (as checkpoints.save_model writes it)."""
    return {"model_config": config.to_dict(), "has_resnet": has_resnet, **extra}


_ORBAX_TUNED = False


def _tune_orbax_array_handler(min_slice_bytes: int = 4 * 2**20) -> None:
    """Orbax saves a replicated array "replica-parallel": every replica writes a slice, which costs
    one small jitted slice per array and replica -- 14 s for the tiny model's 1,700 arrays on 8
    devices. Keep that for arrays whose per-replica slice is at least `min_slice_bytes` (SD's big
    kernels) and write smaller ones from one replica. Same on-disk format; set once per process."""
    global _ORBAX_TUNED
    if _ORBAX_TUNED:
        return
    from orbax.checkpoint._src.metadata import array_metadata_store

    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                             min_slice_bytes_for_replica_parallel=min_slice_bytes)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that it overrides the jax.Array handler
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_log.setLevel(level)
    _ORBAX_TUNED = True


class Checkpointer:
    """Training checkpoints under `directory`:

        <directory>/<step>/state         {"params": full params (EMA ones when on), "context", "resnet"?}
                                         (a model checkpoint)
        <directory>/<step>/model_config  JSON: ModelConfig + has_resnet      (a model checkpoint)
        <directory>/<step>/train_state   {"step", "params" (trainable), "opt_state", "ema"?, "rng"}
        <directory>/<step>/data          grain iterator state, one JSON file per process
        <directory>/<step>/train_config  JSON: the TrainConfig and the step's metrics

    so `checkpoints.load_model(<directory>/<step>)` loads a trained model for evaluation.
    Saves are asynchronous (device arrays are copied to host memory before `save` returns);
    `keep` most recent are kept. `best_directory` (optional) holds only the model items of the
    best checkpoint by a "higher is better" metric.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 best_directory: str | os.PathLike | None = None):
        self.directory = Path(directory).absolute()
        _tune_orbax_array_handler()
        # distinct barrier names: both managers may save the same step at once on several hosts
        mp = lambda name: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)  # noqa: E731
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                            multiprocessing_options=mp("diad_train"))
        self.manager = ocp.CheckpointManager(self.directory, options=opts)
        self.best = None
        if best_directory is not None:
            best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["val"], best_mode="max",
                                                     keep_checkpoints_without_metrics=False,
                                                     enable_async_checkpointing=async_save, create=True,
                                                     multiprocessing_options=mp("diad_best"))
            self.best = ocp.CheckpointManager(Path(best_directory).absolute(), options=best_opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    @staticmethod
    def _model_items(params, context, resnet, model_meta):
        state = {"params": params, "context": context}
        if resnet is not None:
            state["resnet"] = resnet
        return dict(state=ocp.args.StandardSave(state), model_config=ocp.args.JsonSave(model_meta))

    def save(self, step: int, *, state: TrainState, frozen: Params, context, resnet, model_meta: dict,
             data_iterator=None, train_config: dict | None = None) -> None:
        # the model items hold what evaluation uses: the EMA of the trained params when it is on
        trained = state.ema if state.ema is not None else state.params
        items = self._model_items(combine(trained, frozen), context, resnet, model_meta)
        items["train_state"] = ocp.args.StandardSave(state.as_dict())
        items["train_config"] = ocp.args.JsonSave(train_config or {})
        if data_iterator is not None:
            import grain.checkpoint
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def save_best(self, step: int, value: float, *, params: Params, context, resnet, model_meta: dict,
                  metrics: dict | None = None) -> None:
        if self.best is None:
            return
        items = self._model_items(params, context, resnet, model_meta)
        items["train_config"] = ocp.args.JsonSave({"step": step, "val": value, "metrics": metrics or {}})
        self.best.save(step, args=ocp.args.Composite(**items), metrics={"val": float(value)}, force=True)

    def best_step(self) -> int | None:
        return None if self.best is None else self.best.best_step()

    def restore_meta(self, step: int) -> tuple[dict, dict]:
        with restoring(self.directory / str(step), "the model_config and train_config items"):
            r = self.manager.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore(),
                                                                   train_config=ocp.args.JsonRestore()))
        return dict(r["model_config"]), dict(r["train_config"])

    def restore(self, step: int, *, abstract_state: TrainState, abstract_params: Params, abstract_context,
                abstract_resnet=None, data_iterator=None):
        """Restore onto the shardings the abstract trees carry (any mesh). Returns
        (state, full params, context, resnet, data_iterator restored or None)."""
        target = {"params": abstract_params, "context": abstract_context}
        if abstract_resnet is not None:
            target["resnet"] = abstract_resnet
        items = dict(state=ocp.args.StandardRestore(target),
                     train_state=ocp.args.StandardRestore(abstract_state.as_dict()))
        with restoring(self.directory / str(step), "the model weights and train state"):
            r = self.manager.restore(step, args=ocp.args.Composite(**items))
        restored_iter = None
        if data_iterator is not None:
            import grain.checkpoint
            try:
                r_data = self.manager.restore(step, args=ocp.args.Composite(
                    data=grain.checkpoint.CheckpointRestore(data_iterator)))
                restored_iter = r_data["data"]
            except Exception as e:  # e.g. a different number of processes than at save time
                log.warning("could not restore the data iterator of step %d (%s); the input pipeline "
                            "starts a fresh order", step, e)
        st = r["state"]
        return (TrainState.from_dict(r["train_state"]), st["params"], st["context"], st.get("resnet"),
                restored_iter)

    def set_aside(self, step: int) -> Path:
        """Moves an unrestorable step out of the manager's folder (to <directory>_unrestorable/<step>),
        so that nothing is deleted and training can save that step number again."""
        aside = self.directory.with_name(self.directory.name + "_unrestorable") / str(step)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                aside = aside.with_name(f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"diad_jax.train: set aside step {step}")
        self.manager.reload()
        return aside

    def wait(self):
        self.manager.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self):
        self.manager.close()
        if self.best is not None:
            self.best.close()


# ---- metrics output ----------------------------------------------------------------------------
class MetricWriter:
    """Scalars to <workdir>/metrics.jsonl and TensorBoard event files (<workdir>/tensorboard);
    only process 0 writes."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        if self.active:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")
            if tensorboard:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        if not self.active:
            return
        rec = {"step": int(step), "kind": kind, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{kind}/{k}", float(v), int(step))

    def flush(self):
        if self.jsonl is not None:
            self.jsonl.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike, kind: str = "train") -> list[dict]:
    """The records of one kind from a metrics.jsonl file, in file order."""
    out = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == kind:
                out.append(rec)
    return out


# ---- evaluation --------------------------------------------------------------------------------
def evaluates(cfg: TrainConfig, task_name: str = "diad") -> bool:
    """Whether the run evaluates at all (a split, and a schedule: every N steps and/or at the end)."""
    return bool(cfg.eval_split) and bool(cfg.eval_every or cfg.eval_at_end) and task_name == "diad"


def check_eval_resnet(cfg: TrainConfig, has_resnet: bool) -> None:
    """An evaluating run needs ResNet-50 weights (from --init-checkpoint) or the explicit opt-in to a
    random one; nothing random is substituted silently."""
    if evaluates(cfg) and cfg.eval_comparator == "resnet" and not has_resnet and cfg.eval_resnet != "random":
        where = (f"--init-checkpoint {cfg.init_checkpoint} has" if cfg.init_checkpoint
                 else "a run without --init-checkpoint has")
        raise ConfigError(f"{where} no ResNet-50 weights for the evaluation: convert them into the checkpoint "
                          f"(convert/torch_to_flax.py --resnet), opt in to a randomly initialised ResNet-50 "
                          f"with --eval-resnet random (maps then compare random features), compare without it "
                          f"(--eval-comparator {NO_WEIGHTS_COMPARATOR}), or --eval-split none")


def selection_value(results: dict, best_metric: str) -> float:
    """Sum of the named mean metrics ("p_auroc+i_auroc" = the reference's val_acc)."""
    return float(sum(results["mean"][m.strip()] for m in best_metric.split("+")))


# ---- the loop ----------------------------------------------------------------------------------
def check_batch(cfg: TrainConfig, mesh: Mesh, evaluates: bool) -> None:
    """The global batch sizes split evenly over the mesh's devices and the processes."""
    n_dev, n_proc = shd.batch_size_multiple(mesh), jax.process_count()
    if cfg.batch_size % n_dev:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of the {n_dev} devices of the mesh "
                          f"({shd.describe_mesh(mesh)})")
    if cfg.batch_size % n_proc:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of the {n_proc} processes")
    if evaluates and cfg.eval_batch_size % n_dev:
        raise ConfigError(f"--eval-batch-size {cfg.eval_batch_size} must be a multiple of the {n_dev} devices")


# TrainConfig fields that shape the train state: a checkpoint restores only into a run that agrees.
def _state_layout(tc: dict) -> dict:
    return {"--ema-decay (on/off)": tc.get("ema_decay") is not None,
            "--grad-accum (1 or more)": (tc.get("grad_accum") or 1) > 1,
            "--trainable": tc.get("trainable", "reference")}


def check_resume_compatible(saved: dict, cfg: TrainConfig, where: str) -> None:
    """Refuses to resume from a checkpoint whose train state has another layout than this run's
    (EMA added or removed, gradient accumulation switched on or off, another trainable subset)
    and says which flag; a changed value that keeps the layout (e.g. another EMA decay) is logged."""
    if not saved:
        return
    old, new = _state_layout(saved), _state_layout(cfg.to_dict())
    diff = [f"{k}: checkpoint {old[k]}, this run {new[k]}" for k in old if old[k] != new[k]]
    if diff:
        raise ConfigError(f"{where} was saved by a run with another train-state layout ({'; '.join(diff)}); "
                          f"resume with the checkpoint's settings (see its train_config item) or use a new --workdir")
    for key in ("ema_decay", "learning_rate", "grad_accum", "batch_size", "weight_decay"):
        if key in saved and saved[key] != getattr(cfg, key):
            log.warning("resuming %s with %s = %s (the checkpoint's run used %s)", where, key, getattr(cfg, key),
                        saved[key])


@dataclasses.dataclass
class StepInfo:
    """What `Trainer.run` reports after each logging interval."""

    step: int
    metrics: dict[str, float]       # mean over the interval
    images_per_s: float
    per_step_loss: list[tuple[int, float]]


class Trainer:
    """The training loop (scripts/train.py is a thin CLI around it).

        trainer = Trainer(TrainConfig.tiny(workdir="runs/x"))
        trainer.run()            # resumes from runs/x/checkpoints if there is a checkpoint
        trainer.close()
    """

    def __init__(self, cfg: TrainConfig, mesh: Mesh | None = None, task: Task | None = None,
                 overwrite_data: bool = False):
        self.cfg = cfg
        self.task = task or diad_task(cfg)
        self.mesh = mesh or shd.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
        log.info("mesh: %s", shd.describe_mesh(self.mesh))
        check_batch(cfg, self.mesh, self._evaluates())
        self.workdir = Path(cfg.workdir).absolute()
        self._load_model_source()
        dtype = DTYPES[cfg.compute_dtype]
        self.model = DiAD(self.model_config, dtype=dtype, remat=cfg.remat)
        self.factory = StepFactory(self.model, cfg, self.mesh, task=self.task)
        self.dataset = self._prepare_data(overwrite_data)
        self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=cfg.keep, async_save=cfg.async_checkpoint,
                                         best_directory=(self.workdir / "best") if self._evaluates() else None)
        self.writer = MetricWriter(self.workdir)
        self.best_value = -math.inf
        self._detector = None
        self._eval_dataset = None
        self._restore_or_init()

    # ---- setup ---------------------------------------------------------------------------------
    def _load_model_source(self):
        cfg = self.cfg
        self.resnet_host = None
        if cfg.init_checkpoint:
            from diad_jax.checkpoints import load_model
            ckpt = load_model(cfg.init_checkpoint)
            config = ckpt.config
            self.init_params_host, self.context_host = ckpt.params, np.asarray(ckpt.context, np.float32)
            self.resnet_host = ckpt.resnet
            log.info("initialising from %s (context and%s ResNet from the checkpoint)", cfg.init_checkpoint,
                     "" if ckpt.resnet is not None else " NO")
        else:
            config = ModelConfig.from_spec(cfg.model)
            self.init_params_host = None
            from diad_jax.checkpoints import default_context
            self.context_host = default_context(config)
            log.warning("no --init-checkpoint: %s model with the reference's random initialisation (SG network "
                        "copied from the UNet encoder) and a zero context in place of CLIP(\"\")", cfg.model)
        if cfg.only_mid_control is not None:
            config = dataclasses.replace(config, only_mid_control=cfg.only_mid_control)
        self.model_config = config
        if self.task.name == "diad":
            check_eval_resnet(cfg, self.resnet_host is not None)
        if self.resnet_host is None and self._evaluates() and cfg.eval_comparator == "resnet":
            log.warning("evaluation uses a RANDOM ResNet-50 (--eval-resnet random): anomaly maps compare random "
                        "features")

    def _data_dir(self) -> str:
        return self.cfg.data_dir or default_data_dir()

    def _prepare_data(self, overwrite: bool):
        from diad_jax import data as data_lib
        cfg = self.cfg
        kw = dict(manual_dir=cfg.manual_dir, classes=cfg.classes, image_size=self.model_config.image_size,
                  skip_bad=cfg.skip_bad, **cfg.dataset_options)
        if jax.process_index() == 0:
            ds = data_lib.prepare(cfg.dataset, self._data_dir(), overwrite=overwrite, **kw)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("diad_jax.train: dataset prepared")
        if jax.process_index() != 0:  # shared data_dir: loads; host-local: prepares its own copy
            ds = data_lib.prepare(cfg.dataset, self._data_dir(), **kw)
        n = len(ds.indices(cfg.train_split, cfg.classes))
        log.info("dataset %s at %s: %d %s images of %d classes; %d steps per epoch", cfg.dataset, ds.path, n,
                 cfg.train_split, len(ds.class_names), n // cfg.batch_size)
        return ds

    def _make_iterator(self):
        from diad_jax import data as data_lib
        cfg = self.cfg
        n_proc = jax.process_count()
        ds = data_lib.train_dataset(self.dataset, cfg.batch_size // n_proc, split=cfg.train_split,
                                    classes=cfg.classes, image_size=self.model_config.image_size,
                                    seed=cfg.seed, shard_index=jax.process_index(), shard_count=n_proc)
        return iter(ds)

    def _model_meta(self) -> dict:
        """The model items' metadata: also how the run scores the model (its eval config, and the
        opt-in to a random ResNet-50), so that `diad_jax.load` of a checkpoint scores it the same way."""
        extra = {}
        if self.task.name == "diad":
            extra["eval_config"] = self.cfg.eval_config().to_dict()
            if self.resnet_host is None and self.cfg.eval_resnet == "random" and self.cfg.eval_comparator == "resnet":
                extra["resnet"] = "random"
        return model_metadata(self.model_config, self.resnet_host is not None, source="diad_jax.train",
                              init_checkpoint=self.cfg.init_checkpoint, **extra)

    def _evaluates(self) -> bool:
        return evaluates(self.cfg, self.task.name)

    def _abstract_full(self):
        f = self.factory
        params = shd.with_shardings(f.abstract_full, f.full_shardings())
        c = self.model_config
        ctx = jax.ShapeDtypeStruct((1, c.context_len, c.unet.context_dim), jnp.float32,
                                   sharding=shd.replicated(self.mesh))
        return params, ctx

    def _restore_or_init(self):
        cfg, f = self.cfg, self.factory
        self.iterator = self._make_iterator()
        steps = sorted(self.checkpointer.all_steps(), reverse=True)
        if steps and not cfg.resume:
            raise CheckpointError(f"{self.checkpointer.directory} holds checkpoints (latest step {steps[0]}) but "
                                  f"--no-resume was given; use another --workdir")
        failed: list[tuple[int, CheckpointError]] = []
        for step in steps:  # newest first; a checkpoint that does not restore is set aside
            try:
                self._restore(step)
                break
            except CheckpointError as e:
                failed.append((step, e))
        else:
            if failed:
                raise CheckpointError(f"none of the checkpoints in {self.checkpointer.directory} restores:\n"
                                      + "\n".join(f"  step {s}: {e}" for s, e in failed))
        for step, e in failed:
            aside = self.checkpointer.set_aside(step)
            log.warning("%s\n  -> moved to %s; resumed from the newest checkpoint that restores (step %d)", e, aside,
                        self.step)
        if not steps:
            if self.init_params_host is None:
                t0 = time.perf_counter()
                params = self.model.init(seed=cfg.seed)
                log.info("initialised %s params in %.1fs", cfg.model, time.perf_counter() - t0)
            else:
                params = self.init_params_host
            trainable, self.frozen = f.split(params)
            others = {g: v for g, v in params.items() if g not in self.task.groups}
            self.others = shd.place(others, {g: f.full_shardings()[g] for g in others})
            self.state = f.init_state(trainable)
            self.context = f.place_context(self.context_host)
        self.init_params_host = None  # free the host copy
        n_train = sum(x.size for x in jax.tree.leaves(self.state.params))
        n_frozen = sum(x.size for x in jax.tree.leaves(self.frozen))
        log.info("params: %.2fM trainable, %.2fM frozen; trainable + optimizer state: %s",
                 n_train / 1e6, n_frozen / 1e6, shd.shard_summary((self.state.params, self.state.opt_state)))

    def _restore(self, step: int) -> None:
        """Restores the train state, params, context, ResNet and data iterator of `step`."""
        f, where = self.factory, f"{self.checkpointer.directory}/{step}"
        meta, tmeta = self.checkpointer.restore_meta(step)
        saved_cfg = ModelConfig.from_dict(meta["model_config"])
        if saved_cfg != self.model_config:
            raise ConfigError(f"{where}: the checkpoint's model config differs from this run's ({saved_cfg} vs "
                              f"{self.model_config}); use its --model/--init-checkpoint or a new --workdir")
        check_resume_compatible(tmeta.get("train_config", {}), self.cfg, where)
        abstract_resnet = None
        if meta.get("has_resnet"):
            from diad_jax.models.resnet import resnet_abstract_params
            rep = shd.replicated(self.mesh)
            abstract_resnet = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                           resnet_abstract_params())
        a_params, a_ctx = self._abstract_full()
        state, params, ctx, resnet, it = self.checkpointer.restore(
            step, abstract_state=f.abstract_state_with_shardings(), abstract_params=a_params,
            abstract_context=a_ctx, abstract_resnet=abstract_resnet, data_iterator=self.iterator)
        _, frozen = f.split(params)
        self.others = {g: v for g, v in params.items() if g not in self.task.groups}
        self.state, self.frozen, self.context = state, frozen, ctx
        if resnet is not None:
            self.resnet_host = resnet
        if it is not None:
            self.iterator = it
        best = tmeta.get("best_value")
        self.best_value = -math.inf if best is None else float(best)
        log.info("resumed from %s (step %d)", where, int(state.step))

    # ---- checkpoint / eval ---------------------------------------------------------------------
    def save(self, step: int, metrics: dict | None = None):
        tc = {"train_config": self.cfg.to_dict(), "step": step, "metrics": metrics or {},
              "best_value": self.best_value if math.isfinite(self.best_value) else None}
        self.checkpointer.save(step, state=self.state, frozen=self._model_frozen(), context=self.context,
                               resnet=self._resnet_for_save(), model_meta=self._model_meta(),
                               data_iterator=self.iterator, train_config=tc)

    def _resnet_for_save(self):
        if self.resnet_host is None:
            return None
        if not hasattr(self, "_resnet_placed"):
            self._resnet_placed = shd.place(self.resnet_host, jax.tree.map(lambda _: shd.replicated(self.mesh),
                                                                           self.resnet_host))
        return self._resnet_placed

    def eval_params(self) -> Params:
        """The params evaluation uses: the EMA of the trainable params when on, else the params."""
        trainable = self.state.ema if self.state.ema is not None else self.state.params
        return combine(trainable, self._model_frozen())

    def _model_frozen(self) -> Params:
        """Every model param that is not trained, for checkpoints (the task's extras left out)."""
        frozen = {g: v for g, v in self.frozen.items() if g not in self.task.extra_frozen}
        return {**frozen, **self.others}

    def evaluate(self) -> dict | None:
        """Scores the evaluation split with the current (EMA) weights -> the metrics per class and mean."""
        cfg = self.cfg
        if not self._evaluates():
            return None
        from diad_jax.detector import Detector
        from diad_jax.evaluation import evaluate
        from diad_jax.scoring import make_bundle, random_resnet
        if self._detector is None:
            resnet = None  # other comparators need none
            if cfg.eval_comparator == "resnet":
                resnet = self._resnet_for_save()
                if resnet is None:  # --eval-resnet random (checked in __init__)
                    host = random_resnet(0)
                    resnet = shd.place(host, jax.tree.map(lambda _: shd.replicated(self.mesh), host))
            if cfg.eval_data_dir:
                from diad_jax import data as data_lib
                self._eval_dataset = data_lib.load_from_directory(cfg.eval_data_dir)
            else:
                self._eval_dataset = self.dataset
            where = cfg.eval_data_dir or "the training dataset"
            if cfg.eval_split == "test" and not cfg.eval_data_dir:
                log.warning("evaluation and best-checkpoint selection use the TEST split (as the reference "
                            "does); numbers of the selected checkpoint are optimistic. Use --eval-split/"
                            "--eval-data-dir for a separate validation set or --eval-split none")
            log.info("evaluating on split %r of %s; best checkpoint by %s", cfg.eval_split, where, cfg.best_metric)
            self._eval_resnet = resnet
        # the weights as they are placed for training (fsdp-sharded or replicated): nothing is gathered
        bundle = make_bundle(self.eval_params(), self._eval_resnet, self.context)
        if self._detector is None:
            self._detector = Detector(self.model_config, bundle, eval_config=cfg.eval_config(), mesh=self.mesh,
                                      source=str(self.workdir))
        else:  # the same compiled programs, the new weights
            self._detector.bundle = bundle
        t0 = time.perf_counter()
        result = evaluate(self._detector, self._eval_dataset, split=cfg.eval_split, classes=cfg.classes,
                          progress=False)
        log.info("evaluation (%s split, %.1fs):\n%s", cfg.eval_split, time.perf_counter() - t0, result.table)
        return result.metrics

    def _after_eval(self, step: int, results: dict):
        cfg = self.cfg
        value = selection_value(results, cfg.best_metric)
        scalars = {f"{m}": v for m, v in results["mean"].items()}
        scalars["val"] = value
        self.writer.write(step, scalars, kind=f"eval_{cfg.eval_split}")
        self.writer.flush()
        if value > self.best_value:
            log.info("step %d: new best %s = %.4f (was %.4f); saving to %s", step, cfg.best_metric, value,
                     self.best_value, self.checkpointer.best.directory if self.checkpointer.best else None)
            self.best_value = value
            self.checkpointer.save_best(step, value, params=self.eval_params(), context=self.context,
                                        resnet=self._resnet_for_save(), model_meta=self._model_meta(),
                                        metrics=results["mean"])

    # ---- run -----------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def run(self, on_log: Callable[[StepInfo], None] | None = None,
            on_step: Callable[[int], None] | None = None, kill_at_step: int | None = None) -> dict:
        """Train until `cfg.steps`. Saves every `save_every` steps and at the end (also on
        KeyboardInterrupt, unless that step is saved already); evaluates every `eval_every` steps
        and/or at the end. Stops with NonFiniteError at the first step whose loss or gradient norm
        is not finite, before any checkpoint of it is written.
        Returns {"step", "loss" (last interval's mean), "eval": last eval results or None}."""
        cfg, f = self.cfg, self.factory
        step = self.step
        if step >= cfg.steps:
            log.info("already at step %d >= steps=%d; nothing to do", step, cfg.steps)
        pending: list[tuple[int, dict]] = []
        last_eval, last_loss, saved_step = None, float("nan"), None
        t_last, imgs = time.perf_counter(), 0
        try:
            while step < cfg.steps:
                if kill_at_step is not None and step == kill_at_step:  # testing: die like a preempted job
                    import signal
                    self.checkpointer.wait()  # so that the test knows which checkpoint it resumes from
                    log.warning("killing this process at step %d (kill_at_step)", step)
                    os.kill(os.getpid(), signal.SIGKILL)
                batch = next(self.iterator)
                gb = shd.shard_batch({"image": batch["image"], "index": batch["index"]}, self.mesh)
                self.state, metrics = f.step(self.state, self.frozen, self.context, gb)
                step += 1
                imgs += cfg.batch_size
                pending.append((step, metrics))
                if on_step is not None:
                    on_step(step)
                do_eval = self._evaluates() and ((cfg.eval_every and step % cfg.eval_every == 0)
                                                 or (cfg.eval_at_end and step == cfg.steps))
                do_save = step % cfg.save_every == 0 or step == cfg.steps
                # the metrics are fetched (a device sync) at log intervals, and before an evaluation
                # or a save, so that a non-finite loss never reaches a checkpoint
                if step % cfg.log_every == 0 or do_eval or do_save:
                    info = self._log(pending, imgs / (time.perf_counter() - t_last))
                    last_loss = info.metrics["loss"]
                    if on_log is not None:
                        on_log(info)
                    pending, t_last, imgs = [], time.perf_counter(), 0
                if do_eval:
                    last_eval = self.evaluate()
                    self._after_eval(step, last_eval)
                    t_last, imgs = time.perf_counter(), 0
                if do_save:
                    self.save(step, {"loss": last_loss})
                    saved_step = step
        except KeyboardInterrupt:
            self.checkpointer.wait()  # a save in flight finishes first: never write the same step twice
            if step != saved_step and step not in self.checkpointer.all_steps():
                log.warning("interrupted at step %d: saving a checkpoint before exiting", step)
                try:
                    self.save(step, {"loss": last_loss})
                    self.checkpointer.wait()
                except Exception as e:  # e.g. the interrupt cut a save of this step short
                    log.error("could not save step %d (%s); the newest checkpoint is step %s", step, e,
                              max(self.checkpointer.all_steps(), default=None))
            else:
                log.warning("interrupted at step %d, which is saved in %s", step, self.checkpointer.directory)
            raise
        self.checkpointer.wait()
        return {"step": step, "loss": last_loss, "eval": last_eval}

    def _log(self, pending: list[tuple[int, dict]], images_per_s: float) -> StepInfo:
        """Fetches the pending steps' metrics, writes them, and stops at the first non-finite one."""
        host = jax.device_get([m for _, m in pending])
        for (s, _), h in zip(pending, host):
            self.writer.write(s, {k: float(v) for k, v in h.items()})
        self.writer.flush()
        for (s, _), h in zip(pending, host):
            bad = {k: float(h[k]) for k in ("loss", "grad_norm") if k in h and not np.isfinite(h[k])}
            if bad:
                self.checkpointer.wait()
                saved = self.checkpointer.all_steps()
                last = (f"the last good checkpoint is {self.checkpointer.directory}/{max(saved)} (kept; "
                        f"a rerun resumes from it)") if saved else "no checkpoint was saved before it"
                raise NonFiniteError(
                    f"training stopped at step {s}: {', '.join(f'{k} = {v}' for k, v in bad.items())}; {last}. "
                    f"Lower --lr, check the data, or start from another checkpoint")
        mean = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
        info = StepInfo(pending[-1][0], mean, images_per_s, [(s, float(h["loss"])) for (s, _), h in zip(pending, host)])
        self.writer.write(info.step, {"images_per_s": images_per_s}, kind="perf")
        self.writer.flush()
        return info

    def close(self):
        self.checkpointer.wait()
        self.checkpointer.close()
        self.writer.close()
