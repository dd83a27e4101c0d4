"""Tests of diad_jax.data: builders (MVTec-AD, VisA, folder, synthetic), pipelines, bad input."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diad_jax import data
from diad_jax.configs import IMAGENET_MEAN, IMAGENET_STD
from diad_jax.data import synthetic

RNG = np.random.default_rng(1234)
ROOT = Path(__file__).resolve().parents[1]


def _write_rgb(path, size=(40, 40), gray=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w = size
    if gray:
        arr = RNG.integers(0, 256, (h, w), dtype=np.uint8)
        Image.fromarray(arr, "L").save(path)
        return np.repeat(arr[..., None], 3, -1)
    arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    if path.lower().endswith((".jpg", ".jpeg")):  # lossy: what the decoder returns is the truth
        return np.asarray(Image.open(path).convert("RGB"))
    return arr


def _write_mask(path, size=(40, 40), value=255):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    h, w = size
    arr = np.zeros((h, w), np.uint8)
    y, x = RNG.integers(0, h // 2), RNG.integers(0, w // 2)
    arr[y:y + h // 3, x:x + w // 4] = value
    Image.fromarray(arr, "L").save(path)
    return arr


def make_mvtec(root, size=(32, 32)):
    """A tiny MVTec-AD tree: bottle (RGB) and grid (grayscale, like the real grid class)."""
    truth = {}
    layout = {"bottle": {"train": 3, "good": 2, "broken_large": 2, "contamination": 1},
              "grid": {"train": 4, "good": 1, "bent": 2}}
    for cls, parts in layout.items():
        gray = cls == "grid"
        for i in range(parts["train"]):
            rel = f"{cls}/train/good/{i:03d}.png"
            truth[rel] = (_write_rgb(os.path.join(root, rel), size, gray), None)
        for defect, n in parts.items():
            if defect == "train":
                continue
            for i in range(n):
                rel = f"{cls}/test/{defect}/{i:03d}.png"
                img = _write_rgb(os.path.join(root, rel), size, gray)
                mask = None
                if defect != "good":
                    mask = _write_mask(os.path.join(root, f"{cls}/ground_truth/{defect}/{i:03d}_mask.png"), size)
                truth[rel] = (img, mask)
    return truth


def make_visa(root, size=(24, 36)):
    """A tiny VisA release: candle and pcb1, JPEG images, masks with value 1 (any non-zero counts)."""
    truth, rows = {}, []
    for cls, (n_train, n_test_normal, n_anomaly) in {"candle": (3, 1, 2), "pcb1": (2, 2, 1)}.items():
        annos = []
        for i in range(n_train + n_test_normal):
            rel = f"{cls}/Data/Images/Normal/{i:04d}.JPG"
            truth[rel] = (_write_rgb(os.path.join(root, rel), size), None)
            rows.append([cls, "train" if i < n_train else "test", "normal", rel, ""])
            annos.append([rel, "normal", ""])
        for i in range(n_anomaly):
            rel = f"{cls}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{cls}/Data/Masks/Anomaly/{i:03d}.png"
            truth[rel] = (_write_rgb(os.path.join(root, rel), size), _write_mask(os.path.join(root, mrel), size, 1))
            rows.append([cls, "test", "anomaly", rel, mrel])
            annos.append([rel, "chip" if i == 0 else "chip,burnt", mrel])
        if cls == "candle":  # pcb1 has no image_anno.csv: its defect type falls back to "anomaly"
            with open(os.path.join(root, cls, "image_anno.csv"), "w", newline="") as f:
                csv.writer(f).writerows([["image", "label", "mask"]] + annos)
    os.makedirs(os.path.join(root, "split_csv"))
    with open(os.path.join(root, "split_csv", "1cls.csv"), "w", newline="") as f:
        csv.writer(f).writerows([["object", "split", "label", "image", "mask"]] + rows)
    return truth


def _read_all(source):
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    return str(root), make_mvtec(str(root))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """A small prepared synthetic dataset shared by the pipeline tests (5 classes x (8 train + 6 test))."""
    return data.prepare("synthetic", tmp_path_factory.mktemp("synth"), image_size=32, train_per_class=8,
                        test_per_class=6)


# ---------------------------------------------------------------------------------------------
# Builders


def test_mvtec_round_trip(mvtec, tmp_path):
    root, truth = mvtec
    ds = data.prepare("mvtec_ad", tmp_path, manual_dir=root, classes=["bottle", "grid"], image_size=32)
    assert ds.class_names == ("bottle", "grid")
    assert ds.counts() == {"train": {"bottle": (3, 0), "grid": (4, 0)},
                           "test": {"bottle": (2, 3), "grid": (1, 2)}}
    seen = set()
    for split in ("train", "test"):
        for i, ex in enumerate(_read_all(ds[split])):
            name = ex["filename"].decode()
            seen.add(name)
            image, mask = truth[name]
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
            np.testing.assert_array_equal(ex["image"], image)  # stored at native size: bit-exact
            expected_mask = np.zeros((32, 32), np.uint8) if mask is None else np.where(mask > 0, 255, 0)
            np.testing.assert_array_equal(ex["mask"], expected_mask)
            assert ex["label"] == (mask is not None)
            assert ex["class_name"].decode() == name.split("/")[0] == ds.class_names[ds.class_index[split][i]]
            assert ex["defect_type"].decode() == (name.split("/")[2] if split == "test" else "good")
            assert ds.labels[split][i] == ex["label"]
    assert seen == set(truth)
    # The same files prepared at 24 px equal PIL's bilinear resize, the reference's transforms.Resize.
    small = data.prepare("mvtec_ad", tmp_path, manual_dir=root, classes=["bottle", "grid"], image_size=24)
    ex = small["test"][0]  # bottle/test/broken_large/000.png
    image, mask = truth[ex["filename"].decode()]
    np.testing.assert_array_equal(ex["image"], np.asarray(Image.fromarray(image).resize((24, 24), Image.BILINEAR)))
    ref_mask = np.asarray(Image.fromarray(mask).resize((24, 24), Image.BILINEAR))
    np.testing.assert_array_equal(ex["mask"], np.where(ref_mask > 0, 255, 0))
    assert small.path != ds.path  # sizes coexist in one data_dir
    # load() reopens the same prepared copy; a different subset is a different (unprepared) copy.
    again = data.load("mvtec_ad", tmp_path, classes=["bottle", "grid"], image_size=32)
    assert again.path == ds.path and again.counts() == ds.counts()
    with pytest.raises(data.DataError, match="not prepared"):
        data.load("mvtec_ad", tmp_path, classes=["grid"], image_size=32)


def test_mvtec_subset_and_exclude(mvtec, tmp_path):
    root, _ = mvtec
    ds = data.prepare("mvtec_ad", tmp_path, manual_dir=root, classes="grid", image_size=16,
                      exclude=["grid/train/good/002.png"])
    assert ds.class_names == ("grid",)
    assert ds.counts() == {"train": {"grid": (3, 0)}, "test": {"grid": (1, 2)}}
    names = {ds["train"][i]["filename"].decode() for i in range(len(ds["train"]))}
    assert "grid/train/good/002.png" not in names and len(names) == 3
    assert data.MVTEC_REFERENCE_EXCLUDE == ("screw/train/good/232.png",)


def test_visa_round_trip(tmp_path):
    root = str(tmp_path / "visa")
    truth = make_visa(root)
    ds = data.prepare("visa", tmp_path / "prepared", manual_dir=root, classes=["candle", "pcb1"], image_size=20)
    assert ds.counts() == {"train": {"candle": (3, 0), "pcb1": (2, 0)},
                           "test": {"candle": (1, 2), "pcb1": (2, 1)}}
    defects = {}
    for split in ("train", "test"):
        for ex in _read_all(ds[split]):
            name = ex["filename"].decode()
            image, mask = truth[name]  # 36x24 (WxH) sources are squashed to 20x20, like the reference
            np.testing.assert_array_equal(ex["image"], np.asarray(Image.fromarray(image).resize((20, 20), Image.BILINEAR)))
            if mask is None:
                assert ex["label"] == 0 and not ex["mask"].any()
            else:
                ref = np.asarray(Image.fromarray(mask).resize((20, 20), Image.BILINEAR))
                np.testing.assert_array_equal(ex["mask"], np.where(ref > 0, 255, 0))
                assert ex["label"] == 1 and ex["mask"].any()
            defects[name] = ex["defect_type"].decode()
    assert defects["candle/Data/Images/Anomaly/000.JPG"] == "chip"
    assert defects["candle/Data/Images/Anomaly/001.JPG"] == "chip,burnt"
    assert defects["pcb1/Data/Images/Anomaly/000.JPG"] == "anomaly"
    assert defects["pcb1/Data/Images/Normal/0000.JPG"] == "good"


def test_folder_dataset(tmp_path):
    root = tmp_path / "folder"
    for i in range(10):
        _write_rgb(str(root / "widget" / "normal" / f"n{i}.png"), (16, 16))
    _write_rgb(str(root / "widget" / "anomalous" / "dent" / "a0.png"), (16, 16))
    _write_mask(str(root / "widget" / "masks" / "dent" / "a0_mask.png"), (16, 16))
    _write_rgb(str(root / "widget" / "anomalous" / "a1.png"), (16, 16))
    _write_mask(str(root / "widget" / "masks" / "a1.png"), (16, 16))
    for i in range(3):
        _write_rgb(str(root / "gadget" / "normal" / f"n{i}.png"), (16, 16))
        _write_rgb(str(root / "gadget" / "test_normal" / f"t{i}.png"), (16, 16))
    ds = data.prepare("folder", tmp_path / "prepared", manual_dir=root, image_size=16, test_normal_fraction=0.3)
    assert ds.class_names == ("gadget", "widget")
    assert ds.counts() == {"train": {"gadget": (3, 0), "widget": (7, 0)},
                           "test": {"gadget": (3, 0), "widget": (3, 2)}}
    test = {ex["filename"].decode(): ex for ex in _read_all(ds["test"])}
    assert test["widget/anomalous/dent/a0.png"]["defect_type"].decode() == "dent"
    assert test["widget/anomalous/a1.png"]["defect_type"].decode() == "anomalous"
    assert all(test[k]["mask"].any() for k in ("widget/anomalous/dent/a0.png", "widget/anomalous/a1.png"))
    train = {ex["filename"].decode() for ex in _read_all(ds["train"])}
    assert not train & set(test)  # held-out normals are not trained on


def test_folder_anomalies_without_masks_count_in_image_metrics_only(tmp_path, caplog):
    root = tmp_path / "folder"
    for i in range(4):
        _write_rgb(str(root / "widget" / "normal" / f"n{i}.png"), (16, 16))
    _write_rgb(str(root / "widget" / "anomalous" / "a0.png"), (16, 16))
    _write_mask(str(root / "widget" / "masks" / "a0.png"), (16, 16))
    _write_rgb(str(root / "widget" / "anomalous" / "a1.png"), (16, 16))  # no mask: an image label only
    with pytest.raises(data.DataError, match="a1.png: anomalous image has no mask"):
        data.prepare("folder", tmp_path / "strict", manual_dir=root, image_size=16, require_masks=True)
    ds = data.prepare("folder", tmp_path / "p", manual_dir=root, image_size=16, test_normal_fraction=0.5)
    assert "1 anomalous image(s) without a mask" in caplog.text
    names = [ex["filename"].decode() for ex in _read_all(ds["test"])]
    assert "widget/anomalous/a1.png" in names and len(names) == 4  # 2 held-out normals + 2 anomalous
    assert ds.has_mask["test"].tolist() == [n != "widget/anomalous/a1.png" for n in names]
    assert data.load_from_directory(ds.path).has_mask["test"].tolist() == ds.has_mask["test"].tolist()
    # the metrics: the unmasked image counts in the image metrics and not in the pixel metrics
    from diad_jax.metrics import compute_metrics
    n = len(names)
    rng = np.random.default_rng(0)
    maps, masks = rng.random((n, 16, 16)), np.zeros((n, 16, 16), bool)
    labels = ds.labels["test"]
    masks[names.index("widget/anomalous/a0.png"), 4:8, 4:8] = True
    keep = ds.has_mask["test"]
    full = compute_metrics(rng.random(n), labels, maps, masks, has_mask=keep)["all"]
    assert full["p_auroc"] == compute_metrics(None, None, maps[keep], masks[keep])["all"]["p_auroc"]
    scores = np.where(labels == 1, 1.0, 0.0)
    assert compute_metrics(scores, labels, maps, masks, has_mask=keep)["all"]["i_auroc"] == 1.0


def test_no_tensorflow_import(mvtec, synth, tmp_path):
    """Everything above and below runs without TensorFlow: preparing, reading, the grain pipeline."""
    root, _ = mvtec
    ds = data.prepare("mvtec_ad", tmp_path, manual_dir=root, classes=["bottle"], image_size=16)
    next(iter(data.train_dataset(ds, 2, shard_index=0, shard_count=1)))
    next(iter(data.eval_dataset(synth, 4, shard_index=0, shard_count=1)))
    assert "tensorflow" not in sys.modules


def test_importing_the_library_does_not_import_tfds():
    """tensorflow_datasets is imported on first use (prepare / load), not by `import diad_jax.data`."""
    code = ("import sys, diad_jax, diad_jax.data; "
            "assert 'tensorflow_datasets' not in sys.modules, 'tensorflow_datasets imported'; "
            "diad_jax.data.DiadConfig; assert 'tensorflow_datasets' in sys.modules")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# The generated dataset


def test_synthetic_deterministic_by_seed(synth, tmp_path):
    again = data.prepare("synthetic", tmp_path, image_size=32, train_per_class=8, test_per_class=6)
    for split in ("train", "test"):
        a, b = _read_all(synth[split]), _read_all(again[split])
        assert len(a) == len(b) == 5 * (8 if split == "train" else 6)
        for x, y in zip(a, b):
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])
    other = data.prepare("synthetic", tmp_path, image_size=32, train_per_class=8, test_per_class=6, seed=1)
    assert other.path != again.path
    assert not np.array_equal(other["train"][0]["image"], again["train"][0]["image"])
    # normal images of a class vary, and classes differ from each other
    train = _read_all(synth["train"])
    assert not np.array_equal(train[0]["image"], train[1]["image"])
    means = [np.mean([ex["image"].mean((0, 1)) for ex in train[8 * c:8 * c + 8]], 0) for c in range(5)]
    assert min(np.abs(means[i] - means[j]).max() for i in range(5) for j in range(i)) > 15
    assert synth.counts()["test"] == {c: (3, 3) for c in data.SYNTHETIC_CLASSES}
    assert synth.counts()["train"] == {c: (8, 0) for c in data.SYNTHETIC_CLASSES}


@pytest.mark.parametrize("size", [64, 256])
def test_synthetic_masks_are_exactly_the_changed_pixels(size):
    for cls in data.SYNTHETIC_CLASSES:
        good = data.render(cls, "good", image_size=size, index=0)
        assert not good.mask.any() and np.array_equal(good.image, good.clean)
        for defect in data.defect_types(cls):
            for index in range(3 if size == 64 else 1):
                ex = data.render(cls, defect, image_size=size, index=index)
                changed = (ex.image != ex.clean).any(-1)
                np.testing.assert_array_equal(ex.mask, np.where(changed, 255, 0))
                frac = changed.mean()
                assert 0.005 <= frac <= 0.12, (cls, defect, frac)  # visible, not the whole image
                # clearly visible: a large colour change on the defect's pixels
                diff = np.abs(ex.image.astype(int) - ex.clean.astype(int)).max(-1)[changed]
                assert np.median(diff) >= 40, (cls, defect, np.median(diff))
                # the clean version is the normal image drawn from the same random stream
                np.testing.assert_array_equal(ex.clean, data.render(cls, "good", image_size=size, index=index).image)


def _auroc(labels, scores) -> float:
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    n1, n0 = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_synthetic_defects_detectable_at_64px(tmp_path):
    """A guard for the demo: at 64x64 every class's defects stand out to a trivial local detector
    (nearest normal 6x6 patch by mean/std colour), so a small model has something learnable to find."""
    from numpy.lib.stride_tricks import sliding_window_view

    ds = data.prepare("synthetic", tmp_path, image_size=64, train_per_class=20, test_per_class=16)

    def patches(image):
        p = sliding_window_view(image.astype(np.float32) / 255, (6, 6), axis=(0, 1))[::2, ::2]
        return np.concatenate([p.mean((-1, -2)), p.std((-1, -2))], -1).reshape(-1, 6)

    for cls in data.SYNTHETIC_CLASSES:
        bank = np.concatenate([patches(ds["train"][i]["image"]) for i in ds.indices("train", cls)])
        labels, scores = [], []
        for i in ds.indices("test", cls):
            ex = ds["test"][i]
            q = patches(ex["image"])
            d2 = (q * q).sum(1)[:, None] + (bank * bank).sum(1)[None] - 2 * q @ bank.T
            labels.append(ex["label"])
            scores.append(d2.min(1).max())
        assert _auroc(labels, scores) >= 0.95, cls


def test_synthetic_stored_masks_match_renderer(synth):
    for i in range(len(synth["test"])):
        ex = synth["test"][i]
        _, _, defect, name = ex["filename"].decode().split("/")
        r = data.render(ex["class_name"].decode(), defect, image_size=32, index=int(name[:3]))
        np.testing.assert_array_equal(ex["image"], r.image)
        np.testing.assert_array_equal(ex["mask"], r.mask)
        assert ex["label"] == (defect != "good") == r.mask.any()


# ---------------------------------------------------------------------------------------------
# Pipelines


def test_preprocess_matches_reference_transforms(synth):
    batch = next(iter(data.eval_dataset(synth, 4, shard_index=0, shard_count=1, image_size=20)))
    ex = synth["test"][0]
    resized = np.asarray(Image.fromarray(ex["image"]).resize((20, 20), Image.BILINEAR))
    expected = (resized / 255.0 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    assert batch["image"].shape == (4, 3, 20, 20) and batch["image"].dtype == np.float32
    np.testing.assert_allclose(batch["image"][0], expected.transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(data.denormalize(batch["image"][0]), resized)
    assert batch["mask"].shape == (4, 1, 20, 20) and set(np.unique(batch["mask"])) <= {0.0, 1.0}
    # default sharding is the JAX process: one process here, so shard 0 of 1
    default = next(iter(data.eval_dataset(synth, 4, image_size=20)))
    np.testing.assert_array_equal(default["image"], batch["image"])
    # training on a subset of classes
    hexnut = next(iter(data.train_dataset(synth, 8, classes=["hexnut"], shard_index=0, shard_count=1)))
    assert set(hexnut["class_name"]) == {"hexnut"} and sorted(hexnut["index"]) == synth.indices("train", "hexnut").tolist()


def test_the_pipelines_run_with_absl_flags_unparsed_and_leave_them_so(synth):
    """grain reads its absl flags with their defaults when nobody parsed them (a program that is no
    absl app), so the pipelines neither need nor touch absl's process-wide flag state."""
    from absl import flags
    flags.FLAGS.unparse_flags()  # as in a plain Python program, whatever ran before in this process
    next(iter(data.train_dataset(synth, 4, shard_index=0, shard_count=1)))
    next(iter(data.eval_dataset(synth, 4, shard_index=0, shard_count=1)))
    assert not flags.FLAGS.is_parsed()


def test_two_process_sharding_covers_each_example_once(synth):
    n = len(synth["train"])  # 40 = 2 hosts x 4 batches x 5
    epochs = {}
    for shard in range(2):
        ds = data.train_dataset(synth, 5, seed=7, num_epochs=2, shard_index=shard, shard_count=2)
        idx = np.concatenate([b["index"] for b in ds]).reshape(2, -1)  # epoch x position
        assert idx.shape == (2, n // 2)
        epochs[shard] = idx
    for e in range(2):
        both = np.concatenate([epochs[0][e], epochs[1][e]])
        assert sorted(both.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0][0], epochs[0][1])  # a new permutation every epoch
    assert data.steps_per_epoch(synth, 5, shard_count=2) == 4
    # Uneven: 30 test examples, 2 hosts, batch 4 -> 3 full batches each, no duplicate within an epoch.
    parts = [np.concatenate([b["index"] for b in data.train_dataset(
        synth, 4, split="test", seed=3, num_epochs=1, shard_index=s, shard_count=2)]) for s in range(2)]
    assert len(parts[0]) == len(parts[1]) == 12 and len(set(np.concatenate(parts).tolist())) == 24
    # Evaluation: every example exactly once over the hosts, same number of padded batches per host.
    for classes in (None, ["disk"]):
        want = synth.indices("test", classes)
        got, n_batches = [], []
        for shard in range(2):
            batches = list(data.eval_dataset(synth, 4, classes=classes, shard_index=shard, shard_count=2))
            n_batches.append(len(batches))
            assert all(len(b["index"]) == 4 for b in batches)
            for b in batches:
                got += b["index"][b["valid"]].tolist()
                assert (b["index"][~b["valid"]] == -1).all() and not b["image"][~b["valid"]].any()
            assert all(np.all(np.diff(b["index"][b["valid"]]) > 0) for b in batches)  # stored order
        assert n_batches[0] == n_batches[1]
        assert sorted(got) == want.tolist()
    disk = next(iter(data.eval_dataset(synth, 8, classes="disk", shard_index=0, shard_count=1)))
    assert set(disk["class_name"][disk["valid"]]) == {"disk"}
    short = list(data.eval_dataset(synth, 4, pad=False, shard_index=0, shard_count=1))
    assert [len(b["index"]) for b in short] == [4] * 7 + [2] and all(b["valid"].all() for b in short)


def test_resume_at_a_step_on_any_number_of_hosts(synth):
    """start_step=s continues the stream exactly (across an epoch boundary: 6 steps per epoch), and
    the hosts' s-th batches together hold the same examples for 1 or 2 hosts: the data position
    is a function of the global step, so a run resumes onto another process count."""
    kwargs = dict(seed=11, num_threads=2)
    reference = iter(data.train_dataset(synth, 6, shard_index=0, shard_count=1, **kwargs))
    expected = [next(reference) for _ in range(9)]
    resumed = iter(data.train_dataset(synth, 6, shard_index=0, shard_count=1, start_step=4, **kwargs))
    two_hosts = [iter(data.train_dataset(synth, 3, shard_index=i, shard_count=2, start_step=4, **kwargs))
                 for i in range(2)]
    for want in expected[4:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["image"], want["image"])
        halves = [next(h)["index"] for h in two_hosts]
        assert sorted(np.concatenate(halves).tolist()) == sorted(want["index"].tolist())
    assert len({tuple(sorted(b["index"].tolist())) for b in expected}) == 9  # the steps differ


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_class_folder(mvtec, tmp_path):
    root, _ = mvtec
    with pytest.raises(data.DataError, match=rf"{os.path.join(root, 'nope')}: class folder"):
        data.prepare("mvtec_ad", tmp_path, manual_dir=root, classes=["bottle", "nope"], image_size=16)
    vroot = str(tmp_path / "visa")
    make_visa(vroot)
    with pytest.raises(data.DataError, match=rf"{os.path.join(vroot, 'cashew')}: class folder"):
        data.prepare("visa", tmp_path, manual_dir=vroot, classes=["candle", "cashew"], image_size=16)
    with pytest.raises(data.DataError, match=rf"{os.path.join(vroot, 'split_csv', '2cls.csv')}: VisA split file"):
        data.scan_visa(vroot, ["candle"], split_csv="split_csv/2cls.csv")


def test_anomalous_image_without_mask(tmp_path):
    root = str(tmp_path / "mvtec")
    make_mvtec(root, (16, 16))
    orphan = os.path.join(root, "grid", "test", "bent", "001.png")
    os.remove(os.path.join(root, "grid", "ground_truth", "bent", "001_mask.png"))
    with pytest.raises(data.DataError, match=rf"{orphan}: anomalous image has no mask"):
        data.prepare("mvtec_ad", tmp_path / "p", manual_dir=root, classes=["grid"], image_size=16)
    ds = data.prepare("mvtec_ad", tmp_path / "p", manual_dir=root, classes=["grid"], image_size=16, skip_bad=True)
    assert ds.counts()["test"] == {"grid": (1, 1)}
    # VisA: an anomaly row with an empty mask column
    vroot = str(tmp_path / "visa")
    make_visa(vroot)
    csv_path = os.path.join(vroot, "split_csv", "1cls.csv")
    lines = open(csv_path).read().splitlines()
    bad = next(i for i, line in enumerate(lines) if ",anomaly," in line)
    lines[bad] = lines[bad].rsplit(",", 1)[0] + ","
    open(csv_path, "w").write("\n".join(lines) + "\n")
    image = os.path.join(vroot, lines[bad].split(",")[3])
    with pytest.raises(data.DataError, match=rf"{image}: anomalous image has no mask"):
        data.scan_visa(vroot, ["candle", "pcb1"])


def test_unreadable_image(tmp_path):
    root = str(tmp_path / "mvtec")
    make_mvtec(root, (16, 16))
    broken = os.path.join(root, "bottle", "train", "good", "001.png")
    with open(broken, "wb") as f:
        f.write(b"this is not a png")
    with pytest.raises(data.DataError, match=rf"{broken}: cannot read image"):
        data.prepare("mvtec_ad", tmp_path / "p", manual_dir=root, classes=["bottle"], image_size=16)
    # the failed attempt left nothing that looks prepared; skip_bad then skips the file
    ds = data.prepare("mvtec_ad", tmp_path / "p", manual_dir=root, classes=["bottle"], image_size=16, skip_bad=True)
    assert ds.counts()["train"] == {"bottle": (2, 0)}
    # a non-image file where images are expected is an error too
    stray = os.path.join(root, "grid", "train", "good", "notes.txt")
    open(stray, "w").write("x")
    with pytest.raises(data.DataError, match=rf"{stray}: not an image file"):
        data.scan_mvtec(root, ["grid"])
    assert len(data.scan_mvtec(root, ["grid"], skip_bad=True)["train"]) == 4
    # skipping every image of a class empties it: still an error, naming the dataset root
    for name in os.listdir(os.path.join(root, "bottle", "train", "good")):
        open(os.path.join(root, "bottle", "train", "good", name), "wb").write(b"junk")
    with pytest.raises(data.DataError, match=rf"{root}: the train split has no readable image of class\(es\) \['bottle'\]"):
        data.prepare("mvtec_ad", tmp_path / "p2", manual_dir=root, image_size=16, classes=["bottle", "grid"],
                     skip_bad=True)


def test_empty_split(tmp_path):
    root = str(tmp_path / "mvtec")
    make_mvtec(root, (16, 16))
    good = os.path.join(root, "grid", "train", "good")
    for f in os.listdir(good):
        os.remove(os.path.join(good, f))
    with pytest.raises(data.DataError, match=rf"{good}: the train split of class 'grid' is empty"):
        data.prepare("mvtec_ad", tmp_path / "p", manual_dir=root, classes=["grid"], image_size=16)
    froot = tmp_path / "folder"
    _write_rgb(str(froot / "only" / "normal" / "a.png"), (8, 8))
    with pytest.raises(data.DataError, match=rf"{froot / 'only'}: the test split"):
        data.scan_folder(str(froot), test_normal_fraction=0.0)
    with pytest.raises(data.DataError, match="no class"):
        data.eval_dataset(data.load_from_directory(
            data.prepare("mvtec_ad", tmp_path / "q", manual_dir=root, classes=["bottle"], image_size=8).path),
            2, classes="grid", shard_index=0, shard_count=1)
