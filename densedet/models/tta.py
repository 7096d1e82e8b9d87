"""Test-time augmentation: merge the detections of several views (scales, flips) of each image.

Every view is a whole batch: ``images[v]`` is (B, 3, H_v, W_v) pixels and ``metas[v][i]`` describes image ``i`` in
view ``v`` (``img_shape``, ``scale_factor``, ``flip``, ``flip_direction``). A single view is plain ``predict``
(mmdet's ``simple_test``), bit for bit. The detector is passed in (duck-typed: ``data_preprocessor``,
``run_network``, ``candidates`` / ``rpn_head`` / ``roi_head``), so this module sits below the detectors.

Dense detectors, MMDetection 2.x ``aug_test_bboxes`` / ``merge_aug_bboxes`` of
``mmdet/models/dense_heads/dense_test_mixins.py`` (VarifocalNet's fork runs VFNet through it): each view's pre-NMS
candidates (score factors applied) are mapped back to the original image (:func:`bbox_mapping_back`) and
*concatenated* (scores are not averaged); one class-wise NMS (or soft-NMS) with the head's ``test_cfg`` keeps
``max_per_img``.

Two-stage detectors, MMDetection 2.x ``TwoStageDetector.aug_test`` (``mmdet/models/detectors/two_stage.py``):

1. proposals (``RPNTestMixin.aug_test_rpn`` + ``merge_aug_proposals``, ``mmdet/core/post_processing/merge_augs.py``):
   each view's proposals mapped back to the original image and concatenated, one class-agnostic NMS at the RPN
   test ``nms.iou_threshold``, the ``max_per_img`` best kept;
2. boxes (``BBoxTestMixin.aug_test_bboxes`` + ``merge_aug_bboxes``): the merged proposals mapped into every view
   (:func:`bbox_mapping`: scale, then flip), the box head's class-specific boxes mapped back and *averaged* over the
   views, the softmax scores averaged, then ``multiclass_nms`` (``score_thr``, NMS, ``max_per_img``);
3. masks (``MaskTestMixin.aug_test_mask`` + ``merge_aug_masks``): the kept boxes mapped into every view, each
   view's 28x28 mask probabilities (flipped back for flipped views) averaged, then pasted into the original image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from densedet.models.heads.postprocess import Candidates, multiclass_nms_batched, parse_test_cfg
from densedet.models.roi_heads.mask_head import paste_masks_in_boxes
from densedet.models.roi_heads.standard_roi_head import pad_proposals
from densedet.structures.masks import InstanceMasks

__all__ = ["aug_predict_dense", "aug_predict_two_stage", "bbox_mapping", "bbox_mapping_back"]


def _flips(metas: list[dict[str, Any]], device: torch.device) -> tuple[Tensor, Tensor]:
    flip = [bool(m.get("flip", False)) for m in metas]
    direction = [m.get("flip_direction") or "horizontal" for m in metas]
    bad = {d for f, d in zip(flip, direction) if f and d not in ("horizontal", "vertical")}
    if bad:
        raise ValueError(f"test-time augmentation: flip_direction {sorted(bad)} is not supported (horizontal, "
                         f"vertical)")
    hflip = torch.tensor([f and d == "horizontal" for f, d in zip(flip, direction)], device=device)
    vflip = torch.tensor([f and d == "vertical" for f, d in zip(flip, direction)], device=device)
    return hflip, vflip


def _flip_boxes(boxes: Tensor, metas: list[dict[str, Any]]) -> Tensor:
    """Flip (B, ..., 4) xyxy boxes of the images whose meta says ``flip`` in their resized frame ``img_shape``
    (horizontal: ``x1' = w - x2, x2' = w - x1``; vertical likewise with ``h``; mmdet 2.x ``bbox_flip``)."""
    hflip, vflip = _flips(metas, boxes.device)
    view = (-1,) + (1,) * (boxes.dim() - 2)
    hflip, vflip = hflip.view(view), vflip.view(view)
    shapes = torch.tensor([m["img_shape"][:2] for m in metas], device=boxes.device, dtype=boxes.dtype)
    h, w = shapes[:, 0].view(view), shapes[:, 1].view(view)
    x1, y1, x2, y2 = boxes.unbind(-1)
    x1, x2 = torch.where(hflip, w - x2, x1), torch.where(hflip, w - x1, x2)
    y1, y2 = torch.where(vflip, h - y2, y1), torch.where(vflip, h - y1, y2)
    return torch.stack([x1, y1, x2, y2], -1)


def _scales(metas: list[dict[str, Any]], boxes: Tensor) -> Tensor:
    """(B, 1, ..., 4) ``(w, h, w, h)`` scale factors broadcasting over ``boxes`` (B, ..., 4)."""
    scale = torch.tensor([m["scale_factor"][:2] for m in metas], device=boxes.device, dtype=boxes.dtype)
    return scale.repeat(1, 2).view((-1,) + (1,) * (boxes.dim() - 2) + (4,))


def bbox_mapping_back(boxes: Tensor, metas: list[dict[str, Any]]) -> Tensor:
    """Map (B, ..., 4) xyxy boxes of one view back to the original images: un-flip in the resized frame, then divide
    by ``scale_factor`` (mmdet 2.x ``bbox_mapping_back``; the inverse of Resize followed by RandomFlip)."""
    return _flip_boxes(boxes, metas) / _scales(metas, boxes)


def bbox_mapping(boxes: Tensor, metas: list[dict[str, Any]]) -> Tensor:
    """Map (B, ..., 4) xyxy boxes of the original images into one view: multiply by ``scale_factor``, then flip in
    the resized frame (mmdet 2.x ``bbox_mapping``)."""
    return _flip_boxes(boxes * _scales(metas, boxes), metas)


def check_views(images: list[Tensor], metas: list[list[dict[str, Any]]]) -> None:
    if not images or len(images) != len(metas):
        raise ValueError(f"test-time augmentation: got {len(images)} view batches and {len(metas)} meta lists "
                         f"(one of each per view, at least one)")
    sizes = [(int(im.shape[0]), len(m)) for im, m in zip(images, metas)]
    if any(s != (sizes[0][0], sizes[0][0]) for s in sizes):
        raise ValueError(f"test-time augmentation: every view must hold the same images, got (batch, metas) sizes "
                         f"{sizes}")


def _outputs(detector: nn.Module, images: Tensor, metas: list[dict[str, Any]]) -> Any:
    return detector.run_network(detector.data_preprocessor(images, metas))


@torch.no_grad()
def aug_predict_dense(detector: nn.Module, images: list[Tensor],
                      metas: list[list[dict[str, Any]]]) -> list[dict[str, Tensor]]:
    """Detections of a batch under test-time augmentation, for a single-stage detector (module docstring).

    Returns per image ``{"boxes": (D, 4) xyxy original-image pixels, "scores": (D,), "labels": (D,)}``,
    D <= ``test_cfg.max_per_img``, by decreasing score.
    """
    check_views(images, metas)
    if len(images) == 1:
        return detector(images[0], None, metas[0], mode="predict")
    parts = []
    for view_images, view_metas in zip(images, metas):  # views differ in size: one forward each
        cand = detector.candidates(_outputs(detector, view_images, view_metas), view_metas)
        parts.append(cand._replace(boxes=bbox_mapping_back(cand.boxes, view_metas)))
    head = detector.dense_head
    return multiclass_nms_batched(*Candidates.cat(parts), head.num_classes, head.test_cfg)


@torch.no_grad()
def aug_predict_two_stage(detector: nn.Module, images: list[Tensor],
                          metas: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Detections (and masks) of a batch under test-time augmentation, for a two-stage detector (module docstring).

    Returns per image ``boxes`` (D, 4) xyxy original-image pixels, ``scores``, ``labels`` and, with a mask head,
    ``masks`` (:class:`~densedet.structures.masks.InstanceMasks` of the original image).
    """
    check_views(images, metas)
    if len(images) == 1:
        return detector(images[0], None, metas[0], mode="predict")
    rpn, roi = detector.rpn_head, detector.roi_head
    feats = []
    proposals: list[list[Tensor]] = [[] for _ in metas[0]]
    for view_images, view_metas in zip(images, metas):
        outs = _outputs(detector, view_images, view_metas)
        feats.append(outs.feats)
        for i, p in enumerate(rpn.proposals(outs.rpn_outs, view_metas)):
            back = bbox_mapping_back(p[None, :, :4], [view_metas[i]])[0]
            proposals[i].append(torch.cat([back, p[:, 4:]], 1))
    # 1. merged proposals: class-agnostic NMS over all views' proposals, the max_per_img best
    merged = [torch.cat(p, 0) for p in proposals]
    boxes, valid = pad_proposals(merged)
    scores = torch.zeros(valid.shape, device=boxes.device)
    for i, p in enumerate(merged):
        scores[i, : len(p)] = p[:, 4]
    rpn_cfg = rpn.test_cfg
    merge_cfg = parse_test_cfg({"nms": {"type": "nms", "iou_threshold": rpn_cfg.nms_kwargs()["iou_threshold"]},
                                "max_per_img": rpn_cfg.max_per_img, "score_thr": -1.0})
    kept = multiclass_nms_batched(boxes, scores, torch.zeros_like(valid, dtype=torch.long), valid, 1, merge_cfg)
    props, props_valid = pad_proposals([k["boxes"] for k in kept])
    # 2. boxes: every view's class-specific boxes mapped back and averaged, softmax scores averaged
    sum_boxes = sum_probs = None
    for view_feats, view_metas in zip(feats, metas):
        shapes = torch.tensor([m["img_shape"][:2] for m in view_metas], device=props.device, dtype=torch.float32)
        vb, vp = roi.box_predictions(view_feats, bbox_mapping(props, view_metas), props_valid, shapes)
        vb = bbox_mapping_back(vb, view_metas)
        sum_boxes = vb if sum_boxes is None else sum_boxes + vb
        sum_probs = vp if sum_probs is None else sum_probs + vp
    assert sum_boxes is not None and sum_probs is not None
    cand = roi.candidates_from(sum_boxes / len(feats), sum_probs / len(feats), props_valid)
    dets = multiclass_nms_batched(*cand, roi.num_classes, roi.nms_cfg, best_only=True)
    if roi.with_mask:
        _merge_masks(roi, feats, dets, metas)
    return dets


def _merge_masks(roi: nn.Module, feats: list[tuple[Tensor, ...]], dets: list[dict[str, Any]],
                 metas: list[list[dict[str, Any]]]) -> None:
    """Masks of the merged detections (original-image boxes): average of the views' 28x28 probabilities, each view's
    flipped back first, pasted into the original image (``ori_shape``)."""
    boxes, valid = pad_proposals([d["boxes"] for d in dets])
    labels = torch.zeros(valid.shape, dtype=torch.long, device=boxes.device)
    for i, d in enumerate(dets):
        labels[i, : len(d["labels"])] = d["labels"]
    b_idx, p_idx = valid.nonzero(as_tuple=True)
    total = None
    for view_feats, view_metas in zip(feats, metas):
        view_boxes = bbox_mapping(boxes, view_metas)[b_idx, p_idx]
        rois = torch.cat([b_idx[:, None].to(view_boxes.dtype), view_boxes], 1)
        probs = roi.mask_probs(view_feats, rois, labels[b_idx, p_idx]) if len(rois) else boxes.new_zeros((0, 28, 28))
        hflip, vflip = _flips(view_metas, boxes.device)
        probs = torch.where(hflip[b_idx][:, None, None], probs.flip(-1), probs)
        probs = torch.where(vflip[b_idx][:, None, None], probs.flip(-2), probs)
        total = probs if total is None else total + probs
    assert total is not None
    probs = total / len(feats)
    start = 0
    for det, meta in zip(dets, metas[0]):
        n = len(det["boxes"])
        h, w = (int(v) for v in meta.get("ori_shape", meta["img_shape"])[:2])
        crops = paste_masks_in_boxes(probs[start:start + n], det["boxes"], h, w, roi.test_cfg.mask_thr_binary) \
            if n else []
        det["masks"] = InstanceMasks(crops, h, w)
        start += n
