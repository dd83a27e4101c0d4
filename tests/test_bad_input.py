"""The bad-input sweep: every case is a user mistake or a hostile input, run the way a user runs it
(the CLIs' main() in-process, a few as real subprocesses), and each must end with exit status 2
and one `error:` line naming the flag, file or key at fault, no traceback, and nothing silently
wrong. Numbers refer to the cases of the sweep (README, "Troubleshooting")."""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

from diad_jax import checkpoints, data
from diad_jax import sharding as shd
from diad_jax.configs import ModelConfig, TrainConfig
from diad_jax.convert.ldm import ConversionError, params_to_ldm, stored_dtype
from diad_jax.convert.pipeline import convert_diad, summarize
from diad_jax.convert.torch_io import read_state_dict
from diad_jax.data.imageio import read_image, read_mask, read_pair
from diad_jax.errors import CheckpointError, ConfigError, NonFiniteError
from diad_jax.evaluation import EvalResult
from diad_jax.models.diad import DiAD
from diad_jax.scoring import check_finite_maps
from diad_jax.train import Hook, Trainer
from diad_jax.train.workdir_lock import WorkdirLock

from tests import oracle
from tests.conftest import MICRO, xla_flags
from tests.scripts import run_script
from tests.test_data import _write_mask, _write_rgb, make_mvtec

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["bottle", "grid"]  # the classes make_mvtec writes


def cli(name: str, argv, capsys, stdout: list | None = None) -> tuple[int, str]:
    """A CLI's main(argv) in-process (`name`: scripts/<name>.py, or e.g. "convert/torch_to_flax")
    -> (exit status, stderr); argparse's own exits included. `stdout` collects what it printed."""
    try:
        rc = run_script(name, argv)
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    if stdout is not None:
        stdout.append(captured.out)
    return rc, captured.err


def assert_user_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err[-3000:]
    for n in needles:
        assert n in err, (n, err[-3000:])


def make_folder_dataset(root: Path, n_normal: int = 6, size: int = 32) -> Path:
    for cls in ("widget", "gadget"):
        for i in range(n_normal):
            _write_rgb(str(root / cls / "normal" / f"n{i}.png"), (size, size))
        _write_rgb(str(root / cls / "anomalous" / "a0.png"), (size, size))
        _write_mask(str(root / cls / "masks" / "a0.png"), (size, size))
    return root


@pytest.fixture
def micro_json(tmp_path) -> Path:
    path = tmp_path / "micro.json"
    path.write_text(MICRO.to_json())
    return path


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    return f


# ---- 4 (and 6, 10): arguments are checked first, each error names its flag ---------------------
def test_train_argument_errors(tmp_path, a_file, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"steps": 3,}')
    base = ["--data-dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "run")]
    cases = [
        (["--batch-size", "0"], ["--batch-size must be >= 1", "got 0"]),
        (["--steps", "-3"], ["--steps must be >= 1", "got -3"]),
        (["--lr", "nan"], ["--lr must be a finite number, got nan"]),
        (["--lr", "-1"], ["--lr must be > 0, got -1.0"]),
        (["--ema-decay", "1.5"], ["--ema-decay must be in (0, 1)", "got 1.5"]),
        (["--config", str(tmp_path / "missing.json")], ["--config", "missing.json"]),
        (["--config", str(bad_json)], ["bad.json", "not valid JSON (line 1, column 13"]),
        (["--init-checkpoint", str(tmp_path / "nope")], ["--init-checkpoint", "no such checkpoint folder"]),
        (["--dataset", "nope"], ["--dataset must be one of", "synthetic", "got 'nope'"]),
        (["--dataset-option", "foo=1"], ["['foo']", "--dataset-option"]),
        (["--model", "nope"], ["--model nope"]),
        (["--dataset", "mvtec_ad", "--manual-dir", str(tmp_path / "no_such_dir")], ["--manual-dir", "no such folder"]),
        (["--workdir", str(a_file / "run")], ["--workdir", "not a writable folder"]),
        (["--mesh-data", "3"], ["mesh data=3", "--mesh-data"]),  # 8 devices in the tests
    ]
    for argv, needles in cases:
        rc, err = cli("train", [*base, *argv], capsys)
        assert_user_error(rc, err, *needles)
    assert not (tmp_path / "data").exists()  # nothing was prepared for any of them


def test_other_scripts_argument_errors(tmp_path, a_file, capsys):
    rc, err = cli("finetune_autoencoder", ["--steps", "60000", "--workdir", tmp_path / "ae"], capsys)
    assert_user_error(rc, err, "--steps 60000 reaches --disc-start 50001")
    rc, err = cli("finetune_autoencoder", ["--lpips-vgg16", a_file], capsys)
    assert rc == 2 and "give both --lpips-vgg16 and --lpips-lin" in err
    # demo.py checks every stage's batch against the devices before the first stage runs
    rc, err = cli("demo", ["--batch-size", "3", "--workdir", tmp_path / "demo", "--data-dir", tmp_path / "d"],
                  capsys)
    assert_user_error(rc, err, "--batch-size 3 must be a multiple of the 8 devices")
    assert not (tmp_path / "d").exists() and not (tmp_path / "demo").exists()
    rc, err = cli("demo", ["--workdir", a_file / "demo", "--data-dir", tmp_path / "d"], capsys)
    assert_user_error(rc, err, "--workdir", "not a writable folder")
    for argv, needle in [(["--ddim-steps", "0"], "--ddim-steps must be in 1..1000, got 0"),
                         (["--ddim-steps", "1001"], "--ddim-steps must be in 1..1000, got 1001"),
                         (["--ddim-steps", "3"], "--ddim-steps=3"),
                         (["--batch-size", "0"], "--batch-size must be >= 1 (an integer), got 0"),
                         (["--sigma", "nan"], "--sigma must be a finite number, got nan"),
                         (["--dataset", "mvtec_ad", "--overwrite-data"], "--overwrite-data needs --manual-dir")]:
        rc, err = cli("evaluate", ["--checkpoint", "random:tiny", "--out", tmp_path / "o", *argv], capsys)
        assert rc == 2 and needle in err and "Traceback" not in err, (argv, err[-2000:])
    # 5: --out is checked before the model is loaded or any data prepared
    rc, err = cli("evaluate", ["--checkpoint", "random:tiny", "--out", a_file / "eval", "--data-dir", tmp_path / "d"],
                  capsys)
    assert_user_error(rc, err, "--out", "not a writable folder")
    assert not (tmp_path / "d").exists()
    rc, err = cli("evaluate", ["--checkpoint", tmp_path / "nope", "--out", tmp_path / "o"], capsys)
    assert_user_error(rc, err, "--checkpoint", "nope: no such checkpoint folder")
    # predict checks its --input before it makes --out
    rc, err = cli("predict", ["--checkpoint", "random:tiny", "--input", tmp_path / "nope", "--out", tmp_path / "p"],
                  capsys)
    assert_user_error(rc, err, "nope: no such file or folder")
    assert not (tmp_path / "p").exists()


def test_user_errors_in_a_real_process_have_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--batch-size", "0"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert_user_error(proc.returncode, proc.stderr, "--batch-size must be >= 1", "got 0")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--checkpoint",
                           str(tmp_path / "nope")], capture_output=True, text=True, env=env, timeout=120)
    assert_user_error(proc.returncode, proc.stderr, "--checkpoint")


def test_a_distributed_start_with_a_process_missing_exits_2_naming_it(tmp_path):
    """Processes 0 and 2 of 3 start, 1 never does: after --distributed-timeout both exit 2 naming
    process 1 (JAX's own start-up would wait 300 s, then abort without a name); a process whose
    coordinator never starts says so."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(1))

    def start(process_id: int, num_processes: int, port: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), "--workdir", str(tmp_path / "w"),
                                 "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                 str(num_processes), "--process-id", str(process_id), "--distributed-timeout", "3"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    procs = [start(0, 3, port), start(2, 3, port), start(1, 2, port + 1)]  # the last one's coordinator never starts
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert_user_error(procs[0].returncode, errs[0], "after 3 s, still waiting for process(es) 1 of 3 to start",
                      "started: 0, 2")
    assert_user_error(procs[1].returncode, errs[1], "after 3 s, still waiting for process(es) 1 to start")
    assert_user_error(procs[2].returncode, errs[2], f"the coordinator (process 0) at 127.0.0.1:{port + 1} never "
                                                    f"answered")


# ---- 1 + 6: a folder dataset with the default preset; a NaN loss stops the run -----------------
def test_folder_dataset_trains_with_the_preset_and_a_nan_loss_stops_it(tmp_path, micro_json, capsys):
    root = make_folder_dataset(tmp_path / "folder")
    workdir = tmp_path / "run"
    # lr 1e30: the first update is finite, the second step's loss overflows
    rc, err = cli("train", ["--model", micro_json, "--dataset", "folder", "--manual-dir", root,
                            "--data-dir", tmp_path / "data",
                            "--workdir", workdir, "--lr", "1e30", "--steps", "6", "--save-every", "1",
                            "--log-every", "3", "--eval-split", "none", "--no-progress"], capsys)
    assert_user_error(rc, err, "training stopped at step 2", f"last good checkpoint is {workdir}/checkpoints/1")
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]  # kept, and nothing non-finite saved after it
    cfg = json.loads((workdir / "train_config.json").read_text())
    assert cfg["data"]["dataset"] == "folder" and cfg["data"]["options"] == {}  # the preset's options did not leak


# ---- 7, 8, 10: Ctrl-C with a non-finite loss pending, a damaged checkpoint, a changed --ema-decay ----
class CtrlCAfter(Hook):
    """A real SIGINT to this process once step `step` is done."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, trainer, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupt_saves_nothing_non_finite_then_damaged_checkpoint_falls_back(tmp_path, micro_json, capfd):
    data_dir = tmp_path / "data"
    cfg = TrainConfig.tiny(model=str(micro_json), workdir=str(tmp_path / "run"), steps=10, log_every=10, **{
        "data.data_dir": str(data_dir), "data.batch_size": 2, "checkpoint.save_every": 5, "validation.split": None,
        "data.options": dict(train_per_class=2, test_per_class=2)})
    mesh = shd.make_mesh(1, 1, jax.devices()[:1])
    trainer = Trainer(cfg, mesh=mesh)
    step_fn, calls = trainer.factory.step, []

    def nan_loss_at_step_6(*args):
        calls.append(1)
        state, metrics = step_fn(*args)
        return state, ({**metrics, "loss": metrics["loss"] * np.nan} if len(calls) == 6 else metrics)

    trainer.factory.step = nan_loss_at_step_6
    # Ctrl-C while step 6's NaN loss is not yet fetched: the run stops after step 8 (the step all processes
    # agree on), and its save goes through the non-finite check like a periodic one
    with pytest.raises(NonFiniteError, match=r"training stopped at step 6: loss = nan.*checkpoints/5 \(kept"):
        trainer.run(hooks=(CtrlCAfter(6),))
    trainer.close()
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["5"]  # nothing of step 6 or later, no temporary folder

    # a newer checkpoint whose array files are gone: resume falls back to step 5 and sets it aside
    shutil.copytree(ckpts / "5", ckpts / "6")
    for f in (ckpts / "6" / "train_state").rglob("d/*"):
        f.unlink()
    capfd.readouterr()
    trainer = Trainer(cfg, mesh=mesh)
    assert trainer.step == 5
    trainer.close()
    out = capfd.readouterr()
    assert "Traceback" not in out.err and "Event loop is closed" not in out.err
    assert sorted(os.listdir(ckpts)) == ["5"] and os.listdir(tmp_path / "run" / "checkpoints_unrestorable") == ["6"]

    # a second run into a workdir in use: exit 2 naming the holder, before any work
    holder = WorkdirLock(tmp_path / "run", 0)
    try:
        rc, err = cli("train", ["--model", micro_json, "--workdir", tmp_path / "run", "--data-dir", data_dir,
                                "--eval-split", "none", "--no-progress"], capfd)
    finally:
        holder.release()
    assert_user_error(rc, err, f"{tmp_path / 'run'} is in use by another training run (pid {os.getpid()} on ")

    # 10: EMA switched on for a run whose checkpoints have none
    with pytest.raises(ConfigError, match=r"optimizer.ema_decay \(on/off\): checkpoint False, this run True"):
        Trainer(cfg.replace(**{"optimizer.ema_decay": 0.99}), mesh=mesh)

    # 8: a model checkpoint with a missing file: one line naming the checkpoint, item and array
    broken = tmp_path / "broken"
    shutil.copytree(ckpts / "5", broken)
    for f in (broken / "state").rglob("d/*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"broken: cannot restore the model weights \(state item\): "
                                              r"array \".*\" is unreadable"):
        checkpoints.load_model(broken)


def test_a_failed_restore_silences_its_aborted_reads_only_while_it_runs(tmp_path, monkeypatch, caplog):
    """A damaged model checkpoint fails with one CheckpointError; the echoes of the reads the
    failure aborted ('Event loop is closed', 'never retrieved') are dropped while the restore runs,
    and sys.unraisablehook, asyncio's log filters and the warning filters are as before after it."""
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), DiAD(MICRO).abstract_params())
    path = checkpoints.save_model(tmp_path / "ckpt", config=MICRO, params=params,
                                  context=checkpoints.default_context(MICRO), kind="detector")
    for f in (path / "state").rglob("d/*"):
        f.unlink()
    unraisable = []
    hook = unraisable.append
    monkeypatch.setattr(sys, "unraisablehook", hook)
    warning_filters, asyncio_filters = list(warnings.filters), list(logging.getLogger("asyncio").filters)
    for _ in range(2):  # the second restore starts from what the first left behind
        with pytest.raises(CheckpointError, match=r"ckpt: cannot restore the model weights \(state item\): "
                                                  r"array \".*\" is unreadable"):
            checkpoints.load_model(path)
        assert sys.unraisablehook is hook and warnings.filters == warning_filters
        assert logging.getLogger("asyncio").filters == asyncio_filters
    gc.collect()
    assert unraisable == [] and "never retrieved" not in caplog.text


# ---- 2: the prepared-data cache knows its source --------------------------------------------------
def test_prepared_copies_are_keyed_by_source_and_refuse_a_changed_one(tmp_path):
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    make_mvtec(str(a))
    make_mvtec(str(b))  # the same class names, other images
    ds_a = data.prepare("mvtec_ad", cache, manual_dir=a, classes=CLASSES, image_size=16)
    ds_b = data.prepare("mvtec_ad", cache, manual_dir=b, classes=CLASSES, image_size=16)
    assert ds_a.path != ds_b.path
    assert ds_a.source["path"] == str(a) and ds_b.source["path"] == str(b)
    assert not np.array_equal(ds_a["test"][0]["image"], ds_b["test"][0]["image"])
    with pytest.raises(data.DataError, match=r"2 copies .* \(manual_dir\)"):
        data.load("mvtec_ad", cache, classes=CLASSES, image_size=16)
    # a changed source folder is refused, never reused; --overwrite-data prepares it again
    first = a / "bottle" / "test" / "good" / "000.png"
    new_image = _write_rgb(str(first), (40, 40))
    with pytest.raises(data.DataError, match=r"folder has changed since .* \(overwrite=True\)"):
        data.prepare("mvtec_ad", cache, manual_dir=a, classes=CLASSES, image_size=16)
    ds_a2 = data.prepare("mvtec_ad", cache, manual_dir=a, classes=CLASSES, image_size=16, overwrite=True)
    i = [data.as_text(ex["filename"]) for ex in (ds_a2["test"][j] for j in range(len(ds_a2["test"])))].index(
        "bottle/test/good/000.png")
    np.testing.assert_array_equal(ds_a2["test"][i]["image"], data.resize_image(new_image, 16))
    with pytest.raises(data.DataError, match="takes no source folder"):
        data.prepare("synthetic", cache, manual_dir=a)
    # a data_dir inside the source folder is not part of the source
    inside = data.prepare("mvtec_ad", b / "prepared", manual_dir=b, classes=CLASSES, image_size=16)
    assert data.prepare("mvtec_ad", b / "prepared", manual_dir=b, classes=CLASSES, image_size=16).path == inside.path


def test_evaluate_records_the_source_lists_skipped_files_and_keeps_results(tmp_path, capsys, monkeypatch):
    """evaluate.py on a second dataset with the same class names in the same --data-dir scores the
    second one (results.json names it), --skip-bad lists the unreadable file, and an --out that
    fails at save time still leaves the results (printed first, then saved elsewhere)."""
    a, b, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    make_mvtec(str(a))
    make_mvtec(str(b))
    (b / "grid" / "test" / "good" / "999.png").write_bytes(b"not a png")
    data.prepare("mvtec_ad", cache, manual_dir=a, classes=CLASSES, image_size=MICRO.image_size)
    ckpt = tmp_path / "ckpt"
    checkpoints.save_model(ckpt, config=MICRO, params=DiAD(MICRO).init(seed=3), kind="detector",
                           context=checkpoints.default_context(MICRO))
    real_save = EvalResult.save

    def save_fails_in_out(self, out_dir):
        if Path(out_dir) == tmp_path / "out":
            raise OSError(28, "No space left on device")
        return real_save(self, out_dir)

    argv = ["--checkpoint", ckpt, "--dataset", "mvtec_ad", "--manual-dir", b, "--data-dir", cache, "--classes",
            *CLASSES, "--skip-bad", "--ddim-steps", "1", "--batch-size", "4", "--heatmaps", "0", "--random-resnet",
            "--out", tmp_path / "out"]
    # the reference's 256-px image-score pooling does not fit 32-px maps: said, not a JAX shape error
    rc, err = cli("evaluate", argv, capsys)
    assert_user_error(rc, err, "8 average pools of window 8 need maps larger than 56 px", "--scaled-footprint")
    monkeypatch.setattr(EvalResult, "save", save_fails_in_out)
    stdout = []
    rc, err = cli("evaluate", [*argv, "--scaled-footprint"], capsys, stdout)
    assert rc == 1 and "No space left on device" in err and "saved them to" in err
    fallback = Path(err.split("saved them to ")[1].split()[0])
    res = json.loads((fallback / "results.json").read_text())
    assert res["info"]["source"]["path"] == str(b)
    assert len(res["info"]["skipped"]) == 1 and "grid/test/good/999.png" in res["info"]["skipped"][0]
    assert len(res["images"]) == 8  # bottle 2 good + 3 anomalous, grid 1 good (+1 skipped) + 2 anomalous
    assert "| **mean** |" in stdout[0]  # the table was printed before the save was tried
    shutil.rmtree(fallback)


# ---- 3 + 6 + 10: the converters log, refuse NaN, and hint at the CLI flags -----------------------
@pytest.fixture(scope="module")
def tiny_safetensors(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_st")
    cfg = ModelConfig.tiny()
    sd = oracle.random_ldm_state_dict(cfg, seed=0)
    save_file(sd, str(d / "diad.safetensors"))
    np.save(d / "ctx.npy", np.zeros((1, cfg.context_len, cfg.unet.context_dim), np.float32))
    return d, sd


def test_converter_logs_its_summary_in_a_real_process(tiny_safetensors, tmp_path):
    d, _ = tiny_safetensors
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "convert" / "torch_to_flax.py"), "--diad-ckpt",
                           str(d / "diad.safetensors"), "--config", "tiny", "--prompt-context", str(d / "ctx.npy"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converted in" in proc.stderr and "total" in proc.stderr
    assert "no ResNet-50 weights" in proc.stderr


def test_converter_refuses_nan_weights_and_missing_torch(tiny_safetensors, tmp_path, capsys, monkeypatch):
    d, sd = tiny_safetensors
    key = sorted(k for k in sd if k.startswith("control_model."))[0]
    poisoned = dict(sd)
    poisoned[key] = np.full_like(sd[key], np.nan)
    save_file(poisoned, str(tmp_path / "nan.safetensors"))
    argv = ["--diad-ckpt", tmp_path / "nan.safetensors", "--config", "tiny", "--prompt-context", d / "ctx.npy"]
    rc, err = cli("convert/torch_to_flax", argv + ["--out", tmp_path / "o1"], capsys)
    assert_user_error(rc, err, "1 tensor(s) hold NaN or inf", key, "--allow-non-finite")
    assert not (tmp_path / "o1").exists()
    rc, err = cli("convert/torch_to_flax", argv + ["--out", tmp_path / "o2", "--allow-non-finite"], capsys)
    assert rc == 0, err
    # without --prompt-context the CLIP tower must run: without torch, say how to install it
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    rc, err = cli("convert/torch_to_flax", ["--diad-ckpt", d / "diad.safetensors", "--config", "tiny",
                                            "--out", tmp_path / "o3"], capsys)
    assert_user_error(rc, err, "pip install 'diad-jax[convert]'", "--prompt-context")


@pytest.fixture(scope="module")
def tiny_clip():
    """A one-layer CLIP text tower giving ModelConfig.tiny's 8-token context, with the int64
    position_ids buffer SD's checkpoints carry (not a weight)."""
    clip = oracle.random_clip_state_dict(ModelConfig.tiny().unet.context_dim, layers=1, positions=8)
    clip["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(8)[None]
    return clip


def _write_both(tensors: dict, stem: Path) -> list[Path]:
    """torch tensors as a .safetensors file and as a PyTorch .ckpt: both readers of the converter."""
    from safetensors.torch import save_file as save_torch
    save_torch(tensors, str(stem.with_suffix(".safetensors")))
    torch.save({"state_dict": tensors}, stem.with_suffix(".ckpt"))
    return [stem.with_suffix(".safetensors"), stem.with_suffix(".ckpt")]


def test_converter_refuses_integer_and_boolean_weights_naming_each(tiny_safetensors, tiny_clip, tmp_path, capsys):
    """A quantised source is refused, not cast into nonsense: every integer or boolean weight is
    named with its dtype (the CLIP tower's too) in one error. Both readers keep the stored dtype."""
    _, sd = tiny_safetensors
    unet = "model.diffusion_model.input_blocks.0.0.weight"
    sg = sorted(k for k in sd if k.startswith("control_model.") and k.endswith(".bias"))[0]
    clip = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    tensors = {k: torch.from_numpy(v) for k, v in {**sd, **tiny_clip}.items()}
    tensors[unet] = torch.from_numpy((sd[unet] * 100).astype(np.int8))
    tensors[sg] = torch.from_numpy(sd[sg] > 0)
    tensors[clip] = tensors[clip].to(torch.int8)
    st, ckpt = _write_both(tensors, tmp_path / "quantised")
    rc, err = cli("convert/torch_to_flax", ["--diad-ckpt", st, "--config", "tiny", "--out", tmp_path / "o"], capsys)
    assert_user_error(rc, err, str(st), "3 tensor(s) are not float16/bfloat16/float32/float64 (key: dtype)",
                      f"{unet}: int8", f"{sg}: bool", f"{clip}: int8")
    assert "position_ids" not in err and not (tmp_path / "o").exists()
    assert {k: stored_dtype(v) for k, v in read_state_dict(ckpt).items() if k in (unet, sg, clip)} == {
        unet: "int8", sg: "bool", clip: "int8"}


def test_converter_casts_half_and_double_weights_and_says_so(tiny_safetensors, tiny_clip, tmp_path):
    """float16 / bfloat16 / float64 weights are cast to float32 exactly, and the summary counts them;
    the CLIP tower runs beside its integer position_ids. Both readers keep the stored dtype."""
    _, sd = tiny_safetensors
    dtypes = dict(zip(sorted(k for k in sd if k.startswith("model.diffusion_model."))[:4],
                      (torch.float16, torch.bfloat16, torch.float64, torch.float64)))
    tensors = {k: torch.from_numpy(v) for k, v in {**sd, **tiny_clip}.items()}
    tensors.update({k: tensors[k].to(dtype) for k, dtype in dtypes.items()})
    st, ckpt = _write_both(tensors, tmp_path / "mixed")
    conv = convert_diad(read_state_dict(ckpt), ModelConfig.tiny(), source=str(ckpt))
    assert conv.reports["diad"].cast == {"bfloat16": 1, "float16": 1, "float64": 2}
    assert "[diad] cast to float32: 1 bfloat16 tensor, 1 float16 tensor, 2 float64 tensors" in summarize(conv)
    back, from_st = params_to_ldm(conv.params), read_state_dict(st)
    for k, dtype in dtypes.items():
        np.testing.assert_array_equal(back[k], tensors[k].float().numpy(), err_msg=k)
        assert stored_dtype(from_st[k]) == stored_dtype(tensors[k])
        np.testing.assert_array_equal(from_st[k].astype(np.float32), back[k], err_msg=k)


def test_converter_lists_every_missing_key_by_prefix(tiny_safetensors, tmp_path, capsys):
    """A source without its SG network (and CLIP tower): every missing key is listed, grouped by
    prefix with counts, whether the CLIP tower is needed (no --prompt-context) or not."""
    d, sd = tiny_safetensors
    sg = sorted(k for k in sd if k.startswith("control_model."))
    save_file({k: v for k, v in sd.items() if k not in sg}, str(tmp_path / "no_sg.safetensors"))
    argv = ["--diad-ckpt", tmp_path / "no_sg.safetensors", "--config", "tiny", "--out", tmp_path / "o"]
    rc, err = cli("convert/torch_to_flax", argv, capsys)
    assert_user_error(rc, err, f"{len(sg) + 1} missing key(s)", "    cond_stage_model.* (1):\n      "
                      "cond_stage_model.transformer.* (the whole CLIP text tower", f"    control_model.* ({len(sg)}):")
    assert {f"      {k}" for k in sg} <= set(err.splitlines())
    rc, err = cli("convert/torch_to_flax", argv + ["--prompt-context", d / "ctx.npy"], capsys)
    assert_user_error(rc, err, f"{len(sg)} missing key(s)", f"    control_model.* ({len(sg)}):")
    assert {f"      {k}" for k in sg} <= set(err.splitlines()) and "cond_stage_model" not in err


def test_conversion_error_hints_name_the_arguments_and_on_the_command_line_the_flags():
    from diad_jax.commands import convert

    e = ConversionError("x.ckpt", missing=["a"], mismatched=[("b", (1,), (2,)), ("c", (1,), (2,)), ("d", (1,), (2,))],
                        matched=1)
    assert "allow_missing / allow_unexpected" in str(e) and "--" not in str(e)
    assert "the model config (config) most likely does not fit" in str(e).splitlines()[1]
    shown = e.message(convert.build_parser().flag_of)
    assert "--allow-missing / --allow-unexpected" in shown
    assert "the model config (--config) most likely does not fit" in shown.splitlines()[1]


# ---- 6: scoring names the images whose maps are not finite -----------------------------------------
def test_non_finite_maps_name_the_images():
    maps = np.zeros((4, 8, 8), np.float32)
    maps[2, 3, 3] = np.nan
    scores = np.array([0.1, np.inf, 0.2, 0.3], np.float32)
    names = ["a.png", "b.png", "c.png", "d.png"]
    with pytest.raises(NonFiniteError, match=r"2 of 4 images .*: b\.png, c\.png$"):
        check_finite_maps(maps, scores, names.__getitem__)
    check_finite_maps(np.zeros((2, 8, 8)), np.zeros(2), names.__getitem__)  # finite: no error


# ---- 9: 16-bit grayscale and transparent images ------------------------------------------------------
def test_sixteen_bit_and_transparent_images(tmp_path, caplog):
    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    img = read_image(str(tmp_path / "g16.png"))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[..., 0], (ramp >> 8).astype(np.uint8))  # not all white
    assert img.mean() < 200
    mask16 = np.zeros((32, 32), np.uint16)
    mask16[4:8, 4:8] = 1  # any non-zero value is anomalous, also in a 16-bit mask
    Image.fromarray(mask16).save(tmp_path / "m16.png")
    assert read_mask(str(tmp_path / "m16.png")).sum() == 16 * 255
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    with caplog.at_level("WARNING"):
        img = read_image(str(tmp_path / "rgba.png"))
    assert (img[:4] == [200, 0, 0]).all() and (img[4:] == 255).all()  # composited on white
    assert "rgba.png: has transparent pixels" in caplog.text
    Image.fromarray(np.zeros((8, 8), np.float32), "F").save(tmp_path / "f.tiff")
    with pytest.raises(data.DataError, match=r"f\.tiff: 32-bit float image"):
        read_image(str(tmp_path / "f.tiff"))


# ---- EXIF orientation: images and masks are read upright, as cv2 (and a viewer) shows them ----------
def test_exif_orientation_turns_images_and_masks_upright(tmp_path):
    a = np.arange(15, dtype=np.uint8).reshape(3, 5) * 16  # 5 wide, 3 high
    upright = {1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: a.T, 6: np.rot90(a, -1),
               7: a[::-1, ::-1].T, 8: np.rot90(a)}
    for orientation, want in upright.items():
        img = Image.fromarray(a)
        exif = img.getexif()
        exif[0x0112] = orientation
        img.save(tmp_path / f"{orientation}.png", exif=exif.tobytes())
        np.testing.assert_array_equal(read_image(str(tmp_path / f"{orientation}.png"))[..., 0], want)
        np.testing.assert_array_equal(read_mask(str(tmp_path / f"{orientation}.png")) > 0, want > 0)
    # a photo stored 80x40 with orientation 6 is shown 40x80: its upright mask fits it
    photo = Image.fromarray(np.zeros((40, 80, 3), np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(tmp_path / "photo.jpg", exif=exif.tobytes())
    Image.fromarray(np.zeros((80, 40), np.uint8)).save(tmp_path / "photo_mask.png")
    assert read_image(str(tmp_path / "photo.jpg")).shape == (80, 40, 3)
    read_pair(str(tmp_path / "photo.jpg"), str(tmp_path / "photo_mask.png"), 16)  # no size mismatch


# ---- 10: --checkpoint accepts a training directory ---------------------------------------------------
def test_checkpoint_path_may_be_a_training_directory(tmp_path):
    run = tmp_path / "run"
    for sub in ("checkpoints/100", "checkpoints/200", "checkpoints/300.orbax-checkpoint-tmp-1", "best/100"):
        (run / sub / "model_config").mkdir(parents=True)
    assert checkpoints.resolve(run) == run / "best" / "100"
    shutil.rmtree(run / "best")
    assert checkpoints.resolve(run) == run / "checkpoints" / "200"
    assert checkpoints.resolve(run / "checkpoints") == run / "checkpoints" / "200"
    assert checkpoints.resolve(run / "checkpoints" / "100") == run / "checkpoints" / "100"
    with pytest.raises(CheckpointError, match=r"^checkpoint .*empty: not a diad_jax model checkpoint"):
        (tmp_path / "empty").mkdir()
        checkpoints.resolve(tmp_path / "empty", "checkpoint")
