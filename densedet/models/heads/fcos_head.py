"""FCOS head (Tian et al. 2019), following mmdet/models/dense_heads/fcos_head.py (MMDetection 2.x).

Points at ``(j + 0.5) * stride``; targets by regress ranges with optional center sampling; distances optionally
normalised by the stride (``norm_on_bbox``, predictions ReLU-ed instead of exp-ed); focal loss over
``max(reduce_mean(num_pos), 1)``; IoU/GIoU loss weighted by the centerness target and normalised by its
cross-process mean sum; centerness BCE.

Two options, off by default so the MMDetection configs keep the reference semantics, give torchvision's FCOS recipe
(torchvision/models/detection/fcos.py): ``bbox_loss_weighting="uniform"`` (every positive weighs 1 in the IoU/GIoU
loss, normalised by the number of positives) and ``scale_per_level=False`` (no learnable ``Scale`` on the distances).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from densedet.assigners import expand_strides, fcos_assign_levels
from densedet.dist import reduce_mean
from densedet.losses import build_loss
from densedet.models.heads.dense_head import (
    CENTERNESS_LOSS,
    FOCAL_LOSS,
    GN_32,
    DenseHead,
    LevelPredictions,
    flatten_levels,
)
from densedet.models.layers import Scale
from densedet.registry import HEADS, ConfigError
from densedet.structures import DistancePointBBoxCoder, PaddedTargets, PointGenerator, pad_targets

INF = 1e8


@HEADS.register()
class FCOSHead(DenseHead):
    """``conv_cls`` / ``conv_reg`` / ``conv_centerness`` over GN conv towers, one ``Scale`` per level."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 strides: tuple[int, ...] | list[int] = (8, 16, 32, 64, 128),
                 regress_ranges: tuple | list = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF)),
                 center_sampling: bool = False, center_sample_radius: float = 1.5, norm_on_bbox: bool = False,
                 centerness_on_reg: bool = False, bbox_loss_weighting: str = "centerness",
                 scale_per_level: bool = True, dcn_on_last_conv: bool = False, conv_bias: bool | str = "auto",
                 conv_cfg: dict | None = None, norm_cfg: dict | None = None, loss_cls: dict | None = None,
                 loss_bbox: dict | None = None, loss_centerness: dict | None = None,
                 train_cfg: dict | None = None, test_cfg: dict | None = None, init_cfg: dict | None = None) -> None:
        norm_cfg = GN_32 if norm_cfg is None else norm_cfg
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, strides, conv_cfg, norm_cfg,
                         conv_bias, train_cfg=None, test_cfg=test_cfg)
        if dcn_on_last_conv:
            raise ConfigError("model.bbox_head.dcn_on_last_conv: deformable head convs are not available yet",
                              path="model.bbox_head.dcn_on_last_conv")
        if bbox_loss_weighting not in ("centerness", "uniform"):
            raise ConfigError(f"model.bbox_head.bbox_loss_weighting must be 'centerness' or 'uniform', got "
                              f"'{bbox_loss_weighting}'", path="model.bbox_head.bbox_loss_weighting")
        # "centerness": mmdet (weight = centerness target, avg over its sum); "uniform": torchvision (avg over num_pos)
        self.bbox_loss_weighting = bbox_loss_weighting
        # FCOS configs carry an unused MaxIoUAssigner in train_cfg; accept and ignore it like the reference.
        self.train_cfg_raw = train_cfg
        self.regress_ranges = [tuple(float(v) for v in r) for r in regress_ranges]
        self.center_sampling = center_sampling
        self.center_sample_radius = center_sample_radius
        self.norm_on_bbox = norm_on_bbox
        self.centerness_on_reg = centerness_on_reg
        self.prior_generator = PointGenerator(self.strides, offset=0.5)
        self.bbox_coder = DistancePointBBoxCoder()
        self.loss_cls = build_loss(loss_cls or FOCAL_LOSS, "model.bbox_head.loss_cls")
        self.loss_bbox = build_loss(loss_bbox or {"type": "IoULoss", "loss_weight": 1.0}, "model.bbox_head.loss_bbox")
        self.loss_centerness = build_loss(loss_centerness or CENTERNESS_LOSS,
                                          "model.bbox_head.loss_centerness")
        self.cls_convs = self._build_tower()
        self.reg_convs = self._build_tower()
        self.conv_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(feat_channels, 1, 3, padding=1)
        # torchvision's FCOS has no per-level scale: distances are relu(conv) * stride (norm_on_bbox).
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides]) if scale_per_level else None

    def classifier(self) -> nn.Conv2d:
        return self.conv_cls

    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, Tensor, Tensor]:
        c, r = self.towers(x)
        centerness = self.conv_centerness(r if self.centerness_on_reg else c)
        bbox = self.conv_reg(r)
        bbox = (self.scales[level](bbox) if self.scales is not None else bbox).float()
        if self.norm_on_bbox:
            bbox = bbox.clamp(min=0)
            if not self.training:
                bbox = bbox * self.strides[level]
        else:
            bbox = bbox.exp()
        return self.conv_cls(c), bbox, centerness

    def points(self, featmap_sizes: list[tuple[int, int]], device: torch.device,
               dtype: torch.dtype) -> tuple[Tensor, list[int]]:
        per_level = self.prior_generator.grid_priors(featmap_sizes, dtype=dtype, device=device)
        return torch.cat(per_level, 0), [p.shape[0] for p in per_level]

    @staticmethod
    def centerness_target(ltrb: Tensor) -> Tensor:
        """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) (FCOS paper eq. 3). (P,4) -> (P,)."""
        lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
        if ltrb.numel() == 0:
            return ltrb.new_zeros(0)
        return torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))

    @torch.no_grad()
    def assign_priors(self, featmap_sizes: list[tuple[int, int]], gt: PaddedTargets,
                      metas: list[dict[str, Any]]) -> tuple[Tensor, list[int]]:
        """FCOS assignment (regress ranges, optional center sampling) of the points."""
        device = gt.gt_boxes.device
        points, per_level = self.points(featmap_sizes, device, torch.float32)
        assign, _ = self._assign(points, per_level, gt)
        return assign.gt_inds, per_level

    def _assign(self, points: Tensor, per_level: list[int], gt: PaddedTargets) -> tuple[Any, Tensor]:
        """FCOS assignment of the ``(N, 2)`` points: ``(AssignResult, ltrb targets (B, N, 4))``."""
        return fcos_assign_levels(points, per_level, self.strides, self.regress_ranges, gt,
                                  center_sampling=self.center_sampling, center_sample_radius=self.center_sample_radius)

    def prior_size_range(self) -> tuple[float, float]:
        """A P3 cell up to twice the last regress range's lower bound (a location regresses about half a box)."""
        top = float(self.regress_ranges[-1][1])
        return float(min(self.strides)), (2 * top if math.isfinite(top) and top < 1e7 else math.inf)

    def loss(self, outs: tuple[list[Tensor], ...], targets: list[dict[str, Tensor]],
             metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        cls_scores, bbox_preds, centernesses = outs
        device = cls_scores[0].device
        sizes = [tuple(m.shape[-2:]) for m in cls_scores]
        points, per_level = self.points(sizes, device, torch.float32)
        gt = pad_targets(targets, device=device)
        assign, ltrb = self._assign(points, per_level, gt)
        labels, _ = assign.gather(gt.gt_labels, gt.gt_boxes, self.num_classes)
        pos = assign.pos_mask
        num_pos = max(reduce_mean(pos.sum().float()).item(), 1.0)

        cls_flat = flatten_levels(cls_scores, self.num_classes)
        bbox_flat = flatten_levels(bbox_preds, 4)
        ctr_flat = flatten_levels(centernesses, 1)[..., 0]
        loss_cls = self.loss_cls(cls_flat.reshape(-1, self.num_classes), labels.reshape(-1), avg_factor=num_pos)
        b = pos.shape[0]
        pos_points = points.expand(b, -1, -1)[pos]
        pos_ltrb = ltrb[pos]
        if self.norm_on_bbox:
            strides = expand_strides(self.strides, per_level, device)
            pos_ltrb = pos_ltrb / strides.expand(b, -1)[pos][:, None]
        ctr_targets = self.centerness_target(pos_ltrb)
        ctr_denorm = max(reduce_mean(ctr_targets.sum().detach()).item(), 1e-6)
        if pos_points.numel():
            pred_boxes = self.bbox_coder.decode(pos_points, bbox_flat[pos])
            target_boxes = self.bbox_coder.decode(pos_points, pos_ltrb)
            if self.bbox_loss_weighting == "centerness":
                loss_bbox = self.loss_bbox(pred_boxes, target_boxes, weight=ctr_targets, avg_factor=ctr_denorm)
            else:
                loss_bbox = self.loss_bbox(pred_boxes, target_boxes, avg_factor=num_pos)
            loss_ctr = self.loss_centerness(ctr_flat[pos], ctr_targets, avg_factor=num_pos)
        else:
            loss_bbox = bbox_flat.sum() * 0
            loss_ctr = ctr_flat.sum() * 0
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_ctr,
                "num_pos": pos.sum().float().detach(),
                **self.loss_level_stats(per_level, pos, ~pos, cls_flat, labels)}

    @torch.no_grad()
    def decode_levels(self, outs: tuple[list[Tensor], ...], metas: list[dict[str, Any]]) -> LevelPredictions:
        """Sigmoid class scores, sigmoid centerness as the score factor, distances decoded around each point."""
        cls_scores, bbox_preds, centernesses = outs
        device = cls_scores[0].device
        points, per_level = self.points(self.level_sizes(cls_scores), device, cls_scores[0].dtype)
        slices = self.level_slices(per_level)
        dists = self.flat_levels(bbox_preds, 4)
        img_shapes = self.img_shapes(metas, device)

        def decode(lvl: int, idx: Tensor) -> Tensor:
            d = dists[lvl].gather(1, idx[..., None].expand(-1, -1, 4))
            return self.bbox_coder.decode(points[slices[lvl]][idx], d, max_shape=img_shapes)

        factors = [f[..., 0] for f in self.flat_levels(centernesses, 1, sigmoid=True)]
        return LevelPredictions(self.flat_levels(cls_scores, self.num_classes, sigmoid=True), factors, decode)
