"""Fine-tuning the KL autoencoder (VAE) on the dataset, as the reference's finetune_autoencoder.py
(ldm AutoencoderKL.training_step with LPIPSWithDiscriminator, spec section 5).

Per batch of normalised images x (the same inputs DiAD trains on):

    posterior = VAE.encode(x);  z = posterior SAMPLE;  x_hat = VAE.decode(z)
    rec       = |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)   (LPIPS broadcast over C, H, W)
    loss      = sum(rec) / B + kl_weight * sum(KL(posterior || N(0, I))) / B

with logvar fixed at 0 (learn_logvar=False), kl_weight 1e-6, Adam(0.5, 0.9), lr 4.5e-5 x batch 4.
The patch discriminator only starts at step `disc_start` = 50001 (its factor is 0 before), and the
reference trains about 25k steps, so it never contributes: it is not implemented here, and a run
whose `steps` reach `disc_start` is refused. LPIPS needs two local weight files (VGG16 and the
LPIPS linear layers, see models/lpips.py); without them the loss is L1 + KL only (the documented
fallback), which a warning states.

Only the VAE's params are trained (all of them: encoder, decoder, quant convs); the training loop,
sharding and checkpoints are diad_jax.train's, so a fine-tuning checkpoint is a full model
checkpoint (UNet/SG params carried through unchanged) usable as `--init-checkpoint` for training.
"""
from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diad_jax import data as data_lib
from diad_jax.configs import (AutoencoderConfig, CheckpointConfig, DataConfig, OptimizerConfig, TrainConfig,
                              ValidationConfig)
from diad_jax.convert.torch_io import read_state_dict
from diad_jax.diffusion import example_keys
from diad_jax.errors import ConfigError
from diad_jax.models.diad import combine, to_nchw, to_nhwc
from diad_jax.models.lpips import LPIPS, lpips_abstract_params, lpips_params_from_state_dicts
from diad_jax.models.sd import AutoencoderKL
from diad_jax.train import Task, make_optimizer

log = logging.getLogger(__name__)


def autoencoder_loss(model, trainable, frozen, context, batch, key, *, kl_weight: float = 1e-6,
                     perceptual_weight: float = 1.0):
    """The reference's generator loss before the discriminator starts (see the module docstring).
    `frozen` may hold "lpips" params (then the perceptual term is on)."""
    del context
    params = combine(trainable, {k: v for k, v in frozen.items() if k != "lpips"})
    x = batch["image"]
    mean, logvar = model.encode_moments(params, x)
    noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(example_keys(key, batch["index"]))
    z = mean + jnp.exp(0.5 * logvar) * noise
    x_hat = to_nchw(model.vae.apply({"params": params["vae"]}, to_nhwc(z), method=AutoencoderKL.decode))
    x_hat = x_hat.astype(jnp.float32)
    b = x.shape[0]
    l1 = jnp.abs(x - x_hat)
    rec_sum = jnp.sum(l1)
    aux = {"l1": jnp.mean(l1)}
    if "lpips" in frozen:
        p = LPIPS().apply({"params": frozen["lpips"]}, to_nhwc(x), to_nhwc(x_hat))  # (B,)
        rec_sum = rec_sum + perceptual_weight * jnp.sum(p) * (x[0].size)
        aux["lpips"] = jnp.mean(p)
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar) / b
    nll = rec_sum / b
    aux.update(kl=kl, nll=nll)
    return nll + kl_weight * kl, aux


def check_config(cfg: TrainConfig) -> None:
    """Refuses a run the implemented loss does not cover (the discriminator's phase), and settings
    that do not apply (rematerialisation: UNet and SG blocks only; cached latents: a frozen VAE)."""
    if cfg.cache_latents:
        raise ConfigError("{0} is for training DiAD on a frozen VAE; fine-tuning trains the VAE itself",
                          fields=["cache_latents"])
    if cfg.remat != "none":
        raise ConfigError(f"{{0}} = {cfg.remat!r} does nothing when fine-tuning the autoencoder (it "
                          f"rematerialises UNet and SG network blocks); leave it at 'none'", fields=["remat"])
    if cfg.steps >= cfg.autoencoder.disc_start:
        raise ConfigError(f"{{0}} {cfg.steps} reaches {{1}} {cfg.autoencoder.disc_start}: the patch "
                          f"discriminator would engage, and it is not implemented (the reference's never does in its "
                          f"~25k steps)", fields=["steps", "autoencoder.disc_start"])


def load_lpips_params(vgg16_path: str | Path, lin_path: str | Path) -> dict:
    """LPIPS params from two local files: torchvision's VGG16 state dict and LPIPS's linear layers
    for VGG (see models/lpips.py); nothing downloads."""
    params = lpips_params_from_state_dicts(read_state_dict(vgg16_path), read_state_dict(lin_path))
    want = jax.tree.map(lambda x: x.shape, lpips_abstract_params())
    got = jax.tree.map(lambda x: x.shape, params)
    if want != got:
        raise ValueError(f"LPIPS weights from {vgg16_path} / {lin_path} have unexpected shapes")
    return params


def autoencoder_task(cfg: TrainConfig, lpips_params: dict | None = None) -> Task:
    """The VAE fine-tuning task for diad_jax.train.Trainer: cfg.autoencoder's loss, cfg.optimizer."""
    check_config(cfg)
    ae = cfg.autoencoder
    if lpips_params is None:
        log.warning("no LPIPS weights given (autoencoder.lpips_vgg16 and .lpips_lin): fine-tuning with L1 + %g KL only "
                    "(the reference adds LPIPS with weight %g)", ae.kl_weight, ae.perceptual_weight)

    def loss(model, trainable, frozen, context, batch, key):
        return autoencoder_loss(model, trainable, frozen, context, batch, key, kl_weight=ae.kl_weight,
                                perceptual_weight=ae.perceptual_weight)

    extra = {"lpips": lpips_params} if lpips_params is not None else {}
    return Task("autoencoder", ("vae",), lambda p: jax.tree.map(lambda _: True, p), loss,
                make_optimizer(cfg.optimizer, cfg.steps), extra_frozen=extra)


def latent_std(model, params, dataset, *, n_images: int | None = None, batch_size: int = 16, seed: int = 0,
               split: str = "train") -> float:
    """Standard deviation of VAE posterior samples (unscaled) over the first `n_images` training
    images: ldm's `scale_by_std` sets `scale_factor = 1 / latent_std` so that the diffusion model
    sees unit-variance latents. SD's VAE has the fixed 0.18215 for this; a VAE trained from scratch
    (the demo's) needs it measured. `n_images=None`: the whole split."""

    @jax.jit
    def sample(vae_params, x, key):
        mean, logvar = model.encode_moments({"vae": vae_params}, x)
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)

    ds = data_lib.eval_dataset(dataset, batch_size, split=split, image_size=model.config.image_size,
                               shard_index=0, shard_count=1)
    total, total_sq, count = 0.0, 0.0, 0
    key = jax.random.PRNGKey(seed)
    for i, batch in enumerate(ds):
        v = np.asarray(batch["valid"], bool)
        z = np.asarray(sample(params["vae"], jnp.asarray(batch["image"]), jax.random.fold_in(key, i)), np.float64)[v]
        total, total_sq, count = total + z.sum(), total_sq + np.square(z).sum(), count + z.size
        if n_images is not None and count >= n_images * np.prod(z.shape[1:]):
            break
    if count == 0:
        raise ValueError(f"latent_std: the {split!r} split of {dataset.path} is empty")
    mean = total / count
    return float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))


def reference_config(**changes) -> TrainConfig:
    """finetune_autoencoder.py's settings: batch 4 x accumulation 8 (32 per update), Adam(0.5, 0.9),
    lr 4.5e-5 x 4, no weight decay, fp32, about 25k updates, no evaluation. `changes` as TrainConfig.replace takes them."""
    base = TrainConfig(model="sd15", steps=25_000, workdir="runs/autoencoder", data=DataConfig(batch_size=32),
                       optimizer=OptimizerConfig(learning_rate=4.5e-5 * 4, b1=0.5, b2=0.9, weight_decay=0.0,
                                                 grad_accum=8),
                       checkpoint=CheckpointConfig(save_every=1000), validation=ValidationConfig(split=None),
                       autoencoder=AutoencoderConfig())
    return base.replace(**changes)


def tiny_config(**changes) -> TrainConfig:
    """The embedded default: tiny model, generated data, a few minutes on CPU."""
    base = TrainConfig.tiny(workdir="runs/autoencoder_tiny", validation=ValidationConfig(split=None),
                            optimizer=OptimizerConfig(learning_rate=1e-4, b1=0.5, b2=0.9, weight_decay=0.0,
                                                      grad_accum=1))
    return base.replace(**changes)


__all__ = ["autoencoder_loss", "autoencoder_task", "check_config", "latent_std", "reference_config", "tiny_config"]
