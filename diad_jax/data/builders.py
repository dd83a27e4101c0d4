"""The tensorflow-datasets builders behind `prepare` / `load` (prepared.py, which describes the
stored format); they never import TensorFlow. This module imports tensorflow_datasets, so
prepared.py imports it on first use: importing diad_jax or diad_jax.data does not import tfds.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from diad_jax.data import layouts, synthetic
from diad_jax.data.imageio import read_pair
from diad_jax.data.records import DataError, Record

log = logging.getLogger(__name__)

class _QuietTfds(logging.Filter):
    """Drops two tfds warnings that are expected here: every config is a custom one, and a not yet
    prepared variant folder has no dataset_info.json."""

    _EXPECTED = ("Using custom data configuration", "has no dataset_info.json")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(s in message for s in self._EXPECTED)


if not any(isinstance(f, _QuietTfds) for f in logging.getLogger("absl").filters):
    logging.getLogger("absl").addFilter(_QuietTfds())

VERSION = "1.0.0"

@dataclasses.dataclass(eq=False)
class DiadConfig(tfds.core.BuilderConfig):
    """Builder config: prepared image size, classes (empty: all found), dataset options, skip_bad."""

    image_size: int = 256
    classes: tuple[str, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()
    skip_bad: bool = False


class _DiadBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared parts: features, metadata, and turning `Record`s into stored examples."""

    VERSION = tfds.core.Version(VERSION)
    source: dict | None = None  # `source_fingerprint` of the manual_dir, set by `prepare`
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the dataset's root folder (manual_dir)."

    # tfds locates a builder's source through importlib resources, which needs the separate
    # `importlib_resources` package for an editable install; the file path is all it needs.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    @property
    def _cfg(self) -> DiadConfig:
        return self.builder_config

    @property
    def _opts(self) -> dict[str, Any]:
        return dict(self._cfg.options)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self._cfg.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{type(self).__doc__} Prepared at {s}x{s}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding="bytes"),
                "mask": tfds.features.Tensor(shape=(s, s), dtype=np.uint8, encoding="zlib"),
                "label": tfds.features.Scalar(dtype=np.int64),
                "class_name": tfds.features.Text(),
                "defect_type": tfds.features.Text(),
                "filename": tfds.features.Text(),
            }),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _scan(self, root: str) -> dict[str, list[Record]]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        self.info.metadata["source"] = self.source
        self.info.metadata["skipped"] = []
        records = self._scan(root)
        class_names = list(dict.fromkeys(r.class_name for s in records.values() for r in s))
        self.info.metadata["class_names"] = class_names
        self.info.metadata["splits"] = {}
        for split, recs in records.items():
            counts = collections.Counter((r.class_name, r.label) for r in recs)
            log.info("%s %s: %d images (%s)", self.name, split, len(recs),
                     ", ".join(f"{c}: {counts[c, 0]} good + {counts[c, 1]} anomalous" for c in class_names))
        return {split: self._generate_examples(split, recs, class_names, root) for split, recs in records.items()}

    def _generate_examples(self, split: str, records: Sequence[Record], class_names: list[str], root: str):
        size, skip_bad = self._cfg.image_size, self._cfg.skip_bad
        class_index, labels, has_mask = [], [], []
        for r in records:
            try:
                image, mask = read_pair(r.image_path, r.mask_path, size)
            except DataError as e:
                if not skip_bad:
                    raise
                log.warning("skipping: %s", e)
                self.info.metadata["skipped"].append(str(e))
                continue
            if r.label == 1 and not mask.any():
                log.warning("%s: anomalous image whose mask %s is empty at %dx%d", r.image_path, r.mask_path,
                            size, size)
            class_index.append(class_names.index(r.class_name))
            labels.append(r.label)
            has_mask.append(r.label == 0 or r.mask_path is not None)
            yield r.filename, dict(image=image, mask=mask, label=r.label, class_name=r.class_name,
                                   defect_type=r.defect_type, filename=r.filename)
        _finish_split(self.info.metadata, split, class_index, labels, class_names, root, has_mask)


def _finish_split(metadata, split, class_index, labels, class_names, where, has_mask=None) -> None:
    if not class_index:
        raise DataError(f"{where}: the {split} split is empty after skipping unreadable files")
    missing = sorted(set(range(len(class_names))) - set(class_index))
    if missing:
        raise DataError(f"{where}: the {split} split has no readable image of class(es) "
                        f"{[class_names[i] for i in missing]} after skipping unreadable files")
    metadata["splits"][split] = dict(class_index=class_index, label=labels,
                                     has_mask=has_mask if has_mask is not None else [True] * len(labels))


class DiadMvtecAd(_DiadBuilder):
    """MVTec-AD (official layout: <class>/train/good, <class>/test/<defect>, <class>/ground_truth)."""

    name = "diad_mvtec_ad"

    def _scan(self, root):
        return layouts.scan_mvtec(root, self._cfg.classes or None, exclude=self._opts["exclude"],
                                  skip_bad=self._cfg.skip_bad, skipped=self.info.metadata["skipped"])


class DiadMvtecAd2(_DiadBuilder):
    """MVTec AD 2 (official layout: <class>/train/good, <class>/validation/good, <class>/test_public)."""

    name = "diad_mvtec_ad_2"

    def _scan(self, root):
        return layouts.scan_mvtec_ad2(root, self._cfg.classes or None, skip_bad=self._cfg.skip_bad,
                                      skipped=self.info.metadata["skipped"])


class DiadVisa(_DiadBuilder):
    """VisA (official release layout and split CSV, columns object,split,label,image,mask)."""

    name = "diad_visa"

    def _scan(self, root):
        return layouts.scan_visa(root, self._cfg.classes or None, split_csv=self._opts["split_csv"],
                                 skip_bad=self._cfg.skip_bad, skipped=self.info.metadata["skipped"])


class DiadRealIad(_DiadBuilder):
    """Real-IAD (official release: <json_dir>/<class>.json split files, <image_dir>/<class>/{OK,NG})."""

    name = "diad_real_iad"

    def _scan(self, root):
        return layouts.scan_realiad(root, self._cfg.classes or None, skip_bad=self._cfg.skip_bad,
                                    skipped=self.info.metadata["skipped"], **self._opts)


class DiadFolder(_DiadBuilder):
    """A generic folder dataset: <class>/normal, optional <class>/anomalous with <class>/masks."""

    name = "diad_folder"

    def _scan(self, root):
        return layouts.scan_folder(root, self._cfg.classes or None, skip_bad=self._cfg.skip_bad,
                                   skipped=self.info.metadata["skipped"], **self._opts)


class DiadSynthetic(_DiadBuilder):
    """Generated multi-class defect dataset (textures and simple objects; diad_jax.data.synthetic)."""

    name = "diad_synthetic"

    def _split_generators(self, dl_manager):
        classes = list(self._cfg.classes)
        self.info.metadata["class_names"] = classes
        self.info.metadata["splits"] = {}
        o = self._opts
        counts = {"train": o["train_per_class"], "test": o["test_per_class"]}
        return {split: self._generate_synthetic(split, n, classes) for split, n in counts.items()}

    def _generate_synthetic(self, split: str, count: int, classes: list[str]):
        o = self._opts
        class_index, labels = [], []
        for ci, cls in enumerate(classes):
            for ex in synthetic.generate(cls, split, count, image_size=self._cfg.image_size, seed=o["seed"],
                                         test_good_fraction=o["test_good_fraction"]):
                class_index.append(ci)
                labels.append(ex["label"])
                yield ex["filename"], ex
        _finish_split(self.info.metadata, split, class_index, labels, classes, "synthetic dataset")


# dataset kind (configs.DATASETS) -> builder class
BUILDERS = {"mvtec_ad": DiadMvtecAd, "mvtec_ad_2": DiadMvtecAd2, "visa": DiadVisa, "real_iad": DiadRealIad,
            "folder": DiadFolder, "synthetic": DiadSynthetic}

