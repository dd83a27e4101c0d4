"""What a training run optimises: the `Task` plug-in, DiAD's loss and task, the optimiser."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diad_jax.configs import DiffusionConfig, OptimizerConfig, TrainConfig
from diad_jax.diffusion import example_keys, q_sample
from diad_jax.models.diad import TRAINABLE_MASKS, DiAD, combine

Params = dict[str, Any]


def learning_rate(cfg: OptimizerConfig, total_steps: int) -> float | Callable[[jax.Array], jax.Array]:
    """The learning rate of update `s` (counted from 0): `cfg.learning_rate` (the reference's constant),
    or a schedule when `cfg.scheduled`: lr * min(1, (s + 1) / warmup_steps), times, for "cosine", a
    half cosine from 1 at the end of the warmup to end_learning_rate / lr at update `total_steps`."""
    if not cfg.scheduled:
        return cfg.learning_rate
    lr, warmup, end = cfg.learning_rate, cfg.warmup_steps, cfg.end_learning_rate

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (s + 1.0) / warmup) if warmup else 1.0
        if cfg.schedule == "constant":
            return lr * warm
        progress = jnp.clip((s - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
        return warm * (end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))

    return schedule


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW as torch.optim.AdamW(lr, betas, eps, weight_decay), at `learning_rate(cfg, total_steps)`,
    after clipping the gradient to the global norm cfg.max_grad_norm when set. One update per call:
    gradient accumulation happens inside the train step (StepFactory), not in the optimizer.
    optax decays every leaf it is given, while torch's AdamW skips parameters that got no gradient
    (README, "Differences from the reference")."""
    opt = optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay)
    if cfg.max_grad_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
    return opt


def diffusion_loss(model: DiAD, diffusion: DiffusionConfig, trainable: Params, frozen: Params, context,
                   images, index, key, t_max: int | None = None, moments=None):
    """The reference's training loss (ldm DDPM p_losses, eps-parameterisation, l2, logvar 0):

        z   = scale_factor * (mean + std * n),  n ~ N(0, I)   (VAE posterior SAMPLE, no gradient)
        t   ~ U{0, ..., T-1} (T = t_max when given),  eps ~ N(0, I),  x_t = q_sample(z, t, eps)
        loss = mean((eps - eps_theta(x_t, t, context, hint=images))^2)

    `images` (B, 3, H, W) normalised are both the VAE input and the hint; `context` (1, L, D) is
    broadcast; `index` (B,) int keys each example's noise (see `example_keys`). Per-example keys
    make a step give the same result on any mesh and any number of hosts. `moments` (B, 2, C, h, w):
    the images' posterior (mean, logvar) when cached (train/latents.py), instead of encoding them."""
    params = combine(trainable, frozen)
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(key, index))
    if moments is None:
        mean, logvar = model.encode_moments(params, images)  # float32, logvar clipped to [-30, 20] as in ldm
    else:
        mean, logvar = moments[:, 0], moments[:, 1]
    post_noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(keys[:, 0])
    std = jnp.exp(0.5 * logvar)
    z = jax.lax.stop_gradient(model.config.scale_factor * (mean + std * post_noise))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, t_max or diffusion.num_train_timesteps))(keys[:, 1])
    eps = jax.vmap(lambda k: jax.random.normal(k, z.shape[1:], jnp.float32))(keys[:, 2])
    x_t = q_sample(diffusion, z, t, eps)
    pred = model.eps(params, x_t, t, context, images)
    return jnp.mean(jnp.square(pred - eps))


@dataclasses.dataclass(frozen=True)
class Task:
    """What a training run optimises: which param groups the step sees, which of them train
    (`mask_fn(params) -> bool tree`), the loss `loss_fn(model, trainable, frozen, context, batch, key)
    -> (loss, {name: scalar})` (means over the batch: the train step averages them over its
    micro-batches) and the optimiser (`make_optimizer(cfg.optimizer, cfg.steps)`). `diad_task(cfg)`
    is DiAD's; diad_jax/autoencoder.py defines the VAE fine-tuning one."""

    name: str
    groups: tuple[str, ...]
    mask_fn: Callable[[Params], Any]
    loss_fn: Callable[..., Any]
    optimizer: optax.GradientTransformation
    # Extra frozen inputs of the loss that are not model params (e.g. {"lpips": params}): placed
    # with the partition rules, passed in `frozen`, never checkpointed.
    extra_frozen: dict = dataclasses.field(default_factory=dict)
    # Whether the run's validation (denoise-and-score, TrainConfig.validation) applies: the trained
    # model is an anomaly detector.
    detects_anomalies: bool = False


def diad_task(cfg: TrainConfig) -> Task:
    """DiAD's task: the parameters cfg.trainable names (the reference: SG network + UNet decoder)
    trained with `diffusion_loss` on cfg.diffusion's schedule at the noise levels t < cfg.train_t_max
    (the reference: all 1000)."""

    def loss(model, trainable, frozen, context, batch, key):
        return diffusion_loss(model, cfg.diffusion, trainable, frozen, context, batch["image"], batch["index"], key,
                              t_max=cfg.train_t_max, moments=batch.get("moments")), {}

    return Task("diad", ("unet", "sg", "vae"), TRAINABLE_MASKS[cfg.trainable], loss,
                make_optimizer(cfg.optimizer, cfg.steps), detects_anomalies=True)
