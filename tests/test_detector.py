"""diad_jax.load -> Detector: batch-invariant scores equal to the evaluation engine's, weights placed
once (no transfers, one compile per bucket), predicting folders with bad files, thresholds, and the
refusal to load a checkpoint without ResNet-50 weights. The model is the micro config at 32 px."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

import diad_jax
from diad_jax import checkpoints, cli, data, exported
from diad_jax import sharding as shd
from diad_jax.calibration import Calibration, calibrate, threshold
from diad_jax.configs import EvalConfig, TrainConfig
from diad_jax.data.inputs import collect_inputs, read_input
from diad_jax.detector import Detector, place_bundle
from diad_jax.errors import CheckpointError, ConfigError, UserError
from diad_jax.evaluation import evaluate
from diad_jax.metrics import f1_optimal_threshold
from diad_jax.models.diad import DiAD
from diad_jax.scoring import clear_shared_programs, make_bundle, random_resnet
from diad_jax.train import Trainer, read_metrics

from tests.conftest import MICRO
from tests.scripts import run_script

pytestmark = pytest.mark.xdist_group("detector")

# two DDIM steps with eta > 0, so the per-image DDIM noise is exercised too
EVAL = EvalConfig(ddim_steps=2, eta=0.5, seed=3).scaled_footprint(MICRO.image_size)


@pytest.fixture(scope="module")
def weights():
    """MICRO params with the zero-initialised layers filled (so the SG network matters), a random
    ResNet-50 and a random context (host numpy)."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x if np.any(x) else rng.normal(0, 0.02, x.shape).astype(np.float32),
                          jax.device_get(DiAD(MICRO).init(seed=1)))
    ctx = rng.standard_normal((1, MICRO.context_len, MICRO.unet.context_dim)).astype(np.float32)
    return params, random_resnet(0), ctx


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return data.prepare("synthetic", tmp_path_factory.mktemp("data"), image_size=MICRO.image_size,
                        train_per_class=2, test_per_class=4)  # 20 test images: 3 batches of 8


def detector(weights, batch_size: int, mesh: Mesh | None = None) -> Detector:
    params, resnet, ctx = weights
    mesh = mesh or Mesh(np.array(jax.devices()[:1]), ("data",))
    return Detector(MICRO, place_bundle(make_bundle(params, resnet, ctx), mesh),
                    eval_config=EvalConfig(**{**EVAL.to_dict(), "batch_size": batch_size}), mesh=mesh)


@pytest.fixture(scope="module")
def sharded(weights, dataset):
    """evaluate() on 8 devices (data 2 x fsdp 4, params sharded by the partition rules), batch 8."""
    clear_shared_programs()  # its programs are counted: none from another test's Scorer of these settings
    det = detector(weights, 8, shd.make_mesh(2, 4))
    with jax.transfer_guard_host_to_device("disallow"):  # images go up explicitly; weights never
        result = evaluate(det, dataset, progress=False)
    return det, result


@pytest.fixture(scope="module")
def by_four(weights):
    clear_shared_programs()  # as in `sharded`
    return detector(weights, 4)  # buckets 1, 2, 4


def split_images(ds) -> list[np.ndarray]:
    return [np.asarray(ds["test"][i]["image"]) for i in range(len(ds["test"]))]


def test_scores_do_not_depend_on_batch_size_devices_or_the_loop(dataset, sharded, by_four):
    """The same image: evaluate() on 8 devices (fsdp-sharded weights) with batch 8; predict() on one
    device in batches of 4, of 1, and 7 images (4 + 3 padded to 4): equal maps and scores. No
    host-to-device transfer but the images', one compiled program per bucket."""
    det8, result = sharded
    images = split_images(dataset)
    assert result.file_names == [data.as_text(dataset["test"][i]["filename"]) for i in range(20)]
    with jax.transfer_guard_host_to_device("disallow"):
        fours = by_four.predict(images)
        ones = by_four.predict(images[:5], batch_size=1)
        seven = by_four.predict(images[:7])  # 4 + 3 padded to 4
    for preds, n in ((fours, 20), (ones, 5), (seven, 7)):
        np.testing.assert_allclose([p.score for p in preds], result.image_scores[:n], rtol=1e-5)
        np.testing.assert_allclose(np.stack([p.anomaly_map for p in preds]), result.maps[:n], rtol=1e-5, atol=1e-6)
    assert by_four.scorer.compiled_programs() == 2  # buckets 4 and 1, each compiled once
    assert det8.buckets == (8,) and det8.scorer.compiled_programs() == 1  # 3 batches, the last padded
    # the noise is per image index: the same images at other positions score differently
    shifted = by_four.predict(images[1:4])
    assert not np.allclose([p.score for p in shifted], result.image_scores[1:4], rtol=1e-4)


def test_weights_are_placed_once_with_the_partition_rules(sharded, weights):
    det, _ = sharded
    want = shd.param_shardings(weights[0], det.mesh)
    for group in ("unet", "sg", "vae"):
        for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(det.bundle[group]), jax.tree.leaves(want[group])):
            assert isinstance(x, jax.Array) and x.committed and x.sharding == s, shd.path_str(path)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(det.bundle["unet"])), "some UNet params are fsdp-sharded"
    for x in jax.tree.leaves((det.bundle["resnet"], det.bundle["context"])):
        assert x.sharding.is_fully_replicated


def test_guidance_is_decided_once_when_the_detector_is_built(weights, sharded):
    """An unconditional context equal to the context (here: a copy placed on the 8-device mesh) is
    found equal once, at build: one UNet pass per DDIM step and no note; a different one runs both
    halves, and the detector says so in its notes."""
    det, _ = sharded
    params, resnet, ctx = weights
    bundle = det.bundle
    same = Detector(MICRO, bundle, eval_config=det.eval_config, mesh=det.mesh,
                    uncond_context=shd.place(ctx.copy(), shd.replicated(det.mesh)))
    assert same.uncond_context is None and same.unet_passes_per_step == 1 and not same.notes
    other = Detector(MICRO, bundle, eval_config=det.eval_config, mesh=det.mesh, uncond_context=ctx * 0)
    assert other.uncond_context is not None and other.unet_passes_per_step == 2
    assert any("guidance runs both halves" in n for n in other.notes)


def test_predict_a_folder_with_a_corrupt_grayscale_rgba_and_16_bit_file(tmp_path, by_four):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8)).save(folder / "sub" / "gray.png")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), np.uint8)).save(folder / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 65535, (24, 24)).astype(np.uint16)).save(folder / "sub" / "deep.png")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "readme.txt").write_text("not an image")
    preds = by_four.predict(folder, original_size=True)
    names = [p.name.split("/in/")[1] for p in preds]
    assert names == ["broken.png", "rgb.png", "sub/deep.png", "sub/gray.png", "sub/rgba.png"]
    assert "cannot read image" in preds[0].error and preds[0].score is None
    for p in preds[1:]:
        assert p.error is None and np.isfinite(p.score) and p.anomaly_map.shape == (32, 32)
        assert p.original_map.shape == p.original_size and p.label is None  # not calibrated
    assert preds[1].original_size == (40, 50)
    with pytest.raises(UserError, match="no thresholds"):
        by_four.predict(folder, class_name="bottle")
    with pytest.raises(UserError, match="nope: no such file or folder"):
        by_four.predict(tmp_path / "nope")


def test_a_folder_walk_follows_links_and_lists_what_it_cannot_read(tmp_path, monkeypatch):
    """Linked folders are walked; a broken link, a link back to a folder above (a loop) and a folder
    that cannot be listed are each one unreadable entry, never a stop and never dropped."""
    folder, other = tmp_path / "in", tmp_path / "other"
    for d in (folder / "sub", folder / "locked", other):
        d.mkdir(parents=True)
    for f in (folder / "a.png", folder / "sub" / "b.png", other / "c.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(f)
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "linked").symlink_to(other)
    (folder / "sub" / "up").symlink_to(folder)
    real_scandir = os.scandir

    def scandir(path):  # a folder without read permission (the tests may run as root, who reads any)
        if path.endswith("locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    items = list(collect_inputs(folder))
    assert [name.split("/in/")[1] for name, _ in items] == ["a.png", "dangling.png", "linked/c.png", "locked",
                                                             "sub/b.png", "sub/up"]
    errors = [read_input(item, 8).error for item in items]
    assert [e is None for e in errors] == [True, False, True, False, True, False]
    assert errors[1] == f"{folder}/dangling.png: broken symbolic link (to {tmp_path}/gone.png, which does not exist)"
    assert errors[3] == f"{folder}/locked: cannot list this folder (Permission denied)"
    assert errors[5] == (f"{folder}/sub/up: a link back to {os.path.realpath(folder)}, a folder above it (a loop); "
                         f"not followed")


def test_predict_cli_lists_a_broken_link_in_a_folder_and_goes_on(tmp_path, monkeypatch, by_four):
    """The CLI scores what it collected (it stopped at a broken link when it collected the paths again)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "loop").symlink_to(folder)
    monkeypatch.setattr(cli, "load_detector", lambda *args: by_four)
    assert run_script("predict", ["--checkpoint", "random:tiny", "--input", folder, "--out", tmp_path / "out",
                                  "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert [r["file"] for r in rows] == [f"{folder}/dangling.png", f"{folder}/loop"]
    assert "dangling.png: broken symbolic link" in rows[0]["error"] and "(a loop)" in rows[1]["error"]


def brute_force_f1(scores, labels):
    best = (-1.0, None)
    for t in np.unique(scores):
        pred = scores >= t
        tp, fp, fn = np.sum(pred & labels), np.sum(pred & ~labels), np.sum(~pred & labels)
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 >= best[0]:
            best = (f1, t)
    return best


def test_thresholds_f1_optimal_or_percentile():
    rng = np.random.default_rng(0)
    for trial in range(20):
        labels = rng.random(60) < 0.3
        labels[:2] = [True, False]
        scores = np.round(rng.normal(labels * 1.0, 1.0), 1)  # ties on purpose
        t, f1 = f1_optimal_threshold(scores, labels)
        want_f1, want_t = brute_force_f1(scores, labels)
        assert f1 == pytest.approx(want_f1) and t == want_t, trial
    normal = rng.normal(size=200)
    th = threshold(normal, np.zeros(200))
    assert th.value == pytest.approx(np.percentile(normal, 99)) and th.method.startswith("percentile 99")
    assert th.normalize(th.value) == 0.5 and th.normalize(normal.max() + 10) == 1.0


def test_calibration_survives_save_and_load_and_labels_follow_it(tmp_path, weights, sharded, by_four, dataset,
                                                                caplog):
    _, result = sharded
    cal = calibrate(result)
    assert "5 class(es) have fewer than 20 images, so their thresholds are noisy: " in caplog.text  # 4 each
    scores, labels = result.image_scores, result.labels
    assert cal.image.value == f1_optimal_threshold(scores, labels)[0] and cal.image.method == "f1"
    assert set(cal.per_class) == set(dataset.class_names) and cal.pixel is not None
    # a checkpoint with thresholds: they come back with the detector
    params, resnet, ctx = weights
    ckpt = checkpoints.save_model(tmp_path / "ckpt", config=MICRO, params=params, context=ctx, resnet=resnet,
                                  kind="detector", metadata={"eval_config": EVAL.to_dict()})
    cal.save(ckpt)
    det = diad_jax.load(ckpt, batch_size=4)
    assert det.calibration == cal == Calibration.load(ckpt) and det.eval_config == EvalConfig(
        **{**EVAL.to_dict(), "batch_size": 4})
    # the thresholds belong to the scoring settings they were calibrated with: those are the default (also
    # over what the checkpoint records), and labelling under others is refused unless accepted, with a note
    assert cal.eval_config == EVAL
    checkpoints.save_model(tmp_path / "other", config=MICRO, params=params, context=ctx, resnet=resnet,
                           kind="detector", metadata={"eval_config": dataclasses.replace(EVAL, seed=9).to_dict()})
    cal.save(tmp_path / "other")
    assert diad_jax.load(tmp_path / "other").eval_config == EVAL
    from diad_jax.commands.predict import build_parser
    args = build_parser().parse_args(["--checkpoint", str(tmp_path / "other"), "--input", "x", "--out", "y"])
    assert cli.scoring_checkpoint(args)[1] == EVAL
    other = diad_jax.load(ckpt, eval_config=dataclasses.replace(EVAL, seed=4, sigma=2.0))
    with pytest.raises(ConfigError, match=r"ckpt/calibration.json: its thresholds were calibrated with other scoring "
                                          r"settings than this detector's \(sigma: 0.625 -> 2.0, seed: 3 -> 4\)"):
        other.predict(split_images(dataset)[:1])
    accepted = diad_jax.load(ckpt, eval_config=dataclasses.replace(EVAL, seed=4), accept_calibration_mismatch=True)
    assert any("calibrated with other scoring settings (seed: 3 -> 4)" in n for n in accepted.notes)
    assert diad_jax.load(ckpt, eval_config=dataclasses.replace(EVAL, batch_size=2, variant="reference")) \
        .calibration_mismatch() == {}  # batching and metric definitions do not change scores
    by_four.calibration = cal
    try:
        preds = by_four.predict(split_images(dataset)[:4], class_name=dataset.class_names[0])
        preds_global = by_four.predict(split_images(dataset)[:4])
    finally:
        by_four.calibration = None
    t_class = cal.per_class[dataset.class_names[0]].value
    assert [p.label for p in preds] == [int(p.score >= t_class) for p in preds]
    assert [p.label for p in preds_global] == [int(p.score >= cal.image.value) for p in preds_global]
    assert all((p.normalized_score >= 0.5) == bool(p.label) for p in preds_global)
    assert all(p.mask.dtype == bool and p.mask.shape == (32, 32) for p in preds)
    with pytest.raises(UserError, match="no threshold for class 'nope'"):
        by_four.calibration = cal
        try:
            by_four.predict(split_images(dataset)[:1], class_name="nope")
        finally:
            by_four.calibration = None


def test_the_inversion_method_scores_alike_everywhere_calibrates_draws_and_exports(tmp_path, weights, dataset):
    """The inversion method (issue 25) downstream: evaluate() on 8 devices (fsdp-sharded weights, no
    ResNet-50) equals predict() on one device in batches of 4 and 1; its heat maps have no
    reconstruction tile; thresholds label its predictions; its export scores as the Detector."""
    params, _, ctx = weights
    ec = dataclasses.replace(EVAL, batch_size=8).inversion()
    assert ec.method == "inversion" and not ec.needs_resnet

    def inverting(batch_size: int, mesh: Mesh) -> Detector:
        return Detector(MICRO, place_bundle(make_bundle(params, None, ctx), mesh), mesh=mesh,
                        eval_config=dataclasses.replace(ec, batch_size=batch_size))

    sharded = inverting(8, shd.make_mesh(2, 4))
    result = evaluate(sharded, dataset, heatmaps_per_class=1, progress=False)
    one = inverting(4, Mesh(np.array(jax.devices()[:1]), ("data",)))
    images = split_images(dataset)
    fours, ones = one.predict(images), one.predict(images[:3], batch_size=1)
    for preds, n in ((fours, 20), (ones, 3)):  # five inversion steps through fsdp-sharded matmuls: maps to ~3e-5
        np.testing.assert_allclose([p.score for p in preds], result.image_scores[:n], rtol=1e-4)
        np.testing.assert_allclose(np.stack([p.anomaly_map for p in preds]), result.maps[:n], rtol=1e-4, atol=1e-6)
    (_, panel), = result.panels[dataset.class_names[0]]
    assert panel.shape[1] == 3 * 256  # input | map over input | ground truth, each upscaled to 256 px
    one.calibration = calibrate(result)
    preds = one.predict(images[:4])
    assert [p.label for p in preds] == [int(p.score >= one.calibration.image.value) for p in preds]
    out = exported.load(one.export(tmp_path / "exported", platforms=("cpu",))).score(
        np.stack([p.image for p in preds]))
    assert np.abs(out.scores - [p.score for p in preds]).max() <= 1e-6
    assert np.abs(out.maps - np.stack([p.anomaly_map for p in preds])).max() <= 1e-6
    assert out.labels.tolist() == [p.label for p in preds]


def test_a_checkpoint_without_resnet_needs_an_opt_in(tmp_path, weights):
    params, _, ctx = weights
    meta = {"eval_config": EVAL.to_dict()}
    ckpt = checkpoints.save_model(tmp_path / "ckpt", config=MICRO, params=params, context=ctx, kind="detector",
                                  metadata=meta)
    with pytest.raises(CheckpointError,
                       match=r"no ResNet-50 weights.*diad-jax convert --resnet resnet50.pth.*comparator=pixel_l1.*resnet=random"):
        diad_jax.load(ckpt)
    det = diad_jax.load(ckpt, resnet="random")
    assert any("randomly initialised" in n for n in det.notes)
    # a comparator that needs no ImageNet weights: nothing random, no ResNet-50 at all
    det = diad_jax.load(ckpt, eval_config=dataclasses.replace(EVAL, comparator="pixel_l1"))
    assert det.notes == [] and "resnet" not in det.bundle
    det = diad_jax.load(ckpt, eval_config=EVAL.inversion())  # nor does the inversion method
    assert det.notes == [] and "resnet" not in det.bundle
    assert np.isfinite(det.predict([np.zeros((32, 32, 3), np.uint8)])[0].score)
    # a training run that opted in records it: its checkpoints load as they were evaluated
    opted = checkpoints.save_model(tmp_path / "opted", config=MICRO, params=params, context=ctx, kind="detector",
                                   metadata={"resnet": "random", **meta})
    assert any("randomly initialised" in n for n in diad_jax.load(opted).notes)
    with pytest.raises(Exception, match="random:tiny, random:demo or random:sd15"):
        diad_jax.load("random:huge")


def test_only_a_detector_checkpoint_scores(tmp_path, weights, capsys):
    """A start-of-training checkpoint (and one of an older version that records no kind) is refused,
    by the library and by predict before its --out exists, saying what it is."""
    params, resnet, ctx = weights
    init = checkpoints.save_model(tmp_path / "init", config=MICRO, params=params, context=ctx, kind="init")
    with pytest.raises(CheckpointError, match=r"init is a start-of-training checkpoint .* its SG network is "
                                              r"untrained, so it cannot score; train DiAD from it"):
        diad_jax.load(init)
    rc = run_script("predict", ["--checkpoint", init, "--input", tmp_path, "--out", tmp_path / "out"])
    assert rc == 2 and "is a start-of-training checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # written before the kind was recorded: a training run's metadata without an eval config
    meta_file = init / "model_config" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["kind"]
    meta_file.write_text(json.dumps({**meta, "source": "diad_jax.train"}))
    with pytest.raises(CheckpointError, match=r"is an autoencoder fine-tuning checkpoint"):
        diad_jax.load(init)


def test_trainer_evaluates_periodically_keeps_the_best_and_records_how_it_scores(tmp_path):
    """Evaluations at steps 2 and 4 with the engine; best/ holds the best one (and is replaced only by
    a better one); a checkpoint loads with the run's eval config and scores as the run evaluated it.
    The run trains from cached latents (the loop's lookup of each example's moments)."""
    micro = tmp_path / "micro.json"
    micro.write_text(MICRO.to_json())
    cfg = TrainConfig.tiny(model=str(micro), workdir=str(tmp_path / "run"), steps=4, log_every=2,
                           profile_steps=(2, 3), peak_tflops=0.5, cache_latents=True, **{
                               "data.data_dir": str(tmp_path / "data"),
                               "data.options": dict(train_per_class=2, test_per_class=2),
                               "checkpoint.save_every": 4, "validation.every": 2, "validation.at_end": True,
                               "eval.sigma": EVAL.sigma, "eval.pool_window": EVAL.pool_window})
    assert cfg.validation.resnet == "random"  # the tiny preset opts in to a random ResNet-50
    trainer = Trainer(cfg, mesh=shd.make_mesh(1, 1, jax.devices()[:1]))  # one device: the cheapest compiles
    try:
        out = trainer.run()
        # every log interval: the learning rate per step; speed, FLOPs, MFU (against --peak-tflops: a CPU is
        # not in the table) and device memory where the backend reports it (not on a CPU)
        metrics = tmp_path / "run" / "metrics.jsonl"
        assert [r["learning_rate"] for r in read_metrics(metrics)] == pytest.approx([cfg.optimizer.learning_rate] * 4)
        perf = read_metrics(metrics, kind="perf")
        assert [r["step"] for r in perf] == [2, 4]
        memory = {"memory_in_use_gib", "memory_peak_gib"} if jax.devices()[0].memory_stats() else set()
        for r in perf:
            assert set(r) == {"step", "kind", "time", "step_time_s", "images_per_s", "tflops_per_device", "mfu",
                              *memory}
            assert all(np.isfinite(r[k]) and r[k] > 0 for k in set(r) - {"step", "kind"})
            assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 0.5)
        assert trainer.flops_per_step > 1e9  # the micro model's loss + gradient on 8 images of 32 px
        # the steps read the training images' posterior moments from the cache beside the prepared data
        assert [p.name.split("-")[0] for p in (Path(trainer.dataset.path) / "latent_moments").iterdir()] == ["train"]
        assert trainer.moments.shape[0] == len(trainer.dataset.indices("train"))
        evals = read_metrics(metrics, kind="eval_test")
        assert [r["step"] for r in evals] == [2, 4]
        best = max(evals, key=lambda r: (r["val"], -r["step"]))  # the first of equal values stays
        assert trainer.checkpointer.best_step() == best["step"]
        # a worse evaluation does not replace it, a better one does
        worse = {"mean": {"p_auroc": 0.0, "i_auroc": 0.0}}
        trainer.validator.record(5, worse, trainer.model_params(), trainer.context)
        trainer.checkpointer.wait()
        assert trainer.checkpointer.best_step() == best["step"]
        trainer.validator.record(6, {"mean": {"p_auroc": 1.0, "i_auroc": 1.0}}, trainer.model_params(),
                                 trainer.context)
        trainer.checkpointer.wait()
        assert trainer.checkpointer.best_step() == 6
    finally:
        trainer.close()
    det = diad_jax.load(tmp_path / "run" / "checkpoints" / "4")
    assert det.eval_config == cfg.eval and any("randomly initialised" in n for n in det.notes)
    # --profile-steps 2:3 wrote a trace of that step (the one after the evaluation at step 2: a trace
    # that holds an evaluation's compilations takes ~15 s to write)
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb")), "no profiler trace written"
    ds = data.load_from_directory(trainer.dataset.path)
    again = evaluate(det, ds, progress=False).metrics["mean"]
    for k, v in out["eval"]["mean"].items():
        assert again[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
