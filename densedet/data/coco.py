"""COCO-format detection dataset (boxes, and instance masks with ``with_mask``) over the compact, validated
annotation store of :mod:`densedet.data.annotation_store`, which evaluation scores against too.

Semantics follow MMDetection 2.x ``CocoDataset`` (``mmdet/datasets/coco.py``): ``iscrowd`` boxes become ignore
regions, labels are contiguous ``0..C-1`` in category order, images without boxes are dropped for training.
Where it differs (on purpose): a box partly outside its image is clipped at load time, boxes are dropped only when
narrower than ``min_box_size`` (1e-3 px; mmdet drops < 1 px), every dropped or fixed annotation is counted and
reported in one warning per kind instead of being skipped silently, and the evaluator's ground truth is rebuilt
from what the loader kept (mmdet evaluates against the raw file).
"""

from __future__ import annotations

import operator
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densedet.data.annotation_store import (
    FLAG_CROWD,
    AnnotationStore,
    load_annotation_store,
    load_coco_json,
)
from densedet.data.image_io import decode_image
from densedet.data.mask_loading import DEFAULT_MASK_BBOX_CHECK, DEFAULT_MASK_BBOX_IOU_THR
from densedet.data.transforms import Compose, build_pipeline
from densedet.errors import DataError, DataWarning
from densedet.structures.masks import InstanceMasks, MaskFormatError

__all__ = ["CocoDataset", "DataError", "DataWarning", "ImageInfos", "load_coco_json"]


class ImageInfos(Sequence):
    """``dataset.img_infos``: item ``i``'s ``{"id", "file_name", "width", "height"}``, made on access from the
    annotation store's arrays (no Python object per image is kept: a DataLoader worker reading them copies
    nothing)."""

    def __init__(self, store: AnnotationStore, index: np.ndarray) -> None:
        self._store = store
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._store.image_info(int(self._index[i]))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for j in self._index.tolist():
            yield self._store.image_info(j)


class CocoDataset(torch.utils.data.Dataset):
    """COCO-format detection dataset over a compact, validated annotation store.

    Args:
        ann_file: COCO instances json (``images``, ``annotations`` with ``bbox`` = ``[x, y, w, h]``, ``categories``).
        img_dir: folder the images' ``file_name`` entries are relative to.
        pipeline: transform configs (see :mod:`densedet.data.transforms`), e.g. Resize, RandomFlip, Normalize.
        filter_empty_gt: drop images with no (non-crowd) box, unless ``test_mode``.
        test_mode: keep every image (evaluation / inference); the ``annotations`` key may then be absent.
        classes: category names to use, in label order; other categories' annotations are dropped. Default:
            every category, labels in ascending category-id order.
        min_box_size: boxes narrower or shorter than this (pixels) are skipped with a warning.
        with_mask: also load instance masks (:mod:`densedet.data.mask_loading`); items then carry ``masks``.
            Off: segmentations are not read at all.
        mask_bbox_check: with masks, what to do with an annotation whose mask is empty inside the image or whose
            extent disagrees with its box: ``'warn'`` (keep it, counted warning), ``'skip'`` (drop it) or
            ``'use_mask'`` (take the box from the mask).
        mask_bbox_iou_thr: IoU of mask extent and box below which they disagree.

    The annotations are read once into an :class:`~densedet.data.annotation_store.AnnotationStore` (``store``):
    numpy arrays only, the parsed json dropped, so DataLoader workers share them without copying. Evaluation scores
    against the same store (:attr:`coco_gt_dict`, :meth:`segm_gt_dict`): what the loader skipped or clipped is
    skipped or clipped for the evaluator too.

    Item ``i`` is a dict: ``img`` uint8 ``(3, H, W)`` tensor; ``boxes`` float32 ``(n, 4)`` xyxy pixels of the
    transformed image; ``labels`` int64 ``(n,)`` in ``0..C-1``; ``ignore_boxes`` float32 ``(k, 4)`` xyxy (crowd);
    ``meta`` with ``image_id``, ``file_name``, ``ori_shape`` (h, w), ``img_shape`` (h, w, after resize, before
    padding), ``scale_factor`` (w_scale, h_scale) and ``flip``. ``dataset[(i, entropy)]`` seeds the random
    transforms with ``numpy.random.default_rng(entropy)`` (what :class:`~densedet.data.samplers.SeededSampler`
    yields).
    """

    # dataset[(i, entropy)] is supported: build_dataloader then wraps its sampler in SeededSampler.
    accepts_seeded_keys = True

    def __init__(
        self,
        ann_file: str | Path,
        img_dir: str | Path,
        pipeline: list[dict] | None = None,
        filter_empty_gt: bool = True,
        test_mode: bool = False,
        classes: list[str] | None = None,
        min_box_size: float = 1e-3,
        with_mask: bool = False,
        mask_bbox_check: str = DEFAULT_MASK_BBOX_CHECK,
        mask_bbox_iou_thr: float = DEFAULT_MASK_BBOX_IOU_THR,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.test_mode = test_mode
        self.filter_empty_gt = filter_empty_gt
        self.min_box_size = float(min_box_size)
        self.with_mask = bool(with_mask)
        self.mask_bbox_check = mask_bbox_check
        self.mask_bbox_iou_thr = float(mask_bbox_iou_thr)
        if not self.ann_file.is_file():
            raise DataError(f"annotation file not found: {self.ann_file}")
        if not self.img_dir.is_dir():
            raise DataError(f"image folder not found: {self.img_dir} (images of {self.ann_file})")
        self.store: AnnotationStore = self._load_store(self.with_mask)
        self._check_inside_img_dir()
        self._load_categories(classes)
        st = self.store
        # Label of every kept annotation (-1: a category not selected), by binary search over the selected ids.
        sel_ids = np.array(sorted(self.cat2label), dtype=np.int64)
        sel_labels = np.array([self.cat2label[c] for c in sel_ids.tolist()], dtype=np.int64)
        self._labels = np.full(len(st), -1, np.int64)
        if len(sel_ids):
            pos = np.searchsorted(sel_ids, st.category_ids).clip(0, len(sel_ids) - 1)
            self._labels = np.where(sel_ids[pos] == st.category_ids, sel_labels[pos], -1)
        self._labels.flags.writeable = False
        crowd = (st.flags & FLAG_CROWD) != 0
        self.skipped_counts: dict[str, int] = {k: v for k, v in st.skipped.items() if not k.startswith("mask")}
        self.skipped_counts["unselected_category"] = int((self._labels < 0).sum())
        self.skipped_counts.update({k: v for k, v in st.skipped.items() if k.startswith("mask")})
        img_of_ann = np.repeat(np.arange(st.num_images), np.diff(st.ann_offsets))
        trainable = np.bincount(img_of_ann[~crowd & (self._labels >= 0)], minlength=st.num_images)
        if test_mode or not filter_empty_gt:
            keep = np.arange(st.num_images, dtype=np.int64)
        else:
            keep = np.flatnonzero(trainable > 0).astype(np.int64)
        if len(keep) == 0 and not test_mode:
            raise DataError(self._empty_training_set_message())
        self._items = keep
        self._items.flags.writeable = False
        self.img_infos = ImageInfos(st, keep)
        self.aspect_flags = (st.widths[keep] / st.heights[keep] > 1).astype(np.uint8)
        self.pipeline: Compose = build_pipeline(pipeline, where=f"pipeline of {self.ann_file.name}")

    # ----------------------------------------------------------------------------------------------- loading
    def _load_store(self, with_mask: bool, warn_boxes: bool = True) -> AnnotationStore:
        return load_annotation_store(self.ann_file, require_annotations=not self.test_mode,
                                     min_box_size=self.min_box_size, with_mask=with_mask,
                                     mask_bbox_check=self.mask_bbox_check, mask_bbox_iou_thr=self.mask_bbox_iou_thr,
                                     warn_boxes=warn_boxes)

    def _load_categories(self, classes: list[str] | None) -> None:
        names = dict(zip(self.store.cat_ids.tolist(), self.store.cat_names))
        self._all_cat_ids = set(names)
        if classes is None:
            self.cat_ids: list[int] = sorted(names)
        else:
            by_name = {n: c for c, n in names.items()}
            unknown = [n for n in classes if n not in by_name]
            if unknown:
                raise DataError(f"{self.ann_file}: classes {unknown} are not among its categories {sorted(by_name)}")
            self.cat_ids = [by_name[n] for n in classes]
        self.cat2label: dict[int, int] = {c: i for i, c in enumerate(self.cat_ids)}
        self.label2cat: dict[int, int] = {i: c for c, i in self.cat2label.items()}
        self.classes: list[str] = [names[c] for c in self.cat_ids]

    def _check_inside_img_dir(self) -> None:
        """Refuse any ``file_name`` that leads outside ``img_dir`` (``..``, an absolute path, a symlink resolving
        elsewhere) before a single image is opened: an annotation file must not make DenseDet read other files.

        Symlinks are found by listing each folder once (no stat per image: COCO's 118k names cost one listing)."""
        root = os.path.realpath(self.img_dir)
        links: dict[str, set[str]] = {}

        def symlinks_in(folder: str) -> set[str]:
            if folder not in links:
                try:
                    with os.scandir(folder) as it:
                        links[folder] = {e.name for e in it if e.is_symlink()}
                except OSError:  # a missing sub-folder: the image is reported missing when it is read
                    links[folder] = set()
            return links[folder]

        st = self.store
        for i in range(st.num_images):
            name = st.file_name(i)
            parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
            why = None
            if os.path.isabs(name) or name.startswith(("/", "\\")) or name[1:3] in (":/", ":\\"):
                why = "is an absolute path"
            elif ".." in parts:
                why = "goes up with '..'"
            else:
                folder = root
                for part in parts:
                    if part in symlinks_in(folder):
                        target = os.path.realpath(os.path.join(root, *parts))
                        if os.path.commonpath([root, target]) != root:
                            why = f"is a symlink to {target}"
                        break
                    folder = os.path.join(folder, part)
            if why is not None:
                raise DataError(
                    f"{self.ann_file}: image id {int(st.image_ids[i])}: file_name '{name}' {why}, outside the image "
                    f"folder {self.img_dir}; file names must be relative paths inside it (DenseDet reads no file "
                    f"outside it)"
                )

    def _empty_training_set_message(self) -> str:
        st = self.store
        num_images = st.num_images
        no_ann = int((st.ann_counts == 0).sum())
        only_crowd = int(((st.ann_counts > 0) & (st.noncrowd_counts == 0)).sum())
        invalid = num_images - no_ann - only_crowd
        reasons = [f"{no_ann} without annotations", f"{only_crowd} with only crowd (iscrowd=1) boxes",
                   f"{invalid} whose boxes are all invalid (degenerate, outside the image"
                   + (", or of classes not selected)" if len(self.cat_ids) < len(self._all_cat_ids) else ")")]
        masks = {k.removeprefix("mask: "): v for k, v in st.skipped.items() if k.startswith("mask: ") and v}
        if st.with_mask and masks:  # a mask model on box-only data (VOC XML, YOLO boxes, COCO without masks)
            return (f"{self.ann_file}: the training set is empty: a mask model (with_mask) needs an instance mask "
                    f"per annotation, and {sum(masks.values())} annotations were skipped for their masks "
                    f"({', '.join(f'{v} {k}' for k, v in masks.items())}). Box annotations (Pascal VOC, YOLO "
                    f"boxes) have no masks: train a box detector config (`densedet configs`) on them")
        return (f"{self.ann_file}: the training set is empty after filtering: all {num_images} images were dropped "
                f"({', '.join(reasons)}). Fix the annotations, or set data.train.filter_empty_gt: false to train "
                f"on images without boxes")

    # ----------------------------------------------------------------------------------------------- access
    @property
    def coco_gt_dict(self) -> dict:
        """The COCO ground truth the evaluator scores against, rebuilt from the store on each access (not kept):
        every image of the file (also those filtered out for training), the annotations the loader kept (crowd
        included, boxes clipped as for training), with segmentations when the dataset loads masks."""
        return self.store.coco_dict()

    def segm_gt_dict(self) -> dict:
        """The ground truth with segmentations for ``segm`` evaluation: :attr:`coco_gt_dict` when the dataset loads
        masks; else the file is read again with every segmentation validated as a ``with_mask`` dataset would
        (same rules, same counted warnings), and nothing of it is kept."""
        if self.store.with_mask:
            return self.store.coco_dict()
        return self._load_store(True, warn_boxes=False).coco_dict()  # the box warnings came at load

    @property
    def has_annotations(self) -> bool:
        """Whether the annotation file has an ``annotations`` key (COCO's ``image_info_test-dev2017.json`` has none:
        results can only be formatted for the evaluation server, not evaluated)."""
        return self.store.has_annotations

    def __len__(self) -> int:
        return len(self._items)

    def _item_annotations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Store positions of item ``i``'s training boxes and of its ignore (crowd) boxes, json order."""
        st = self.store
        sl = st.ann_range(int(self._items[i]))
        pos = np.arange(sl.start, sl.stop)
        selected = self._labels[sl] >= 0
        crowd = (st.flags[sl] & FLAG_CROWD) != 0
        return pos[selected & ~crowd], pos[selected & crowd]

    def _boxes_of(self, i: int) -> dict[str, np.ndarray]:
        train, crowd = self._item_annotations(i)
        st = self.store
        return {"boxes": st.boxes[train].reshape(-1, 4), "labels": self._labels[train],
                "ignore_boxes": st.boxes[crowd].reshape(-1, 4)}

    def get_ann_info(self, i: int) -> dict[str, np.ndarray]:
        """Annotations of item ``i`` in original image pixels: ``boxes`` float32 (n, 4) xyxy, ``labels`` int64 (n,),
        ``ignore_boxes`` float32 (k, 4) xyxy, ``ann_ids`` int64 (n,), with masks ``segms`` (n,) object array of
        COCO segmentations (new arrays)."""
        train, crowd = self._item_annotations(i)
        st = self.store
        out = {"boxes": st.boxes[train].reshape(-1, 4), "labels": self._labels[train],
               "ignore_boxes": st.boxes[crowd].reshape(-1, 4), "ann_ids": st.ann_ids[train]}
        if st.masks is not None:  # the COCO segmentations (polygons, or RLE compressed), one per box
            j = int(self._items[i])
            out["segms"] = np.empty(len(train), dtype=object)
            out["segms"][:] = [st.masks.segmentation(m, int(st.heights[j]), int(st.widths[j])) for m in train.tolist()]
        return out

    def masks_of(self, i: int, height: int, width: int) -> InstanceMasks:
        """Item ``i``'s masks, aligned with its boxes, for its decoded image of ``height x width``."""
        st = self.store
        if st.masks is None:
            raise RuntimeError("masks_of: this dataset was loaded without masks (with_mask=False)")
        train, _ = self._item_annotations(i)
        j = int(self._items[i])
        jh, jw = int(st.heights[j]), int(st.widths[j])
        items = []
        for m in train.tolist():
            try:
                items.append(st.masks.decode(m, jh, jw, height, width))
            except MaskFormatError as e:
                raise DataError(f"{self.ann_file}: annotation id {int(st.ann_ids[m])} (image id "
                                f"{int(st.image_ids[j])}): {e}") from e
        return InstanceMasks(items, height, width)

    def load_image(self, i: int) -> np.ndarray:
        """Decode item ``i``'s image: ``(H, W, 3)`` uint8 RGB, EXIF orientation applied, 16-bit scaled to 8 bits.

        An image whose real size differs from the json's (stale sizes are common in COCO files) is used at its real
        size with a counted :class:`DataWarning`, unless its boxes fall outside the real image (a :class:`DataError`).
        """
        info = self.img_infos[i]
        path = self.img_dir / info["file_name"]
        img = decode_image(path, f"image id {info['id']} in {self.ann_file}")
        h, w = img.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            self._stale_size(i, path, w, h)
        return img

    def _stale_size(self, i: int, path: Path, w: int, h: int) -> None:
        info, ann = self.img_infos[i], self._boxes_of(i)
        boxes = np.concatenate([ann["boxes"], ann["ignore_boxes"]]).reshape(-1, 4)
        tol = 1e-3
        if len(boxes) and ((boxes[:, 2] > w + tol).any() or (boxes[:, 3] > h + tol).any()):
            raise DataError(
                f"image {path} (image id {info['id']}) is {w}x{h} (w x h) after EXIF orientation, but {self.ann_file} "
                f"says {info['width']}x{info['height']} and its boxes reach x={boxes[:, 2].max():g}, "
                f"y={boxes[:, 3].max():g}, outside the real image"
            )
        self.stale_size_count = getattr(self, "stale_size_count", 0) + 1
        n = self.stale_size_count
        if n & (n - 1) == 0:  # warn at the 1st, 2nd, 4th, 8th ... such image (per process): counted, not a flood
            warnings.warn(
                f"image {path} (image id {info['id']}) is {w}x{h} (w x h), but {self.ann_file} says "
                f"{info['width']}x{info['height']}; using the real size ({n} image{'s' if n > 1 else ''} with a stale "
                f"size in the json so far)",
                DataWarning,
                stacklevel=3,
            )

    def __getitem__(self, key: int | tuple[int, Any]) -> dict[str, Any]:
        if isinstance(key, tuple):
            i, entropy = key
            rng = np.random.default_rng(entropy)
        else:
            i, rng = key, None
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        info = self.img_infos[i]
        img = self.load_image(i)
        ann = self._boxes_of(i)
        h, w = img.shape[:2]
        sample = {
            "img": img,
            "boxes": ann["boxes"],
            "labels": ann["labels"],
            "ignore_boxes": ann["ignore_boxes"],
            "meta": {
                "image_id": info["id"],
                "file_name": info["file_name"],
                "ori_shape": (h, w),
                "img_shape": (h, w),
                "scale_factor": (1.0, 1.0),
                "flip": False,
            },
        }
        if self.with_mask:
            sample["masks"] = self.masks_of(i, h, w)
        sample = self.pipeline(sample, rng=rng)
        if "views" in sample:  # MultiScaleFlipAug (test-time augmentation): one tensor sample per view
            return {"views": [_to_tensors(v) for v in sample["views"]]}
        return _to_tensors(sample)

    def __repr__(self) -> str:
        return (
            f"CocoDataset({self.ann_file}, {len(self)} images, {len(self.classes)} classes, "
            f"test_mode={self.test_mode})"
        )


def _to_tensors(sample: dict[str, Any]) -> dict[str, Any]:
    img = sample["img"]
    if isinstance(img, np.ndarray):  # (H, W, 3) pixels -> (3, H, W), dtype kept (uint8): the model normalises
        img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    meta = sample["meta"]
    meta["img_shape"] = tuple(int(v) for v in meta["img_shape"])
    meta["scale_factor"] = tuple(float(v) for v in meta["scale_factor"])
    meta["flip"] = bool(meta["flip"])
    out = {
        "img": img,
        "boxes": torch.as_tensor(np.asarray(sample["boxes"], dtype=np.float32)).reshape(-1, 4),
        "labels": torch.as_tensor(np.asarray(sample["labels"], dtype=np.int64)),
        "ignore_boxes": torch.as_tensor(np.asarray(sample["ignore_boxes"], dtype=np.float32)).reshape(-1, 4),
        "meta": meta,
    }
    if "masks" in sample:  # densedet.structures.masks.InstanceMasks, one per box
        out["masks"] = sample["masks"]
    return out
