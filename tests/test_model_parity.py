"""Parity of the Flax DiAD against independent PyTorch references (diffusers 0.39 models loaded
through diffusers' own ldm converters, plus the SFF written in torch from the spec), with the
same random weights everywhere (zero-initialised layers included). fp32."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from diad_jax.configs import ModelConfig
from diad_jax.convert.ldm import ldm_to_params
from diad_jax.models.diad import DiAD

from tests import oracle
from tests.conftest import CONFIGS

# Max abs error allowed, relative to the largest reference magnitude of that output.
# Measured: ~1e-6 (tiny) -- float32 reassociation only.
REL_TOL = 2e-5


@functools.lru_cache(maxsize=None)
def setup(name: str):
    cfg = CONFIGS[name]()
    sd = oracle.random_ldm_state_dict(cfg, seed=0)
    model = DiAD(cfg)
    params, _ = ldm_to_params(sd, model.abstract_params())
    params = jax.tree.map(jnp.asarray, params)
    return cfg, sd, model, params


def inputs(cfg: ModelConfig, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    lat, img = cfg.latent_size, cfg.image_size
    return dict(
        x=rng.standard_normal((batch, cfg.latent_channels, lat, lat), dtype=np.float32),
        hint=rng.standard_normal((batch, cfg.hint_channels, img, img), dtype=np.float32),
        ctx=rng.standard_normal((batch, cfg.context_len, cfg.unet.context_dim), dtype=np.float32),
        t=np.array([999, 1, 500, 250][:batch], dtype=np.int64),
    )


def assert_close(name, ours, ref, rel_tol=REL_TOL):
    err, scale = oracle.max_err(ours, ref)
    print(f"{name}: max abs err {err:.3e} (ref max {scale:.3g}, rel {err / max(scale, 1e-12):.2e})")
    assert err <= rel_tol * max(scale, 1.0), f"{name}: max abs err {err} > {rel_tol} x {scale}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sg_network_matches_controlnet_plus_sff(name):
    cfg, sd, model, params = setup(name)
    d = inputs(cfg)
    ref = oracle.torch_sg_outputs(oracle.diffusers_controlnet(cfg, sd), sd, cfg,
                                  d["x"], d["t"], d["ctx"], d["hint"])
    ours = jax.jit(model.control)(params, d["x"], d["t"], d["ctx"], d["hint"])
    assert len(ours) == len(ref) == cfg.unet.num_skips + 1
    if name == "sd_structured":
        assert len(ours) == 13 and cfg.sff_sources() == (6, 7, 8) and cfg.sff_targets() == (9, 10, 11)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(f"[{name}] SG residual {i}", a, b)


@pytest.mark.parametrize("only_mid_control", [True, False])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_controlled_unet_matches_diffusers(name, only_mid_control):
    cfg, sd, model, params = setup(name)
    d = inputs(cfg)
    # Random residuals of the SG output shapes, independent of our SG network.
    shapes = [c.shape for c in jax.eval_shape(model.control, params, d["x"], d["t"], d["ctx"], d["hint"])]
    rng = np.random.default_rng(7)
    control = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    unet = oracle.diffusers_unet(cfg, sd)
    ref = oracle.torch_controlled_unet(unet, cfg, d["x"], d["t"], d["ctx"], control, only_mid_control)
    ours = jax.jit(model.unet_eps, static_argnames="only_mid_control")(
        params, d["x"], d["t"], d["ctx"], control, only_mid_control=only_mid_control)
    assert_close(f"[{name}] controlled UNet only_mid_control={only_mid_control}", ours, ref)
    # The residuals must matter: without them the output differs.
    bare = jax.jit(model.unet_eps)(params, d["x"], d["t"], d["ctx"], None)
    assert oracle.max_err(bare, ref)[0] > 1e-3


@pytest.mark.parametrize("only_mid_control", [True, False])
def test_eps_prediction_matches_reference_chain(only_mid_control):
    cfg, sd, model, params = setup("sd_structured")
    d = inputs(cfg)
    ctrl = oracle.torch_sg_outputs(oracle.diffusers_controlnet(cfg, sd), sd, cfg,
                                   d["x"], d["t"], d["ctx"], d["hint"])
    ref = oracle.torch_controlled_unet(oracle.diffusers_unet(cfg, sd), cfg, d["x"], d["t"], d["ctx"],
                                       ctrl, only_mid_control)
    ours = jax.jit(model.eps, static_argnames="only_mid_control")(
        params, d["x"], d["t"], d["ctx"], d["hint"], only_mid_control=only_mid_control)
    assert_close(f"eps only_mid_control={only_mid_control}", ours, ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_vae_matches_diffusers(name):
    cfg, sd, model, params = setup(name)
    vae = oracle.diffusers_vae(cfg, sd)
    d = inputs(cfg)
    dist = vae.encode(torch.from_numpy(d["hint"])).latent_dist
    mean, logvar = jax.jit(model.encode_moments)(params, d["hint"])
    assert_close(f"[{name}] VAE posterior mean", mean, dist.mean)
    assert_close(f"[{name}] VAE posterior logvar", logvar, dist.logvar)
    z = np.random.default_rng(3).standard_normal(mean.shape, dtype=np.float32)
    ref = vae.decode(torch.from_numpy(z)).sample
    ours = jax.jit(model.decode)(params, z * cfg.scale_factor)
    assert_close(f"[{name}] VAE decode", ours, ref)


@pytest.mark.slow
@pytest.mark.xdist_group("sd_size")
def test_sd15_sg_network_and_controlled_unet_parity():
    """SD-size (the reference's sizes), 32x32 latent, batch 1: SG residuals and eps."""
    cfg = ModelConfig.sd15()
    sd = oracle.random_ldm_state_dict(cfg, seed=0, groups=("unet", "sg"))
    model = DiAD(cfg)
    abstract = model.abstract_params()
    params, _ = ldm_to_params(sd, abstract, groups=("unet", "sg"))
    flat = traverse_util.flatten_dict(params)
    for k in list(flat):  # move leaf by leaf so host copies are freed as we go
        flat[k] = jnp.asarray(flat[k])
    params = traverse_util.unflatten_dict(flat)
    d = inputs(cfg, batch=1)
    controlnet = oracle.diffusers_controlnet(cfg, sd)
    ctrl = oracle.torch_sg_outputs(controlnet, sd, cfg, d["x"], d["t"], d["ctx"], d["hint"])
    del controlnet
    ref = oracle.torch_controlled_unet(oracle.diffusers_unet(cfg, sd), cfg, d["x"], d["t"], d["ctx"],
                                       ctrl, True)

    @jax.jit
    def run(params, x, t, ctx, hint):
        return model.control(params, x, t, ctx, hint), model.eps(params, x, t, ctx, hint)

    ours_ctrl, ours_eps = run(params, d["x"], d["t"], d["ctx"], d["hint"])
    assert len(ours_ctrl) == 13
    for i, (a, b) in enumerate(zip(ours_ctrl, ctrl)):
        assert_close(f"[sd15] SG residual {i}", a, b, rel_tol=1e-4)
    assert_close("[sd15] eps (only_mid_control=True)", ours_eps, ref, rel_tol=1e-4)
