"""A small generated multi-class defect dataset: the embedded default where no MVTec-AD/VisA is at hand.

Five visually distinct classes, three textures and two objects:

============  ========  =====================================================================
class         kind      a normal image
============  ========  =====================================================================
stripes       texture   brown wood-like sinusoidal stripes; random phase, small angle/period jitter
grid          texture   dark grid lines on a beige tile; random offset, small period jitter
carpet        texture   smooth teal noise field (fresh random field per image)
disk          object    orange disk with an inner ring on a dark background; position/size jitter
hexnut        object    blue hexagonal nut with a central hole on a light background; any rotation
============  ========  =====================================================================

Every image gets a global brightness/colour jitter and Gaussian pixel noise. Defects (textures and
hexnut: scratch, hole, stain, crack; disk: scratch, hole, stain, missing) are drawn with hard edges and
high contrast, sized relative to the image (a hole is 5-8% of the side in radius, a scratch 25-45%
long and at least 2 pixels wide), so they stay clearly visible at 64x64 without covering the image.
On objects a defect is confined to the object; a missing part shows the background.

The mask of a defective image is, by construction and checked, exactly the set of pixels whose
stored uint8 value differs from the same image rendered without the defect (`render` returns both).
Everything is a pure function of (seed, class, split, index): adding classes or images does not
change the others. Rendering is vectorised numpy at the requested size (no resizing, so the masks
stay exact at every size).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from diad_jax.data.records import GOOD, DataError

SYNTHETIC_CLASSES = ("stripes", "grid", "carpet", "disk", "hexnut")
TEXTURE_DEFECTS = ("scratch", "hole", "stain", "crack")
_DEFECTS = {
    "stripes": TEXTURE_DEFECTS, "grid": TEXTURE_DEFECTS, "carpet": TEXTURE_DEFECTS,
    "disk": ("scratch", "hole", "stain", "missing"),
    # A bite out of the hexnut's outline differs from a normal nut only in shape: its pixels look like
    # any other edge of a rotated hexagon, which a small model cannot be expected to tell apart.
    "hexnut": ("scratch", "hole", "stain", "crack"),
}

# Minimum and maximum share of the image a defect mask may cover (resampled otherwise).
_MIN_DEFECT_FRACTION = 0.005
_MAX_DEFECT_FRACTION = 0.12

_PALETTE = {
    # scratch/hole/crack colours; stain colour and opacity. A missing part shows the background, and
    # so does a hole in an object without a hole colour (disk: its dark background; the hexnut's
    # light background would make a hole look like its normal central hole, so its holes are dark pits).
    "stripes": dict(scratch=(245, 240, 228), hole=(12, 10, 8), crack=(20, 14, 10), stain=(40, 58, 135), alpha=0.75),
    "grid": dict(scratch=(38, 36, 34), hole=(12, 12, 12), crack=(25, 22, 20), stain=(165, 70, 28), alpha=0.8),
    "carpet": dict(scratch=(240, 238, 216), hole=(8, 8, 8), crack=(12, 12, 12), stain=(125, 30, 45), alpha=0.8),
    "disk": dict(scratch=(45, 30, 20), stain=(60, 100, 40), alpha=0.8),
    "hexnut": dict(scratch=(28, 28, 34), hole=(22, 22, 26), crack=(14, 14, 18), stain=(180, 88, 30), alpha=0.85),
}


def defect_types(class_name: str) -> tuple[str, ...]:
    """The defect types drawn for `class_name`."""
    _check_class(class_name)
    return _DEFECTS[class_name]


def _check_class(class_name: str) -> None:
    if class_name not in SYNTHETIC_CLASSES:
        raise DataError(f"unknown synthetic class {class_name!r}; choose from {SYNTHETIC_CLASSES}")


@dataclasses.dataclass
class _Scene:
    image: np.ndarray                      # float32 [S, S, 3], noise included
    object_mask: np.ndarray | None = None  # bool [S, S] for objects
    background: np.ndarray | None = None   # float32 [S, S, 3] what lies under the object


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
    """One rendered example.

    Attributes:
      image: uint8 [S, S, 3], the stored image (with its defect, if any).
      clean: uint8 [S, S, 3], the same image rendered without the defect.
      mask: uint8 [S, S], 255 exactly where `image` differs from `clean`.
      defect_type: "good" or one of `defect_types(class_name)`.
    """

    image: np.ndarray
    clean: np.ndarray
    mask: np.ndarray
    defect_type: str


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)  # u (x), v (y)


def _colour(rgb, jitter: np.ndarray) -> np.ndarray:
    return np.asarray(rgb, np.float32) * jitter


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [-1, 1]-ish: bilinear interpolation of a (cells+1)^2 normal grid."""
    g = rng.normal(size=(cells + 1, cells + 1)).astype(np.float32)
    x = (np.arange(size, dtype=np.float32) + 0.5) / size * cells
    i = np.minimum(x.astype(int), cells - 1)
    f = x - i
    rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]                 # [size, cells+1]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _render_normal(class_name: str, rng: np.random.Generator, size: int) -> _Scene:
    """A defect-free image of `class_name` with its within-class variation."""
    u, v = _coords(size)
    jitter = (1 + rng.uniform(-0.06, 0.06)) * (1 + rng.uniform(-0.03, 0.03, 3)).astype(np.float32)
    noise_sigma = 4.0
    scene = _Scene(image=np.empty((size, size, 3), np.float32))
    if class_name == "stripes":
        theta = math.radians(30 + rng.normal(0, 3))
        period = 1 / (4.5 * (1 + rng.uniform(-0.07, 0.07)))
        t = (u * math.cos(theta) + v * math.sin(theta)) / period * 2 * math.pi + rng.uniform(0, 2 * math.pi)
        s = (0.5 + 0.5 * np.sin(t + 0.35 * np.sin(2 * t)))[..., None]
        scene.image = _colour((105, 68, 38), jitter) * (1 - s) + _colour((196, 148, 92), jitter) * s
    elif class_name == "grid":
        period = (1 / 5.5) * (1 + rng.uniform(-0.03, 0.03))
        width = max(0.035, 2.0 / size)
        ox, oy = rng.uniform(0, period, 2)
        du = np.abs(((u - ox) / period + 0.5) % 1 - 0.5) * period
        dv = np.abs(((v - oy) / period + 0.5) % 1 - 0.5) * period
        lines = ((du <= width / 2) | (dv <= width / 2))[..., None]
        shade = (1 + 0.04 * (u - 0.5) + 0.04 * (v - 0.5))[..., None]
        tile = _colour((206, 200, 182), jitter) * shade
        scene.image = np.where(lines, _colour((88, 88, 100), jitter), tile)
    elif class_name == "carpet":
        field = 0.7 * _smooth_field(rng, size, 6) + 0.3 * _smooth_field(rng, size, 14)
        s = np.clip(0.5 + 0.35 * field, 0, 1)[..., None]
        scene.image = _colour((38, 100, 92), jitter) * (1 - s) + _colour((96, 168, 150), jitter) * s
        noise_sigma = 6.0
    elif class_name == "disk":
        cx, cy = 0.5 + rng.uniform(-0.04, 0.04, 2)
        radius = 0.30 * (1 + rng.uniform(-0.05, 0.05))
        rho = np.sqrt((u - cx) ** 2 + (v - cy) ** 2) / radius
        inside = rho <= 1
        body = _colour((222, 170, 62), jitter) * (1.05 - 0.25 * rho ** 2)[..., None]
        ring = np.abs(rho - 0.55) <= max(0.06, 1.2 / (size * radius))
        body = np.where(ring[..., None], _colour((150, 100, 30), jitter), body)
        background = np.broadcast_to(_colour((34, 34, 40), jitter), (size, size, 3))
        scene.object_mask = inside
        scene.background = background + rng.normal(0, noise_sigma, (size, size, 3)).astype(np.float32)
        scene.image = np.where(inside[..., None], body, background)
    elif class_name == "hexnut":
        cx, cy = 0.5 + rng.uniform(-0.04, 0.04, 2)
        radius = 0.34 * (1 + rng.uniform(-0.04, 0.04))
        rot = rng.uniform(0, math.pi / 3)
        du, dv = u - cx, v - cy
        inside = np.ones((size, size), bool)
        for k in range(6):  # inside all six edge half-planes of a regular hexagon
            a = rot + math.pi / 6 + k * math.pi / 3
            inside &= du * math.cos(a) + dv * math.sin(a) <= radius * math.cos(math.pi / 6)
        inside &= du ** 2 + dv ** 2 > (0.35 * radius) ** 2
        shade = (0.9 + 0.35 * (du * math.cos(rot) + dv * math.sin(rot)) / radius)[..., None]
        body = _colour((92, 112, 152), jitter) * shade
        background = np.broadcast_to(_colour((226, 226, 232), jitter), (size, size, 3))
        scene.object_mask = inside
        scene.background = background + rng.normal(0, noise_sigma, (size, size, 3)).astype(np.float32)
        scene.image = np.where(inside[..., None], body, background)
    else:
        _check_class(class_name)
    scene.image = scene.image + rng.normal(0, noise_sigma, (size, size, 3)).astype(np.float32)
    if scene.object_mask is not None:  # the background layer carries the same noise as the image there
        scene.image = np.where(scene.object_mask[..., None], scene.image, scene.background)
    return scene


def _segment_distance(u, v, p0, p1) -> np.ndarray:
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0, 1)
    return np.sqrt((u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2)


def _polyline(u, v, points, width) -> np.ndarray:
    region = np.zeros(u.shape, bool)
    for p0, p1 in zip(points[:-1], points[1:]):
        region |= _segment_distance(u, v, p0, p1) <= width / 2
    return region


def _defect_centre(rng, scene: _Scene, size: int) -> tuple[float, float]:
    if scene.object_mask is None:
        return tuple(rng.uniform(0.2, 0.8, 2))
    ys, xs = np.nonzero(scene.object_mask)
    i = rng.integers(len(ys))
    return (xs[i] + 0.5) / size, (ys[i] + 0.5) / size


def _defect_region(class_name: str, defect: str, rng, scene: _Scene, size: int) -> np.ndarray:
    """The boolean region a defect of type `defect` occupies (before confinement to the object)."""
    u, v = _coords(size)
    px = 1.0 / size
    cx, cy = _defect_centre(rng, scene, size)
    if defect == "hole":
        r = rng.uniform(0.05, 0.08)
        return (u - cx) ** 2 + (v - cy) ** 2 <= r * r
    if defect == "stain":
        region = np.zeros(u.shape, bool)
        r0 = rng.uniform(0.08, 0.11)
        for _ in range(4):
            ox, oy = rng.normal(0, 0.45 * r0, 2)
            rx, ry = r0 * rng.uniform(0.55, 0.9, 2)
            region |= ((u - cx - ox) / rx) ** 2 + ((v - cy - oy) / ry) ** 2 <= 1
        return region
    if defect == "scratch":
        length = rng.uniform(0.25, 0.45)
        angle = rng.uniform(0, math.pi)
        bend = rng.normal(0, 0.04)
        dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
        mid = (cx - dy / length * 2 * bend, cy + dx / length * 2 * bend)
        pts = [(cx - dx, cy - dy), mid, (cx + dx, cy + dy)]
        return _polyline(u, v, pts, max(rng.uniform(0.022, 0.035), 2 * px))
    if defect == "crack":
        length = rng.uniform(0.3, 0.45)
        heading = rng.uniform(0, 2 * math.pi)
        pts = [(cx, cy)]
        for _ in range(6):
            heading += rng.normal(0, 0.7)
            x, y = pts[-1]
            pts.append((x + math.cos(heading) * length / 6, y + math.sin(heading) * length / 6))
        return _polyline(u, v, pts, max(rng.uniform(0.02, 0.03), 2 * px))
    if defect == "missing":
        # a bite out of the object's outline: a disk centred on an outline pixel
        m = scene.object_mask
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        ys, xs = np.nonzero(edge)
        i = rng.integers(len(ys))
        bx, by = (xs[i] + 0.5) / size, (ys[i] + 0.5) / size
        r = rng.uniform(0.1, 0.14)
        return (u - bx) ** 2 + (v - by) ** 2 <= r * r
    raise DataError(f"unknown defect {defect!r} for synthetic class {class_name!r}")


def _draw_defect(class_name: str, defect: str, rng, scene: _Scene, size: int):
    """Returns (defective float image, region) for one attempt at drawing `defect`."""
    region = _defect_region(class_name, defect, rng, scene, size)
    if scene.object_mask is not None:
        if defect != "missing":  # keep surface defects (almost) entirely on the object
            for _ in range(30):
                if (region & scene.object_mask).sum() >= 0.9 * region.sum():
                    break
                region = _defect_region(class_name, defect, rng, scene, size)
        region &= scene.object_mask
    pal = _PALETTE[class_name]
    fresh_noise = rng.normal(0, 4.0, (size, size, 3)).astype(np.float32)
    if defect == "stain":
        stain = np.asarray(pal["stain"], np.float32) + fresh_noise
        fill = pal["alpha"] * stain + (1 - pal["alpha"]) * scene.image
    elif defect == "missing" or (defect == "hole" and "hole" not in pal):
        fill = scene.background
    else:
        fill = np.asarray(pal[defect], np.float32) + fresh_noise
    return np.where(region[..., None], fill, scene.image), region


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def render(class_name: str, defect: str = GOOD, *, image_size: int = 256, seed: int = 0,
           split: str = "test", index: int = 0) -> SyntheticExample:
    """Renders one example; a pure function of its arguments.

    Args:
      class_name: one of `SYNTHETIC_CLASSES`.
      defect: "good", or one of `defect_types(class_name)`.
      image_size: side length in pixels (>= 32 recommended).
      seed, split, index: which example (the random stream is seeded with all three and the class).
    """
    _check_class(class_name)
    if defect != GOOD and defect not in defect_types(class_name):
        raise DataError(f"unknown defect {defect!r} for synthetic class {class_name!r}; "
                        f"choose from {defect_types(class_name)}")
    split_id = {"train": 0, "test": 1}.get(split)
    if split_id is None:
        raise DataError(f"split must be train or test, got {split!r}")
    rng = np.random.default_rng([seed, SYNTHETIC_CLASSES.index(class_name), split_id, index])
    scene = _render_normal(class_name, rng, image_size)
    clean = _to_uint8(scene.image)
    if defect == GOOD:
        return SyntheticExample(clean, clean, np.zeros((image_size, image_size), np.uint8), GOOD)
    lo, hi = _MIN_DEFECT_FRACTION * image_size ** 2, _MAX_DEFECT_FRACTION * image_size ** 2
    for _ in range(50):
        image_f, region = _draw_defect(class_name, defect, rng, scene, image_size)
        image = _to_uint8(image_f)
        changed = (image != clean).any(-1)
        if lo <= changed.sum() <= hi:
            break
    else:  # pragma: no cover - the size ranges above make this practically unreachable
        raise DataError(f"could not draw a {defect} on {class_name} at {image_size}px")
    assert not (changed & ~region).any(), "a defect changed pixels outside its region"
    return SyntheticExample(image, clean, np.where(changed, 255, 0).astype(np.uint8), defect)


def split_plan(class_name: str, split: str, count: int, test_good_fraction: float = 0.5) -> list[str]:
    """The defect type of each of `count` examples: all good for train; for test, the first
    round(test_good_fraction * count) are good and the rest cycle through the class's defect types,
    grouped by type (like MVTec-AD's folder order)."""
    if split == "train":
        return [GOOD] * count
    n_good = int(round(test_good_fraction * count))
    types = defect_types(class_name)
    bad = [types[i % len(types)] for i in range(count - n_good)]
    return [GOOD] * n_good + sorted(bad, key=types.index)


def generate(class_name: str, split: str, count: int, *, image_size: int = 256, seed: int = 0,
             test_good_fraction: float = 0.5) -> Iterator[dict]:
    """Yields the examples of one class and split, as stored by the builder.

    Each item: image uint8 [S, S, 3], mask uint8 [S, S] (0/255), label, class_name, defect_type,
    and a synthetic filename ``<class>/<split>/<defect>/<index:03d>.png`` (no such file exists).
    """
    for i, defect in enumerate(split_plan(class_name, split, count, test_good_fraction)):
        ex = render(class_name, defect, image_size=image_size, seed=seed, split=split, index=i)
        yield dict(image=ex.image, mask=ex.mask, label=int(defect != GOOD), class_name=class_name,
                   defect_type=defect, filename=f"{class_name}/{split}/{defect}/{i:03d}.png")
