"""Batched point assignment (RepPoints init stage).

Reference: MMDetection 2.x ``PointAssigner.assign`` (mmdet/core/bbox/assigners/point_assigner.py), read and
re-expressed over a padded batch without the loop over ground truths. The rule, per image:

1. a gt's pyramid level is ``trunc((log2(w / scale) + log2(h / scale)) / 2)`` clamped to the levels present;
2. the gt claims the ``pos_num`` points of that level nearest to its centre, distance
   ``|| (p - c) / (w, h) ||_2`` (centre offset measured in gt widths / heights);
3. a point claimed by several gts goes to the nearest one. mmdet visits gts in order and overwrites only on a
   strictly smaller distance, so on equal distances the lowest gt index wins; the same holds here.

Every other valid point is negative; nothing is ignored except points that are not valid.
"""

from __future__ import annotations

import torch
from torch import Tensor

from densedet.assigners.max_iou import IGNORED, NEGATIVE, AssignResult, broadcast_valid
from densedet.structures.boxes import PaddedTargets


@torch.no_grad()
def point_assign(
    points: Tensor,
    strides: Tensor,
    gt: PaddedTargets,
    scale: float = 4,
    pos_num: int = 3,
    prior_valid: Tensor | None = None,
) -> AssignResult:
    """Assign points to ground truths by pyramid level and normalised centre distance (mmdet ``PointAssigner``).

    Args:
        points: ``(N, 2)`` point coordinates ``(x, y)`` in image pixels, shared by the batch.
        strides: ``(N,)`` stride of each point's level (a power of two); the level is ``log2(stride)``.
        gt: padded ground truth of ``B`` images (``ignore_boxes`` are unused, as in mmdet).
        scale: box size, in pixels, that maps to level 0 (``log2(sqrt(w * h) / scale)`` picks the level).
        pos_num: how many nearest points of its level each gt claims.
        prior_valid: optional ``(N,)`` or ``(B, N)`` bool; invalid points (on batch padding) take no part and
            come back ignored (mmdet drops them before assignment).

    Returns:
        :class:`AssignResult`: ``gt_inds`` ``(B, N)``; ``max_overlaps`` is zero (this assigner ranks by distance,
        not IoU).

    Ties between points at equal distance from a gt go to the lower point index (mmdet's ``topk`` leaves that
    order unspecified).
    """
    if pos_num < 1:
        raise ValueError(f"point_assign: pos_num must be >= 1, got {pos_num}")
    bsz, m = gt.gt_valid.shape
    n = points.size(0)
    if strides.shape != (n,):
        raise ValueError(f"point_assign: strides must be ({n},), got {tuple(strides.shape)}")
    valid = broadcast_valid(prior_valid, bsz, n)
    zeros = points.new_zeros((bsz, n))
    if n == 0:
        return AssignResult(gt_inds=zeros.long(), max_overlaps=zeros)

    points_lvl = torch.log2(strides.float()).trunc()  # (N,)
    boxes = gt.gt_boxes.float()
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # (B, M, 2)
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-6)
    # mmdet casts with .int(), i.e. truncation towards zero
    gt_lvl = ((torch.log2(wh[..., 0] / scale) + torch.log2(wh[..., 1] / scale)) / 2).trunc()
    gt_lvl = gt_lvl.clamp(min=points_lvl.min(), max=points_lvl.max())  # (B, M)

    # (B, M, N) normalised distance of every point to every gt centre, inf where the point cannot be chosen
    d = (points.float()[None, None] - centre[:, :, None]) / wh[:, :, None]
    dist = d.norm(dim=-1)
    usable = (points_lvl[None, None] == gt_lvl[..., None]) & gt.gt_valid[..., None]
    if valid is not None:
        usable = usable & valid[:, None]
    dist = dist.masked_fill(~usable, float("inf"))

    k = min(pos_num, n)
    if k == 1:
        near_d, near_i = dist.min(dim=-1, keepdim=True)  # first minimum on ties
    else:
        near_d, near_i = dist.sort(dim=-1, stable=True)
        near_d, near_i = near_d[..., :k], near_i[..., :k]
    claimed = torch.full_like(dist, float("inf")).scatter_(2, near_i, near_d)  # (B, M, N)
    best_d, best_gt = claimed.min(dim=1)  # (B, N); ties -> lowest gt index, as mmdet's strict '<'
    gt_inds = torch.where(torch.isfinite(best_d), best_gt, NEGATIVE)
    if valid is not None:
        gt_inds = torch.where(valid, gt_inds, IGNORED)
    return AssignResult(gt_inds=gt_inds, max_overlaps=zeros)
