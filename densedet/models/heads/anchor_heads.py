"""Anchor-based dense heads: RetinaNet and ATSS.

RetinaHead follows mmdet/models/dense_heads/retina_head.py + anchor_head.py (MMDetection 2.x): max-IoU assignment,
focal loss normalised by the number of positives (``max(pos, 1)`` per image, summed, *not* averaged across
processes, as the reference does), box loss on encoded deltas (or on decoded boxes when ``reg_decoded_bbox``).
ATSSHead follows mmdet/models/dense_heads/atss_head.py: ATSS assignment, focal loss and centerness BCE over
``max(reduce_mean(sum over images of max(#pos, 1)), 1)`` (``get_targets`` counts every image as at least one positive),
GIoU weighted by the centerness target and normalised by its cross-process mean sum, floored by ``centerness_norm``
(see :func:`centerness_normaliser`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from densedet.assigners import AssignResult, atss_assign, max_iou_assign
from densedet.dist import reduce_mean
from densedet.losses import build_loss
from densedet.models.heads.dense_head import (
    CENTERNESS_LOSS,
    FOCAL_LOSS,
    GN_32,
    VFL_LOSS,
    DenseHead,
    LevelPredictions,
    flatten_levels,
    iou_class_targets,
    level_kwargs,
    split_assigner_cfg,
)
from densedet.models.layers import Scale
from densedet.registry import HEADS, ConfigError, check_kwargs
from densedet.structures import AnchorGenerator, DeltaXYWHBBoxCoder, PaddedTargets, bbox_overlaps, pad_targets

#: ``centerness_norm`` rules of the ATSS box-loss normaliser (the cross-process mean of the centerness-target sum):
#: ``'eps'``: a sum below 1e-12 becomes 1, any other is kept (mmdet 2.10 ``atss_head.py``, ``EPS = 1e-12``: the
#: VarifocalNet seed; the released mmdet ATSS weights predate any floor); ``'clamp1'``: ``max(sum, 1)`` (mmdet 2.14
#: ``atss_head.py``, ``clamp_(min=1)``: the UMOP seed).
CENTERNESS_NORMS = ("eps", "clamp1")


def centerness_normaliser(total: float, rule: str) -> float:
    """The ATSS box-loss divisor from the (process-averaged) centerness-target sum ``total`` under ``rule``."""
    if rule == "clamp1":
        return max(total, 1.0)
    return 1.0 if total < 1e-12 else total


def check_centerness_norm(rule: str) -> str:
    if rule not in CENTERNESS_NORMS:
        raise ConfigError(f"model.bbox_head.centerness_norm: one of {CENTERNESS_NORMS} ('eps': mmdet 2.10 / "
                          f"VarifocalNet, 'clamp1': mmdet 2.14 / UMOP), got {rule!r}",
                          path="model.bbox_head.centerness_norm")
    return rule


def images_at_least_one_positive(pos: Tensor) -> Tensor:
    """mmdet ``get_targets``' ``num_total_pos``: the sum over images of ``max(#positives, 1)``. (B, N) bool -> 0-d."""
    return pos.sum(1).clamp(min=1).sum().float()


def _build_anchor_generator(cfg: dict[str, Any] | None, default: dict[str, Any]) -> AnchorGenerator:
    cfg = dict(default if cfg is None else cfg)
    kind = cfg.pop("type", "AnchorGenerator")
    if kind != "AnchorGenerator":
        raise ConfigError(f"model.bbox_head.anchor_generator.type: unknown '{kind}'",
                          path="model.bbox_head.anchor_generator.type")
    check_kwargs(AnchorGenerator, cfg, "model.bbox_head.anchor_generator")
    return AnchorGenerator(**cfg)


def _build_delta_coder(cfg: dict[str, Any] | None, default_stds: tuple[float, ...]) -> DeltaXYWHBBoxCoder:
    cfg = dict(cfg or {"target_means": (0.0, 0.0, 0.0, 0.0), "target_stds": default_stds})
    kind = cfg.pop("type", "DeltaXYWHBBoxCoder")
    if kind != "DeltaXYWHBBoxCoder":
        raise ConfigError(f"model.bbox_head.bbox_coder.type: unknown '{kind}'", path="model.bbox_head.bbox_coder.type")
    check_kwargs(DeltaXYWHBBoxCoder, cfg, "model.bbox_head.bbox_coder")
    return DeltaXYWHBBoxCoder(**cfg)


def _build_cls_loss(loss_cls: dict | None, use_vfl: bool, loss_cls_vfl: dict | None, vfl_key: str) -> nn.Module:
    """``loss_cls`` (focal by default), or the Varifocal Loss of ``vfl_key`` when ``use_vfl`` (VarifocalNet's
    plug-in switch: the focal config stays in the file for the ablation)."""
    if not use_vfl:
        return build_loss(loss_cls or FOCAL_LOSS, "model.bbox_head.loss_cls")
    cfg = loss_cls_vfl or VFL_LOSS
    if cfg.get("type") != "VarifocalLoss":
        raise ConfigError(f"model.bbox_head.{vfl_key}.type: use_vfl needs VarifocalLoss, got '{cfg.get('type')}'",
                          path=f"model.bbox_head.{vfl_key}.type")
    return build_loss(cfg, f"model.bbox_head.{vfl_key}")


@dataclass
class AnchorTargets:
    """One batch's assignment on the flattened anchors: ``priors`` (N, 4) xyxy, ``num_per_level``; per image and
    anchor (B, N): ``labels`` (``num_classes`` = background), ``gt_boxes`` (B, N, 4) xyxy of the assigned gt,
    ``label_weights`` (0 on batch padding and ignored anchors), ``pos`` / ``neg`` masks (padding in neither)."""

    priors: Tensor
    num_per_level: list[int]
    labels: Tensor
    gt_boxes: Tensor
    label_weights: Tensor
    pos: Tensor
    neg: Tensor


class AnchorDenseHead(DenseHead):
    """Anchor bookkeeping shared by RetinaNet and ATSS."""

    anchor_generator: AnchorGenerator
    bbox_coder: DeltaXYWHBBoxCoder

    def priors(self, featmap_sizes: list[tuple[int, int]], device: torch.device,
               dtype: torch.dtype) -> tuple[Tensor, list[int]]:
        """All anchors (N, 4) xyxy of all levels, and the count per level."""
        per_level = self.anchor_generator.grid_priors(featmap_sizes, dtype=dtype, device=device)
        return torch.cat(per_level, 0), [p.shape[0] for p in per_level]

    def classification_loss(self, cls_flat: Tensor, labels: Tensor, label_weights: Tensor, num_total: float,
                            pos: Tensor, ious: Tensor | None,
                            num_per_level: list[int]) -> tuple[Tensor, Tensor | None]:
        """``loss_cls`` on labels, or (``ious`` given: the Varifocal path) on IoU-aware targets.

        Args:
            cls_flat: (B, N, C) logits; labels, label_weights, pos: (B, N); ious: (P,) IoU of each positive's
                predicted box with its gt (``pos.nonzero()`` order) or None; num_per_level: priors per level.

        Returns:
            ``(loss, soft_targets)``: the (B, N, C) VFL targets, or None on the label path.
        """
        c = self.num_classes
        soft = None if ious is None else iou_class_targets(pos, labels, ious, c)
        target = labels.reshape(-1) if soft is None else soft.reshape(-1, c)
        # GHM: one call per level, as the reference's loss_single (rows are image-major: level ids repeat per image)
        per_level = level_kwargs(self.loss_cls, self.level_ids(num_per_level, pos.device).repeat(pos.shape[0]),
                                 len(num_per_level))
        return self.loss_cls(cls_flat.reshape(-1, c), target, label_weights.reshape(-1), avg_factor=num_total,
                             **per_level), soft

    def assign_anchors(self, cls_scores: list[Tensor], targets: list[dict[str, Tensor]],
                       metas: list[dict[str, Any]]) -> AnchorTargets:
        """Anchors of the batch's feature maps, assigned by the head's :meth:`_assign` (max-IoU for RetinaNet,
        ATSS for ATSS and UMOP) with priors on batch padding left out (mmdet ``valid_flags``)."""
        device = cls_scores[0].device
        sizes = [tuple(m.shape[-2:]) for m in cls_scores]
        priors, per_level = self.priors(sizes, device, torch.float32)
        valid = self.valid_prior_mask(sizes, self.strides, self.num_base_priors, metas, device)
        gt = pad_targets(targets, device=device)
        assign = self._assign(priors, per_level, gt, valid)
        labels, gt_boxes = assign.gather(gt.gt_labels, gt.gt_boxes, self.num_classes)
        return AnchorTargets(priors, per_level, labels, gt_boxes, (valid & (assign.gt_inds != -2)).float(),
                             assign.pos_mask & valid, (assign.gt_inds == -1) & valid)

    @torch.no_grad()
    def assign_priors(self, featmap_sizes: list[tuple[int, int]], gt: PaddedTargets,
                      metas: list[dict[str, Any]]) -> tuple[Tensor, list[int]]:
        """Max-IoU (RetinaNet) or ATSS (ATSS, UMOP) on the anchors; priors on batch padding are negative."""
        device = gt.gt_boxes.device
        priors, per_level = self.priors(featmap_sizes, device, torch.float32)
        valid = self.valid_prior_mask(featmap_sizes, self.strides, self.num_base_priors, metas, device)
        return self._assign(priors, per_level, gt, valid).gt_inds.masked_fill(~valid, -1), per_level

    def prior_size_range(self) -> tuple[float, float]:
        """The smallest and largest anchor side (``base size * scale``)."""
        gen = self.anchor_generator
        scales = gen.scales.tolist()
        return min(gen.base_sizes) * min(scales), max(gen.base_sizes) * max(scales)

    def _assign(self, priors: Tensor, num_per_level: list[int], gt: PaddedTargets, valid: Tensor) -> AssignResult:
        raise NotImplementedError(f"{type(self).__name__} must define _assign() (abstract in AnchorDenseHead)")

    def _decoder(self, priors: Tensor, num_per_level: list[int], bbox_flat: list[Tensor],
                 img_shapes: Tensor) -> Callable[[int, Tensor], Tensor]:
        slices = self.level_slices(num_per_level)

        def decode(lvl: int, idx: Tensor) -> Tensor:
            pri = priors[slices[lvl]][idx]  # (B, k, 4)
            deltas = bbox_flat[lvl].gather(1, idx[..., None].expand(-1, -1, 4))
            return self.bbox_coder.decode(pri, deltas, max_shape=img_shapes)

        return decode


@HEADS.register()
class RetinaHead(AnchorDenseHead):
    """RetinaNet head (Lin et al. 2017): 4-conv towers, ``retina_cls`` / ``retina_reg``."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 conv_cfg: dict | None = None, norm_cfg: dict | None = None,
                 anchor_generator: dict | None = None, bbox_coder: dict | None = None,
                 reg_decoded_bbox: bool = False, loss_cls: dict | None = None, loss_bbox: dict | None = None,
                 use_vfl: bool = False, loss_cls_vfl: dict | None = None,
                 train_cfg: dict | None = None, test_cfg: dict | None = None, init_cfg: dict | None = None) -> None:
        self.anchor_generator = _build_anchor_generator(anchor_generator, {
            "octave_base_scale": 4, "scales_per_octave": 3, "ratios": (0.5, 1.0, 2.0),
            "strides": (8, 16, 32, 64, 128)})
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs,
                         strides=self.anchor_generator.strides, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                         train_cfg=train_cfg, test_cfg=test_cfg)
        self.bbox_coder = _build_delta_coder(bbox_coder, (1.0, 1.0, 1.0, 1.0))
        self.reg_decoded_bbox = reg_decoded_bbox
        box_type = (loss_bbox or {}).get("type", "L1Loss")
        if box_type in ("GIoULoss", "IoULoss") and not reg_decoded_bbox:
            raise ConfigError(f"model.bbox_head.reg_decoded_bbox: {box_type} compares boxes, so it needs "
                              f"reg_decoded_bbox: true (as in MMDetection)", path="model.bbox_head.reg_decoded_bbox")
        self.use_vfl = use_vfl
        if use_vfl and reg_decoded_bbox:
            raise ConfigError("model.bbox_head.use_vfl: the VarifocalNet RetinaHead computes the IoU target from "
                              "encoded deltas, so it needs reg_decoded_bbox: false", path="model.bbox_head.use_vfl")
        self.loss_cls = _build_cls_loss(loss_cls, use_vfl, loss_cls_vfl, "loss_cls_vfl")
        self.loss_bbox = build_loss(loss_bbox or {"type": "L1Loss", "loss_weight": 1.0}, "model.bbox_head.loss_bbox")
        self.assigner_kwargs = split_assigner_cfg(self.train_cfg, "MaxIoUAssigner", max_iou_assign)
        self.num_base_priors = self.anchor_generator.num_base_priors[0]
        self.cls_convs = self._build_tower()
        self.reg_convs = self._build_tower()
        self.retina_cls = nn.Conv2d(feat_channels, self.num_base_priors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, self.num_base_priors * 4, 3, padding=1)

    def classifier(self) -> nn.Conv2d:
        return self.retina_cls

    def _assign(self, priors: Tensor, num_per_level: list[int], gt: PaddedTargets, valid: Tensor) -> AssignResult:
        return max_iou_assign(priors, gt, prior_valid=valid, **self.assigner_kwargs)

    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, Tensor]:
        c, r = self.towers(x)
        return self.retina_cls(c), self.retina_reg(r)

    def loss(self, outs: tuple[list[Tensor], ...], targets: list[dict[str, Tensor]],
             metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        cls_scores, bbox_preds = outs
        t = self.assign_anchors(cls_scores, targets, metas)
        priors, per_level, labels, gt_boxes, label_weights, pos = (
            t.priors, t.num_per_level, t.labels, t.gt_boxes, t.label_weights, t.pos)
        # anchor_head.get_targets: sum over images of max(#pos, 1), per process (RetinaNet does not reduce_mean)
        num_total = images_at_least_one_positive(pos).item()

        cls_flat = flatten_levels(cls_scores, self.num_classes)
        bbox_flat = flatten_levels(bbox_preds, 4)
        pos_pred = bbox_flat[pos]
        pos_priors = priors.expand(pos.shape[0], -1, -1)[pos]
        if self.reg_decoded_bbox:
            pred = self.bbox_coder.decode(pos_priors, pos_pred)
            target = gt_boxes[pos]
        else:
            pred, target = pos_pred, self.bbox_coder.encode(pos_priors, gt_boxes[pos])
        ious = None
        if self.use_vfl:
            # VarifocalNet anchor_head.loss_single: q = IoU(decode(pred), decode(target deltas)), both detached,
            # at the gt class of each positive; ignored anchors keep their zero label weight
            ious = bbox_overlaps(self.bbox_coder.decode(pos_priors, pos_pred.detach()),
                                 self.bbox_coder.decode(pos_priors, target), is_aligned=True)
        loss_cls, soft = self.classification_loss(cls_flat, labels, label_weights, num_total, pos, ious, per_level)
        if pos_pred.numel():
            # GHM-R: per level as the reference; the positives' rows keep their priors' levels
            pos_levels = self.level_ids(per_level, pos.device).expand_as(pos)[pos]
            loss_bbox = self.loss_bbox(pred, target, avg_factor=num_total,
                                       **level_kwargs(self.loss_bbox, pos_levels, len(per_level)))
        else:
            loss_bbox = bbox_flat.sum() * 0
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "num_pos": pos.sum().float().detach(),
                **self.loss_level_stats(per_level, pos, t.neg, cls_flat, labels,
                                        label_weights, soft)}

    @torch.no_grad()
    def decode_levels(self, outs: tuple[list[Tensor], ...], metas: list[dict[str, Any]]) -> LevelPredictions:
        """Sigmoid class scores; anchors decoded by the delta coder and clipped to each image."""
        cls_scores, bbox_preds = outs
        device = cls_scores[0].device
        priors, per_level = self.priors(self.level_sizes(cls_scores), device, cls_scores[0].dtype)
        decode = self._decoder(priors, per_level, self.flat_levels(bbox_preds, 4), self.img_shapes(metas, device))
        return LevelPredictions(self.flat_levels(cls_scores, self.num_classes, sigmoid=True), None, decode)


@HEADS.register()
class ATSSHead(AnchorDenseHead):
    """ATSS head (Zhang et al. 2020): GN towers, ``atss_cls`` / ``atss_reg`` / ``atss_centerness``, ``scales``."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 conv_cfg: dict | None = None, norm_cfg: dict | None = None,
                 anchor_generator: dict | None = None, bbox_coder: dict | None = None,
                 reg_decoded_bbox: bool = True, loss_cls: dict | None = None, loss_bbox: dict | None = None,
                 loss_centerness: dict | None = None, dcn_on_last_conv: bool = False, use_vfl: bool = False,
                 use_gfl: bool = False, loss_cls_vgfl: dict | None = None, centerness_norm: str = "eps",
                 train_cfg: dict | None = None, test_cfg: dict | None = None, init_cfg: dict | None = None) -> None:
        if use_gfl:
            raise ConfigError("model.bbox_head.use_gfl: Generalized Focal Loss is not implemented in DenseDet "
                              "(use_vfl selects the Varifocal Loss)", path="model.bbox_head.use_gfl")
        self.anchor_generator = _build_anchor_generator(anchor_generator, {
            "octave_base_scale": 8, "scales_per_octave": 1, "ratios": (1.0,), "strides": (8, 16, 32, 64, 128)})
        norm_cfg = GN_32 if norm_cfg is None else norm_cfg
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs,
                         strides=self.anchor_generator.strides, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                         train_cfg=train_cfg, test_cfg=test_cfg)
        if not reg_decoded_bbox:
            raise ConfigError("model.bbox_head.reg_decoded_bbox: ATSSHead regresses decoded boxes (GIoU); "
                              "False is not supported", path="model.bbox_head.reg_decoded_bbox")
        self.bbox_coder = _build_delta_coder(bbox_coder, (0.1, 0.1, 0.2, 0.2))
        self.use_vfl = use_vfl
        self.centerness_norm = check_centerness_norm(centerness_norm)
        self.loss_cls = _build_cls_loss(loss_cls, use_vfl, loss_cls_vgfl, "loss_cls_vgfl")
        self.loss_bbox = build_loss(loss_bbox or {"type": "GIoULoss", "loss_weight": 2.0},
                                    "model.bbox_head.loss_bbox")
        self.loss_centerness = build_loss(loss_centerness or CENTERNESS_LOSS,
                                          "model.bbox_head.loss_centerness")
        self.assigner_kwargs = split_assigner_cfg(self.train_cfg, "ATSSAssigner", atss_assign)
        self.num_base_priors = self.anchor_generator.num_base_priors[0]
        self.cls_convs = self._build_tower(dcn_on_last_conv)
        self.reg_convs = self._build_tower(dcn_on_last_conv)
        a = self.num_base_priors
        self.atss_cls = nn.Conv2d(feat_channels, a * num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(feat_channels, a * 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(feat_channels, a, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])

    def classifier(self) -> nn.Conv2d:
        return self.atss_cls

    def _assign(self, priors: Tensor, num_per_level: list[int], gt: PaddedTargets, valid: Tensor) -> AssignResult:
        return atss_assign(priors, num_per_level, gt, prior_valid=valid, **self.assigner_kwargs)

    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, Tensor, Tensor]:
        c, r = self.towers(x)
        bbox = self.scales[level](self.atss_reg(r)).float()
        return self.atss_cls(c), bbox, self.atss_centerness(r)

    @staticmethod
    def centerness_target(anchors: Tensor, gts: Tensor) -> Tensor:
        """Centerness of the anchor centre inside its gt box (atss_head.centerness_target). (P,4),(P,4) -> (P,)."""
        cx = (anchors[:, 0] + anchors[:, 2]) / 2
        cy = (anchors[:, 1] + anchors[:, 3]) / 2
        lr = torch.stack([cx - gts[:, 0], gts[:, 2] - cx], 1)
        tb = torch.stack([cy - gts[:, 1], gts[:, 3] - cy], 1)
        return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))

    def loss(self, outs: tuple[list[Tensor], ...], targets: list[dict[str, Tensor]],
             metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        cls_scores, bbox_preds, centernesses = outs
        t = self.assign_anchors(cls_scores, targets, metas)
        priors, per_level, labels, gt_boxes, label_weights, pos = (
            t.priors, t.num_per_level, t.labels, t.gt_boxes, t.label_weights, t.pos)
        # atss_head.loss: max(reduce_mean(num_total_pos), 1), each image counting at least one positive
        num_total = max(reduce_mean(images_at_least_one_positive(pos)).item(), 1.0)

        cls_flat = flatten_levels(cls_scores, self.num_classes)
        bbox_flat = flatten_levels(bbox_preds, 4)
        ctr_flat = flatten_levels(centernesses, 1)[..., 0]
        pos_priors = priors.expand(pos.shape[0], -1, -1)[pos]
        pos_gt = gt_boxes[pos]
        ctr_targets = self.centerness_target(pos_priors, pos_gt)
        decoded = self.bbox_coder.decode(pos_priors, bbox_flat[pos])
        if pos_gt.numel():
            loss_bbox = self.loss_bbox(decoded, pos_gt, weight=ctr_targets, avg_factor=1.0)
            loss_ctr = self.loss_centerness(ctr_flat[pos], ctr_targets, avg_factor=num_total)
        else:
            loss_bbox = bbox_flat.sum() * 0
            loss_ctr = ctr_flat.sum() * 0
        ious = None
        if self.use_vfl:
            # VarifocalNet atss_vgfl_head.loss_single: q = IoU(decoded pred, gt).clamp(min=1e-6), detached, at the
            # gt class. The reference passes no label weights to VFL, so priors on batch padding count as
            # negatives there; DenseDet keeps them out (as its focal path and VFNetHead do): a padded batch then
            # gives each image the loss it has alone. Unpadded images get the reference's value.
            ious = bbox_overlaps(decoded.detach(), pos_gt, is_aligned=True).clamp(min=1e-6)
        loss_cls, soft = self.classification_loss(cls_flat, labels, label_weights, num_total, pos, ious, per_level)
        bbox_avg = centerness_normaliser(reduce_mean(ctr_targets.sum().detach().float()).item(), self.centerness_norm)
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox / bbox_avg, "loss_centerness": loss_ctr,
                "num_pos": pos.sum().float().detach(),
                **self.loss_level_stats(per_level, pos, t.neg, cls_flat, labels,
                                        label_weights, soft)}

    @torch.no_grad()
    def decode_levels(self, outs: tuple[list[Tensor], ...], metas: list[dict[str, Any]]) -> LevelPredictions:
        """Sigmoid class scores, sigmoid centerness as the score factor, anchors decoded and clipped."""
        cls_scores, bbox_preds, centernesses = outs
        device = cls_scores[0].device
        priors, per_level = self.priors(self.level_sizes(cls_scores), device, cls_scores[0].dtype)
        factors = [f[..., 0] for f in self.flat_levels(centernesses, 1, sigmoid=True)]
        decode = self._decoder(priors, per_level, self.flat_levels(bbox_preds, 4), self.img_shapes(metas, device))
        return LevelPredictions(self.flat_levels(cls_scores, self.num_classes, sigmoid=True), factors, decode)


# VarifocalNet's name for the ATSS head with the ``use_vfl`` switch (atss_vgfl_head.py); same layers and keys.
HEADS["ATSSVGFLHead"] = ATSSHead
