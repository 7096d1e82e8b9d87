"""A small synthetic COCO-format dataset of shapes, for tests, demos and quick sanity training.

Each image has a smooth random background (low-frequency colour field + linear gradient) with pixel noise, and
1-8 filled shapes of three classes (circle, square, triangle) whose sizes are log-uniform between 8 px and half
the image side, so every FPN level P3-P7 sees objects. Shapes get a colour far from the background under them;
later shapes are drawn over earlier ones, and an annotation whose shape is more than 70% hidden is dropped (the
shape stays in the image). Boxes are the full extent of the drawn shape; every annotation has a ``segmentation``
(polygons for squares and triangles, RLE for circles and partly hidden shapes, see ``_segmentation``). About 5% of
validation images have no objects. Everything is drawn with numpy + Pillow from one seed: same seed, same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SYNTH_CLASSES", "make_synthetic_coco"]

SYNTH_CLASSES = ("circle", "square", "triangle")
_MIN_SIZE = 8
_MAX_COVERED = 0.7  # drop an annotation whose shape is hidden more than this
_EMPTY_VAL_FRACTION = 0.05


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``(size, size, 3)`` float32 smooth colour field in roughly [20, 235]."""
    base = rng.uniform(50, 205, size=3)
    grid = np.clip(base + rng.uniform(-45, 45, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    gx, gy = rng.uniform(-25, 25, size=(2, 3)).astype(np.float32)
    field = field + ramp[None, :, None] * gx + ramp[:, None, None] * gy
    return np.clip(field, 20, 235)


def _shape_mask(cls: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean ``(side, side)`` mask of a circle (0), square (1) or upward/downward triangle (2)."""
    im = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(im)
    s = side - 1
    if cls == 0:
        draw.ellipse([0, 0, s, s], fill=255)
    elif cls == 1:
        draw.rectangle([0, 0, s, s], fill=255)
    elif rng.random() < 0.5:
        draw.polygon([(0, s), (s, s), (s / 2, 0)], fill=255)
    else:
        draw.polygon([(0, 0), (s, 0), (s / 2, s)], fill=255)
    return np.asarray(im) > 127


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A fill colour at least 110 (RGB L2) away from ``under`` (the mean background colour below the shape)."""
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - under) >= 110:
            return colour
    return np.where(under > 127, 15.0, 240.0)  # opposite corner of the colour cube


def _render(
    rng: np.random.Generator, size: int, num_objects: int, noise: bool = True
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image (uint8 ``(size, size, 3)``) and its objects (``category_id``, ``bbox`` xywh, ``area``)."""
    img = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)  # index of the shape visible at each pixel
    shapes = []
    max_side = max(_MIN_SIZE + 1, size // 2)
    for k in range(num_objects):
        cls = int(rng.integers(len(SYNTH_CLASSES)))
        side = int(round(np.exp(rng.uniform(np.log(_MIN_SIZE), np.log(max_side)))))
        side = min(max(side, _MIN_SIZE), size)
        if shapes and rng.random() < 0.3:  # place next to an earlier shape, for overlaps and occlusion
            px, py, pside = shapes[int(rng.integers(len(shapes)))][:3]
            cx = px + pside / 2 + rng.uniform(-0.6, 0.6) * (pside + side)
            cy = py + pside / 2 + rng.uniform(-0.6, 0.6) * (pside + side)
            x0 = int(np.clip(round(cx - side / 2), 0, size - side))
            y0 = int(np.clip(round(cy - side / 2), 0, size - side))
        else:
            x0 = int(rng.integers(0, size - side + 1))
            y0 = int(rng.integers(0, size - side + 1))
        mask = _shape_mask(cls, side, rng)
        region = img[y0 : y0 + side, x0 : x0 + side]
        colour = _contrasting_colour(rng, region[mask].mean(axis=0))
        region[mask] = colour
        owner[y0 : y0 + side, x0 : x0 + side][mask] = k
        shapes.append((x0, y0, side, cls, mask))
    if noise:
        noise_std = rng.uniform(4, 12)
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise_std)
    out = np.clip(img + 0.5, 0, 255).astype(np.uint8)

    objects = []
    for k, (x0, y0, side, cls, mask) in enumerate(shapes):
        visible = int((owner[y0 : y0 + side, x0 : x0 + side][mask] == k).sum())
        total = int(mask.sum())
        if visible < (1 - _MAX_COVERED) * total:
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        bx, by = x0 + int(cols[0]), y0 + int(rows[0])
        bw, bh = int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)
        segm = _segmentation(cls, x0, y0, side, mask, owner[y0 : y0 + side, x0 : x0 + side] == k, size)
        objects.append({"category_id": cls + 1, "bbox": [float(bx), float(by), float(bw), float(bh)], "area": visible,
                        "segmentation": segm})
    return out, objects


def _segmentation(cls: int, x0: int, y0: int, side: int, mask: np.ndarray, on_top: np.ndarray,
                  size: int) -> list[list[float]] | dict[str, Any]:
    """COCO segmentation of one drawn shape (pixel-corner coordinates).

    A fully visible square is its exact polygon; a fully visible triangle is the polygon through the corners of the
    pixels at its vertices (it covers the drawn pixels up to the rasterisation of the slanted edges); a circle is
    the compressed RLE of exactly its drawn pixels; a partly hidden shape is the uncompressed RLE of exactly its
    visible pixels (what COCO annotates).
    """
    from densedet.data.masks import BitmapCrop
    from densedet.evaluation.segm import crop_rle_counts, encode_crop_rle

    visible = mask & on_top
    if visible.sum() < mask.sum():
        crop = BitmapCrop(x0, y0, visible.astype(np.uint8))
        return {"size": [size, size], "counts": crop_rle_counts(crop, size, size)}
    x1, y1 = float(x0 + side), float(y0 + side)
    if cls == 1:
        return [[float(x0), float(y0), x1, float(y0), x1, y1, float(x0), y1]]
    if cls == 2:
        xm = x0 + side / 2
        if mask[-1, 0]:  # apex up (see _shape_mask)
            return [[float(x0), y1, x1, y1, xm, float(y0)]]
        return [[float(x0), float(y0), x1, float(y0), xm, y1]]
    return encode_crop_rle(BitmapCrop(x0, y0, mask.astype(np.uint8)), size, size)


def _write_split(
    rng: np.random.Generator, img_dir: Path, ann_file: Path, num: int, size: int, num_empty: int, split: str
) -> None:
    img_dir.mkdir(parents=True, exist_ok=True)
    empty = set(rng.choice(num, size=num_empty, replace=False).tolist()) if num_empty else set()
    images, annotations = [], []
    for i in range(num):
        num_objects = 0 if i in empty else int(rng.integers(1, 9))
        img, objects = _render(rng, size, num_objects)
        name = f"{i + 1:06d}.png"
        Image.fromarray(img).save(img_dir / name, compress_level=1)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **obj})
    data = {
        "info": {"description": f"DenseDet synthetic shapes ({split})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": n, "supercategory": "shape"} for c, n in enumerate(SYNTH_CLASSES)],
    }
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ann_file.with_name(ann_file.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, ann_file)  # the json appears last and whole: its presence means the split is complete


def make_synthetic_coco(
    out_dir: str | Path, num_train: int = 200, num_val: int = 50, size: int = 320, seed: int = 0
) -> dict[str, Path]:
    """Write a synthetic COCO-format dataset and return its paths.

    Layout: ``out_dir/train/*.png``, ``out_dir/val/*.png``, ``out_dir/annotations/instances_{train,val}.json``
    (categories 1..3 = circle, square, triangle; ``bbox`` = ``[x, y, w, h]`` of the whole shape; ``area`` =
    visible pixels; ``segmentation`` = polygon or RLE of the shape, see ``_segmentation``). Deterministic in
    ``seed``.

    Returns:
        ``{"root", "train_img_dir", "val_img_dir", "train_ann_file", "val_ann_file"}`` as :class:`~pathlib.Path`.
    """
    if size < 2 * _MIN_SIZE:
        raise ValueError(f"make_synthetic_coco: size must be at least {2 * _MIN_SIZE} px, got {size}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"make_synthetic_coco: image counts must be >= 0, got {num_train}, {num_val}")
    root = Path(out_dir)
    paths = {
        "root": root,
        "train_img_dir": root / "train",
        "val_img_dir": root / "val",
        "train_ann_file": root / "annotations" / "instances_train.json",
        "val_ann_file": root / "annotations" / "instances_val.json",
    }
    train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
    num_empty = int(round(num_val * _EMPTY_VAL_FRACTION))
    if num_val >= 4:
        num_empty = max(num_empty, 1)
    for split, seq, num, empty in (("train", train_seq, num_train, 0), ("val", val_seq, num_val, num_empty)):
        rng = np.random.default_rng(seq)
        _write_split(rng, paths[f"{split}_img_dir"], paths[f"{split}_ann_file"], num, size, empty, split)
    return paths
