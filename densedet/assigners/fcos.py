"""Batched FCOS target assignment (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", ICCV 2019).

Reference semantics: MMDetection 2.x ``FCOSHead.get_targets`` / ``_get_target_single``
(mmdet/models/dense_heads/fcos_head.py), vectorised over the batch and ground truths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from densedet.assigners.max_iou import NEGATIVE, AssignResult
from densedet.structures.boxes import PaddedTargets, box_area

# mmdet's "no gt" area; a gt with area >= INF could never be matched there either.
INF = 100000000.0
DEFAULT_REGRESS_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


def expand_regress_ranges(
    ranges: Sequence[Sequence[float]],
    num_level_points: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-point regress ranges ``(N, 2)`` from one ``(lo, hi)`` per level and the number of points per level."""
    if len(ranges) != len(num_level_points):
        raise ValueError(f"expand_regress_ranges: {len(ranges)} ranges for {len(num_level_points)} levels")
    r = torch.tensor([list(x) for x in ranges], dtype=dtype, device=device)
    counts = torch.as_tensor(list(num_level_points), device=r.device)
    return r.repeat_interleave(counts, dim=0)


def expand_strides(
    strides: Sequence[float],
    num_level_points: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-point strides ``(N,)`` from one stride per level."""
    if len(strides) != len(num_level_points):
        raise ValueError(f"expand_strides: {len(strides)} strides for {len(num_level_points)} levels")
    s = torch.tensor([float(x) for x in strides], dtype=dtype, device=device)
    return s.repeat_interleave(torch.as_tensor(list(num_level_points), device=s.device))


@torch.no_grad()
def fcos_assign(
    points: Tensor,
    strides: Tensor,
    regress_ranges: Tensor,
    gt: PaddedTargets,
    center_sampling: bool = False,
    center_sample_radius: float = 1.5,
) -> tuple[AssignResult, Tensor]:
    """Assign each point to the smallest gt that contains it and whose extent fits the point's level.

    A point is a candidate for a gt when it lies strictly inside the gt (or, with ``center_sampling``, strictly
    inside the box of half-size ``stride * center_sample_radius`` around the gt centre, clipped to the gt) and its
    largest distance to the gt sides is within ``[lo, hi]`` of its regress range. Among candidates the gt of
    smallest area wins (ties: lowest index); points with no candidate are background.

    Args:
        points: ``(N, 2)`` point coordinates (x, y) of all levels, level-major.
        strides: ``(N,)`` stride of each point's level (see :func:`expand_strides`).
        regress_ranges: ``(N, 2)`` (see :func:`expand_regress_ranges`).
        gt: padded ground truth of ``B`` images.

    Returns:
        ``(result, bbox_targets)``: :class:`AssignResult` (no ignored points; ``max_overlaps`` is 0 since FCOS
        ranks by area, not IoU) and ``(B, N, 4)`` distances (left, top, right, bottom) in pixels to the assigned
        gt, not divided by the stride; 0 for background points (mmdet leaves an unused value there).
    """
    bsz, m = gt.gt_valid.shape
    n = points.size(0)
    boxes = gt.gt_boxes.unsqueeze(1)  # (B, 1, M, 4)
    xs = points[:, 0].view(1, n, 1)
    ys = points[:, 1].view(1, n, 1)
    left = xs - boxes[..., 0]
    top = ys - boxes[..., 1]
    right = boxes[..., 2] - xs
    bottom = boxes[..., 3] - ys
    targets = torch.stack((left, top, right, bottom), dim=-1)  # (B, N, M, 4)

    if center_sampling:
        cx = (boxes[..., 0] + boxes[..., 2]) / 2
        cy = (boxes[..., 1] + boxes[..., 3]) / 2
        radius = (strides * center_sample_radius).view(1, n, 1)
        # Centre box clipped to the gt (mmdet's torch.where comparisons are max/min).
        x0 = torch.maximum(cx - radius, boxes[..., 0])
        y0 = torch.maximum(cy - radius, boxes[..., 1])
        x1 = torch.minimum(cx + radius, boxes[..., 2])
        y1 = torch.minimum(cy + radius, boxes[..., 3])
        inside = torch.stack((xs - x0, ys - y0, x1 - xs, y1 - ys), dim=-1).amin(dim=-1) > 0
    else:
        inside = targets.amin(dim=-1) > 0  # (B, N, M)

    max_dist = targets.amax(dim=-1)
    in_range = (max_dist >= regress_ranges[:, 0].view(1, n, 1)) & (max_dist <= regress_ranges[:, 1].view(1, n, 1))
    areas = box_area(gt.gt_boxes).unsqueeze(1).expand(bsz, n, m)
    ok = inside & in_range & gt.gt_valid.unsqueeze(1)
    areas = torch.where(ok, areas, INF)
    min_area, min_idx = areas.min(dim=2)  # (B, N); ties -> lowest gt index
    pos = min_area != INF

    gt_inds = torch.where(pos, min_idx, NEGATIVE)
    bbox_targets = targets.gather(2, min_idx.view(bsz, n, 1, 1).expand(-1, -1, 1, 4)).squeeze(2)
    bbox_targets = torch.where(pos.unsqueeze(-1), bbox_targets, 0.0)
    return AssignResult(gt_inds=gt_inds, max_overlaps=points.new_zeros((bsz, n))), bbox_targets


def fcos_assign_levels(
    points: Tensor,
    num_level_points: Sequence[int],
    strides: Sequence[float],
    regress_ranges: Sequence[Sequence[float]],
    gt: PaddedTargets,
    center_sampling: bool = False,
    center_sample_radius: float = 1.5,
) -> tuple[AssignResult, Tensor]:
    """:func:`fcos_assign` with one stride and one ``(lo, hi)`` regress range per level (a head's settings),
    expanded to the ``(N, 2)`` points of those levels."""
    return fcos_assign(points, expand_strides(strides, num_level_points, points.device),
                       expand_regress_ranges(regress_ranges, num_level_points, points.device), gt,
                       center_sampling=center_sampling, center_sample_radius=center_sample_radius)
