"""The SG network's pluggable parts: the fusion block (ModelConfig.fusion), the zero-initialised
layers the modules declare, and the trainable subsets as path patterns."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from diad_jax import sharding as shd
from diad_jax.configs import ModelConfig, TrainConfig
from diad_jax.convert.ldm import ConversionError, ldm_to_params
from diad_jax.errors import ConfigError
from diad_jax.models.diad import DiAD, TRAINABLE_MASKS, copy_unet_into_sg, mask_from_patterns
from diad_jax.models.layers import ZeroInit
from diad_jax.models.sg_network import SemanticGuidedNetwork, SpatialFeatureFusion
from diad_jax.train import StepFactory

from tests import oracle
from tests.conftest import CONFIGS, MICRO


def _sff_names(cfg: ModelConfig) -> set[str]:
    return {f"down{i + 1}{j + 1}_0" for i in range(len(cfg.sff_sources())) for j in range(len(cfg.sff_targets()))}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sff_params_keep_the_reference_names_and_none_has_none(name):
    cfg = CONFIGS[name]()
    sg = DiAD(cfg).abstract_params()["sg"]
    if name == "sd_structured":  # the reference's geometry: residuals 6, 7, 8 fused into 9, 10, 11
        assert (cfg.sff_sources(), cfg.sff_targets()) == ((6, 7, 8), (9, 10, 11)) and len(_sff_names(cfg)) == 9
    assert {k for k in sg if k.startswith("down")} == _sff_names(cfg)
    ch = cfg.unet.skip_channels()
    for i, s in enumerate(cfg.sff_sources()):
        for j, t in enumerate(cfg.sff_targets()):  # D_ij: a bias-free 3x3 conv, source -> target channels
            leaf = sg[f"down{i + 1}{j + 1}_0"]
            assert set(leaf) == {"kernel"} and leaf["kernel"].shape == (3, 3, ch[s], ch[t])
    none_cfg = dataclasses.replace(cfg, fusion="none")
    none = DiAD(none_cfg).abstract_params()["sg"]
    assert set(none) == set(sg) - _sff_names(cfg)
    assert jax.tree.map(lambda a: a.shape, none) == jax.tree.map(lambda a: a.shape, {k: sg[k] for k in none})
    # the SG network is a constructor argument: here the fusion-free one inside an SFF-config model
    swapped = DiAD(cfg, sg_network=SemanticGuidedNetwork(none_cfg)).abstract_params()
    assert swapped["sg"] == none and set(swapped) == {"unet", "sg", "vae"}


def test_fusion_config_is_validated_and_old_configs_load_as_sff():
    with pytest.raises(ConfigError, match=r"^fusion must be one of \('sff', 'none'\), got 'SFF'"):
        ModelConfig.tiny(fusion="SFF")
    old = ModelConfig.tiny().to_dict()
    del old["fusion"]  # a model_config.json written before the field existed
    assert ModelConfig.from_dict(old).fusion == "sff"
    none = ModelConfig.tiny(fusion="none")
    assert ModelConfig.from_json(none.to_json()) == none


def test_none_passes_the_controlnet_residuals_and_sff_fuses_them():
    """fusion="none": the residuals are the SG network's own (diffusers' ControlNet with the same
    random weights); fusion="sff" = the SFF module applied to them with the down* params."""
    cfg = ModelConfig.tiny()
    sff_model, none_model = DiAD(cfg), DiAD(dataclasses.replace(cfg, fusion="none"))
    sd = oracle.random_ldm_state_dict(cfg, seed=0)  # every weight non-zero, SFF included
    params = jax.tree.map(jnp.asarray, ldm_to_params(sd, sff_model.abstract_params())[0])
    sff_params = {k: v for k, v in params["sg"].items() if k in _sff_names(cfg)}
    params_none = dict(params, sg={k: v for k, v in params["sg"].items() if k not in sff_params})
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, cfg.latent_size, cfg.latent_size), dtype=np.float32)
    hint = rng.standard_normal((2, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    ctx = rng.standard_normal((2, cfg.context_len, cfg.unet.context_dim), dtype=np.float32)
    t = np.array([999, 250])

    raw = jax.jit(none_model.control)(params_none, x, t, ctx, hint)
    down, mid = oracle.diffusers_controlnet(cfg, sd)(*map(torch.from_numpy, (x, t, ctx, hint)),
                                                     conditioning_scale=1.0, return_dict=False)
    ref = list(down) + [mid]
    assert len(raw) == len(ref) == cfg.unet.num_skips + 1
    for i, (a, b) in enumerate(zip(raw, ref)):
        err, scale = oracle.max_err(a, b)
        assert err <= 2e-5 * max(scale, 1.0), (i, err)

    fused = jax.jit(sff_model.control)(params, x, t, ctx, hint)
    nhwc = [jnp.transpose(r, (0, 2, 3, 1)) for r in raw[:-1]]
    again = SpatialFeatureFusion(cfg.sff_sources(), cfg.sff_targets()).apply({"params": sff_params}, nhwc)
    for i, (a, b) in enumerate(zip(fused[:-1], again)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(jnp.transpose(b, (0, 3, 1, 2))), atol=1e-5,
                                   err_msg=f"residual {i}")
        assert np.array_equal(np.asarray(a), np.asarray(raw[i])) == (i not in cfg.sff_targets()), i
    np.testing.assert_array_equal(np.asarray(fused[-1]), np.asarray(raw[-1]))


def test_converting_sff_weights_into_a_model_without_fusion_reports_them():
    cfg = ModelConfig.tiny()
    sd = oracle.random_ldm_state_dict(cfg, seed=0)
    none_abstract = DiAD(dataclasses.replace(cfg, fusion="none")).abstract_params()
    with pytest.raises(ConversionError) as e:
        ldm_to_params(sd, none_abstract)
    assert e.value.unexpected == sorted(f"control_model.{n[:-2]}.0.weight" for n in _sff_names(cfg))
    assert not e.value.missing and not e.value.mismatched
    params, report = ldm_to_params(sd, none_abstract, allow_unexpected=("control_model.down*",))
    assert len(report.allowed_unexpected) == len(_sff_names(cfg))
    assert not any(k.startswith("down") for k in params["sg"])


def test_zero_init_is_declared_by_the_modules():
    """The zero pattern the host init uses is the one the Flax initialisers declare (ZeroInit boxes);
    the unboxed abstract tree is plain ShapeDtypeStructs."""
    cfg = ModelConfig.tiny()
    model = DiAD(cfg)
    boxed = traverse_util.flatten_dict(model.abstract_params(boxed=True))
    zero = {"/".join(k) for k, v in boxed.items() if isinstance(v, ZeroInit)}
    n_hint = 2 * (2 * len(cfg.hint_block_channels) - 1)
    for group, top in [("sg", "zero_convs_0_0"), ("sg", "middle_block_out_0"), ("sg", f"input_hint_block_{n_hint}"),
                       ("sg", "down11_0"), ("unet", "out_2"), ("unet", "input_blocks_1_0/out_layers_3"),
                       ("sg", "input_blocks_1_0/out_layers_3"), ("unet", "middle_block_1/proj_out")]:
        assert f"{group}/{top}/kernel" in zero, (group, top)
    assert not any(k.startswith("vae/") for k in zero)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(model.abstract_params()))
    params = traverse_util.flatten_dict(model.init(seed=0, sg_from_unet=False))
    for k, v in params.items():
        is_bias_of_norm = k[-1] == "bias" and k[:-1] + ("kernel",) not in params
        assert (not np.any(np.asarray(v))) == ("/".join(k) in zero or is_bias_of_norm), k


def test_trainable_patterns():
    params = DiAD(ModelConfig.tiny()).abstract_params()
    mask = traverse_util.flatten_dict(mask_from_patterns(params, (r"sg/down\d\d_0/.*", r"unet/out_2/kernel")))
    assert {"/".join(k) for k, v in mask.items() if v} == \
        {f"sg/{n}/kernel" for n in _sff_names(ModelConfig.tiny())} | {"unet/out_2/kernel"}
    with pytest.raises(ConfigError, match=r"\['unet/output_block_\.\*'\] match no parameter"):
        mask_from_patterns(params, (r"sg/.*", r"unet/output_block_.*"))
    none = DiAD(ModelConfig.tiny(fusion="none")).abstract_params()
    assert all(jax.tree.leaves(TRAINABLE_MASKS["reference"](none)["sg"]))


# ---- training: which fusion params move --------------------------------------------------------
def _train(model_config: ModelConfig, steps: int = 3):
    """`steps` single-device steps from the reference's start of training (a "pretrained" random UNet,
    the SG network copied from it, its new layers zero); returns host (params before, after)."""
    model = DiAD(model_config)
    rng = np.random.default_rng(0)
    params = jax.device_get(model.init(seed=0))
    pretrained = {g: jax.tree.map(lambda x: x if np.any(x) else rng.normal(0, 0.02, x.shape).astype(np.float32),
                                  params[g]) for g in ("unet", "vae")}
    params = jax.device_get(copy_unet_into_sg({**pretrained, "sg": params["sg"]}))
    f = StepFactory(model, TrainConfig.tiny(), shd.make_mesh(1, 1, jax.devices()[:1]))
    trainable, frozen = f.split(params)
    state, context = f.init_state(trainable), f.place_context(
        rng.standard_normal((1, model_config.context_len, model_config.unet.context_dim)).astype(np.float32))
    size = model_config.image_size
    for i in range(steps):
        batch = {"image": rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32), "index": np.arange(2) + 2 * i}
        state, m = f.step(state, frozen, context, shd.shard_batch(batch, f.mesh))
        assert np.isfinite(float(m["loss"]))
    return traverse_util.flatten_dict(params["sg"]), traverse_util.flatten_dict(jax.device_get(state.params["sg"]))


def _moved(before, after, top):
    return any(not np.array_equal(before[k], after[k]) for k in before if k[0] == top)


def test_training_without_fusion():
    """No fusion params; under only_mid_control the residuals the UNet uses learn, the others get
    no gradient at all (nothing fuses them into the used ones)."""
    cfg = dataclasses.replace(MICRO, fusion="none")
    before, after = _train(cfg)
    assert before.keys() == after.keys() and not any(k[0].startswith("down") for k in after)
    assert _moved(before, after, "middle_block_out_0")
    assert _moved(before, after, f"zero_convs_{cfg.unet.num_skips - 1}_0")
    assert not _moved(before, after, "zero_convs_0_0")


@pytest.mark.parametrize("only_mid_control", [False, True])
def test_sff_trains_only_when_its_sources_reach_the_unet(only_mid_control):
    """only_mid_control=False: the source residuals reach the UNet, so their zero convs leave zero and
    then the SFF convs learn. True (the released training): both get exactly zero gradient from the
    reference's start (zero convs and SFF zero), so they stay exactly zero, as in the reference."""
    cfg = dataclasses.replace(MICRO, only_mid_control=only_mid_control)
    before, after = _train(cfg)
    assert {k[0] for k in after if k[0].startswith("down")} == _sff_names(cfg)
    sff_and_sources = sorted(_sff_names(cfg)) + [f"zero_convs_{i}_0" for i in cfg.sff_sources()]
    for top in sff_and_sources:
        assert not any(np.any(before[k]) for k in before if k[0] == top)  # the reference's start: zero
        assert _moved(before, after, top) != only_mid_control, top
    assert _moved(before, after, f"zero_convs_{cfg.sff_targets()[0]}_0")  # the targets learn either way
