"""The ldm noise schedule, q_sample and the DDIM sampler DiAD uses at test time (spec section 6).

The reference's test path (sgn.py `log_images_test` -> ldm `DDIMSampler.sample`) noises the latent
to t=999, then runs 10 DDIM steps at timesteps 901, 801, ..., 1 with the pairs
(a_t, a_prev) = (acp[ts[i]], acp[ts[i-1]]) and acp[0] for the last step: the "official" schedule.
The "consistent" schedule noises to the first DDIM timestep (901) instead. `DiffusionConfig.start_t`
and `one_step` start the sampler lower and stop it after one step (see DiffusionConfig).

Precision follows ldm: the schedule is built in float64 (betas = linspace(sqrt(b0), sqrt(b1))^2,
alphas_cumprod = cumprod(1 - betas)); q_sample uses float32(sqrt(acp)) as ldm's buffers do; DDIM
uses float32(acp) and takes square roots in float32 at run time, as ddim.py does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diad_jax.configs import DiffusionConfig


def betas_linear(cfg: DiffusionConfig) -> np.ndarray:
    return np.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.num_train_timesteps,
                       dtype=np.float64) ** 2


def alphas_cumprod(cfg: DiffusionConfig) -> np.ndarray:
    """float64 cumulative product of (1 - beta), as ldm's register_schedule computes it."""
    return np.cumprod(1.0 - betas_linear(cfg))


@dataclass(frozen=True)
class DDIMPlan:
    """The visited steps in order, with everything each step needs (float32 like the reference)."""

    noise_t: int            # q_sample level of the starting latent
    timesteps: np.ndarray   # model timestep per step (descending)
    a_t: np.ndarray
    a_prev: np.ndarray
    sigma: np.ndarray


def ddim_plan(cfg: DiffusionConfig) -> DDIMPlan:
    acp = alphas_cumprod(cfg)
    ts = np.asarray(cfg.timesteps(), np.int64)  # descending: ddim.py walks the flipped timesteps
    alphas = acp[ts].astype(np.float32)
    # ddim.py: a step's a_prev is the next visited timestep's, the last step's acp[0] (through float32 buffers)
    alphas_prev = np.concatenate([acp[ts[1:]], [acp[0]]]).astype(np.float32)
    a64, p64 = alphas.astype(np.float64), alphas_prev.astype(np.float64)
    sigmas = (cfg.ddim_eta * np.sqrt((1 - p64) / (1 - a64) * (1 - a64 / p64))).astype(np.float32)
    return DDIMPlan(cfg.noise_t, ts, alphas, alphas_prev, sigmas)


def example_keys(key, index):
    """One independent key per example: fold_in(key, index[i]) for the (B,) int dataset or image
    indices `index`, so an example's noise does not depend on its batch, mesh or host. Training,
    scoring and the autoencoder fine-tuning draw their per-example noise from these keys."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index.astype(jnp.uint32))


def q_sample(cfg: DiffusionConfig, z0, t, noise):
    """x_t = sqrt(acp_t) z0 + sqrt(1 - acp_t) noise, with ldm's float32 coefficient buffers.
    `t` is an int array of shape (B,) (or a scalar)."""
    acp = alphas_cumprod(cfg)
    sqrt_acp = jnp.asarray(np.sqrt(acp).astype(np.float32))
    sqrt_1m = jnp.asarray(np.sqrt(1.0 - acp).astype(np.float32))
    t = jnp.broadcast_to(jnp.asarray(t), (z0.shape[0],))
    shape = (-1,) + (1,) * (z0.ndim - 1)
    return sqrt_acp[t].reshape(shape) * z0 + sqrt_1m[t].reshape(shape) * noise


def ddim_step(x, eps, a_t, a_prev, sigma, noise=None):
    """One DDIM update (ddim.py p_sample_ddim, eps-parameterisation)."""
    a_t = jnp.asarray(a_t, jnp.float32)
    a_prev = jnp.asarray(a_prev, jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    pred_x0 = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
    dir_xt = jnp.sqrt(1.0 - a_prev - sigma ** 2) * eps
    x_prev = jnp.sqrt(a_prev) * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


EpsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_t, t of shape (B,)) -> eps


def guided_eps(eps_fn_ctx: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], x, t, context,
               uncond_context=None, scale: float = 9.0):
    """Classifier-free guidance as the reference computes it: ONE batched pass over
    [uncond; cond], eps = eps_u + scale * (eps_c - eps_u).

    `uncond_context=None` means "identical to `context`" (the reference case: both are CLIP("")):
    then eps_u == eps_c, guidance is the identity, and the duplicate half is skipped."""
    if uncond_context is None or scale == 1.0:
        return eps_fn_ctx(x, t, context)
    b = x.shape[0]
    ctx = jnp.broadcast_to(context, (b,) + context.shape[1:])
    uctx = jnp.broadcast_to(uncond_context, (b,) + uncond_context.shape[1:])
    both = eps_fn_ctx(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([uctx, ctx]))
    eps_u, eps_c = both[:b], both[b:]
    return eps_u + scale * (eps_c - eps_u)


def ddim_sample(cfg: DiffusionConfig, eps_fn: EpsFn, x_T, rng=None):
    """Run the planned DDIM steps from x_T as one `lax.scan` and return the denoised latent (with
    `cfg.one_step`: the single step's pred_x0). `eps_fn(x, t)` predicts the noise (guidance
    included). eta > 0 needs `rng`: one key per example, shape (B,), so that an example's step
    noise does not depend on the rest of its batch."""
    plan = ddim_plan(cfg)
    if cfg.ddim_eta > 0 and rng is None:
        raise ValueError("ddim_sample: ddim_eta > 0 needs an rng for the step noise")
    b = x_T.shape[0]
    n = len(plan.timesteps)
    xs = (jnp.asarray(plan.timesteps, jnp.int32), jnp.asarray(plan.a_t), jnp.asarray(plan.a_prev),
          jnp.asarray(plan.sigma))
    # (steps, B) keys: step s of example i uses split(rng[i], steps)[s]
    keys = jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, n))(rng), 0, 1) if rng is not None else None

    def step(x, inp):
        (t, a_t, a_prev, sigma), key = inp
        eps = eps_fn(x, jnp.full((b,), t, jnp.int32))
        noise = None
        if key is not None:
            noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], x.dtype))(key)
        x_prev, pred_x0 = ddim_step(x, eps.astype(x.dtype), a_t, a_prev, sigma, noise)
        return x_prev, (pred_x0 if cfg.one_step else None)

    x, pred_x0 = jax.lax.scan(step, x_T, (xs, keys))
    return pred_x0[-1] if cfg.one_step else x


def inversion_timesteps(end_t: int, steps: int) -> list[int]:
    """The timesteps a DDIM inversion of `steps` steps visits, ascending to `end_t`:
    round(k * end_t / steps) for k = 1..steps (3 steps to 999: 333, 666, 999, InvAD's default)."""
    return [int(round(k * end_t / steps)) for k in range(1, steps + 1)]


def ddim_invert(cfg: DiffusionConfig, eps_fn: EpsFn, z0, timesteps):
    """Deterministic DDIM run backwards (eta 0) from the clean latent `z0` through `timesteps`
    (ascending, in 1..T-1), as one `lax.scan`; returns the latent at the last one.

    The clean latent sits at acp[0], where the sampler's last step ends. Step k evaluates the noise
    at the current latent and the step's target timestep t_k (as diffusers' DDIMInverseScheduler),
    then moves from acp[t_(k-1)] to acp[t_k] with the DDIM update: the sampler's step with its two
    alphas exchanged. Sampling back through the same timesteps returns `z0` up to the inversion's
    approximation eps(x_(k-1), t_k) ~ eps(x_k, t_k)."""
    ts = np.asarray(timesteps, np.int64)
    if ts.ndim != 1 or not len(ts) or ts[0] < 1 or ts[-1] >= cfg.num_train_timesteps or np.any(np.diff(ts) <= 0):
        raise ValueError(f"ddim_invert: timesteps must ascend within 1..{cfg.num_train_timesteps - 1}, got "
                         f"{ts.tolist()}")
    acp = alphas_cumprod(cfg)
    a_next = acp[ts].astype(np.float32)
    a_cur = np.concatenate([[acp[0]], acp[ts[:-1]]]).astype(np.float32)
    b = z0.shape[0]

    def step(x, inp):
        t, a_t, a_to = inp
        eps = eps_fn(x, jnp.full((b,), t, jnp.int32))
        x_next, _ = ddim_step(x, eps.astype(x.dtype), a_t, a_to, 0.0)
        return x_next, None

    x, _ = jax.lax.scan(step, z0, (jnp.asarray(ts, jnp.int32), jnp.asarray(a_cur), jnp.asarray(a_next)))
    return x
