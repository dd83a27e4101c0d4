"""Tests of the Real-IAD and MVTec AD 2 builders on tiny trees written in their published layouts."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from diad_jax import data
from tests.test_data import _read_all, _write_rgb

SIZE = 32  # written and prepared at the same size: stored pixels are the written ones


def _draw_mask(path, k):
    """A 0/255 mask whose rectangle depends on k (so masks of different images differ)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.zeros((SIZE, SIZE), np.uint8)
    arr[2 + 3 * k:8 + 3 * k, 4 + 2 * k:12 + 4 * k] = 255
    Image.fromarray(arr, "L").save(path)
    return arr


# ---------------------------------------------------------------------------------------------
# Real-IAD: <root>/realiad_jsons/<class>.json + <root>/realiad_1024/<class>/{OK,NG}/...

# class -> split -> [(anomaly_class, sample, view, has mask_path)]
REALIAD = {
    "audiojack": {"train": [("OK", 1, 1, False), ("OK", 1, 2, False), ("OK", 2, 1, False), ("OK", 2, 2, False)],
                  "test": [("OK", 3, 1, False), ("OK", 3, 2, False), ("AK", 4, 1, True),
                           ("AK", 4, 2, False),  # a view without mask_path: normal, as the official loader has it
                           ("BX", 5, 1, True)]},
    "pcb": {"train": [("OK", 1, 1, False), ("OK", 1, 2, False), ("OK", 1, 3, False)],
            "test": [("OK", 2, 1, False), ("HS", 3, 1, True), ("HS", 3, 2, True)]},
}


def make_realiad(root):
    """Returns {path relative to root: (image, mask or None, label, defect_type)}."""
    truth, k = {}, 0
    for cls, splits in REALIAD.items():
        doc = {"meta": {"prefix": cls, "normal_class": "OK"}, "train": [], "test": []}
        doc_sv = {"meta": doc["meta"], "train": [], "test": []}  # single view: C1 only
        for split, entries in splits.items():
            for defect, sample, view, has_mask in entries:
                folder = f"OK/S{sample:04d}" if defect == "OK" else f"NG/{defect}/S{sample:04d}"
                stem = f"{folder}/{cls}_{sample:04d}_{'OK' if defect == 'OK' else 'NG'}_C{view}_20230101000000"
                image = _write_rgb(os.path.join(root, "realiad_1024", cls, stem + ".jpg"), (SIZE, SIZE))
                mask = None
                if has_mask:
                    mask = _draw_mask(os.path.join(root, "realiad_1024", cls, stem + ".png"), k)
                    k += 1
                entry = {"category": cls, "anomaly_class": defect, "image_path": stem + ".jpg",
                         "mask_path": stem + ".png" if has_mask else None}
                doc[split].append(entry)
                if view == 1:
                    doc_sv[split].append(entry)
                label = int(defect != "OK" and has_mask)
                truth[f"realiad_1024/{cls}/{stem}.jpg"] = (image, mask, label, defect if label else "good")
        for folder, d in (("realiad_jsons", doc), ("realiad_jsons_sv", doc_sv)):
            os.makedirs(os.path.join(root, folder), exist_ok=True)
            with open(os.path.join(root, folder, f"{cls}.json"), "w") as f:
                json.dump(d, f)
    return truth


@pytest.fixture
def realiad(tmp_path):
    root = str(tmp_path / "Real-IAD")
    return root, make_realiad(root)


def test_realiad_round_trip(realiad, tmp_path, caplog):
    root, truth = realiad
    caplog.set_level("INFO", logger="diad_jax.data.layouts")
    ds = data.prepare("real_iad", tmp_path / "p", manual_dir=root, classes=["audiojack", "pcb"], image_size=SIZE)
    assert ds.class_names == ("audiojack", "pcb")
    assert ds.counts() == {"train": {"audiojack": (4, 0), "pcb": (3, 0)},
                           "test": {"audiojack": (3, 2), "pcb": (1, 2)}}
    seen = set()
    for split in ("train", "test"):
        for i, ex in enumerate(_read_all(ds[split])):
            name = ex["filename"].decode()
            seen.add(name)
            image, mask, label, defect = truth[name]
            np.testing.assert_array_equal(ex["image"], image)
            np.testing.assert_array_equal(ex["mask"], np.zeros((SIZE, SIZE)) if mask is None else mask)
            assert ex["label"] == label == ds.labels[split][i]
            assert ex["defect_type"].decode() == defect
            assert ex["class_name"].decode() == name.split("/")[1]
    assert seen == set(truth)
    assert "audiojack: entries with a defect class but no mask_path count as normal, as in the official loader: 1" \
        in caplog.text
    masks = [m for _, m, _, _ in truth.values() if m is not None]
    assert all(not np.array_equal(a, b) for i, a in enumerate(masks) for b in masks[:i])  # alignment is testable


def test_realiad_classes_and_json_dir(realiad, tmp_path):
    root, _ = realiad
    ds = data.prepare("real_iad", tmp_path / "p", manual_dir=root, classes="pcb", image_size=SIZE)
    assert ds.class_names == ("pcb",) and ds.counts() == {"train": {"pcb": (3, 0)}, "test": {"pcb": (1, 2)}}
    sv = data.scan_realiad(root, ["audiojack", "pcb"], json_dir="realiad_jsons_sv")
    assert [(r.class_name, r.label) for r in sv["train"]] == [("audiojack", 0)] * 2 + [("pcb", 0)]
    assert [(r.class_name, r.label) for r in sv["test"]] == [("audiojack", 0), ("audiojack", 1), ("audiojack", 1),
                                                             ("pcb", 0), ("pcb", 1)]
    assert data.REALIAD_CLASSES[:3] == ("audiojack", "bottle_cap", "button_battery") and len(data.REALIAD_CLASSES) == 30


def test_realiad_bad_input(realiad, tmp_path):
    root, truth = realiad
    # an anomalous entry whose mask file is missing
    name = next(n for n, (_, m, _, _) in truth.items() if m is not None and "/pcb/" in n)
    image = os.path.join(root, name)
    os.remove(image[:-4] + ".png")
    with pytest.raises(data.DataError, match=rf"{image}: anomalous image has no mask"):
        data.prepare("real_iad", tmp_path / "p", manual_dir=root, classes=["pcb"], image_size=SIZE)
    assert data.scan_realiad(root, ["pcb"], skip_bad=True)["test"][-1].label == 1  # the other HS view is kept
    # an entry pointing at a missing image
    gone = os.path.join(root, "realiad_1024/audiojack/OK/S0002/audiojack_0002_OK_C1_20230101000000.jpg")
    os.remove(gone)
    json_path = os.path.join(root, "realiad_jsons", "audiojack.json")
    with pytest.raises(data.DataError, match=rf"{gone}: image listed in {json_path}: train\[2\] not found"):
        data.scan_realiad(root, ["audiojack"])
    skipped = []
    assert len(data.scan_realiad(root, ["audiojack"], skip_bad=True, skipped=skipped)["train"]) == 3
    assert len(skipped) == 1 and gone in skipped[0]
    # a missing split file or image folder, a malformed split file
    with pytest.raises(data.DataError, match=rf"{os.path.join(root, 'realiad_jsons', 'mint.json')}: Real-IAD split"):
        data.scan_realiad(root, ["mint"])
    with pytest.raises(data.DataError, match=rf"{os.path.join(root, 'realiad_256')}: Real-IAD image folder"):
        data.prepare("real_iad", tmp_path / "q", manual_dir=root, classes=["pcb"], image_size=SIZE,
                     image_dir="realiad_256")
    with open(json_path, "w") as f:
        json.dump({"train": [], "test": []}, f)
    with pytest.raises(data.DataError, match=rf"{json_path}: expected"):
        data.scan_realiad(root, ["audiojack"])


# ---------------------------------------------------------------------------------------------
# MVTec AD 2: <root>/<class>/{train/good, validation/good, test_public/{good,bad,ground_truth/bad}, test_private*}

MVTEC2 = {"can": {"train": 3, "validation": 2, "good": 2, "bad": 2, "test_private": 2, "test_private_mixed": 1},
          "walnuts": {"train": 2, "validation": 1, "good": 1, "bad": 1}}


def make_mvtec_ad2(root):
    """Returns {path relative to root: (image, mask or None)} of the labelled images."""
    truth, k = {}, 0
    for cls, parts in MVTEC2.items():
        for part, n in parts.items():
            folder = {"train": "train/good", "validation": "validation/good", "good": "test_public/good",
                      "bad": "test_public/bad"}.get(part, part)
            for i in range(n):
                rel = f"{cls}/{folder}/{i:03d}_regular.png"
                image = _write_rgb(os.path.join(root, rel), (SIZE, SIZE))
                mask = None
                if part == "bad":
                    mask_rel = f"{cls}/test_public/ground_truth/bad/{i:03d}_regular_mask.png"
                    mask = _draw_mask(os.path.join(root, mask_rel), k)
                    k += 1
                if not part.startswith("test_private"):
                    truth[rel] = (image, mask)
    return truth


@pytest.fixture
def mvtec2(tmp_path):
    root = str(tmp_path / "mvtec_ad_2")
    return root, make_mvtec_ad2(root)


def test_mvtec_ad2_round_trip(mvtec2, tmp_path, caplog):
    root, truth = mvtec2
    caplog.set_level("INFO", logger="diad_jax.data.layouts")
    ds = data.prepare("mvtec_ad_2", tmp_path / "p", manual_dir=root, classes=["can", "walnuts"], image_size=SIZE)
    assert ds.splits == ("train", "validation", "test")
    assert ds.counts() == {"train": {"can": (3, 0), "walnuts": (2, 0)},
                           "validation": {"can": (2, 0), "walnuts": (1, 0)},
                           "test": {"can": (2, 2), "walnuts": (1, 1)}}
    assert "2 unlabelled test folder(s) are not prepared" in caplog.text  # can/test_private, can/test_private_mixed
    seen = set()
    for split in ds.splits:
        for ex in _read_all(ds[split]):
            name = ex["filename"].decode()
            seen.add(name)
            image, mask = truth[name]
            np.testing.assert_array_equal(ex["image"], image)
            np.testing.assert_array_equal(ex["mask"], np.zeros((SIZE, SIZE)) if mask is None else mask)
            assert ex["label"] == (mask is not None)
            assert ex["defect_type"].decode() == ("bad" if mask is not None else "good")
    assert seen == set(truth)  # the private test images are not among them
    only = data.prepare("mvtec_ad_2", tmp_path / "p", manual_dir=root, classes="walnuts", image_size=SIZE)
    assert only.class_names == ("walnuts",) and only.counts()["test"] == {"walnuts": (1, 1)}


def test_mvtec_ad2_bad_input(mvtec2, tmp_path):
    root, _ = mvtec2
    orphan = os.path.join(root, "can", "test_public", "bad", "001_regular.png")
    os.remove(os.path.join(root, "can", "test_public", "ground_truth", "bad", "001_regular_mask.png"))
    with pytest.raises(data.DataError, match=rf"{orphan}: anomalous image has no mask"):
        data.prepare("mvtec_ad_2", tmp_path / "p", manual_dir=root, classes=["can"], image_size=SIZE)
    assert [r.label for r in data.scan_mvtec_ad2(root, ["can"], skip_bad=True)["test"]] == [0, 0, 1]
    stray = os.path.join(root, "walnuts", "test_public", "broken")
    os.makedirs(stray)
    with pytest.raises(data.DataError, match=rf"{stray}: unexpected entry"):
        data.scan_mvtec_ad2(root, ["walnuts"])
    assert len(data.scan_mvtec_ad2(root, ["walnuts"], skip_bad=True)["test"]) == 2
    with pytest.raises(data.DataError, match=rf"{os.path.join(root, 'rice')}: class folder"):
        data.scan_mvtec_ad2(root, ["rice", "walnuts"])
    assert len(data.MVTEC_AD2_CLASSES) == 8
