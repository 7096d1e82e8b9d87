"""Instance masks of the annotation store (:mod:`densedet.data.annotation_store`, ``with_mask=True``): every COCO
``segmentation`` validated at load time and packed into a few flat arrays (:class:`PackedMasks`), decoded per item
into an :class:`~densedet.structures.masks.InstanceMasks` when its image is read.

Checks, before anything is rasterised (so no annotation can make a later step allocate more than its image):
polygons must be lists of finite numbers of even length >= 6, with every vertex within one image size of the image
(:func:`~densedet.structures.masks.polygon_limits`); an RLE's ``size`` must be two integers equal to its image's and
its runs (uncompressed, or decoded from the compressed string by
:func:`~densedet.structures.rle_codec.valid_rle_strings`) non-negative and adding up to ``h * w``. An annotation
that fails is skipped with its box (Mask R-CNN needs a mask for every box, and the evaluator then never sees it
either), counted and reported in one :class:`~densedet.errors.DataWarning` per kind naming the annotation ids.

Segmentation against box (:func:`mask_box_problems`): a mask empty inside its image, or whose extent box has an IoU
below ``mask_bbox_iou_thr`` with the annotation's box, is a counted warning; ``mask_bbox_check`` says what happens
to those annotations: ``'warn'`` keeps them, ``'skip'`` drops them, ``'use_mask'`` takes the box from the mask
(an empty mask has none: it is dropped).

Crowd annotations are checked the same way (COCO evaluation reads their masks), and stay ignore boxes for training,
as in MMDetection 2.x (``gt_bboxes_ignore``).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
from faster_coco_eval.core import mask as coco_mask

from densedet.structures.masks import (
    BitmapCrop,
    MaskFormatError,
    PolygonMask,
    check_segmentation,
    decode_segmentation,
    polygon_limits,
)
from densedet.structures.rle_codec import valid_rle_strings

__all__ = ["DEFAULT_MASK_BBOX_CHECK", "DEFAULT_MASK_BBOX_IOU_THR", "MASK_BBOX_CHECKS", "PackedMasks", "ids_text",
           "mask_box_problems", "pack_segmentations"]

MASK_BBOX_CHECKS = ("warn", "skip", "use_mask")
DEFAULT_MASK_BBOX_CHECK = "warn"
# COCO boxes are their masks' extents (IoU 1); the amodal box of a partly hidden object (the synthetic set, KINS-style
# data) reaches down to about 0.2 with its visible mask; a mask belonging elsewhere is near 0.
DEFAULT_MASK_BBOX_IOU_THR = 0.1

# What PackedMasks.kinds holds per annotation.
POLYGON, RLE, RLE_UNCOMPRESSED = 1, 2, 3  # RLE_UNCOMPRESSED: given as a list of counts, stored compressed

# Why a segmentation was refused (codes of pack_segmentations' ``problem``), the kinds of check_segmentation.
PROBLEMS = {1: "no segmentation", 2: "empty polygon", 3: "bad polygon", 4: "RLE of the wrong size", 5: "bad RLE",
            6: "unknown format"}
_NONE, _EMPTY, _BAD_POLY, _WRONG_SIZE, _BAD_RLE, _UNKNOWN = 1, 2, 3, 4, 5, 6


def ids_text(ids: Any, limit: int = 5) -> str:
    """The first ``limit`` annotation ids, for a warning."""
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


@dataclass(eq=False)
class PackedMasks:
    """The segmentations of ``M`` annotations in flat arrays (no Python object per annotation).

    Attributes:
        kinds: ``(M,)`` uint8: 1 polygons, 2 compressed RLE, 3 RLE given uncompressed (stored compressed).
        part_range: ``(M, 2)`` int64, annotation ``m``'s polygons are parts ``part_range[m, 0] .. part_range[m, 1]-1``
            (empty for an RLE).
        part_offsets: ``(P + 1,)`` int64, part ``p``'s coordinates are ``coords[part_offsets[p]:part_offsets[p + 1]]``
            (``x1, y1, x2, y2, ...``, pixel-corner coordinates).
        coords: ``(C,)`` float64, every polygon's coordinates (float64: the json's values exactly, so polygons
            rasterise as they always did; float32 would move a vertex at ``x.9`` across COCO's rounding).
        rle_range: ``(M, 2)`` int64, annotation ``m``'s compressed RLE string is ``rle_data[rle_range[m, 0]:
            rle_range[m, 1]]`` (its size is its image's).
        rle_data: ``(R,)`` uint8, the ASCII bytes of every compressed RLE string.

    Reordering or dropping annotations (:meth:`take`) moves only the ``(M,)`` arrays; the buffers are shared.
    """

    kinds: np.ndarray
    part_range: np.ndarray
    part_offsets: np.ndarray
    coords: np.ndarray
    rle_range: np.ndarray
    rle_data: np.ndarray

    def __len__(self) -> int:
        return len(self.kinds)

    def take(self, index: np.ndarray) -> PackedMasks:
        """The masks of annotations ``index`` (an index array or a bool mask), in that order."""
        return PackedMasks(self.kinds[index], self.part_range[index], self.part_offsets, self.coords,
                           self.rle_range[index], self.rle_data)

    def polygons(self, m: int) -> list[np.ndarray]:
        """Annotation ``m``'s polygons as ``(k, 2)`` float64 ``(x, y)`` arrays (copies)."""
        lo, hi = self.part_range[m]
        off = self.part_offsets
        return [self.coords[off[p]:off[p + 1]].reshape(-1, 2).copy() for p in range(int(lo), int(hi))]

    def rle_counts(self, m: int) -> bytes:
        lo, hi = self.rle_range[m]
        return self.rle_data[int(lo):int(hi)].tobytes()

    def segmentation(self, m: int, height: int, width: int) -> list[list[float]] | dict[str, Any]:
        """Annotation ``m``'s segmentation in COCO json form (polygon lists, or a compressed RLE dict)."""
        if self.kinds[m] == POLYGON:
            lo, hi = self.part_range[m]
            off = self.part_offsets
            return [self.coords[off[p]:off[p + 1]].tolist() for p in range(int(lo), int(hi))]
        return {"size": [int(height), int(width)], "counts": self.rle_counts(m).decode("ascii")}

    def decode(self, m: int, json_height: int, json_width: int, height: int, width: int) -> PolygonMask | BitmapCrop:
        """Annotation ``m`` for an image of ``height x width`` (the decoded image's size; an RLE must have the
        json's size ``json_height x json_width`` and the image that size too). Raises
        :class:`~densedet.structures.masks.MaskFormatError`."""
        if self.kinds[m] == POLYGON:
            return PolygonMask(self.polygons(m))
        return decode_segmentation({"size": [int(json_height), int(json_width)], "counts": self.rle_counts(m)},
                                   height, width)


def _empty_packed(n: int) -> PackedMasks:
    return PackedMasks(np.zeros(n, np.uint8), np.zeros((n, 2), np.int64), np.zeros(1, np.int64),
                       np.zeros(0, np.float64), np.zeros((n, 2), np.int64), np.zeros(0, np.uint8))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _polygon_numbers(segms: list[Any], polygon_ids: list[int], problem: np.ndarray
                     ) -> tuple[np.ndarray, list[int], list[int], list[int]]:
    """Every polygon's numbers as one float64 array, each part's length (-1: not a list), each annotation's part
    count, and the annotations they came from. An annotation holding anything but numbers (a string, ``None``, a
    nested list) is marked ``bad polygon`` and left out.

    ``array('d').extend`` converts each number in C (no list of 40M Python floats built first, no second pass);
    like ``float()`` it refuses strings and ``None``; booleans count as 0 / 1."""
    coords = array("d")
    part_lens: list[int] = []
    part_counts: list[int] = []
    good: list[int] = []
    extend, append = coords.extend, part_lens.append
    for k in polygon_ids:
        s = segms[k]
        n_coords, n_parts = len(coords), len(part_lens)
        try:
            for p in s:
                if type(p) is list:
                    extend(p)
                    append(len(p))
                else:
                    append(-1)
        except (TypeError, OverflowError):  # drop what this annotation had appended already
            del coords[n_coords:]
            del part_lens[n_parts:]
            problem[k] = _BAD_POLY
            continue
        good.append(k)
        part_counts.append(len(s))
    return np.frombuffer(coords, dtype=np.float64), good, part_lens, part_counts


def pack_segmentations(segms: list[Any], heights: np.ndarray, widths: np.ndarray
                       ) -> tuple[PackedMasks, np.ndarray, np.ndarray]:
    """Validate and pack ``M`` COCO segmentations (``None`` where an annotation has none).

    Args:
        segms: the json objects, one per annotation.
        heights, widths: ``(M,)`` the size of each annotation's image (from the json).

    Returns:
        ``packed`` (:class:`PackedMasks`, ``M`` entries, garbage where refused), ``problem`` ``(M,)`` uint8
        (0: usable, else a key of :data:`PROBLEMS`) and ``extent`` ``(M, 4)`` float64: the mask's extent box xyxy
        clipped to the image (polygons: their vertices; RLE: their pixels; all zeros for an empty RLE).
    """
    n = len(segms)
    problem = np.zeros(n, np.uint8)
    extent = np.zeros((n, 4), np.float64)
    if n == 0:
        return _empty_packed(0), problem, extent
    heights = np.asarray(heights, np.float64)
    widths = np.asarray(widths, np.float64)
    polygon_ids, rle_ids = [], []
    for k, s in enumerate(segms):
        t = type(s)
        if t is list:
            polygon_ids.append(k)
        elif t is dict:
            rle_ids.append(k)
        elif s is None:
            problem[k] = _NONE
        else:
            problem[k] = _UNKNOWN
    packed = _empty_packed(n)
    if polygon_ids:
        _pack_polygons(segms, polygon_ids, heights, widths, packed, problem, extent)
    if rle_ids:
        _pack_rles(segms, rle_ids, heights, widths, packed, problem, extent)
    return packed, problem, extent


def _pack_polygons(segms: list[Any], polygon_ids: list[int], heights: np.ndarray, widths: np.ndarray,
                   packed: PackedMasks, problem: np.ndarray, extent: np.ndarray) -> None:
    coords, ids, part_lens, part_counts = _polygon_numbers(segms, polygon_ids, problem)
    ids_arr = np.asarray(ids, np.int64)
    lens = np.asarray(part_lens, np.int64).reshape(-1)
    counts = np.asarray(part_counts, np.int64).reshape(-1)
    sizes = np.maximum(lens, 0)
    part_offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(sizes, out=part_offsets[1:])
    # Per part: 0 fine, else the kind check_segmentation gives its first failing part.
    has_nonfinite = np.zeros(len(lens), bool)
    finite = np.isfinite(coords)
    if not finite.all():
        has_nonfinite[np.searchsorted(part_offsets, np.flatnonzero(~finite), side="right") - 1] = True
    del finite
    code = np.where((lens < 0) | (lens % 2 == 1) | ((lens > 0) & (lens < 6)) | has_nonfinite, _BAD_POLY, 0)
    code = np.where(lens == 0, _EMPTY, code).astype(np.uint8)
    part_ann = np.repeat(np.arange(len(ids_arr)), counts)
    failing = np.flatnonzero(code)
    if failing.size:
        anns, first = np.unique(part_ann[failing], return_index=True)
        problem[ids_arr[anns]] = code[failing[first]]
    problem[ids_arr[counts == 0]] = _EMPTY
    good = problem[ids_arr] == 0
    if not good.all():  # drop the refused ones' numbers: every remaining part has an even length again
        keep_part = np.repeat(good, counts)
        coords = coords[np.repeat(keep_part, sizes)]
        ids_arr, counts, sizes = ids_arr[good], counts[good], sizes[keep_part]
        part_offsets = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=part_offsets[1:])
    if len(ids_arr) == 0:
        return
    part_start = np.zeros(len(ids_arr) + 1, np.int64)
    np.cumsum(counts, out=part_start[1:])
    packed.kinds[ids_arr] = POLYGON
    packed.part_range[ids_arr, 0] = part_start[:-1]
    packed.part_range[ids_arr, 1] = part_start[1:]
    packed.part_offsets, packed.coords = part_offsets, coords
    # Extent of each annotation's vertices: its coordinates are contiguous and the annotations tile `coords`.
    starts = part_offsets[part_start[:-1]] // 2
    xs, ys = coords[0::2], coords[1::2]
    x0, x1 = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    y0, y1 = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    h, w = heights[ids_arr], widths[ids_arr]
    x_lo, x_hi, y_lo, y_hi = polygon_limits(h, w)
    far = (x0 < x_lo) | (x1 > x_hi) | (y0 < y_lo) | (y1 > y_hi)
    problem[ids_arr[far]] = _BAD_POLY
    extent[ids_arr] = np.stack([x0.clip(0, w), y0.clip(0, h), x1.clip(0, w), y1.clip(0, h)], axis=1)


def _rle_problem(segm: dict, height: float, width: float) -> tuple[int, Any]:
    """(problem code, counts as bytes or a list) of one RLE dict, without decoding a compressed string."""
    size, counts = segm.get("size"), segm.get("counts")
    if not (type(size) is list and len(size) == 2 and all(_is_number(v) and float(v).is_integer() for v in size)):
        return _BAD_RLE, None
    if (float(size[0]), float(size[1])) != (height, width):
        return _WRONG_SIZE, None
    if type(counts) is str:
        try:
            return 0, counts.encode("ascii")
        except UnicodeEncodeError:
            return _BAD_RLE, None
    if type(counts) is list:
        if counts and (set(map(type, counts)) != {int} or min(counts) < 0):  # type() in C: no bools, no floats
            return _BAD_RLE, None
        return (0, counts) if sum(counts) == height * width else (_WRONG_SIZE, None)
    return _BAD_RLE, None


def _pack_rles(segms: list[Any], rle_ids: list[int], heights: np.ndarray, widths: np.ndarray,
               packed: PackedMasks, problem: np.ndarray, extent: np.ndarray) -> None:
    strings: list[bytes] = []
    kept: list[int] = []
    kinds: list[int] = []
    for k in rle_ids:
        h, w = float(heights[k]), float(widths[k])
        code, counts = _rle_problem(segms[k], h, w)
        if code:
            problem[k] = code
            continue
        if isinstance(counts, list):  # stored compressed: decodes to the same pixels, a fraction of the bytes
            rle = coco_mask.frPyObjects({"size": [int(h), int(w)], "counts": counts}, int(h), int(w))
            counts = rle["counts"] if isinstance(rle["counts"], bytes) else rle["counts"].encode("ascii")
            kinds.append(RLE_UNCOMPRESSED)
        else:
            kinds.append(RLE)
        strings.append(counts)
        kept.append(k)
    if not kept:
        return
    kept_arr = np.asarray(kept, np.int64)
    offsets = np.zeros(len(kept) + 1, np.int64)
    np.cumsum([len(s) for s in strings], out=offsets[1:])
    data = np.frombuffer(b"".join(strings), np.uint8)
    pixels = heights[kept_arr].astype(np.int64) * widths[kept_arr].astype(np.int64)
    ok = valid_rle_strings(data, offsets, pixels)
    problem[kept_arr[~ok]] = _BAD_RLE
    packed.kinds[kept_arr] = np.asarray(kinds, np.uint8)
    packed.rle_range[kept_arr, 0] = offsets[:-1]
    packed.rle_range[kept_arr, 1] = offsets[1:]
    packed.rle_data = data
    good = np.flatnonzero(ok)
    if good.size:  # pixel extent of the valid ones (faster-coco-eval reads the runs, no pixels decoded)
        rles = [{"size": [int(heights[kept[i]]), int(widths[kept[i]])], "counts": strings[i]} for i in good.tolist()]
        xywh = np.asarray(coco_mask.toBbox(rles), np.float64).reshape(-1, 4)
        area = np.asarray(coco_mask.area(rles), np.float64).reshape(-1)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        extent[kept_arr[good]] = np.where(area[:, None] > 0, xyxy, 0.0)


def first_reason(segm: Any, code: int, height: int, width: int) -> str:
    """The message check_segmentation gives for one refused segmentation (for the warning's "first: ...")."""
    if code == _NONE:
        return "no 'segmentation'"
    try:
        check_segmentation(segm, height, width)
    except MaskFormatError as e:
        return str(e)
    return PROBLEMS[code]


def mask_box_problems(extent: np.ndarray, boxes: np.ndarray, iou_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """Segmentation against box (issue "bad masks": a polygon outside the image with its box inside trained as an
    empty mask target).

    Args:
        extent: ``(M, 4)`` xyxy mask extent boxes clipped to the image (:func:`pack_segmentations`).
        boxes: ``(M, 4)`` xyxy annotation boxes clipped to the image.
        iou_thr: an extent whose IoU with the box is below this disagrees with it.

    Returns:
        ``empty`` ``(M,)`` bool (no mask extent inside the image) and ``disagree`` ``(M,)`` bool (non-empty, IoU
        below ``iou_thr``).
    """
    ew, eh = extent[:, 2] - extent[:, 0], extent[:, 3] - extent[:, 1]
    empty = (ew <= 0) | (eh <= 0)
    ix = np.minimum(extent[:, 2], boxes[:, 2]) - np.maximum(extent[:, 0], boxes[:, 0])
    iy = np.minimum(extent[:, 3], boxes[:, 3]) - np.maximum(extent[:, 1], boxes[:, 1])
    inter = ix.clip(0, None) * iy.clip(0, None)
    union = ew.clip(0, None) * eh.clip(0, None) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return empty, ~empty & (iou < iou_thr)
