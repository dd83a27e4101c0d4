"""Reading images and masks from disk, and the one resize used everywhere.

The reference (mvtecad_dataloader.py / visa_dataloader.py) reads with cv2, converts BGR->RGB,
wraps the array in a PIL image and applies torchvision ``transforms.Resize((256, 256))`` to image
and mask alike. On a PIL image that transform is ``PIL.Image.resize(size, Image.BILINEAR)``:
PIL's bilinear filter, which widens its support when shrinking (i.e. it antialiases), computes
in 8 bits and rounds. The mask (grayscale as read, 0/255 for MVTec-AD) goes through the same
bilinear resize, then ``ToTensor`` (/255); the metrics count every pixel > 0 as anomalous.

We reproduce this exactly: images are resized with PIL bilinear on uint8; masks are resized with
PIL bilinear on their raw grayscale values and then binarised at > 0 (stored as 0/255). Non-square
images are squashed to a square, as in the reference (no crop).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from diad_jax.data.records import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    """True for file names with a known image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open(path: str, mode: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert(mode)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file not found") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes a uint8 HWC RGB array to (size, size) with PIL bilinear (the reference's resize)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image, "RGB").resize((size, size), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resizes a uint8 HW mask with PIL bilinear, then binarises at > 0 to 0/255 (as the metrics see it)."""
    if mask.shape[0] != size or mask.shape[1] != size:
        mask = np.asarray(Image.fromarray(mask, "L").resize((size, size), Image.BILINEAR))
    return np.where(mask > 0, 255, 0).astype(np.uint8)


def read_image(path: str, size: int | None = None) -> np.ndarray:
    """Reads an image as uint8 HWC RGB (grayscale images are replicated to 3 channels, like cv2).

    Args:
      path: image file.
      size: if given, resize to (size, size) with `resize_image`.

    Raises:
      DataError: naming `path` if the file is missing or cannot be decoded.
    """
    image = np.asarray(_open(path, "RGB"))
    return image if size is None else resize_image(image, size)


def read_mask(path: str, size: int | None = None, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Reads a ground-truth mask as uint8 HW with values 0/255 (any non-zero value is anomalous).

    The mask is converted to grayscale first (like cv2.IMREAD_GRAYSCALE), resized with PIL bilinear
    on those raw values if `size` is given, then binarised at > 0.

    Args:
      path: mask file.
      size: if given, resize to (size, size) first.
      expected_hw: if given, the (height, width) of the image this mask belongs to; a mask of another
        size is an error.

    Raises:
      DataError: naming `path` if the file is missing, unreadable or of the wrong size.
    """
    mask = np.asarray(_open(path, "L"))
    if expected_hw is not None and mask.shape != tuple(expected_hw):
        raise DataError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{expected_hw[1]}x{expected_hw[0]}")
    if size is None:
        return np.where(mask > 0, 255, 0).astype(np.uint8)
    return resize_mask(mask, size)


def read_pair(image_path: str, mask_path: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads an image and its mask (all zeros if `mask_path` is None), both resized to `size`.

    Returns:
      (image uint8 [size, size, 3], mask uint8 [size, size] with values 0/255).
    """
    image = read_image(image_path)
    if mask_path is None:
        mask = np.zeros((size, size), np.uint8)
    else:
        mask = read_mask(mask_path, size, expected_hw=image.shape[:2])
    return resize_image(image, size), mask
