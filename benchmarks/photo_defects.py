#!/usr/bin/env python
"""A small anomaly-detection dataset of REAL photographs, built on this machine without downloads:
the texture photographs scikit-image ships (brick, grass, gravel, an IHC micrograph and a retina
fundus), cut into 64 px tiles, with three kinds of defects painted onto half of the test tiles
and their exact pixel masks, in the MVTec-AD layout.

    python benchmarks/photo_defects.py --out /tmp/photos       # -> /tmp/photos/<class>/{train,test,ground_truth}
    python scripts/demo.py --dataset mvtec_ad --manual-dir /tmp/photos --data-dir /tmp/photo_cache \\
        --workdir runs/photos                                   # the demo recipe on it

Per class: 60 training tiles, 20 good and 20 defective test tiles. The training tiles come from the
top 60% of the photograph, the test tiles from the bottom 40% (no tile is shared). Each tile is a
crop of `CROP` px resized to 64 px (PIL bilinear); then a defect is painted at 64 px, so its mask
is exact:
  patch    a rectangle (8-20 px a side) pasted from a tile of another class
  blur     an ellipse (10-24 px) replaced by a Gaussian blur (radius 2.5) of the tile
  scratch  a straight 1-2 px line (15-35 px long), light or dark
The tiles and defects are drawn from one seed (--seed), so the dataset is the same on every run.
Where the painted change is invisible (a blur over a flat area) the mask still marks it: the
ground truth is where the defect was painted.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64          # tile side (the demo model's input size)
CROP = 128         # source crop side, resized to SIZE
TRAIN, TEST_GOOD, TEST_BAD = 60, 20, 20
DEFECTS = ("patch", "blur", "scratch")
TRAIN_ROWS = 0.6   # training tiles from the top 60% of a photograph, test tiles from the rest


def photographs() -> dict[str, Image.Image]:
    """The source photographs (RGB), each a texture over its whole area."""
    from skimage import data  # bundled files: nothing is downloaded

    def rgb(a):
        return Image.fromarray(np.asarray(a)).convert("RGB")

    retina = np.asarray(data.retina())[255:1155, 255:1155]  # inside the fundus' circle
    return {"brick": rgb(data.brick()), "grass": rgb(data.grass()), "gravel": rgb(data.gravel()),
            "ihc": rgb(data.immunohistochemistry()), "retina": rgb(retina)}


def tile(photo: Image.Image, rng: np.random.Generator, train: bool) -> Image.Image:
    w, h = photo.size
    split = int(h * TRAIN_ROWS)
    top = rng.integers(0, split - CROP) if train else rng.integers(split, h - CROP)
    left = rng.integers(0, w - CROP)
    return photo.crop((left, top, left + CROP, top + CROP)).resize((SIZE, SIZE), Image.BILINEAR)


def paint(image: Image.Image, defect: str, other: Image.Image, rng: np.random.Generator):
    """`image` with `defect` painted on, and its mask (uint8, 255 inside)."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    if defect == "patch":
        w, h = rng.integers(8, 21, 2)
        x, y = rng.integers(0, SIZE - w), rng.integers(0, SIZE - h)
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=255)
        out = Image.composite(other, image, mask)
    elif defect == "blur":
        w, h = rng.integers(10, 25, 2)
        x, y = rng.integers(0, SIZE - w), rng.integers(0, SIZE - h)
        draw.ellipse((x, y, x + w - 1, y + h - 1), fill=255)
        out = Image.composite(image.filter(ImageFilter.GaussianBlur(2.5)), image, mask)
    else:
        length, angle = rng.uniform(15, 35), rng.uniform(0, np.pi)
        cx, cy = rng.uniform(12, SIZE - 12, 2)
        dx, dy = 0.5 * length * np.cos(angle), 0.5 * length * np.sin(angle)
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=int(rng.integers(1, 3)))
        shade = int(rng.choice([rng.integers(0, 40), rng.integers(215, 256)]))
        out = Image.composite(Image.new("RGB", (SIZE, SIZE), (shade,) * 3), image, mask)
    return out, mask


def build(out: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    photos = photographs()
    names = sorted(photos)
    for c, name in enumerate(names):
        root = out / name
        for i in range(TRAIN):
            _save(tile(photos[name], rng, train=True), root / "train" / "good" / f"{i:03d}.png")
        for i in range(TEST_GOOD):
            _save(tile(photos[name], rng, train=False), root / "test" / "good" / f"{i:03d}.png")
        for i in range(TEST_BAD):
            defect = DEFECTS[i % len(DEFECTS)]
            other = tile(photos[names[(c + 1 + int(rng.integers(0, len(names) - 1))) % len(names)]], rng, train=False)
            image, mask = paint(tile(photos[name], rng, train=False), defect, other, rng)
            _save(image, root / "test" / defect / f"{i:03d}.png")
            _save(mask, root / "ground_truth" / defect / f"{i:03d}_mask.png")
    return out


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="the dataset's root folder (MVTec-AD layout)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    build(args.out, args.seed)
    print(f"{args.out}: {len(photographs())} classes x ({TRAIN} train, {TEST_GOOD} good + {TEST_BAD} defective test)")


if __name__ == "__main__":
    main()
