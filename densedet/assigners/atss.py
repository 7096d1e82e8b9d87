"""Batched ATSS assignment (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via
Adaptive Training Sample Selection", CVPR 2020).

Reference semantics: MMDetection 2.x ``ATSSAssigner.assign`` (mmdet/core/bbox/assigners/atss_assigner.py), here
vectorised over the batch and over ground truths; the only loop is over pyramid levels (top-k per level).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from densedet.assigners.max_iou import IGNORED, NEGATIVE, AssignResult, broadcast_valid, crowd_ignored
from densedet.structures.boxes import PaddedTargets, bbox_overlaps

# mmdet's stand-in for "infinitely far" (crowd-ignored priors) and "no positive" overlap.
INF = 100000000.0


def _centres(boxes: Tensor) -> tuple[Tensor, Tensor]:
    return (boxes[..., 0] + boxes[..., 2]) / 2.0, (boxes[..., 1] + boxes[..., 3]) / 2.0


@torch.no_grad()
def atss_assign(
    priors: Tensor,
    num_level_priors: Sequence[int],
    gt: PaddedTargets,
    topk: int = 9,
    ignore_iof_thr: float = -1.0,
    prior_valid: Tensor | None = None,
) -> AssignResult:
    """Adaptive training sample selection.

    Per image and gt: on every level take the ``min(topk, level size)`` priors whose centres are closest (L2) to
    the gt centre; the IoU threshold is mean + std (unbiased) of these candidates' IoUs; candidates with
    ``IoU >= threshold`` whose centre lies inside the gt (smallest side distance ``> 0.01``) are positive. A prior
    positive for several gts takes the one with the highest IoU (ties: lowest gt index).

    Crowd regions (``ignore_iof_thr > 0``): priors whose IoF with an ignore box exceeds the threshold are moved
    "infinitely" far (mmdet's ``INF``) and marked ignored, unless they still end up positive (mmdet order).
    Images without ground truth are all negative.

    Args:
        priors: ``(N, 4)`` xyxy anchors of all levels, level-major (as ``AnchorGenerator.grid_priors`` concatenated).
        num_level_priors: number of priors of each level; sums to ``N``.
        gt: padded ground truth of ``B`` images.
        prior_valid: optional ``(N,)`` / ``(B, N)`` bool; invalid priors are excluded from candidates (mmdet
            drops them before assignment, so a level then offers ``min(topk, valid priors of the level)``) and come
            back ignored.

    Returns:
        :class:`AssignResult`; ``max_overlaps`` is the IoU with the assigned gt for positives and 0 elsewhere
        (mmdet leaves its ``-INF`` sentinel there; nothing reads it).
    """
    bsz, m = gt.gt_valid.shape
    n = priors.size(0)
    if sum(num_level_priors) != n:
        raise ValueError(
            f"atss_assign: num_level_priors {list(num_level_priors)} sum to "
            f"{sum(num_level_priors)}, but there are {n} priors"
        )
    valid = broadcast_valid(prior_valid, bsz, n)
    gt_inds = torch.full((bsz, n), NEGATIVE, dtype=torch.long, device=priors.device)
    max_overlaps = priors.new_zeros((bsz, n))
    if n == 0:
        return AssignResult(gt_inds=gt_inds, max_overlaps=max_overlaps)

    ious = bbox_overlaps(priors, gt.gt_boxes)  # (B, N, M)
    pcx, pcy = _centres(priors)  # (N,)
    gcx, gcy = _centres(gt.gt_boxes)  # (B, M)
    dist = ((pcx[None, :, None] - gcx[:, None, :]) ** 2 + (pcy[None, :, None] - gcy[:, None, :]) ** 2).sqrt()

    ignored = crowd_ignored(priors, gt, ignore_iof_thr)
    if ignored is not None:
        dist = dist.masked_fill(ignored.unsqueeze(-1), INF)
        gt_inds = gt_inds.masked_fill(ignored, IGNORED)
    if valid is not None:
        # Farther than any crowd-ignored prior, and recognisable below so such candidates can be dropped.
        dist = dist.masked_fill(~valid.unsqueeze(-1), float("inf"))

    # Candidates: per level, the k closest priors to each gt -> (B, K, M) prior indices.
    cands = []
    start = 0
    for count in num_level_priors:
        k = min(topk, count)
        if k > 0:
            idx = dist[:, start : start + count].topk(k, dim=1, largest=False).indices
            cands.append(idx + start)
        start += count
    cand = torch.cat(cands, dim=1)
    cand_iou = ious.gather(1, cand)  # (B, K, M)

    if valid is None:
        thr = cand_iou.mean(dim=1) + cand_iou.std(dim=1)  # unbiased std, as mmdet
        cand_ok = None
    else:
        cand_ok = valid.unsqueeze(-1).expand(-1, -1, m).gather(1, cand)  # (B, K, M)
        cnt = cand_ok.sum(dim=1)
        mean = (cand_iou * cand_ok).sum(dim=1) / cnt
        var = (((cand_iou - mean.unsqueeze(1)) ** 2) * cand_ok).sum(dim=1) / (cnt - 1)
        thr = mean + var.sqrt()
    is_pos = cand_iou >= thr.unsqueeze(1)

    # Candidate centre strictly inside its gt.
    ccx, ccy = pcx[cand], pcy[cand]  # (B, K, M)
    boxes = gt.gt_boxes.unsqueeze(1)  # (B, 1, M, 4)
    side = torch.stack((ccx - boxes[..., 0], ccy - boxes[..., 1], boxes[..., 2] - ccx, boxes[..., 3] - ccy), dim=-1)
    is_pos &= side.amin(dim=-1) > 0.01
    is_pos &= gt.gt_valid.unsqueeze(1)
    if cand_ok is not None:
        is_pos &= cand_ok

    # Scatter positive candidates' IoUs back to (B, N, M); indices are unique per (image, gt) column.
    ov = torch.full_like(ious, -INF)
    ov.scatter_(1, cand, torch.where(is_pos, cand_iou, -INF))
    best, best_gt = ov.max(dim=2)  # (B, N)
    pos = best != -INF
    gt_inds = torch.where(pos, best_gt, gt_inds)
    max_overlaps = torch.where(pos, best, max_overlaps)

    has_gt = gt.gt_valid.any(dim=1, keepdim=True)
    gt_inds = torch.where(has_gt, gt_inds, NEGATIVE)
    max_overlaps = torch.where(has_gt, max_overlaps, 0.0)
    if valid is not None:
        gt_inds = torch.where(valid, gt_inds, IGNORED)
    return AssignResult(gt_inds=gt_inds, max_overlaps=max_overlaps)
