"""Anomaly maps and scores against scipy/torch, the whole denoise-and-score pipeline against a
PyTorch transcription of the reference's test path, determinism and multi-device sharding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from diad_jax.configs import COMPARATORS, DiffusionConfig, ModelConfig
from diad_jax.convert.ldm import ldm_to_params
from diad_jax.convert.pipeline import convert_resnet
from diad_jax.errors import ConfigError
from diad_jax.models.diad import DiAD
from diad_jax.scoring import (
    Scorer, clear_shared_programs, cosine_distance_map, gaussian_blur, image_scores, make_bundle, pooled_max,
    random_resnet, resize_bilinear_align_corners,
)

from tests import oracle
from tests.conftest import MICRO
from tests.torch_reference import TorchDiAD


@pytest.mark.parametrize("shape", [(2, 256, 256), (1, 64, 64), (1, 30, 17)])
def test_blur_equals_scipy_gaussian_filter(shape):
    maps = np.random.default_rng(0).random(shape).astype(np.float32)
    ours = np.asarray(gaussian_blur(jnp.asarray(maps), sigma=5.0))
    for i in range(shape[0]):
        ref = gaussian_filter(maps[i].astype(np.float64), sigma=5)
        np.testing.assert_allclose(ours[i], ref, atol=2e-6)


@pytest.mark.parametrize("src, dst", [((64, 64), (256, 256)), ((16, 16), (256, 256)), ((7, 5), (33, 20)), ((1, 3), (4, 4))])
def test_resize_equals_torch_align_corners(src, dst):
    x = np.random.default_rng(1).standard_normal((2,) + src).astype(np.float32)
    ref = F.interpolate(torch.tensor(x)[:, None], size=dst, mode="bilinear", align_corners=True)[:, 0].numpy()
    ours = np.asarray(resize_bilinear_align_corners(jnp.asarray(x), dst))
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    # jax.image.resize (half-pixel centres) would not match: the trap is real
    if src[0] > 1:
        half = np.asarray(jax.image.resize(jnp.asarray(x), (2,) + dst, "bilinear"))
        assert np.abs(half - ref).max() > 1e-3


def test_pooled_image_score_equals_eight_torch_avg_pools():
    maps = np.random.default_rng(2).random((3, 256, 256)).astype(np.float32)
    t = torch.tensor(maps[:, None])
    for _ in range(8):
        t = F.avg_pool2d(t, 8, stride=1)
    assert t.shape[-1] == 200
    ref = t.reshape(3, -1).max(dim=1).values.numpy()
    np.testing.assert_allclose(np.asarray(pooled_max(jnp.asarray(maps))), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(image_scores(jnp.asarray(maps), "max")), maps.max(axis=(1, 2)))
    with pytest.raises(ValueError, match="'pooled'"):
        image_scores(jnp.asarray(maps), "mean")


def test_cosine_distance_equals_torch():
    a = np.random.default_rng(3).standard_normal((2, 5, 6, 32)).astype(np.float32)
    b = np.random.default_rng(4).standard_normal((2, 5, 6, 32)).astype(np.float32)
    ref = 1 - F.cosine_similarity(torch.tensor(a).permute(0, 3, 1, 2), torch.tensor(b).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(cosine_distance_map(jnp.asarray(a), jnp.asarray(b))), ref, atol=1e-6)


# ---- the whole pipeline -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def tiny_setup():
    cfg = ModelConfig.tiny()
    sd = oracle.random_ldm_state_dict(cfg, seed=0)
    timm = oracle.random_timm_resnet50(seed=0)
    params, _ = ldm_to_params(sd, DiAD(cfg).abstract_params())
    resnet, _ = convert_resnet(timm)
    context = np.random.default_rng(5).standard_normal((1, cfg.context_len, cfg.unet.context_dim)).astype(np.float32)
    bundle = make_bundle(params, resnet, context)
    images = np.random.default_rng(6).standard_normal((2, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    return cfg, sd, timm, bundle, images


def test_denoise_and_score_matches_the_reference_test_path():
    """Both schedules against one torch reference model."""
    cfg, sd, timm, bundle, images = tiny_setup()
    rng = np.random.default_rng(7)
    shape = (2, 4, cfg.latent_size, cfg.latent_size)
    post_noise = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    ref_model = TorchDiAD(cfg, sd, timm)
    for schedule in ("official", "consistent"):
        # the reference: CFG 9 as one batched pass over [uncond; cond] with identical contexts
        ref_recon = ref_model.reconstruct(images, post_noise, noise, bundle["context"], schedule=schedule)
        ref_maps, ref_scores = ref_model.score(images, ref_recon)
        scorer = Scorer(cfg, DiffusionConfig(schedule=schedule))
        out = jax.jit(scorer.score_with_noise)(bundle, images, post_noise, noise)  # deduped guidance
        for name, ours, ref in [("reconstruction", out.reconstructions, ref_recon), ("maps", out.maps, ref_maps),
                                ("image scores", out.scores, ref_scores)]:
            err, scale = oracle.max_err(ours, ref)
            print(f"[{schedule}] {name}: max abs err {err:.2e} (ref max {scale:.3g})")
            assert err <= 1e-4 * max(scale, 1.0), (schedule, name)


def test_scorer_is_deterministic_finite_and_checks_shapes():
    cfg, _, _, bundle, images = tiny_setup()
    scorer = Scorer(cfg)
    a = scorer(bundle, images, jax.random.key(0))
    b = scorer(bundle, images, jax.random.key(0))
    c = scorer(bundle, images, jax.random.key(1))
    assert a.maps.shape == (2, cfg.image_size, cfg.image_size) and a.scores.shape == (2,)
    assert np.all(np.isfinite(np.asarray(a.maps)))
    np.testing.assert_array_equal(a.maps, b.maps)
    assert np.abs(np.asarray(a.maps - c.maps)).max() > 0  # the rng really drives the noise
    with pytest.raises(ValueError, match=r"`images` has shape \(2, 3, 32, 32\)"):
        scorer(bundle, jnp.zeros((2, 3, 32, 32)), jax.random.key(0))
    # Scorers of equal settings share their programs: the second traces and compiles nothing; other settings
    # have their own
    clear_shared_programs()
    first, other = Scorer(cfg), Scorer(cfg, sigma=2.0)
    np.testing.assert_array_equal(first(bundle, images, jax.random.key(0)).maps, a.maps)
    twin = Scorer(cfg)
    np.testing.assert_array_equal(twin(bundle, images, jax.random.key(0)).maps, a.maps)
    assert first.compiled_programs() == twin.compiled_programs() == 1 and other.compiled_programs() == 0


@functools.lru_cache(maxsize=None)
def micro_setup():
    """The micro model (32 px) with random weights, for behaviour that needs no PyTorch oracle
    (sharded scoring is compared with one device in tests/test_detector.py)."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x if np.any(x) else rng.normal(0, 0.02, x.shape).astype(np.float32),
                          jax.device_get(DiAD(MICRO).init(seed=1)))
    context = rng.standard_normal((1, MICRO.context_len, MICRO.unet.context_dim)).astype(np.float32)
    images = rng.standard_normal((2, 3, MICRO.image_size, MICRO.image_size)).astype(np.float32)
    return MICRO, make_bundle(params, random_resnet(0), context), images


FOOTPRINT_32PX = dict(sigma=0.625, pool_window=1)


def test_explicit_two_pass_guidance_equals_dedupe():
    cfg, bundle, images = micro_setup()
    deduped = Scorer(cfg, **FOOTPRINT_32PX)(bundle, images, jax.random.key(3))
    two_pass = Scorer(cfg, dedupe_guidance=False, **FOOTPRINT_32PX)(bundle, images, jax.random.key(3))
    np.testing.assert_allclose(np.asarray(deduped.maps), np.asarray(two_pass.maps), atol=1e-5)
    np.testing.assert_allclose(np.asarray(deduped.scores), np.asarray(two_pass.scores), atol=1e-5)
    other = Scorer(cfg, **FOOTPRINT_32PX)(bundle, images, jax.random.key(3), uncond_context=bundle["context"] * 0)
    assert np.abs(np.asarray(other.maps - deduped.maps)).max() > 1e-4


def test_bf16_scoring_runs_and_tracks_fp32():
    cfg, bundle, images = micro_setup()
    fp32 = Scorer(cfg, **FOOTPRINT_32PX)(bundle, images, jax.random.key(0))
    bf16 = Scorer(cfg, dtype=jnp.bfloat16, **FOOTPRINT_32PX)(bundle, images, jax.random.key(0))
    assert bf16.maps.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(bf16.maps)))
    corr = np.corrcoef(np.asarray(bf16.maps).ravel(), np.asarray(fp32.maps).ravel())[0, 1]
    print(f"bf16 vs fp32 map correlation: {corr:.4f}")
    assert corr > 0.9


@pytest.mark.parametrize("comparator", COMPARATORS)
def test_comparators_are_zero_on_identical_images_and_grow_where_they_differ(comparator):
    cfg, bundle, images = micro_setup()
    scorer = Scorer(cfg, comparator=comparator, **FOOTPRINT_32PX)
    distance = jax.jit(scorer.distance)
    same = np.asarray(distance(bundle, images, images))
    assert same.shape == (2, 32, 32) and np.abs(same).max() < 1e-5
    recon = images.copy()
    recon[:, :, 4:12, 4:12] = -recon[:, :, 4:12, 4:12]  # a defect in the top-left corner
    d = np.asarray(distance(bundle, images, recon))
    inside, far = d[:, 4:12, 4:12].mean(), d[:, 24:, 24:].mean()
    print(f"{comparator}: defect {inside:.4f}, far corner {far:.4f}")
    assert inside > 0.05 and inside > 2 * far
    # the whole program with this comparator: the blurred distance of the input and its reconstruction
    out = scorer(bundle, images, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(out.maps), np.asarray(gaussian_blur(distance(bundle, images,
                                                                                        out.reconstructions),
                                                                               FOOTPRINT_32PX["sigma"])),
                               rtol=1e-5, atol=1e-6)


def test_other_comparators_need_no_resnet():
    cfg, bundle, images = micro_setup()
    no_resnet = {k: v for k, v in bundle.items() if k != "resnet"}
    out = Scorer(cfg, comparator="pixel_l1", **FOOTPRINT_32PX)(no_resnet, images, jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(out.maps)))
    with pytest.raises(ValueError, match="comparator must be one of"):
        Scorer(cfg, comparator="lpips")


def test_a_huge_posterior_logvar_is_clipped_as_in_ldm():
    """A VAE whose logvar is 1e4 (exp(0.5 * logvar) overflows float32, and the sample turns inf) still
    scores finitely: the posterior's logvar is clipped to [-30, 20] (AutoencoderKL.encode) before sampling."""
    cfg, bundle, images = micro_setup()
    quant = bundle["vae"]["quant_conv"]
    bias = np.array(quant["bias"])
    bias[cfg.vae.embed_dim:] = 1e4  # the logvar half of the moments
    huge = {k: v for k, v in bundle.items() if k != "resnet"}
    huge["vae"] = {**bundle["vae"], "quant_conv": {**quant, "bias": bias}}
    _, logvar = jax.jit(DiAD(cfg).encode_moments)(huge, images)
    assert float(jnp.min(logvar)) == float(jnp.max(logvar)) == 20.0
    out = Scorer(cfg, comparator="pixel_l1", **FOOTPRINT_32PX)(huge, images, jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(out.maps))) and np.all(np.isfinite(np.asarray(out.scores)))


def test_inversion_maps_and_scores_come_from_the_inverted_latent():
    """method="inversion" (issue 25): map = blur(upsampled channel norm of the DDIM-inverted latent);
    image score = the map's max (or pooled max), or the latent's NLL under N(0, I); no reconstruction
    and no ResNet. The posterior mean makes it deterministic; a posterior sample follows the key."""
    cfg, bundle, images = micro_setup()
    no_resnet = {k: v for k, v in bundle.items() if k != "resnet"}
    common = dict(method="inversion", inversion_timesteps=(250, 500), **FOOTPRINT_32PX)
    scorer = Scorer(cfg, image_score="max", **common)
    out = scorer(no_resnet, images, jax.random.key(0))
    assert out.reconstructions is None
    x_T = np.asarray(jax.jit(scorer.inverted_latent)(no_resnet, images, None))  # the mean: no noise
    want = gaussian_blur(resize_bilinear_align_corners(np.sqrt((x_T ** 2).sum(1)), (32, 32)), FOOTPRINT_32PX["sigma"])
    np.testing.assert_allclose(np.asarray(out.maps), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.scores), np.asarray(want).max(axis=(1, 2)), rtol=1e-5)
    nll = Scorer(cfg, image_score="nll", **common)(no_resnet, images, jax.random.key(0))
    np.testing.assert_allclose(np.asarray(nll.scores), 0.5 * (x_T ** 2 + np.log(2 * np.pi)).reshape(2, -1).sum(1),
                               rtol=1e-5)
    np.testing.assert_allclose(np.asarray(nll.maps), np.asarray(out.maps), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(scorer(no_resnet, images, jax.random.key(1)).maps), np.asarray(out.maps))
    sample = Scorer(cfg, image_score="max", inversion_latent="sample", **common)
    a, b = sample(no_resnet, images, jax.random.key(0)), sample(no_resnet, images, jax.random.key(1))
    assert np.abs(np.asarray(a.maps - b.maps)).max() > 1e-6 and np.abs(np.asarray(a.maps - out.maps)).max() > 1e-6
    with pytest.raises(ConfigError, match="needs the inversion method"):
        Scorer(cfg, image_score="nll")
