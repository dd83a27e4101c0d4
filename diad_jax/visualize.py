"""Pictures a person can read: heat maps over the input, mask contours, a caption. No matplotlib.

    evaluation_panel(image, recon, amap, mask, title)      input | reconstruction | map over input | ground truth
                                                           (no reconstruction: input | map | ground truth)
    prediction_panel(image, amap, mask, caption)           input | map over input | predicted mask's contour

Panels are upscaled (nearest) so that each tile is at least `MIN_TILE` pixels wide, and carry a caption
line above the tiles. The map is min-max normalised per image, as the reference's heat maps.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_TILE = 256
CAPTION_HEIGHT = 18


def jet(values: np.ndarray) -> np.ndarray:
    """A jet colour map for values in [0, 1] -> uint8 RGB."""
    v = np.clip(values, 0, 1)[..., None]
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([r, g, b], -1) * 255).astype(np.uint8)


def heat_overlay(image: np.ndarray, amap: np.ndarray) -> np.ndarray:
    """The min-max normalised map in jet colours, half over the image (uint8 HWC)."""
    lo, hi = float(amap.min()), float(amap.max())
    heat = jet((amap - lo) / (hi - lo + 1e-12))
    return (0.5 * heat + 0.5 * image).astype(np.uint8)


def contour(image: np.ndarray, mask: np.ndarray, colour=(255, 0, 0)) -> np.ndarray:
    """The image with the boundary pixels of `mask` (bool HW) painted in `colour`."""
    m = np.asarray(mask, bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    out = image.copy()
    out[m & ~inner] = colour
    return out


def _upscale(tile: np.ndarray, factor: int) -> np.ndarray:
    return tile if factor == 1 else np.repeat(np.repeat(tile, factor, 0), factor, 1)


def _panel(tiles: list[np.ndarray], caption: str) -> np.ndarray:
    factor = max(1, -(-MIN_TILE // tiles[0].shape[1]))
    strip = np.concatenate([_upscale(t, factor) for t in tiles], axis=1)
    canvas = Image.new("RGB", (strip.shape[1], strip.shape[0] + CAPTION_HEIGHT), "white")
    canvas.paste(Image.fromarray(strip), (0, CAPTION_HEIGHT))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill="black", font=ImageFont.load_default())
    return np.asarray(canvas)


def evaluation_panel(image, recon, amap, mask, title: str = "") -> np.ndarray:
    """input | reconstruction | map over input | ground truth, captioned with `title` (no
    reconstruction tile when `recon` is None: the inversion method makes none)."""
    gt = np.repeat((np.asarray(mask) > 0).astype(np.uint8)[..., None] * 255, 3, -1)
    return _panel([image, *([] if recon is None else [recon]), heat_overlay(image, amap), gt], title)


def prediction_panel(image, amap, mask, caption: str) -> np.ndarray:
    """input | map over input | the input with the predicted mask's contour (or the plain input
    without a mask), captioned (e.g. with score, threshold and verdict)."""
    third = contour(image, mask) if mask is not None else image
    return _panel([image, heat_overlay(image, amap), third], caption)
