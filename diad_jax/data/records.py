"""What one example is, before it is stored: a `Record` pointing at files, and `DataError`.

Scanning a layout on disk (layouts.py) produces Records; reading them (imageio.py) produces
the arrays a builder stores. Keeping the two apart lets every layout be validated completely
(missing folders, missing masks, empty splits) before a single image is decoded.
"""
from __future__ import annotations

import dataclasses
import os

from diad_jax.errors import UserError

GOOD = "good"
"""Defect type of every normal example, whatever the dataset calls it."""


class DataError(UserError):
    """A dataset on disk is not what it should be. The message names the path at fault."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One example as found on disk.

    Attributes:
      class_name: object/texture class, e.g. "bottle".
      split: "train" or "test".
      label: 0 for a normal (good) image, 1 for an anomalous one.
      defect_type: "good" for normal images, else the defect folder/annotation name.
      image_path: absolute path of the image file.
      mask_path: absolute path of the ground-truth mask; None for normal images and for anomalous
        images whose mask is unknown (the folder layout allows them: image metrics only).
      filename: the image path relative to the dataset root, with "/" separators
        (the reference's `filename`, e.g. "bottle/test/broken_large/002.png").
    """

    class_name: str
    split: str
    label: int
    defect_type: str
    image_path: str
    mask_path: str | None
    filename: str

    def __post_init__(self):
        if self.label not in (0, 1):
            raise DataError(f"{self.image_path}: label must be 0 or 1, got {self.label!r}")


def relative_name(path: str, root: str) -> str:
    """`path` relative to `root`, with forward slashes (a stable, platform-free key)."""
    return os.path.relpath(path, root).replace(os.sep, "/")


def as_text(x) -> str:
    """A text feature as read back from a data source (bytes) -> str."""
    return x.decode() if isinstance(x, bytes) else str(x)
