"""FoveaBox head (Kong et al., "FoveaBox: Beyond Anchor-based Object Detector", TIP 2020) with the optional
Varifocal Loss of VarifocalNet (Zhang et al., CVPR 2021, sec. 5.3 / table 7: "FoveaBox + VFL").

Reference: ``FoveaHead`` of hyz-xmaster/VarifocalNet (mmdet/models/dense_heads/fovea_head.py), which is
MMDetection 2.x's FoveaHead plus ``use_vfl`` / ``loss_cls_vfl``:

* per level a ``reg_convs`` tower -> ``conv_reg`` (4 log-space distances) and a ``cls_convs`` tower -> ``conv_cls``;
  with ``with_deform`` the cls branch first aligns its input with a DCN whose offsets come from the exp-ed box
  prediction (``feature_adaption``), then a 3x3 and a 1x1 conv at 4x width;
* targets by :func:`~densedet.assigners.fovea_assign` (scale ranges, sigma-shrunk fovea, smallest gt wins);
* box decode: ``x1 = px - base_edge * exp(d_left)``, ``x2 = px + base_edge * exp(d_right)`` (y likewise) around the
  location centre ``px = (j + 0.5) * stride``, clamped to ``[0, img_w - 1]`` / ``[0, img_h - 1]``;
* ``loss_bbox`` (smooth L1, beta 0.11 in every released config) on the log-space distances of positives, over the
  number of positives; ``loss_cls`` over ``num_pos + num_images`` (per process, not averaged across processes);
* with ``use_vfl`` the classification target is ``q``: the IoU of the decoded, detached predicted box with its gt
  (clamped to >= 1e-6) at the gt class, 0 elsewhere, trained with ``loss_cls_vfl`` (Varifocal Loss).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from densedet.assigners import fovea_assign
from densedet.losses import GIoULoss, IoULoss, VarifocalLoss, build_loss
from densedet.models.dcn import DeformConv2d
from densedet.models.heads.dense_head import (
    FOCAL_LOSS,
    VFL_LOSS,
    DenseHead,
    LevelPredictions,
    flatten_levels,
    iou_class_targets,
)
from densedet.models.layers import ConvModule
from densedet.registry import HEADS, ConfigError
from densedet.structures import PointGenerator, bbox_overlaps, pad_targets

# Every FoveaBox config (mmdet configs/foveabox, the VarifocalNet fork) uses this box loss; see __init__.
SMOOTH_L1 = {"type": "SmoothL1Loss", "beta": 0.11, "loss_weight": 1.0}


class FeatureAlign(nn.Module):
    """DCN v1 over the cls input with offsets predicted (1x1 conv) from the exp-ed box prediction, then ReLU.

    Names as the reference (``conv_offset`` without bias, ``conv_adaption`` an mmcv ``DeformConv2d``).
    ``forward(x (B, C, H, W), shape (B, 4, H, W)) -> (B, C_out, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, deform_groups: int = 4) -> None:
        super().__init__()
        self.conv_offset = nn.Conv2d(4, deform_groups * kernel_size * kernel_size * 2, 1, bias=False)
        self.conv_adaption = DeformConv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2,
                                          deform_groups=deform_groups)
        self.relu = nn.ReLU(inplace=True)

    def init_weights(self) -> None:
        """Normal(0, 0.1) offsets, Normal(0, 0.01) deformable weights (reference ``FeatureAlign.init_weights``)."""
        nn.init.normal_(self.conv_offset.weight, 0.0, 0.1)
        nn.init.normal_(self.conv_adaption.weight, 0.0, 0.01)

    def forward(self, x: Tensor, shape: Tensor) -> Tensor:
        return self.relu(self.conv_adaption(x, self.conv_offset(shape)))


@HEADS.register()
class FoveaHead(DenseHead):
    """``cls_convs`` / ``reg_convs`` towers (no norm by default), ``conv_cls`` / ``conv_reg``; no scales."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 strides: tuple[int, ...] | list[int] = (4, 8, 16, 32, 64),
                 base_edge_list: tuple[int, ...] | list[int] = (16, 32, 64, 128, 256),
                 scale_ranges: tuple | list = ((8, 32), (16, 64), (32, 128), (64, 256), (128, 512)),
                 sigma: float = 0.4, with_deform: bool = False, deform_groups: int = 4, use_vfl: bool = False,
                 loss_cls_vfl: dict | None = None, dcn_on_last_conv: bool = False, conv_bias: bool | str = "auto",
                 conv_cfg: dict | None = None, norm_cfg: dict | None = None, loss_cls: dict | None = None,
                 loss_bbox: dict | None = None, train_cfg: dict | None = None, test_cfg: dict | None = None,
                 init_cfg: dict | None = None) -> None:
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, strides, conv_cfg, norm_cfg,
                         conv_bias, train_cfg=train_cfg, test_cfg=test_cfg)
        if self.train_cfg.assigner is not None:
            raise ConfigError("model.train_cfg.assigner: FoveaHead assigns by scale ranges and fovea regions "
                              "(base_edge_list / scale_ranges / sigma); leave train_cfg empty",
                              path="model.train_cfg.assigner")
        if dcn_on_last_conv:
            raise ConfigError("model.bbox_head.dcn_on_last_conv: not available for FoveaHead (use with_deform)",
                              path="model.bbox_head.dcn_on_last_conv")
        n = len(self.strides)
        if len(base_edge_list) != n or len(scale_ranges) != n:
            raise ConfigError(f"model.bbox_head: {n} strides need as many base_edge_list ({len(base_edge_list)}) "
                              f"and scale_ranges ({len(scale_ranges)}) entries", path="model.bbox_head.scale_ranges")
        if not 0 < sigma <= 1:
            raise ConfigError(f"model.bbox_head.sigma must be in (0, 1], got {sigma}", path="model.bbox_head.sigma")
        self.base_edge_list = [float(e) for e in base_edge_list]
        self.scale_ranges = [tuple(float(v) for v in r) for r in scale_ranges]
        self.sigma = float(sigma)
        self.with_deform = with_deform
        self.deform_groups = deform_groups
        self.use_vfl = use_vfl
        self.prior_generator = PointGenerator(self.strides, offset=0.5)
        # As the reference: loss_cls (focal) is built, then replaced by loss_cls_vfl when use_vfl.
        self.loss_cls = build_loss(loss_cls or FOCAL_LOSS, "model.bbox_head.loss_cls")
        if use_vfl:
            self.loss_cls = build_loss(loss_cls_vfl or VFL_LOSS, "model.bbox_head.loss_cls_vfl")
            if not isinstance(self.loss_cls, VarifocalLoss):
                raise ConfigError("model.bbox_head.loss_cls_vfl: use_vfl needs a VarifocalLoss (it takes IoU "
                                  "targets, not labels)", path="model.bbox_head.loss_cls_vfl.type")
        # mmdet's AnchorFreeHead defaults to IoULoss, which would be silently wrong on FoveaBox's log-space
        # distance targets; default to the smooth L1 of the configs and refuse box-overlap losses.
        self.loss_bbox = build_loss(loss_bbox or SMOOTH_L1, "model.bbox_head.loss_bbox")
        if isinstance(self.loss_bbox, (IoULoss, GIoULoss)):
            raise ConfigError("model.bbox_head.loss_bbox: FoveaHead regresses log-space distances, not boxes; "
                              "use SmoothL1Loss or L1Loss", path="model.bbox_head.loss_bbox.type")

        self.reg_convs = self._build_tower()
        self.conv_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        if not with_deform:
            self.cls_convs = self._build_tower()
            self.conv_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        else:
            if in_channels != feat_channels:
                raise ConfigError(f"model.bbox_head: with_deform aligns the input features, so in_channels "
                                  f"({in_channels}) must equal feat_channels ({feat_channels})",
                                  path="model.bbox_head.with_deform")
            wide = feat_channels * 4
            # The reference's deformable branch: bias only without norm (mmcv ``bias=norm_cfg is None``).
            self.cls_convs = nn.ModuleList([
                ConvModule(feat_channels, wide, 3, padding=1, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                           bias=norm_cfg is None),
                ConvModule(wide, wide, 1, padding=0, conv_cfg=conv_cfg, norm_cfg=norm_cfg, bias=norm_cfg is None),
            ])
            self.feature_adaption = FeatureAlign(feat_channels, feat_channels, 3, deform_groups)
            self.conv_cls = nn.Conv2d(wide, num_classes, 3, padding=1)

    def classifier(self) -> nn.Conv2d:
        return self.conv_cls

    def init_weights(self) -> None:
        super().init_weights()
        if self.with_deform:
            self.feature_adaption.init_weights()

    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, Tensor]:
        """``(cls_score (B, C, H, W) logits, bbox_pred (B, 4, H, W) log-space distances / base_edge)``."""
        reg = x
        for conv in self.reg_convs:
            reg = conv(reg)
        bbox_pred = self.conv_reg(reg)
        cls = x
        if self.with_deform:
            cls = self.feature_adaption(cls, bbox_pred.exp())
        for conv in self.cls_convs:
            cls = conv(cls)
        return self.conv_cls(cls), bbox_pred

    @torch.no_grad()
    def assign_priors(self, featmap_sizes: list[tuple[int, int]], gt: Any,
                      metas: list[dict[str, Any]]) -> tuple[Tensor, list[int]]:
        """FoveaBox's scale-range / fovea-area assignment of the locations."""
        res, _ = fovea_assign(featmap_sizes, self.strides, self.base_edge_list, self.scale_ranges, gt,
                              sigma=self.sigma)
        return res.gt_inds, [h * w for h, w in featmap_sizes]

    def prior_size_range(self) -> tuple[float, float]:
        """The lowest and highest scale range."""
        return float(min(r[0] for r in self.scale_ranges)), float(max(r[1] for r in self.scale_ranges))

    def points(self, featmap_sizes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor, list[int]]:
        """Location centres ``(N, 2)`` (x, y) at ``(j + 0.5) * stride``, each one's ``base_edge`` ``(N,)``, and
        the number of locations per level."""
        per_level = self.prior_generator.grid_priors(featmap_sizes, dtype=torch.float32, device=device)
        counts = [p.shape[0] for p in per_level]
        edges = torch.repeat_interleave(torch.tensor(self.base_edge_list, device=device),
                                        torch.tensor(counts, device=device))
        return torch.cat(per_level, 0), edges, counts

    @staticmethod
    def decode(points: Tensor, edges: Tensor, pred: Tensor, img_shapes: Tensor) -> Tensor:
        """Boxes from log-space distances (reference ``decode_bbox`` / ``_get_bboxes_single``).

        Args:
            points: ``(..., N, 2)`` location centres (x, y) in pixels; edges: ``(..., N)`` base edges.
            pred: ``(B, N, 4)`` predicted (left, top, right, bottom) in log space, in units of the base edge.
            img_shapes: ``(B, 2)`` (h, w) of each image before padding.

        Returns:
            ``(B, N, 4)`` ``xyxy`` pixels, clamped to ``[0, w - 1]`` x ``[0, h - 1]`` as the reference.
        """
        d = pred.float().exp() * edges[..., None]
        x, y = points[..., 0], points[..., 1]
        max_x = (img_shapes[:, 1] - 1).view(-1, 1)
        max_y = (img_shapes[:, 0] - 1).view(-1, 1)
        zero = d.new_zeros(())
        x1 = torch.minimum(torch.maximum(x - d[..., 0], zero), max_x)
        y1 = torch.minimum(torch.maximum(y - d[..., 1], zero), max_y)
        x2 = torch.minimum(torch.maximum(x + d[..., 2], zero), max_x)
        y2 = torch.minimum(torch.maximum(y + d[..., 3], zero), max_y)
        return torch.stack((x1, y1, x2, y2), dim=-1)

    def loss(self, outs: tuple[list[Tensor], ...], targets: list[dict[str, Tensor]],
             metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Losses of a batch: ``loss_cls`` (focal on labels, or VFL on IoU targets) and ``loss_bbox``.

        ``outs``: per-level ``cls_scores`` (B, C, H, W) and ``bbox_preds`` (B, 4, H, W); ``targets``: per image
        ``boxes`` (n, 4) ``xyxy`` pixels of the padded input and ``labels`` (n,).
        """
        cls_scores, bbox_preds = outs
        device = cls_scores[0].device
        sizes = [tuple(m.shape[-2:]) for m in cls_scores]
        gt = pad_targets(targets, device=device)
        assign, bbox_targets = fovea_assign(sizes, self.strides, self.base_edge_list, self.scale_ranges, gt,
                                            sigma=self.sigma)
        labels, gt_boxes = assign.gather(gt.gt_labels, gt.gt_boxes, self.num_classes)
        pos = assign.pos_mask
        b = pos.shape[0]
        num_pos = int(pos.sum())  # per process, as the reference (no reduce_mean)
        cls_flat = flatten_levels(cls_scores, self.num_classes)
        bbox_flat = flatten_levels(bbox_preds, 4)

        if num_pos > 0:
            loss_bbox = self.loss_bbox(bbox_flat[pos], bbox_targets[pos], weight=torch.ones_like(bbox_targets[pos]),
                                       avg_factor=num_pos)
        else:
            loss_bbox = bbox_flat.sum() * 0
        num_per_level = [h * w for h, w in sizes]
        if self.use_vfl:
            cls_targets = self.iou_targets(bbox_flat, pos, labels, gt_boxes, sizes, metas)
            loss_cls = self.loss_cls(cls_flat.reshape(-1, self.num_classes),
                                     cls_targets.reshape(-1, self.num_classes), avg_factor=num_pos + b)
            stats = self.loss_level_stats(num_per_level, pos, ~pos, cls_flat, labels, soft_targets=cls_targets)
        else:
            loss_cls = self.loss_cls(cls_flat.reshape(-1, self.num_classes), labels.reshape(-1),
                                     avg_factor=num_pos + b)
            stats = self.loss_level_stats(num_per_level, pos, ~pos, cls_flat, labels)
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "num_pos": pos.sum().float().detach(), **stats}

    @torch.no_grad()
    def iou_targets(self, bbox_flat: Tensor, pos: Tensor, labels: Tensor, gt_boxes: Tensor,
                    featmap_sizes: list[tuple[int, int]], metas: list[dict[str, Any]]) -> Tensor:
        """The VFL target ``q`` ``(B, N, C)``: IoU(decoded detached prediction, its gt) >= 1e-6 at the gt class of
        positives, 0 elsewhere (reference ``FoveaHead.loss`` with ``use_vfl``).

        Args:
            bbox_flat: ``(B, N, 4)`` log-space predictions; pos: ``(B, N)`` bool; labels: ``(B, N)`` long;
            gt_boxes: ``(B, N, 4)`` ``xyxy`` pixels of each location's gt; featmap_sizes: ``(H, W)`` per level.
        """
        device = bbox_flat.device
        points, edges, _ = self.points(featmap_sizes, device)
        pred_boxes = self.decode(points, edges, bbox_flat.detach(), self.img_shapes(metas, device))
        ious = bbox_overlaps(pred_boxes[pos], gt_boxes[pos].float(), is_aligned=True).clamp(min=1e-6)
        return iou_class_targets(pos, labels, ious, self.num_classes)

    @torch.no_grad()
    def decode_levels(self, outs: tuple[list[Tensor], ...], metas: list[dict[str, Any]]) -> LevelPredictions:
        """Sigmoid class scores; boxes decoded from each location's edge-normalised offsets, clipped to each
        image's own size."""
        cls_scores, bbox_preds = outs
        device = cls_scores[0].device
        points, edges, per_level = self.points(self.level_sizes(cls_scores), device)
        slices = self.level_slices(per_level)
        dists = self.flat_levels(bbox_preds, 4)
        img_shapes = self.img_shapes(metas, device)

        def decode(lvl: int, idx: Tensor) -> Tensor:
            sl = slices[lvl]
            d = dists[lvl].gather(1, idx[..., None].expand(-1, -1, 4))
            return self.decode(points[sl][idx], edges[sl][idx], d, img_shapes)

        return LevelPredictions(self.flat_levels(cls_scores, self.num_classes, sigmoid=True), None, decode)
