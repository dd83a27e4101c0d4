"""The train state and the jitted, sharded train step.

Parameters are split by the task's trainable mask (DiAD: SG network + UNet decoder, as the reference
trains): only the trainable part is in the train state and the optimizer; the frozen part (UNet
encoder and middle block, VAE) is a separate, non-donated argument of the step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diad_jax import sharding as shd
from diad_jax.configs import TrainConfig
from diad_jax.errors import ConfigError
from diad_jax.models.diad import DiAD, partition
from diad_jax.train.perf import model_flops
from diad_jax.train.task import Task, diad_task, learning_rate

Params = dict[str, Any]
HOST_MEMORY = "pinned_host"  # the memory kind offloaded optimizer state lives in between steps


@struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: optimizer updates done
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

    One step is one optimizer update on the whole batch, computed as cfg.optimizer.grad_accum
    micro-batches scanned inside the step (gradients summed in the scan's carry, then averaged): the
    memory of one micro-batch's activations, no accumulator in the train state. `task` picks the
    param groups, trainable subset, loss and optimiser (default: DiAD's)."""

    model: DiAD
    cfg: TrainConfig
    mesh: Mesh
    task: Task | None = None  # None: diad_task(cfg)

    def __post_init__(self):
        if self.task is None:
            self.task = diad_task(self.cfg)
        self.optimizer = self.task.optimizer
        self.learning_rate = learning_rate(self.cfg.optimizer, self.cfg.steps)  # what the optimizer applies
        ema_decay = self.cfg.optimizer.ema_decay
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
            lambda p: init_train_state(self.optimizer, p, 0, ema_decay is not None), a_train)
        rep = shd.replicated(self.mesh)
        # where the update reads the optimizer state; between steps it lives in host memory when offloaded
        self.opt_state_device_shardings = shd.opt_state_shardings(self.optimizer, self.abstract_state.opt_state,
                                                                  self.trainable_shardings, self.mesh)
        opt_state_shardings = self.opt_state_device_shardings
        if self.cfg.optimizer.offload_state:
            device = self.mesh.local_devices[0]
            if HOST_MEMORY not in {m.kind for m in device.addressable_memories()}:
                raise ConfigError(f"{{0}}: {device.platform} devices have no {HOST_MEMORY} memory to keep the "
                                  f"optimizer state in", fields=["optimizer.offload_state"])
            opt_state_shardings = jax.tree.map(lambda s: s.with_memory_kind(HOST_MEMORY), opt_state_shardings)
        self.state_shardings = TrainState(
            step=rep, params=self.trainable_shardings, opt_state=opt_state_shardings,
            ema=self.trainable_shardings if ema_decay is not None else None, rng=rep)
        self.batch_shardings = {"image": shd.batch_sharding(self.mesh, 4), "index": shd.batch_sharding(self.mesh, 1)}
        if self.cfg.cache_latents:  # the images' posterior (mean, logvar): train/latents.py
            self.batch_shardings["moments"] = shd.batch_sharding(self.mesh, 5)
        self.jitted_step = jax.jit(self._step, in_shardings=(self.state_shardings, self.frozen_shardings, rep,
                                                             self.batch_shardings),
                                   out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
        self.step = self.jitted_step  # what the loop calls (a test may wrap it; lowering uses jitted_step)

    def param_shardings(self, tree):
        return shd.param_shardings(tree, self.mesh, min_shard_size=self.cfg.mesh.min_shard_size)

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
        seed, ema = self.cfg.seed, self.cfg.optimizer.ema_decay is not None
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
        grad_fn = jax.value_and_grad(
            lambda p, b: self.task.loss_fn(self.model, p, frozen, context, b, key), has_aux=True)
        k = self.cfg.optimizer.grad_accum
        if k == 1:
            (loss, aux), grads = grad_fn(state.params, batch)
        else:
            def accumulate(total, micro):
                (loss, aux), grads = grad_fn(state.params, micro)
                grads = jax.lax.with_sharding_constraint(grads, self.trainable_shardings)
                return jax.tree.map(jnp.add, total, (loss, aux, grads)), None

            micro = self.micro_batches(batch)
            (loss, aux), grads = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
                grad_fn, state.params, jax.tree.map(lambda x: x[0], micro)))
            grads = jax.lax.with_sharding_constraint(grads, self.trainable_shardings)
            (loss, aux, grads), _ = jax.lax.scan(accumulate, (loss, aux, grads), micro)
            loss, aux, grads = jax.tree.map(lambda x: x / k, (loss, aux, grads))
        opt_state = state.opt_state
        if self.cfg.optimizer.offload_state:  # to device memory for the update (the output goes back to the host)
            opt_state = jax.device_put(opt_state, self.opt_state_device_shardings)
        updates, opt_state = self.optimizer.update(grads, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = self.cfg.optimizer.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        lr = self.learning_rate(state.step) if callable(self.learning_rate) else self.learning_rate
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "learning_rate": jnp.float32(lr), **aux}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    def micro_batches(self, batch: dict) -> dict:
        """The global batch (B, ...) as grad_accum micro-batches (K, B/K, ...) without moving data
        between devices: micro-batch k holds examples k, K + k, 2K + k, ... so each device's
        contiguous block of the batch splits into K local pieces."""
        k = self.cfg.optimizer.grad_accum

        def split(x):
            x = jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)
            spec = shd.batch_sharding(self.mesh, x.ndim - 1).spec
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(None, *spec)))

        return jax.tree.map(split, batch)

    def abstract_inputs(self, batch_size: int):
        """(frozen, context, batch) of the step as ShapeDtypeStructs with their shardings."""
        c = self.model.config
        frozen = shd.with_shardings(self.abstract_frozen, self.frozen_shardings)
        ctx = jax.ShapeDtypeStruct((1, c.context_len, c.unet.context_dim), jnp.float32,
                                   sharding=shd.replicated(self.mesh))
        batch = {"image": jax.ShapeDtypeStruct((batch_size, 3, c.image_size, c.image_size), jnp.float32,
                                               sharding=self.batch_shardings["image"]),
                 "index": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=self.batch_shardings["index"])}
        if self.cfg.cache_latents:
            batch["moments"] = jax.ShapeDtypeStruct((batch_size, 2, c.vae.embed_dim, c.latent_size, c.latent_size),
                                                    jnp.float32, sharding=self.batch_shardings["moments"])
        return frozen, ctx, batch

    def trace(self, batch_size: int) -> jax.stages.Traced:
        """Trace the step on abstract inputs (no arrays materialised); `.lower()` it for
        memory_analysis(), `model_flops(traced.jaxpr)` for its FLOPs."""
        return self.jitted_step.trace(self.abstract_state_with_shardings(), *self.abstract_inputs(batch_size))

    def flops_per_step(self, state: TrainState, frozen, context, batch_size: int) -> float:
        """FLOPs of one update on a global batch of `batch_size`, all devices and micro-batches: the
        matrix work in the step's jaxpr (train/perf.py's model_flops), traced on the run's own
        arguments and an abstract batch (once the step has run on such arguments, jit's trace cache
        answers and nothing is traced again)."""
        _, _, batch = self.abstract_inputs(batch_size)
        return model_flops(self.jitted_step.trace(state, frozen, context, batch).jaxpr)
