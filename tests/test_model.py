"""DiAD model behaviour: jit, the trainable subset and its gradients, init, input validation."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diad_jax.configs import REMAT_POLICIES, ModelConfig
from diad_jax.convert.ldm import ldm_to_params
from diad_jax.models import layers
from diad_jax.models.diad import DiAD, combine, copy_unet_into_sg, partition, trainable_mask
from diad_jax.models.layers import remat_blocks

from tests import oracle


def random_model(cfg: ModelConfig):
    """(model, params) with every weight random and non-zero."""
    model = DiAD(cfg)
    params, _ = ldm_to_params(oracle.random_ldm_state_dict(cfg, seed=0), model.abstract_params())
    return model, jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig.tiny()
    return cfg, *random_model(cfg)


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


@functools.partial(jax.jit, static_argnames=("model", "only_mid_control"))
def _loss_and_grads(model, trainable, frozen, d, only_mid_control):
    """One program per model and only_mid_control, shared by the gradient tests."""
    def loss(tr):
        eps = model.eps(combine(tr, frozen), d["x"], d["t"], d["ctx"], d["hint"], only_mid_control=only_mid_control)
        return jnp.mean((eps - d["target"]) ** 2)
    return jax.value_and_grad(loss)(trainable)


def _grads(model, params, d, only_mid_control):
    trainable, frozen = partition(params)
    return trainable, _loss_and_grads(model, trainable, frozen, d, only_mid_control)


def test_grad_nonzero_exactly_on_trainable_subset(tiny):
    cfg, model, params = tiny
    d = batch(cfg)
    trainable, (loss, grads) = _grads(model, params, d, only_mid_control=False)
    assert np.isfinite(loss)
    # grads exist for exactly the trainable leaves
    assert set(traverse_util.flatten_dict(grads)) == set(traverse_util.flatten_dict(trainable))
    mask = traverse_util.flatten_dict(trainable_mask(params))
    assert set(traverse_util.flatten_dict(grads)) == {k for k, v in mask.items() if v}
    zero = [k for k, g in traverse_util.flatten_dict(grads).items() if not np.any(np.asarray(g))]
    assert zero == [], f"trainable leaves without gradient: {zero}"


def test_only_mid_control_gradients_follow_the_reference(tiny):
    """only_mid_control=True: residuals that never reach the UNet (zero convs of skips other than
    the SFF sources and targets) get exactly zero gradient; everything else trainable moves."""
    cfg, model, params = tiny
    d = batch(cfg)
    _, (_, grads) = _grads(model, params, d, only_mid_control=True)
    used = set(cfg.sff_sources()) | set(cfg.sff_targets())
    for path, g in traverse_util.flatten_dict(grads).items():
        top = path[1]
        expect_zero = path[0] == "sg" and top.startswith("zero_convs_") and int(top.split("_")[2]) not in used
        assert (not np.any(np.asarray(g))) == expect_zero, path


def test_reference_init_leaves_sff_without_gradient(tiny):
    """Spec section 3: with the reference's start of training (a pretrained UNet, the SG network
    copied from its encoder, zero convs and SFF convs zero) and only_mid_control=True, the SFF
    convs and the source zero convs get exactly zero gradient (so they stay zero through a
    whole released training run)."""
    cfg, model, pretrained = tiny
    fresh = model.init(seed=0)
    params = copy_unet_into_sg({"unet": pretrained["unet"], "vae": pretrained["vae"], "sg": fresh["sg"]})
    d = batch(cfg)
    _, (_, grads) = _grads(model, params, d, only_mid_control=True)
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
    flax_params = model.init_flax(jax.random.key(1))
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


def test_jit_eps_equals_eager():
    """Op by op (eager) and compiled agree; on the tiny model's structure with one res block per
    level (eager dispatch is slow: the size is not the point)."""
    cfg = ModelConfig.tiny(unet=dataclasses.replace(ModelConfig.tiny().unet, num_res_blocks=1))
    model, params = random_model(cfg)
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
def test_im2col_conv_equals_lax_conv(shape, k, stride, pad):
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (k, k, shape[-1], 5))
    ref = layers.conv2d(x, w, stride, pad, impl="lax")
    ours = layers.conv2d(x, w, stride, pad, impl="im2col")
    assert ours.shape == ref.shape
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)


def _eqns(jaxpr, match) -> list:
    """Every equation of a jaxpr that `match(eqn)` accepts, nested jaxprs (remat, jit) included."""
    found = []
    for eqn in jaxpr.eqns:
        if match(eqn):
            found.append(eqn)
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    found += _eqns(getattr(sub, "jaxpr", sub), match)
    return found


def _conv_kernels(jaxpr) -> list[tuple[int, int]]:
    """The (h, w) kernel of every lax.conv in a jaxpr."""
    convs = _eqns(jaxpr, lambda eqn: eqn.primitive.name == "conv_general_dilated")
    return [tuple(eqn.invars[1].aval.shape[:2]) for eqn in convs]  # HWIO


def test_remat_policies_keep_the_gradients():
    """A rematerialised res block and transformer block, under each policy (what the backward pass
    keeps), give the gradients of the plain blocks, for params and inputs (one program per block)."""
    x, emb, ctx = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(2, 8, 8, 32), (2, 64), (2, 5, 16)]))
    policies = [p for p in REMAT_POLICIES if p != "none"]
    for i, (kw, args) in enumerate(((dict(out_channels=32, norm_groups=8), (x, emb)),
                                    (dict(heads=4, norm_groups=8), (x, ctx)))):
        modules = [remat_blocks(p)[i](**kw) for p in ["none", *policies]]
        params = jax.jit(lambda *a: jax.tree.map(  # random values in the zero-initialised layers too
            lambda p: p + 0.05 * jax.random.normal(jax.random.key(4), p.shape), modules[0].init(jax.random.key(3), *a)))(*args)

        @jax.jit
        def grads(params, *args):
            return [jax.grad(lambda p, *a: jnp.sum(jnp.sin(m.apply(p, *a))), argnums=(0, 1, 2))(params, *args)
                    for m in modules]

        want, *got = grads(params, *args)
        for policy, g in zip(policies, got):
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
                # the recomputed forward may round differently (another fusion): float32 rounding of the largest entry
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()),
                                           err_msg=f"{policy} {type(modules[0]).__name__}")


def test_an_odd_number_of_keys_made_even_for_cudnn_attends_the_same():
    """SD's 77 text tokens get one masked zero key before cuDNN's attention (layers.even_keys): the
    outputs and the gradients for q, k and v equal plain attention over the 77 (run here with XLA's
    implementation of the same masked call; cuDNN itself needs an NVIDIA GPU)."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, t, 4, 8)) for i, t in enumerate((16, 77, 77)))

    def attend(q, k, v, pad):
        lengths = None
        if pad:
            k, v, lengths = layers.even_keys(k, v)
            assert k.shape[1] == 78
        return jnp.sum(jnp.sin(jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)))

    want, got = (jax.value_and_grad(functools.partial(attend, pad=pad), argnums=(0, 1, 2))(q, k, v)
                 for pad in (False, True))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_policy_reaches_every_unet_and_sg_block():
    """DiAD's `remat` wraps every res and transformer block of the UNet and the SG network in a
    jax.checkpoint with the policy's rule (none: no checkpoint at all; the rule of each name is
    checked block by block above)."""
    cfg = ModelConfig.tiny()
    b = batch(cfg)
    u = cfg.unet
    levels = u.num_levels + sum(u.has_attention(lv) for lv in range(u.num_levels))  # res + transformer levels
    unet = levels * (2 * u.num_res_blocks + 1) + 3  # encoder, decoder (one more per level), middle (res, tr., res)
    sg = levels * u.num_res_blocks + 3              # encoder, middle
    for policy in ("none", "convs_and_dots"):
        model = DiAD(cfg, remat=policy)
        jaxpr = jax.make_jaxpr(model.eps)(model.abstract_params(), b["x"], b["t"], b["ctx"], b["hint"]).jaxpr
        policies = [eqn.params["policy"] for eqn in _eqns(jaxpr, lambda eqn: "policy" in eqn.params)]  # checkpoints
        assert len(policies) == (0 if policy == "none" else unet + sg), policy
        assert all(p is layers.REMAT_SAVES[policy] for p in policies), policy


def test_conv_impl_reaches_every_conv_of_the_model():
    """DiAD's `conv_impl` chooses the kernel of every conv of the UNet, the SG network (its hint
    encoder and fusion block) and the VAE: with "im2col" only 1x1 convs are left to lax.conv."""
    cfg = ModelConfig.tiny()
    b = batch(cfg)
    for impl, larger_than_1x1 in (("lax", True), ("im2col", False)):
        model = DiAD(cfg, conv_impl=impl)
        params = model.abstract_params()
        for fn, args in ((model.eps, (b["x"], b["t"], b["ctx"], b["hint"])), (model.encode_moments, (b["hint"],)),
                         (model.decode, (b["x"],))):
            kernels = _conv_kernels(jax.make_jaxpr(fn)(params, *args).jaxpr)
            assert kernels and any(k != (1, 1) for k in kernels) == larger_than_1x1, (impl, fn.__name__)
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        jax.eval_shape(DiAD(cfg, conv_impl="winograd").decode, params, b["x"])
