"""RoI feature extraction from one FPN level per RoI (MMDetection 2.x ``SingleRoIExtractor``,
mmdet/models/roi_heads/roi_extractors/single_level_roi_extractor.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from densedet.models.roi_heads.roi_align import multilevel_roi_align, sparse_roi_align_supported
from densedet.registry import ConfigError

__all__ = ["SingleRoIExtractor", "map_roi_levels", "roi_align_levels", "static_shapes"]


def static_shapes() -> bool:
    """Whether the code runs under tracing, ``torch.export`` / the ONNX exporter or ``torch.compile``: then the RoI
    stages take their static-shape paths (every slot, no data-dependent loops or chunk counts)."""
    return bool(torch.jit.is_tracing() or torch.compiler.is_compiling())


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: int = 56) -> Tensor:
    """Level of each RoI: ``floor(log2(sqrt(w * h) / finest_scale + 1e-6))`` clamped to ``[0, num_levels - 1]``
    (FPN paper eq. 1 with k0 = 4 mapped to level index 0 = stride 4; mmdet ``map_roi_levels``).

    Args:
        rois: ``(R, 5)`` ``(batch_index, x1, y1, x2, y2)`` or ``(R, 4)`` xyxy.
    """
    boxes = rois[:, -4:]
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(min=0, max=num_levels - 1).long()


def roi_align_levels(extractor: SingleRoIExtractor, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
    """:class:`SingleRoIExtractor`'s output with static shapes: ``rois`` ``(R, 5)`` ``(batch_index, x1, y1, x2, y2)``
    -> ``(R, C, out_h, out_w)``, each RoI pooled on its own level (:func:`map_roi_levels`).

    Every level runs RoIAlign on all R RoIs, but a RoI that is not on that level gets the empty box ``(0, 0, 0,
    0)`` there: adaptive sampling (``sampling_ratio=0``) then samples no point for it, so the extra levels cost
    next to nothing; ``torch.where`` keeps each RoI's own level. torchvision's ``roi_align(aligned=True)`` exports
    as ONNX ``RoiAlign`` with ``coordinate_transformation_mode=half_pixel`` (onnxscript's translation).
    """
    levels = map_roi_levels(rois, extractor.num_inputs, extractor.finest_scale)
    out: Tensor | None = None
    for lvl in range(extractor.num_inputs):
        here = (levels == lvl).unsqueeze(-1)
        level_rois = torch.where(here, rois, torch.cat([rois[:, :1], torch.zeros_like(rois[:, 1:])], 1))
        feat = feats[lvl]
        pooled = roi_align(feat, level_rois.to(feat.dtype), extractor.output_size,
                           1.0 / extractor.featmap_strides[lvl], extractor.sampling_ratio, True)
        out = pooled if out is None else torch.where(here[..., None, None], pooled, out)
    assert out is not None
    return out


class SingleRoIExtractor(nn.Module):
    """RoIAlign each RoI on its level: ``torchvision.ops.roi_align(aligned=True)`` with mmcv ``RoIAlign``'s
    ``spatial_scale = 1 / stride`` and ``sampling_ratio`` (0: adaptive, ``ceil(roi_size / output_size)`` points).

    On CPU (eager mode) through sparse products,
    :func:`~densedet.models.roi_heads.roi_align.multilevel_roi_align`: the same values and gradients, several times
    faster than torchvision's CPU kernels; on CUDA torchvision's op per level; while tracing / exporting the static
    :func:`roi_align_levels`.

    Args:
        roi_layer: ``{type: RoIAlign, output_size: 7, sampling_ratio: 0}`` (``aligned`` must stay true).
        out_channels: channels of the features (checked).
        featmap_strides: strides of the levels used (the first ``len(featmap_strides)`` features).
        finest_scale: see :func:`map_roi_levels`.
    """

    def __init__(self, roi_layer: dict, out_channels: int, featmap_strides: Sequence[int],
                 finest_scale: int = 56, init_cfg: dict | None = None) -> None:
        super().__init__()
        cfg = dict(roi_layer)
        kind = cfg.pop("type", "RoIAlign")
        if kind != "RoIAlign":
            raise ConfigError(f"roi_layer.type: only RoIAlign is available, got '{kind}'")
        size = cfg.pop("output_size", 7)
        self.output_size = (size, size) if isinstance(size, int) else tuple(size)
        self.sampling_ratio = int(cfg.pop("sampling_ratio", 0))
        aligned = cfg.pop("aligned", True)
        if not aligned:
            raise ConfigError("roi_layer.aligned: only aligned=True (mmcv's default) is available")
        cfg.pop("pool_mode", None)
        cfg.pop("use_torchvision", None)
        if cfg:
            raise ConfigError(f"roi_layer: unknown keys {sorted(cfg)} (output_size, sampling_ratio, aligned)")
        self.out_channels = out_channels
        self.featmap_strides = list(featmap_strides)
        self.finest_scale = finest_scale

    @property
    def num_inputs(self) -> int:
        return len(self.featmap_strides)

    def forward(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        """``feats``: FPN levels ``(B, C, H_l, W_l)``; ``rois`` ``(R, 5)`` ``(batch_index, x1, y1, x2, y2)`` in input
        pixels. Returns ``(R, C, out_h, out_w)``. While tracing / exporting: :func:`roi_align_levels`."""
        if static_shapes():
            return roi_align_levels(self, feats, rois)
        if rois.shape[0] == 0:
            return feats[0].new_zeros((0, self.out_channels, *self.output_size))
        levels = map_roi_levels(rois, self.num_inputs, self.finest_scale)
        feats = feats[:self.num_inputs]
        if sparse_roi_align_supported(feats) and rois.device.type == "cpu":
            scales = [1.0 / s for s in self.featmap_strides]
            return multilevel_roi_align(feats, rois, levels, self.output_size, scales, self.sampling_ratio, True)
        out = feats[0].new_zeros((rois.shape[0], self.out_channels, *self.output_size))
        for lvl in range(self.num_inputs):
            idx = (levels == lvl).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            feat = feats[lvl]
            pooled = roi_align(feat, rois[idx].to(feat.dtype), self.output_size, 1.0 / self.featmap_strides[lvl],
                               self.sampling_ratio, True)
            out[idx] = pooled.to(out.dtype)
        return out
