"""Sigmoid focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017).

Semantics of MMDetection 2.x ``py_sigmoid_focal_loss`` / ``FocalLoss`` (mmdet/models/losses/focal_loss.py); the
pure-PyTorch form is used on every device (mmdet switches to an mmcv CUDA kernel computing the same quantity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.losses.utils import check_reduction, resolve_reduction, weight_reduce_loss
from densedet.registry import LOSSES


def labels_to_binary(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``(...)`` int labels -> ``(..., C)`` one-hot; labels outside ``[0, C)`` (background ``C``) give a zero row."""
    classes = torch.arange(num_classes, device=labels.device)
    return (labels.unsqueeze(-1) == classes).to(dtype)


def expand_row_weight(weight: Tensor | None, loss: Tensor) -> Tensor | None:
    """Let a per-row weight ``(...)`` multiply a per-class loss ``(..., C)`` (mmdet views ``(N,)`` as ``(N, 1)``)."""
    if weight is None or weight.shape == loss.shape:
        return weight
    if weight.shape == loss.shape[:-1]:
        return weight.unsqueeze(-1)
    if weight.numel() == loss.numel():
        return weight.reshape(loss.shape)
    raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a loss of shape {tuple(loss.shape)}")


def sigmoid_focal_loss(
    pred: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    gamma: float = 2.0,
    alpha: float = 0.25,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Sigmoid focal loss.

    ``loss = BCE(pred, t) * (alpha * t + (1 - alpha) * (1 - t)) * pt ** gamma`` with
    ``pt = (1 - p) * t + p * (1 - t)``, ``p = sigmoid(pred)``.

    Args:
        pred: ``(N, C)`` logits (any leading dims ``(..., C)`` work).
        target: ``(N,)`` int labels where ``C`` (or any value outside ``[0, C)``) is background, or ``(N, C)``
            float one-hot / soft targets.
        weight: ``(N,)`` per-row or ``(N, C)`` per-element weight.
        reduction, avg_factor: see :func:`~densedet.losses.utils.weight_reduce_loss`.

    Returns:
        A scalar, or ``(N, C)`` with ``reduction='none'``.
    """
    if target.dim() == pred.dim() - 1:
        target = labels_to_binary(target, pred.size(-1), pred.dtype)
    elif target.shape != pred.shape:
        raise ValueError(
            f"sigmoid_focal_loss: target {tuple(target.shape)} fits neither pred {tuple(pred.shape)} nor its labels"
        )
    target = target.type_as(pred)
    p = pred.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    return weight_reduce_loss(loss, expand_row_weight(weight, loss), reduction, avg_factor)


@LOSSES.register()
class FocalLoss(nn.Module):
    """Module form of :func:`sigmoid_focal_loss`, scaled by ``loss_weight``. Only the sigmoid variant exists
    (as in mmdet 2.x)."""

    def __init__(
        self,
        use_sigmoid: bool = True,
        gamma: float = 2.0,
        alpha: float = 0.25,
        reduction: str = "mean",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not use_sigmoid:
            raise ValueError("FocalLoss: only use_sigmoid=True is supported (as in MMDetection 2.x)")
        self.use_sigmoid = use_sigmoid
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = check_reduction(reduction)
        self.loss_weight = loss_weight

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
        reduction_override: str | None = None,
    ) -> Tensor:
        """``pred`` ``(N, C)`` logits; ``target`` ``(N,)`` labels (``C`` = background) or ``(N, C)`` floats."""
        reduction = resolve_reduction(self.reduction, reduction_override)
        return self.loss_weight * sigmoid_focal_loss(
            pred, target, weight, gamma=self.gamma, alpha=self.alpha, reduction=reduction, avg_factor=avg_factor
        )

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, reduction={self.reduction!r}, loss_weight={self.loss_weight}"
