"""What ``densedet predict`` does: run a :class:`~densedet.inference.predictor.Predictor` over images and write one
drawn PNG per image, an overview ``grid.png`` and ``predictions.json``.

The images are a file, a folder, or exactly the images of a COCO annotation file (``--ann FILE`` with their
folder, or ``--split val`` for the config's split). Annotation files are read by
:class:`~densedet.data.CocoDataset`, so their image paths, sizes and EXIF orientation get the dataset's checks,
and the ground-truth boxes are drawn dashed beside the detections.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from densedet.data import CocoDataset
from densedet.errors import DataError
from densedet.inference.predictor import Predictor, list_images, read_image
from densedet.inference.visualize import draw_detections, save_detection_grid
from densedet.structures.rle import encode_instance_masks

__all__ = ["GRID_TILES", "GRID_TILE_SIDE", "ImageItem", "coco_images", "detection_records", "folder_images",
           "predict_and_draw", "split_files"]

GRID_TILES = 12  # grid.png shows the first this many drawn images (README: "grid.png shows 12 of them")
GRID_TILE_SIDE = 480  # grid tiles are drawn at this longer side: small images are enlarged, large ones reduced
_BATCH = 4


@dataclass
class ImageItem:
    """One image to draw: ``name`` of its output PNG (without suffix), ``source`` for predictions.json, a loader
    returning the upright ``(H, W, 3)`` uint8 RGB array, and ground-truth boxes ``(N, 4)`` xyxy (or ``None``)."""

    name: str
    source: str
    load: Any
    gt_boxes: np.ndarray | None = None
    image_id: int | None = None


def folder_images(path: str | Path, limit: int = 0) -> list[ImageItem]:
    """An image file or every image of a folder (sorted), at most ``limit`` of them (0 = all)."""
    files = list_images(path)[: limit or None]
    return [ImageItem(p.stem, str(p), lambda p=p: read_image(p)) for p in files]


def split_files(cfg: Any, split: str) -> tuple[Path, Path]:
    """``(ann_file, img_dir)`` of the config's ``data.<split>`` under ``data.root`` (``test`` falls back to
    ``val`` when the config has no test split, as ``densedet test`` does)."""
    spec = getattr(cfg.data, split, None) or cfg.data.val
    if not spec.ann_file:
        raise FileNotFoundError(f"the config's data.{split}.ann_file is empty: no annotation file to draw")
    root = Path(cfg.data.root)
    return root / spec.ann_file, root / spec.img_dir


def coco_images(ann_file: str | Path, img_dir: str | Path, limit: int = 0) -> list[ImageItem]:
    """Exactly the images listed in a COCO annotation file, in its order (at most ``limit``, 0 = all), loaded and
    checked by :class:`~densedet.data.CocoDataset` (a missing or wrongly sized image is a ``DataError`` naming it);
    ``gt_boxes`` are its non-crowd boxes in original pixels."""
    dataset = CocoDataset(ann_file, img_dir, pipeline=None, test_mode=True)
    items = []
    for i in range(len(dataset) if not limit else min(limit, len(dataset))):
        info = dataset.img_infos[i]
        name = Path(info["file_name"]).with_suffix("").as_posix().replace("/", "__")
        items.append(ImageItem(name, str(dataset.img_dir / info["file_name"]), lambda i=i: dataset.load_image(i),
                               dataset.get_ann_info(i)["boxes"], int(info["id"])))
    return items


def detection_records(det: dict[str, Any], classes: list[str], score_thr: float) -> list[dict[str, Any]]:
    """One image's detections above ``score_thr`` as JSON-ready dicts: ``box_xyxy`` (image pixels, 2 decimals),
    ``score``, ``label``, ``class`` and, for a mask model, ``segmentation`` (compressed COCO RLE)."""
    keep = det["scores"] > score_thr
    records = [
        {"box_xyxy": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(c),
         "class": classes[int(c)]}
        for b, s, c in zip(det["boxes"][keep], det["scores"][keep], det["labels"][keep])]
    if "masks" in det:  # Mask R-CNN: each kept detection's mask as compressed COCO RLE
        for rec, rle in zip(records, encode_instance_masks(det["masks"].subset(keep.numpy()))):
            rec["segmentation"] = rle
    return records


def _chunks(items: list[ImageItem], n: int) -> Iterator[list[ImageItem]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _load(chunk: list[ImageItem], skipped: list[str] | None) -> tuple[list[ImageItem], list[np.ndarray]]:
    """Decode ``chunk``; with a ``skipped`` list an undecodable image is skipped (a warning line, its source
    appended), without one its ``DataError`` propagates."""
    kept, arrays = [], []
    for item in chunk:
        try:
            arrays.append(item.load())
        except DataError as e:
            if skipped is None:
                raise
            skipped.append(item.source)
            print(f"warning: skipping {item.source}: {e}", file=sys.stderr)
            continue
        kept.append(item)
    return kept, arrays


def predict_and_draw(predictor: Predictor, items: list[ImageItem], out: str | Path, score_thr: float = 0.3,
                     grid_tiles: int = GRID_TILES, tile_side: int = GRID_TILE_SIDE,
                     skip_undecodable: bool = False) -> dict[str, Any]:
    """Predict ``items`` and write ``out/NAME.png`` (at the image's own size), ``out/grid.png`` (the first
    ``min(len(items), grid_tiles)`` images, each drawn at ``tile_side`` on its longer side, 4 per row; none when
    ``grid_tiles`` is 0) and ``out/predictions.json`` (per image: ``file``, ``image_id`` when from an annotation
    file, and the detections above ``score_thr`` with ``box_xyxy`` in image pixels and, for a mask model,
    ``segmentation`` as compressed COCO RLE).

    With ``skip_undecodable`` (a folder of images) a file that cannot be decoded is skipped with a warning line on
    stderr and listed in ``skipped``; otherwise its :class:`~densedet.errors.DataError` propagates.

    Returns:
        ``{"images": n drawn, "grid_tiles": tiles in grid.png, "skipped": [sources not decoded], "out": out}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    tiles = []
    skipped: list[str] = []
    for chunk in _chunks(items, _BATCH):
        chunk, arrays = _load(chunk, skipped if skip_undecodable else None)
        if not chunk:
            continue
        for item, arr, det in zip(chunk, arrays, predictor(arrays)):
            args = (det["boxes"], det["scores"], det["labels"], predictor.classes)
            kw = {"score_thr": score_thr, "gt_boxes": item.gt_boxes, "masks": det.get("masks")}
            draw_detections(arr, *args, **kw).save(out / f"{item.name}.png")
            if len(tiles) < grid_tiles:
                tiles.append(draw_detections(arr, *args, **kw, display_side=tile_side))
            record: dict[str, Any] = {"file": item.source}
            if item.image_id is not None:
                record["image_id"] = item.image_id
            record["detections"] = detection_records(det, predictor.classes, score_thr)
            records.append(record)
    (out / "predictions.json").write_text(json.dumps(records, indent=1))
    if tiles:
        save_detection_grid(tiles, out / "grid.png")
    return {"images": len(records), "grid_tiles": len(tiles), "skipped": skipped, "out": out}
