"""Prior (anchor / point) generators for multi-level feature maps.

Semantics and ordering follow MMDetection 2.x ``AnchorGenerator`` and ``MlvlPointGenerator``
(mmdet/core/anchor/anchor_generator.py, point_generator.py): priors of one level are ordered row-major over
feature locations (y, then x) with the base priors of a location fastest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _pair(stride: float | Sequence[int | float]) -> tuple[float, float]:
    if isinstance(stride, (int, float)):
        return (stride, stride)
    if len(stride) != 2:
        raise ValueError(f"a stride is an int or a (stride_w, stride_h) pair, got {stride!r}")
    return (stride[0], stride[1])


def _grid(xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
    """Row-major grid: ``xx`` varies fastest. Returns flattened ``(H*W,)`` x and y."""
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return xx.reshape(-1), yy.reshape(-1)


class AnchorGenerator:
    """Anchors for each pyramid level (RetinaNet, ATSS, ...).

    Args:
        strides: one stride per level, an int or ``(stride_w, stride_h)``.
        ratios: height / width ratios of the base anchors.
        octave_base_scale, scales_per_octave: scales ``octave_base_scale * 2**(i / scales_per_octave)``;
            ignored when ``scales`` is given.
        scales: explicit anchor scales (relative to the base size).
        base_sizes: base anchor size per level; defaults to the (smaller) stride of the level.
        scale_major: base anchors ordered ratio-major / scale-minor (mmdet default) when True.
        center_offset: anchor centre at ``center_offset * base_size`` from the location's top-left corner.
    """

    def __init__(
        self,
        strides: Sequence[int | Sequence[int]] = (8, 16, 32, 64, 128),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        octave_base_scale: float | None = 4,
        scales_per_octave: int | None = 3,
        scales: Sequence[float] | None = None,
        base_sizes: Sequence[int] | None = None,
        scale_major: bool = True,
        center_offset: float = 0.0,
    ) -> None:
        if not 0.0 <= center_offset <= 1.0:
            raise ValueError(f"AnchorGenerator: center_offset must be in [0, 1], got {center_offset}")
        self.strides = [_pair(s) for s in strides]
        self.base_sizes = [min(s) for s in self.strides] if base_sizes is None else list(base_sizes)
        if len(self.base_sizes) != len(self.strides):
            raise ValueError(f"AnchorGenerator: {len(self.base_sizes)} base_sizes for {len(self.strides)} strides")
        if scales is not None:
            self.scales = torch.tensor(list(scales), dtype=torch.float32)
        elif octave_base_scale is not None and scales_per_octave is not None:
            octave = torch.tensor([2 ** (i / scales_per_octave) for i in range(scales_per_octave)], dtype=torch.float64)
            self.scales = (octave * octave_base_scale).float()
        else:
            raise ValueError("AnchorGenerator: set either scales or octave_base_scale with scales_per_octave")
        self.ratios = torch.tensor(list(ratios), dtype=torch.float32)
        self.octave_base_scale = octave_base_scale
        self.scales_per_octave = scales_per_octave
        self.scale_major = scale_major
        self.center_offset = center_offset
        self.base_anchors = [self._base_anchors(size) for size in self.base_sizes]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_priors(self) -> list[int]:
        """Anchors per feature location, one entry per level (as mmdet; all levels are equal here)."""
        return [a.size(0) for a in self.base_anchors]

    def _base_anchors(self, base_size: float) -> Tensor:
        """``(A, 4)`` anchors of one location centred at ``center_offset * base_size`` (mmdet
        ``gen_single_level_base_anchors``)."""
        w = h = base_size
        xc, yc = self.center_offset * w, self.center_offset * h
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        if self.scale_major:
            ws = (w * w_ratios[:, None] * self.scales[None, :]).reshape(-1)
            hs = (h * h_ratios[:, None] * self.scales[None, :]).reshape(-1)
        else:
            ws = (w * self.scales[:, None] * w_ratios[None, :]).reshape(-1)
            hs = (h * self.scales[:, None] * h_ratios[None, :]).reshape(-1)
        return torch.stack((xc - 0.5 * ws, yc - 0.5 * hs, xc + 0.5 * ws, yc + 0.5 * hs), dim=-1)

    def single_level_grid_priors(
        self,
        featmap_size: tuple[int, int],
        level_idx: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """``(H*W*A, 4)`` xyxy anchors of one level for a feature map of size ``(H, W)``."""
        base = self.base_anchors[level_idx].to(device=device).to(dtype)
        feat_h, feat_w = featmap_size
        stride_w, stride_h = self.strides[level_idx]
        shift_x = torch.arange(0, feat_w, device=device).to(dtype) * stride_w
        shift_y = torch.arange(0, feat_h, device=device).to(dtype) * stride_h
        xx, yy = _grid(shift_x, shift_y)
        shifts = torch.stack((xx, yy, xx, yy), dim=-1)
        return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)

    def grid_priors(
        self,
        featmap_sizes: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        """Anchors of every level: a list of ``(H_l*W_l*A, 4)`` xyxy tensors."""
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f"AnchorGenerator: {len(featmap_sizes)} feature maps for {self.num_levels} strides")
        return [self.single_level_grid_priors(tuple(s), i, dtype, device) for i, s in enumerate(featmap_sizes)]

    def valid_flags(
        self,
        featmap_sizes: Sequence[tuple[int, int]],
        pad_shapes: Tensor | Sequence[Sequence[int]],
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        """Per-image validity of anchors when images of different sizes share a padded batch.

        mmdet 2.x (``AnchorGenerator.valid_flags``, used by ``AnchorHead``/``ATSSHead`` targets) marks an anchor
        invalid when its location lies beyond ``ceil(pad_h / stride)`` rows or ``ceil(pad_w / stride)`` columns of
        the image's own padded shape; invalid anchors are left out of assignment and get zero loss weight.

        Args:
            featmap_sizes: ``(H, W)`` per level.
            pad_shapes: ``(B, 2)`` per-image ``(h, w)`` after the image's own padding (before batch padding).

        Returns:
            list over levels of ``(B, H*W*A)`` bool.
        """
        pad = torch.as_tensor(pad_shapes, dtype=torch.float64, device=device)[..., :2]
        out = []
        for i, (feat_h, feat_w) in enumerate(featmap_sizes):
            stride_w, stride_h = self.strides[i]
            valid_h = torch.ceil(pad[:, 0] / stride_h).clamp(max=feat_h)  # (B,)
            valid_w = torch.ceil(pad[:, 1] / stride_w).clamp(max=feat_w)
            ys = torch.arange(feat_h, device=device, dtype=torch.float64)
            xs = torch.arange(feat_w, device=device, dtype=torch.float64)
            xx, yy = _grid(xs, ys)
            valid = (xx[None] < valid_w[:, None]) & (yy[None] < valid_h[:, None])  # (B, H*W)
            out.append(valid.repeat_interleave(self.num_base_priors[i], dim=1))
        return out

    def __repr__(self) -> str:
        return (
            f"AnchorGenerator(strides={self.strides}, ratios={self.ratios.tolist()}, "
            f"scales={self.scales.tolist()}, base_sizes={self.base_sizes}, center_offset={self.center_offset})"
        )


class PointGenerator:
    """Points (feature-location centres) for each pyramid level (FCOS, VFNet, ...).

    Args:
        strides: one stride per level, an int or ``(stride_w, stride_h)``.
        offset: point at ``(j + offset) * stride_w, (i + offset) * stride_h`` for location ``(i, j)``.
    """

    def __init__(self, strides: Sequence[int | Sequence[int]], offset: float = 0.5) -> None:
        self.strides = [_pair(s) for s in strides]
        self.offset = offset

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_priors(self) -> list[int]:
        """One point per location on every level."""
        return [1] * self.num_levels

    def single_level_grid_priors(
        self,
        featmap_size: tuple[int, int],
        level_idx: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        with_stride: bool = False,
    ) -> Tensor:
        """``(H*W, 2)`` points ``(x, y)``, or ``(H*W, 4)`` ``(x, y, stride_w, stride_h)`` with ``with_stride``."""
        feat_h, feat_w = featmap_size
        stride_w, stride_h = self.strides[level_idx]
        shift_x = ((torch.arange(0, feat_w, device=device) + self.offset) * stride_w).to(dtype)
        shift_y = ((torch.arange(0, feat_h, device=device) + self.offset) * stride_h).to(dtype)
        xx, yy = _grid(shift_x, shift_y)
        if not with_stride:
            return torch.stack((xx, yy), dim=-1)
        return torch.stack((xx, yy, torch.full_like(xx, stride_w), torch.full_like(yy, stride_h)), dim=-1)

    def grid_priors(
        self,
        featmap_sizes: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        with_stride: bool = False,
    ) -> list[Tensor]:
        """Points of every level: a list of ``(H_l*W_l, 2)`` (or ``(H_l*W_l, 4)`` with strides) tensors."""
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f"PointGenerator: {len(featmap_sizes)} feature maps for {self.num_levels} strides")
        return [
            self.single_level_grid_priors(tuple(s), i, dtype, device, with_stride) for i, s in enumerate(featmap_sizes)
        ]

    def __repr__(self) -> str:
        return f"PointGenerator(strides={self.strides}, offset={self.offset})"
