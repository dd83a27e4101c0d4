"""Reading images and masks from disk, and the one resize used everywhere (images, masks, anomaly maps).

The reference (mvtecad_dataloader.py / visa_dataloader.py) reads with cv2, converts BGR->RGB,
wraps the array in a PIL image and applies torchvision ``transforms.Resize((256, 256))`` to image
and mask alike. On a PIL image that transform is ``PIL.Image.resize(size, Image.BILINEAR)``:
PIL's bilinear filter, which widens its support when shrinking (i.e. it antialiases), computes
in 8 bits and rounds. The mask (grayscale as read, 0/255 for MVTec-AD) goes through the same
bilinear resize, then ``ToTensor`` (/255); the metrics count every pixel > 0 as anomalous.

We reproduce this exactly: images are resized with PIL bilinear on uint8; masks are resized with
PIL bilinear on their raw grayscale values and then binarised at > 0 (stored as 0/255). Non-square
images are squashed to a square, as in the reference (no crop).

Images and masks are turned upright by their EXIF orientation tag, as cv2.imread does (all eight
orientations): a photo taken sideways is read as a viewer shows it, and its mask lines up with it.

Images that are not 8-bit RGB/grayscale are converted explicitly, never silently mangled:
16-bit grayscale becomes 8-bit by dropping the low byte (v >> 8, what cv2.imread(IMREAD_COLOR)
does; a plain PIL conversion would clip it to white); an image with transparency is composited
on white, with a warning naming the file (cv2 would keep whatever colour lies under transparent
pixels, often black); 32-bit integer or float images are refused. A 16-bit mask is binarised on
its raw values (any non-zero value is anomalous).
"""
from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image, ImageOps

from diad_jax.data.records import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def is_image_file(name: str) -> bool:
    """True for file names with a known image extension (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open(path: str) -> Image.Image:
    """The decoded image at `path`, upright by its EXIF orientation (as cv2.imread reads it)."""
    try:
        with Image.open(path) as img:
            ImageOps.exif_transpose(img, in_place=True)
            return img
    except FileNotFoundError as e:
        if os.path.islink(path):
            raise DataError(f"{path}: broken symbolic link (to {os.readlink(path)}, which does not exist)") from e
        raise DataError(f"{path}: file not found") from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


def _high_byte(img: Image.Image, path: str) -> np.ndarray:
    """A 16-bit grayscale image as uint8 (v >> 8, as cv2 reads it). 32-bit images are refused."""
    a = np.asarray(img)
    if img.mode == "I" and (a.min() < 0 or a.max() > 65535):
        raise DataError(f"{path}: 32-bit integer image (values {a.min()}..{a.max()}); save it as 8- or 16-bit")
    return (a.astype(np.uint32) >> 8).astype(np.uint8)


def _rgb(img: Image.Image, path: str) -> np.ndarray:
    """uint8 HWC RGB from any PIL mode, converting explicitly (see the module docstring)."""
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        return np.repeat(_high_byte(img, path)[..., None], 3, axis=-1)
    if img.mode == "F":
        raise DataError(f"{path}: 32-bit float image; save it as an 8- or 16-bit image")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA"))
        alpha = rgba[..., 3:].astype(np.float32) / 255.0
        if alpha.min() < 1.0:
            log.warning("%s: has transparent pixels; composited on white", path)
            return np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        return np.ascontiguousarray(rgba[..., :3])
    return np.asarray(img.convert("RGB"))


def _gray(img: Image.Image, path: str) -> np.ndarray:
    """uint8 HW grayscale of a mask; a 16-bit mask is binarised on its raw values (non-zero: 255)."""
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):
        return np.where(np.asarray(img) > 0, 255, 0).astype(np.uint8)
    return np.asarray(img.convert("L"))


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


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float map resized to (height, width) with PIL's bilinear filter (as the images are)."""
    return np.asarray(Image.fromarray(np.asarray(amap, np.float32), "F").resize((size[1], size[0]),
                                                                                 Image.BILINEAR))


def read_image(path: str, size: int | None = None) -> np.ndarray:
    """Reads an image as uint8 HWC RGB (grayscale images are replicated to 3 channels, like cv2;
    16-bit and transparent images as the module docstring says).

    Args:
      path: image file.
      size: if given, resize to (size, size) with `resize_image`.

    Raises:
      DataError: naming `path` if the file is missing or cannot be decoded.
    """
    image = _rgb(_open(path), path)
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
    mask = _gray(_open(path), path)
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
