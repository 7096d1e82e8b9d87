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
    """Let a per-row weight ``(...)`` multiply a per-class loss ``(..., C)`` (mmdet views ``(N,)`` as ``(N, 1)``).

    A weight that already broadcasts against the loss, e.g. the ``(N, 1)`` label weights VarifocalNet's
    ``anchor_head.loss_single`` passes to ``VarifocalLoss``, is used as it is (mmdet ``weight_reduce_loss``
    multiplies with broadcasting)."""
    if weight is None or weight.shape == loss.shape:
        return weight
    if weight.shape == loss.shape[:-1]:
        return weight.unsqueeze(-1)
    if weight.dim() == loss.dim() and all(w in (1, n) for w, n in zip(weight.shape, loss.shape)):
        return weight
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
    if target.dim() == pred.dim() - 1 and reduction != "none" and pred.dim() == 2 and (
            weight is None or weight.shape == target.shape):
        total = _FusedLabelFocal.apply(pred, target, weight, float(gamma), float(alpha))
        if reduction == "sum":
            if avg_factor is not None:
                raise ValueError('avg_factor can not be used with reduction="sum"')
            return total
        if avg_factor is None:
            return total / max(pred.numel(), 1)
        return total / (avg_factor + torch.finfo(torch.float32).eps)
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


def _softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` as ``max(x, 0) + log(1 + exp(-|x|))``: the same value, but avoids ``log1p``, which
    some CPU builds do not vectorise (3-4x slower than ``log`` on large tensors, see docs/benchmarks.md)."""
    return x.abs().neg_().exp_().add_(1).log_().add_(x.clamp(min=0))


class _FusedLabelFocal(torch.autograd.Function):
    """Summed sigmoid focal loss for hard labels with its gradient in closed form.

    Same quantity as the generic path (mmdet ``py_sigmoid_focal_loss`` summed with a per-row weight), computed in
    a few passes over the ``(N, C)`` logits and without an autograd graph: every element first takes the negative
    branch, then the N positive entries are corrected. With ``q = 1 - p``, ``sp(z) = softplus(z)``:

    - negative: ``L0 = (1-a) p^g sp(x)``, ``dL0/dx = (1-a) p^g (p + g q sp(x))``
    - positive: ``L1 = a q^g sp(-x)``,   ``dL1/dx = -a q^g (q + g p sp(-x))``

    (the same derivative the mmcv CUDA kernel ``sigmoid_focal_loss`` implements).
    """

    @staticmethod
    def forward(ctx, pred: Tensor, labels: Tensor, weight: Tensor | None, gamma: float, alpha: float) -> Tensor:
        x = pred.detach().float()
        n, c = x.shape
        p = torch.sigmoid(x)
        sp = _softplus(x)
        pg = p * p if gamma == 2.0 else p.pow(gamma)
        row = (pg * sp).sum(1).mul_(1 - alpha)  # every element as a negative
        rows = torch.arange(n, device=x.device)
        pos = (labels >= 0) & (labels < c)
        pr, pl = rows[pos], labels[pos]
        xp, ppos = x[pr, pl], p[pr, pl]
        qpos = 1 - ppos
        qg = qpos.pow(gamma)
        sp_neg = _softplus(-xp)
        l1 = alpha * qg * sp_neg
        l0 = (1 - alpha) * pg[pr, pl] * sp[pr, pl]
        row = row.index_add(0, pr, l1 - l0)
        w = None if weight is None else weight.detach().float()
        total = (row * w).sum() if w is not None else row.sum()
        if pred.requires_grad:
            # dL0/dx for every element, in place on the buffers above: (1-a) p^g (p + g q sp(x))
            grad = sp.mul_(torch.sub(1, p)).mul_(gamma).add_(p).mul_(pg).mul_(1 - alpha)
            grad[pr, pl] = -alpha * qg * (qpos + gamma * ppos * sp_neg)
            if w is not None:
                grad.mul_(w[:, None])
            ctx.save_for_backward(grad)
        else:
            ctx.save_for_backward(None)
        ctx.dtype = pred.dtype
        return total.to(pred.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.dtype), None, None, None, None


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
