"""Input pipelines on grain: training (shuffled, sharded, resumable) and evaluation (in order, padded).

Per example, as the reference's dataloader does: resize to the model's size with PIL bilinear (only
if it differs from the prepared size; a dataset prepared at the model's size is not resized
again), scale to [0, 1], normalise with the ImageNet mean/std, and lay out as CHW float32. The
mask becomes float32 [1, H, W] with values 0/1 (resized bilinearly and binarised at > 0, which is
how the reference's metrics read its bilinear-resized mask).

A batch is a dict of numpy arrays::

    image        float32 [B, 3, H, W]   normalised
    mask         float32 [B, 1, H, W]   0/1
    label        int32   [B]            0 good / 1 anomalous
    class_index  int32   [B]            index into PreparedDataset.class_names (-1 on padding)
    index        int64   [B]            position of the example in its split (-1 on padding)
    valid        bool    [B]            False on the padding of the last evaluation batch
    class_name, defect_type, filename   str [B]   ("" on padding)

Training (`train_dataset`): every epoch is a fresh permutation of the split (seeded by `seed` and
the epoch number, identical on every host); host `i` of `n` takes positions i, i+n, i+2n, ... of it.
Each host gets the same number of examples per epoch, rounded down to a multiple of the batch size,
so all hosts run the same number of steps and batches never straddle epochs (drop-remainder: up to
n*B - 1 examples, a different random few each epoch, are left out of each epoch). So the examples
of global step s (the union of the hosts' s-th batches) are positions s*n*B .. (s+1)*n*B - 1 of the
epochs' permutations, whatever the number of hosts n: `start_step=s` continues a run exactly,
also with another number of hosts (the order of the examples inside a global batch then differs,
which changes a mean loss only by float rounding).

Evaluation (`eval_dataset`): the examples (optionally of some classes only) in stored order, host
`i` of `n` taking every n-th; nothing is dropped. By default the last batch of every host is PADDED
to the full batch size with ``valid=False`` rows (zeros), and all hosts get the same number of
batches (what a multi-host jitted evaluation needs); ``pad=False`` returns a short last batch instead.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import grain
import numpy as np

from diad_jax.configs import IMAGENET_MEAN, IMAGENET_STD
from diad_jax.data.prepared import PreparedDataset
from diad_jax.data.imageio import resize_image, resize_mask
from diad_jax.data.records import DataError, as_text

log = logging.getLogger(__name__)

def normalize(image_uint8: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in the reference's normalised space."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    x = (image_uint8.astype(np.float32) / 255.0 - mean) / std
    return np.moveaxis(x, -1, -3)


def denormalize(image: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`: float32 [..., 3, H, W] -> uint8 [..., H, W, 3] (rounded, clipped)."""
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    x = np.moveaxis(np.asarray(image, np.float32), -3, -1) * std + mean
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def preprocess(example: dict, image_size: int, class_names: Sequence[str]) -> dict:
    """One stored example -> model input (see the module docstring for the keys).

    `example` is what a data source returns, plus "index" (its position in the split).
    """
    image, mask = example["image"], example["mask"]
    if image.shape[0] != image_size:
        image, mask = resize_image(image, image_size), resize_mask(mask, image_size)
    class_name = as_text(example["class_name"])
    return {
        "image": normalize(image),
        "mask": (mask > 0).astype(np.float32)[None],
        "label": np.int32(example["label"]),
        "class_index": np.int32(class_names.index(class_name)),
        "index": np.int64(example["index"]),
        "valid": np.bool_(True),
        "class_name": class_name,
        "defect_type": as_text(example["defect_type"]),
        "filename": as_text(example["filename"]),
    }


def _padding(image_size: int) -> dict:
    return {
        "image": np.zeros((3, image_size, image_size), np.float32),
        "mask": np.zeros((1, image_size, image_size), np.float32),
        "label": np.int32(0), "class_index": np.int32(-1), "index": np.int64(-1), "valid": np.bool_(False),
        "class_name": "", "defect_type": "", "filename": "",
    }


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if (shard_index is None) != (shard_count is None):
        raise ValueError("pass both shard_index and shard_count, or neither")
    if shard_index is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index}")
    return int(shard_index), int(shard_count)


class _Loader:
    """Picklable per-index loader: split index -> preprocessed example (or padding for -1)."""

    def __init__(self, data: PreparedDataset, split: str, image_size: int):
        self.source = data.sources[split]
        self.image_size = image_size
        self.class_names = tuple(data.class_names)

    def __call__(self, index) -> dict:
        index = int(index)
        if index < 0:
            return _padding(self.image_size)
        example = dict(self.source[index])
        example["index"] = index
        return preprocess(example, self.image_size, self.class_names)


def _read_options(num_threads: int | None, prefetch: int | None) -> grain.ReadOptions:
    if num_threads is None:
        num_threads = max(1, min(8, os.cpu_count() or 1))
    if prefetch is None:
        prefetch = 4 * num_threads
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)


def _select(data: PreparedDataset, split: str, classes) -> np.ndarray:
    indices = data.indices(split, classes)
    if len(indices) == 0:
        raise DataError(f"{data.path}: no {split} examples of classes {classes}")
    return indices


def train_dataset(data: PreparedDataset, batch_size: int, *, split: str = "train",
                  classes: Iterable[str] | str | None = None, image_size: int | None = None, seed: int = 0,
                  num_epochs: int | None = None, shard_index: int | None = None, shard_count: int | None = None,
                  start_step: int = 0, num_threads: int | None = None,
                  prefetch: int | None = None) -> grain.IterDataset:
    """The training pipeline: per-epoch shuffled, host-sharded, batched with drop-remainder.

    Args:
      data: a `PreparedDataset` (from `prepare` / `load`).
      batch_size: per-host batch size.
      split: which split to read (the training split by default).
      classes: restrict to these classes (default: all, mixed, as DiAD trains).
      image_size: model input size (default: the prepared size).
      seed: shuffle seed in [0, 2**32); epoch e uses a permutation derived from seed + e.
      num_epochs: number of epochs, None for an endless stream.
      shard_index, shard_count: this host's shard (default: `jax.process_index()` / `jax.process_count()`).
      start_step: how many batches to skip: the stream from global step `start_step` on (how a
        resumed run continues exactly, with any number of hosts).
      num_threads, prefetch: grain read threads and prefetch buffer (elements).

    Returns:
      A `grain.IterDataset` of batches.
    """
    shard_index, shard_count = _shard(shard_index, shard_count)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    image_size = image_size or data.image_size
    indices = _select(data, split, classes)
    per_host = (len(indices) // shard_count) // batch_size * batch_size
    if per_host == 0:
        raise DataError(f"{data.path}: {len(indices)} {split} examples cannot fill one batch of {batch_size} "
                        f"on each of {shard_count} host(s)")
    ds = grain.MapDataset.source(indices.tolist()).shuffle(seed)
    ds = ds.slice(slice(shard_index, shard_index + per_host * shard_count, shard_count))
    ds = ds.repeat(num_epochs)
    if start_step:
        ds = ds.slice(slice(start_step * batch_size, None))
    ds = ds.map(_Loader(data, split, image_size))
    ds = ds.to_iter_dataset(_read_options(num_threads, prefetch))
    return ds.batch(batch_size, drop_remainder=True)


def steps_per_epoch(data: PreparedDataset, batch_size: int, *, split: str = "train",
                    classes: Iterable[str] | str | None = None, shard_count: int | None = None) -> int:
    """How many batches one epoch of `train_dataset` yields on each host."""
    if shard_count is None:
        import jax

        shard_count = jax.process_count()
    return (len(data.indices(split, classes)) // shard_count) // batch_size


def eval_dataset(data: PreparedDataset, batch_size: int, *, split: str = "test",
                 classes: Iterable[str] | str | None = None, indices: Sequence[int] | None = None,
                 image_size: int | None = None, pad: bool = True,
                 shard_index: int | None = None, shard_count: int | None = None,
                 num_threads: int | None = None, prefetch: int | None = None) -> grain.IterDataset:
    """The evaluation pipeline: stored order, one pass, nothing dropped.

    Args:
      data: a `PreparedDataset`.
      batch_size: per-host batch size.
      split: which split (the test split by default).
      classes: only these classes (e.g. one class for per-class evaluation); default all.
      indices: only these examples of the split (ascending), instead of `classes`.
      image_size: model input size (default: the prepared size).
      pad: pad each host's last batch to `batch_size` with ``valid=False`` rows and give every host the
        same number of batches (default); False: the last batch may be shorter and hosts may differ by one.
      shard_index, shard_count: this host's shard (default: the JAX process index / count).

    Returns:
      A `grain.IterDataset` of batches (see the module docstring); use ``batch["valid"]`` to drop padding.
    """
    shard_index, shard_count = _shard(shard_index, shard_count)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    image_size = image_size or data.image_size
    indices = _select(data, split, classes) if indices is None else np.asarray(indices, np.int64)
    mine = indices[shard_index::shard_count].tolist()
    if pad:
        longest = -(-len(indices) // shard_count)
        n_batches = -(-longest // batch_size)
        mine += [-1] * (n_batches * batch_size - len(mine))
    ds = grain.MapDataset.source(mine).map(_Loader(data, split, image_size))
    ds = ds.to_iter_dataset(_read_options(num_threads, prefetch))
    return ds.batch(batch_size, drop_remainder=False)
