"""Batched FoveaBox target assignment (Kong et al., "FoveaBox: Beyond Anchor-based Object Detector", TIP 2020).

Reference semantics: ``FoveaHead._get_target_single`` in hyz-xmaster/VarifocalNet
(mmdet/models/dense_heads/fovea_head.py, identical in MMDetection 2.x), vectorised over images, levels and gts:

* a gt goes to every level whose scale range ``[lo, hi]`` contains ``sqrt(w * h)`` (bounds inclusive, so a gt
  may go to two levels);
* on such a level its positives are the locations ``(i, j)`` of the "fovea", the centre part of the box shrunk by
  ``sigma`` in feature units: ``j`` in ``[ceil(x1/s + (1-sigma)*w/(2s) - 0.5), floor(x1/s + (1+sigma)*w/(2s) - 0.5)]``
  (each bound clamped to ``[0, W-1]``), likewise for ``i``;
* where fovea regions of several gts overlap, the reference paints gts in order of decreasing scale, so the
  *smallest* gt wins (equal scales: the reference's unstable sort leaves the order open; here the gt of higher
  index wins, as a stable sort would give);
* regression targets are the distances from the location ``((j+0.5)*s, (i+0.5)*s)`` to the gt sides divided by
  the level's ``base_edge``, clamped to ``[1/16, 16]`` and taken in log space.

No location is ignored: the reference has no ignore regions (``gt_bboxes_ignore`` is unused), and every location
of the padded feature map takes part (no valid-flag mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from densedet.assigners.max_iou import NEGATIVE, AssignResult
from densedet.structures.boxes import PaddedTargets

# Bounds of the normalised distances before the log (reference: ``bbox_targets.clamp(min=1. / 16, max=16.)``).
TARGET_MIN = 1.0 / 16
TARGET_MAX = 16.0


def fovea_grid(featmap_sizes: Sequence[tuple[int, int]], device: torch.device | str | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Row, column and level of every location of all levels, flattened level-major and row-major.

    Returns:
        ``(rows, cols, levels)``, each ``(N,)`` int64 with ``N = sum(H_l * W_l)``.
    """
    rows, cols, levels = [], [], []
    for lvl, (h, w) in enumerate(featmap_sizes):  # builds the index grid only; a handful of levels
        rows.append(torch.arange(h, device=device).repeat_interleave(w))
        cols.append(torch.arange(w, device=device).repeat(h))
        levels.append(torch.full((h * w,), lvl, dtype=torch.long, device=device))
    return torch.cat(rows), torch.cat(cols), torch.cat(levels)


@torch.no_grad()
def fovea_assign(
    featmap_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    base_edges: Sequence[float],
    scale_ranges: Sequence[Sequence[float]],
    gt: PaddedTargets,
    sigma: float = 0.4,
) -> tuple[AssignResult, Tensor]:
    """FoveaBox targets for a padded batch.

    Args:
        featmap_sizes: ``(H_l, W_l)`` of every level (of the padded batch).
        strides: stride of every level, in pixels.
        base_edges: ``base_edge_list``, the normaliser of every level's distances.
        scale_ranges: ``(lo, hi)`` of ``sqrt(w * h)`` for every level (inclusive).
        gt: padded ground truth of ``B`` images (``xyxy`` absolute pixels); padding gts are never assigned.
        sigma: shrink factor of the fovea region (the fraction of the half-size kept around the centre).

    Returns:
        ``(result, bbox_targets)``: :class:`AssignResult` over the ``N`` locations of all levels (level-major,
        row-major; ``gt_inds`` ``>= 0`` positive gt index, ``-1`` negative; ``max_overlaps`` 0 since nothing is
        ranked by IoU) and ``(B, N, 4)`` log-space targets ``log(clamp(d / base_edge, 1/16, 16))`` for the
        distances ``d`` = (left, top, right, bottom) to the assigned gt; 0 (= log 1, the reference's filler)
        elsewhere.
    """
    num_levels = len(featmap_sizes)
    if not (len(strides) == len(base_edges) == len(scale_ranges) == num_levels):
        raise ValueError(f"fovea_assign: {num_levels} levels but {len(strides)} strides, {len(base_edges)} "
                         f"base edges and {len(scale_ranges)} scale ranges")
    boxes = gt.gt_boxes.float()  # (B, M, 4)
    device = boxes.device
    bsz, m = gt.gt_valid.shape
    rows, cols, levels = fovea_grid(featmap_sizes, device)
    n = rows.numel()

    stride = torch.tensor([float(s) for s in strides], device=device)  # (L,)
    ranges = torch.tensor([[float(v) for v in r] for r in scale_ranges], device=device)  # (L, 2)
    sizes = torch.tensor([list(s) for s in featmap_sizes], device=device)  # (L, 2) (H, W)

    # gt scale sqrt(w*h); an inverted box gives NaN and so fails every range test (as in the reference).
    scale = torch.sqrt((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))  # (B, M)
    hit = (scale[:, None] >= ranges[None, :, 0, None]) & (scale[:, None] <= ranges[None, :, 1, None])
    hit = hit & gt.gt_valid[:, None]  # (B, L, M)

    # Fovea bounds per (image, level, gt), in the reference's order of float32 operations.
    fb = boxes[:, None] / stride[None, :, None, None]  # (B, L, M, 4) in feature units
    half_w = 0.5 * (fb[..., 2] - fb[..., 0])
    half_h = 0.5 * (fb[..., 3] - fb[..., 1])
    max_x = (sizes[:, 1] - 1)[None, :, None]
    max_y = (sizes[:, 0] - 1)[None, :, None]
    zero = torch.zeros((), dtype=torch.long, device=device)

    def clamp(v: Tensor, hi: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(v.long(), zero), hi)

    left = clamp(torch.ceil(fb[..., 0] + (1 - sigma) * half_w - 0.5), max_x)
    right = clamp(torch.floor(fb[..., 0] + (1 + sigma) * half_w - 0.5), max_x)
    top = clamp(torch.ceil(fb[..., 1] + (1 - sigma) * half_h - 0.5), max_y)
    down = clamp(torch.floor(fb[..., 1] + (1 + sigma) * half_h - 0.5), max_y)

    # (B, N, M): location inside the gt's fovea on its own level.
    col = cols.view(1, n, 1)
    row = rows.view(1, n, 1)
    inside = (hit[:, levels] & (col >= left[:, levels]) & (col <= right[:, levels])
              & (row >= top[:, levels]) & (row <= down[:, levels]))

    # Painting order of the reference: decreasing scale; the last painted (smallest) gt wins.
    order = torch.sort(-torch.nan_to_num(scale, nan=0.0), dim=1, stable=True).indices  # (B, M)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(m, device=device).expand(bsz, m))
    cand = torch.where(inside, rank[:, None, :], torch.full((), -1, dtype=torch.long, device=device))
    best_rank, best = cand.max(dim=2)  # ranks are distinct within an image, so the winner is unique
    pos = best_rank >= 0

    # Normalised log-space distances from the location centre to the winning gt's sides.
    s_pt = stride[levels]
    edge = torch.tensor([float(e) for e in base_edges], device=device)[levels]
    px = s_pt * (cols.float() + 0.5)
    py = s_pt * (rows.float() + 0.5)
    g = boxes.gather(1, best.unsqueeze(-1).expand(-1, -1, 4))  # (B, N, 4)
    dist = torch.stack((px - g[..., 0], py - g[..., 1], g[..., 2] - px, g[..., 3] - py), dim=-1)
    targets = torch.log((dist / edge[None, :, None]).clamp(min=TARGET_MIN, max=TARGET_MAX))
    targets = torch.where(pos.unsqueeze(-1), targets, targets.new_zeros(()))

    gt_inds = torch.where(pos, best, torch.full((), NEGATIVE, dtype=torch.long, device=device))
    return AssignResult(gt_inds=gt_inds, max_overlaps=boxes.new_zeros((bsz, n))), targets
