"""Progressive focal loss (UMOP: Wu et al., "Unified Multi-level Optimization Paradigm", arXiv:2109.07217).

A sigmoid focal loss whose focusing parameter follows how hard a pyramid level's positives currently are. For one
level and one training step (reference: zimoqingfeng/UMOP ``mmdet/models/losses/pfocal_loss.py``
``ProgressiveFocalLoss`` with the condition computed by ``mmdet/models/dense_heads/level_resampling_head.py``
``LRPHead.loss_single``):

- condition ``c_l`` = mean binary cross-entropy ``-log sigmoid(x)`` of the level's positive priors at their gt class
  (label weight > 0), detached; :data:`NO_POSITIVE_CONDITION` (2.0) when the level has no positive on this process
  (the reference's fallback, a literal 2 in the head); then averaged over processes (``reduce_mean``: each process's
  value counts once, whatever its number of positives);
- ``gamma_l = clamp(c_l, gamma - delta, gamma + delta)``, ``alpha_l = w / gamma_l``;
- the level's loss is :func:`~densedet.losses.focal.sigmoid_focal_loss` with ``gamma_l`` / ``alpha_l``.

A hard level (high cross-entropy of its positives) gets a larger gamma, i.e. more down-weighting of easy examples, and
a smaller alpha. With the defaults (gamma 2, delta 0.5, w 0.5) gamma_l is in [1.5, 2.5] and alpha_l in [0.2, 1/3];
plain focal loss's (2, 0.25) is the middle point of that range.

The positives' mean is taken, as in the reference, over the entries whose float32 ``-log(sigmoid(x))`` is > 0: a
positive whose logit is so large that ``sigmoid`` rounds to exactly 1 (x > ~16.6) is left out of the mean (not
counted as a 0). The value itself is computed as ``softplus(-x)`` (the same number without the ``log(0) = inf`` of
very negative logits; such a level is clamped to ``gamma + delta`` either way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.losses.focal import sigmoid_focal_loss
from densedet.losses.utils import check_reduction, resolve_reduction
from densedet.registry import LOSSES, ConfigError

# The reference head's condition for a level without positives (level_resampling_head.py: torch.tensor(2)).
NO_POSITIVE_CONDITION = 2.0


def positive_ce_condition(pred: Tensor, labels: Tensor, label_weights: Tensor | None = None) -> Tensor:
    """This process's condition of one pyramid level: mean BCE of its positives at their gt class.

    Args:
        pred: ``(..., C)`` classification logits of the level's priors (any leading dims, e.g. ``(B, n_l, C)``).
        labels: ``(...)`` int labels; ``C`` (or anything outside ``[0, C)``) is background.
        label_weights: ``(...)`` per-prior weights (valid priors 1, ignored 0); ``None`` means all 1. As in the
            reference the cross-entropy is multiplied by it and entries that end up 0 are not averaged.

    Returns:
        0-d float32 tensor (detached): the mean of ``-log sigmoid(pred[label])`` over the positives, or
        :data:`NO_POSITIVE_CONDITION` when none qualifies. Not yet averaged over processes.
    """
    c = pred.shape[-1]
    pos = (labels >= 0) & (labels < c)
    x = pred.detach()[pos].float()  # (P, C)
    lab = labels[pos]
    xl = x.gather(1, lab[:, None])[:, 0]
    ce = F.softplus(-xl)
    keep = torch.sigmoid(xl) < 1  # float32 -log(sigmoid(x)) > 0, the reference's selection
    if label_weights is not None:
        lw = label_weights[pos].float()
        ce = ce * lw
        keep = keep & (lw > 0)
    num = keep.sum()
    total = torch.where(keep, ce, torch.zeros_like(ce)).sum()
    fallback = torch.full_like(total, NO_POSITIVE_CONDITION)
    return torch.where(num > 0, total / num.clamp(min=1), fallback)


def progressive_gamma_alpha(condition: Tensor | float, gamma: float = 2.0, delta: float = 0.5,
                            w: float = 0.5) -> tuple[Tensor, Tensor]:
    """``gamma_l = clamp(condition, gamma - delta, gamma + delta)`` and ``alpha_l = w / gamma_l`` (element-wise).

    ``condition`` is a level's (process-averaged) condition, or a ``(L,)`` tensor of them; returns two tensors of
    its shape.
    """
    g = torch.as_tensor(condition, dtype=torch.float32).clamp(min=gamma - delta, max=gamma + delta)
    return g, w / g


@LOSSES.register()
class ProgressiveFocalLoss(nn.Module):
    """UMOP's progressive focal loss for one pyramid level (see the module docstring).

    Args:
        use_sigmoid: only ``True`` (as the reference).
        gamma: centre of the focusing-parameter range; ``delta``: its half width (``gamma - delta`` must be > 0).
        w: ``alpha_l = w / gamma_l``.
        reduction, loss_weight: as :class:`~densedet.losses.focal.FocalLoss`.
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, delta: float = 0.5, w: float = 0.5,
                 reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__()
        if not use_sigmoid:
            raise ConfigError("ProgressiveFocalLoss: only use_sigmoid=True is supported (as in the UMOP reference)",
                              path="model.bbox_head.loss_cls.use_sigmoid")
        if delta < 0 or gamma - delta <= 0:
            raise ConfigError(f"ProgressiveFocalLoss: need delta >= 0 and gamma - delta > 0 (alpha = w / gamma), got "
                              f"gamma={gamma}, delta={delta}", path="model.bbox_head.loss_cls.delta")
        self.use_sigmoid = use_sigmoid
        self.gamma = float(gamma)
        self.delta = float(delta)
        self.w = float(w)
        self.reduction = check_reduction(reduction)
        self.loss_weight = loss_weight

    def gamma_alpha(self, condition: Tensor | float) -> tuple[Tensor, Tensor]:
        """``(gamma_l, alpha_l)`` for a level's condition (or a tensor of them)."""
        return progressive_gamma_alpha(condition, self.gamma, self.delta, self.w)

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None,
                lvl_gamma: Tensor | float | None = None) -> Tensor:
        """Focal loss of one level's priors with that level's gamma / alpha.

        Args:
            pred: ``(N, C)`` logits; ``target``: ``(N,)`` labels (``C`` = background) or ``(N, C)`` floats;
            weight: ``(N,)`` or ``(N, C)``; avg_factor / reduction_override: as ``FocalLoss``.
            lvl_gamma: the level's condition (a number or a 0-d tensor, already averaged over processes), e.g.
                ``reduce_mean(positive_ce_condition(...))``; it is clamped here, as in the reference.
        """
        if lvl_gamma is None:
            raise ValueError("ProgressiveFocalLoss needs lvl_gamma (the level's condition, see "
                             "densedet.losses.pfocal.positive_ce_condition); use it in a head that computes it, "
                             "e.g. LRPHead")
        g, a = self.gamma_alpha(float(lvl_gamma))
        reduction = resolve_reduction(self.reduction, reduction_override)
        return self.loss_weight * sigmoid_focal_loss(pred, target, weight, gamma=float(g), alpha=float(a),
                                                     reduction=reduction, avg_factor=avg_factor)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, delta={self.delta}, w={self.w}, reduction={self.reduction!r}, "
                f"loss_weight={self.loss_weight}")
