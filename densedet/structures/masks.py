"""Instance masks that stay small: polygons as polygons, bitmaps cropped to their extent.

COCO segmentations come in three forms (``cocodataset/cocoapi`` ``PythonAPI/pycocotools/coco.py`` ``annToRLE``):
a list of polygons ``[[x1, y1, x2, y2, ...], ...]`` in pixel-corner coordinates, an uncompressed RLE
``{"size": [h, w], "counts": [int, ...]}`` (column-major run lengths starting with zeros, used for crowd regions)
and a compressed RLE ``{"size": [h, w], "counts": "<string>"}``. All three are rasterised or decoded by
faster-coco-eval's pycocotools-compatible ``faster_coco_eval.core.mask`` module (no pycocotools dependency).

Memory: a full-image ``(H, W)`` mask per instance is what makes other toolboxes run out of RAM on crowded COCO
images. :class:`InstanceMasks` keeps every polygon as its vertices and every decoded RLE as a :class:`BitmapCrop`,
the ``uint8`` bitmap of the smallest box holding its pixels plus that box's offset. Transforms (resize, flip, crop)
work on those forms; the box-shaped RoI targets of Mask R-CNN (:meth:`InstanceMasks.roi_targets`) read only the
crop, with the same result as MMDetection's ``BitmapMasks.crop_and_resize`` on the full mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from faster_coco_eval.core import mask as coco_mask
from torch import Tensor
from torchvision.ops import roi_align

from densedet.structures.rle_codec import valid_rle_strings

__all__ = ["BitmapCrop", "InstanceMasks", "MaskFormatError", "PolygonMask", "check_segmentation",
           "decode_segmentation", "nearest_source_index", "polygon_limits"]


class MaskFormatError(ValueError):
    """A segmentation that cannot be read; ``kind`` says why (used for counted warnings)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class PolygonMask:
    """One instance as polygons: a list of ``(k, 2)`` float64 ``(x, y)`` vertex arrays, pixel-corner coordinates
    (COCO: a pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``). Several polygons are united."""

    polys: list[np.ndarray]


@dataclass
class BitmapCrop:
    """One instance as a bitmap: ``bits`` ``(h, w)`` uint8 {0, 1} placed with its top-left pixel at ``(x0, y0)``
    of the image; every pixel outside the crop is 0."""

    x0: int
    y0: int
    bits: np.ndarray


MaskItem = PolygonMask | BitmapCrop


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def polygon_limits(height: Any, width: Any) -> tuple[Any, Any, Any, Any]:
    """``(x_min, x_max, y_min, y_max)``: the coordinates a polygon vertex may have in a ``height x width`` image
    (numbers or arrays), one image size beyond each border. COCO's polygon rasteriser (cocoapi ``rleFrPoly``)
    allocates memory in proportion to the polygon's perimeter, wherever its vertices lie; bounding them bounds that
    memory (a vertex at 1e12, or NaN cast to an integer, would make it allocate without limit)."""
    return -1.0 * width, 2.0 * width, -1.0 * height, 2.0 * height


def _is_integral(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v) and float(v).is_integer()


def check_segmentation(segm: Any, height: int, width: int) -> None:
    """Cheap load-time check of one COCO ``segmentation``; raises :class:`MaskFormatError` (``kind`` one of
    ``'empty polygon'``, ``'bad polygon'``, ``'RLE of the wrong size'``, ``'bad RLE'``, ``'unknown format'``).

    Polygons: a non-empty list of lists of finite numbers, each of even length >= 6 (3 vertices), every vertex
    within one image size of the image (:func:`polygon_limits`). RLE: ``size`` must be two integers equal to the
    image's ``[height, width]``; ``counts``, uncompressed (a list) or compressed (a string), must be non-negative
    runs adding up to ``h * w`` (a compressed string is decoded to its runs, not to pixels:
    :func:`~densedet.structures.rle_codec.valid_rle_strings`). So nothing that passes makes a rasteriser or
    decoder allocate more than its image.
    """
    if isinstance(segm, list):
        if not segm:
            raise MaskFormatError("empty polygon list", "empty polygon")
        x_lo, x_hi, y_lo, y_hi = polygon_limits(height, width)
        for j, poly in enumerate(segm):
            if not isinstance(poly, (list, tuple)) or not all(_is_number(v) for v in poly):
                raise MaskFormatError(f"polygon {j} is not a list of numbers", "bad polygon")
            if len(poly) < 6 or len(poly) % 2:
                raise MaskFormatError(f"polygon {j} has {len(poly)} coordinates (needs an even number >= 6)",
                                      "bad polygon" if poly else "empty polygon")
            if not all(math.isfinite(v) for v in poly):
                raise MaskFormatError(f"polygon {j} has NaN or inf coordinates", "bad polygon")
            xs, ys = poly[0::2], poly[1::2]
            if min(xs) < x_lo or max(xs) > x_hi or min(ys) < y_lo or max(ys) > y_hi:
                raise MaskFormatError(f"polygon {j} has coordinates more than one image size outside the "
                                      f"{width}x{height} image (x in [{min(xs):g}, {max(xs):g}], y in "
                                      f"[{min(ys):g}, {max(ys):g}])", "bad polygon")
        return
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_integral(v) for v in size)):
            raise MaskFormatError(f"RLE 'size' must be [h, w] (two integers), got {size!r}", "bad RLE")
        if [int(size[0]), int(size[1])] != [int(height), int(width)]:
            raise MaskFormatError(f"RLE size {list(size)} differs from the image's [h, w] = [{height}, {width}]",
                                  "RLE of the wrong size")
        if isinstance(counts, list):
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
                raise MaskFormatError("uncompressed RLE counts must be non-negative integers", "bad RLE")
            if sum(counts) != height * width:
                raise MaskFormatError(f"uncompressed RLE counts sum to {sum(counts)}, expected h * w = "
                                      f"{height * width}", "RLE of the wrong size")
            return
        if isinstance(counts, (str, bytes)):
            try:
                raw = counts.encode("ascii") if isinstance(counts, str) else counts
            except UnicodeEncodeError:
                raise MaskFormatError("compressed RLE counts hold non-ASCII characters", "bad RLE") from None
            ok = valid_rle_strings(np.frombuffer(raw, np.uint8), np.array([0, len(raw)]),
                                   np.array([int(height) * int(width)]))
            if not ok[0]:
                raise MaskFormatError(f"compressed RLE counts are corrupt (not non-negative runs adding up to "
                                      f"h * w = {int(height) * int(width)})", "bad RLE")
            return
        raise MaskFormatError(f"RLE 'counts' must be a list or a string, got {type(counts).__name__}", "bad RLE")
    raise MaskFormatError(f"segmentation must be a polygon list or an RLE dict, got {type(segm).__name__}",
                          "unknown format")


def _crop_nonzero(full: np.ndarray) -> BitmapCrop:
    rows = np.flatnonzero(full.any(axis=1))
    if rows.size == 0:
        return BitmapCrop(0, 0, np.zeros((0, 0), np.uint8))
    cols = np.flatnonzero(full.any(axis=0))
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return BitmapCrop(x0, y0, np.ascontiguousarray(full[y0:y1, x0:x1], dtype=np.uint8))


def decode_segmentation(segm: Any, height: int, width: int) -> MaskItem:
    """One checked COCO ``segmentation`` -> :class:`PolygonMask` (polygons) or :class:`BitmapCrop` (RLE, decoded
    through faster-coco-eval and cropped to its non-zero pixels). Raises :class:`MaskFormatError`."""
    check_segmentation(segm, height, width)
    if isinstance(segm, list):
        return PolygonMask([np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in segm])
    counts = segm["counts"]
    try:
        if isinstance(counts, list):
            rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        else:
            rle = {"size": [height, width], "counts": counts}
        full = coco_mask.decode(rle)
    except (ValueError, RuntimeError) as e:
        raise MaskFormatError(f"cannot decode the RLE: {e}", "bad RLE") from e
    return _crop_nonzero(full)


def rasterize_polygons(polys: Sequence[np.ndarray], height: int, width: int) -> BitmapCrop:
    """Rasterise polygons (COCO rules, faster-coco-eval) over only their bounding box clipped to the image.

    COCO's polygon rasteriser is invariant to integer translation of non-negative coordinates, so rendering the
    translated polygon into its box gives exactly the pixels of the full-image rendering (tests check it).
    """
    pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in polys], 0)
    x0 = int(min(max(math.floor(pts[:, 0].min()), 0), width))
    y0 = int(min(max(math.floor(pts[:, 1].min()), 0), height))
    x1 = int(min(max(math.ceil(pts[:, 0].max()), 0), width))
    y1 = int(min(max(math.ceil(pts[:, 1].max()), 0), height))
    w, h = x1 - x0, y1 - y0
    if w <= 0 or h <= 0:
        return BitmapCrop(x0, y0, np.zeros((max(h, 0), max(w, 0)), np.uint8))
    shifted = [(np.asarray(p, np.float64).reshape(-1, 2) - (x0, y0)).reshape(-1).tolist() for p in polys]
    rles = coco_mask.frPyObjects(shifted, h, w)
    bits = coco_mask.decode(coco_mask.merge(rles)) if len(rles) > 1 else coco_mask.decode(rles[0])
    return BitmapCrop(x0, y0, np.ascontiguousarray(bits, dtype=np.uint8))


def nearest_source_index(start: int, length: int, scale: float, src_len: int) -> np.ndarray:
    """Source pixel of each output pixel ``start .. start+length-1`` for a nearest-neighbour resize by ``scale``:
    ``floor((i + 0.5) / scale)`` clipped to ``[0, src_len - 1]`` (pixel centres map to pixel centres, as
    ``torch.nn.functional.interpolate(mode='nearest-exact')``)."""
    i = np.arange(start, start + length, dtype=np.float64)
    return np.clip(np.floor((i + 0.5) / scale), 0, max(src_len - 1, 0)).astype(np.int64)


def _resize_crop(item: BitmapCrop, sx: float, sy: float, new_h: int, new_w: int) -> BitmapCrop:
    h, w = item.bits.shape
    if h == 0 or w == 0:
        return BitmapCrop(0, 0, np.zeros((0, 0), np.uint8))
    # The output pixels whose nearest source pixel can fall in the crop: a slightly larger box, then exact lookup.
    nx0 = max(int(math.floor(item.x0 * sx)) - 1, 0)
    ny0 = max(int(math.floor(item.y0 * sy)) - 1, 0)
    nx1 = min(int(math.ceil((item.x0 + w) * sx)) + 1, new_w)
    ny1 = min(int(math.ceil((item.y0 + h) * sy)) + 1, new_h)
    if nx1 <= nx0 or ny1 <= ny0:
        return BitmapCrop(0, 0, np.zeros((0, 0), np.uint8))
    src_x = np.floor((np.arange(nx0, nx1) + 0.5) / sx).astype(np.int64) - item.x0
    src_y = np.floor((np.arange(ny0, ny1) + 0.5) / sy).astype(np.int64) - item.y0
    in_x, in_y = (src_x >= 0) & (src_x < w), (src_y >= 0) & (src_y < h)
    out = item.bits[src_y.clip(0, h - 1)][:, src_x.clip(0, w - 1)] * (in_y[:, None] & in_x[None, :])
    return _crop_nonzero_offset(out.astype(np.uint8), nx0, ny0)


def _crop_nonzero_offset(bits: np.ndarray, x0: int, y0: int) -> BitmapCrop:
    c = _crop_nonzero(bits)
    if c.bits.size == 0:
        return c
    return BitmapCrop(c.x0 + x0, c.y0 + y0, c.bits)


class InstanceMasks:
    """The masks of one image's instances, in the order of its boxes.

    Args:
        items: one :class:`PolygonMask` or :class:`BitmapCrop` per instance.
        height, width: the current image size (changes with :meth:`resize` / :meth:`crop`).

    Every method returns a new object (the inputs are never written to).
    """

    def __init__(self, items: Sequence[MaskItem], height: int, width: int) -> None:
        self.items = list(items)
        self.height = int(height)
        self.width = int(width)

    @classmethod
    def from_coco(cls, segms: Sequence[Any], height: int, width: int) -> InstanceMasks:
        """Decode COCO segmentations (see :func:`decode_segmentation`)."""
        return cls([decode_segmentation(s, height, width) for s in segms], height, width)

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        n_poly = sum(isinstance(m, PolygonMask) for m in self.items)
        return f"InstanceMasks({len(self)} instances: {n_poly} polygon, {len(self) - n_poly} bitmap; " \
               f"{self.height}x{self.width})"

    def subset(self, keep: np.ndarray | Sequence[int] | Tensor) -> InstanceMasks:
        """Instances selected by a bool mask or an index array (as the boxes they travel with)."""
        keep = np.asarray(keep.cpu() if isinstance(keep, Tensor) else keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64).reshape(-1)
        return InstanceMasks([self.items[int(i)] for i in idx], self.height, self.width)

    def crop_of(self, i: int) -> BitmapCrop:
        """Instance ``i`` as a :class:`BitmapCrop` (polygons rasterised over their box only)."""
        item = self.items[i]
        if isinstance(item, PolygonMask):
            return rasterize_polygons(item.polys, self.height, self.width)
        return item

    def to_full(self, i: int) -> np.ndarray:
        """Instance ``i`` as a full ``(H, W)`` uint8 image (for tests and drawing, not for training)."""
        c = self.crop_of(i)
        full = np.zeros((self.height, self.width), np.uint8)
        h, w = c.bits.shape
        full[c.y0:c.y0 + h, c.x0:c.x0 + w] = c.bits
        return full

    def areas(self) -> np.ndarray:
        """``(n,)`` float number of mask pixels per instance."""
        return np.array([float(self.crop_of(i).bits.sum()) for i in range(len(self))], dtype=np.float64)

    # ---------------------------------------------------------------------------------------------- transforms
    def resize(self, new_h: int, new_w: int) -> InstanceMasks:
        """Rescale to a ``new_h x new_w`` image: polygon vertices scale (mmdet ``PolygonMasks.resize``), bitmaps
        are resampled nearest-neighbour (mmdet ``BitmapMasks.resize``) within their box only."""
        sx, sy = new_w / self.width, new_h / self.height
        out: list[MaskItem] = []
        for item in self.items:
            if isinstance(item, PolygonMask):
                out.append(PolygonMask([p * (sx, sy) for p in item.polys]))
            else:
                out.append(_resize_crop(item, sx, sy, new_h, new_w))
        return InstanceMasks(out, new_h, new_w)

    def flip(self, direction: str = "horizontal") -> InstanceMasks:
        """Mirror like :func:`densedet.data.transforms.flip_boxes` (``x' = W - x`` on pixel corners)."""
        if direction not in ("horizontal", "vertical"):
            raise ValueError(f"unknown flip direction {direction!r}")
        out: list[MaskItem] = []
        for item in self.items:
            if isinstance(item, PolygonMask):
                polys = []
                for p in item.polys:
                    q = p.copy()
                    if direction == "horizontal":
                        q[:, 0] = self.width - p[:, 0]
                    else:
                        q[:, 1] = self.height - p[:, 1]
                    polys.append(q)
                out.append(PolygonMask(polys))
            else:
                h, w = item.bits.shape
                if direction == "horizontal":
                    out.append(BitmapCrop(self.width - item.x0 - w, item.y0, np.ascontiguousarray(item.bits[:, ::-1])))
                else:
                    out.append(BitmapCrop(item.x0, self.height - item.y0 - h,
                                          np.ascontiguousarray(item.bits[::-1])))
        return InstanceMasks(out, self.height, self.width)

    def crop(self, x1: int, y1: int, crop_w: int, crop_h: int) -> InstanceMasks:
        """The window ``[x1, x1 + crop_w) x [y1, y1 + crop_h)``. A polygon inside the window is shifted; one that
        crosses its border is rasterised and cut exactly (mmdet clamps the vertices, which bends the shape)."""
        out: list[MaskItem] = []
        for i, item in enumerate(self.items):
            if isinstance(item, PolygonMask):
                pts = np.concatenate(item.polys, 0)
                inside = (pts[:, 0].min() >= x1 and pts[:, 1].min() >= y1 and pts[:, 0].max() <= x1 + crop_w
                          and pts[:, 1].max() <= y1 + crop_h)
                if inside:
                    out.append(PolygonMask([p - (x1, y1) for p in item.polys]))
                    continue
                item = self.crop_of(i)
            h, w = item.bits.shape
            ax0, ay0 = max(item.x0, x1), max(item.y0, y1)
            ax1, ay1 = min(item.x0 + w, x1 + crop_w), min(item.y0 + h, y1 + crop_h)
            if ax1 <= ax0 or ay1 <= ay0:
                out.append(BitmapCrop(0, 0, np.zeros((0, 0), np.uint8)))
                continue
            bits = item.bits[ay0 - item.y0:ay1 - item.y0, ax0 - item.x0:ax1 - item.x0]
            out.append(_crop_nonzero_offset(bits, ax0 - x1, ay0 - y1))
        return InstanceMasks(out, crop_h, crop_w)

    # ---------------------------------------------------------------------------------------------- targets
    def roi_targets(self, rois: Tensor, gt_inds: Tensor, out_size: int, binarize: bool = True) -> Tensor:
        """Mask R-CNN targets: RoIAlign of each RoI's gt mask to ``out_size x out_size``.

        MMDetection 2.x ``mask_target_single`` / ``BitmapMasks.crop_and_resize``: ``roi_align(mask, roi, out,
        spatial_scale=1, sampling_ratio=0, aligned=True)``, then ``>= 0.5`` when ``binarize``. Computed on each
        gt's crop with a one-pixel zero border on the sides that are not the image border, which reproduces the
        full-image result (torchvision's bilinear sampling reads zero or clamps to the edge exactly there).

        Args:
            rois: ``(n, 4)`` xyxy in this image's pixels; gt_inds: ``(n,)`` index of each RoI's instance.

        Returns:
            ``(n, out_size, out_size)`` float32 on ``rois.device`` (0/1 when ``binarize``).
        """
        n = rois.shape[0]
        out = torch.zeros((n, out_size, out_size), dtype=torch.float32)
        if n == 0:
            return out.to(rois.device)
        rois_cpu = rois.detach().float().cpu()
        inds = gt_inds.detach().cpu().long()
        for g in torch.unique(inds).tolist():
            sel = (inds == g).nonzero(as_tuple=True)[0]
            c = self.crop_of(int(g))
            h, w = c.bits.shape
            if h == 0 or w == 0:
                continue
            left, top = int(c.x0 > 0), int(c.y0 > 0)
            right, bottom = int(c.x0 + w < self.width), int(c.y0 + h < self.height)
            canvas = torch.zeros((1, 1, h + top + bottom, w + left + right), dtype=torch.float32)
            canvas[0, 0, top:top + h, left:left + w] = torch.from_numpy(c.bits).float()
            shift = torch.tensor([c.x0 - left, c.y0 - top] * 2, dtype=torch.float32)
            boxes = torch.cat([torch.zeros((sel.numel(), 1)), rois_cpu[sel] - shift], 1)
            out[sel] = roi_align(canvas, boxes, (out_size, out_size), 1.0, 0, True)[:, 0]
        if binarize:
            out = (out >= 0.5).float()
        return out.to(rois.device)
