"""DiAD model behaviour: jit, the trainable subset and its gradients, init, input validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diad_jax.configs import ModelConfig
from diad_jax.convert.ldm import ldm_to_params
from diad_jax.models.diad import DiAD, combine, copy_unet_into_sg, partition, trainable_mask

from tests import oracle


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.tiny()
    model = DiAD(cfg)
    sd = oracle.random_ldm_state_dict(cfg, seed=0)  # every weight non-zero
    params, _ = ldm_to_params(sd, model.abstract_params())
    return cfg, model, jax.tree.map(jnp.asarray, params)


def batch(cfg, b=2, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    lat, img = cfg.latent_size, cfg.image_size
    return dict(
        x=jax.random.normal(k[0], (b, 4, lat, lat)),
        hint=jax.random.normal(k[1], (b, 3, img, img)),
        ctx=jax.random.normal(k[2], (1, cfg.context_len, cfg.unet.context_dim)),
        t=jnp.array([3, 800][:b]),
        target=jax.random.normal(k[3], (b, 4, lat, lat)),
    )


def test_trainable_mask_selects_sg_and_unet_decoder(tiny):
    _, _, params = tiny
    flat = traverse_util.flatten_dict(trainable_mask(params))
    for path, is_trainable in flat.items():
        group, top = path[0], path[1]
        expected = group == "sg" or (group == "unet" and (top.startswith("output_blocks_") or top in ("out_0", "out_2")))
        assert is_trainable == expected, path
    assert any(p[0] == "unet" and p[1].startswith("input_blocks") for p in flat)
    trainable, frozen = partition(params)
    assert set(trainable) == {"sg", "unet"} and set(frozen) == {"unet", "vae"}
    back = combine(trainable, frozen)
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, back, params))


@pytest.fixture(scope="module")
def loss_grads(tiny):
    """only_mid_control -> jitted (trainable, frozen, batch) -> (eps-MSE loss, its gradient): the params
    and the batch are arguments, so each program compiles once for the module."""
    _, model, _ = tiny

    def make(only_mid_control):
        def loss(trainable, frozen, d):
            eps = model.eps(combine(trainable, frozen), d["x"], d["t"], d["ctx"], d["hint"],
                            only_mid_control=only_mid_control)
            return jnp.mean((eps - d["target"]) ** 2)
        return jax.jit(jax.value_and_grad(loss))

    return {only_mid_control: make(only_mid_control) for only_mid_control in (False, True)}


def _grads(loss_grads, params, d, only_mid_control):
    # all on one device, committed: params made in different ways then share the compiled program
    trainable, frozen = partition(jax.device_put(params, jax.devices()[0]))
    return trainable, loss_grads[only_mid_control](trainable, frozen, d)


def test_grad_nonzero_exactly_on_trainable_subset(tiny, loss_grads):
    cfg, _, params = tiny
    d = batch(cfg)
    trainable, (loss, grads) = _grads(loss_grads, params, d, only_mid_control=False)
    assert np.isfinite(loss)
    # grads exist for exactly the trainable leaves
    assert set(traverse_util.flatten_dict(grads)) == set(traverse_util.flatten_dict(trainable))
    mask = traverse_util.flatten_dict(trainable_mask(params))
    assert set(traverse_util.flatten_dict(grads)) == {k for k, v in mask.items() if v}
    zero = [k for k, g in traverse_util.flatten_dict(grads).items() if not np.any(np.asarray(g))]
    assert zero == [], f"trainable leaves without gradient: {zero}"


def test_only_mid_control_gradients_follow_the_reference(tiny, loss_grads):
    """only_mid_control=True: residuals that never reach the UNet (zero convs of skips other than
    the SFF sources and targets) get exactly zero gradient; everything else trainable moves."""
    cfg, _, params = tiny
    d = batch(cfg)
    _, (_, grads) = _grads(loss_grads, params, d, only_mid_control=True)
    used = set(cfg.sff_sources()) | set(cfg.sff_targets())
    for path, g in traverse_util.flatten_dict(grads).items():
        top = path[1]
        expect_zero = path[0] == "sg" and top.startswith("zero_convs_") and int(top.split("_")[2]) not in used
        assert (not np.any(np.asarray(g))) == expect_zero, path


def test_reference_init_leaves_sff_without_gradient(tiny, loss_grads):
    """Spec section 3: with the reference's start of training (a pretrained UNet, the SG network
    copied from its encoder, zero convs and SFF convs zero) and only_mid_control=True, the SFF
    convs and the source zero convs get exactly zero gradient (so they stay zero through a
    whole released training run)."""
    cfg, model, pretrained = tiny
    fresh = model.init(seed=0)
    params = copy_unet_into_sg({"unet": pretrained["unet"], "vae": pretrained["vae"], "sg": fresh["sg"]})
    d = batch(cfg)
    _, (_, grads) = _grads(loss_grads, params, d, only_mid_control=True)
    g = traverse_util.flatten_dict(grads["sg"])
    sff = [k for k in g if k[0].startswith("down")]
    assert len(sff) == len(cfg.sff_sources()) * len(cfg.sff_targets())
    for k in sff + [k for k in g if k[0] in {f"zero_convs_{i}_0" for i in cfg.sff_sources()}]:
        assert not np.any(np.asarray(g[k])), k
    # ...whereas the target zero convs do learn
    assert np.any(np.asarray(g[(f"zero_convs_{cfg.sff_targets()[0]}_0", "kernel")]))


def test_init_matches_reference_initialisation():
    """The fast host-side init follows the reference's rules, and agrees with the Flax modules'
    own initialisers on which layers are zero and on each layer's uniform bound."""
    cfg = ModelConfig.tiny()
    model = DiAD(cfg)
    params = model.init(seed=1)
    flax_params = model.init_flax(jax.random.key(1, impl="unsafe_rbg"))  # rbg: faster compile
    sg = traverse_util.flatten_dict(params["sg"])
    unet = traverse_util.flatten_dict(params["unet"])
    for k, v in sg.items():
        name = k[0]
        if name.startswith(("zero_convs_", "middle_block_out_", "down")) or name == f"input_hint_block_{2 * (2 * len(cfg.hint_block_channels) - 1)}":
            assert not np.any(np.asarray(v)), k  # zero-initialised as in the reference
        elif k in unet:
            np.testing.assert_array_equal(v, unet[k])  # copied from the UNet encoder
    assert np.any(np.asarray(sg[("input_hint_block_0", "kernel")]))
    # ResBlocks' last conv and the UNet output conv start at zero (zero_module in ldm)
    assert not np.any(np.asarray(unet[("out_2", "kernel")]))
    assert not np.any(np.asarray(unet[("input_blocks_1_0", "out_layers_3", "kernel")]))
    ours = traverse_util.flatten_dict(params)
    ref = traverse_util.flatten_dict(flax_params)
    assert set(ours) == set(ref)
    for k in ref:
        a, b = np.asarray(ours[k]), np.asarray(ref[k])
        assert a.shape == b.shape, k
        assert (np.any(a) == np.any(b)), f"{k}: zero in one init only"
        if k[-1] == "scale":
            np.testing.assert_array_equal(a, b)
        elif np.any(b) and a.size >= 64:  # same uniform bound (max |w| within 25% of each other)
            ratio = np.abs(a).max() / np.abs(b).max()
            assert 0.75 < ratio < 1.33, (k, ratio)


def test_jit_eps_equals_eager(tiny):
    cfg, model, params = tiny
    d = batch(cfg)
    eager = model.eps(params, d["x"], d["t"], d["ctx"], d["hint"])
    jitted = jax.jit(model.eps)(params, d["x"], d["t"], d["ctx"], d["hint"])
    assert eager.shape == d["x"].shape
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5, rtol=1e-5)


def test_encode_sample_vs_mean(tiny):
    cfg, model, params = tiny
    img = batch(cfg)["hint"]
    mean = model.encode(params, img)
    s1 = model.encode(params, img, jax.random.key(0))
    s2 = model.encode(params, img, jax.random.key(0))
    np.testing.assert_array_equal(s1, s2)
    assert not np.allclose(s1, mean)
    m, _ = model.encode_moments(params, img)
    np.testing.assert_allclose(mean, cfg.scale_factor * m, rtol=1e-6)


@pytest.mark.parametrize("arg, bad, pattern", [
    ("x", (2, 4, 9, 9), r"`x_t` has shape \(2, 4, 9, 9\), expected \(B, 4, 8, 8\)"),
    ("x", (2, 3, 8, 8), r"`x_t` has shape \(2, 3, 8, 8\)"),
    ("hint", (2, 3, 32, 32), r"`hint` has shape \(2, 3, 32, 32\), expected \(B, 3, 64, 64\).*8x the latent"),
    ("hint", (2, 1, 64, 64), r"`hint` has shape \(2, 1, 64, 64\)"),
    ("hint", (3, 3, 64, 64), r"`hint` has batch 3, expected 2"),
    ("ctx", (2, 8, 32), r"`context` has shape \(2, 8, 32\), expected \(B, 8, 64\)"),
    ("t", (3,), r"`timesteps` has shape \(3,\), expected \(2\)"),
    ("x", (2, 4, 8), r"`x_t` has shape \(2, 4, 8\)"),
])
def test_bad_shapes_raise_clear_errors(tiny, arg, bad, pattern):
    cfg, model, params = tiny
    d = batch(cfg)
    d[arg] = jnp.zeros(bad)
    with pytest.raises(ValueError, match=pattern):
        model.eps(params, d["x"], d["t"], d["ctx"], d["hint"])


def test_bad_image_and_latent_shapes(tiny):
    cfg, model, params = tiny
    with pytest.raises(ValueError, match=r"`images` has shape \(1, 3, 63, 63\)"):
        model.encode(params, jnp.zeros((1, 3, 63, 63)))
    with pytest.raises(ValueError, match=r"`z` has shape \(1, 4, 16, 16\)"):
        model.decode(params, jnp.zeros((1, 4, 16, 16)))


def test_config_validation():
    with pytest.raises(ValueError, match="hint encoder downsamples by 4"):
        ModelConfig.tiny(hint_block_channels=(16, 32, 64))
    with pytest.raises(ValueError, match="not divisible by norm_groups"):
        ModelConfig.tiny().unet.__class__(model_channels=24)
    cfg = ModelConfig.tiny()
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize("shape, k, stride, pad", [((2, 8, 8, 16), 3, 1, ((1, 1), (1, 1))),
                                                    ((1, 7, 5, 8), 3, 2, ((1, 1), (1, 1))),
                                                    ((1, 8, 8, 4), 3, 2, ((0, 1), (0, 1))),
                                                    ((1, 9, 9, 3), 7, 2, ((3, 3), (3, 3)))])
def test_im2col_conv_equals_lax_conv(shape, k, stride, pad, monkeypatch):
    from diad_jax.models import layers
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (k, k, shape[-1], 5))
    monkeypatch.setattr(layers, "CONV_IMPL", "lax")
    ref = layers.conv2d(x, w, stride, pad)
    monkeypatch.setattr(layers, "CONV_IMPL", "im2col")
    ours = layers.conv2d(x, w, stride, pad)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)
