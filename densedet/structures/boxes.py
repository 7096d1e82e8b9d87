"""Box geometry and the padded per-batch ground-truth container.

All boxes are ``xyxy`` in absolute pixels with the MMDetection 2.x convention: no "+1", so the width of
``[x1, y1, x2, y2]`` is ``x2 - x1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

_MODES = ("iou", "iof", "giou")


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(..., 4)`` xyxy boxes -> ``(...)``. Degenerate (inverted) boxes give a negative area, as in mmdet."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` xyxy -> ``(..., 4)`` (centre x, centre y, width, height)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1), dim=-1)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` (centre x, centre y, width, height) -> ``(..., 4)`` xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def bbox_overlaps(
    boxes1: Tensor, boxes2: Tensor, mode: str = "iou", is_aligned: bool = False, eps: float = 1e-6
) -> Tensor:
    """Pairwise IoU / IoF / GIoU of xyxy boxes (semantics of mmdet 2.x ``bbox_overlaps``, iou2d_calculator.py).

    Args:
        boxes1: ``(..., N, 4)``.
        boxes2: ``(..., M, 4)``; leading batch dims broadcast against ``boxes1`` (mmdet requires them equal).
        mode: ``'iou'`` (intersection / union), ``'iof'`` (intersection / area of ``boxes1``) or ``'giou'``.
        is_aligned: compare ``boxes1[..., i]`` with ``boxes2[..., i]`` only (needs ``N == M``).
        eps: lower clamp of the union (and of the enclosing area for GIoU), so empty boxes give 0, not NaN.

    Returns:
        ``(..., N, M)``, or ``(..., N)`` when ``is_aligned``.
    """
    if mode not in _MODES:
        raise ValueError(f"bbox_overlaps: mode must be one of {_MODES}, got {mode!r}")
    if boxes1.size(-1) != 4 or boxes2.size(-1) != 4:
        raise ValueError(
            f"bbox_overlaps: boxes must have 4 coordinates, got {tuple(boxes1.shape)}, {tuple(boxes2.shape)}"
        )
    if is_aligned:
        if boxes1.size(-2) != boxes2.size(-2):
            raise ValueError(
                f"bbox_overlaps: aligned mode needs equal counts, got {boxes1.size(-2)} and {boxes2.size(-2)}"
            )
        a, b = boxes1, boxes2
    else:
        # (..., N, 1, 4) against (..., 1, M, 4): every coordinate below is (..., N, M).
        a, b = boxes1.unsqueeze(-2), boxes2.unsqueeze(-3)

    area1 = box_area(a)
    area2 = box_area(b)
    # Per-axis intersection extents; avoids materialising (..., N, M, 2) corner tensors.
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    overlap = iw * ih
    union = area1 + area2 - overlap if mode in ("iou", "giou") else area1.expand_as(overlap)
    eps_t = union.new_tensor(eps)
    union = torch.maximum(union, eps_t)
    ious = overlap / union
    if mode != "giou":
        return ious
    ew = (torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])).clamp(min=0)
    eh = (torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])).clamp(min=0)
    enclose = torch.maximum(ew * eh, eps_t)
    return ious - (enclose - union) / enclose


@dataclass
class PaddedTargets:
    """Ground truth of a batch, padded to the largest image.

    Attributes:
        gt_boxes: ``(B, M, 4)`` float xyxy; padding rows are zero.
        gt_labels: ``(B, M)`` int64; padding entries are ``-1``.
        gt_valid: ``(B, M)`` bool; False marks padding.
        ignore_boxes: ``(B, K, 4)`` float xyxy crowd regions; padding rows are zero.
        ignore_valid: ``(B, K)`` bool; False marks padding.

    ``M`` and ``K`` are at least 1 even when every image is empty, so shapes stay valid for batched ops.
    """

    gt_boxes: Tensor
    gt_labels: Tensor
    gt_valid: Tensor
    ignore_boxes: Tensor
    ignore_valid: Tensor

    @property
    def batch_size(self) -> int:
        return self.gt_boxes.size(0)

    @property
    def num_gts(self) -> Tensor:
        """``(B,)`` int64 number of real (non-padding) ground truths per image."""
        return self.gt_valid.sum(dim=1)

    def to(self, device: torch.device | str) -> PaddedTargets:
        return PaddedTargets(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _as_boxes(value: Any, what: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32) if value is not None else torch.zeros(0, 4)
    if t.numel() == 0:
        return t.reshape(0, 4).float()
    if t.dim() != 2 or t.size(-1) != 4:
        raise ValueError(f"{what}: expected boxes of shape (n, 4), got {tuple(t.shape)}")
    return t.float()


def pad_targets(targets: Sequence[dict[str, Any]], device: torch.device | str | None = None) -> PaddedTargets:
    """Pad per-image ground truth into a :class:`PaddedTargets`.

    Args:
        targets: one dict per image with ``"boxes"`` ``(n, 4)`` xyxy, ``"labels"`` ``(n,)`` and optionally
            ``"ignore_boxes"`` ``(k, 4)`` (crowd regions). Tensors, arrays or nested lists are accepted.
        device: device of the result; defaults to the device of the first image's boxes (CPU for non-tensors).
    """
    if len(targets) == 0:
        raise ValueError("pad_targets: got an empty batch")
    boxes, labels, ignores = [], [], []
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"pad_targets: image {i} needs 'boxes' and 'labels', got keys {sorted(t)}")
        b = _as_boxes(t["boxes"], f"pad_targets: image {i} 'boxes'")
        lab = torch.as_tensor(t["labels"]).reshape(-1).long()
        if lab.numel() != b.size(0):
            raise ValueError(f"pad_targets: image {i} has {b.size(0)} boxes but {lab.numel()} labels")
        boxes.append(b)
        labels.append(lab)
        ignores.append(_as_boxes(t.get("ignore_boxes"), f"pad_targets: image {i} 'ignore_boxes'"))
    if device is None:
        first = targets[0]["boxes"]
        device = first.device if isinstance(first, Tensor) else torch.device("cpu")
    bsz = len(targets)
    m = max(1, max(b.size(0) for b in boxes))
    k = max(1, max(b.size(0) for b in ignores))
    gt_boxes = torch.zeros(bsz, m, 4, device=device)
    gt_labels = torch.full((bsz, m), -1, dtype=torch.long, device=device)
    gt_valid = torch.zeros(bsz, m, dtype=torch.bool, device=device)
    ig_boxes = torch.zeros(bsz, k, 4, device=device)
    ig_valid = torch.zeros(bsz, k, dtype=torch.bool, device=device)
    # A loop over images is fine here: it runs once per batch at collate time, on tiny tensors.
    for i, (b, lab, ig) in enumerate(zip(boxes, labels, ignores)):
        n = b.size(0)
        gt_boxes[i, :n] = b.to(device)
        gt_labels[i, :n] = lab.to(device)
        gt_valid[i, :n] = True
        ig_boxes[i, : ig.size(0)] = ig.to(device)
        ig_valid[i, : ig.size(0)] = True
    return PaddedTargets(gt_boxes, gt_labels, gt_valid, ig_boxes, ig_valid)
