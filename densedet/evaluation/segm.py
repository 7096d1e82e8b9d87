"""COCO ``segm`` results entries from instance masks encoded as RLE (:mod:`densedet.structures.rle`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from densedet.structures.rle import crop_rle_counts, encode_crop_rle, encode_instance_masks

__all__ = ["crop_rle_counts", "detections_to_segm_results", "encode_crop_rle", "encode_instance_masks"]


def detections_to_segm_results(dets: Sequence[dict], image_ids: Sequence[int],
                               label2cat: dict[int, int]) -> list[dict]:
    """COCO ``segm`` results: ``{"image_id", "category_id", "segmentation": RLE, "score"}`` per detection.

    Args:
        dets: per image ``segms`` (list of RLE dicts, e.g. from :func:`encode_instance_masks`), ``scores`` and
            ``labels`` (contiguous class indices).
    """
    results: list[dict] = []
    for det, image_id in zip(dets, image_ids):
        segms = det.get("segms")
        if segms is None:
            raise ValueError(f"detections_to_segm_results: image {image_id} has no 'segms' (not a mask model?)")
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(det["labels"], dtype=np.int64).reshape(-1)
        if not (len(segms) == len(scores) == len(labels)):
            raise ValueError(f"detections_to_segm_results: image {image_id}: {len(segms)} masks, {len(scores)} "
                             f"scores and {len(labels)} labels differ in length")
        for segm, score, label in zip(segms, scores.tolist(), labels.tolist()):
            if label not in label2cat:
                raise ValueError(f"detections_to_segm_results: image {image_id}: label {label} has no category")
            results.append({"image_id": int(image_id), "category_id": int(label2cat[label]), "segmentation": segm,
                            "score": float(score)})
    return results
