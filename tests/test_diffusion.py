"""The ldm schedule and the reference's DDIM, against NumPy/torch transcriptions of the spec."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diad_jax.configs import DiffusionConfig
from diad_jax.diffusion import (
    alphas_cumprod, ddim_invert, ddim_plan, ddim_sample, ddim_step, guided_eps, inversion_timesteps, q_sample,
)

from tests.torch_reference import ReferenceSchedule


def spec_acp():
    """Spec section 1: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 (float64)."""
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000) ** 2
    return np.cumprod(1 - betas)


def test_official_schedule_visits_901_to_1_after_noising_to_999():
    plan = ddim_plan(DiffusionConfig())
    acp = spec_acp().astype(np.float32)
    assert plan.noise_t == 999
    np.testing.assert_array_equal(plan.timesteps, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    # spec 6.3: step at ts[i] uses a_t = acp[ts[i]], a_prev = acp[ts[i-1]] and acp[0] for the step at 1
    np.testing.assert_array_equal(plan.a_t, acp[[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]])
    np.testing.assert_array_equal(plan.a_prev, acp[[801, 701, 601, 501, 401, 301, 201, 101, 1, 0]])
    np.testing.assert_array_equal(plan.sigma, np.zeros(10, np.float32))
    # and what ddim.py's own buffers hold
    ref = ReferenceSchedule()
    np.testing.assert_array_equal(DiffusionConfig().timesteps()[::-1], ref.ddim_timesteps)
    np.testing.assert_array_equal(plan.a_t[::-1], ref.ddim_alphas.numpy())
    np.testing.assert_array_equal(plan.a_prev[::-1], ref.ddim_alphas_prev.numpy())


def test_consistent_schedule_noises_to_the_first_ddim_step():
    plan = ddim_plan(DiffusionConfig(schedule="consistent"))
    assert plan.noise_t == 901 and plan.timesteps[0] == 901
    with pytest.raises(ValueError, match="schedule must be"):
        DiffusionConfig(schedule="other")


@pytest.mark.parametrize("steps, start_t, timesteps", [
    (3, 999, [999, 500, 1]),          # 3 steps: impossible with ldm's spacing (its third step is t=1000)
    (5, 300, [300, 225, 150, 76, 1]),  # (300 - 1) / 4 = 74.75 apart, rounded
    (1, 500, [500]),
])
def test_start_t_plans_match_hand_computed_steps(steps, start_t, timesteps):
    cfg = DiffusionConfig(schedule="consistent", ddim_steps=steps, start_t=start_t)
    plan = ddim_plan(cfg)
    acp = spec_acp().astype(np.float32)
    assert plan.noise_t == start_t  # the latent is noised to the first step's timestep
    np.testing.assert_array_equal(plan.timesteps, timesteps)
    np.testing.assert_array_equal(plan.a_t, acp[timesteps])
    np.testing.assert_array_equal(plan.a_prev, acp[timesteps[1:] + [0]])  # ldm: the last step goes to acp[0]
    # start_t at ldm's first timestep is the consistent schedule exactly
    same = ddim_plan(DiffusionConfig(schedule="consistent", start_t=901))
    default = ddim_plan(DiffusionConfig(schedule="consistent"))
    for field in ("noise_t", "timesteps", "a_t", "a_prev", "sigma"):
        np.testing.assert_array_equal(getattr(same, field), getattr(default, field))


def test_step_counts_and_start_t_are_checked():
    with pytest.raises(ValueError, match=r"ddim_steps=3: .*ending at timestep 1000.*start_t"):
        DiffusionConfig(ddim_steps=3)
    for steps in range(1, 51):  # any step count with a start_t
        assert len(ddim_plan(DiffusionConfig(schedule="consistent", start_t=999, ddim_steps=steps)).timesteps) == steps
    with pytest.raises(ValueError, match="start_t=700 noises the latent .* set schedule=consistent"):
        DiffusionConfig(start_t=700)
    with pytest.raises(ValueError, match="start_t must be an integer timestep in 1..999, got 1000"):
        DiffusionConfig(schedule="consistent", start_t=1000)
    with pytest.raises(ValueError, match="ddim_steps=6 is more than the 5 timesteps"):
        DiffusionConfig(schedule="consistent", start_t=5, ddim_steps=6)
    with pytest.raises(ValueError, match="one_step .* ddim_steps must be 1, got 2"):
        DiffusionConfig(schedule="consistent", start_t=500, ddim_steps=2, one_step=True)


def test_one_step_reconstruction_is_the_single_steps_pred_x0():
    cfg = DiffusionConfig(schedule="consistent", start_t=500, ddim_steps=1, one_step=True)
    x_T = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 8, 8), dtype=np.float32))
    plan = ddim_plan(cfg)
    ours = jax.jit(lambda x: ddim_sample(cfg, toy_eps, x))(x_T)
    x_prev, pred_x0 = jax.jit(lambda x: ddim_step(x, toy_eps(x, jnp.full((2,), 500)), plan.a_t[0], plan.a_prev[0],
                                                  0.0))(x_T)
    # the same float32 formula; separately compiled programs may round the last bits differently (also of
    # values that cancel to near zero: an absolute tolerance at the rounding level of the largest value)
    rounding = 1e-6 * float(np.abs(np.asarray(pred_x0)).max())
    np.testing.assert_allclose(np.asarray(ours), np.asarray(pred_x0), rtol=1e-6, atol=rounding)
    # S=1 DDIM without one_step returns ldm's step to acp[0] instead
    np.testing.assert_allclose(np.asarray(ddim_sample(dataclasses.replace(cfg, one_step=False), toy_eps, x_T)),
                               np.asarray(x_prev), rtol=1e-6, atol=1e-6 * float(np.abs(np.asarray(x_prev)).max()))
    assert np.abs(np.asarray(x_prev - pred_x0)).max() > 1e-3


def test_eta_sigmas_match_ddim_formula():
    plan = ddim_plan(DiffusionConfig(ddim_eta=0.5))
    ref = ReferenceSchedule(ddim_eta=0.5)
    np.testing.assert_allclose(plan.sigma[::-1], ref.ddim_sigmas.numpy(), rtol=1e-6)
    assert np.all(plan.sigma > 0)


def test_q_sample_matches_ldm_buffers():
    cfg = DiffusionConfig()
    rng = np.random.default_rng(0)
    z0 = rng.standard_normal((3, 4, 8, 8), dtype=np.float32)
    n = rng.standard_normal((3, 4, 8, 8), dtype=np.float32)
    ref = ReferenceSchedule()
    for t in (0, 500, 999):
        ours = q_sample(cfg, z0, t, n)
        np.testing.assert_array_equal(np.asarray(ours), ref.q_sample(torch.tensor(z0), t, torch.tensor(n)).numpy())
    np.testing.assert_allclose(alphas_cumprod(cfg), spec_acp(), rtol=1e-12)


def test_one_step_equals_closed_form():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8))
    eps = rng.standard_normal((2, 4, 8, 8))
    a_t, a_prev = 0.3, 0.6
    pred_x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    expected = np.sqrt(a_prev) * pred_x0 + np.sqrt(1 - a_prev) * eps
    ours, ours_x0 = ddim_step(jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32), a_t, a_prev, 0.0)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_x0), pred_x0, rtol=1e-5, atol=1e-5)


def toy_eps(x, t):
    return 0.3 * jnp.tanh(x) + (t.astype(jnp.float32) / 1000.0)[:, None, None, None]


def test_scan_equals_the_reference_loop():
    cfg = DiffusionConfig()
    x_T = np.random.default_rng(2).standard_normal((2, 4, 8, 8), dtype=np.float32)
    ours = jax.jit(lambda x: ddim_sample(cfg, toy_eps, x))(x_T)
    ref = ReferenceSchedule()
    img = torch.tensor(x_T)
    steps = np.flip(ref.ddim_timesteps)
    for i, step in enumerate(steps):
        index = len(steps) - i - 1
        e = torch.tensor(np.asarray(toy_eps(jnp.asarray(img.numpy()), jnp.full((2,), int(step)))))
        a_t, a_prev = ref.ddim_alphas[index], ref.ddim_alphas_prev[index]
        pred_x0 = (img - ref.ddim_sqrt_one_minus_alphas[index] * e) / a_t.sqrt()
        img = a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e
    np.testing.assert_allclose(np.asarray(ours), img.numpy(), rtol=1e-5, atol=1e-5)


def test_eta_positive_adds_per_example_seeded_noise():
    cfg = DiffusionConfig(ddim_eta=1.0)
    x_T = jnp.ones((2, 4, 8, 8))
    keys = jax.random.split(jax.random.key(0), 2)
    a = ddim_sample(cfg, toy_eps, x_T, keys)
    b = ddim_sample(cfg, toy_eps, x_T, keys)
    c = ddim_sample(cfg, toy_eps, x_T, jax.random.split(jax.random.key(1), 2))
    d = ddim_sample(DiffusionConfig(), toy_eps, x_T)
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a - c)).max() > 1e-2 and np.abs(np.asarray(a - d)).max() > 1e-2
    # an example's noise comes from its own key only: alone it samples the same
    np.testing.assert_allclose(ddim_sample(cfg, toy_eps, x_T[1:], keys[1:]), a[1:], rtol=1e-6)
    assert np.abs(np.asarray(a[0] - a[1])).max() > 1e-2
    with pytest.raises(ValueError, match="needs an rng"):
        ddim_sample(cfg, toy_eps, x_T)


def test_guidance_dedupe_equals_two_pass():
    def eps_ctx(x, t, ctx):
        return jnp.tanh(x) * ctx.mean(axis=(1, 2))[:, None, None, None] + 1e-3 * t[:, None, None, None]
    x = jax.random.normal(jax.random.key(0), (3, 4, 8, 8))
    t = jnp.full((3,), 501)
    ctx = jax.random.normal(jax.random.key(1), (1, 7, 16))
    single = guided_eps(eps_ctx, x, t, ctx, None, 9.0)
    two_pass = guided_eps(eps_ctx, x, t, ctx, ctx, 9.0)
    np.testing.assert_allclose(np.asarray(single), np.asarray(two_pass), atol=1e-5)
    other = guided_eps(eps_ctx, x, t, ctx, ctx + 1.0, 9.0)
    assert np.abs(np.asarray(other - single)).max() > 1e-2  # a different uncond context does matter


def test_inversion_visits_evenly_spaced_timesteps_and_steps_as_computed_by_hand():
    """DDIM inversion (issue 25): step k evaluates eps at the current latent and t_k and moves from
    acp[t_(k-1)] (acp[0] for the clean latent) to acp[t_k]; checked in float64 by hand on tiny arrays."""
    assert inversion_timesteps(999, 3) == [333, 666, 999]  # InvAD's default
    assert inversion_timesteps(999, 1) == [999] and inversion_timesteps(10, 4) == [2, 5, 8, 10]
    cfg = DiffusionConfig()
    acp = spec_acp()
    z0 = np.random.default_rng(0).standard_normal((2, 3, 2, 2))

    def eps_fn(x, t):  # any function of the latent and the timestep
        return 0.3 * x + (t.astype(x.dtype) / 1000)[:, None, None, None]

    x = z0
    for t_from, t_to in ((0, 400), (400, 900)):
        e = 0.3 * x + t_to / 1000
        x0 = (x - np.sqrt(1 - acp[t_from]) * e) / np.sqrt(acp[t_from])
        x = np.sqrt(acp[t_to]) * x0 + np.sqrt(1 - acp[t_to]) * e
    out = ddim_invert(cfg, eps_fn, jnp.asarray(z0, jnp.float32), [400, 900])
    np.testing.assert_allclose(np.asarray(out), x, rtol=1e-5, atol=1e-5)
    one = ddim_invert(cfg, eps_fn, jnp.asarray(z0, jnp.float32), [400])
    e = 0.3 * z0 + 0.4
    np.testing.assert_allclose(np.asarray(one), np.sqrt(acp[400]) * (z0 - np.sqrt(1 - acp[0]) * e) / np.sqrt(acp[0])
                               + np.sqrt(1 - acp[400]) * e, rtol=1e-5, atol=1e-5)
    for bad in ([0, 5], [5, 5], [7, 3], [1000], []):
        with pytest.raises(ValueError, match="ascend within 1..999"):
            ddim_invert(cfg, eps_fn, jnp.asarray(z0, jnp.float32), bad)


@pytest.mark.parametrize("steps, tolerance", [(10, 0.07), (100, 0.005)])
def test_inverting_then_sampling_back_returns_the_latent_up_to_the_inversion_error(steps, tolerance):
    """With the exact denoiser of Gaussian latents (z0 ~ N(0, v I): eps(x_t) = sqrt(1 - a) x_t / (a v + 1 - a)),
    the probability-flow ODE maps z0 to N(0, I) and back; DDIM inversion and sampling are its two
    first-order discretisations, so the round trip returns z0 up to an error that shrinks as 1/steps.
    Measured (relative L2 error): 0.33 at 3 steps, 0.067 at 10, 0.018 at 30, 0.0048 at 100. (A
    randomly initialised UNet is no denoiser: its round trip misses by 13x the latent's norm at 100
    steps; the trained demo models' round trip is in benchmarks/RESULTS.md, "Inversion".)"""
    cfg, v = DiffusionConfig(), 0.64
    acp = alphas_cumprod(cfg)
    acp32 = jnp.asarray(acp, jnp.float32)

    def eps_fn(x, t):
        a = acp32[t][:, None, None, None]
        return jnp.sqrt(1 - a) * x / (a * v + 1 - a)

    z0 = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4, 8, 8)) * np.sqrt(v), jnp.float32)
    ts = inversion_timesteps(999, steps)
    x_T = ddim_invert(cfg, eps_fn, z0, ts)
    x = x_T
    for t, t_prev in zip(ts[::-1], [*ts[::-1][1:], 0]):  # the sampler's steps through the same timesteps
        x, _ = ddim_step(x, eps_fn(x, jnp.full((4,), t)), np.float32(acp[t]), np.float32(acp[t_prev]), 0.0)
    err = float(jnp.linalg.norm(x - z0) / jnp.linalg.norm(z0))
    print(f"{steps} steps: relative round-trip error {err:.4f}, inverted latent std {float(x_T.std()):.3f}")
    assert err <= tolerance
    assert abs(float(x_T.std()) - 1) < 0.1  # the inverted latent is (close to) standard normal
