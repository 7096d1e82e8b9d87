"""Instance-mask loading for :class:`~densedet.data.coco.CocoDataset` (``with_mask=True``).

Kept apart from the box loader so that a dataset without masks runs exactly the code it ran before. At load time
every non-crowd annotation's ``segmentation`` is checked cheaply (:func:`~densedet.structures.masks.check_segmentation`)
and kept as the json object (no decoding, so no memory beyond the json itself); it is decoded per item into an
:class:`~densedet.structures.masks.InstanceMasks` when the image is read.

An annotation whose segmentation is missing, an empty or odd-length polygon, NaN coordinates or an RLE of the
wrong size is skipped with its box (Mask R-CNN needs a mask for every box), counted, and reported in one
:class:`~densedet.data.coco.DataWarning` per kind naming the annotation ids. A compressed RLE string that turns out
to be corrupt when its image is read raises :class:`~densedet.data.coco.DataError` naming the annotation id.

Crowd annotations stay ignore boxes, as in MMDetection 2.x (``gt_bboxes_ignore``; their masks are not trained on);
COCO evaluation reads crowd masks from the ground-truth json itself.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from densedet.errors import DataError, DataWarning
from densedet.structures.masks import InstanceMasks, MaskFormatError, check_segmentation, decode_segmentation

__all__ = ["attach_segmentations", "sample_masks"]


def ids_text(ids: Any, limit: int = 5) -> str:
    """The first ``limit`` annotation ids, for a warning."""
    shown = ", ".join(str(int(i)) for i in ids[:limit])
    return shown + (", ..." if len(ids) > limit else "")


def attach_segmentations(dataset: Any, images: list[dict[str, Any]],
                         per_image: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Add ``segms`` (object array of COCO segmentations, one per box) to each image's annotation arrays, dropping
    (with counted warnings) the annotations whose segmentation is unusable. Sets ``dataset.skipped_counts``."""
    by_id: dict[int, dict] = {}
    for a in dataset._coco.get("annotations", []):
        if a["id"] in by_id:
            raise DataError(f"{dataset.ann_file}: annotation id {a['id']} appears twice (masks are looked up by id)")
        by_id[a["id"]] = a
    bad: dict[str, list[int]] = {}
    first_reason: dict[str, str] = {}
    out = []
    for info, ann in zip(images, per_image):
        h, w = int(info["height"]), int(info["width"])
        segms = np.empty(len(ann["ann_ids"]), dtype=object)
        keep = np.ones(len(ann["ann_ids"]), dtype=bool)
        for k, ann_id in enumerate(ann["ann_ids"].tolist()):
            segm = by_id[ann_id].get("segmentation")
            try:
                if segm is None:
                    raise MaskFormatError("no 'segmentation'", "no segmentation")
                check_segmentation(segm, h, w)
            except MaskFormatError as e:
                keep[k] = False
                bad.setdefault(e.kind, []).append(ann_id)
                first_reason.setdefault(e.kind, f"annotation id {ann_id}: {e}")
                continue
            segms[k] = segm
        item = {key: value[keep] for key, value in ann.items() if key != "ignore_boxes"}
        item["ignore_boxes"] = ann["ignore_boxes"]
        item["segms"] = segms[keep]
        out.append(item)
    for kind, ids in bad.items():
        dataset.skipped_counts[f"mask: {kind}"] = len(ids)
        warnings.warn(f"skipped {len(ids)} annotation{'s' if len(ids) > 1 else ''} with {kind} in "
                      f"{dataset.ann_file} (ids {ids_text(ids)}; first: {first_reason[kind]})", DataWarning,
                      stacklevel=3)
    return out


def sample_masks(dataset: Any, i: int, height: int, width: int) -> InstanceMasks:
    """Decode item ``i``'s segmentations (aligned with its boxes) for an image of ``height x width``."""
    ann = dataset._anns[i]
    items = []
    for segm, ann_id in zip(ann["segms"], ann["ann_ids"].tolist()):
        try:
            items.append(decode_segmentation(segm, height, width))
        except MaskFormatError as e:
            info = dataset.img_infos[i]
            raise DataError(f"{dataset.ann_file}: annotation id {ann_id} (image id {info['id']}): {e}") from e
    return InstanceMasks(items, height, width)
