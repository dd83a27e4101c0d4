"""Training: sharded steps vs one device, partition rules, trainable subset, kill-and-resume,
restore onto another mesh, real multi-process training, and the loss going down.

All tests train the micro model (the tiny model's structure at its smallest) on the generated
dataset at 32 px: the in-process ones on the 8 forced CPU devices conftest.py sets up, the subprocess
ones (where the process boundary is the point) with their own XLA_FLAGS."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from diad_jax import data
from diad_jax import sharding as shd
from diad_jax.checkpoints import model_metadata, state_target
from diad_jax.configs import DiffusionConfig, EvalConfig, MeshConfig, ModelConfig, TrainConfig
from diad_jax.models.diad import DiAD, combine, partition, trainable_mask
from diad_jax.errors import ConfigError
from diad_jax.train import Checkpointer, StepFactory, check_eval_resnet, diffusion_loss, read_metrics
from diad_jax.train.latents import cache_path, cached_moments
from diad_jax.train.perf import matrix_ops, model_flops

from tests.conftest import MICRO, xla_flags

# one xdist worker for the whole module: its fixtures (compiled steps, the reference run) are shared
pytestmark = pytest.mark.xdist_group("train")

ROOT = Path(__file__).resolve().parents[1]
SYNTH = dict(train_per_class=8, test_per_class=4)   # 40 train images, 20 test
BATCH = 8
LR = 1e-3  # larger than the reference's 1e-5 so a few steps visibly train


@pytest.fixture(scope="module")
def micro_synth(tmp_path_factory):
    """The module's dataset (the micro model's 32 px), prepared once here."""
    d = tmp_path_factory.mktemp("micro_data")
    ds = data.prepare("synthetic", d, image_size=MICRO.image_size, **SYNTH)
    return d, ds


@pytest.fixture(scope="module")
def setup(micro_synth):
    """Model, initial host params, context, and three fixed global batches (host numpy). The
    zero-initialised layers are filled with random values so every parameter gets a gradient."""
    _, ds = micro_synth
    cfg = TrainConfig.tiny(**{"data.batch_size": BATCH, "optimizer.learning_rate": LR})
    model = DiAD(MICRO)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: x if np.any(x) else rng.normal(0, 0.02, x.shape).astype(np.float32),
                          jax.device_get(model.init(seed=0)))
    ctx = rng.standard_normal((1, model.config.context_len, model.config.unet.context_dim)).astype(np.float32)
    it = iter(data.train_dataset(ds, BATCH, seed=0, shard_index=0, shard_count=1))
    batches = []
    for _ in range(3):
        b = next(it)
        batches.append({"image": b["image"], "index": b["index"]})
    return cfg, model, params, ctx, batches


_FACTORIES: dict = {}


def factory(setup, data_size: int, fsdp: int) -> StepFactory:
    """One StepFactory (one compiled step) per mesh for the whole module."""
    cfg, model, *_ = setup
    key = (data_size, fsdp)
    if key not in _FACTORIES:
        mesh = shd.make_mesh(data_size, fsdp, jax.devices()[:data_size * fsdp])
        _FACTORIES[key] = StepFactory(model, cfg, mesh)
    return _FACTORIES[key]


def run_steps(f: StepFactory, params, ctx, batches, n: int, snapshot_after: int | None = None):
    """n steps; also returns a host copy of the state after `snapshot_after` steps."""
    trainable, frozen = f.split(params)
    state = f.init_state(trainable)
    context = f.place_context(ctx)
    losses, snap = [], None
    for i, b in enumerate(batches[:n]):
        state, m = f.step(state, frozen, context, shd.shard_batch(b, f.mesh))
        losses.append(float(m["loss"]))
        if i + 1 == snapshot_after:
            snap = jax.device_get(state)
    return state, frozen, losses, snap


@pytest.fixture(scope="module")
def single(setup):
    """Two single-device steps: (host state after step 1, host frozen, both losses)."""
    cfg, model, params, ctx, batches = setup
    f = factory(setup, 1, 1)
    _, frozen, losses, snap = run_steps(f, params, ctx, batches, 2, snapshot_after=1)
    return snap, jax.device_get(frozen), losses


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


# ---- mesh --------------------------------------------------------------------------------------
def test_make_mesh_sizes_and_errors():
    assert jax.device_count() == 8, "conftest forces 8 CPU devices"
    assert dict(shd.make_mesh().shape) == {"data": 8, "fsdp": 1}
    assert dict(shd.make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
    assert dict(shd.make_mesh(-1, 8).shape) == {"data": 1, "fsdp": 8}
    for bad, msg in [((3, -1), "cannot be split"), ((-1, -1), "only one"), ((2, 2), "product must equal"),
                     ((0, 8), "positive size")]:
        with pytest.raises(shd.MeshError, match=msg):
            shd.make_mesh(*bad)
    mesh = shd.make_mesh(2, 4)
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    # laid out by mesh_utils: on a CPU, the devices of jax.devices() in order (as before it)
    assert mesh.devices.tolist() == np.asarray(jax.devices(), dtype=object).reshape(2, 4).tolist()
    # a hybrid (DCN) data axis needs as many slices, or processes where there are no slices, as it asks for
    with pytest.raises(shd.MeshError, match=r"^mesh.dcn_data = 2, but the devices form 1 process\(es\)"):
        shd.config_mesh(MeshConfig(data=4, fsdp=2, dcn_data=2))
    with pytest.raises(shd.MeshError, match="dcn_data = 3 must be a positive divisor of the data axis"):
        shd.make_mesh(4, 2, dcn_data=3)
    assert dict(shd.make_mesh(8, 1, dcn_data=1).shape) == {"data": 8, "fsdp": 1}
    with pytest.raises(ConfigError, match="dcn_data"):
        MeshConfig(dcn_data=0)


def test_a_process_owns_one_contiguous_block_of_the_batch():
    """The check behind make_mesh's fallback to process order: each process's devices must sit at
    consecutive positions of the (data x fsdp, row-major) batch split."""
    dev = lambda p: types.SimpleNamespace(process_index=p)  # noqa: E731
    assert shd.owns_contiguous_batch_blocks(np.array([[dev(0), dev(0)], [dev(1), dev(1)]], dtype=object))
    assert not shd.owns_contiguous_batch_blocks(np.array([[dev(0), dev(1)], [dev(0), dev(1)]], dtype=object))
    assert shd.owns_contiguous_batch_blocks(np.array([[dev(0)] * 4], dtype=object))


# ---- sharded step == single-device step --------------------------------------------------------
def assert_same_adam_moments(state, ref_state):
    """Adam's moments after one step are linear in the gradients: they must agree to float tolerance."""
    for name in ("mu", "nu"):
        m_got = _flat(jax.device_get(getattr(state.opt_state[0], name)))
        m_want = _flat(getattr(ref_state.opt_state[0], name))
        scale = max(float(np.max(np.abs(v))) for v in m_want.values())
        for k in m_want:
            np.testing.assert_allclose(m_got[k], m_want[k], rtol=1e-3, atol=1e-5 * scale, err_msg=f"{name} {k}")


def test_sharded_step_matches_single_device(setup, single):
    """data=2 x fsdp=4: the gradient all-reduce over the data axis and the fsdp-sharded params and
    AdamW moments (pure data parallelism is the data axis alone) match one device."""
    cfg, model, params, ctx, batches = setup
    ref_state, _, ref_losses = single
    _, _, losses, state = run_steps(factory(setup, 2, 4), params, ctx, batches, 2, snapshot_after=1)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    # the state after the first step
    got, want = _flat(jax.device_get(state.params)), _flat(ref_state.params)
    assert got.keys() == want.keys()
    assert_same_adam_moments(state, ref_state)
    # Params: Adam's first update is lr * g / (|g| + eps), i.e. lr * sign(g) once |g| >> eps = 1e-8;
    # where |g| is near the rounding level (biases right before a GroupNorm: ~1e-10) its sign is
    # noise, and the update's slope lr * eps / |g|^2 amplifies rounding. Where |g| > 1e-5 the
    # update is lr * sign(g) to 1e-3 and insensitive to rounding: the params must agree there.
    mu = _flat(ref_state.opt_state[0].mu)  # = 0.1 g after one step
    initial = _flat(params)
    n_noise = n_total = 0
    for k in want:
        d = np.abs(got[k] - want[k])
        real = np.abs(mu[k]) > 1e-6
        n_noise += int((~real).sum())
        n_total += d.size
        assert np.all(d[real] <= 1e-6 * LR + 1e-6 * np.abs(want[k][real])), \
            f"{k}: max |sharded - single| = {d[real].max():.3g}"
        moved = np.abs(got[k] - initial[k])
        assert np.all(moved[real] > 0.5 * LR), f"{k}: a checked param did not take its ~lr step"
    assert n_noise < 0.6 * n_total, f"only {n_total - n_noise} of {n_total} params checked"


@pytest.fixture(scope="module")
def accumulation_reference(setup):
    """Two updates on one device of the whole batch at once (grad_accum 1) with Adam eps 1e-3: its
    update g / (|g| + eps) is then Lipschitz in g, so summing the gradient in another order changes
    the params at rounding level only (with eps 1e-8, gradients that are zero up to rounding turn
    into +-lr steps). Returns (cfg, losses, grad norms, host params after 2 updates, FLOPs per step,
    the optimizer state's memory kinds)."""
    cfg, model, params, ctx, batches = setup
    cfg = cfg.replace(**{"optimizer.eps": 1e-3})
    return (cfg, *_two_updates(StepFactory(model, cfg, shd.make_mesh(1, 1, jax.devices()[:1])), params, ctx,
                               batches))


def _two_updates(f: StepFactory, params, ctx, batches):
    """Two steps. A step that scans micro-batches is compiled at XLA:CPU's default optimisation
    level, not the suite's -O0 (conftest.py), under which XLA:CPU runs convolutions inside a loop
    ~20x slower (jax-ml/jax#12868); one without a loop compiles faster at -O0."""
    trainable, frozen = f.split(params)
    state, context, losses, norms = f.init_state(trainable), f.place_context(ctx), [], []
    placed = [shd.shard_batch(b, f.mesh) for b in batches[:2]]
    options = {"xla_backend_optimization_level": 2} if f.cfg.optimizer.grad_accum > 1 else None
    step = f.jitted_step.lower(state, frozen, context, placed[0]).compile(options)
    for b in placed:
        state, m = step(state, frozen, context, b)
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
    flops = f.flops_per_step(state, frozen, context, len(batches[0]["index"]))
    return losses, norms, _flat(jax.device_get(state.params)), flops, kinds


@pytest.mark.parametrize("data_size, fsdp, micro, offload", [(1, 1, 4, False), (2, 2, 2, True)])
def test_micro_batches_inside_the_step_equal_one_batch(setup, accumulation_reference, data_size, fsdp, micro,
                                                       offload):
    """grad_accum micro-batches of the batch of 8 (4 of 2 on one device; 2 of 4 on data=2 x fsdp=2,
    each micro-batch split over the 4 devices, there with AdamW's moments kept in host memory between
    steps) give the loss, the update's gradient norm and the params after 2 updates of the whole batch
    at once, and the FLOPs the logs count per step."""
    _, model, params, ctx, batches = setup
    cfg, want_loss, want_norm, want, want_flops, _ = accumulation_reference
    f = StepFactory(model, cfg.replace(**{"optimizer.grad_accum": micro, "optimizer.offload_state": offload}),
                    shd.make_mesh(data_size, fsdp, jax.devices()[:data_size * fsdp]))
    assert "grad_accum" not in str(jax.tree.structure(f.abstract_state)), "no accumulator in the train state"
    losses, norms, got, flops, kinds = _two_updates(f, params, ctx, batches)
    assert kinds == {"pinned_host" if offload else "device"}
    # counted on the step's jaxpr (global shapes, the scan's body times its length): the one-batch count
    assert flops == want_flops
    np.testing.assert_allclose(losses, want_loss, rtol=1e-5)
    np.testing.assert_allclose(norms, want_norm, rtol=1e-5)
    initial = _flat(params)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-4 * LR, err_msg=k)
    assert sum(not np.allclose(want[k], initial[k], rtol=0, atol=0.1 * LR) for k in want) > 0.5 * len(want)


def test_model_flops_counts_the_matrix_work_of_a_program():
    """Convolutions (their gradients too), dot_generals, a scan's body times its length and the larger
    branch of a cond, 2 FLOPs per multiply-add, against counts worked out by hand; elementwise work is
    not counted; each operation is listed with its operand dtypes."""
    x, w, m = jnp.ones((2, 3, 8, 8)), jnp.ones((4, 3, 3, 3)), jnp.ones((5, 6))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME")  # noqa: E731
    per_conv = 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)
    mixed = lambda m: jax.lax.dot_general(m, m.astype(jnp.bfloat16), (((1,), (1,)), ((), ())),  # noqa: E731
                                          preferred_element_type=jnp.float32)
    assert [(op, dtypes) for op, dtypes, _ in matrix_ops(jax.make_jaxpr(mixed)(m))] == [
        ("dot_general", ("float32", "bfloat16"))]
    assert model_flops(jax.make_jaxpr(conv)(x, w)) == per_conv
    # the gradient for w is one more convolution of the same size (dW[o, i, kh, kw] sums over n, h, w)
    assert model_flops(jax.make_jaxpr(jax.grad(lambda w: jnp.tanh(conv(x, w)).sum()))(w)) == 2 * per_conv
    # a stride-2 convolution's gradients (for x: a convolution of the 2x-dilated output gradient) are
    # each as much work as its forward pass, the dilation's zeros not counted
    strided = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "SAME")  # noqa: E731
    per_strided = 2 * (2 * 4 * 4 * 4) * (3 * 3 * 3)
    grads = jax.grad(lambda x, w: jnp.tanh(strided(x, w)).sum(), argnums=(0, 1))
    assert model_flops(jax.make_jaxpr(grads)(x, w)) == 3 * per_strided

    def loop(m):
        return jax.lax.scan(lambda c, _: (jnp.sin(c @ m.T @ m), None), jnp.ones((7, 6)), None, length=3)[0]

    assert model_flops(jax.make_jaxpr(loop)(m)) == 3 * 2 * (7 * 5 * 6 + 7 * 6 * 5)
    branches = lambda p, m: jax.lax.cond(p, lambda: (m @ m.T).sum(), lambda: m.sum())  # noqa: E731
    assert model_flops(jax.make_jaxpr(branches)(True, m)) == 2 * 5 * 5 * 6


def test_cached_posterior_moments_give_the_step_of_encoding_the_images(setup, single, micro_synth):
    """With cache_latents the step reads the images' posterior moments from the cache (computed once
    for the whole split, looked up by example index) and samples them with the same noise: the same
    losses and first update as the step that encodes the images itself."""
    cfg, model, params, ctx, batches = setup
    ref_state, _, ref_losses = single
    _, ds = micro_synth
    f = StepFactory(model, cfg.replace(cache_latents=True), shd.make_mesh(1, 1, jax.devices()[:1]))
    trainable, frozen = f.split(params)
    moments = cached_moments(model, frozen["vae"], ds, "train", f.mesh, BATCH)
    assert moments.shape == (len(ds.indices("train")), 2, MICRO.vae.embed_dim, MICRO.latent_size, MICRO.latent_size)
    state, context, losses = f.init_state(trainable), f.place_context(ctx), []
    for i, b in enumerate(batches[:2]):
        state, m = f.step(state, frozen, context, shd.shard_batch({**b, "moments": moments[b["index"]]}, f.mesh))
        losses.append(float(m["loss"]))
        if i == 0:
            assert_same_adam_moments(state, ref_state)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_the_latent_cache_is_keyed_by_the_vae_weights_and_checked_against_the_data(setup, micro_synth, caplog):
    """A second request reads the stored file; other VAE weights get another file; a file whose rows
    do not match the split (the prepared data changed) is computed again."""
    _, model, params, _, _ = setup
    _, ds = micro_synth
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    vae = params["vae"]
    first = np.array(cached_moments(model, vae, ds, "train", mesh, BATCH))  # a copy: the file is replaced below
    path = cache_path(model, vae, ds, "train")
    assert path.exists() and path.parent.parent == Path(ds.path)
    again = cached_moments(model, vae, ds, "train", mesh, BATCH)
    assert isinstance(again, np.memmap) and np.array_equal(again, first)  # read, not computed
    other = jax.tree.map(lambda x: x * 1.5, vae)
    assert cache_path(model, other, ds, "train") != path
    assert not np.allclose(cached_moments(model, other, ds, "train", mesh, BATCH), first)
    path.unlink()  # (a new file: `again` maps the old one)
    np.save(path, first[:5])  # as if the split had changed size
    with caplog.at_level(logging.WARNING):
        rebuilt = cached_moments(model, vae, ds, "train", mesh, BATCH)
    assert "holds 5 rows, the train split 40: computing them again" in caplog.text
    assert not isinstance(rebuilt, np.memmap) and np.array_equal(rebuilt, first)


def test_params_and_optimizer_state_sharded_as_rules_say(setup):
    _, _, params, ctx, batches = setup
    f = factory(setup, 2, 4)
    trainable, frozen = f.split(params)
    state = f.init_state(trainable)
    n_sharded = 0
    for tree in (trainable, frozen):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            name = shd.path_str(path)
            want = shd.spec_for(name, x.shape, f.mesh)
            assert x.sharding.spec == want, name
            if "fsdp" in want:
                n_sharded += 1
                dim = list(want).index("fsdp")
                assert x.addressable_shards[0].data.shape[dim] == x.shape[dim] // 4, name
    assert n_sharded > 20
    # concrete rule outcomes: large kernels split on their largest fsdp-divisible dim, small/bias replicated
    flat_t = {shd.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(trainable)}
    k = flat_t["unet/output_blocks_0_0/in_layers_2/kernel"]          # (3, 3, 128, 64)
    assert k.shape == (3, 3, 128, 64) and k.sharding.spec == P(None, None, "fsdp")
    assert flat_t["unet/output_blocks_0_0/in_layers_2/bias"].sharding.spec == P()
    assert flat_t["sg/input_hint_block_0/kernel"].sharding.spec == P()    # (3, 3, 3, 16): small
    # Adam moments follow their param; the counter is replicated
    adam = state.opt_state[0]
    for tree in (adam.mu, adam.nu):
        for (pp, p), (mp, m) in zip(jax.tree_util.tree_leaves_with_path(trainable),
                                    jax.tree_util.tree_leaves_with_path(tree)):
            assert shd.path_str(pp) == shd.path_str(mp)
            assert m.sharding.spec == p.sharding.spec, shd.path_str(pp)
    assert adam.count.sharding.spec == P()
    # the batch is split over every device
    gb = shd.shard_batch(batches[0], f.mesh)
    assert gb["image"].sharding.spec == P(("data", "fsdp"), None, None, None)
    assert gb["image"].addressable_shards[0].data.shape[0] == BATCH // 8


def test_only_trainable_params_change(setup, single):
    _, model, params, _, _ = setup
    state, frozen_after, _ = single
    mask = _flat(trainable_mask(params))
    before = _flat(params)
    after = _flat(combine(state.params, frozen_after))
    assert after.keys() == before.keys()
    train_keys = {k for k, t in mask.items() if t}
    assert set(_flat(state.params)) == train_keys                      # state holds only trainable params
    assert set(_flat(state.opt_state[0].mu)) == train_keys             # ... and so does the optimizer
    for k, t in mask.items():
        if not t:
            assert np.array_equal(after[k], before[k]), f"frozen {k} changed"
    assert any(k.startswith("unet/input_blocks") for k in before if not mask[k])
    assert any(k.startswith("vae/") for k in before)
    changed = [k for k in train_keys if not np.array_equal(after[k], before[k])]
    assert any(k.startswith("sg/") for k in changed) and any(k.startswith("unet/output_blocks") for k in changed)
    assert len(changed) > 0.5 * len(train_keys)


def test_loss_goes_down(setup, micro_synth):
    """A fixed held-out batch and noise: the loss after 30 steps (lr 1e-3) is clearly lower."""
    cfg, model, params, ctx, batches = setup
    _, ds = micro_synth
    f = factory(setup, 1, 1)
    trainable, frozen = f.split(params)
    state = f.init_state(trainable)
    context = f.place_context(ctx)
    held = shd.shard_batch({"image": batches[2]["image"], "index": np.arange(BATCH) + 1000}, f.mesh)

    def held_loss(state):
        # the step reports the loss before its update; on a copy with a fixed step number the
        # noise (keyed by step and example index) is the same every time
        probe = jax.device_put(state, f.state_shardings, may_alias=False)  # the step donates it
        probe = probe.replace(step=jax.device_put(jnp.int32(10_000), f.state_shardings.step))
        return float(f.step(probe, frozen, context, held)[1]["loss"])

    before = held_loss(state)
    it = iter(data.train_dataset(ds, BATCH, seed=1, shard_index=0, shard_count=1))
    losses = []
    for _ in range(30):
        b = next(it)
        state, m = f.step(state, frozen, context, shd.shard_batch({"image": b["image"], "index": b["index"]}, f.mesh))
        losses.append(float(m["loss"]))
    after = held_loss(state)
    assert np.isfinite(losses).all()
    assert after < 0.8 * before, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:5])


# ---- checkpoints -------------------------------------------------------------------------------
def test_restore_onto_a_different_mesh(setup, single, tmp_path):
    """Save from one device, restore onto data=2 x fsdp=4: same values, the new mesh's shardings."""
    cfg, model, params, ctx, batches = setup
    f1, f24 = factory(setup, 1, 1), factory(setup, 2, 4)
    state, frozen, _, _ = run_steps(f1, params, ctx, batches, 1)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, async_save=True)
    meta = model_metadata(model.config, False, kind="detector")
    ckpt.save(1, state=state, params=combine(state.params, frozen), context=f1.place_context(ctx), resnet=None,
              model_meta=meta, train_config={"step": 1})
    ckpt.wait()
    r_state, restored = ckpt.restore(1, abstract_state=f24.abstract_state_with_shardings(),
                                     state_target=state_target(model.config, False, f24.mesh))
    r_params, r_ctx = restored["params"], restored["context"]
    # a run that keeps the optimizer state in host memory resumes it there
    offloaded = StepFactory(model, cfg.replace(**{"optimizer.offload_state": True}), f24.mesh)
    o_state, _ = ckpt.restore(1, abstract_state=offloaded.abstract_state_with_shardings(),
                              state_target=state_target(model.config, False, f24.mesh))
    ckpt.close()
    assert {x.sharding.memory_kind for x in jax.tree.leaves(o_state.opt_state)} == {"pinned_host"}
    assert int(r_state.step) == 1
    for restored_state in (r_state, o_state):  # same values in device and in host memory
        for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored_state))):
            assert np.array_equal(a, b)
    for (path, x), want in zip(jax.tree_util.tree_leaves_with_path(r_params),
                               jax.tree.leaves(combine(f24.trainable_shardings, f24.frozen_shardings))):
        assert x.sharding == want, shd.path_str(path)
    np.testing.assert_array_equal(np.asarray(r_ctx), ctx)
    # the restored state trains on the new mesh exactly like the original on its own
    _, r_frozen = partition(r_params)
    s_new, m_new = f24.step(r_state, r_frozen, r_ctx, shd.shard_batch(batches[1], f24.mesh))
    s_old, m_old = f1.step(state, frozen, f1.place_context(ctx), shd.shard_batch(batches[1], f1.mesh))
    np.testing.assert_allclose(float(m_new["loss"]), float(m_old["loss"]), rtol=2e-5)
    # a training checkpoint is also a model checkpoint
    from diad_jax.checkpoints import load_model
    m = load_model(tmp_path / "ckpt" / "1")
    assert m.config == model.config and m.resnet is None
    np.testing.assert_array_equal(m.params["vae"]["encoder"]["conv_in"]["kernel"],
                                  params["vae"]["encoder"]["conv_in"]["kernel"])


# ---- subprocess helpers ------------------------------------------------------------------------
def _env(devices: int, cache: Path | None = None) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL="3")
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _train_cmd(workdir, data_dir, *extra, signal_at: tuple[str, int] | None = None) -> list[str]:
    """scripts/train.py with these flags; `signal_at` ("TERM" or "KILL", N): through
    tests/train_signalled.py, which sends the process that signal once step N is done."""
    wrapper = [] if signal_at is None else [str(ROOT / "tests" / "train_signalled.py"), *map(str, signal_at)]
    return [sys.executable, *wrapper, str(ROOT / "scripts" / "train.py"), "--workdir", str(workdir), "--data-dir",
            str(data_dir), "--dataset-option", f"train_per_class={SYNTH['train_per_class']}",
            "--dataset-option", f"test_per_class={SYNTH['test_per_class']}", "--lr", str(LR),
            "--log-every", "1", "--eval-split", "none", "--no-progress", *extra]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, expect: int = 0):
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{out[-6000:]}"


def _losses(workdir) -> dict[int, float]:
    """step -> loss, the last logged value of each step (a resumed run re-logs steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl")}


def _final_params(path):
    """Params of a checkpoint saved on any topology (here: 2 processes), onto one local device."""
    from diad_jax.checkpoints import load_model
    return _flat(jax.device_get(load_model(path).params))


def _resumed_from(log: str) -> int:
    assert "resumed from" in log, log[-3000:]
    return int(log.split("resumed from ")[1].split("(step ")[1].split(")")[0])


# The subprocess runs share one persistent compilation cache and these settings, so the
# single-process program compiles once (the two-process one once per process).
REFERENCE_ARGS = ("--steps", "7", "--save-every", "2", "--batch-size", "8", "--mesh-data", "1", "--mesh-fsdp", "2")


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """A compilation cache directory, holding also the subprocess tests' config file."""
    d = tmp_path_factory.mktemp("jax_cache")
    # Adam with eps 1e-3 (instead of 1e-8): its update g / (|g| + eps) is then Lipschitz in g, so
    # the different summation order of cross-process reductions stays at rounding level instead of
    # turning gradients that are zero up to rounding into +-lr steps (the in-process test covers
    # the default eps after one step). Everything else is the default optimiser. The evaluation's
    # blur and image-score pool are scaled to the micro model's 32 px.
    footprint = EvalConfig().scaled_footprint(MICRO.image_size)
    (d / "run_config.json").write_text(json.dumps({"optimizer": {"eps": 1e-3},
                                            "eval": {"sigma": footprint.sigma, "pool_window": footprint.pool_window}}))
    return d


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    """The runs' --init-checkpoint (as every real run has one; it sets their model: the micro one),
    saved by THIS process from a data=2 x fsdp=4 mesh of 8 devices: the runs restore it onto other
    meshes and process counts."""
    from diad_jax.checkpoints import default_context, save_model
    model = DiAD(MICRO)
    mesh = shd.make_mesh(2, 4)
    params = shd.place(model.init(seed=3), shd.param_shardings(model.abstract_params(), mesh))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(params))
    return save_model(tmp_path_factory.mktemp("init") / "ckpt", config=model.config, params=params, kind="init",
                      context=default_context(model.config) + 0.5)


def _ref_args(jax_cache, init_checkpoint) -> tuple[str, ...]:
    return (*REFERENCE_ARGS, "--config", str(jax_cache / "run_config.json"), "--init-checkpoint", str(init_checkpoint))


@pytest.fixture(scope="module")
def reference_run(micro_synth, jax_cache, init_checkpoint, tmp_path_factory):
    """One uninterrupted single-process run: 7 steps on 2 devices (fsdp=2), checkpoints
    every 2 steps. Both subprocess tests compare with it (and it fills the compilation cache)."""
    data_dir, _ = micro_synth
    workdir = tmp_path_factory.mktemp("reference_run")
    proc = subprocess.run(_train_cmd(workdir, data_dir, *_ref_args(jax_cache, init_checkpoint)),
                          env=_env(2, jax_cache), capture_output=True, text=True, timeout=400)
    _check(proc, proc.stdout + proc.stderr)
    return workdir


@pytest.mark.slow
def test_kill_and_resume_continues_exactly(micro_synth, jax_cache, init_checkpoint, reference_run):
    """A run SIGKILLed right after its step-4 checkpoint is committed (before the next save starts;
    the kill does not wait on the checkpointer) and restarted resumes from step 4 and ends exactly
    like the uninterrupted run (7 steps; 5 steps make an epoch, so the resumed data position
    crosses an epoch boundary)."""
    data_dir, _ = micro_synth
    workdir = jax_cache.parent / "killed_run"
    cmd = _train_cmd(workdir, data_dir, *_ref_args(jax_cache, init_checkpoint), signal_at=("KILL", 4))
    killed = subprocess.run(cmd, env=_env(2, jax_cache), capture_output=True, text=True, timeout=300)
    _check(killed, killed.stdout + killed.stderr, expect=-9)
    before = _losses(workdir)
    assert max(before) == 4, "the killed run logged steps 1..4"
    resumed = subprocess.run(_train_cmd(workdir, data_dir, *_ref_args(jax_cache, init_checkpoint)),
                             env=_env(2, jax_cache), capture_output=True, text=True, timeout=300)
    _check(resumed, resumed.stdout + resumed.stderr)
    assert _resumed_from(resumed.stdout + resumed.stderr) == 4
    want, got = _losses(reference_run), _losses(workdir)
    assert sorted(want) == sorted(got) == list(range(1, 8))
    assert got == want, (got, want)
    for s in range(1, 5):  # the steps the killed run did before dying are the same too
        assert before[s] == want[s]
    a, b = _final_params(reference_run / "checkpoints" / "7"), _final_params(workdir / "checkpoints" / "7")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, data_dir, args, jax_cache, signal_at: dict | None = None) -> list[tuple[int, str]]:
    """The README's pod command, one process per (local) host: (exit status, output) of each."""
    port = _free_port()
    outs = [tempfile.TemporaryFile("w+") for _ in range(2)]
    procs = [subprocess.Popen(_train_cmd(workdir, data_dir, *args, "--distributed", "--coordinator",
                                         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                                         signal_at=(signal_at or {}).get(i)),
                              env=_env(1, jax_cache), stdout=outs[i], stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for f in outs:
        f.seek(0)
    return [(rc, f.read()) for rc, f in zip(codes, outs)]


@pytest.mark.slow
def test_two_processes_train_like_one(micro_synth, jax_cache, init_checkpoint, reference_run, tmp_path):
    """The README's pod command in two processes (jax.distributed on 127.0.0.1, gloo), one CPU
    device each, from the --init-checkpoint that one process saved from an 8-device mesh, on the
    reference run's mesh (fsdp=2: params and optimizer state split ACROSS the processes) and global
    batch 8, each reading its half of every batch. A SIGTERM to process 1 after step 1 stops BOTH
    after the same step (3), saved, with exit 143; rerunning the command resumes there and trains to
    step 6: losses and params equal the single-process run's. Both runs train from cached latents
    (the first computes them together and writes the file, the rerun reads it), the reference run
    encodes the images in every step. Then they evaluate the test split together (guidance
    deduplicated: one UNet pass per step): the same metrics as one process evaluating the saved
    checkpoint."""
    data_dir, ds = micro_synth
    workdir = tmp_path / "multi"
    args = (*_ref_args(jax_cache, init_checkpoint), "--steps", "6", "--save-every", "6", "--eval-split", "test",
            "--eval-at-end", "true", "--eval-comparator", "pixel_l1", "--eval-batch-size", "8", "--cache-latents")
    stopped = _two_processes(workdir, data_dir, args, jax_cache, signal_at={1: ("TERM", 1)})
    for rc, out in stopped:
        assert rc == 143, "\n=====\n".join(o[-5000:] for _, o in stopped)
        assert "stopped by SIGTERM after step 3" in out, out[-3000:]
    assert "process 1 of 2, 1 local / 2 global devices" in stopped[1][1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
    assert all("computing the VAE posterior moments of 40 train images" in out for _, out in stopped)
    resumed = _two_processes(workdir, data_dir, args, jax_cache)
    for rc, out in resumed:
        assert rc == 0, out[-6000:]
        assert _resumed_from(out) == 3
        assert "latent moments of 40 train images from" in out
        assert "guidance: 1 UNet pass(es) per DDIM step" in out
    want, got = _losses(reference_run), _losses(workdir)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
    a, b = _final_params(reference_run / "checkpoints" / "6"), _final_params(workdir / "checkpoints" / "6")
    mask = _flat(trainable_mask(DiAD(MICRO).abstract_params()))
    for k in a:
        if not mask[k]:
            assert np.array_equal(a[k], b[k]), k  # frozen: untouched by both
            continue
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-4 * LR, err_msg=k)
    two = read_metrics(workdir / "metrics.jsonl", kind="eval_test")
    assert [r["step"] for r in two] == [6]
    import diad_jax
    from diad_jax.evaluation import evaluate
    one = evaluate(diad_jax.load(workdir / "checkpoints" / "6"), ds, progress=False).metrics["mean"]
    for k, v in one.items():
        assert two[0][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_the_module_runs_in_one_xdist_group(request):
    """Under `make test` (xdist, --dist loadgroup) this module's tests share one worker, so its module
    fixtures (compiled steps, the reference run) are built once; pytest-xdist 3.8 groups only under pytest < 9."""
    if request.config.getoption("loadgroup", False):
        assert request.node.nodeid.endswith("@train"), request.node.nodeid


def test_train_t_max_limits_the_noise_levels_trained_on():
    """t ~ U{0..t_max-1} per example: every drawn level is below t_max and they spread over it."""
    seen = []

    class Recorder:  # stands in for DiAD: records the timesteps the loss asks eps for
        config = ModelConfig.tiny()

        def encode_moments(self, params, images):
            z = jnp.zeros((images.shape[0], 4, 8, 8))
            return z, z

        def eps(self, params, x_t, t, context, hint):
            seen.append(np.asarray(t))
            return jnp.zeros_like(x_t)

    images = jnp.zeros((512, 3, 64, 64))
    for t_max, expect_max in ((300, 299), (None, 999)):
        seen.clear()
        diffusion_loss(Recorder(), DiffusionConfig(), {}, {}, None, images, jnp.arange(512), jax.random.key(0),
                       t_max=t_max)
        t = seen[0]
        assert t.min() >= 0 and t.max() <= expect_max and t.max() > 0.9 * expect_max
    with pytest.raises(ValueError, match="train_t_max must be an integer in 1..1000"):
        TrainConfig(train_t_max=1001)


def test_evaluating_without_resnet_weights_needs_an_opt_in_or_a_weight_free_comparator():
    cfg = TrainConfig().replace(**{"validation.at_end": True})  # evaluates; no --init-checkpoint: no ResNet-50
    with pytest.raises(ConfigError, match=r"no ResNet-50 weights.*validation.resnet=random.*eval.comparator=pixel_l1"):
        check_eval_resnet(cfg, has_resnet=False)
    check_eval_resnet(cfg.replace(**{"eval.comparator": "pixel_l1"}), has_resnet=False)
    check_eval_resnet(cfg.replace(**{"validation.resnet": "random"}), has_resnet=False)
    check_eval_resnet(cfg, has_resnet=True)
