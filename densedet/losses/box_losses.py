"""Box regression losses: L1, smooth L1, IoU and GIoU.

Semantics of MMDetection 2.x (mmdet/models/losses/smooth_l1_loss.py, iou_loss.py). GIoU: Rezatofighi et al.,
"Generalized Intersection over Union", CVPR 2019. IoU loss: Yu et al., "UnitBox", ACM MM 2016.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from densedet.losses.utils import check_reduction, resolve_reduction, weight_reduce_loss
from densedet.registry import LOSSES
from densedet.structures.boxes import bbox_overlaps

IOU_MODES = ("linear", "square", "log")


def _coord_weight(weight: Tensor | None, loss: Tensor) -> Tensor | None:
    """A per-box ``(N,)`` weight applies to all 4 coordinates of an ``(N, 4)`` loss."""
    if weight is not None and weight.dim() == loss.dim() - 1:
        return weight.unsqueeze(-1)
    return weight


def _box_weight(weight: Tensor | None, pred: Tensor) -> Tensor | None:
    """A per-coordinate ``(N, 4)`` weight becomes per-box ``(N,)`` by its mean (mmdet IoU-family losses)."""
    if weight is not None and weight.dim() == pred.dim():
        if weight.shape != pred.shape:
            raise ValueError(f"box loss weight {tuple(weight.shape)} must be (N,) or match pred {tuple(pred.shape)}")
        return weight.mean(-1)
    return weight


def l1_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """``|pred - target|`` element-wise on ``(N, 4)``; ``weight`` ``(N,)`` or ``(N, 4)``."""
    if target.numel() == 0:
        return pred.sum() * 0
    loss = (pred - target).abs()
    return weight_reduce_loss(loss, _coord_weight(weight, loss), reduction, avg_factor)


def smooth_l1_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    beta: float = 1.0,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Smooth L1: ``0.5 * d**2 / beta`` if ``d < beta`` else ``d - 0.5 * beta``, with ``d = |pred - target|``."""
    if beta <= 0:
        raise ValueError(f"smooth_l1_loss: beta must be > 0, got {beta}")
    if target.numel() == 0:
        return pred.sum() * 0
    diff = (pred - target).abs()
    loss = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    return weight_reduce_loss(loss, _coord_weight(weight, loss), reduction, avg_factor)


def giou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    eps: float = 1e-7,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """``1 - GIoU(pred, target)`` for aligned ``(N, 4)`` xyxy boxes -> per box; ``weight`` ``(N,)`` or ``(N, 4)``.

    No boxes give a zero loss attached to ``pred`` (mmdet would return the NaN mean of nothing).
    """
    if pred.numel() == 0 and reduction != "none":
        return pred.sum() * 0
    loss = 1 - bbox_overlaps(pred, target, mode="giou", is_aligned=True, eps=eps)
    return weight_reduce_loss(loss, _box_weight(weight, pred), reduction, avg_factor)


def iou_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    mode: str = "log",
    eps: float = 1e-6,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """IoU loss for aligned ``(N, 4)`` xyxy boxes: ``1 - IoU`` (linear), ``1 - IoU**2`` (square) or ``-log(IoU)``
    (log), with IoU clamped to ``>= eps``. No boxes give a zero loss attached to ``pred``."""
    if pred.numel() == 0 and reduction != "none":
        return pred.sum() * 0
    if mode not in IOU_MODES:
        raise ValueError(f"iou_loss: mode must be one of {IOU_MODES}, got {mode!r}")
    ious = bbox_overlaps(pred, target, is_aligned=True).clamp(min=eps)
    if mode == "linear":
        loss = 1 - ious
    elif mode == "square":
        loss = 1 - ious**2
    else:
        loss = -ious.log()
    return weight_reduce_loss(loss, _box_weight(weight, pred), reduction, avg_factor)


def _all_zero_weight(pred: Tensor, weight: Tensor | None, reduction: str) -> Tensor | None:
    """mmdet's shortcut: with no positive weight, return a zero that keeps ``pred`` in the graph."""
    if weight is None or reduction == "none" or bool((weight > 0).any()):
        return None
    if pred.dim() == weight.dim() + 1:
        weight = weight.unsqueeze(-1)
    return (pred * weight).sum()


class _BoxLoss(nn.Module):
    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.loss_weight = loss_weight

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, loss_weight={self.loss_weight}"


@LOSSES.register()
class L1Loss(_BoxLoss):
    """Module form of :func:`l1_loss`."""

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
        reduction_override: str | None = None,
    ) -> Tensor:
        reduction = resolve_reduction(self.reduction, reduction_override)
        return self.loss_weight * l1_loss(pred, target, weight, reduction=reduction, avg_factor=avg_factor)


@LOSSES.register()
class SmoothL1Loss(_BoxLoss):
    """Module form of :func:`smooth_l1_loss`."""

    def __init__(self, beta: float = 1.0, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        if beta <= 0:
            raise ValueError(f"SmoothL1Loss: beta must be > 0, got {beta}")
        self.beta = beta

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
        reduction_override: str | None = None,
    ) -> Tensor:
        reduction = resolve_reduction(self.reduction, reduction_override)
        return self.loss_weight * smooth_l1_loss(
            pred, target, weight, beta=self.beta, reduction=reduction, avg_factor=avg_factor
        )


@LOSSES.register()
class GIoULoss(_BoxLoss):
    """Module form of :func:`giou_loss` (default ``eps=1e-6`` as mmdet's module)."""

    def __init__(self, eps: float = 1e-6, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.eps = eps

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
        reduction_override: str | None = None,
    ) -> Tensor:
        reduction = resolve_reduction(self.reduction, reduction_override)
        zero = _all_zero_weight(pred, weight, reduction)
        if zero is not None:
            return zero
        return self.loss_weight * giou_loss(
            pred, target, weight, eps=self.eps, reduction=reduction, avg_factor=avg_factor
        )


@LOSSES.register()
class IoULoss(_BoxLoss):
    """Module form of :func:`iou_loss`; ``linear=True`` is the old spelling of ``mode='linear'``."""

    def __init__(
        self,
        linear: bool = False,
        eps: float = 1e-6,
        reduction: str = "mean",
        loss_weight: float = 1.0,
        mode: str = "log",
    ) -> None:
        super().__init__(reduction, loss_weight)
        if mode not in IOU_MODES:
            raise ValueError(f"IoULoss: mode must be one of {IOU_MODES}, got {mode!r}")
        self.mode = "linear" if linear else mode
        self.eps = eps

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
        reduction_override: str | None = None,
    ) -> Tensor:
        reduction = resolve_reduction(self.reduction, reduction_override)
        zero = _all_zero_weight(pred, weight, reduction)
        if zero is not None:
            return zero
        return self.loss_weight * iou_loss(
            pred, target, weight, mode=self.mode, eps=self.eps, reduction=reduction, avg_factor=avg_factor
        )
