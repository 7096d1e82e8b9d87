"""Loss reduction helpers with MMDetection 2.x semantics (mmdet/models/losses/utils.py)."""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Reduce an element-wise loss by ``'none'``, ``'mean'`` or ``'sum'``."""
    check_reduction(reduction)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def weight_reduce_loss(
    loss: Tensor, weight: Tensor | None = None, reduction: str = "mean", avg_factor: float | Tensor | None = None
) -> Tensor:
    """Weight an element-wise loss, then reduce it.

    ``weight`` must broadcast against ``loss``. With ``avg_factor`` and ``reduction='mean'`` the result is
    ``sum / (avg_factor + eps)`` (eps = float32 machine epsilon, so an ``avg_factor`` of 0 gives 0 rather than NaN,
    as in mmdet 2.x); with ``'none'`` the weighted loss is returned; ``'sum'`` with ``avg_factor`` is an error.
    """
    check_reduction(reduction)
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return reduce_loss(loss, reduction)
    if reduction == "mean":
        return loss.sum() / (avg_factor + torch.finfo(torch.float32).eps)
    if reduction == "sum":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def resolve_reduction(default: str, override: str | None) -> str:
    """The reduction a loss module uses: ``override`` when given, else its own."""
    return check_reduction(override if override else default)
