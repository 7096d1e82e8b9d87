"""Batched max-IoU assignment (RetinaNet) and the :class:`AssignResult` shared by all assigners.

Reference: MMDetection 2.x ``MaxIoUAssigner.assign`` / ``assign_wrt_overlaps``
(mmdet/core/bbox/assigners/max_iou_assigner.py), re-expressed over a padded batch with no Python loop over images
or ground truths. Index convention: mmdet's ``0`` (negative) is our ``-1``, mmdet's ``-1`` (ignored: neither
positive nor negative) is our ``-2``, and mmdet's 1-based gt index ``i`` is our 0-based ``i - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from densedet.structures.boxes import PaddedTargets, bbox_overlaps

NEGATIVE = -1
IGNORED = -2


@dataclass
class AssignResult:
    """Assignment of ``N`` priors to padded ground truths, for a batch of ``B`` images.

    Attributes:
        gt_inds: ``(B, N)`` int64: ``>= 0`` index into the image's ``M`` ground truths (positive),
            ``-1`` negative (background), ``-2`` ignored (no loss).
        max_overlaps: ``(B, N)`` float: the IoU the assigner ranked the prior by (see each assigner); 0 in images
            without ground truth.
    """

    gt_inds: Tensor
    max_overlaps: Tensor

    @property
    def pos_mask(self) -> Tensor:
        """``(B, N)`` bool: positives."""
        return self.gt_inds >= 0

    @property
    def neg_mask(self) -> Tensor:
        """``(B, N)`` bool: negatives (background)."""
        return self.gt_inds == NEGATIVE

    @property
    def ignore_mask(self) -> Tensor:
        """``(B, N)`` bool: priors that take no part in the loss."""
        return self.gt_inds == IGNORED

    @property
    def num_pos(self) -> int:
        """Number of positives in the whole batch (synchronises with the device)."""
        return int(self.pos_mask.sum())

    def gather(self, gt_labels: Tensor, gt_boxes: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Per-prior targets.

        Args:
            gt_labels: ``(B, M)`` int64.
            gt_boxes: ``(B, M, 4)`` xyxy.
            num_classes: label given to every non-positive prior (the background index).

        Returns:
            labels ``(B, N)`` int64 (``num_classes`` where not positive) and boxes ``(B, N, 4)`` (0 where not
            positive).
        """
        pos = self.pos_mask
        idx = self.gt_inds.clamp(min=0)
        labels = torch.gather(gt_labels, 1, idx)
        labels = torch.where(pos, labels, labels.new_full((), num_classes))
        boxes = torch.gather(gt_boxes, 1, idx.unsqueeze(-1).expand(-1, -1, gt_boxes.size(-1)))
        boxes = torch.where(pos.unsqueeze(-1), boxes, boxes.new_zeros(()))
        return labels, boxes


def crowd_ignored(priors: Tensor, gt: PaddedTargets, ignore_iof_thr: float) -> Tensor | None:
    """``(B, N)`` bool: priors whose IoF (intersection / prior area) with a valid ignore box exceeds the threshold.

    Returns None when ignoring is disabled (``ignore_iof_thr <= 0``, mmdet's convention) or there are no ignore
    boxes, so callers can skip the work.
    """
    if ignore_iof_thr <= 0 or not bool(gt.ignore_valid.any()):
        return None
    iof = bbox_overlaps(priors, gt.ignore_boxes, mode="iof")  # (B, N, K)
    iof = iof.masked_fill(~gt.ignore_valid[:, None, :], -1.0)
    return iof.amax(dim=-1) > ignore_iof_thr


def broadcast_valid(prior_valid: Tensor | None, batch: int, num_priors: int) -> Tensor | None:
    """Normalise an optional ``(N,)`` or ``(B, N)`` prior validity mask to ``(B, N)`` bool."""
    if prior_valid is None:
        return None
    valid = prior_valid.to(torch.bool)
    if valid.dim() == 1:
        valid = valid.unsqueeze(0)
    if valid.size(-1) != num_priors:
        raise ValueError(f"prior_valid has {valid.size(-1)} priors, expected {num_priors}")
    return valid.expand(batch, num_priors)


@torch.no_grad()
def max_iou_assign(
    priors: Tensor,
    gt: PaddedTargets,
    pos_iou_thr: float = 0.5,
    neg_iou_thr: float | tuple[float, float] = 0.4,
    min_pos_iou: float = 0.0,
    gt_max_assign_all: bool = True,
    match_low_quality: bool = True,
    ignore_iof_thr: float = -1.0,
    prior_valid: Tensor | None = None,
) -> AssignResult:
    """Assign priors to ground truths by IoU (mmdet ``MaxIoUAssigner``).

    Steps, per image: negatives are priors with ``neg_lo <= max IoU < neg_hi`` (``neg_iou_thr`` float means
    ``[0, thr)``); positives have ``max IoU >= pos_iou_thr`` and take their best gt; with ``match_low_quality`` each
    gt whose best IoU is ``>= min_pos_iou`` also claims the prior(s) reaching that IoU (all of them with
    ``gt_max_assign_all``), a later gt overwriting an earlier one as in mmdet's loop. Everything else is ignored.

    Crowd regions: with ``ignore_iof_thr > 0``, priors whose IoF with an ignore box exceeds it get IoU ``-1`` with
    every gt before the thresholds, so they end up ignored (mmdet ``ignore_wrt_candidates=True``). Images without
    ground truth are all negative (mmdet returns before applying ignore regions).

    Args:
        priors: ``(N, 4)`` xyxy anchors shared by the batch, or ``(B, N, 4)`` per-image boxes (e.g. RepPoints'
            refine stage assigns each image's own pseudo boxes).
        gt: padded ground truth of ``B`` images.
        prior_valid: optional ``(N,)`` or ``(B, N)`` bool; invalid priors (outside the image's padded area, see
            ``AnchorGenerator.valid_flags``) are left out of the matching and come back ignored, as mmdet drops
            them before assignment.

    Returns:
        :class:`AssignResult` with ``max_overlaps`` = the best IoU over the image's gts (mmdet: ``-1`` for
        crowd-ignored priors; 0 for invalid priors and images without gt).
    """
    bsz, m = gt.gt_valid.shape
    n = priors.size(-2)
    valid = broadcast_valid(prior_valid, bsz, n)
    if n == 0:
        empty = gt.gt_boxes.new_zeros((bsz, 0))
        return AssignResult(gt_inds=empty.long(), max_overlaps=empty)
    ious = bbox_overlaps(priors, gt.gt_boxes)  # (B, N, M)
    ignored = crowd_ignored(priors, gt, ignore_iof_thr)
    if ignored is not None:
        ious = ious.masked_fill(ignored.unsqueeze(-1), -1.0)
    if valid is not None:
        ious = ious.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    # Padding gts can never win a max over gts.
    ious = ious.masked_fill(~gt.gt_valid.unsqueeze(1), float("-inf"))

    max_ov, argmax = ious.max(dim=2)  # (B, N); ties -> lowest gt index, as torch.max in mmdet
    gt_inds = torch.full_like(argmax, IGNORED)
    if isinstance(neg_iou_thr, (tuple, list)):
        if len(neg_iou_thr) != 2:
            raise ValueError(f"max_iou_assign: neg_iou_thr tuple must be (lo, hi), got {neg_iou_thr}")
        neg_lo, neg_hi = float(neg_iou_thr[0]), float(neg_iou_thr[1])
    else:
        neg_lo, neg_hi = 0.0, float(neg_iou_thr)
    gt_inds = gt_inds.masked_fill((max_ov >= neg_lo) & (max_ov < neg_hi), NEGATIVE)
    gt_inds = torch.where(max_ov >= pos_iou_thr, argmax, gt_inds)

    if match_low_quality:
        gt_max, gt_argmax = ious.max(dim=1)  # (B, M) best IoU of each gt over priors
        gt_ok = (gt_max >= min_pos_iou) & gt.gt_valid
        # int32 keeps the (B, N, M) intermediate below half the size of int64.
        gt_ids = torch.arange(m, device=ious.device, dtype=torch.int32).expand(bsz, m)
        claim = torch.where(gt_ok, gt_ids, -1)  # (B, M)
        if gt_max_assign_all:
            hit = ious == gt_max.unsqueeze(1)  # (B, N, M)
            # mmdet loops i = 0..M-1 and overwrites, so the highest matching gt index wins.
            low = torch.where(hit, claim.unsqueeze(1), -1).amax(dim=2)
        else:
            low = torch.full_like(gt_inds, -1, dtype=torch.int32).scatter_reduce(1, gt_argmax, claim, reduce="amax")
        gt_inds = torch.where(low >= 0, low.long(), gt_inds)

    has_gt = gt.gt_valid.any(dim=1, keepdim=True)  # (B, 1)
    gt_inds = torch.where(has_gt, gt_inds, NEGATIVE)
    max_ov = torch.where(has_gt, max_ov, 0.0)
    if valid is not None:
        gt_inds = torch.where(valid, gt_inds, IGNORED)
        max_ov = torch.where(valid, max_ov, 0.0)
    return AssignResult(gt_inds=gt_inds, max_overlaps=max_ov)
