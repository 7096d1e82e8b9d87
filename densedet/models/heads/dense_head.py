"""The one base class of DenseDet's dense heads.

A head turns FPN levels into per-level maps, flattens them once into ``(B, N, ·)`` tensors over all priors of
all levels (``level_ids`` keeps each prior's level), assigns targets for the whole batch at once and computes
losses on the flattened tensors. Subclasses say how to build their layers, how to run one level, how to compute
losses from flattened predictions, and how to decode boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from densedet.models.heads.postprocess import TestConfig, parse_test_cfg, postprocess_levels
from densedet.models.layers import ConvModule
from densedet.registry import ConfigError, check_kwargs

# Default loss configs of the reference heads (mmdet 2.x RetinaHead / FCOSHead / ATSSHead).
FOCAL_LOSS = {"type": "FocalLoss", "use_sigmoid": True, "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0}
CENTERNESS_LOSS = {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0}
GN_32 = {"type": "GN", "num_groups": 32, "requires_grad": True}


def bias_init_with_prob(prior_prob: float) -> float:
    """Bias that makes sigmoid output ``prior_prob`` (Focal Loss paper, Lin et al. 2017, sec. 4.1)."""
    return float(-math.log((1 - prior_prob) / prior_prob))


def flatten_levels(maps: list[Tensor], channels: int) -> Tensor:
    """(B, A*channels, H, W) per level -> (B, sum H*W*A, channels), locations row-major, priors fastest."""
    b = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(b, -1, channels) for m in maps], dim=1)


@dataclass
class TrainConfig:
    """MMDetection's ``train_cfg`` for dense heads (``sampler`` and ``debug`` accepted for compatibility)."""

    assigner: dict[str, Any] | None = None
    allowed_border: int = -1
    pos_weight: float = -1
    debug: bool = False
    sampler: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.sampler is not None and self.sampler.get("type") != "PseudoSampler":
            raise ConfigError("model.train_cfg.sampler: only PseudoSampler (no sampling) is available",
                              path="model.train_cfg.sampler")
        if self.allowed_border != -1:
            raise ConfigError("model.train_cfg.allowed_border: only -1 (every valid prior is used) is available",
                              path="model.train_cfg.allowed_border")


def parse_train_cfg(cfg: dict[str, Any] | None) -> TrainConfig:
    cfg = dict(cfg or {})
    check_kwargs(TrainConfig, cfg, "model.train_cfg")
    return TrainConfig(**cfg)


def split_assigner_cfg(cfg: TrainConfig, expected: str, fn: Any) -> dict[str, Any]:
    """Check ``train_cfg.assigner`` names ``expected`` and return its keyword arguments for ``fn``."""
    a = dict(cfg.assigner or {"type": expected})
    kind = a.pop("type", expected)
    if kind != expected:
        raise ConfigError(f"model.train_cfg.assigner.type: this head uses '{expected}', got '{kind}'",
                          path="model.train_cfg.assigner.type")
    check_kwargs(fn, a, "model.train_cfg.assigner")
    return a


class DenseHead(nn.Module):
    """Shared machinery: conv towers, flattening, level bookkeeping and batched post-processing.

    Subclasses implement ``_init_predictors``, ``forward_level``, ``loss`` and ``predict``.
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 strides: tuple[int, ...] | list[int] = (8, 16, 32, 64, 128), conv_cfg: dict | None = None,
                 norm_cfg: dict | None = None, conv_bias: bool | str = "auto",
                 train_cfg: dict | None = None, test_cfg: dict | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"model.bbox_head.num_classes must be >= 1, got {num_classes}",
                              path="model.bbox_head.num_classes")
        self.num_classes = num_classes
        self.cls_out_channels = num_classes  # sigmoid classifiers: no background channel
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.stacked_convs = stacked_convs
        # anchor generators keep (w, h) stride pairs; heads here use square strides
        self.strides = [int(s[0]) if isinstance(s, (tuple, list)) else int(s) for s in strides]
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.conv_bias = conv_bias
        self.train_cfg = parse_train_cfg(train_cfg)
        self.test_cfg: TestConfig = parse_test_cfg(test_cfg)

    def _build_tower(self) -> nn.ModuleList:
        convs = nn.ModuleList()
        for i in range(self.stacked_convs):
            convs.append(ConvModule(self.in_channels if i == 0 else self.feat_channels, self.feat_channels, 3,
                                    stride=1, padding=1, conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                                    bias=self.conv_bias))
        return convs

    def towers(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run ``cls_convs`` and ``reg_convs`` on one level: ``(cls_feat, reg_feat)``, each (B, feat_channels, H, W)."""
        c = r = x
        for conv in self.cls_convs:
            c = conv(c)
        for conv in self.reg_convs:
            r = conv(r)
        return c, r

    def init_weights(self) -> None:
        """Normal(0, 0.01) convs, zero bias, classifier bias at prior 0.01 (mmdet ``init_cfg`` of these heads)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        cls = self.classifier()
        nn.init.constant_(cls.bias, bias_init_with_prob(0.01))

    def classifier(self) -> nn.Conv2d:
        raise NotImplementedError

    def forward(self, feats: tuple[Tensor, ...] | list[Tensor]) -> tuple[list[Tensor], ...]:
        """Run every level; returns a tuple of per-level lists (e.g. ``(cls_scores, bbox_preds, centernesses)``)."""
        if len(feats) != len(self.strides):
            raise ValueError(f"{type(self).__name__}: got {len(feats)} feature levels for {len(self.strides)} strides")
        outs = [self.forward_level(x, lvl) for lvl, x in enumerate(feats)]
        return tuple(list(o) for o in zip(*outs))

    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, ...]:
        raise NotImplementedError

    @staticmethod
    def level_ids(num_per_level: list[int], device: torch.device) -> Tensor:
        """(N,) pyramid level of every flattened prior."""
        return torch.repeat_interleave(torch.arange(len(num_per_level), device=device),
                                       torch.tensor(num_per_level, device=device))

    @staticmethod
    def valid_prior_mask(featmap_sizes: list[tuple[int, int]], strides: list[int], num_base: int,
                         metas: list[dict[str, Any]], device: torch.device, size_divisor: int = 32) -> Tensor:
        """(B, N) True where a prior's location lies on the image's own padded area, not on batch padding.

        Same rule as MMDetection 2.x ``AnchorGenerator.valid_flags`` called with each image's ``pad_shape``
        (the image padded alone to a multiple of ``size_divisor``): a level's valid size is
        ``min(ceil(pad_size / stride), feat_size)``.
        """
        masks = []
        shapes = torch.tensor([m.get("pad_shape", m["img_shape"])[:2] for m in metas], device=device,
                              dtype=torch.float64)
        shapes = torch.ceil(shapes / size_divisor) * size_divisor  # no-op when collate gave pad_shape
        for (h, w), s in zip(featmap_sizes, strides):
            vh = torch.clamp(torch.ceil(shapes[:, 0] / s), max=h)
            vw = torch.clamp(torch.ceil(shapes[:, 1] / s), max=w)
            ys = torch.arange(h, device=device).repeat_interleave(w * num_base)
            xs = torch.arange(w, device=device).repeat_interleave(num_base).repeat(h)
            masks.append((ys[None] < vh[:, None]) & (xs[None] < vw[:, None]))
        return torch.cat(masks, 1)

    def _postprocess(self, cls_scores: list[Tensor], score_factors: list[Tensor] | None, decode: Any,
                     metas: list[dict[str, Any]], rescale: bool) -> list[dict[str, Tensor]]:
        return postprocess_levels(cls_scores, score_factors, decode, self.num_classes, self.test_cfg, metas, rescale)

    @staticmethod
    def img_shapes(metas: list[dict[str, Any]], device: torch.device, size_divisor: int = 32) -> Tensor:
        """(B, 2) (h, w) of each image before padding, for clipping decoded boxes."""
        return torch.tensor([m["img_shape"][:2] for m in metas], device=device, dtype=torch.float32)
