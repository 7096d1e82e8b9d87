"""Varifocal Loss (Zhang et al., "VarifocalNet: An IoU-aware Dense Object Detector", CVPR 2021, eq. 2).

Semantics of ``varifocal_loss`` / ``VarifocalLoss`` in hyz-xmaster/VarifocalNet
(mmdet/models/losses/varifocal_loss.py, also in MMDetection 2.x): a binary cross-entropy against a soft target
``q`` (the IoU of the predicted box with its ground truth at the ground-truth class, 0 elsewhere), where

* positives (``q > 0``) are weighted by ``q`` (``iou_weighted=True``) or by 1, and
* negatives (``q <= 0``) are down-weighted by ``alpha * |p - q| ** gamma`` (= ``alpha * p ** gamma`` for ``q = 0``).

As in the reference, the weight is not detached: gradients flow through ``p`` in the negatives' factor.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from densedet.losses.focal import expand_row_weight
from densedet.losses.utils import check_reduction, resolve_reduction, weight_reduce_loss
from densedet.registry import LOSSES


def varifocal_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    alpha: float = 0.75,
    gamma: float = 2.0,
    iou_weighted: bool = True,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Varifocal loss.

    Args:
        pred: ``(N, C)`` logits (any ``(..., C)``).
        target: same shape as ``pred``: the IoU-aware classification target ``q`` in [0, 1].
        weight: ``(N,)`` per-row or ``(N, C)`` per-element weight.
        reduction, avg_factor: see :func:`~densedet.losses.utils.weight_reduce_loss`.

    Returns:
        A scalar, or ``(N, C)`` with ``reduction='none'``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"varifocal_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ; "
                         f"the target is the per-class IoU-aware score, not a label vector")
    p = pred.sigmoid()
    target = target.type_as(pred)
    positive = target > 0
    neg_weight = alpha * (p - target).abs().pow(gamma)
    pos_weight = target if iou_weighted else target.new_ones(())
    focal_weight = positive * pos_weight + (~positive) * neg_weight
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    return weight_reduce_loss(loss, expand_row_weight(weight, loss), reduction, avg_factor)


@LOSSES.register()
class VarifocalLoss(nn.Module):
    """Module form of :func:`varifocal_loss`, scaled by ``loss_weight`` (sigmoid only, as in the reference)."""

    def __init__(self, use_sigmoid: bool = True, alpha: float = 0.75, gamma: float = 2.0,
                 iou_weighted: bool = True, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        if not use_sigmoid:
            raise ValueError("VarifocalLoss: only use_sigmoid=True is supported (as in the reference)")
        if alpha < 0:
            raise ValueError(f"VarifocalLoss: alpha must be >= 0, got {alpha}")
        self.use_sigmoid = use_sigmoid
        self.alpha = alpha
        self.gamma = gamma
        self.iou_weighted = iou_weighted
        self.reduction = check_reduction(reduction)
        self.loss_weight = loss_weight

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        """``pred`` ``(N, C)`` logits; ``target`` ``(N, C)`` IoU-aware scores (0 for negatives)."""
        reduction = resolve_reduction(self.reduction, reduction_override)
        return self.loss_weight * varifocal_loss(pred, target, weight, alpha=self.alpha, gamma=self.gamma,
                                                 iou_weighted=self.iou_weighted, reduction=reduction,
                                                 avg_factor=avg_factor)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, gamma={self.gamma}, iou_weighted={self.iou_weighted}, "
                f"reduction={self.reduction!r}, loss_weight={self.loss_weight}")
