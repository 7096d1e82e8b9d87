"""GHM-C and GHM-R: gradient harmonizing losses (Li, Liu, Wang, "Gradient Harmonized Single-stage Detector",
AAAI 2019, arXiv:1811.05181).

Each valid element gets a gradient norm ``g`` in [0, 1]; the elements are histogrammed into ``bins`` unit regions
and an element's weight is ``tot / (density of its bin * number of non-empty bins)`` (paper eq. 7-9, with the
"unit region" approximation of sec. 3.3). With ``momentum > 0`` the density is an exponential moving average of
the bin counts (sec. 3.3, ``acc_sum = m * acc_sum + (1 - m) * count``, updated only for bins that are non-empty in
this batch), kept in a buffer so it lands in checkpoints and a resumed run continues with it.

Semantics are those of MMDetection 2.x ``mmdet/models/losses/ghm_loss.py`` (``GHMC``, ``GHMR``), which follows the
authors' ``libuyu/GHM_Detection`` ``mmdetection/mmdet/core/loss/ghm_loss.py``:

- GHM-C: ``g = |sigmoid(x) - t|``; ``tot = max(#valid elements, 1)``; loss ``sum(w * BCE) / tot``.
- GHM-R: ASL1 ``sqrt(d^2 + mu^2) - mu``, ``g = |d| / sqrt(d^2 + mu^2)``; ``tot = max(sum of label weights, 1)``;
  loss ``sum(w * ASL1) / tot``. The last edge is 1e3 (GHM-C: 1 + 1e-6), as in both references.
- The label weights only select the valid elements (and give GHM-R's ``tot``); they do not multiply the loss.
- Per pyramid level: every reference head calls the loss once per level (mmdet 2.x ``AnchorHead.loss_single`` via
  ``multi_apply``; ``configs/ghm`` uses the RetinaHead), so each level has its own histogram and ``tot``, the one
  ``acc_sum`` buffer is updated once per level, level 0 first, and the head's loss is the sum over levels. The heads
  pass ``level_ids`` (see ``per_level``), which gives exactly those calls in one batched pass.
- The first step with momentum sees ``acc_sum = (1 - m) * count``, i.e. weights ``1 / (1 - m)`` times those
  without momentum, exactly as the references (the EMA starts from zeros).

Differences from the references, all without effect on the value of the default ``reduction='mean'``:

- The histogram is computed in one pass (``bucketize`` + ``scatter_add``) with no host synchronisation, instead of
  a Python loop over bins with ``.item()`` per bin; the bins are the same half-open ``[e_i, e_{i+1})`` intervals.
- Each level's ``sum(w * loss)`` and ``tot`` are ``torch.sum`` reductions in float32, as the references' (see
  ``_group_totals``), with no epsilon added to ``tot`` (it is at least 1): the value equals the references' to
  float32 rounding (~1e-7 relative; the weights may differ from theirs in the last bit, since they divide
  ``tot / acc_sum`` as ``acc_sum.reciprocal() * tot``).
- ``avg_factor`` is accepted and ignored (the references ignore it too): GHM normalises by its own ``tot``.
- ``reduction='sum'`` returns the weighted sum (MMDetection raises because it passes ``avg_factor=tot``);
  ``'none'`` returns the weighted element-wise loss, as MMDetection.
- Checkpoints written by MMDetection 1.x (the released GHM models) hold no ``edges`` / ``acc_sum`` entries (they
  were plain attributes then); both buffers are therefore optional when loading: a missing ``edges`` keeps the
  value derived from ``bins``, a missing ``acc_sum`` restarts the average from zeros (see ``optional_state_keys``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.losses.focal import labels_to_binary
from densedet.losses.utils import check_reduction, resolve_reduction
from densedet.registry import LOSSES


def asl1_loss(pred: Tensor, target: Tensor, mu: float = 0.02) -> Tensor:
    """Authentic smooth L1 (GHM paper eq. 10): ``sqrt(d^2 + mu^2) - mu`` element-wise, ``d = pred - target``.

    Its gradient w.r.t. ``pred`` is ``d / sqrt(d^2 + mu^2)``, whose magnitude is GHM-R's gradient norm.
    """
    diff = pred - target
    return torch.sqrt(diff * diff + mu * mu) - mu


def ghm_weights(g: Tensor, valid: Tensor, edges: Tensor, tot: Tensor, acc_sum: Tensor | None = None,
                momentum: float = 0.0, groups: Tensor | None = None, num_groups: int = 1) -> Tensor:
    """Gradient-harmonizing weights of the elements of ``g``, one histogram per group.

    The references call the loss once per pyramid level (mmdet 2.x ``AnchorHead.loss_single`` through
    ``multi_apply``), so every level has its own histogram and ``tot``, and the running densities are updated once
    per level, level after level. ``groups`` reproduces those calls in one pass: group ``k`` gets exactly the weights
    the ``k``-th call would give, with ``acc_sum`` updated for group 0, then 1, ... (a loop over the ``num_groups``
    bin vectors only; the elements are histogrammed together).

    Args:
        g: gradient norms, any shape (detached).
        valid: bool mask of the same shape; invalid elements are not counted and get weight 0.
        edges: ``(bins + 1,)`` increasing bin edges; bin ``i`` is ``[edges[i], edges[i+1])``.
        tot: ``(num_groups,)`` (or scalar, one group) numerators of the weights (the references' ``tot``).
        acc_sum: ``(bins,)`` running bin densities, updated in place when ``momentum > 0``.
        momentum: EMA momentum; 0 uses each group's counts.
        groups: long tensor of ``g``'s shape, the group (pyramid level) of every element in ``[0, num_groups)``;
            ``None``: one group.
        num_groups: number of groups.

    Returns:
        weights of ``g``'s shape: ``tot_k / (density of the bin * number of non-empty bins of group k)``, 0 where
        invalid.
    """
    bins = edges.numel() - 1
    # bucketize(right=True) returns i with edges[i-1] <= g < edges[i]: the references' half-open bins.
    idx = torch.bucketize(g, edges, right=True) - 1
    inside = valid & (idx >= 0) & (idx < bins)
    if groups is not None:
        idx = idx + groups.to(idx.dtype) * bins
    slots = num_groups * bins
    idx = torch.where(inside, idx, slots)  # park the others in an overflow slot dropped below
    counts = torch.zeros(slots + 1, dtype=torch.long, device=g.device)
    counts.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx).reshape(-1))
    counts = counts[:slots].view(num_groups, bins)
    nonempty = counts > 0
    num_nonempty = nonempty.sum(1, keepdim=True).clamp(min=1).to(torch.float32)
    if momentum > 0:
        if acc_sum is None:
            raise ValueError("ghm_weights: momentum > 0 needs the acc_sum buffer")
        densities = []
        with torch.no_grad():
            for k in range(num_groups):  # the references' call order: level 0 first, each sees the previous update
                updated = momentum * acc_sum + (1 - momentum) * counts[k].to(acc_sum.dtype)
                acc_sum.copy_(torch.where(nonempty[k], updated, acc_sum))
                densities.append(acc_sum.to(torch.float32, copy=True))
        density = torch.stack(densities)
    else:
        density = counts.to(torch.float32)
    tot = tot.to(torch.float32).reshape(-1, 1)
    per_bin = torch.where(nonempty, tot / density.clamp(min=1e-12), 0.0) / num_nonempty
    per_bin = torch.cat([per_bin.reshape(-1), per_bin.new_zeros(1)])  # the overflow slot weighs 0
    return per_bin[idx]


def _group_totals(values: Tensor, groups: Tensor | None, num_groups: int) -> Tensor:
    """``(num_groups,)`` sums of ``values`` per group (float32); one group when ``groups`` is None.

    ``groups`` is constant along each row (a row's pyramid level, see ``_level_groups``), so each row is summed
    first (``torch.sum`` over its ``C`` values), then each group's rows (``torch.sum`` over the row sums with the
    other groups' rows zeroed): float32 tree reductions, as the references' ``loss.sum()`` of one level. A scatter
    (``index_add_`` of every element) would accumulate the elements one after the other in float32, whose rounding
    grows with the number of elements: 3e-3 relative on a 600k-element level (the value-only difference of issue
    18; the gradients never saw it). Bool ``values`` (element counts) are counted exactly, in integers.
    """
    exact = values.dtype == torch.bool
    if groups is None:
        return (values.sum() if exact else values.to(torch.float32).sum()).to(torch.float32).reshape(1)
    rows = values.reshape(values.shape[0], -1)
    row_sums = rows.sum(1) if exact else rows.to(torch.float32).sum(1)  # int64 counts / float32 sums per row
    row_groups = groups.reshape(groups.shape[0], -1)[:, 0]
    zero = row_sums.new_zeros(())
    totals = torch.stack([torch.where(row_groups == k, row_sums, zero).sum() for k in range(num_groups)])
    return totals.to(torch.float32)


def _reduce(loss: Tensor, weights: Tensor, tot: Tensor, reduction: str, groups: Tensor | None,
            num_groups: int) -> Tensor:
    """``'mean'``: the sum over groups of ``sum(w * loss) / tot`` (mmdet ``weight_reduce_loss(avg_factor=tot)`` of
    each per-level call, then mmdet's sum of the per-level loss list); ``'sum'``: ``sum(w * loss)``; ``'none'``:
    ``w * loss``."""
    loss = loss * weights
    if reduction == "mean":
        return (_group_totals(loss, groups, num_groups) / tot).sum()  # tot >= 1: no epsilon (the references have none)
    if reduction == "sum":
        return loss.sum()
    return loss


def _level_groups(level_ids: Tensor | None, num_levels: int | None, like: Tensor) -> tuple[Tensor | None, int]:
    """Per-element groups of ``like`` (N, K) from per-row ``level_ids`` (N,), and their number."""
    if level_ids is None:
        return None, 1
    if level_ids.shape != like.shape[:1]:
        raise ValueError(f"level_ids of shape {tuple(level_ids.shape)} does not match the {like.shape[0]} rows")
    if num_levels is None:
        num_levels = int(level_ids.max().item()) + 1 if level_ids.numel() else 1
    return level_ids.to(torch.long).reshape(-1, *([1] * (like.dim() - 1))).expand_as(like), num_levels


class _GHMBase(nn.Module):
    """Shared state: the ``edges`` buffer and, with ``momentum > 0``, the ``acc_sum`` running bin densities."""

    #: buffers a checkpoint may lack (MMDetection 1.x kept them as plain attributes); see the module docstring.
    optional_state_keys: tuple[str, ...] = ("edges", "acc_sum")
    #: the heads pass ``level_ids`` / ``num_levels`` to losses that set this (GHM's value depends on the grouping)
    per_level: bool = True

    def __init__(self, bins: int, momentum: float, last_edge: float | None, last_edge_offset: float,
                 loss_weight: float, reduction: str) -> None:
        super().__init__()
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 1:
            raise ValueError(f"{type(self).__name__}: bins must be a positive int, got {bins!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1), got {momentum!r}")
        self.bins = bins
        self.momentum = float(momentum)
        self.loss_weight = loss_weight
        self.reduction = check_reduction(reduction)
        edges = torch.arange(bins + 1, dtype=torch.float32) / bins
        if last_edge is not None:
            edges[-1] = last_edge
        else:
            edges[-1] += last_edge_offset  # so that g == 1 falls in the last bin
        self.register_buffer("edges", edges)
        if self.momentum > 0:
            self.register_buffer("acc_sum", torch.zeros(bins))
        else:
            self.acc_sum = None

    def _update_state(self) -> Tensor | None:
        """``acc_sum`` to update in this call, after remembering its value for :meth:`replay_last_call`."""
        if self.acc_sum is not None:
            self._acc_sum_before_call = self.acc_sum.detach().clone()
        return self.acc_sum

    @contextlib.contextmanager
    def replay_last_call(self) -> Iterator[None]:
        """Within the block, the running densities are those the last call started from, so a second call with
        the same inputs (e.g. the heads' per-prior statistics) gets that call's exact weights; the state after the
        last call is restored on exit."""
        before = getattr(self, "_acc_sum_before_call", None)
        after = None if self.acc_sum is None else self.acc_sum.detach().clone()
        if before is not None and after is not None:
            self.acc_sum.copy_(before)
        try:
            yield
        finally:
            if after is not None:
                self.acc_sum.copy_(after)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in self.optional_state_keys:
            key = prefix + name
            if key in missing_keys:
                missing_keys.remove(key)

    def extra_repr(self) -> str:
        return (f"bins={self.bins}, momentum={self.momentum}, loss_weight={self.loss_weight}, "
                f"reduction={self.reduction!r}")


def _full_weight(weight: Tensor | None, like: Tensor) -> Tensor:
    """``None`` -> ones; a per-row ``(N,)`` weight -> ``(N, K)`` like ``like`` (mmdet expands label weights)."""
    if weight is None:
        return torch.ones_like(like, dtype=torch.float32)
    weight = weight.to(torch.float32)
    if weight.shape == like.shape:
        return weight
    if weight.dim() == like.dim() - 1 and weight.shape == like.shape[:-1]:
        return weight.unsqueeze(-1).expand_as(like)
    raise ValueError(f"weight of shape {tuple(weight.shape)} fits neither {tuple(like.shape)} nor its rows")


@LOSSES.register()
class GHMC(_GHMBase):
    """GHM-C: BCE with gradient-harmonizing weights, ``g = |sigmoid(pred) - target|``.

    Args:
        bins: number of unit regions of [0, 1] (the seed's RetinaNet config: 30).
        momentum: EMA momentum of the bin densities (seed: 0.75); 0 uses each batch's counts.
        use_sigmoid: only ``True`` exists (as in MMDetection).
        loss_weight: scale of the loss.
        reduction: ``'mean'`` (``sum / tot``), ``'sum'`` or ``'none'``.
    """

    def __init__(self, bins: int = 10, momentum: float = 0.0, use_sigmoid: bool = True, loss_weight: float = 1.0,
                 reduction: str = "mean") -> None:
        if not use_sigmoid:
            raise ValueError("GHMC: only use_sigmoid=True is supported (as in MMDetection)")
        super().__init__(bins, momentum, None, 1e-6, loss_weight, reduction)
        self.use_sigmoid = use_sigmoid

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None,
                level_ids: Tensor | None = None, num_levels: int | None = None) -> Tensor:
        """GHM-C loss.

        Args:
            pred: ``(N, C)`` logits.
            target: ``(N,)`` int labels (``C`` or any value outside ``[0, C)`` = background) or ``(N, C)`` floats.
            weight: ``(N,)`` or ``(N, C)`` label weights; elements with weight ``<= 0`` are ignored (the value is
                otherwise unused, as in MMDetection). ``None``: all valid.
            avg_factor: accepted for the heads' common call and ignored (the loss divides by its own ``tot``).
            reduction_override: ``'none'`` / ``'mean'`` / ``'sum'`` for this call.
            level_ids: ``(N,)`` pyramid level of every row, or None (one level). The result is then that of one
                reference call per level (own histogram, own ``tot``, ``acc_sum`` updated level after level),
                summed over the levels, as mmdet sums the per-level loss list.
            num_levels: number of levels (default: ``level_ids.max() + 1``, which costs a host sync).

        Returns:
            A scalar, or ``(N, C)`` with ``reduction='none'``. Updates ``acc_sum`` when ``momentum > 0``.
        """
        reduction = resolve_reduction(self.reduction, reduction_override)
        if target.dim() == pred.dim() - 1:
            target = labels_to_binary(target, pred.size(-1), torch.float32)
        elif target.shape != pred.shape:
            raise ValueError(f"GHMC: target {tuple(target.shape)} fits neither pred {tuple(pred.shape)} nor its labels")
        target = target.to(torch.float32)
        valid = _full_weight(weight, pred) > 0
        groups, num_groups = _level_groups(level_ids, num_levels, pred)
        x = pred.float()
        g = (x.detach().sigmoid() - target).abs()
        tot = _group_totals(valid, groups, num_groups).clamp(min=1)  # valid elements of each level
        weights = ghm_weights(g, valid, self.edges.float(), tot, self._update_state(), self.momentum, groups,
                              num_groups)
        loss = F.binary_cross_entropy_with_logits(x, target, reduction="none")
        return self.loss_weight * _reduce(loss, weights, tot, reduction, groups, num_groups)


@LOSSES.register()
class GHMR(_GHMBase):
    """GHM-R: authentic smooth L1 with gradient-harmonizing weights, ``g = |d| / sqrt(d^2 + mu^2)``.

    Args:
        mu: ASL1's smoothing width (seed: 0.02).
        bins: number of unit regions (seed: 10).
        momentum: EMA momentum of the bin densities (seed: 0.7).
        loss_weight: scale of the loss (seed: 10.0, with ``target_stds`` 1.0).
        reduction: ``'mean'`` (``sum / tot``), ``'sum'`` or ``'none'``.
    """

    def __init__(self, mu: float = 0.02, bins: int = 10, momentum: float = 0.0, loss_weight: float = 1.0,
                 reduction: str = "mean") -> None:
        if mu <= 0:
            raise ValueError(f"GHMR: mu must be > 0, got {mu!r}")
        super().__init__(bins, momentum, 1e3, 0.0, loss_weight, reduction)
        self.mu = mu

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None,
                level_ids: Tensor | None = None, num_levels: int | None = None) -> Tensor:
        """GHM-R loss.

        Args:
            pred, target: ``(P, 4)`` regression deltas (``(P, 4k)`` works too).
            weight: ``(P, 4)`` or per-box ``(P,)`` weights; ``> 0`` marks valid elements and ``tot`` is their sum.
                ``None``: all valid with weight 1 (the RetinaHead passes the positives only, which gives the same
                valid set and ``tot = 4 P`` as MMDetection's call with all anchors and 0/1 ``bbox_weights``).
            avg_factor: accepted and ignored, as in MMDetection.
            reduction_override: ``'none'`` / ``'mean'`` / ``'sum'`` for this call.
            level_ids, num_levels: per-level computation, as :meth:`GHMC.forward`; ``tot`` is then each level's
                sum of weights (``4 P_l`` in the RetinaHead).

        Returns:
            A scalar, or ``pred``'s shape with ``reduction='none'``. Updates ``acc_sum`` when ``momentum > 0``.
        """
        reduction = resolve_reduction(self.reduction, reduction_override)
        if target.shape != pred.shape:
            raise ValueError(f"GHMR: target {tuple(target.shape)} does not match pred {tuple(pred.shape)}")
        label_weight = _full_weight(weight, pred)
        x, t = pred.float(), target.float()
        loss = asl1_loss(x, t, self.mu)
        diff = (x - t).detach()
        g = diff.abs() / torch.sqrt(diff * diff + self.mu * self.mu)
        groups, num_groups = _level_groups(level_ids, num_levels, pred)
        tot = _group_totals(label_weight, groups, num_groups).clamp(min=1)
        weights = ghm_weights(g, label_weight > 0, self.edges.float(), tot, self._update_state(), self.momentum,
                              groups, num_groups)
        return self.loss_weight * _reduce(loss, weights, tot, reduction, groups, num_groups)

    def extra_repr(self) -> str:
        return f"mu={self.mu}, " + super().extra_repr()
