"""Scanning the on-disk layouts (MVTec-AD, MVTec AD 2, VisA, Real-IAD, a generic folder tree) into `Record`s.

Scanning only lists and checks files; it decodes nothing. Every problem is a `DataError` naming the
path at fault: a missing class folder, an anomalous image without a mask, a non-image file where
images are expected, an empty split. With ``skip_bad=True`` the per-file problems (missing mask,
non-image file, a row pointing at a missing file) are logged as warnings, appended to the
caller's `skipped` list, and the file is skipped; a missing class folder or an empty split is
always an error.
"""
from __future__ import annotations

import collections
import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np

from diad_jax.data.imageio import IMAGE_EXTENSIONS, is_image_file
from diad_jax.data.records import GOOD, DataError, Record, relative_name

log = logging.getLogger(__name__)

MVTEC_CLASSES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
"""The 15 MVTec-AD classes (the reference's label_to_idx order, alphabetical)."""

VISA_CLASSES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
    "pcb3", "pcb4", "pipe_fryum",
)
"""The 12 VisA classes (alphabetical, the reference's label_to_idx order)."""

MVTEC_AD2_CLASSES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
"""The 8 MVTec AD 2 classes (alphabetical)."""

REALIAD_CLASSES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
    "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
    "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1", "u_block",
    "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper",
)
"""The 30 Real-IAD classes (alphabetical; the JSON file names of the official release)."""

MVTEC_REFERENCE_EXCLUDE = ("screw/train/good/232.png",)
"""Files the reference's training list (training/MVTec-AD/train.json, UniAD's list) leaves out:
pass ``exclude=MVTEC_REFERENCE_EXCLUDE`` to train on exactly its 3,628 images instead of 3,629."""

SPLITS = ("train", "test")


def _problem(message: str, skip_bad: bool, skipped: list[str] | None) -> None:
    """Raises `DataError(message)`, or (when the user asked to skip bad files) logs it as a warning
    and appends it to `skipped`."""
    if not skip_bad:
        raise DataError(message)
    log.warning("skipping: %s", message)
    if skipped is not None:
        skipped.append(message)


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"{path}: {what} not found")


def _list_images(folder: str, skip_bad: bool, skipped: list[str] | None, recursive: bool = False) -> list[str]:
    """Sorted absolute paths of the image files in `folder` (hidden entries are ignored).

    A sub-folder (unless `recursive`) or a non-image file is an error, or skipped with a warning.
    """
    out = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if recursive:
                out.extend(_list_images(entry.path, skip_bad, skipped, recursive=True))
            else:
                _problem(f"{entry.path}: unexpected folder where image files were expected", skip_bad, skipped)
        elif is_image_file(entry.name):
            out.append(entry.path)
        else:
            _problem(f"{entry.path}: not an image file (extensions: {', '.join(IMAGE_EXTENSIONS)})",
                     skip_bad, skipped)
    return out


def _find_mask(mask_dir: str, stem: str, suffixes: Sequence[str]) -> str | None:
    """The first existing `<mask_dir>/<stem><suffix><ext>` over suffixes x image extensions."""
    for suffix in suffixes:
        for ext in (".png", ".PNG") + tuple(e for e in IMAGE_EXTENSIONS if e != ".png"):
            candidate = os.path.join(mask_dir, stem + suffix + ext)
            if os.path.isfile(candidate):
                return candidate
    return None


def _anomalous(cls: str, defect: str, path: str, mask_dir: str, root: str, skip_bad: bool,
               skipped: list[str] | None) -> Record | None:
    """The test Record of an anomalous image whose mask is `<mask_dir>/<stem>_mask.*` (MVTec-AD and
    MVTec AD 2), or None (a problem reported by `_problem`) when the mask is missing."""
    stem = os.path.splitext(os.path.basename(path))[0]
    mask = _find_mask(mask_dir, stem, ("_mask",))
    if mask is None:
        _problem(f"{path}: anomalous image has no mask (expected {os.path.join(mask_dir, stem + '_mask.png')})",
                 skip_bad, skipped)
        return None
    return Record(cls, "test", 1, defect, path, mask, relative_name(path, root))


def _check_classes(classes: Iterable[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    classes = tuple(default if classes is None else classes)
    if not classes:
        raise DataError("no classes requested")
    dup = [c for c, n in collections.Counter(classes).items() if n > 1]
    if dup:
        raise DataError(f"classes listed twice: {dup}")
    return classes


def _check_nonempty(records: dict[str, list[Record]], where: dict[str, str]) -> None:
    for split in SPLITS:
        if not records[split]:
            raise DataError(f"{where[split]}: the {split} split is empty")


def scan_mvtec(root: str, classes: Iterable[str] | None = None, *, exclude: Iterable[str] = (),
               skip_bad: bool = False,
               skipped: list[str] | None = None) -> dict[str, list[Record]]:
    """Lists an MVTec-AD tree in the official layout.

    Layout: ``<root>/<class>/train/good/*.png``, ``<root>/<class>/test/<defect>/*.png`` (``good`` for
    normal test images) and ``<root>/<class>/ground_truth/<defect>/<stem>_mask.png``.

    Args:
      root: the folder holding the class folders.
      classes: class names to include (default: all 15, `MVTEC_CLASSES`).
      exclude: image paths relative to `root` to leave out (see `MVTEC_REFERENCE_EXCLUDE`).
      skip_bad: skip (with a warning) anomalous images without a mask and non-image files.
      skipped: a list that collects the message of every skipped file (optional).

    Returns:
      {"train": [...], "test": [...]}, classes in the given order, files sorted within a class.
    """
    root = os.path.abspath(root)
    _require_dir(root, "MVTec-AD root folder")
    classes = _check_classes(classes, MVTEC_CLASSES)
    exclude = set(exclude)
    seen_excluded = set()
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for cls in classes:
        cls_dir = os.path.join(root, cls)
        _require_dir(cls_dir, f"class folder of {cls!r} (expected <root>/<class>/train/good)")
        per_split = {s: [] for s in SPLITS}
        good_dir = os.path.join(cls_dir, "train", "good")
        _require_dir(good_dir, f"training folder of {cls!r}")
        for path in _list_images(good_dir, skip_bad, skipped):
            per_split["train"].append(Record(cls, "train", 0, GOOD, path, None, relative_name(path, root)))
        test_dir = os.path.join(cls_dir, "test")
        _require_dir(test_dir, f"test folder of {cls!r}")
        for entry in sorted(os.scandir(test_dir), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                _problem(f"{entry.path}: expected defect folders in {test_dir}, found a file", skip_bad, skipped)
                continue
            defect = entry.name
            mask_dir = os.path.join(cls_dir, "ground_truth", defect)
            for path in _list_images(entry.path, skip_bad, skipped):
                if defect == GOOD:
                    per_split["test"].append(Record(cls, "test", 0, GOOD, path, None, relative_name(path, root)))
                    continue
                record = _anomalous(cls, defect, path, mask_dir, root, skip_bad, skipped)
                if record is not None:
                    per_split["test"].append(record)
        for split, where in (("train", good_dir), ("test", test_dir)):
            kept = [r for r in per_split[split] if r.filename not in exclude]
            seen_excluded.update(r.filename for r in per_split[split] if r.filename in exclude)
            if not kept:
                raise DataError(f"{where}: the {split} split of class {cls!r} is empty")
            out[split].extend(kept)
    for missing in sorted(exclude - seen_excluded):
        log.warning("exclude list names %s, which is not among the scanned images", missing)
    return out


MVTEC_AD2_SPLITS = ("train", "validation", "test")
MVTEC_AD2_UNLABELLED = ("test_private", "test_private_mixed")
"""MVTec AD 2's test sets without ground truth: not prepared (a stored example needs a label);
score them with ``diad-jax predict --input <root>/<class>/test_private``."""


def scan_mvtec_ad2(root: str, classes: Iterable[str] | None = None, *, skip_bad: bool = False,
                   skipped: list[str] | None = None) -> dict[str, list[Record]]:
    """Lists an MVTec AD 2 tree in the official layout.

    Layout: ``<root>/<class>/train/good/*.png``, ``<root>/<class>/validation/good/*.png``,
    ``<root>/<class>/test_public/{good,bad}/*.png`` with the masks of the bad images at
    ``<root>/<class>/test_public/ground_truth/bad/<stem>_mask.png``. The splits are train, validation
    (normal images only) and test (= test_public, labelled; defect type "bad"). The unlabelled
    `MVTEC_AD2_UNLABELLED` folders are not read (their presence is logged); any other entry in
    ``test_public/`` is an error.

    Args:
      root: the folder holding the class folders.
      classes: class names to include (default: all 8, `MVTEC_AD2_CLASSES`).
      skip_bad: skip (with a warning) anomalous images without a mask, non-image files and unexpected
        entries in ``test_public/``.
      skipped: a list that collects the message of every skipped file (optional).

    Returns:
      {"train": [...], "validation": [...], "test": [...]}, classes in the given order, files sorted.
    """
    root = os.path.abspath(root)
    _require_dir(root, "MVTec AD 2 root folder")
    classes = _check_classes(classes, MVTEC_AD2_CLASSES)
    out: dict[str, list[Record]] = {s: [] for s in MVTEC_AD2_SPLITS}
    unlabelled = []
    for cls in classes:
        cls_dir = os.path.join(root, cls)
        _require_dir(cls_dir, f"class folder of {cls!r} (expected <root>/<class>/train/good)")
        public = os.path.join(cls_dir, "test_public")
        _require_dir(public, f"test_public folder of {cls!r}")
        for entry in sorted(os.scandir(public), key=lambda e: e.name):
            if not entry.name.startswith(".") and entry.name not in ("good", "bad", "ground_truth"):
                _problem(f"{entry.path}: unexpected entry (test_public holds good/, bad/ and ground_truth/)",
                         skip_bad, skipped)
        folders = {"train": os.path.join(cls_dir, "train", "good"),
                   "validation": os.path.join(cls_dir, "validation", "good"),
                   "test": os.path.join(public, "good")}
        per_split = {s: [] for s in MVTEC_AD2_SPLITS}
        for split, folder in folders.items():
            _require_dir(folder, f"{split} folder of {cls!r}")
            per_split[split] = [Record(cls, split, 0, GOOD, p, None, relative_name(p, root))
                                for p in _list_images(folder, skip_bad, skipped)]
        bad_dir, mask_dir = os.path.join(public, "bad"), os.path.join(public, "ground_truth", "bad")
        _require_dir(bad_dir, f"anomalous test folder of {cls!r}")
        for path in _list_images(bad_dir, skip_bad, skipped):
            record = _anomalous(cls, "bad", path, mask_dir, root, skip_bad, skipped)
            if record is not None:
                per_split["test"].append(record)
        for split, records in per_split.items():
            if not records:
                raise DataError(f"{public if split == 'test' else folders[split]}: the {split} split of class "
                                f"{cls!r} is empty")
            out[split].extend(records)
        unlabelled += [p for p in (os.path.join(cls_dir, d) for d in MVTEC_AD2_UNLABELLED) if os.path.isdir(p)]
    if unlabelled:
        log.info("MVTec AD 2: %d unlabelled test folder(s) are not prepared (%s, ...); score them with "
                 "diad-jax predict --input <folder>", len(unlabelled), unlabelled[0])
    return out


def _read_visa_annotations(cls_dir: str) -> dict[str, str]:
    """image path (relative to the VisA root) -> defect name, from `<class>/image_anno.csv` if present."""
    path = os.path.join(cls_dir, "image_anno.csv")
    if not os.path.isfile(path):
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["image"]: r["label"] for r in rows if r.get("image") and r.get("label")}


def scan_visa(root: str, classes: Iterable[str] | None = None, *, split_csv: str = "split_csv/1cls.csv",
              skip_bad: bool = False,
              skipped: list[str] | None = None) -> dict[str, list[Record]]:
    """Lists VisA from its official release layout and a split CSV.

    The CSV has the columns ``object,split,label,image,mask``: `split` is train/test, `label` is
    normal/anomaly, `image` and `mask` are paths relative to `root` (mask empty for normal images).
    The defect type of an anomalous image comes from ``<root>/<class>/image_anno.csv`` when present,
    else it is "anomaly".

    Args:
      root: the VisA root (holding ``candle/``, ..., ``split_csv/``).
      classes: class names (default: all 12, `VISA_CLASSES`).
      split_csv: the split file, relative to `root` or absolute (the official 1-class split by default;
        the reference's training/VisA/visa.csv holds the same split).
      skip_bad: skip (with a warning) rows whose image or mask is missing.
      skipped: a list that collects the message of every skipped file (optional).
    """
    root = os.path.abspath(root)
    _require_dir(root, "VisA root folder")
    classes = _check_classes(classes, VISA_CLASSES)
    csv_path = split_csv if os.path.isabs(split_csv) else os.path.join(root, split_csv)
    if not os.path.isfile(csv_path):
        raise DataError(f"{csv_path}: VisA split file not found")
    for cls in classes:
        _require_dir(os.path.join(root, cls), f"class folder of {cls!r}")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {sorted(missing)}")
        rows = [(i + 2, row) for i, row in enumerate(reader)]  # line numbers, header is line 1
    wanted = set(classes)
    annotations = {cls: _read_visa_annotations(os.path.join(root, cls)) for cls in classes}
    per_class = {cls: {s: [] for s in SPLITS} for cls in classes}
    for line, row in rows:
        cls = row["object"]
        if cls not in wanted:
            continue
        where = f"{csv_path}:{line}"
        split, label_name = row["split"].strip(), row["label"].strip()
        if split not in SPLITS:
            raise DataError(f"{where}: split must be train or test, got {split!r}")
        if label_name not in ("normal", "anomaly"):
            raise DataError(f"{where}: label must be normal or anomaly, got {label_name!r}")
        image = os.path.join(root, row["image"])
        if not os.path.isfile(image):
            _problem(f"{image}: image listed in {where} not found", skip_bad, skipped)
            continue
        if label_name == "normal":
            record = Record(cls, split, 0, GOOD, image, None, row["image"])
        else:
            mask = os.path.join(root, row["mask"]) if row["mask"].strip() else None
            if mask is None or not os.path.isfile(mask):
                _problem(f"{image}: anomalous image has no mask ({where} gives "
                         f"{row['mask']!r})", skip_bad, skipped)
                continue
            defect = annotations[cls].get(row["image"], "anomaly")
            record = Record(cls, split, 1, defect, image, mask, row["image"])
        per_class[cls][split].append(record)
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for cls in classes:
        for split in SPLITS:
            if not per_class[cls][split]:
                raise DataError(f"{csv_path}: the {split} split of class {cls!r} is empty")
            out[split].extend(per_class[cls][split])
    return out


def _read_realiad_json(path: str) -> dict:
    """One Real-IAD split file: {"meta": {"prefix", "normal_class", ...}, "train": [...], "test": [...]}."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: Real-IAD split file not found")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the split file ({e})") from e
    meta = doc.get("meta") if isinstance(doc, dict) else None
    if (not isinstance(meta, dict) or not {"prefix", "normal_class"} <= set(meta)
            or not all(isinstance(doc.get(s), list) for s in SPLITS)):
        raise DataError(f"{path}: expected {{\"meta\": {{\"prefix\": ..., \"normal_class\": ...}}, \"train\": [...], "
                        f"\"test\": [...]}}")
    return doc


def scan_realiad(root: str, classes: Iterable[str] | None = None, *, json_dir: str = "realiad_jsons",
                 image_dir: str = "realiad_1024", skip_bad: bool = False,
                 skipped: list[str] | None = None) -> dict[str, list[Record]]:
    """Lists Real-IAD from its official release: one JSON split file per class and an image folder.

    Layout: ``<root>/<json_dir>/<class>.json`` and ``<root>/<image_dir>/<class>/OK/S<sample>/*.jpg``,
    ``.../<class>/NG/<defect>/S<sample>/*.jpg`` with a ``.png`` mask beside each. A split file holds
    ``{"meta": {"prefix": ..., "normal_class": "OK", ...}, "train": [...], "test": [...]}``, each entry
    ``{"category", "anomaly_class", "image_path", "mask_path"}`` with paths relative to
    ``<root>/<image_dir>/<prefix>``. Every camera view is an example of its own (the single-image
    protocol). As in the official loader (Tencent/AnomalyDetection_Real-IAD, ExplicitDataset), an entry
    is normal if its anomaly_class is the normal class or it has no mask_path (a null mask_path on an
    NG entry is counted and logged); anomalous entries take their mask from mask_path and their
    defect type from anomaly_class (e.g. "AK", "BX", ...). The train split of the FUIAD files
    (``realiad_jsons_fuiad_*``) holds anomalous entries on purpose: they keep their labels, and
    training reads no labels.

    Args:
      root: the Real-IAD root (holding ``realiad_jsons/``, ``realiad_1024/``, ...).
      classes: class names (default: all 30, `REALIAD_CLASSES`).
      json_dir: the folder of split files, relative to `root`: ``realiad_jsons``
        (multi-view UIAD, the default), ``realiad_jsons_sv`` (single view), ``realiad_jsons_fuiad_0.1``, ...
      image_dir: the image folder, relative to `root`: ``realiad_1024`` (the default: the resolution
        the official repository downloads and trains on), ``realiad_raw``, or a smaller copy such as
        ``realiad_256`` where you have one (smaller files to decode when preparing at 256 px).
      skip_bad: skip (with a warning) entries whose image or mask file is missing.
      skipped: a list that collects the message of every skipped file (optional).
    """
    root = os.path.abspath(root)
    _require_dir(root, "Real-IAD root folder")
    classes = _check_classes(classes, REALIAD_CLASSES)
    json_root, image_root = os.path.join(root, json_dir), os.path.join(root, image_dir)
    _require_dir(json_root, "Real-IAD split-file folder (json_dir)")
    _require_dir(image_root, "Real-IAD image folder (image_dir)")
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for cls in classes:
        path = os.path.join(json_root, f"{cls}.json")
        doc = _read_realiad_json(path)
        base, normal = os.path.join(image_root, doc["meta"]["prefix"]), doc["meta"]["normal_class"]
        hidden = 0
        for split in SPLITS:
            records = []
            for i, entry in enumerate(doc[split]):
                where = f"{path}: {split}[{i}]"
                if not isinstance(entry, dict) or not {"anomaly_class", "image_path"} <= set(entry):
                    raise DataError(f"{where}: an entry needs anomaly_class and image_path, got {entry!r}")
                image = os.path.join(base, entry["image_path"])
                if not os.path.isfile(image):
                    _problem(f"{image}: image listed in {where} not found", skip_bad, skipped)
                    continue
                name, defect = relative_name(image, root), entry["anomaly_class"]
                if defect == normal or not entry.get("mask_path"):
                    hidden += defect != normal
                    records.append(Record(cls, split, 0, GOOD, image, None, name))
                    continue
                mask = os.path.join(base, entry["mask_path"])
                if not os.path.isfile(mask):
                    _problem(f"{image}: anomalous image has no mask ({where} gives {entry['mask_path']!r}, "
                             f"{mask} not found)", skip_bad, skipped)
                    continue
                records.append(Record(cls, split, 1, defect, image, mask, name))
            if not records:
                raise DataError(f"{path}: the {split} split of class {cls!r} is empty")
            out[split].extend(records)
        if hidden:
            log.info("Real-IAD %s: entries with a defect class but no mask_path count as normal, as in the "
                     "official loader: %d", cls, hidden)
    return out


def scan_folder(root: str, classes: Iterable[str] | None = None, *, normal_dir: str = "normal",
                test_normal_dir: str = "test_normal", anomalous_dir: str = "anomalous",
                mask_dir: str = "masks", test_normal_fraction: float = 0.2, split_seed: int = 0,
                require_masks: bool = False, skip_bad: bool = False,
                skipped: list[str] | None = None) -> dict[str, list[Record]]:
    """Lists a generic folder dataset: normal images, optionally anomalous images with or without masks.

    Layout, one folder per class (names of the sub-folders configurable)::

        <root>/<class>/normal/**            normal images (searched recursively)
        <root>/<class>/test_normal/**       optional: normal test images
        <root>/<class>/anomalous/[<defect>/]*   optional: anomalous test images
        <root>/<class>/masks/[<defect>/]<stem>[_mask].<ext>   the anomalous images' masks, where known

    If ``test_normal/`` is absent, a fraction `test_normal_fraction` of the normal images (chosen
    with `split_seed`, reproducibly) is held out for the test split. An anomalous image directly in
    ``anomalous/`` gets the defect type "anomalous"; one in ``anomalous/<defect>/`` gets <defect>.
An anomalous image without a mask is kept with an image label only (one warning per class): it counts
in the image metrics and is left out of the pixel metrics; `require_masks=True` makes it an error
(or, with `skip_bad`, skipped).

    Args:
      root: the folder holding the class folders.
      classes: class folder names (default: every non-hidden sub-folder of `root`, sorted).
      require_masks: an anomalous image without a mask is an error (default: kept, image label only).
      skip_bad: skip (with a warning) non-image files, and with `require_masks` anomalous images without a mask.
      skipped: a list that collects the message of every skipped file (optional).
    """
    root = os.path.abspath(root)
    _require_dir(root, "dataset root folder")
    if classes is None:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"{root}: no class folders found")
    classes = _check_classes(classes, ())
    if not 0.0 <= test_normal_fraction < 1.0:
        raise DataError(f"test_normal_fraction must be in [0, 1), got {test_normal_fraction}")
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for ci, cls in enumerate(classes):
        cls_dir = os.path.join(root, cls)
        _require_dir(cls_dir, f"class folder of {cls!r}")
        normal_path = os.path.join(cls_dir, normal_dir)
        _require_dir(normal_path, f"normal-image folder of {cls!r}")
        normals = _list_images(normal_path, skip_bad, skipped, recursive=True)
        test_normal_path = os.path.join(cls_dir, test_normal_dir)
        if os.path.isdir(test_normal_path):
            train, test_normals = normals, _list_images(test_normal_path, skip_bad, skipped, recursive=True)
        else:
            n_hold = int(round(test_normal_fraction * len(normals)))
            rng = np.random.default_rng([split_seed, ci])
            held = set(rng.permutation(len(normals))[:n_hold].tolist())
            train = [p for i, p in enumerate(normals) if i not in held]
            test_normals = [p for i, p in enumerate(normals) if i in held]
        if not train:
            raise DataError(f"{normal_path}: the train split of class {cls!r} is empty")
        out["train"].extend(Record(cls, "train", 0, GOOD, p, None, relative_name(p, root)) for p in train)
        test = [Record(cls, "test", 0, GOOD, p, None, relative_name(p, root)) for p in test_normals]
        anomalous_path = os.path.join(cls_dir, anomalous_dir)
        if os.path.isdir(anomalous_path):
            masks_root = os.path.join(cls_dir, mask_dir)
            unmasked = []
            for path in _list_images(anomalous_path, skip_bad, skipped, recursive=True):
                rel = os.path.relpath(path, anomalous_path)
                sub = os.path.dirname(rel)
                defect = sub.split(os.sep)[0] if sub else "anomalous"
                stem = os.path.splitext(os.path.basename(path))[0]
                mask = _find_mask(os.path.join(masks_root, sub), stem, ("", "_mask"))
                if mask is None:
                    if require_masks:
                        _problem(f"{path}: anomalous image has no mask (looked for "
                                 f"{os.path.join(masks_root, sub, stem)}[_mask].png)", skip_bad, skipped)
                        continue
                    unmasked.append(path)
                test.append(Record(cls, "test", 1, defect, path, mask, relative_name(path, root)))
            if unmasked:
                log.warning("class %r: %d anomalous image(s) without a mask in %s (e.g. %s): they count in the "
                            "image metrics and are left out of the pixel metrics (require_masks=true refuses "
                            "them)", cls, len(unmasked), masks_root, unmasked[0])
        if not test:
            raise DataError(f"{cls_dir}: the test split of class {cls!r} is empty (no {test_normal_dir}/, "
                            f"no {anomalous_dir}/ and no held-out normal images)")
        out["test"].extend(test)
    return out
