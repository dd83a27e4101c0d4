"""Training: sharded steps vs one device, partition rules, trainable subset, kill-and-resume,
restore onto another mesh, real multi-process training, and the loss going down.

Everything uses ModelConfig.tiny() on the generated dataset at 64 px; the in-process tests run on
the 8 forced CPU devices conftest.py sets up; subprocess tests set their own XLA_FLAGS."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from diad_jax import data
from diad_jax import sharding as shd
from diad_jax.configs import ModelConfig, TrainConfig
from diad_jax.models.diad import DiAD, combine, partition, trainable_mask
from diad_jax.train import Checkpointer, StepFactory, TrainState, model_metadata, random_context, read_metrics

ROOT = Path(__file__).resolve().parents[1]
SYNTH = dict(train_per_class=8, test_per_class=4)   # 40 train images, 20 test
BATCH = 8
LR = 1e-3  # larger than the reference's 1e-5 so a few steps visibly train


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth_data")
    ds = data.prepare("synthetic", d, image_size=64, **SYNTH)
    return d, ds


@pytest.fixture(scope="module")
def setup(synth):
    """Model, initial host params, context, and two fixed global batches (host numpy)."""
    _, ds = synth
    cfg = TrainConfig.tiny(batch_size=BATCH, learning_rate=LR)
    model = DiAD(ModelConfig.tiny())
    params = jax.device_get(model.init(seed=0))
    ctx = random_context(model.config)
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


def run_steps(f: StepFactory, params, ctx, batches, n: int):
    trainable, frozen = f.split(params)
    state = f.init_state(trainable)
    context = f.place_context(ctx)
    losses = []
    for b in batches[:n]:
        state, m = f.step(state, frozen, context, shd.shard_batch(b, f.mesh))
        losses.append(float(m["loss"]))
    return state, frozen, losses


@pytest.fixture(scope="module")
def single(setup):
    cfg, model, params, ctx, batches = setup
    f = factory(setup, 1, 1)
    state, frozen, losses = run_steps(f, params, ctx, batches, 2)
    return jax.device_get(state), jax.device_get(frozen), losses


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


# ---- sharded step == single-device step --------------------------------------------------------
@pytest.mark.parametrize("mesh_shape", [(2, 4), (8, 1)], ids=["data2_fsdp4", "data8"])
def test_sharded_step_matches_single_device(setup, single, mesh_shape):
    cfg, model, params, ctx, batches = setup
    ref_state, _, ref_losses = single
    state, _, losses = run_steps(factory(setup, *mesh_shape), params, ctx, batches, 2)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    got, want = _flat(jax.device_get(state.params)), _flat(ref_state.params)
    assert got.keys() == want.keys()
    # Adam's moments are linear in the gradients: they must agree to float tolerance
    for name in ("mu", "nu"):
        m_got = _flat(jax.device_get(getattr(state.opt_state[0], name)))
        m_want = _flat(getattr(ref_state.opt_state[0], name))
        scale = max(float(np.max(np.abs(v))) for v in m_want.values())
        for k in m_want:
            np.testing.assert_allclose(m_got[k], m_want[k], rtol=1e-3, atol=1e-5 * scale, err_msg=f"{name} {k}")
    # Params: Adam divides by sqrt(nu), which turns gradients that are zero up to rounding (~1e-11,
    # e.g. biases right before a GroupNorm) into updates of either sign; compare everywhere else.
    mu = _flat(ref_state.opt_state[0].mu)
    n_noise = 0
    for k in want:
        d = np.abs(got[k] - want[k])
        real = np.abs(mu[k]) > 1e-9
        n_noise += int((~real).sum())
        assert np.all(d[real] <= 1e-3 * LR), f"{k}: max |sharded - single| = {d[real].max():.3g}"
        assert np.all(d <= 4 * LR), k
    assert n_noise < 1e-3 * sum(v.size for v in want.values())


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


def test_loss_goes_down(setup, synth):
    """A fixed held-out batch and noise: the loss after 30 steps (lr 1e-3) is clearly lower."""
    cfg, model, params, ctx, batches = setup
    _, ds = synth
    f = factory(setup, 1, 1)
    eval_loss = jax.jit(f.loss)
    trainable, frozen = f.split(params)
    state = f.init_state(trainable)
    context = f.place_context(ctx)
    held = {"image": jnp.asarray(batches[2]["image"]), "index": jnp.arange(BATCH) + 1000}
    key = jax.random.PRNGKey(123)
    before = float(eval_loss(state.params, frozen, context, held, key))
    it = iter(data.train_dataset(ds, BATCH, seed=1, shard_index=0, shard_count=1))
    losses = []
    for _ in range(30):
        b = next(it)
        state, m = f.step(state, frozen, context, shd.shard_batch({"image": b["image"], "index": b["index"]}, f.mesh))
        losses.append(float(m["loss"]))
    after = float(eval_loss(state.params, frozen, context, held, key))
    assert np.isfinite(losses).all()
    assert after < 0.8 * before, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:5])


# ---- checkpoints -------------------------------------------------------------------------------
def test_restore_onto_a_different_mesh(setup, single, tmp_path):
    """Save from a data=8 mesh, restore onto data=2 x fsdp=4: same values, the new mesh's shardings."""
    cfg, model, params, ctx, batches = setup
    f8, f24 = factory(setup, 8, 1), factory(setup, 2, 4)
    state, frozen, _ = run_steps(f8, params, ctx, batches, 1)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, async_save=True)
    meta = model_metadata(model.config, False)
    ckpt.save(1, state=state, frozen=frozen, context=f8.place_context(ctx), resnet=None, model_meta=meta,
              train_config={"step": 1})
    ckpt.wait()
    a_params = shd.with_shardings(combine(f24.abstract_trainable, f24.abstract_frozen),
                                  combine(f24.trainable_shardings, f24.frozen_shardings))
    a_ctx = jax.ShapeDtypeStruct(ctx.shape, jnp.float32, sharding=shd.replicated(f24.mesh))
    r_state, r_params, r_ctx, _, _ = ckpt.restore(1, abstract_state=f24.abstract_state_with_shardings(),
                                                  abstract_params=a_params, abstract_context=a_ctx)
    ckpt.close()
    assert int(r_state.step) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(r_state))):
        assert np.array_equal(a, b)
    for (path, x), want in zip(jax.tree_util.tree_leaves_with_path(r_params),
                               jax.tree.leaves(combine(f24.trainable_shardings, f24.frozen_shardings))):
        assert x.sharding == want, shd.path_str(path)
    np.testing.assert_array_equal(np.asarray(r_ctx), ctx)
    # the restored state trains on the new mesh exactly like the original on its own
    _, r_frozen = partition(r_params)
    s_new, m_new = f24.step(r_state, r_frozen, r_ctx, shd.shard_batch(batches[1], f24.mesh))
    s_old, m_old = f8.step(state, frozen, f8.place_context(ctx), shd.shard_batch(batches[1], f8.mesh))
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
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL="3")
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _train_cmd(workdir, data_dir, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--workdir", str(workdir), "--data-dir",
            str(data_dir), "--dataset-option", f"train_per_class={SYNTH['train_per_class']}",
            "--dataset-option", f"test_per_class={SYNTH['test_per_class']}", "--lr", str(LR),
            "--log-every", "1", "--eval-split", "none", "--no-progress", *extra]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, expect: int = 0):
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{out[-6000:]}"


def _losses(workdir) -> dict[int, float]:
    """step -> loss, the last logged value of each step (a resumed run re-logs steps after its checkpoint)."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl")}


def _final_params(path):
    from diad_jax.checkpoints import load_model
    return _flat(load_model(path).params)


@pytest.mark.slow
def test_kill_and_resume_continues_exactly(synth, tmp_path):
    """7 uninterrupted steps == a run SIGKILLed at step 5 (checkpoints every 2 steps) and resumed."""
    data_dir, _ = synth
    cache = tmp_path / "jax_cache"
    common = ("--steps", "7", "--save-every", "2", "--batch-size", "4", "--mesh-data", "1", "--mesh-fsdp", "2")
    full = subprocess.Popen(_train_cmd(tmp_path / "full", data_dir, *common), env=_env(2, cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = subprocess.run(_train_cmd(tmp_path / "resumed", data_dir, *common, "--kill-at-step", "5"),
                            env=_env(2, cache), capture_output=True, text=True, timeout=300)
    _check(killed, killed.stdout + killed.stderr, expect=-9)
    before = _losses(tmp_path / "resumed")
    assert max(before) == 5, "the killed run logged steps 1..5"
    resumed = subprocess.run(_train_cmd(tmp_path / "resumed", data_dir, *common), env=_env(2, cache),
                             capture_output=True, text=True, timeout=300)
    _check(resumed, resumed.stdout + resumed.stderr)
    out_full, _ = full.communicate(timeout=300)
    _check(full, out_full)
    log = resumed.stdout + resumed.stderr
    assert "resumed from" in log
    resumed_from = int(log.split("resumed from ")[1].split("(step ")[1].split(")")[0])
    assert resumed_from in (2, 4)
    want, got = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(want) == sorted(got) == list(range(1, 8))
    assert got == want, (got, want)
    for s in range(1, 6):  # the steps the killed run already did were recomputed identically
        assert before[s] == want[s]
    a, b = _final_params(tmp_path / "full" / "checkpoints" / "7"), _final_params(tmp_path / "resumed" / "checkpoints" / "7")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(synth, tmp_path):
    """Two processes (jax.distributed on 127.0.0.1, gloo), 2 CPU devices each, mesh data=2 x fsdp=2,
    each reading its half of every batch, train 3 steps and checkpoint; the params equal one process
    with 4 devices on the full batch."""
    data_dir, _ = synth
    common = ("--steps", "3", "--save-every", "3", "--batch-size", "8", "--mesh-data", "2", "--mesh-fsdp", "2")
    port = _free_port()
    procs = [subprocess.Popen(_train_cmd(tmp_path / "multi", data_dir, *common, "--distributed", "--coordinator",
                                         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)),
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    single = subprocess.run(_train_cmd(tmp_path / "single", data_dir, *common), env=_env(4),
                            capture_output=True, text=True, timeout=400)
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        _check(p, out)
    _check(single, single.stdout + single.stderr)
    assert "process 1 of 2" in outs[1]
    want, got = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)], rtol=1e-5)
    a, b = _final_params(tmp_path / "single" / "checkpoints" / "3"), _final_params(tmp_path / "multi" / "checkpoints" / "3")
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-3 * LR, err_msg=k)
    # both processes read different halves: the data iterator states were saved per process
    data_files = sorted(p.name for p in (tmp_path / "multi" / "checkpoints" / "3" / "data").iterdir())
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
