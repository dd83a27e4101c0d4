"""The embedded default end to end (scripts/demo.py) with a handful of steps, and its pieces:
the extra trainable mask, the latent std (scale_by_std) and the scaled scoring footprint."""
import csv
import os
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diad_jax import autoencoder
from diad_jax import data as dataio
from diad_jax.checkpoints import load_model
from diad_jax.configs import EvalConfig, ModelConfig
from diad_jax.models.diad import DiAD, TRAINABLE_MASKS, partition
from diad_jax.scoring import Scorer, pooled_max

from tests.conftest import MICRO
from tests.scripts import run_script


def demo_main(argv):
    return run_script("demo", argv)


def test_scaled_footprint_is_the_reference_at_256_px():
    assert EvalConfig().scaled_footprint(256) == EvalConfig()
    scaled = EvalConfig().scaled_footprint(64)
    assert (scaled.sigma, scaled.pool_window) == (1.25, 2)
    maps = jnp.asarray(np.random.default_rng(0).random((2, 64, 64)), jnp.float32)
    # window 2, eight pools: 64 -> 56 px; a different window gives different scores
    x = np.asarray(maps)
    for _ in range(8):
        x = (x[:, :-1, :-1] + x[:, 1:, :-1] + x[:, :-1, 1:] + x[:, 1:, 1:]) / 4
    assert x.shape == (2, 56, 56)
    np.testing.assert_allclose(np.asarray(pooled_max(maps, window=2)), x.max(axis=(1, 2)), rtol=1e-5)
    assert not np.allclose(np.asarray(pooled_max(maps, window=8)), x.max(axis=(1, 2)))
    with pytest.raises(ValueError, match="pool_window"):
        Scorer(ModelConfig.tiny(), pool_window=0)


def test_sg_and_unet_mask():
    params = DiAD(ModelConfig.demo()).abstract_params()
    ref, full = TRAINABLE_MASKS["reference"](params), TRAINABLE_MASKS["sg+unet"](params)
    assert all(jax.tree.leaves(full["sg"])) and all(jax.tree.leaves(full["unet"]))
    assert not any(jax.tree.leaves(full["vae"]))
    # the reference mask trains the UNet decoder only; the full one adds the encoder and middle block
    assert 0 < sum(jax.tree.leaves(ref["unet"])) < len(jax.tree.leaves(full["unet"]))
    tr, fr = partition(params, full)
    assert set(tr) == {"sg", "unet"} and set(fr) == {"vae"}


def test_latent_std_is_the_std_of_posterior_samples(tmp_path):
    cfg = ModelConfig.demo()
    model = DiAD(cfg)
    params = model.init(seed=1)
    ds = dataio.prepare("synthetic", tmp_path, image_size=cfg.image_size, train_per_class=3, test_per_class=2)
    std = autoencoder.latent_std(model, params, ds, batch_size=4, seed=5)
    # the same samples by hand: batch i uses fold_in(key(seed), i)
    zs = []
    for i, batch in enumerate(dataio.eval_dataset(ds, 4, split="train", image_size=cfg.image_size,
                                                  shard_index=0, shard_count=1)):
        mean, logvar = model.encode_moments(params, jnp.asarray(batch["image"]))
        noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(5), i), mean.shape)
        z = np.asarray(mean + jnp.exp(0.5 * logvar) * noise)[np.asarray(batch["valid"], bool)]
        zs.append(z)
    z = np.concatenate(zs)
    assert len(z) == 15
    np.testing.assert_allclose(std, z.std(), rtol=1e-5)
    assert latent_std_changes_with_the_vae(model, params, ds, std)


def latent_std_changes_with_the_vae(model, params, ds, std):
    scaled = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 3 if "quant_conv" in jax.tree_util.keystr(p) and "post" not in jax.tree_util.keystr(p)
        else x, params)
    return abs(autoencoder.latent_std(model, scaled, ds, batch_size=4, seed=5) - std) > 0.1 * std


def test_demo_runs_end_to_end_and_resumes(tmp_path, capsys, monkeypatch):
    """The demo's whole code path with one step per stage (the numbers are not the point) and the
    micro model's UNet in the demo model (the size is not the point either; the other tests here
    build the demo architecture itself): the DiAD step compiles in half the time."""
    demo = ModelConfig.demo
    monkeypatch.setattr(ModelConfig, "demo", classmethod(lambda cls, **kw: demo(**{"unet": MICRO.unet, **kw})))
    wd, data = tmp_path / "demo", tmp_path / "data"
    argv = ["--workdir", wd, "--data-dir", data, "--vae-steps", 1, "--diad-steps", 1, "--batch-size", 8, "--vae-batch-size", 8,
            "--limit-per-class", 2, "--heatmaps", 1, "--no-progress"]
    assert demo_main(argv) == 0
    out = capsys.readouterr().out
    assert "| **mean** |" in out and "compared per pixel (pixel_l1 comparator" in out
    res = json.loads((wd / "eval" / "results.json").read_text())
    assert len(res["images"]) == 10 and np.isfinite(res["metrics"]["mean"]["p_auroc"])
    assert len(list((wd / "eval" / "heatmaps").rglob("*.png"))) == 5
    # scale_factor = 1 / latent std of the trained VAE, carried into the DiAD checkpoint
    init = load_model(wd / "init")
    vae = load_model(wd / "autoencoder" / "checkpoints" / "1")
    ds = dataio.prepare("synthetic", data, image_size=64)
    std = autoencoder.latent_std(DiAD(vae.config), vae.params, ds)
    assert init.config.scale_factor == pytest.approx(1 / std, rel=1e-5)
    final = load_model(wd / "diad" / "checkpoints" / "1")
    assert final.config == init.config and final.config.unet == MICRO.unet
    # the VAE was trained in stage 1 and is frozen in stage 2; the UNet encoder trained in stage 2
    for a, b in zip(jax.tree.leaves(final.params["vae"]), jax.tree.leaves(init.params["vae"])):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(final.params["unet"]["input_blocks_0_0"]["kernel"],
                              init.params["unet"]["input_blocks_0_0"]["kernel"])
    # a rerun finds every stage done (no new checkpoints, none rewritten) and only re-evaluates
    before = {p: p.stat().st_mtime_ns for p in wd.glob("*/checkpoints/*")} | {wd / "init": (wd / "init").stat().st_mtime_ns}
    assert demo_main(argv) == 0
    after = {p: p.stat().st_mtime_ns for p in wd.glob("*/checkpoints/*")} | {wd / "init": (wd / "init").stat().st_mtime_ns}
    assert after == before
    # the final checkpoint records how it is scored (and holds thresholds): predict.py needs no extra flag
    images = tmp_path / "new_images"
    images.mkdir()
    for i in range(8):  # a full batch: the program the evaluation compiled (from the compilation cache)
        Image.fromarray(np.asarray(ds["test"][i]["image"])).save(images / f"{i}.png")
    assert run_script("predict", ["--checkpoint", wd / "diad" / "checkpoints" / "1", "--input", images,
                                  "--out", tmp_path / "preds", "--no-progress"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "preds" / "predictions.csv")))
    scored = {r["file"].rsplit("/", 1)[1]: r for r in rows}
    assert sorted(scored) == [f"{i}.png" for i in range(8)]
    for r in rows:  # verdicts by the thresholds the demo stored
        assert int(r["label"]) == int(float(r["score"]) >= float(r["threshold"]))
    assert len(list((tmp_path / "preds" / "overlays").glob("*.png"))) == 8
    assert len(list((tmp_path / "preds" / "masks").glob("*.png"))) == 8


TRAINED_DEMO = os.environ.get("DIAD_DEMO_CHECKPOINT")


@pytest.mark.skipif(not TRAINED_DEMO, reason="needs a trained demo model (13 min of training): "
                                             "DIAD_DEMO_CHECKPOINT=runs/demo/diad/checkpoints/2250")
def test_fast_preset_reconstructs_normal_images_better_than_anomalous_ones(tmp_path):
    """At the fast preset (one network pass) a trained demo model's maps are lower on the normal test
    images than on the anomalous ones, in every class."""
    import diad_jax
    from diad_jax.evaluation import evaluate

    detector = diad_jax.load(TRAINED_DEMO)
    detector = diad_jax.load(TRAINED_DEMO, eval_config=detector.eval_config.fast())
    assert detector.eval_config.ddim_steps == 1 and detector.eval_config.one_step
    result = evaluate(detector, dataio.prepare("synthetic", tmp_path / "data", image_size=detector.image_size),
                      limit_per_class=10, progress=False)
    means = result.maps.mean(axis=(1, 2))
    names = np.asarray(result.class_names)
    for cls in sorted(set(result.class_names)):
        normal = means[(names == cls) & (result.labels == 0)].mean()
        anomalous = means[(names == cls) & (result.labels == 1)].mean()
        print(f"{cls}: normal {normal:.4f} < anomalous {anomalous:.4f}")
        assert normal < anomalous


@pytest.mark.skipif(not TRAINED_DEMO, reason="needs a trained demo model (13 min of training): "
                                             "DIAD_DEMO_CHECKPOINT=runs/demo/diad/checkpoints/2250")
def test_inversion_preset_scores_normal_images_lower_than_anomalous_ones(tmp_path):
    """At the inversion preset (5 DDIM-inversion passes, no reconstruction) a trained demo model's
    image scores are lower on the normal test images than on the anomalous ones, in every class."""
    import diad_jax
    from diad_jax.evaluation import evaluate

    detector = diad_jax.load(TRAINED_DEMO, eval_config=diad_jax.load(TRAINED_DEMO).eval_config.inversion())
    assert detector.eval_config.method == "inversion" and detector.eval_config.inversion_steps == 5
    result = evaluate(detector, dataio.prepare("synthetic", tmp_path / "data", image_size=detector.image_size),
                      limit_per_class=10, progress=False)
    names = np.asarray(result.class_names)
    for cls in sorted(set(result.class_names)):
        normal = result.image_scores[(names == cls) & (result.labels == 0)].mean()
        anomalous = result.image_scores[(names == cls) & (result.labels == 1)].mean()
        print(f"{cls}: normal {normal:.4f} < anomalous {anomalous:.4f}")
        assert normal < anomalous
