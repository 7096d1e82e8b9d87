"""Region Proposal Network head (Ren et al. 2015), MMDetection 2.x ``RPNHead`` semantics
(mmdet/models/dense_heads/rpn_head.py + anchor_head.py, configs/_base_/models/mask_rcnn_r50_fpn.py).

A dense head built from DenseDet's anchor machinery: :class:`~densedet.structures.AnchorGenerator`, batched
:func:`~densedet.assigners.max_iou_assign` (0.7 / 0.3, low-quality matches >= 0.3), the batched
:func:`~densedet.models.roi_heads.sampler.random_sample` (256 per image, half positive),
:class:`~densedet.structures.DeltaXYWHBBoxCoder` and the valid-prior rule of :class:`DenseHead`. Loss: sigmoid CE on
the sampled anchors + L1 on the positives' deltas, both over ``sum_i max(#pos_i, 1) + max(#neg_i, 1)`` (mmdet
``num_total_samples`` with sampling). Proposals: per level the ``nms_pre`` best anchors, decoded and clipped, boxes
smaller than ``min_bbox_size`` dropped by the head's ``min_bbox_rule`` (below), NMS per level (mmdet ``batched_nms``
with level ids), ``max_per_img`` kept.

``min_bbox_rule`` (:data:`MIN_BBOX_RULES`) is the size filter of the mmdet version the weights were trained with:

- ``'ge'``: only when ``min_bbox_size > 0``, keep ``w >= min_bbox_size and h >= min_bbox_size``; at 0 every
  proposal is kept, zero-width / zero-height ones included (mmdet 2.0 - 2.12 ``rpn_head.py``
  ``_get_bboxes_single``: ``if cfg.min_bbox_size > 0``; the seeds' mmdet 2.10 in hyz-xmaster/VarifocalNet and 2.11
  in rayleizhu/BiFormer). Anchors on the batch padding of a smaller image decode to such boxes after clipping to
  the image: they stay proposals (and RoIs to sample in training).
- ``'gt'``: keep ``w > min_bbox_size and h > min_bbox_size`` whenever ``min_bbox_size >= 0``, so zero-size
  proposals are dropped even at 0 (mmdet 2.13 on, PR #5011 "Discard bboxes with sizes equals to min_bbox_size").

Default ``'ge'``: every built-in Mask R-CNN config (MMDetection's released ``mask_rcnn_r50_fpn_1x_coco_20200205``
weights, BiFormer, the synthetic R-18) comes from mmdet < 2.13 (docs/configs.md).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.assigners import max_iou_assign
from densedet.losses import build_loss
from densedet.models.heads.anchor_heads import _build_anchor_generator, _build_delta_coder
from densedet.models.heads.dense_head import DenseHead, LevelPredictions, flatten_levels
from densedet.models.heads.postprocess import (
    Candidates,
    TestConfig,
    candidates_per_level,
    multiclass_nms_batched,
    parse_test_cfg,
)
from densedet.models.roi_heads.sampler import random_sample, sampling_generator
from densedet.registry import HEADS, ConfigError, check_kwargs
from densedet.structures import pad_targets

__all__ = ["MIN_BBOX_RULES", "RPNHead", "proposal_size_valid"]

RPN_ANCHORS = {"scales": [8], "ratios": [0.5, 1.0, 2.0], "strides": [4, 8, 16, 32, 64]}
RPN_ASSIGNER = {"type": "MaxIoUAssigner", "pos_iou_thr": 0.7, "neg_iou_thr": 0.3, "min_pos_iou": 0.3,
                "match_low_quality": True, "ignore_iof_thr": -1}
RPN_SAMPLER = {"type": "RandomSampler", "num": 256, "pos_fraction": 0.5, "neg_pos_ub": -1,
               "add_gt_as_proposals": False}
#: ``min_bbox_rule`` values: ``'ge'`` (mmdet < 2.13: filter only when ``min_bbox_size > 0``, keep sizes ``>=`` it),
#: ``'gt'`` (mmdet >= 2.13: always keep sizes ``>`` it, so zero-size proposals go even at 0).
MIN_BBOX_RULES = ("ge", "gt")


def proposal_size_valid(boxes: Tensor, min_bbox_size: float, rule: str) -> Tensor:
    """``(..., 4)`` xyxy proposals -> ``(...)`` bool: kept by the size filter of ``rule`` (:data:`MIN_BBOX_RULES`)."""
    wh = boxes[..., 2:] - boxes[..., :2]
    if rule == "gt":
        return (wh > min_bbox_size).all(-1)
    if min_bbox_size > 0:
        return (wh >= min_bbox_size).all(-1)
    return torch.ones(boxes.shape[:-1], dtype=torch.bool, device=boxes.device)


@HEADS.register()
class RPNHead(DenseHead):
    """``rpn_conv`` (3x3 + ReLU) -> ``rpn_cls`` (1x1, one sigmoid logit per anchor) / ``rpn_reg`` (1x1, 4 per anchor).

    ``train_cfg`` is mmdet's ``train_cfg.rpn`` (assigner, sampler, allowed_border, pos_weight, debug); ``test_cfg``
    is ``test_cfg.rpn`` (nms_pre, max_per_img, nms, min_bbox_size); the detector passes ``train_cfg.rpn_proposal``
    to :meth:`proposals` during training. ``min_bbox_rule``: how ``min_bbox_size`` filters proposals in both, by
    the mmdet version of the weights (``'ge'``: < 2.13, the default; ``'gt'``: >= 2.13; see the module docstring).
    """

    def __init__(self, in_channels: int, feat_channels: int = 256, num_classes: int = 1,
                 anchor_generator: dict | None = None, bbox_coder: dict | None = None,
                 reg_decoded_bbox: bool = False, loss_cls: dict | None = None, loss_bbox: dict | None = None,
                 num_convs: int = 1, train_cfg: dict | None = None, test_cfg: dict | None = None,
                 init_cfg: dict | None = None, min_bbox_rule: str = "ge") -> None:
        if min_bbox_rule not in MIN_BBOX_RULES:
            raise ConfigError(f"model.rpn_head.min_bbox_rule: one of {MIN_BBOX_RULES} ('ge': mmdet < 2.13, keeps "
                              f"zero-size proposals at min_bbox_size 0; 'gt': mmdet >= 2.13, drops them), got "
                              f"{min_bbox_rule!r}", path="model.rpn_head.min_bbox_rule")
        if num_classes != 1 or num_convs != 1 or reg_decoded_bbox:
            raise ConfigError("model.rpn_head: only num_classes=1, num_convs=1, reg_decoded_bbox=false (mmdet's "
                              "RPN) are available", path="model.rpn_head")
        anchors = _build_anchor_generator(anchor_generator, RPN_ANCHORS)
        cfg = dict(train_cfg or {})
        sampler = dict(cfg.pop("sampler", None) or RPN_SAMPLER)
        # DenseHead's train_cfg knows no sampler: the RPN keeps its RandomSampler settings itself
        super().__init__(1, in_channels, feat_channels, stacked_convs=0, strides=anchors.strides,
                         train_cfg={**cfg, "assigner": cfg.get("assigner") or RPN_ASSIGNER},
                         test_cfg=test_cfg or {"nms_pre": 1000, "max_per_img": 1000,
                                               "nms": {"type": "nms", "iou_threshold": 0.7}, "min_bbox_size": 0})
        self.anchor_generator = anchors
        self.bbox_coder = _build_delta_coder(bbox_coder, (1.0, 1.0, 1.0, 1.0))
        loss_cls = loss_cls or {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0}
        if not loss_cls.get("use_sigmoid", False):
            raise ConfigError("model.rpn_head.loss_cls: the RPN classifier is a sigmoid (use_sigmoid: true)",
                              path="model.rpn_head.loss_cls")
        self.loss_cls = build_loss(loss_cls, "model.rpn_head.loss_cls")
        self.loss_bbox = build_loss(loss_bbox or {"type": "L1Loss", "loss_weight": 1.0}, "model.rpn_head.loss_bbox")
        self.num_base_priors = self.anchor_generator.num_base_priors[0]
        a = dict(self.train_cfg.assigner or RPN_ASSIGNER)
        if a.pop("type", "MaxIoUAssigner") != "MaxIoUAssigner":
            raise ConfigError("model.train_cfg.rpn.assigner.type: only MaxIoUAssigner is available")
        check_kwargs(max_iou_assign, a, "model.train_cfg.rpn.assigner")
        self.assigner_kwargs = a
        if sampler.pop("type", "RandomSampler") != "RandomSampler" or sampler.pop("add_gt_as_proposals", False):
            raise ConfigError("model.train_cfg.rpn.sampler: only RandomSampler without add_gt_as_proposals")
        check_kwargs(lambda num, pos_fraction, neg_pos_ub=-1: None, sampler, "model.train_cfg.rpn.sampler")
        self.sampler_kwargs = sampler
        self.min_bbox_rule = min_bbox_rule
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, self.num_base_priors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, self.num_base_priors * 4, 1)

    def init_weights(self) -> None:
        """Normal(0, 0.01) convs, zero biases (mmdet ``RPNHead`` init_cfg)."""
        for m in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)

    def forward(self, feats: tuple[Tensor, ...] | list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level ``(B, A, H, W)`` objectness logits and ``(B, 4A, H, W)`` deltas."""
        if len(feats) != len(self.strides):
            raise ValueError(f"RPNHead: got {len(feats)} feature levels for {len(self.strides)} anchor strides")
        cls, reg = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            cls.append(self.rpn_cls(x))
            reg.append(self.rpn_reg(x))
        return cls, reg

    def _priors(self, maps: list[Tensor]) -> tuple[Tensor, list[int], list[tuple[int, int]]]:
        sizes = [tuple(m.shape[-2:]) for m in maps]
        per_level = self.anchor_generator.grid_priors(sizes, dtype=torch.float32, device=maps[0].device)
        return torch.cat(per_level, 0), [p.shape[0] for p in per_level], sizes

    def loss(self, outs: tuple[list[Tensor], list[Tensor]], targets: list[dict[str, Any]],
             metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``loss_rpn_cls`` and ``loss_rpn_bbox`` of a batch."""
        cls_scores, bbox_preds = outs
        priors, _, sizes = self._priors(cls_scores)
        device = priors.device
        valid = DenseHead.valid_prior_mask(sizes, self.strides, self.num_base_priors, metas, device)
        gt = pad_targets(targets, device=device)
        with torch.no_grad():
            assign = max_iou_assign(priors, gt, prior_valid=valid, **self.assigner_kwargs)
            pos, neg = random_sample(assign.pos_mask & valid, assign.neg_mask & valid,
                                     generator=sampling_generator(), **self.sampler_kwargs)
            # mmdet anchor_head.get_targets with sampling: sum over images of max(#pos, 1) + max(#neg, 1)
            num_total = float((pos.sum(1).clamp(min=1) + neg.sum(1).clamp(min=1)).sum())
            labels = torch.where(pos, 0, 1)  # class 0 = object, 1 = background (one-hot row of zeros)
            weights = (pos | neg).float()
        cls_flat = flatten_levels(cls_scores, 1)
        bbox_flat = flatten_levels(bbox_preds, 4)
        loss_cls = self.loss_cls(cls_flat.reshape(-1, 1).float(), labels.reshape(-1), weights.reshape(-1),
                                 avg_factor=num_total)
        if bool(pos.any()):
            idx = assign.gt_inds.clamp(min=0)
            matched = torch.gather(gt.gt_boxes, 1, idx[..., None].expand(-1, -1, 4))[pos]
            target = self.bbox_coder.encode(priors.expand(pos.shape[0], -1, -1)[pos], matched)
            pred = bbox_flat[pos].float()
            loss_bbox = self.loss_bbox(pred, target, torch.ones_like(pred), avg_factor=num_total)
        else:
            loss_bbox = bbox_flat.sum() * 0
        return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}

    def classifier(self) -> nn.Conv2d:
        return self.rpn_cls

    @torch.no_grad()
    def assign_priors(self, featmap_sizes: list[tuple[int, int]], gt: Any,
                      metas: list[dict[str, Any]]) -> tuple[Tensor, list[int]]:
        """Max-IoU assignment of the anchors (0.7 / 0.3, low-quality matches), before the RPN's sampling; anchors
        on batch padding are negative."""
        device = gt.gt_boxes.device
        per_level = self.anchor_generator.grid_priors(featmap_sizes, dtype=torch.float32, device=device)
        priors = torch.cat(per_level, 0)
        valid = DenseHead.valid_prior_mask(featmap_sizes, self.strides, self.num_base_priors, metas, device)
        res = max_iou_assign(priors, gt, prior_valid=valid, **self.assigner_kwargs)
        return res.gt_inds.masked_fill(~valid, -1), [p.shape[0] for p in per_level]

    def prior_size_range(self) -> tuple[float, float]:
        """The smallest and largest anchor side."""
        gen = self.anchor_generator
        scales = gen.scales.tolist()
        return min(gen.base_sizes) * min(scales), max(gen.base_sizes) * max(scales)

    def decode_levels(self, outs: tuple[list[Tensor], list[Tensor]], metas: list[dict[str, Any]]) -> LevelPredictions:
        """Objectness (sigmoid, detached, float32) as a one-class score; anchors decoded by the delta coder and
        clipped to each image (a ``(1, 2)`` image shape from a single meta covers the whole batch)."""
        cls_scores, bbox_preds = outs
        priors, per_level, _ = self._priors(cls_scores)
        slices = self.level_slices(per_level)
        scores = [s.detach().float() for s in self.flat_levels(cls_scores, 1, sigmoid=True)]
        deltas = [d.detach().float() for d in self.flat_levels(bbox_preds, 4)]
        img_shapes = self.img_shapes(metas, priors.device)

        def decode(lvl: int, idx: Tensor) -> Tensor:
            d = deltas[lvl].gather(1, idx[..., None].expand(-1, -1, 4))
            return self.bbox_coder.decode(priors[slices[lvl]][idx], d, max_shape=img_shapes)

        return LevelPredictions(scores, None, decode)

    @torch.no_grad()
    def proposals(self, outs: tuple[list[Tensor], list[Tensor]], metas: list[dict[str, Any]],
                  cfg: dict | None = None) -> list[Tensor]:
        """Per image ``(P_i, 5)`` proposals ``(x1, y1, x2, y2, score)`` in input pixels, ``P_i <= max_per_img``,
        sorted by decreasing score. ``cfg``: an mmdet ``rpn_proposal`` / ``test_cfg.rpn`` dict (default: the
        head's ``test_cfg``)."""
        tc = parse_test_cfg(cfg) if cfg is not None else self.test_cfg
        cand = self.proposal_candidates(outs, metas, tc)
        nms_cfg = parse_test_cfg({"nms": tc.nms, "max_per_img": tc.max_per_img, "min_bbox_size": 0})
        dets = multiclass_nms_batched(*cand, len(outs[0]), nms_cfg)
        return [torch.cat([d["boxes"], d["scores"][:, None]], 1) for d in dets]

    def proposal_candidates(self, outs: tuple[list[Tensor], list[Tensor]], metas: list[dict[str, Any]],
                            tc: TestConfig | None = None) -> Candidates:
        """Everything of :meth:`proposals` before the NMS: the shared :meth:`candidates` with no score threshold
        (per level the ``nms_pre`` best anchors by objectness, decoded and clipped), ``valid`` where the size filter
        of ``min_bbox_rule`` keeps the box (:func:`proposal_size_valid`), and the level index as the label (NMS runs
        per level). Shapes ``(B, K)``, ``K = sum_l min(nms_pre, N_l)``; shared by :mod:`densedet.deploy`'s exported
        graph."""
        tc = tc or self.test_cfg
        cand = self.candidates(outs, metas, replace(tc, score_thr=-math.inf))
        sizes = [m.shape[-2] * m.shape[-1] * self.num_base_priors for m in outs[0]]
        levels = torch.cat([torch.full((cand.boxes.shape[0], k), lvl, dtype=torch.long, device=cand.boxes.device)
                            for lvl, k in enumerate(candidates_per_level(sizes, 1, tc.nms_pre))], 1)
        valid = proposal_size_valid(cand.boxes, tc.min_bbox_size, self.min_bbox_rule)
        return Candidates(cand.boxes, cand.scores, levels, valid)
