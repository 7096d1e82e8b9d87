"""Instance masks -> COCO RLE, encoded from each mask's box crop.

COCO RLE (cocoapi ``maskApi.c`` ``rleEncode``) lists run lengths over the image in column-major order, starting with
a run of zeros. A mask that lives in a ``h x w`` crop at ``(x0, y0)`` of an ``H x W`` image has its runs inside the
crop's columns, so they are computed from the crop alone: the crop is flattened column-major with one zero
separator row per column (the pixels below the crop in that column and above it in the next are all zero), the
positions where the value changes are mapped back to full-image indices, and their differences are the counts.
faster-coco-eval's ``frPyObjects`` then compresses them to the string form. No ``H x W`` array is ever built, which
is what makes this much faster than encoding full-image masks (benchmarks/bench_maskrcnn.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from faster_coco_eval.core import mask as coco_mask

from densedet.structures.masks import BitmapCrop, InstanceMasks

__all__ = ["crop_rle_counts", "encode_crop_rle", "encode_instance_masks"]


def crop_rle_counts(crop: BitmapCrop, height: int, width: int) -> list[int]:
    """Uncompressed COCO RLE counts of a crop placed in a ``height x width`` image."""
    h, w = crop.bits.shape
    total = height * width
    if h == 0 or w == 0 or not crop.bits.any():
        return [total]
    if crop.x0 < 0 or crop.y0 < 0 or crop.x0 + w > width or crop.y0 + h > height:
        raise ValueError(f"crop at ({crop.x0}, {crop.y0}) of size {w}x{h} lies outside a {width}x{height} image")
    padded = np.zeros((w, h + 1), dtype=np.int8)  # column-major: one row per image column, plus a zero separator
    padded[:, :h] = crop.bits.T
    flat = padded.reshape(-1)
    change = np.flatnonzero(np.diff(flat, prepend=0))  # the value before the first pixel is 0
    col, row = np.divmod(change, h + 1)
    pos = (crop.x0 + col) * height + crop.y0 + row  # full-image column-major index of each change
    # A crop as tall as the image has no zero pixels between its columns: a run ending at the bottom of one column
    # and one starting at the top of the next meet at the same index; drop both changes to merge the runs.
    same = np.flatnonzero(np.diff(pos) == 0)
    if same.size:
        pos = np.delete(pos, np.concatenate([same, same + 1]))
    pos = pos[pos < total]  # a run reaching the image's last pixel ends at the end, not at a change
    bounds = np.concatenate([[0], pos, [total]])
    return np.diff(bounds).astype(np.int64).tolist()


def encode_crop_rle(crop: BitmapCrop, height: int, width: int) -> dict[str, Any]:
    """Compressed COCO RLE ``{"size": [h, w], "counts": str}`` of a crop placed in a ``height x width`` image."""
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": crop_rle_counts(crop, height, width)},
                                height, width)
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def encode_instance_masks(masks: InstanceMasks) -> list[dict[str, Any]]:
    """One compressed RLE per instance (polygons are rasterised over their box first)."""
    return [encode_crop_rle(masks.crop_of(i), masks.height, masks.width) for i in range(len(masks))]
