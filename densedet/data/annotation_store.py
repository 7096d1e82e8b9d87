"""The validated, compact view of a COCO annotation file: what training reads and what evaluation scores against.

Why compact: a COCO json parsed into Python objects (train2017: 118k images, 860k instances, every polygon a list
of Python floats) takes about 2.4 GiB, and a forked DataLoader worker that touches those objects (reading them
changes their reference counts; the garbage collector walks them) copies their pages, until every worker holds its
own copy of the whole dataset. Detectron2 (``DatasetFromList(serialize=True)``) and MMDetection 3
(``BaseDataset(serialize_data=True)``) pack pickled records into one byte buffer; here the records are columns,
a few contiguous numpy arrays (:class:`AnnotationStore`), so that nothing per image or per annotation is a Python
object, and the parsed json is dropped as soon as they are built.

Why one view: the loader skips or repairs what it cannot use (a degenerate box, a box partly outside its image, a
NaN polygon, a corrupt RLE). Evaluation used to score against the raw file, so whatever training had skipped
crashed the first validation, after hours of training, or made the rasteriser allocate without bound.
:meth:`AnnotationStore.coco_dict` rebuilds the COCO ground truth for the evaluator from the store itself: the
evaluator sees exactly the annotations training saw (clipped boxes clipped, skipped ones absent).

Loading (:func:`load_annotation_store`): parse (``orjson`` when installed, a few times faster than ``json``; a
file ``orjson`` refuses, such as one with ``NaN`` literals, is read by ``json``), check the categories, images and
annotations with numpy over whole columns, with masks validate every segmentation before anything is rasterised
(:mod:`densedet.data.mask_loading`), pack, drop the json. What is skipped or fixed is counted, one
:class:`~densedet.errors.DataWarning` per kind naming the annotation ids; what cannot be read at all (a missing
key, an unknown category, a NaN box, a duplicate image id) is a :class:`~densedet.errors.DataError` naming the file
and the item.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import warnings
from array import array
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from densedet.data.mask_loading import (
    DEFAULT_MASK_BBOX_CHECK,
    DEFAULT_MASK_BBOX_IOU_THR,
    MASK_BBOX_CHECKS,
    PROBLEMS,
    PackedMasks,
    first_reason,
    ids_text,
    mask_box_problems,
    pack_segmentations,
)
from densedet.errors import DataError, DataWarning

__all__ = ["FLAG_BOX_FROM_MASK", "FLAG_CLIPPED", "FLAG_CROWD", "FLAG_IGNORE", "AnnotationStore",
           "load_annotation_store", "load_coco_json", "read_json"]

_REQUIRED_KEYS = ("images", "annotations", "categories")

FLAG_CROWD = 1  # iscrowd: an ignore region for training, a crowd region for COCO evaluation
FLAG_IGNORE = 2  # the json's own "ignore" flag (kept for the ground truth; COCO evaluation lets iscrowd decide)
FLAG_CLIPPED = 4  # the box reached outside its image and was clipped to it
FLAG_BOX_FROM_MASK = 8  # mask_bbox_check='use_mask' replaced the box by the mask's extent

# kind -> text used in the warning "skipped N annotations with <text> in FILE (ids ...)"
_KIND_TEXT = {
    "degenerate": ("skipped", "non-positive width/height (or smaller than the minimum box size)"),
    "outside": ("skipped", "boxes entirely outside their image"),
    "clipped": ("clipped", "boxes partly outside their image (clipped to the image)"),
}


def _fast_json() -> Any:
    """The ``orjson`` module when it is installed (optional: ``pip install orjson``), else None."""
    try:
        import orjson
    except ImportError:
        return None
    return orjson


def read_json(path: str | Path) -> Any:
    """Parse a json file; :class:`DataError` naming the file when it is missing, unreadable, empty or invalid.

    ``orjson`` parses when installed; what it refuses (``NaN`` / ``Infinity`` literals, which Python's ``json``
    writes by default, or numbers beyond a double) goes to ``json``, which also words the error of a truly invalid
    file, so both parsers accept and refuse the same files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read annotation file {path}: {e}") from e
    if not raw or raw.isspace():
        raise DataError(f"annotation file {path} is empty")
    fast = _fast_json()
    if fast is not None:
        try:
            return fast.loads(raw)
        except fast.JSONDecodeError:
            pass
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise DataError(f"cannot read annotation file {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise DataError(
            f"annotation file {path} is not valid JSON (truncated or corrupt?): {e.msg} at line {e.lineno}, "
            f"column {e.colno}"
        ) from e


def load_coco_json(ann_file: str | Path, require_annotations: bool = True) -> dict:
    """Read a COCO json file; :class:`DataError` naming the file if it is missing, empty, invalid or incomplete."""
    path = Path(ann_file)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"annotation file {path}: expected a JSON object at the top level, got {type(data).__name__}")
    required = _REQUIRED_KEYS if require_annotations else ("images", "categories")
    missing = [k for k in required if k not in data]
    if missing:
        raise DataError(f"annotation file {path} lacks the top-level key(s) {missing} of the COCO format")
    for key in required:
        if not isinstance(data[key], list):
            raise DataError(f"annotation file {path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _readonly(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.flags.writeable = False


@dataclass(eq=False)
class AnnotationStore:
    """The checked annotations of one COCO file as contiguous arrays (``N`` images in json order, ``M`` annotations
    kept, grouped by image in one stable sort: json order inside an image). Every array is read-only.

    Attributes:
        ann_file: the json file.
        cat_ids: ``(K,)`` int64 category ids in json order; ``cat_names`` their names.
        image_ids: ``(N,)`` int64; ``widths``, ``heights``: ``(N,)`` float64 as the json gives them.
        name_data, name_offsets: every ``file_name`` as UTF-8 bytes, image ``i``'s is
            ``name_data[name_offsets[i]:name_offsets[i + 1]]`` (:meth:`file_name`).
        ann_offsets: ``(N + 1,)`` int64, image ``i``'s annotations are ``ann_offsets[i]:ann_offsets[i + 1]``.
        ann_ids, category_ids: ``(M,)`` int64.
        bboxes: ``(M, 4)`` float64 ``[x, y, w, h]`` exactly as in the json (or the mask's extent, see
            ``FLAG_BOX_FROM_MASK``), unclipped.
        boxes: ``(M, 4)`` float32 xyxy pixels clipped to the image: what training reads.
        areas: ``(M,)`` float64, the json's ``area`` (NaN where it has none).
        flags: ``(M,)`` uint8 of ``FLAG_CROWD | FLAG_IGNORE | FLAG_CLIPPED | FLAG_BOX_FROM_MASK``.
        ann_counts, noncrowd_counts: ``(N,)`` int64, annotations per image in the json before any check (all, and
            without ``iscrowd``), to say why a training set came out empty.
        masks: :class:`~densedet.data.mask_loading.PackedMasks` of the ``M`` annotations (``with_mask``), else None.
        skipped: counts of what was skipped or fixed, by kind: ``degenerate``, ``outside``, ``clipped`` and
            ``mask: <kind>`` (the kinds of :mod:`densedet.data.mask_loading`) where non-zero.
        has_annotations: whether the file has an ``annotations`` key (an image-info file such as
            ``image_info_test-dev2017.json`` has none: results can only be formatted for the evaluation server).
    """

    ann_file: Path
    cat_ids: np.ndarray
    cat_names: tuple[str, ...]
    image_ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    name_data: np.ndarray
    name_offsets: np.ndarray
    ann_offsets: np.ndarray
    ann_ids: np.ndarray
    category_ids: np.ndarray
    bboxes: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    flags: np.ndarray
    ann_counts: np.ndarray
    noncrowd_counts: np.ndarray
    masks: PackedMasks | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    has_annotations: bool = True

    @property
    def with_mask(self) -> bool:
        return self.masks is not None

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def __len__(self) -> int:
        """Number of annotations kept."""
        return len(self.ann_ids)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the store by name (masks' ones prefixed ``masks.``)."""
        out = {k: v for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        if self.masks is not None:
            out.update({f"masks.{k}": v for k, v in vars(self.masks).items() if isinstance(v, np.ndarray)})
        return out

    def nbytes(self) -> int:
        """Bytes held by the arrays (the store's memory, less a few hundred bytes per array object)."""
        return sum(a.nbytes for a in self.arrays().values())

    def file_name(self, i: int) -> str:
        lo, hi = self.name_offsets[i], self.name_offsets[i + 1]
        return self.name_data[int(lo):int(hi)].tobytes().decode("utf-8", "surrogatepass")

    def image_size(self, i: int) -> tuple[int | float, int | float]:
        """``(width, height)`` of image ``i`` as the json gives them (ints when whole)."""
        return _number(self.widths[i]), _number(self.heights[i])

    def image_info(self, i: int) -> dict[str, Any]:
        """``{"id", "file_name", "width", "height"}`` of image ``i`` (a new dict)."""
        w, h = self.image_size(i)
        return {"id": int(self.image_ids[i]), "file_name": self.file_name(i), "width": w, "height": h}

    def ann_range(self, i: int) -> slice:
        return slice(int(self.ann_offsets[i]), int(self.ann_offsets[i + 1]))

    def coco_dict(self, with_segmentation: bool = True) -> dict[str, Any]:
        """The COCO ground truth of the checked annotations (built now, not kept): every image, every category,
        every annotation kept (crowd included), boxes clipped where training clipped them, segmentations when the
        store holds masks (polygons exactly as in the json; RLE compressed). What the evaluator scores against."""
        n = self.num_images
        images = [{"id": int(self.image_ids[i]), "width": _number(self.widths[i]), "height": _number(self.heights[i]),
                   "file_name": self.file_name(i)} for i in range(n)]
        categories = [{"id": int(c), "name": name} for c, name in zip(self.cat_ids.tolist(), self.cat_names)]
        per_image = np.diff(self.ann_offsets)
        img_idx = np.repeat(np.arange(n), per_image)
        xywh = self.bboxes.copy()
        clipped = (self.flags & FLAG_CLIPPED) != 0
        if clipped.any():  # the clipped box, in float64
            b = self.boxes_f64(np.flatnonzero(clipped), img_idx)
            xywh[clipped] = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
        anns: list[dict[str, Any]] = []
        for ann_id, image_id, cat, box, area, flag in zip(
                self.ann_ids.tolist(), self.image_ids[img_idx].tolist(), self.category_ids.tolist(), xywh.tolist(),
                self.areas.tolist(), self.flags.tolist()):
            a: dict[str, Any] = {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": box,
                                 "iscrowd": int(flag & FLAG_CROWD)}
            if area == area:  # not NaN: the json's own area (COCO's area ranges and crowd matching read it)
                a["area"] = area
            if flag & FLAG_IGNORE:
                a["ignore"] = 1
            anns.append(a)
        if with_segmentation and self.masks is not None:
            heights, widths = self.heights[img_idx], self.widths[img_idx]
            for m, a in enumerate(anns):
                a["segmentation"] = self.masks.segmentation(m, int(heights[m]), int(widths[m]))
        return {"images": images, "annotations": anns, "categories": categories}

    def boxes_f64(self, index: np.ndarray, img_idx: np.ndarray | None = None) -> np.ndarray:
        """``(k, 4)`` float64 xyxy of annotations ``index``, clipped to their image (the float64 values ``boxes``
        was rounded from)."""
        if img_idx is None:
            img_idx = np.repeat(np.arange(self.num_images), np.diff(self.ann_offsets))
        return _clip_xyxy(self.bboxes[index], self.widths[img_idx[index]], self.heights[img_idx[index]])


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def _clip_xyxy(xywh: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """xywh -> xyxy clipped to ``[0, w] x [0, h]``, float64 (the arithmetic the loader always used)."""
    x1, y1 = xywh[:, 0], xywh[:, 1]
    x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
    return np.stack([x1.clip(0, None), y1.clip(0, None), np.minimum(x2, widths), np.minimum(y2, heights)], axis=1)


# --------------------------------------------------------------------------------------------------------- loading
def _parse_categories(data: dict, ann_file: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    ids: list[int] = []
    names: list[str] = []
    seen: set[int] = set()
    for j, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise DataError(f"{ann_file}: categories[{j}] needs an 'id' and a 'name', got {cat!r}")
        if not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
            raise DataError(f"{ann_file}: categories[{j}] has a non-integer id {cat['id']!r}")
        if cat["id"] in seen:
            raise DataError(f"{ann_file}: category id {cat['id']} appears twice")
        seen.add(cat["id"])
        ids.append(int(cat["id"]))
        names.append(str(cat["name"]))
    return np.asarray(ids, np.int64).reshape(-1), tuple(names)


def _parse_images(data: dict, ann_file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Image ids, widths, heights and file names; checked over whole columns, with a scan naming the first bad
    image when a check fails."""
    images = data["images"]
    try:
        ids = [img["id"] for img in images]
        widths = [img["width"] for img in images]
        heights = [img["height"] for img in images]
        names = [img["file_name"] for img in images]
    except (KeyError, TypeError):
        return _scan_images(data, ann_file)
    number = {int, float}
    if images and (set(map(type, ids)) != {int} or not set(map(type, widths)) <= number
                   or not set(map(type, heights)) <= number):
        return _scan_images(data, ann_file)
    ids_arr = np.asarray(ids, np.int64).reshape(-1) if ids else np.zeros(0, np.int64)
    w_arr = np.asarray(widths, np.float64).reshape(-1)
    h_arr = np.asarray(heights, np.float64).reshape(-1)
    ok = np.isfinite(w_arr) & np.isfinite(h_arr) & (w_arr > 0) & (h_arr > 0)
    if not ok.all() or len(np.unique(ids_arr)) != len(ids_arr):
        return _scan_images(data, ann_file)
    if images and set(map(type, names)) != {str}:
        names = [str(n) for n in names]
    return ids_arr, w_arr, h_arr, names


def _scan_images(data: dict, ann_file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    ids: list[int] = []
    widths: list[float] = []
    heights: list[float] = []
    names: list[str] = []
    seen: set[int] = set()
    for j, img in enumerate(data["images"]):
        ok = isinstance(img, dict) and all(k in img for k in ("id", "file_name", "width", "height"))
        if not ok:
            raise DataError(f"{ann_file}: images[{j}] needs 'id', 'file_name', 'width' and 'height', got {img!r}")
        if not isinstance(img["id"], int) or isinstance(img["id"], bool):
            raise DataError(f"{ann_file}: images[{j}] has a non-integer id {img['id']!r}")
        if img["id"] in seen:
            raise DataError(f"{ann_file}: image id {img['id']} appears twice")
        seen.add(img["id"])
        w, h = img["width"], img["height"]
        if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0) \
                or isinstance(w, bool) or isinstance(h, bool) or not np.isfinite(w) or not np.isfinite(h):
            raise DataError(f"{ann_file}: image id {img['id']} ({img['file_name']}) has invalid size {w!r} x {h!r}")
        ids.append(img["id"])
        widths.append(w)
        heights.append(h)
        names.append(str(img["file_name"]))
    return (np.asarray(ids, np.int64).reshape(-1), np.asarray(widths, np.float64).reshape(-1),
            np.asarray(heights, np.float64).reshape(-1), names)


def _bad_annotation(anns: list, index_of: dict[int, int], ann_file: Path) -> DataError:
    """Find the first malformed annotation (slow path, only after the fast parse failed)."""
    for j, a in enumerate(anns):
        if not isinstance(a, dict):
            return DataError(f"{ann_file}: annotations[{j}] is not an object: {a!r}")
        missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in a]
        if missing:
            return DataError(f"{ann_file}: annotation id {a.get('id', f'#{j}')} lacks {missing}")
        where = f"{ann_file}: annotation id {a['id']} (image id {a['image_id']})"
        if not isinstance(a["id"], int) or isinstance(a["id"], bool):
            return DataError(f"{where}: the annotation id must be an integer, got {a['id']!r}")
        if a["image_id"] not in index_of:
            return DataError(f"{where}: image id {a['image_id']} is not in 'images'")
        bbox = a["bbox"]
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            return DataError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            return DataError(f"{where}: bbox must hold 4 numbers, got {bbox!r}")
        if not isinstance(a["category_id"], int) or isinstance(a["category_id"], bool):
            return DataError(f"{where}: category_id must be an integer, got {a['category_id']!r}")
        area = a.get("area")
        if area is not None and not (isinstance(area, (int, float)) and not isinstance(area, bool)):
            return DataError(f"{where}: area must be a number, got {area!r}")
    return DataError(f"{ann_file}: malformed annotations")


def _warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=4)


def release_freed_memory() -> None:
    """Hand the memory of freed objects back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    The parsed json is millions of small objects; once it is dropped, glibc keeps most of its heap pages because
    the arrays built meanwhile sit above them, so the process would stay ~3x larger than the store it kept
    (measured: 78 MiB resident for a 21 MiB store, 29 MiB after the trim)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_annotation_store(ann_file: str | Path, *, require_annotations: bool = True, min_box_size: float = 1e-3,
                          with_mask: bool = False, mask_bbox_check: str = DEFAULT_MASK_BBOX_CHECK,
                          mask_bbox_iou_thr: float = DEFAULT_MASK_BBOX_IOU_THR,
                          data: dict | None = None, warn_boxes: bool = True) -> AnnotationStore:
    """Parse, check and pack a COCO annotation file (module docstring).

    Args:
        ann_file: the COCO instances json.
        require_annotations: the ``annotations`` key must be present (training); evaluation sets may lack it.
        min_box_size: boxes narrower or shorter than this (pixels) are skipped.
        with_mask: validate and pack every annotation's ``segmentation``; annotations without a usable one are
            skipped.
        mask_bbox_check: ``'warn'``, ``'skip'`` or ``'use_mask'``: what to do with an annotation whose mask is
            empty inside the image or disagrees with its box (:func:`~densedet.data.mask_loading.mask_box_problems`).
        mask_bbox_iou_thr: the IoU of mask extent and box below which they disagree.
        data: the parsed json, when the caller has it already (else read from ``ann_file``).
        warn_boxes: warn about skipped / clipped boxes (off when the file is read again for its masks only).

    Boxes: ``[x, y, w, h]`` in the json; kept ``xyxy`` pixels clipped to the image (a box partly outside is
    clipped, counted as ``clipped``; one narrower than ``min_box_size`` is ``degenerate``; one with nothing inside
    the image is ``outside``: both skipped).
    """
    store = _build_store(Path(ann_file), require_annotations, min_box_size, with_mask, mask_bbox_check,
                         mask_bbox_iou_thr, data, warn_boxes)
    if data is None:  # the json parsed here is gone now: give its pages back
        release_freed_memory()
    return store


def _build_store(ann_file: Path, require_annotations: bool, min_box_size: float, with_mask: bool,
                 mask_bbox_check: str, mask_bbox_iou_thr: float, data: dict | None,
                 warn_boxes: bool) -> AnnotationStore:
    if mask_bbox_check not in MASK_BBOX_CHECKS:
        raise ValueError(f"mask_bbox_check must be one of {MASK_BBOX_CHECKS}, got {mask_bbox_check!r}")
    if not 0.0 <= float(mask_bbox_iou_thr) <= 1.0:
        raise ValueError(f"mask_bbox_iou_thr must be in [0, 1], got {mask_bbox_iou_thr!r}")
    if data is None:
        data = load_coco_json(ann_file, require_annotations=require_annotations)
    cat_ids, cat_names = _parse_categories(data, ann_file)
    image_ids, widths, heights, names = _parse_images(data, ann_file)
    index_of = {int(v): i for i, v in enumerate(image_ids.tolist())}
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise DataError(f"annotation file {ann_file}: 'annotations' must be a list, got {type(anns).__name__}")
    n = len(anns)

    # Fast columnar parse; any surprise falls back to a scan that names the offending annotation.
    try:
        ann_ids = np.array([a["id"] for a in anns], dtype=np.int64).reshape(n)
        img_idx = np.array([index_of[a["image_id"]] for a in anns], dtype=np.int64).reshape(n)
        category_ids = np.array([a["category_id"] for a in anns], dtype=np.int64).reshape(n)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool).reshape(n)
        ignore = np.array([bool(a.get("ignore", 0)) for a in anns], dtype=bool).reshape(n)
        bboxes = [a["bbox"] for a in anns]
        if n and set(map(len, bboxes)) != {4}:
            raise ValueError("bbox is not [x, y, w, h]")
        # array('d') converts in C and refuses strings and None (as float() does); booleans would count as 0 / 1
        if n and set(map(type, chain.from_iterable(bboxes))) - {int, float}:
            raise TypeError("non-numeric bbox")
        xywh = np.frombuffer(array("d", chain.from_iterable(bboxes)), dtype=np.float64).reshape(n, 4)
        del bboxes
        given = [a.get("area") for a in anns]
        areas = np.array(given)
        if areas.dtype.kind not in "iuf":  # None (no area) reads as NaN; anything else but a number is an error
            if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in given):
                raise TypeError("non-numeric area")
            areas = np.array([np.nan if v is None else v for v in given], dtype=np.float64)
        areas = areas.astype(np.float64, copy=False).reshape(n)
        del given
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise _bad_annotation(anns, index_of, ann_file) from e

    def where(k: int) -> str:
        return f"{ann_file}: annotation id {ann_ids[k]} (image id {image_ids[img_idx[k]]})"

    unknown = ~np.isin(category_ids, cat_ids)
    if unknown.any():
        k = int(np.flatnonzero(unknown)[0])
        raise DataError(f"{where(k)}: unknown category id {category_ids[k]}; known category ids: "
                        f"{sorted(cat_ids.tolist())}")
    nonfinite = ~np.isfinite(xywh).all(axis=1)
    if nonfinite.any():
        k = int(np.flatnonzero(nonfinite)[0])
        raise DataError(f"{where(k)}: bbox has NaN or inf values: {anns[k]['bbox']}")

    ann_w, ann_h = widths[img_idx], heights[img_idx]
    box64 = _clip_xyxy(xywh, ann_w, ann_h)
    x1, y1 = xywh[:, 0], xywh[:, 1]
    x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
    m = float(min_box_size)
    degenerate = (xywh[:, 2] < m) | (xywh[:, 3] < m)
    outside = ~degenerate & ((box64[:, 2] - box64[:, 0] < m) | (box64[:, 3] - box64[:, 1] < m))
    eps = 1e-3  # float noise in the json (x + w = 640.0000001) is not worth a warning
    clipped = ~degenerate & ~outside & ((x1 < -eps) | (y1 < -eps) | (x2 > ann_w + eps) | (y2 > ann_h + eps))
    skipped: dict[str, int] = {}
    for kind, mask in (("degenerate", degenerate), ("outside", outside), ("clipped", clipped)):
        count = int(mask.sum())
        skipped[kind] = count
        if count and warn_boxes:
            verb, text = _KIND_TEXT[kind]
            _warn(f"{verb} {count} annotation{'s' if count > 1 else ''} with {text} in {ann_file} "
                  f"(ids {ids_text(ann_ids[mask])})")
    keep = ~degenerate & ~outside
    flags = (crowd * FLAG_CROWD | ignore * FLAG_IGNORE | clipped * FLAG_CLIPPED).astype(np.uint8)

    packed = position = None
    if with_mask:  # may drop more annotations (keep) and take boxes from masks (xywh, box64, flags)
        packed, position = _check_masks(anns, keep, xywh, box64, flags, ann_ids, ann_w, ann_h, skipped, ann_file,
                                        mask_bbox_check, float(mask_bbox_iou_thr))
    # Counts per image before any check, to say why a training set came out empty.
    ann_counts = np.bincount(img_idx, minlength=len(image_ids)).astype(np.int64)
    noncrowd_counts = np.bincount(img_idx[~crowd], minlength=len(image_ids)).astype(np.int64)
    has_annotations = "annotations" in data
    del anns, data  # the caller's reference is the last one: the json goes as soon as it returns

    # Group the kept annotations by image in one sort (stable: keeps the json order within an image).
    order = np.flatnonzero(keep)
    order = order[np.argsort(img_idx[order], kind="stable")]
    ann_offsets = np.searchsorted(img_idx[order], np.arange(len(image_ids) + 1)).astype(np.int64)
    encoded = [s.encode("utf-8", "surrogatepass") for s in names]
    name_offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=name_offsets[1:])
    store = AnnotationStore(
        ann_file=ann_file, cat_ids=cat_ids, cat_names=cat_names, image_ids=image_ids, widths=widths,
        heights=heights, name_data=np.frombuffer(b"".join(encoded), np.uint8), name_offsets=name_offsets,
        ann_offsets=ann_offsets, ann_ids=ann_ids[order], category_ids=category_ids[order], bboxes=xywh[order],
        boxes=box64[order].astype(np.float32), areas=areas[order], flags=flags[order],
        ann_counts=ann_counts, noncrowd_counts=noncrowd_counts,
        masks=packed.take(position[order]) if packed is not None else None,
        skipped=skipped, has_annotations=has_annotations)
    _readonly(*store.arrays().values())
    return store


def _check_masks(anns: list, keep: np.ndarray, xywh: np.ndarray, box64: np.ndarray, flags: np.ndarray,
                 ann_ids: np.ndarray, ann_w: np.ndarray, ann_h: np.ndarray, skipped: dict[str, int],
                 ann_file: Path, mask_bbox_check: str, iou_thr: float) -> tuple[PackedMasks, np.ndarray]:
    """Validate and pack the segmentations of the annotations still kept (updating ``keep``, and with
    ``use_mask`` ``xywh`` / ``box64`` / ``flags``, in place). Returns the packed masks and each json annotation's
    position in them (-1: not packed)."""
    cand = np.flatnonzero(keep)
    segms = [anns[k].get("segmentation") for k in cand.tolist()]
    packed, problem, extent = pack_segmentations(segms, ann_h[cand], ann_w[cand])
    for code in sorted(set(problem[problem > 0].tolist())):
        sel = np.flatnonzero(problem == code)
        kind, j = PROBLEMS[code], int(sel[0])
        k = int(cand[j])
        reason = first_reason(segms[j], code, int(ann_h[k]), int(ann_w[k]))
        skipped[f"mask: {kind}"] = len(sel)
        _warn(f"skipped {len(sel)} annotation{'s' if len(sel) > 1 else ''} with {kind} in {ann_file} "
              f"(ids {ids_text(ann_ids[cand[sel]])}; first: annotation id {ann_ids[k]}: {reason})")
    ok = np.flatnonzero(problem == 0)
    keep[cand[problem > 0]] = False
    rows = cand[ok]
    empty, disagree = mask_box_problems(extent[ok], box64[rows], iou_thr)
    for key, text, sel in (("mask: empty inside the image", "a mask empty inside the image", empty),
                           ("mask: extent disagrees with bbox",
                            f"a mask whose extent disagrees with its bbox (IoU < {iou_thr:g})", disagree)):
        count = int(sel.sum())
        if not count:
            continue
        skipped[key] = count
        s = "s" if count > 1 else ""
        ids = ids_text(ann_ids[rows[sel]])
        if mask_bbox_check == "skip" or (mask_bbox_check == "use_mask" and sel is empty):
            keep[rows[sel]] = False
            why = ": an empty mask has no box to take" if mask_bbox_check == "use_mask" else ""
            _warn(f"skipped {count} annotation{s} with {text} in {ann_file} (ids {ids}; "
                  f"mask_bbox_check='{mask_bbox_check}'{why})")
        elif mask_bbox_check == "use_mask":
            r, e = rows[sel], extent[ok][sel]
            box64[r] = e
            xywh[r] = np.concatenate([e[:, :2], e[:, 2:] - e[:, :2]], axis=1)
            flags[r] = (flags[r] & ~np.uint8(FLAG_CLIPPED)) | FLAG_BOX_FROM_MASK
            _warn(f"took the box from the mask for {count} annotation{s} with {text} in {ann_file} (ids {ids}; "
                  f"mask_bbox_check='use_mask')")
        else:
            _warn(f"{count} annotation{s} in {ann_file} have {text} (ids {ids}); kept: mask_bbox_check='warn' "
                  f"('skip' drops them, 'use_mask' takes the box from the mask)")
    position = np.full(len(keep), -1, np.int64)
    position[cand] = np.arange(len(cand))
    return packed, position
