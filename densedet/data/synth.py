"""A small synthetic COCO-format dataset of shapes, for tests, demos and quick sanity training.

Each image has a smooth random background (low-frequency colour field + linear gradient) with pixel noise, and
1-8 filled shapes of three classes (circle, square, triangle) whose sizes are log-uniform between 8 px and half
the image side, so every FPN level P3-P7 sees objects. Shapes get a colour far from the background under them;
later shapes are drawn over earlier ones, and an annotation whose shape is more than 70% hidden is dropped (the
shape stays in the image). Boxes are the full extent of the drawn shape; every annotation has a ``segmentation``
(polygons for squares and triangles, RLE for circles and partly hidden shapes, see ``_segmentation``). About 5% of
validation images have no objects. Everything is drawn with numpy + Pillow from one seed: same seed, same bytes.

Writing is guarded so that a user's data can never be overwritten: the set is written only into a folder that does
not exist, is empty, or holds exactly a previous synthetic set (every file listed, with its SHA-256, in the marker
file ``.densedet_synthetic.json`` that each run writes first and completes last; sets written before the marker
existed are recognised by their annotation files). Anything else is refused unless ``force=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from densedet.data.coco import DataError
from densedet.io import atomic_write_bytes, atomic_write_text
from densedet.structures.masks import BitmapCrop
from densedet.structures.rle import crop_rle_counts, encode_crop_rle

__all__ = ["SYNTH_CLASSES", "SYNTH_MARKER", "check_auto_create", "make_synthetic_coco", "synthetic_target_problem"]

SYNTH_CLASSES = ("circle", "square", "triangle")
_MIN_SIZE = 8
_MAX_COVERED = 0.7  # drop an annotation whose shape is hidden more than this
_EMPTY_VAL_FRACTION = 0.05
SYNTH_MARKER = ".densedet_synthetic.json"  # in the dataset root: the files this module wrote, with their hashes
_DESCRIPTION = "DenseDet synthetic shapes"
_SPLITS = ("train", "val")


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


def _layout(root: Path) -> dict[str, Path]:
    return {
        "root": root,
        "train_img_dir": root / "train",
        "val_img_dir": root / "val",
        "train_ann_file": root / "annotations" / "instances_train.json",
        "val_ann_file": root / "annotations" / "instances_val.json",
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_bytes(path: Path, data: bytes, written: dict[str, str], root: Path) -> None:
    """Write ``data`` to ``path`` through a temporary name (a file is either old or whole) and record its hash."""
    atomic_write_bytes(path, data)
    written[path.relative_to(root).as_posix()] = _sha256(data)


def _write_marker(root: Path, params: dict[str, Any], files: dict[str, str | None], complete: bool) -> None:
    body = {"densedet_synthetic": 1, "params": params, "complete": complete, "files": dict(sorted(files.items()))}
    atomic_write_text(root / SYNTH_MARKER, json.dumps(body, indent=0))


def _segmentation(cls: int, x0: int, y0: int, side: int, mask: np.ndarray, on_top: np.ndarray,
                  size: int) -> list[list[float]] | dict[str, Any]:
    """COCO segmentation of one drawn shape (pixel-corner coordinates).

    A fully visible square is its exact polygon; a fully visible triangle is the polygon through the corners of the
    pixels at its vertices (it covers the drawn pixels up to the rasterisation of the slanted edges); a circle is
    the compressed RLE of exactly its drawn pixels; a partly hidden shape is the uncompressed RLE of exactly its
    visible pixels (what COCO annotates).
    """
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
    rng: np.random.Generator, paths: dict[str, Path], num: int, size: int, num_empty: int, split: str,
    written: dict[str, str],
) -> None:
    root, img_dir, ann_file = paths["root"], paths[f"{split}_img_dir"], paths[f"{split}_ann_file"]
    empty = set(rng.choice(num, size=num_empty, replace=False).tolist()) if num_empty else set()
    images, annotations = [], []
    for i in range(num):
        num_objects = 0 if i in empty else int(rng.integers(1, 9))
        img, objects = _render(rng, size, num_objects)
        name = f"{i + 1:06d}.png"
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        _write_bytes(img_dir / name, buf.getvalue(), written, root)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "iscrowd": 0, **obj})
    data = {
        "info": {"description": f"{_DESCRIPTION} ({split})", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": n, "supercategory": "shape"} for c, n in enumerate(SYNTH_CLASSES)],
    }
    # The json appears last and whole: its presence means the split is complete.
    _write_bytes(ann_file, json.dumps(data).encode(), written, root)


def _planned_files(num_train: int, num_val: int) -> list[str]:
    files = [f"annotations/instances_{split}.json" for split in _SPLITS]
    for split, num in zip(_SPLITS, (num_train, num_val)):
        files += [f"{split}/{i + 1:06d}.png" for i in range(num)]
    return files


def _existing_files(root: Path) -> list[str]:
    """Every non-folder entry below ``root`` (symlinks included), as posix paths relative to ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


def _previous_set_files(root: Path, existing: list[str]) -> tuple[set[str] | None, str]:
    """The files of a previous synthetic set in ``root`` if ``existing`` are exactly (a subset of) them.

    Returns ``(files, "")`` when recognised, else ``(None, reason)``. With the marker: every existing file must be
    listed in it and, for a completed set, have the recorded hash (so a file edited or added by hand is noticed).
    Without a marker (sets written by DenseDet 0.1.0): both annotation files must describe a DenseDet synthetic
    set and every other file must be an image they list.
    """
    allowed: set[str] = set()
    marker = root / SYNTH_MARKER
    if marker.is_file():
        try:
            body = json.loads(marker.read_text())
            files = dict(body["files"])
            complete = bool(body["complete"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, f"its {SYNTH_MARKER} is unreadable"
        allowed = set(files) | {SYNTH_MARKER, SYNTH_MARKER + ".tmp"} | {f + ".tmp" for f in files}
        for rel in existing:
            if rel not in allowed:
                return None, f"holds {rel}, which is not part of the synthetic set"
            expected = files.get(rel)
            if complete and expected is not None and _sha256((root / rel).read_bytes()) != expected:
                return None, f"{rel} was changed after the synthetic set was written"
        return allowed, ""
    for split in _SPLITS:
        ann = root / "annotations" / f"instances_{split}.json"
        try:
            data = json.loads(ann.read_text())
            described = str(data["info"]["description"]).startswith(_DESCRIPTION)
            names = {f"{split}/{img['file_name']}" for img in data["images"]}
        except (OSError, ValueError, KeyError, TypeError):
            described = False
        if not described:
            shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
            return None, (f"holds files ({shown}) and no DenseDet synthetic annotations/instances_{split}.json, "
                          "so they are not a synthetic set")
        allowed |= names | {ann.relative_to(root).as_posix()}
    extra = [rel for rel in existing if rel not in allowed]
    if extra:
        return None, f"holds {extra[0]}, which is not part of the synthetic set"
    return allowed, ""


def synthetic_target_problem(out_dir: str | Path) -> str | None:
    """Why the synthetic set may not be written into ``out_dir``, or ``None`` when it may.

    It may when ``out_dir`` does not exist, is an empty folder, or holds exactly a previous synthetic set (see the
    module docstring); never into a folder with any other file.
    """
    root = Path(out_dir)
    if not root.exists():
        return None
    if not root.is_dir():
        return "is not a folder"
    existing = _existing_files(root)
    if not existing:
        return None
    files, reason = _previous_set_files(root, existing)
    return None if files is not None else reason


def check_auto_create(root: str | Path, train_ann_file: str | Path) -> None:
    """Raise :class:`~densedet.data.DataError` naming ``train_ann_file`` unless ``data.auto_create: synthetic`` may
    create the synthetic set in ``root`` (the missing file is the set's own training json and ``root`` is missing,
    empty or a previous synthetic set). Reads only: safe to call on every process before one of them writes."""
    root = Path(root)
    train_ann = Path(train_ann_file)
    missing = f"training annotation file not found: {train_ann} (data.train.ann_file under data.root {root})"
    if os.path.abspath(train_ann) != os.path.abspath(_layout(root)["train_ann_file"]):
        raise DataError(f"{missing}; data.auto_create: synthetic only creates the built-in synthetic set, whose "
                        "training file is annotations/instances_train.json, so it does not apply here")
    problem = synthetic_target_problem(root)
    if problem is not None:
        raise DataError(f"{missing}. data.auto_create: synthetic writes the synthetic set only into a missing or "
                        f"empty folder, and {root} {problem}: nothing was written. Point data.root / "
                        "data.train.ann_file at your data, or set data.auto_create=null")


def make_synthetic_coco(
    out_dir: str | Path, num_train: int = 200, num_val: int = 50, size: int = 320, seed: int = 0, force: bool = False
) -> dict[str, Path]:
    """Write a synthetic COCO-format dataset and return its paths.

    Layout: ``out_dir/train/*.png``, ``out_dir/val/*.png``, ``out_dir/annotations/instances_{train,val}.json``
    (categories 1..3 = circle, square, triangle; ``bbox`` = ``[x, y, w, h]`` of the whole shape; ``area`` =
    visible pixels; ``segmentation`` = polygon or RLE of the shape, see ``_segmentation``) and the marker
    ``out_dir/.densedet_synthetic.json``. Deterministic in ``seed``.

    ``out_dir`` must not exist, be empty, or hold exactly a previous synthetic set (whose files are then replaced);
    anything else raises :class:`~densedet.data.DataError` without writing, unless ``force`` (then colliding files
    are overwritten and other files are left alone).

    Returns:
        ``{"root", "train_img_dir", "val_img_dir", "train_ann_file", "val_ann_file"}`` as :class:`~pathlib.Path`.
    """
    if size < 2 * _MIN_SIZE:
        raise ValueError(f"make_synthetic_coco: size must be at least {2 * _MIN_SIZE} px, got {size}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"make_synthetic_coco: image counts must be >= 0, got {num_train}, {num_val}")
    root = Path(out_dir)
    paths = _layout(root)
    if not force:
        problem = synthetic_target_problem(root)
        if problem is not None:
            raise DataError(f"refusing to write the synthetic dataset into {root}: it {problem}. Use a new or "
                            "empty folder, or force=True (densedet data synth --force) to write into it anyway")
        if root.is_dir() and (old := _previous_set_files(root, _existing_files(root))[0]):
            planned = set(_planned_files(num_train, num_val))
            for rel in sorted(old - planned - {SYNTH_MARKER}):  # the previous set's files the new one lacks
                (root / rel).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    params = {"num_train": num_train, "num_val": num_val, "size": size, "seed": seed}
    _write_marker(root, params, dict.fromkeys(_planned_files(num_train, num_val)), complete=False)
    train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
    num_empty = int(round(num_val * _EMPTY_VAL_FRACTION))
    if num_val >= 4:
        num_empty = max(num_empty, 1)
    written: dict[str, str] = {}
    for split, seq, num, empty in (("train", train_seq, num_train, 0), ("val", val_seq, num_val, num_empty)):
        _write_split(np.random.default_rng(seq), paths, num, size, empty, split, written)
    _write_marker(root, params, written, complete=True)
    return paths
