"""What `Detector.predict` reads: folders, files and arrays collected into (name, source) items,
then read into uint8 images at the model's size.

    items = list(collect_inputs("new_images/"))       # (path, path), (path, UserError), ("array[i]", array)
    for chunk in read_chunks(items, size=256, batch=8):  # the next chunk is read while this one is used
        ...                                            # InputImage: image + original size, or an error

A file that cannot be read, or a folder entry the walk cannot follow, is one InputImage with
`error` set: reported for that input, never a stop and never dropped. Images are read and resized
as the data pipeline reads them (`imageio.read_image`, `imageio.resize_image`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from diad_jax.data.imageio import is_image_file, read_image, resize_image
from diad_jax.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InputImage:
    """One collected input, read: `image` and `original_size`, or `error` (and both None)."""

    name: str                                   # the file's path, or "array[i]"
    image: np.ndarray | None = None             # uint8 (size, size, 3), resized with PIL bilinear
    original_size: tuple[int, int] | None = None  # (height, width) of the input
    error: str | None = None                    # why the input could not be read


def collect_inputs(inputs) -> Iterator[tuple[str, Any]]:
    """(name, path or array) for every image of `inputs`: a folder (every image file below it, see
    `_walk`), a file, uint8 HWC arrays ((H, W, 3), (H, W), or a stacked (N, H, W, 3)), or a list
    mixing paths and arrays. An entry of a folder that cannot be followed comes as (its path,
    UserError), reported like an unreadable file. Arrays are checked here, so a wrong one fails
    before any scoring; so does a path that does not exist."""
    if isinstance(inputs, np.ndarray) and inputs.ndim == 4:
        inputs = list(inputs)
    elif isinstance(inputs, (str, os.PathLike, np.ndarray)):
        inputs = [inputs]
    for i, x in enumerate(inputs):
        if isinstance(x, np.ndarray):
            yield f"array[{i}]", _check_array(x, f"array[{i}]")
        elif isinstance(x, (str, os.PathLike)):
            path = Path(x)
            if path.is_dir():
                yield from _walk(path)
            elif path.exists():
                yield str(path), str(path)
            else:
                raise UserError(f"{path}: no such file or folder")
        else:
            raise UserError(f"input {i}: expected a path or a uint8 array, got {type(x).__name__}")


def _walk(folder: Path) -> list[tuple[str, str | UserError]]:
    """(path, path) for every image file below `folder`: a folder's files (sorted), then its
    sub-folders' in turn; hidden entries are skipped, linked folders followed. A folder that cannot
    be listed, or a link back to a folder above it (a loop, not followed), comes as (its path,
    UserError); a broken link as a file (the reader names it). Files without an image extension
    are listed in a warning, not scored."""
    items, others = [], []

    def visit(path: str, above: frozenset[str]) -> None:
        try:
            with os.scandir(path) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            items.append((path, UserError(f"{path}: cannot list this folder ({e.strerror or e})")))
            return
        folders = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:  # a link that cannot be resolved (e.g. to itself): the reader names it
                is_dir = False
            if is_dir:
                folders.append(e.path)
            elif is_image_file(e.name):
                items.append((e.path, e.path))
            else:
                others.append(e.path)
        for sub in folders:
            real = os.path.realpath(sub)
            if real in above:
                items.append((sub, UserError(f"{sub}: a link back to {real}, a folder above it (a loop); not "
                                             f"followed")))
            else:
                visit(sub, above | {real})

    visit(str(folder), frozenset({os.path.realpath(folder)}))
    if others:
        log.warning("%s: %d file(s) without an image extension not scored: %s%s", folder, len(others),
                    ", ".join(others[:5]), " ..." if len(others) > 5 else "")
    if not items:
        raise UserError(f"{folder}: no image files in this folder or below it")
    return items


def _check_array(x: np.ndarray, name: str) -> np.ndarray:
    """`x` as uint8 (H, W, 3): grayscale (H, W) or (H, W, 1) replicated to 3 channels."""
    if x.dtype != np.uint8:
        raise UserError(f"{name}: dtype {x.dtype}; pass uint8 RGB images (H, W, 3) or grayscale (H, W)")
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, -1)
    if x.ndim != 3 or x.shape[2] != 3 or min(x.shape[:2]) < 1:
        raise UserError(f"{name}: shape {x.shape}; pass uint8 RGB images (H, W, 3) or grayscale (H, W)")
    return x


def read_input(item: tuple[str, Any], size: int) -> InputImage:
    """One item of `collect_inputs` read and resized to (size, size); an input that cannot be read
    (or that the walk could not follow) gives an InputImage with `error` naming it."""
    name, x = item
    if isinstance(x, UserError):  # a folder entry the walk could not follow
        return InputImage(name, error=str(x))
    try:
        image = read_image(x) if isinstance(x, str) else x
    except UserError as e:  # unreadable: reported for this file, the others go on
        return InputImage(name, error=str(e))
    return InputImage(name, image=resize_image(image, size), original_size=tuple(image.shape[:2]))


def read_chunks(items: Sequence[tuple[str, Any]], size: int, batch: int) -> Iterator[list[InputImage]]:
    """`read_input` of `items`, `batch` at a time in their order, read on a few threads; the next
    chunk is read while the caller works on this one."""
    chunks = [items[i:i + batch] for i in range(0, len(items), batch)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        def read(item):
            return read_input(item, size)

        pending = pool.map(read, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            loaded = list(pending)
            if k + 1 < len(chunks):
                pending = pool.map(read, chunks[k + 1])
            yield loaded


__all__ = ["InputImage", "collect_inputs", "read_chunks", "read_input"]
