"""`prepare` / `load`: datasets prepared once through tensorflow-datasets builders (builders.py,
imported on first use) that never import TensorFlow, and opened for reading as `PreparedDataset`.

Every dataset is stored the same way: decoded uint8 arrays as `tfds.features.Tensor` (the image
raw, the mask zlib-compressed, as masks are mostly zero) in array_record files, read back with
`tfds.data_source` (random access, no TensorFlow). `tfds.features.Image` is not used because
encoding arrays with it needs TensorFlow.

Each stored example::

    image        uint8 [S, S, 3]  resized to the prepared size S with PIL bilinear (see imageio.py)
    mask         uint8 [S, S]     0 or 255; all zero for normal images
    label        int64            0 good, 1 anomalous
    class_name   text             e.g. "bottle"
    defect_type  text             "good", or the defect folder / annotation name
    filename     text             source path relative to the dataset root (a synthetic name for
                                  the generated dataset)

Examples are written in a fixed order (classes in the order given, files sorted within a class;
tfds shuffling is disabled), and metadata.json beside the records holds the class names and, per
split, the class index and label of every example, so filtering a class never decodes an image.

One prepared copy lives at ``<data_dir>/diad_<dataset>/s<size>-<digest>[-<source>]/1.0.0/``: the
config name encodes the prepared image size, a digest of the class list and the dataset options,
and (for the datasets read from disk) a digest of the source folder's absolute path, so different
sizes, subsets and source folders coexist in one data_dir. metadata.json also records the source
folder's fingerprint (file count, bytes, a digest of every file's path, size and mtime) when it was
prepared: a copy whose source folder has changed since is refused (re-prepare it with
``overwrite=True``), never silently reused; and the files skipped with ``skip_bad=True``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from diad_jax.configs import DATASETS
from diad_jax.data import layouts, synthetic
from diad_jax.data.records import DataError, as_text

if TYPE_CHECKING:
    from diad_jax.data.builders import DiadConfig

log = logging.getLogger(__name__)

# Options each dataset accepts besides classes / image_size, with their defaults.
_OPTIONS: dict[str, dict[str, Any]] = {
    "mvtec_ad": dict(exclude=()),
    "mvtec_ad_2": dict(),
    "visa": dict(split_csv="split_csv/1cls.csv"),
    "real_iad": dict(json_dir="realiad_jsons", image_dir="realiad_1024"),
    "folder": dict(normal_dir="normal", test_normal_dir="test_normal", anomalous_dir="anomalous",
                   mask_dir="masks", test_normal_fraction=0.2, split_seed=0, require_masks=False),
    "synthetic": dict(train_per_class=60, test_per_class=40, test_good_fraction=0.5, seed=0),
}
_DEFAULT_CLASSES = {"mvtec_ad": layouts.MVTEC_CLASSES, "mvtec_ad_2": layouts.MVTEC_AD2_CLASSES,
                    "visa": layouts.VISA_CLASSES, "real_iad": layouts.REALIAD_CLASSES, "folder": (),
                    "synthetic": synthetic.SYNTHETIC_CLASSES}


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset opened for reading.

    Attributes:
      name: the dataset kind (one of `DATASETS`, e.g. "mvtec_ad") or the builder name.
      path: the directory holding the array_record files.
      image_size: the prepared (stored) image size.
      class_names: classes in stored order; `class_index` values index into it.
      sources: split -> random-access data source (`len`, `[i]` -> dict of numpy arrays / bytes).
      class_index: split -> int32 array, the class index of every example.
      labels: split -> int32 array, 0 good / 1 anomalous of every example.
      source: the source folder's fingerprint when the copy was prepared (`source_fingerprint`;
        None for the generated dataset).
      skipped: what was skipped when the copy was prepared with skip_bad=True, one message per file.
      has_mask: split -> bool array, False for anomalous images without a ground-truth mask (the folder
        layout accepts them: they count in the image metrics only).
    """

    name: str
    path: str
    image_size: int
    class_names: tuple[str, ...]
    sources: Mapping[str, Any]
    class_index: Mapping[str, np.ndarray]
    labels: Mapping[str, np.ndarray]
    source: dict | None = None
    skipped: tuple[str, ...] = ()
    has_mask: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.sources)

    def indices(self, split: str, classes: Iterable[str] | str | None = None) -> np.ndarray:
        """Indices (ascending) of the examples of `split` that belong to `classes` (default: all)."""
        if split not in self.sources:
            raise DataError(f"{self.path}: no split {split!r} (have {list(self.sources)})")
        ci = self.class_index[split]
        if classes is None:
            return np.arange(len(ci), dtype=np.int64)
        if isinstance(classes, str):
            classes = [classes]
        wanted = []
        for c in classes:
            if c not in self.class_names:
                raise DataError(f"{self.path}: no class {c!r} (have {list(self.class_names)})")
            wanted.append(self.class_names.index(c))
        return np.flatnonzero(np.isin(ci, wanted)).astype(np.int64)

    def counts(self) -> dict[str, dict[str, tuple[int, int]]]:
        """split -> class -> (number of good, number of anomalous) examples."""
        out = {}
        for split in self.sources:
            ci, lab = self.class_index[split], self.labels[split]
            out[split] = {c: (int(((ci == i) & (lab == 0)).sum()), int(((ci == i) & (lab == 1)).sum()))
                          for i, c in enumerate(self.class_names)}
        return out

    def __getitem__(self, split: str):
        return self.sources[split]


def check_options(dataset: str, options: Mapping[str, Any]) -> None:
    """Raises DataError unless `dataset` is known and takes every option in `options`."""
    if dataset not in _OPTIONS:
        raise DataError(f"unknown {{0}} {dataset!r}; choose from {DATASETS}", fields=["dataset"])
    unknown = sorted(set(options) - set(_OPTIONS[dataset]))
    if unknown:
        raise DataError(f"unknown option(s) {unknown} for dataset {dataset!r} ({{0}}); it takes "
                        f"{sorted(_OPTIONS[dataset])}", fields=["options"])


def source_fingerprint(root: str | os.PathLike, exclude: str | os.PathLike | None = None) -> dict:
    """What a prepared copy was made from: the folder's absolute path, its number of files and bytes,
    and a digest of every file's relative path, size and modification time (hidden entries are
    ignored, as the layouts ignore them; so is the folder `exclude`, e.g. a data_dir inside the
    source folder). Stat calls only: about 0.1 s for MVTec-AD."""
    root = os.path.realpath(root)
    skip = os.path.realpath(exclude) if exclude is not None else None
    h, files, size = hashlib.sha1(), 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) != skip)
        for name in sorted(f for f in filenames if not f.startswith(".")):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            files, size = files + 1, size + st.st_size
    return {"path": root, "files": files, "bytes": size, "digest": h.hexdigest()[:16]}


def _make_config(dataset: str, classes, image_size: int, skip_bad: bool, options: dict,
                 source_path: str | None) -> DiadConfig:
    check_options(dataset, options)
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise DataError(f"image_size must be an integer >= 8, got {image_size!r}")
    opts = {**_OPTIONS[dataset], **options}
    for k, v in opts.items():  # canonical, JSON-friendly values (lists -> tuples)
        if isinstance(v, (list, tuple)):
            opts[k] = tuple(v)
    if classes is not None:
        classes = (classes,) if isinstance(classes, str) else tuple(classes)
        if dataset == "synthetic":
            for c in classes:
                if c not in synthetic.SYNTHETIC_CLASSES:
                    raise DataError(f"unknown synthetic class {c!r}; choose from {synthetic.SYNTHETIC_CLASSES}")
    elif dataset == "synthetic":
        classes = synthetic.SYNTHETIC_CLASSES
    else:
        classes = ()
    if tuple(classes) == tuple(_DEFAULT_CLASSES[dataset]) and dataset != "synthetic":
        classes = ()  # "all classes" and the explicit full list are the same prepared copy
    identity = json.dumps({"classes": list(classes), "options": opts}, sort_keys=True, default=list)
    name = f"s{int(image_size)}-{hashlib.sha1(identity.encode()).hexdigest()[:10]}"
    if source_path is not None:
        name += "-" + hashlib.sha1(os.path.realpath(source_path).encode()).hexdigest()[:8]
    from diad_jax.data.builders import DiadConfig  # imports tensorflow_datasets

    return DiadConfig(name=name, description=identity, image_size=int(image_size), classes=tuple(classes),
                      options=tuple(sorted(opts.items())), skip_bad=skip_bad)


def _builder(dataset: str, data_dir, classes, image_size: int, skip_bad: bool, options: dict,
             source_path: str | None):
    from diad_jax.data.builders import BUILDERS

    config = _make_config(dataset, classes, image_size, skip_bad, options, source_path)
    return BUILDERS[dataset](data_dir=os.fspath(data_dir), config=config, file_format="array_record"), config


def _assert_no_tensorflow() -> None:
    if "tensorflow" in sys.modules:  # pragma: no cover - a guard against regressions
        log.warning("tensorflow was imported; diad_jax.data is meant to run without it")


def _source_dir(dataset: str, manual_dir) -> str | None:
    """The checked source folder of a dataset read from disk (None for the generated one)."""
    if dataset == "synthetic":
        if manual_dir is not None:
            raise DataError(f"{manual_dir}: the generated 'synthetic' dataset takes no source folder "
                            f"({{0}}); pick the dataset it holds with {{1}}", fields=["manual_dir", "dataset"])
        return None
    if manual_dir is not None and not os.path.isdir(manual_dir):
        raise DataError(f"{manual_dir}: dataset root folder not found ({{0}})", fields=["manual_dir"])
    return None if manual_dir is None else os.fspath(manual_dir)


def prepare(dataset: str, data_dir: str | os.PathLike, *, manual_dir: str | os.PathLike | None = None,
            classes: Iterable[str] | str | None = None, image_size: int = 256, skip_bad: bool = False,
            overwrite: bool = False, **options) -> PreparedDataset:
    """Prepares a dataset once into `data_dir` (a no-op if already prepared) and opens it.

    Args:
      dataset: one of `DATASETS`: "mvtec_ad", "mvtec_ad_2", "visa", "real_iad", "folder" or "synthetic".
      data_dir: where prepared datasets live.
      manual_dir: the downloaded dataset's root folder (not used by "synthetic"). Without it, the
        one copy prepared earlier with these classes/options/size is opened, if there is exactly one.
      classes: class names to include (default: all; for "folder", every class sub-folder).
      image_size: stored image side length; images are resized with PIL bilinear (the reference's
        resize), masks likewise and then binarised at > 0.
      skip_bad: skip (with a logged warning, listed in `PreparedDataset.skipped`) unreadable images,
        anomalous images without a mask and non-image files, instead of failing. A missing class
        folder or an empty split always fails.
      overwrite: delete an existing prepared copy with the same configuration first.
      **options: dataset options:
        mvtec_ad: exclude=() (relative paths to leave out, e.g. `MVTEC_REFERENCE_EXCLUDE`);
        mvtec_ad_2: none (splits train, validation, test = test_public; the unlabelled test_private*
          folders are scored with scripts/predict.py);
        visa: split_csv="split_csv/1cls.csv";
        real_iad: json_dir="realiad_jsons", image_dir="realiad_1024" (see `layouts.scan_realiad`);
        folder: normal_dir, test_normal_dir, anomalous_dir, mask_dir, test_normal_fraction=0.2,
          split_seed=0 (see `layouts.scan_folder`);
        synthetic: train_per_class=60, test_per_class=40, test_good_fraction=0.5, seed=0.

    Returns:
      The opened `PreparedDataset`.

    Raises:
      DataError: naming the path at fault (missing folder, missing mask, unreadable image, empty
        split, a prepared copy whose source folder has changed since).

    On several hosts sharing one data_dir, prepare on one process (e.g. ``jax.process_index() == 0``),
    wait at a barrier, then `load` everywhere; with host-local data_dirs every host may prepare.
    A failed preparation leaves nothing that `load` would mistake for a prepared copy.
    """
    source = _source_dir(dataset, manual_dir)
    if source is None and dataset != "synthetic":
        return load(dataset, data_dir, classes=classes, image_size=image_size, **options)
    builder, config = _builder(dataset, data_dir, classes, image_size, skip_bad, options, source)
    if overwrite and os.path.isdir(builder.data_dir):
        log.info("removing the prepared copy at %s", builder.data_dir)
        shutil.rmtree(builder.data_dir)
        builder, config = _builder(dataset, data_dir, classes, image_size, skip_bad, options, source)
    if not builder.is_prepared():
        log.info("preparing %s (%s%s) into %s", dataset, config.description,
                 f", from {source}" if source else "", builder.data_dir)
        import tensorflow_datasets as tfds

        download_config = tfds.download.DownloadConfig(manual_dir=source)
        if source is not None:
            builder.source = source_fingerprint(source, exclude=data_dir)
        try:
            builder.download_and_prepare(download_config=download_config)
        except Exception as e:
            data_error = _find_data_error(e)
            if data_error is not None and data_error is not e:
                raise data_error from e
            raise
    _assert_no_tensorflow()
    return load(dataset, data_dir, manual_dir=manual_dir, classes=classes, image_size=image_size, **options)


def _find_data_error(e: BaseException | None) -> DataError | None:
    """The DataError at the root of an exception chain (tfds may wrap what the generator raised)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, DataError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def load(dataset: str, data_dir: str | os.PathLike, *, manual_dir: str | os.PathLike | None = None,
         classes: Iterable[str] | str | None = None, image_size: int = 256, **options) -> PreparedDataset:
    """Opens a dataset prepared by `prepare` with the same dataset, source folder, classes, image_size
    and options. Without `manual_dir`, a dataset read from disk opens the one copy prepared from any
    source folder (an error if there are several: pass the one you mean).

    Raises:
      DataError: if it has not been prepared, or its source folder has changed since.
    """
    source = _source_dir(dataset, manual_dir)
    builder, config = _builder(dataset, data_dir, classes, image_size, False, options, source)
    if source is None and dataset != "synthetic":
        builder, config = _single_copy(dataset, data_dir, config)
    if not builder.is_prepared():
        how = ("preparing it needs the dataset's root folder ({0})"
               if dataset != "synthetic" and not source else "prepare it first (diad_jax.data.prepare)")
        raise DataError(f"{builder.data_dir}: dataset {dataset!r} ({config.description}) is not prepared; {how}",
                        fields=["manual_dir"])
    ds = _open(dataset, os.fspath(builder.data_dir), builder.as_data_source(), config.image_size)
    if source is not None:
        now = source_fingerprint(source, exclude=data_dir)
        if ds.source is None or ds.source["digest"] != now["digest"]:
            was = ds.source or {"files": "?", "bytes": "?"}
            raise DataError(f"{ds.path}: this prepared copy was made from {now['path']} when it held {was['files']} "
                            f"files ({was['bytes']} bytes); the folder has changed since ({now['files']} files, "
                            f"{now['bytes']} bytes). Prepare it again ({{0}}), or use another {{1}}",
                            fields=["overwrite=True", "data_dir"])
    if ds.skipped:
        log.warning("%s: %d file(s) were skipped when this copy was prepared (skip_bad), e.g. %s", ds.path,
                    len(ds.skipped), ds.skipped[0])
    return ds


def _single_copy(dataset: str, data_dir, config: DiadConfig):
    """The builder of the one copy prepared with `config`'s classes/options/size from any source folder."""
    from diad_jax.data.builders import BUILDERS, VERSION

    root = os.path.join(os.fspath(data_dir), f"diad_{dataset}")
    names = sorted(n for n in (os.listdir(root) if os.path.isdir(root) else ())
                   if n.startswith(config.name + "-") and os.path.isdir(os.path.join(root, n, VERSION)))
    if len(names) > 1:
        made_from = []
        for n in names:
            try:
                with open(os.path.join(root, n, VERSION, "metadata.json")) as f:
                    made_from.append(json.load(f)["source"]["path"])
            except (OSError, ValueError, KeyError):
                made_from.append(f"? ({n})")
        raise DataError(f"{root}: {len(names)} copies of this dataset were prepared, from {made_from}; pass the "
                        f"source folder you mean ({{0}})", fields=["manual_dir"])
    if names:
        config = dataclasses.replace(config, name=names[0])
    return BUILDERS[dataset](data_dir=os.fspath(data_dir), config=config, file_format="array_record"), config


def load_from_directory(path: str | os.PathLike) -> PreparedDataset:
    """Opens a prepared copy from its directory (``<data_dir>/diad_<dataset>/<config>/<version>``)."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "dataset_info.json")):
        raise DataError(f"{path}: not a prepared dataset directory (no dataset_info.json)")
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(path)
    image_size = int(builder.info.features["image"].shape[0])
    return _open(builder.name, path, builder.as_data_source(), image_size)


def _open(name: str, path: str, sources: Mapping[str, Any], image_size: int) -> PreparedDataset:
    meta_path = os.path.join(path, "metadata.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{meta_path}: cannot read the dataset's metadata ({e})") from e
    class_names = tuple(meta["class_names"])
    class_index, labels, has_mask = {}, {}, {}
    for split, source in sources.items():
        m = meta["splits"][split]
        class_index[split] = np.asarray(m["class_index"], np.int32)
        labels[split] = np.asarray(m["label"], np.int32)
        has_mask[split] = np.asarray(m.get("has_mask", [True] * len(labels[split])), bool)
        if len(class_index[split]) != len(source):
            raise DataError(f"{meta_path}: lists {len(class_index[split])} {split} examples, the records hold "
                            f"{len(source)}")
        for i in (0, len(source) - 1):  # cheap check that the stored order matches the metadata
            ex = source[i]
            if as_text(ex["class_name"]) != class_names[class_index[split][i]] or int(ex["label"]) != labels[split][i]:
                raise DataError(f"{path}: {split} example {i} does not match metadata.json")
    return PreparedDataset(name=name, path=path, image_size=image_size, class_names=class_names,
                           sources=dict(sources), class_index=class_index, labels=labels,
                           source=meta.get("source"), skipped=tuple(meta.get("skipped", ())), has_mask=has_mask)
