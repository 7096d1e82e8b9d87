"""Softmax and sigmoid (binary) cross-entropy with MMDetection 2.x semantics
(mmdet/models/losses/cross_entropy_loss.py). The sigmoid form is the FCOS/ATSS centerness loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.losses.utils import check_reduction, resolve_reduction, weight_reduce_loss
from densedet.registry import LOSSES

DEFAULT_IGNORE_INDEX = -100


def cross_entropy(
    pred: Tensor,
    label: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    avg_non_ignore: bool = False,
) -> Tensor:
    """Softmax cross-entropy: ``pred`` ``(N, C)`` logits, ``label`` ``(N,)`` int, ``weight`` ``(N,)``.

    With ``avg_non_ignore`` and ``'mean'`` (and no ``avg_factor``) the mean is over non-ignored labels only.
    """
    loss = F.cross_entropy(pred, label, weight=class_weight, reduction="none", ignore_index=ignore_index)
    if avg_factor is None and avg_non_ignore and reduction == "mean":
        avg_factor = label.numel() - (label == ignore_index).sum().item()
    if weight is not None:
        weight = weight.float()
    return weight_reduce_loss(loss, weight, reduction, avg_factor)


def binary_cross_entropy(
    pred: Tensor,
    label: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    avg_non_ignore: bool = False,
) -> Tensor:
    """Sigmoid BCE with logits.

    ``pred`` and ``label`` have the same shape (float targets in ``[0, 1]``, e.g. centerness ``(N,)``), or ``pred``
    is ``(N, C)`` and ``label`` ``(N,)`` int, expanded to one-hot (labels outside ``[0, C)`` give zero rows).
    Entries whose label is negative or ``ignore_index`` get zero weight.
    """
    if pred.dim() != label.dim():
        num_classes = pred.size(-1)
        valid = (label >= 0) & (label != ignore_index)
        target = (label.unsqueeze(-1) == torch.arange(num_classes, device=label.device)) & valid.unsqueeze(-1)
        valid_mask = valid.unsqueeze(-1).expand_as(pred).float()
        if weight is not None:
            weight = weight.reshape(-1, 1).expand_as(pred) * valid_mask
        else:
            weight = valid_mask
        label = target
    else:
        valid_mask = ((label >= 0) & (label != ignore_index)).float()
        weight = weight * valid_mask if weight is not None else valid_mask
    if avg_factor is None and avg_non_ignore and reduction == "mean":
        avg_factor = valid_mask.sum().item()
    loss = F.binary_cross_entropy_with_logits(pred, label.to(pred.dtype), pos_weight=class_weight, reduction="none")
    return weight_reduce_loss(loss, weight.float(), reduction, avg_factor)


@LOSSES.register()
class CrossEntropyLoss(nn.Module):
    """Cross-entropy module: softmax over classes, or sigmoid BCE with ``use_sigmoid=True``.

    Args:
        use_sigmoid: binary cross-entropy with logits instead of softmax cross-entropy.
        reduction: ``'none'``, ``'mean'`` or ``'sum'``.
        class_weight: per-class weights (softmax) or ``pos_weight`` (sigmoid).
        ignore_index: label to ignore (default ``-100``, as ``F.cross_entropy``).
        loss_weight: scale of the loss.
        avg_non_ignore: average over non-ignored entries only.
    """

    def __init__(
        self,
        use_sigmoid: bool = False,
        reduction: str = "mean",
        class_weight: Sequence[float] | None = None,
        ignore_index: int | None = None,
        loss_weight: float = 1.0,
        avg_non_ignore: bool = False,
    ) -> None:
        super().__init__()
        self.use_sigmoid = use_sigmoid
        self.reduction = check_reduction(reduction)
        self.class_weight = None if class_weight is None else [float(w) for w in class_weight]
        self.ignore_index = DEFAULT_IGNORE_INDEX if ignore_index is None else ignore_index
        self.loss_weight = loss_weight
        self.avg_non_ignore = avg_non_ignore
        self._fn = binary_cross_entropy if use_sigmoid else cross_entropy

    def forward(
        self,
        pred: Tensor,
        target: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
        reduction_override: str | None = None,
        ignore_index: int | None = None,
    ) -> Tensor:
        reduction = resolve_reduction(self.reduction, reduction_override)
        class_weight = None if self.class_weight is None else pred.new_tensor(self.class_weight)
        return self.loss_weight * self._fn(
            pred,
            target,
            weight,
            reduction=reduction,
            avg_factor=avg_factor,
            class_weight=class_weight,
            ignore_index=self.ignore_index if ignore_index is None else ignore_index,
            avg_non_ignore=self.avg_non_ignore,
        )

    def extra_repr(self) -> str:
        return f"use_sigmoid={self.use_sigmoid}, reduction={self.reduction!r}, loss_weight={self.loss_weight}"
