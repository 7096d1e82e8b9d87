"""Test-time augmentation for dense detectors: merge the detections of several views of each image.

MMDetection 2.x semantics (``mmdet/models/dense_heads/dense_test_mixins.py`` ``aug_test_bboxes`` and
``merge_aug_bboxes``, ``mmdet/core/post_processing/merge_augs.py`` ``bbox_mapping_back``; VarifocalNet's fork runs
VFNet through the same path): every view gives its pre-NMS candidates (boxes, scores with score factors applied,
labels) in its own resized / flipped frame; boxes are mapped back to the original image (un-flip in the resized
frame, ``x' = w - x``, then divide by the view's ``scale_factor``); the views' candidates are *concatenated*
(scores are not averaged), and one class-wise NMS (or soft-NMS) with the head's ``test_cfg`` keeps
``max_per_img`` boxes. A single view is plain :meth:`predict` (mmdet's ``simple_test``), bit for bit.

Here every view is a whole batch: ``images[v]`` is (B, 3, H_v, W_v) and ``metas[v][i]`` describes image ``i`` in
view ``v``, so the views' candidates are (B, K_v) tensors that concatenate along K and one batched NMS serves the
batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from densedet.models.heads.postprocess import Candidates, multiclass_nms_batched

__all__ = ["aug_predict", "bbox_mapping_back"]


def bbox_mapping_back(boxes: Tensor, metas: list[dict[str, Any]]) -> Tensor:
    """Map (B, K, 4) xyxy boxes of one view back to the original images.

    Per image ``i``: when ``metas[i]["flip"]``, un-flip in the resized frame of size ``img_shape`` (h, w)
    (``flip_direction`` 'horizontal': ``x1' = w - x2, x2' = w - x1``; 'vertical' likewise with ``h``), then divide
    by ``scale_factor`` (w_scale, h_scale). Inverse of Resize followed by RandomFlip.
    """
    dev, dt = boxes.device, boxes.dtype
    flip = [bool(m.get("flip", False)) for m in metas]
    direction = [m.get("flip_direction") or "horizontal" for m in metas]
    bad = {d for f, d in zip(flip, direction) if f and d not in ("horizontal", "vertical")}
    if bad:
        raise ValueError(f"bbox_mapping_back: flip_direction {sorted(bad)} is not supported (horizontal, vertical)")
    hflip = torch.tensor([f and d == "horizontal" for f, d in zip(flip, direction)], device=dev)[:, None]
    vflip = torch.tensor([f and d == "vertical" for f, d in zip(flip, direction)], device=dev)[:, None]
    shapes = torch.tensor([m["img_shape"][:2] for m in metas], device=dev, dtype=dt)  # (B, 2) h, w
    h, w = shapes[:, 0:1], shapes[:, 1:2]
    x1, y1, x2, y2 = boxes.unbind(-1)
    x1, x2 = torch.where(hflip, w - x2, x1), torch.where(hflip, w - x1, x2)
    y1, y2 = torch.where(vflip, h - y2, y1), torch.where(vflip, h - y1, y2)
    scale = torch.tensor([m["scale_factor"][:2] for m in metas], device=dev, dtype=dt)  # (B, 2) w, h
    return torch.stack([x1, y1, x2, y2], -1) / scale.repeat(1, 2)[:, None, :]


def _check_views(images: list[Tensor], metas: list[list[dict[str, Any]]]) -> None:
    if not images or len(images) != len(metas):
        raise ValueError(f"aug_predict: got {len(images)} view batches and {len(metas)} meta lists "
                         f"(one of each per view, at least one)")
    sizes = [(int(im.shape[0]), len(m)) for im, m in zip(images, metas)]
    if any(s != (sizes[0][0], sizes[0][0]) for s in sizes):
        raise ValueError(f"aug_predict: every view must hold the same images, got (batch, metas) sizes {sizes}")


@torch.no_grad()
def aug_predict(detector: nn.Module, images: list[Tensor],
                metas: list[list[dict[str, Any]]]) -> list[dict[str, Tensor]]:
    """Detections of a batch under test-time augmentation.

    Args:
        detector: a :class:`~densedet.models.detector.SingleStageDetector` (``extract_feat``, ``bbox_head``).
        images: per view, (B, 3, H_v, W_v) normalised padded images (the same B images in every view).
        metas: per view, per image, the metas of that view (``img_shape``, ``scale_factor``, ``flip``,
            ``flip_direction``).

    Returns:
        per image ``{"boxes": (D, 4) xyxy original-image pixels, "scores": (D,), "labels": (D,)}``,
        D <= ``test_cfg.max_per_img``, by decreasing score.
    """
    _check_views(images, metas)
    if len(images) == 1:
        return detector(images[0], None, metas[0], mode="predict")
    head = detector.bbox_head
    parts = []
    for view_images, view_metas in zip(images, metas):  # views differ in size: one forward each
        cand = head.predict_candidates(detector._head_outputs(view_images), view_metas)
        parts.append(cand._replace(boxes=bbox_mapping_back(cand.boxes, view_metas)))
    return multiclass_nms_batched(*Candidates.cat(parts), head.num_classes, head.test_cfg)
