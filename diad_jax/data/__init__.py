"""Datasets and input pipelines for DiAD.

Prepare once (decoded uint8 arrays in array_record files, no TensorFlow), then read through grain::

    from diad_jax import data
    ds = data.prepare("synthetic", "/tmp/diad_data", image_size=64)          # or "mvtec_ad", manual_dir=...
    it = iter(data.train_dataset(ds, batch_size=8, seed=0))                   # shuffled, sharded, endless
    it = iter(data.train_dataset(ds, batch_size=8, seed=0, start_step=100))   # the same stream from step 100
    for batch in data.eval_dataset(ds, batch_size=8, classes="disk"): ...     # in order, padded

Modules: records (Record, DataError), imageio (read + the reference's PIL-bilinear resize), layouts
(MVTec-AD / MVTec AD 2 / VisA / Real-IAD / folder scanning), synthetic (the generated dataset), prepared
(prepare / load), builders (the tfds builders; imported on first use, as it imports tensorflow_datasets),
pipeline (grain pipelines), inputs (what `Detector.predict` reads: folders walked, files and arrays read).
"""
from diad_jax.data.prepared import (DATASETS, PreparedDataset, check_options, load, load_from_directory, prepare,
                                    source_fingerprint)
from diad_jax.data.imageio import read_image, read_mask, resize_image, resize_mask
from diad_jax.data.layouts import (MVTEC_AD2_CLASSES, MVTEC_CLASSES, MVTEC_REFERENCE_EXCLUDE, REALIAD_CLASSES,
                                   VISA_CLASSES, scan_folder, scan_mvtec, scan_mvtec_ad2, scan_realiad, scan_visa)
from diad_jax.data.pipeline import denormalize, eval_dataset, normalize, preprocess, steps_per_epoch, train_dataset
from diad_jax.data.records import GOOD, DataError, Record, as_text
from diad_jax.data.synthetic import SYNTHETIC_CLASSES, SyntheticExample, defect_types, render

__all__ = [
    "DATASETS", "GOOD", "MVTEC_AD2_CLASSES", "MVTEC_CLASSES", "MVTEC_REFERENCE_EXCLUDE", "REALIAD_CLASSES",
    "SYNTHETIC_CLASSES", "VISA_CLASSES", "DataError", "DiadConfig", "PreparedDataset", "Record", "SyntheticExample",
    "as_text", "check_options", "defect_types", "denormalize", "eval_dataset", "load", "load_from_directory",
    "normalize", "prepare", "preprocess", "read_image", "read_mask", "render", "resize_image", "resize_mask",
    "scan_folder", "scan_mvtec", "scan_mvtec_ad2", "scan_realiad", "scan_visa", "source_fingerprint",
    "steps_per_epoch", "train_dataset",
]


def __getattr__(name: str):
    # DiadConfig subclasses a tfds class: imported on first use, with tensorflow_datasets
    if name == "DiadConfig":
        from diad_jax.data.builders import DiadConfig
        return DiadConfig
    raise AttributeError(f"module 'diad_jax.data' has no attribute {name!r}")
