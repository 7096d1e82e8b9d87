"""Box coders: anchor deltas (RetinaNet/ATSS) and point distances (FCOS/VFNet).

Semantics follow MMDetection 2.x ``DeltaXYWHBBoxCoder`` (delta_xywh_bbox_coder.py: ``bbox2delta`` /
``delta2bbox``) and ``DistancePointBBoxCoder`` (``bbox2distance`` / ``distance2bbox`` in mmdet/core/bbox/transforms.py).
Both coders broadcast over leading dims, so one ``(N, 4)`` prior set decodes a whole ``(B, N, 4)`` batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def clip_boxes(boxes: Tensor, max_shape: tuple[int, int] | Sequence[int] | Tensor) -> Tensor:
    """Clip ``(..., 4)`` xyxy boxes to ``[0, w] x [0, h]``.

    ``max_shape`` is ``(h, w)`` (extra trailing entries such as channels are ignored) or a ``(B, 2)`` tensor of
    per-image ``(h, w)`` for boxes of shape ``(B, N, 4)``; a ``(1, 2)`` tensor is one shape for the whole batch (the
    exported graph's dynamic batch: its images share one size).
    """
    if not isinstance(max_shape, Tensor):
        max_shape = boxes.new_tensor(list(max_shape)[:2])
    max_shape = max_shape[..., :2].to(device=boxes.device, dtype=boxes.dtype)
    if max_shape.dim() == 2:
        if boxes.dim() != 3 or (max_shape.size(0) != 1 and max_shape.size(0) != boxes.size(0)):
            raise ValueError(
                f"clip_boxes: per-image max_shape {tuple(max_shape.shape)} needs boxes (B, N, 4) with "
                f"the same B, got {tuple(boxes.shape)}"
            )
        max_xy = max_shape.flip(-1).repeat(1, 2).unsqueeze(-2)  # (B, 1, 4) = (w, h, w, h)
    else:
        max_xy = max_shape.flip(-1).repeat(2)  # (4,)
    # min/max rather than clamp so a tensor bound works per image; NaNs propagate as in mmdet's torch.where.
    return torch.minimum(torch.maximum(boxes, boxes.new_zeros(())), max_xy)


def _float(t: Tensor) -> Tensor:
    # mmdet computes targets in float32; keep float64 inputs as they are.
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class DeltaXYWHBBoxCoder:
    """Encode xyxy boxes as normalised ``(dx, dy, dw, dh)`` offsets w.r.t. priors (R-CNN parametrisation).

    Args:
        target_means, target_stds: deltas are ``(raw - mean) / std``.
        clip_border: clip decoded boxes to ``max_shape`` when one is given.
        add_ctr_clamp: clamp the centre shift to ``+-ctr_clamp`` pixels and ``dw, dh`` only from above (YOLOF).
        ctr_clamp: the maximum centre shift in pixels.
    """

    def __init__(
        self,
        target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        clip_border: bool = True,
        add_ctr_clamp: bool = False,
        ctr_clamp: float = 32,
    ) -> None:
        if len(target_means) != 4 or len(target_stds) != 4:
            raise ValueError(
                f"DeltaXYWHBBoxCoder: target_means/target_stds need 4 values, got {target_means}, {target_stds}"
            )
        self.means = tuple(float(m) for m in target_means)
        self.stds = tuple(float(s) for s in target_stds)
        self.clip_border = clip_border
        self.add_ctr_clamp = add_ctr_clamp
        self.ctr_clamp = ctr_clamp

    def encode(self, priors: Tensor, gt: Tensor) -> Tensor:
        """Deltas turning ``priors`` into ``gt``.

        Args:
            priors: ``(..., 4)`` xyxy; broadcasts against ``gt``.
            gt: ``(..., 4)`` xyxy.

        Returns:
            ``(..., 4)`` normalised ``(dx, dy, dw, dh)``.
        """
        priors, gt = _float(priors), _float(gt)
        px = (priors[..., 0] + priors[..., 2]) * 0.5
        py = (priors[..., 1] + priors[..., 3]) * 0.5
        pw = priors[..., 2] - priors[..., 0]
        ph = priors[..., 3] - priors[..., 1]
        gx = (gt[..., 0] + gt[..., 2]) * 0.5
        gy = (gt[..., 1] + gt[..., 3]) * 0.5
        gw = gt[..., 2] - gt[..., 0]
        gh = gt[..., 3] - gt[..., 1]
        deltas = torch.stack(((gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)), dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(
        self,
        priors: Tensor,
        deltas: Tensor,
        max_shape: tuple[int, int] | Sequence[int] | Tensor | None = None,
        wh_ratio_clip: float = 16 / 1000,
    ) -> Tensor:
        """Apply ``deltas`` to ``priors``.

        Args:
            priors: ``(..., 4)`` xyxy, e.g. ``(N, 4)`` shared by the batch or ``(B, N, 4)``.
            deltas: ``(..., 4)`` normalised deltas, e.g. ``(B, N, 4)``.
            max_shape: ``(h, w)`` or a ``(B, 2)`` tensor of per-image ``(h, w)``; used when ``clip_border``.
            wh_ratio_clip: ``dw, dh`` are clamped to ``+-|log(wh_ratio_clip)|`` so ``exp`` cannot overflow.

        Returns:
            ``(..., 4)`` xyxy boxes.
        """
        if deltas.size(-1) != 4:
            raise ValueError(f"DeltaXYWHBBoxCoder.decode: deltas must end in 4, got {tuple(deltas.shape)}")
        d = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dx, dy, dw, dh = d.unbind(-1)
        px = (priors[..., 0] + priors[..., 2]) * 0.5
        py = (priors[..., 1] + priors[..., 3]) * 0.5
        pw = priors[..., 2] - priors[..., 0]
        ph = priors[..., 3] - priors[..., 1]
        dx_width = pw * dx
        dy_height = ph * dy
        max_ratio = abs(math.log(wh_ratio_clip))
        if self.add_ctr_clamp:
            dx_width = dx_width.clamp(min=-self.ctr_clamp, max=self.ctr_clamp)
            dy_height = dy_height.clamp(min=-self.ctr_clamp, max=self.ctr_clamp)
            dw = dw.clamp(max=max_ratio)
            dh = dh.clamp(max=max_ratio)
        else:
            dw = dw.clamp(min=-max_ratio, max=max_ratio)
            dh = dh.clamp(min=-max_ratio, max=max_ratio)
        gw = pw * dw.exp()
        gh = ph * dh.exp()
        gx = px + dx_width
        gy = py + dy_height
        boxes = torch.stack((gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5), dim=-1)
        if self.clip_border and max_shape is not None:
            boxes = clip_boxes(boxes, max_shape)
        return boxes


class DistancePointBBoxCoder:
    """Encode xyxy boxes as ``(left, top, right, bottom)`` distances from points (FCOS).

    Args:
        clip_border: clip decoded boxes to ``max_shape`` when one is given.
    """

    def __init__(self, clip_border: bool = True) -> None:
        self.clip_border = clip_border

    def encode(self, points: Tensor, gt: Tensor, max_dis: float | None = None, eps: float = 0.1) -> Tensor:
        """Distances from ``points`` ``(..., 2)`` (x, y) to the sides of ``gt`` ``(..., 4)`` xyxy -> ``(..., 4)``.

        With ``max_dis`` the distances are clamped to ``[0, max_dis - eps]`` (mmdet ``bbox2distance``).
        """
        left = points[..., 0] - gt[..., 0]
        top = points[..., 1] - gt[..., 1]
        right = gt[..., 2] - points[..., 0]
        bottom = gt[..., 3] - points[..., 1]
        dist = torch.stack((left, top, right, bottom), dim=-1)
        if max_dis is not None:
            dist = dist.clamp(min=0, max=max_dis - eps)
        return dist

    def decode(
        self, points: Tensor, dist: Tensor, max_shape: tuple[int, int] | Sequence[int] | Tensor | None = None
    ) -> Tensor:
        """Boxes ``(..., 4)`` xyxy from points ``(..., 2)`` and distances ``(..., 4)`` (l, t, r, b).

        ``max_shape`` is ``(h, w)`` or a ``(B, 2)`` tensor of per-image ``(h, w)`` for ``(B, N, 4)`` distances.
        """
        x, y = points[..., 0], points[..., 1]
        boxes = torch.stack((x - dist[..., 0], y - dist[..., 1], x + dist[..., 2], y + dist[..., 3]), dim=-1)
        if self.clip_border and max_shape is not None:
            boxes = clip_boxes(boxes, max_shape)
        return boxes
