"""Soft-NMS (Bodla et al., "Soft-NMS -- Improving Object Detection With One Line of Code", ICCV 2017), batched.

Semantics of mmcv 1.x ``soft_nms`` (mmcv/ops/nms.py and its CPU kernel ``softnms_cpu``) as called class-wise by
``batched_nms`` with ``nms_cfg.type == 'soft_nms'`` (MMDetection 2.x dense heads, e.g. VFNet-X):

- repeatedly take the remaining box with the highest (current) score of its group and keep it;
- every other remaining box ``b`` of that group gets ``score *= w(iou(kept, b))`` with
  ``'linear'``: ``w = 1 - iou`` if ``iou >= iou_threshold`` else 1; ``'gaussian'``: ``w = exp(-iou^2 / sigma)``
  (no threshold); ``'naive'``: ``w = 0`` if ``iou >= iou_threshold`` else 1 (hard NMS that keeps score-0 boxes
  when ``min_score`` is 0);
- a remaining box whose decayed score falls below ``min_score`` is dropped.

The algorithm is sequential within a group, but groups (image x class) are independent: they are padded into a
``(G, M)`` table and every step selects one box in *all* groups at once, so the Python loop runs
``max group size`` times (at most ``max_per_group``), not once per box per class.
"""

from __future__ import annotations

import torch
from torch import Tensor

SOFT_NMS_METHODS = ("linear", "gaussian", "naive")


def _iou_one_to_many(box: Tensor, boxes: Tensor, areas: Tensor) -> Tensor:
    """IoU of ``box`` (G, 4) with each row of ``boxes`` (G, M, 4) -> (G, M); xyxy, no +1 (mmcv ``offset=0``)."""
    lt = torch.maximum(box[:, None, :2], boxes[..., :2])
    rb = torch.minimum(box[:, None, 2:], boxes[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area = ((box[:, 2] - box[:, 0]).clamp(min=0) * (box[:, 3] - box[:, 1]).clamp(min=0))[:, None]
    # degenerate pairs (both empty) would divide 0 by 0; their IoU is 0
    return inter / (area + areas - inter).clamp(min=torch.finfo(boxes.dtype).tiny)


def batched_soft_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
                     min_score: float = 1e-3, method: str = "linear",
                     max_per_group: int | None = None) -> tuple[Tensor, Tensor]:
    """Soft-NMS within each group of ``idxs`` (e.g. ``image * num_classes + label``), all groups together.

    Args:
        boxes: (N, 4) xyxy; scores: (N,); idxs: (N,) long group of every box.
        iou_threshold, sigma, min_score, method: as mmcv ``soft_nms`` (defaults are mmcv's).
        max_per_group: stop after this many kept boxes per group (exact: a group's later selections have lower
            scores, so callers that keep ``max_per_img`` per image lose nothing with ``max_per_group=max_per_img``).

    Returns:
        ``(keep, new_scores)``: (K,) indices into the inputs and (K,) decayed scores, sorted by decreasing decayed
        score (the order of mmcv ``batched_nms`` output).

    Boxes whose *initial* score is below ``min_score`` are dropped up front. mmcv drops them too, except that its
    one call per image exempts that image's very first pick, so an image whose every candidate is below
    ``min_score`` keeps one box there; the reference configs' ``score_thr`` (0.05) is above ``min_score`` (1e-3).
    """
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"soft-NMS method must be one of {SOFT_NMS_METHODS}, got {method!r}")
    device = boxes.device
    alive = (scores >= min_score).nonzero(as_tuple=True)[0]
    if alive.numel() == 0:
        return alive, scores.new_zeros(0)
    # sort by group, best score first inside a group, so the padded table is dense on the left
    order = alive[scores[alive].argsort(descending=True, stable=True)]
    order = order[idxs[order].argsort(stable=True)]
    _, counts = torch.unique_consecutive(idxs[order], return_counts=True)
    num_groups, width = counts.numel(), int(counts.max())
    group = torch.repeat_interleave(torch.arange(num_groups, device=device), counts)
    pos = torch.arange(order.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[group]

    table = boxes.new_zeros(num_groups, width, 4, dtype=torch.float32)
    table[group, pos] = boxes[order].float()
    cur = scores.new_zeros(num_groups, width, dtype=torch.float32)
    cur[group, pos] = scores[order].float()
    active = torch.zeros(num_groups, width, dtype=torch.bool, device=device)
    active[group, pos] = True
    source = torch.full((num_groups, width), -1, dtype=torch.long, device=device)
    source[group, pos] = order
    areas = (table[..., 2] - table[..., 0]).clamp(min=0) * (table[..., 3] - table[..., 1]).clamp(min=0)
    rows = torch.arange(num_groups, device=device)

    steps = width if max_per_group is None else min(width, int(max_per_group))
    picked_rows, picked_cols, picked_scores = [], [], []
    for _ in range(steps):
        has = active.any(1)
        if not bool(has.any()):
            break
        best_score, best = cur.masked_fill(~active, float("-inf")).max(1)
        picked_rows.append(rows[has])
        picked_cols.append(best[has])
        picked_scores.append(best_score[has])
        active[rows[has], best[has]] = False
        iou = _iou_one_to_many(table[rows, best], table, areas)
        if method == "linear":
            weight = torch.where(iou >= iou_threshold, 1.0 - iou, torch.ones_like(iou))
        elif method == "gaussian":
            weight = torch.exp(-(iou * iou) / sigma)
        else:
            weight = torch.where(iou >= iou_threshold, torch.zeros_like(iou), torch.ones_like(iou))
        cur = torch.where(active, cur * weight, cur)
        active &= cur >= min_score

    if not picked_rows:
        return alive[:0], scores.new_zeros(0)
    r, c = torch.cat(picked_rows), torch.cat(picked_cols)
    new_scores = torch.cat(picked_scores)
    srt = new_scores.argsort(descending=True, stable=True)
    return source[r, c][srt], new_scores[srt].to(scores.dtype)
