"""VarifocalNet head (Zhang et al., "VarifocalNet: An IoU-aware Dense Object Detector", CVPR 2021).

Reference semantics: hyz-xmaster/VarifocalNet and MMDetection 2.x ``mmdet/models/dense_heads/vfnet_head.py``
(``VFNetHead``), read, not copied. FCOS-style GN towers (``cls_convs`` / ``reg_convs``), then

1. an initial box: distances ``(l, t, r, b) = exp(scales[i](vfnet_reg(vfnet_reg_conv(reg_feat)))) * denom`` with
   ``denom`` the level's regress-range bound (``bbox_norm_type='reg_denom'``) or its stride (``'stride'``);
2. a *star-shaped* deformable conv (:func:`star_dcn_offset`) that samples the 9 points of that box (corners, edge
   midpoints, centre) on the feature map, for the box refinement branch (``vfnet_reg_refine_dconv`` ->
   ``vfnet_reg_refine``: a per-side factor ``exp(scales_refine[i](.))`` times the detached initial box) and for
   the IoU-aware classification score (IACS: ``vfnet_cls_dconv`` -> ``vfnet_cls``).

Training: ATSS assignment on one square anchor per location (``use_atss``, points and anchors both at
``stride * center_offset``, 0 by default) or FCOS regress ranges with optional centre sampling; GIoU losses on the
initial (``loss_bbox``, 1.5) and refined (``loss_bbox_refine``, 2.0) boxes, each weighted by its own detached IoU
with the target and normalised by the cross-process mean of those weights' sum; Varifocal Loss on the IACS whose
target is the IoU of the refined box with its gt at the gt class and 0 elsewhere, over ``reduce_mean(num_pos)``.

Deliberate differences from the reference (docs: this docstring):

* With ATSS targets, priors on batch padding (``valid_prior_mask``) and crowd-ignored priors get classification
  weight 0 in the Varifocal Loss too; the reference passes no weight to VFL, so those count as negatives there
  (its FocalLoss ablation does use the weights, as here). Padding is not image content, so it is not a negative.
* Inference selects top-k (prior, class) pairs per level and runs one batched NMS (MMDetection 2.25's
  ``BaseDenseHead`` rule, used by every DenseDet head) rather than the older per-prior max-score top-k of
  hyz-xmaster's ``_get_bboxes_single``.
* With ``sync_num_pos=False`` the classification normaliser is ``max(num_pos, 1)`` (the reference divides by a
  possibly zero count).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from densedet.assigners import atss_assign, fcos_assign_levels
from densedet.dist import reduce_mean
from densedet.losses import build_loss
from densedet.models.dcn import DeformConv2d
from densedet.models.heads.anchor_heads import _build_anchor_generator
from densedet.models.heads.dense_head import (
    FOCAL_LOSS,
    GN_32,
    VFL_LOSS,
    DenseHead,
    LevelPredictions,
    bias_init_with_prob,
    flatten_levels,
    iou_class_targets,
    split_assigner_cfg,
)
from densedet.models.layers import ConvModule, Scale
from densedet.registry import HEADS, ConfigError
from densedet.structures import DistancePointBBoxCoder, PaddedTargets, PointGenerator, bbox_overlaps, pad_targets

INF = 1e8
ATSS_ANCHORS = {"type": "AnchorGenerator", "ratios": [1.0], "octave_base_scale": 8, "scales_per_octave": 1,
                "center_offset": 0.0, "strides": [8, 16, 32, 64, 128]}
BBOX_NORM_TYPES = ("reg_denom", "stride")


def star_dcn_offset(bbox_pred: Tensor, gradient_mul: float, stride: float) -> Tensor:
    """Offsets that make a 3x3 deformable conv sample the 9 star points of each location's predicted box.

    VFNet paper sec. 3.3 / reference ``VFNetHead.star_dcn_offset``. With ``(l, t, r, b)`` the distances divided
    by ``stride`` (feature-map cells), kernel point ``(ky, kx)`` (row-major, ``ky, kx`` in ``-1, 0, 1``) is moved
    from its regular position ``(ky, kx)`` to ``(ky', kx')`` with ``ky' = -t, 0, b`` and ``kx' = -l, 0, r`` for
    ``ky, kx = -1, 0, 1``: the corners, edge midpoints and the location itself. The returned offset is
    ``(ky' - ky, kx' - kx)``, interleaved ``(dy, dx)`` per point as ``torchvision.ops.deform_conv2d`` /
    mmcv expect.

    Only ``gradient_mul`` of the gradient flows back into ``bbox_pred``: ``(1 - g) * x.detach() + g * x``.

    Args:
        bbox_pred: ``(B, 4, H, W)`` distances ``(l, t, r, b)`` in input pixels.
        gradient_mul: the fraction of the gradient passed to ``bbox_pred`` (0.1 in the reference).
        stride: the level's stride (pixels per feature cell).

    Returns:
        ``(B, 18, H, W)`` offsets in feature cells.
    """
    d = ((1 - gradient_mul) * bbox_pred.detach() + gradient_mul * bbox_pred) / stride
    left, top, right, bottom = d.unbind(1)
    zero = torch.zeros_like(left)
    ys = (-top, -top, -top, zero, zero, zero, bottom, bottom, bottom)
    xs = (-left, zero, right, -left, zero, right, -left, zero, right)
    star = torch.stack([v for pair in zip(ys, xs) for v in pair], dim=1)
    # regular 3x3 grid (dy, dx), row-major: (-1,-1), (-1,0), (-1,1), (0,-1), ...
    base = torch.tensor([-1.0, 0.0, 1.0], dtype=star.dtype, device=star.device)
    grid = torch.stack(torch.meshgrid(base, base, indexing="ij"), dim=-1).reshape(18)
    return star - grid.view(1, 18, 1, 1)


@HEADS.register()
class VFNetHead(DenseHead):
    """VarifocalNet head: ``cls_convs`` / ``reg_convs``, ``vfnet_reg_conv``, ``vfnet_reg``, ``scales``,
    ``vfnet_reg_refine_dconv``, ``vfnet_reg_refine``, ``scales_refine``, ``vfnet_cls_dconv``, ``vfnet_cls``
    (MMDetection checkpoint names).

    ``forward`` returns per-level ``(cls_scores (B, C, H, W) IACS logits, bbox_preds (B, 4, H, W) initial
    distances, bbox_preds_refine (B, 4, H, W) refined distances)``, distances ``(l, t, r, b)`` in input pixels
    from the level's points. ``dcn_on_last_conv`` makes the last conv of both towers a DCNv2 (mmdet
    ``AnchorFreeHead``), as the mdconv configs set. ``stacked_convs`` defaults to 4, the reference's inherited
    default; every VFNet config sets 3.
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 strides: tuple[int, ...] | list[int] = (8, 16, 32, 64, 128),
                 regress_ranges: tuple | list = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF)),
                 center_sampling: bool = False, center_sample_radius: float = 1.5, sync_num_pos: bool = True,
                 gradient_mul: float = 0.1, bbox_norm_type: str = "reg_denom", loss_cls_fl: dict | None = None,
                 use_vfl: bool = True, loss_cls: dict | None = None, loss_bbox: dict | None = None,
                 loss_bbox_refine: dict | None = None, norm_cfg: dict | None = None, use_atss: bool = True,
                 reg_decoded_bbox: bool = True, anchor_generator: dict | None = None,
                 dcn_on_last_conv: bool = False, conv_bias: bool | str = "auto", conv_cfg: dict | None = None,
                 train_cfg: dict | None = None, test_cfg: dict | None = None, init_cfg: dict | None = None) -> None:
        norm_cfg = GN_32 if norm_cfg is None else norm_cfg
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, strides, conv_cfg, norm_cfg,
                         conv_bias, train_cfg=train_cfg, test_cfg=test_cfg)
        if bbox_norm_type not in BBOX_NORM_TYPES:
            raise ConfigError(f"model.bbox_head.bbox_norm_type: expected one of {BBOX_NORM_TYPES}, got "
                              f"'{bbox_norm_type}'", path="model.bbox_head.bbox_norm_type")
        if not reg_decoded_bbox:
            raise ConfigError("model.bbox_head.reg_decoded_bbox: VFNetHead regresses decoded boxes (GIoU); False is "
                              "not supported", path="model.bbox_head.reg_decoded_bbox")
        if len(regress_ranges) != len(self.strides):
            raise ConfigError(f"model.bbox_head.regress_ranges: {len(regress_ranges)} ranges for "
                              f"{len(self.strides)} strides", path="model.bbox_head.regress_ranges")
        if not 0.0 <= gradient_mul <= 1.0:
            raise ConfigError(f"model.bbox_head.gradient_mul must be in [0, 1], got {gradient_mul}",
                              path="model.bbox_head.gradient_mul")
        self.regress_ranges = [tuple(float(v) for v in r) for r in regress_ranges]
        # reference: each level's upper range bound, the last (infinite) one replaced by twice the previous
        self.reg_denoms = [r[-1] for r in self.regress_ranges]
        self.reg_denoms[-1] = self.reg_denoms[-2] * 2 if len(self.reg_denoms) > 1 else self.reg_denoms[-1]
        self.center_sampling = center_sampling
        self.center_sample_radius = center_sample_radius
        self.sync_num_pos = sync_num_pos
        self.gradient_mul = gradient_mul
        self.bbox_norm_type = bbox_norm_type
        self.dcn_on_last_conv = dcn_on_last_conv
        self.use_vfl = use_vfl
        self.use_atss = use_atss
        if use_vfl:
            self.loss_cls = build_loss(loss_cls or VFL_LOSS, "model.bbox_head.loss_cls")
        else:
            self.loss_cls = build_loss(loss_cls_fl or FOCAL_LOSS, "model.bbox_head.loss_cls_fl")
        self.loss_bbox = build_loss(loss_bbox or {"type": "GIoULoss", "loss_weight": 1.5}, "model.bbox_head.loss_bbox")
        self.loss_bbox_refine = build_loss(loss_bbox_refine or {"type": "GIoULoss", "loss_weight": 2.0},
                                           "model.bbox_head.loss_bbox_refine")
        self.anchor_generator = _build_anchor_generator(anchor_generator, ATSS_ANCHORS)
        if [int(s[0]) for s in self.anchor_generator.strides] != self.strides:
            raise ConfigError(f"model.bbox_head.anchor_generator.strides {self.anchor_generator.strides} differ from "
                              f"model.bbox_head.strides {self.strides}", path="model.bbox_head.anchor_generator")
        if self.anchor_generator.num_base_priors[0] != 1:
            raise ConfigError("model.bbox_head.anchor_generator: VFNet predicts one box per location, so the ATSS "
                              "anchor generator needs exactly one ratio and one scale",
                              path="model.bbox_head.anchor_generator")
        if use_atss:
            self.assigner_kwargs = split_assigner_cfg(self.train_cfg, "ATSSAssigner", atss_assign)
        # points coincide with the ATSS anchor centres (reference get_points); FCOS targets use cell centres
        offset = self.anchor_generator.center_offset if use_atss else 0.5
        self.prior_generator = PointGenerator(self.strides, offset=offset)
        self.bbox_coder = DistancePointBBoxCoder()

        self.cls_convs = self._build_tower()
        self.reg_convs = self._build_tower()
        self.relu = nn.ReLU()
        self.vfnet_reg_conv = ConvModule(feat_channels, feat_channels, 3, stride=1, padding=1, conv_cfg=conv_cfg,
                                         norm_cfg=norm_cfg, bias=conv_bias)
        self.vfnet_reg = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self.vfnet_reg_refine_dconv = DeformConv2d(feat_channels, feat_channels, 3, 1, padding=1)
        self.vfnet_reg_refine = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.scales_refine = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self.vfnet_cls_dconv = DeformConv2d(feat_channels, feat_channels, 3, 1, padding=1)
        self.vfnet_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)

    def _build_tower(self) -> nn.ModuleList:
        """``stacked_convs`` 3x3 ConvModules; the last one a DCNv2 with ``dcn_on_last_conv`` (mmdet
        ``AnchorFreeHead._init_cls_convs``)."""
        convs = nn.ModuleList()
        for i in range(self.stacked_convs):
            last_dcn = self.dcn_on_last_conv and i == self.stacked_convs - 1
            convs.append(ConvModule(self.in_channels if i == 0 else self.feat_channels, self.feat_channels, 3,
                                    stride=1, padding=1, conv_cfg={"type": "DCNv2"} if last_dcn else self.conv_cfg,
                                    norm_cfg=self.norm_cfg, bias=self.conv_bias))
        return convs

    def classifier(self) -> nn.Conv2d:
        return self.vfnet_cls

    def init_weights(self) -> None:
        """Normal(0, 0.01) for the plain tower convs and every predictor incl. the star dconvs, classifier bias at
        prior 0.01 (hyz-xmaster ``VFNetHead.init_weights``); a DCNv2 tower conv keeps its own init (zero
        ``conv_offset``), norms weight 1 / bias 0."""
        for m in [*self.cls_convs, *self.reg_convs, self.vfnet_reg_conv]:
            if type(m.conv) is nn.Conv2d:
                nn.init.normal_(m.conv.weight, 0.0, 0.01)
                if m.conv.bias is not None:
                    nn.init.zeros_(m.conv.bias)
            else:
                m.conv.init_weights()
            if m.norm is not None:
                nn.init.ones_(m.norm.weight)
                nn.init.zeros_(m.norm.bias)
        for m in (self.vfnet_reg, self.vfnet_reg_refine_dconv, self.vfnet_reg_refine, self.vfnet_cls_dconv,
                  self.vfnet_cls):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.vfnet_cls.bias, bias_init_with_prob(0.01))

    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, Tensor, Tensor]:
        cls_feat, reg_feat = self.towers(x)
        stride = self.strides[level]
        denom = self.reg_denoms[level] if self.bbox_norm_type == "reg_denom" else stride
        bbox_pred = self.scales[level](self.vfnet_reg(self.vfnet_reg_conv(reg_feat))).float().exp() * denom
        # offsets in the features' dtype so the head runs under autocast
        offset = star_dcn_offset(bbox_pred, self.gradient_mul, stride).to(reg_feat.dtype)
        reg_feat = self.relu(self.vfnet_reg_refine_dconv(reg_feat, offset))
        factor = self.scales_refine[level](self.vfnet_reg_refine(reg_feat)).float().exp()
        bbox_pred_refine = factor * bbox_pred.detach()  # the refinement does not train the initial box
        cls_feat = self.relu(self.vfnet_cls_dconv(cls_feat, offset))
        return self.vfnet_cls(cls_feat), bbox_pred, bbox_pred_refine

    def points(self, featmap_sizes: list[tuple[int, int]], device: torch.device,
               dtype: torch.dtype) -> tuple[Tensor, list[int]]:
        """All points ``(N, 2)`` (x, y) of all levels and the count per level."""
        per_level = self.prior_generator.grid_priors(featmap_sizes, dtype=dtype, device=device)
        return torch.cat(per_level, 0), [p.shape[0] for p in per_level]

    @torch.no_grad()
    def assign_priors(self, featmap_sizes: list[tuple[int, int]], gt: PaddedTargets,
                      metas: list[dict[str, Any]]) -> tuple[Tensor, list[int]]:
        """ATSS on one square anchor per location (``use_atss``; padding priors negative), else FCOS ranges."""
        points, per_level = self.points(featmap_sizes, gt.gt_boxes.device, torch.float32)
        assign, valid = self._assign(featmap_sizes, points, per_level, gt, metas)
        return (assign.gt_inds if valid is None else assign.gt_inds.masked_fill(~valid, -1)), per_level

    def _assign(self, featmap_sizes: list[tuple[int, int]], points: Tensor, per_level: list[int], gt: PaddedTargets,
                metas: list[dict[str, Any]]) -> tuple[Any, Tensor | None]:
        """ATSS on one square anchor per location (``use_atss``: with the valid-prior mask (N,) of the batch
        padding) or FCOS ranges (mask None): ``(AssignResult, valid)``."""
        device = points.device
        if self.use_atss:
            anchors = torch.cat(self.anchor_generator.grid_priors(featmap_sizes, dtype=torch.float32, device=device))
            valid = self.valid_prior_mask(featmap_sizes, self.strides, 1, metas, device)
            return atss_assign(anchors, per_level, gt, prior_valid=valid, **self.assigner_kwargs), valid
        assign, _ = fcos_assign_levels(points, per_level, self.strides, self.regress_ranges, gt,
                                       center_sampling=self.center_sampling,
                                       center_sample_radius=self.center_sample_radius)
        return assign, None

    def prior_size_range(self) -> tuple[float, float]:
        """ATSS: the anchors' sides; FCOS targets: a P3 cell up to twice the last regress range's lower bound."""
        if self.use_atss:
            gen = self.anchor_generator
            scales = gen.scales.tolist()
            return min(gen.base_sizes) * min(scales), max(gen.base_sizes) * max(scales)
        top = float(self.regress_ranges[-1][1])
        return float(min(self.strides)), (2 * top if math.isfinite(top) and top < 1e7 else math.inf)

    def get_targets(self, featmap_sizes: list[tuple[int, int]], points: Tensor, per_level: list[int],
                    targets: list[dict[str, Tensor]], metas: list[dict[str, Any]]
                    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """Batched ATSS (``use_atss``) or FCOS targets.

        Returns:
            ``(labels (B, N) long with num_classes = background, gt_boxes (B, N, 4) xyxy target of each positive
            (0 elsewhere), label_weights (B, N) float or None (FCOS: every prior counts, as the reference),
            pos (B, N) bool, neg (B, N) bool)``.
        """
        gt = pad_targets(targets, device=points.device)
        assign, valid = self._assign(featmap_sizes, points, per_level, gt, metas)
        if valid is not None:  # ATSS: priors on the batch padding are neither positive nor negative
            pos = assign.pos_mask & valid
            neg = (assign.gt_inds == -1) & valid
            label_weights = (valid & (assign.gt_inds != -2)).float()
        else:
            pos = assign.pos_mask
            neg = ~pos
            label_weights = None
        labels, gt_boxes = assign.gather(gt.gt_labels, gt.gt_boxes, self.num_classes)
        return labels, gt_boxes, label_weights, pos, neg

    def loss(self, outs: tuple[list[Tensor], ...], targets: list[dict[str, Tensor]],
             metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``loss_cls`` (VFL, or FocalLoss when ``use_vfl=False``), ``loss_bbox`` (initial boxes), ``loss_bbox_rf``
        (refined boxes; the reference's log name), ``num_pos`` and, when collected, per-level statistics."""
        cls_scores, bbox_preds, bbox_preds_refine = outs
        device = cls_scores[0].device
        sizes = [tuple(m.shape[-2:]) for m in cls_scores]
        points, per_level = self.points(sizes, device, torch.float32)
        labels, gt_boxes, label_weights, pos, neg = self.get_targets(sizes, points, per_level, targets, metas)
        num_pos = pos.sum().float()
        avg_factor = max(reduce_mean(num_pos).item() if self.sync_num_pos else num_pos.item(), 1.0)

        b, c = pos.shape[0], self.num_classes
        cls_flat = flatten_levels(cls_scores, c)
        bbox_flat = flatten_levels(bbox_preds, 4)
        refine_flat = flatten_levels(bbox_preds_refine, 4)
        pos_points = points.expand(b, -1, -1)[pos]
        target = gt_boxes[pos]
        pred_init = self.bbox_coder.decode(pos_points, bbox_flat[pos])
        pred_refine = self.bbox_coder.decode(pos_points, refine_flat[pos])
        # each box loss is weighted by its own detached IoU, normalised by the (cross-process mean) sum of weights
        iou_init = bbox_overlaps(pred_init, target, is_aligned=True).clamp(min=1e-6).detach()
        iou_refine = bbox_overlaps(pred_refine, target, is_aligned=True).clamp(min=1e-6).detach()
        if pos_points.numel():
            avg_init = reduce_mean(iou_init.sum()).clamp(min=1).item()
            avg_refine = reduce_mean(iou_refine.sum()).clamp(min=1).item()
            loss_bbox = self.loss_bbox(pred_init, target, weight=iou_init, avg_factor=avg_init)
            loss_bbox_rf = self.loss_bbox_refine(pred_refine, target, weight=iou_refine, avg_factor=avg_refine)
        else:
            # keep the collective calls balanced across processes when this one has no positive
            reduce_mean(iou_init.sum())
            reduce_mean(iou_refine.sum())
            loss_bbox = bbox_flat.sum() * 0
            loss_bbox_rf = refine_flat.sum() * 0

        weight = None if label_weights is None else label_weights.reshape(-1)
        if self.use_vfl:
            cls_targets = self.vfl_targets(labels, pos, iou_refine)
            loss_cls = self.loss_cls(cls_flat.reshape(-1, c), cls_targets.reshape(-1, c), weight,
                                     avg_factor=avg_factor)
            stats = self.loss_level_stats(per_level, pos, neg, cls_flat, labels, label_weights,
                                          soft_targets=cls_targets)
        else:
            loss_cls = self.loss_cls(cls_flat.reshape(-1, c), labels.reshape(-1), weight, avg_factor=avg_factor)
            stats = self.loss_level_stats(per_level, pos, neg, cls_flat, labels, label_weights)
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_bbox_rf": loss_bbox_rf,
                "num_pos": num_pos.detach(), **stats}

    def vfl_targets(self, labels: Tensor, pos: Tensor, pos_ious: Tensor) -> Tensor:
        """IoU-aware classification targets (VFNet paper eq. 2): ``q`` = IoU of the refined box with its gt at the
        gt class of each positive, 0 elsewhere.

        Args:
            labels: ``(B, N)`` long, ``num_classes`` for non-positives; pos: ``(B, N)`` bool;
            pos_ious: ``(P,)`` IoUs of the positives in ``pos`` order (row-major over ``(B, N)``).

        Returns:
            ``(B, N, num_classes)`` float.
        """
        return iou_class_targets(pos, labels, pos_ious, self.num_classes)

    @torch.no_grad()
    def decode_levels(self, outs: tuple[list[Tensor], ...], metas: list[dict[str, Any]]) -> LevelPredictions:
        """Detections ranked by sigmoid(IACS) (no score factor), boxes decoded from the refined distances and
        clipped to each image."""
        cls_scores, _, bbox_preds_refine = outs
        device = cls_scores[0].device
        points, per_level = self.points(self.level_sizes(cls_scores), device, bbox_preds_refine[0].dtype)
        slices = self.level_slices(per_level)
        dists = self.flat_levels(bbox_preds_refine, 4)
        img_shapes = self.img_shapes(metas, device)

        def decode(lvl: int, idx: Tensor) -> Tensor:
            d = dists[lvl].gather(1, idx[..., None].expand(-1, -1, 4))
            return self.bbox_coder.decode(points[slices[lvl]][idx], d, max_shape=img_shapes)

        return LevelPredictions(self.flat_levels(cls_scores, self.num_classes, sigmoid=True), None, decode)


__all__ = ["VFNetHead", "star_dcn_offset"]
