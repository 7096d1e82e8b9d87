"""COCO-format detection dataset (boxes only), with annotation checks at load time.

Semantics follow MMDetection 2.x ``CocoDataset`` (``mmdet/datasets/coco.py``): ``iscrowd`` boxes become ignore
regions, labels are contiguous ``0..C-1`` in category order, images without boxes are dropped for training.
Where it differs (on purpose): a box partly outside its image is clipped at load time, boxes are dropped only when
narrower than ``min_box_size`` (1e-3 px; mmdet drops < 1 px), and every dropped or fixed annotation is counted and
reported in one warning per kind instead of being skipped silently.
"""

from __future__ import annotations

import json
import operator
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densedet.data.image_io import decode_image
from densedet.data.mask_loading import attach_segmentations, ids_text, sample_masks
from densedet.data.transforms import Compose, build_pipeline
from densedet.errors import DataError, DataWarning

__all__ = ["CocoDataset", "DataError", "DataWarning", "load_coco_json"]


_REQUIRED_KEYS = ("images", "annotations", "categories")

# kind -> text used in the warning "skipped N annotations with <text> in FILE (ids ...)"
_KIND_TEXT = {
    "degenerate": ("skipped", "non-positive width/height (or smaller than the minimum box size)"),
    "outside": ("skipped", "boxes entirely outside their image"),
    "clipped": ("clipped", "boxes partly outside their image (clipped to the image)"),
}


def load_coco_json(ann_file: str | Path, require_annotations: bool = True) -> dict:
    """Read a COCO json file; :class:`DataError` naming the file if it is missing, empty, invalid or incomplete."""
    path = Path(ann_file)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read annotation file {path}: {e}") from e
    if not text.strip():
        raise DataError(f"annotation file {path} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"annotation file {path} is not valid JSON (truncated or corrupt?): {e.msg} at line {e.lineno}, "
            f"column {e.colno}"
        ) from e
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


class CocoDataset(torch.utils.data.Dataset):
    """COCO-format detection dataset.

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
            Off: the loader does exactly what it does without mask support.

    Item ``i`` is a dict: ``img`` float32 ``(3, H, W)`` tensor; ``boxes`` float32 ``(n, 4)`` xyxy pixels of the
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
    ) -> None:
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.test_mode = test_mode
        self.filter_empty_gt = filter_empty_gt
        self.min_box_size = float(min_box_size)
        self._coco = load_coco_json(self.ann_file, require_annotations=not test_mode)
        if not self.img_dir.is_dir():
            raise DataError(f"image folder not found: {self.img_dir} (images of {self.ann_file})")
        self._load_categories(classes)
        images = self._load_images()
        per_image = self._load_annotations(images)
        self.with_mask = bool(with_mask)
        if self.with_mask:
            per_image = attach_segmentations(self, images, per_image)
        keep = [
            i
            for i in range(len(images))
            if test_mode or not filter_empty_gt or len(per_image[i]["labels"]) > 0
        ]
        if not keep and not test_mode:
            raise DataError(self._empty_training_set_message(len(images), per_image))
        self.img_infos: list[dict[str, Any]] = [images[i] for i in keep]
        self._anns: list[dict[str, np.ndarray]] = [per_image[i] for i in keep]
        self.aspect_flags = np.array([info["width"] / info["height"] > 1 for info in self.img_infos], dtype=np.uint8)
        self.pipeline: Compose = build_pipeline(pipeline, where=f"pipeline of {self.ann_file.name}")

    # ----------------------------------------------------------------------------------------------- loading
    def _load_categories(self, classes: list[str] | None) -> None:
        cats = self._coco["categories"]
        names: dict[int, str] = {}
        for j, cat in enumerate(cats):
            if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
                raise DataError(f"{self.ann_file}: categories[{j}] needs an 'id' and a 'name', got {cat!r}")
            if not isinstance(cat["id"], int) or isinstance(cat["id"], bool):
                raise DataError(f"{self.ann_file}: categories[{j}] has a non-integer id {cat['id']!r}")
            if cat["id"] in names:
                raise DataError(f"{self.ann_file}: category id {cat['id']} appears twice")
            names[int(cat["id"])] = str(cat["name"])
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

    def _load_images(self) -> list[dict[str, Any]]:
        images = []
        seen: set[int] = set()
        for j, img in enumerate(self._coco["images"]):
            ok = isinstance(img, dict) and all(k in img for k in ("id", "file_name", "width", "height"))
            if not ok:
                raise DataError(
                    f"{self.ann_file}: images[{j}] needs 'id', 'file_name', 'width' and 'height', got {img!r}"
                )
            if not isinstance(img["id"], int) or isinstance(img["id"], bool):
                raise DataError(f"{self.ann_file}: images[{j}] has a non-integer id {img['id']!r}")
            if img["id"] in seen:
                raise DataError(f"{self.ann_file}: image id {img['id']} appears twice")
            seen.add(img["id"])
            w, h = img["width"], img["height"]
            if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
                raise DataError(
                    f"{self.ann_file}: image id {img['id']} ({img['file_name']}) has invalid size {w!r} x {h!r}"
                )
            images.append({"id": int(img["id"]), "file_name": str(img["file_name"]), "width": w, "height": h})
        self._check_inside_img_dir(images)
        return images

    def _check_inside_img_dir(self, images: list[dict[str, Any]]) -> None:
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

        for info in images:
            name = info["file_name"]
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
                    f"{self.ann_file}: image id {info['id']}: file_name '{name}' {why}, outside the image folder "
                    f"{self.img_dir}; file names must be relative paths inside it (DenseDet reads no file outside "
                    f"it)"
                )

    def _bad_annotation(self, anns: list, index_of: dict[int, int]) -> DataError:
        """Find the first malformed annotation (slow path, only after the fast parse failed)."""
        for j, a in enumerate(anns):
            if not isinstance(a, dict):
                return DataError(f"{self.ann_file}: annotations[{j}] is not an object: {a!r}")
            missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in a]
            if missing:
                return DataError(f"{self.ann_file}: annotation id {a.get('id', f'#{j}')} lacks {missing}")
            where = f"{self.ann_file}: annotation id {a['id']} (image id {a['image_id']})"
            if a["image_id"] not in index_of:
                return DataError(f"{where}: image id {a['image_id']} is not in 'images'")
            bbox = a["bbox"]
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
                return DataError(f"{where}: bbox must be [x, y, w, h], got {bbox!r}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
                return DataError(f"{where}: bbox must hold 4 numbers, got {bbox!r}")
        return DataError(f"{self.ann_file}: malformed annotations")

    def _load_annotations(self, images: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        anns = self._coco.get("annotations", [])
        index_of = {info["id"]: i for i, info in enumerate(images)}
        n = len(anns)
        # Fast columnar parse; any surprise falls back to a scan that names the offending annotation.
        try:
            ann_ids = np.array([a["id"] for a in anns], dtype=np.int64).reshape(n)
            img_idx = np.array([index_of[a["image_id"]] for a in anns], dtype=np.int64).reshape(n)
            cat_ids = np.array([a["category_id"] for a in anns], dtype=np.int64).reshape(n)
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool).reshape(n)
            xywh = np.array([a["bbox"] for a in anns])
            if xywh.dtype.kind not in "iuf":  # strings, None, bools: numpy would convert or keep them as objects
                raise TypeError("non-numeric bbox")
            xywh = xywh.astype(np.float64).reshape(n, 4)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise self._bad_annotation(anns, index_of) from e

        def where(k: int) -> str:
            return f"{self.ann_file}: annotation id {ann_ids[k]} (image id {images[img_idx[k]]['id']})"

        unknown = ~np.isin(cat_ids, np.array(sorted(self._all_cat_ids), dtype=np.int64))
        if unknown.any():
            k = int(np.flatnonzero(unknown)[0])
            raise DataError(
                f"{where(k)}: unknown category id {cat_ids[k]}; known category ids: {sorted(self._all_cat_ids)}"
            )
        nonfinite = ~np.isfinite(xywh).all(axis=1)
        if nonfinite.any():
            k = int(np.flatnonzero(nonfinite)[0])
            raise DataError(f"{where(k)}: bbox has NaN or inf values: {anns[k]['bbox']}")

        widths = np.array([info["width"] for info in images], dtype=np.float64)[img_idx]
        heights = np.array([info["height"] for info in images], dtype=np.float64)[img_idx]
        x1, y1 = xywh[:, 0], xywh[:, 1]
        x2, y2 = x1 + xywh[:, 2], y1 + xywh[:, 3]
        cx1, cy1 = x1.clip(0, None), y1.clip(0, None)
        cx2, cy2 = np.minimum(x2, widths), np.minimum(y2, heights)
        m = self.min_box_size
        degenerate = (xywh[:, 2] < m) | (xywh[:, 3] < m)
        outside = ~degenerate & ((cx2 - cx1 < m) | (cy2 - cy1 < m))
        eps = 1e-3  # float noise in the json (x + w = 640.0000001) is not worth a warning
        clipped = ~degenerate & ~outside & ((x1 < -eps) | (y1 < -eps) | (x2 > widths + eps) | (y2 > heights + eps))
        self.skipped_counts: dict[str, int] = {}
        for kind, mask in (("degenerate", degenerate), ("outside", outside), ("clipped", clipped)):
            count = int(mask.sum())
            self.skipped_counts[kind] = count
            if count:
                verb, text = _KIND_TEXT[kind]
                warnings.warn(
                    f"{verb} {count} annotation{'s' if count > 1 else ''} with {text} in {self.ann_file} "
                    f"(ids {ids_text(ann_ids[mask])})",
                    DataWarning,
                    stacklevel=3,
                )

        selected = np.isin(cat_ids, np.array(self.cat_ids, dtype=np.int64))
        self.skipped_counts["unselected_category"] = int((~selected & ~degenerate & ~outside).sum())
        valid = selected & ~degenerate & ~outside
        boxes = np.stack([cx1, cy1, cx2, cy2], axis=1).astype(np.float32)
        # cat id -> label by binary search over the selected ids (ids can be large and sparse).
        sel_ids = np.array(sorted(self.cat2label), dtype=np.int64)
        sel_labels = np.array([self.cat2label[c] for c in sel_ids.tolist()], dtype=np.int64)
        pos = np.searchsorted(sel_ids, cat_ids).clip(0, max(len(sel_ids) - 1, 0))
        labels = np.where(selected, sel_labels[pos] if len(sel_ids) else -1, -1)

        # Per image, for the reasons an image drops out of a training set (see _empty_training_set_message).
        self._ann_counts = np.bincount(img_idx, minlength=len(images))
        self._noncrowd_counts = np.bincount(img_idx[~crowd], minlength=len(images))

        # Group the valid annotations by image in one sort (stable: keeps the json order within an image).
        per_image: list[dict[str, np.ndarray]] = []
        order = np.flatnonzero(valid)
        order = order[np.argsort(img_idx[order], kind="stable")]
        bounds = np.searchsorted(img_idx[order], np.arange(len(images) + 1))
        for i in range(len(images)):
            sel = order[bounds[i] : bounds[i + 1]]
            is_crowd = crowd[sel]
            per_image.append(
                {
                    "boxes": boxes[sel[~is_crowd]].reshape(-1, 4),
                    "labels": labels[sel[~is_crowd]],
                    "ignore_boxes": boxes[sel[is_crowd]].reshape(-1, 4),
                    "ann_ids": ann_ids[sel[~is_crowd]],
                }
            )
        return per_image

    def _empty_training_set_message(self, num_images: int, per_image: list[dict[str, np.ndarray]]) -> str:
        no_ann = int((self._ann_counts == 0).sum())
        only_crowd = int(((self._ann_counts > 0) & (self._noncrowd_counts == 0)).sum())
        invalid = num_images - no_ann - only_crowd
        reasons = [f"{no_ann} without annotations", f"{only_crowd} with only crowd (iscrowd=1) boxes",
                   f"{invalid} whose boxes are all invalid (degenerate, outside the image"
                   + (", or of classes not selected)" if len(self.cat_ids) < len(self._all_cat_ids) else ")")]
        return (f"{self.ann_file}: the training set is empty after filtering: all {num_images} images were dropped "
                f"({', '.join(reasons)}). Fix the annotations, or set data.train.filter_empty_gt: false to train "
                f"on images without boxes")

    # ----------------------------------------------------------------------------------------------- access
    @property
    def coco_gt_dict(self) -> dict:
        """The loaded annotation json (all images, also those filtered out for training)."""
        return self._coco

    @property
    def has_annotations(self) -> bool:
        """Whether the annotation file has an ``annotations`` key (COCO's ``image_info_test-dev2017.json`` has none:
        results can only be formatted for the evaluation server, not evaluated)."""
        return "annotations" in self._coco

    def __len__(self) -> int:
        return len(self.img_infos)

    def get_ann_info(self, i: int) -> dict[str, np.ndarray]:
        """Annotations of item ``i`` in original image pixels: ``boxes`` float32 (n, 4) xyxy, ``labels`` int64 (n,),
        ``ignore_boxes`` float32 (k, 4) xyxy, ``ann_ids`` int64 (n,)."""
        return {k: v.copy() for k, v in self._anns[i].items()}

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
        info, ann = self.img_infos[i], self._anns[i]
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
        ann = self._anns[i]
        h, w = img.shape[:2]
        sample = {
            "img": img,
            "boxes": ann["boxes"].copy(),
            "labels": ann["labels"].copy(),
            "ignore_boxes": ann["ignore_boxes"].copy(),
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
            sample["masks"] = sample_masks(self, i, h, w)
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
