"""RepPoints head (Yang et al., "RepPoints: Point Set Representation for Object Detection", ICCV 2019).

Follows ``RepPointsHead`` of hyz-xmaster/VarifocalNet (mmdet/models/dense_heads/reppoints_head.py, which adds
``use_vfl`` / ``loss_cls_vfl`` to MMDetection 2.x's head), read, not copied:

* towers ``cls_convs`` / ``reg_convs``; ``reppoints_pts_init_conv`` -> ``reppoints_pts_init_out`` predicts 9 points
  as ``(dy, dx)`` offsets in stride units from the location; ``reppoints_cls_conv`` and
  ``reppoints_pts_refine_conv`` are deformable 3x3 convs sampling at those points (offsets = points minus the
  regular grid ``dcn_base_offset``, gradient scaled by ``gradient_mul``); ``reppoints_pts_refine_out`` adds a
  refinement to the (detached) initial points.
* points -> box by the ``moment`` transform (mean +- std * exp(moment_transfer)), ``minmax`` or ``partial_minmax``.
* targets: the init stage assigns the points themselves (``PointAssigner``) or boxes of side
  ``point_base_scale * stride`` around them (``MaxIoUAssigner``); the refine stage max-IoU-assigns the boxes of the
  (detached) initial points. Box losses compare boxes divided by ``point_base_scale * stride``; every loss is
  normalised by the sum over images of ``max(#pos, 1)`` of its stage (per process, as the reference).
* ``use_vfl``: the classification target is the IoU of the refined box (detached) with its gt at the gt class,
  and the loss is ``loss_cls_vfl`` (Varifocal Loss, Zhang et al. CVPR 2021).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.assigners import IGNORED, AssignResult, expand_strides, max_iou_assign, point_assign
from densedet.losses import build_loss
from densedet.models.dcn import DeformConv2d
from densedet.models.heads.dense_head import (
    FOCAL_LOSS,
    VFL_LOSS,
    DenseHead,
    LevelPredictions,
    flatten_levels,
    iou_class_targets,
    level_kwargs,
    parse_train_cfg,
)
from densedet.registry import HEADS, ConfigError, check_kwargs
from densedet.structures import PointGenerator, bbox_overlaps, pad_targets
from densedet.structures.coders import clip_boxes

TRANSFORM_METHODS = ("moment", "minmax", "partial_minmax")
# The reference config's train_cfg (used when a model is built for inference only).
DEFAULT_TRAIN_CFG = {
    "init": {"assigner": {"type": "PointAssigner", "scale": 4, "pos_num": 1}, "allowed_border": -1, "pos_weight": -1},
    "refine": {"assigner": {"type": "MaxIoUAssigner", "pos_iou_thr": 0.5, "neg_iou_thr": 0.4, "min_pos_iou": 0,
                            "ignore_iof_thr": -1}, "allowed_border": -1, "pos_weight": -1},
}
# Where invalid proposals go for the refine-stage max-IoU assignment: an empty box overlaps nothing (IoU 0).
_FAR = -1e4


def _stage_assigner(train_cfg: dict[str, Any], stage: str, allowed: tuple[str, ...]) -> tuple[str, dict, float]:
    """``(assigner type, its kwargs, pos_weight)`` of ``train_cfg[stage]``."""
    where = f"model.train_cfg.{stage}"
    cfg = parse_train_cfg(train_cfg.get(stage))
    a = dict(cfg.assigner or DEFAULT_TRAIN_CFG[stage]["assigner"])
    kind = a.pop("type", allowed[0])
    if kind not in allowed:
        raise ConfigError(f"{where}.assigner.type: RepPointsHead's {stage} stage takes {list(allowed)}, got "
                          f"'{kind}'", path=f"{where}.assigner.type")
    check_kwargs(point_assign if kind == "PointAssigner" else max_iou_assign, a, f"{where}.assigner")
    return kind, a, float(cfg.pos_weight)


@HEADS.register()
class RepPointsHead(DenseHead):
    """RepPoints head with the reference's parameter names (``reppoints_*``, ``moment_transfer``).

    Outputs per level: ``cls (B, C, H, W)`` logits, ``pts_init`` and ``pts_refine`` ``(B, 2 * num_points, H, W)``
    point offsets in stride units, ``(dy, dx)`` per point, relative to the location ``(j * stride, i * stride)``.
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, point_feat_channels: int = 256,
                 stacked_convs: int = 4, num_points: int = 9, gradient_mul: float = 0.1,
                 point_strides: tuple[int, ...] | list[int] = (8, 16, 32, 64, 128), point_base_scale: float = 4,
                 conv_cfg: dict | None = None, norm_cfg: dict | None = None, conv_bias: bool | str = "auto",
                 loss_cls: dict | None = None, use_vfl: bool = False, loss_cls_vfl: dict | None = None,
                 loss_bbox_init: dict | None = None, loss_bbox_refine: dict | None = None,
                 use_grid_points: bool = False, center_init: bool = True, transform_method: str = "moment",
                 moment_mul: float = 0.01, train_cfg: dict | None = None, test_cfg: dict | None = None,
                 init_cfg: dict | None = None) -> None:
        # the nested init/refine train_cfg is parsed here, not by DenseHead
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, point_strides, conv_cfg, norm_cfg,
                         conv_bias, train_cfg=None, test_cfg=test_cfg)
        kernel = int(math.isqrt(num_points))
        if kernel * kernel != num_points or kernel % 2 == 0:
            raise ConfigError(f"model.bbox_head.num_points: must be an odd square (the deformable kernel is "
                              f"sqrt(num_points) wide), got {num_points}", path="model.bbox_head.num_points")
        if use_grid_points:
            raise ConfigError("model.bbox_head.use_grid_points: the bounding-box (grid points) representation is "
                              "not available; use the point representation (false)",
                              path="model.bbox_head.use_grid_points")
        if transform_method not in TRANSFORM_METHODS:
            raise ConfigError(f"model.bbox_head.transform_method: one of {list(TRANSFORM_METHODS)}, got "
                              f"'{transform_method}'", path="model.bbox_head.transform_method")
        self.num_points = num_points
        self.point_feat_channels = point_feat_channels
        self.gradient_mul = gradient_mul
        self.point_base_scale = point_base_scale
        self.center_init = center_init
        self.transform_method = transform_method
        self.moment_mul = moment_mul
        self.dcn_kernel = kernel
        self.dcn_pad = (kernel - 1) // 2
        self.prior_generator = PointGenerator(self.strides, offset=0.0)  # mmdet PointGenerator: points at j * stride

        # regular 3x3 grid as (dy, dx) pairs, kernel points row-major: the deformable convs' zero-offset positions
        base = torch.arange(-self.dcn_pad, self.dcn_pad + 1, dtype=torch.float32)
        grid = torch.stack([base.repeat_interleave(kernel), base.repeat(kernel)], dim=1).reshape(1, -1, 1, 1)
        self.register_buffer("dcn_base_offset", grid, persistent=False)  # not in mmdet checkpoints

        loss_cls = dict(loss_cls or FOCAL_LOSS)
        if not use_vfl and not loss_cls.get("use_sigmoid", False):  # the reference's default, as use_sigmoid_cls
            raise ConfigError("model.bbox_head.loss_cls.use_sigmoid: RepPointsHead has sigmoid classifiers only "
                              "(no background channel); set use_sigmoid: true", path="model.bbox_head.loss_cls")
        self.use_vfl = use_vfl
        # mmdet samples (and averages over positives + negatives) unless loss_cls is a focal loss
        self.sampling = loss_cls.get("type") not in ("FocalLoss",)
        if use_vfl:
            self.loss_cls = build_loss(loss_cls_vfl or VFL_LOSS, "model.bbox_head.loss_cls_vfl")
        else:
            self.loss_cls = build_loss(loss_cls, "model.bbox_head.loss_cls")
        self.loss_bbox_init = build_loss(loss_bbox_init or {"type": "SmoothL1Loss", "beta": 1.0 / 9.0,
                                                            "loss_weight": 0.5}, "model.bbox_head.loss_bbox_init")
        self.loss_bbox_refine = build_loss(loss_bbox_refine or {"type": "SmoothL1Loss", "beta": 1.0 / 9.0,
                                                                "loss_weight": 1.0},
                                           "model.bbox_head.loss_bbox_refine")

        tcfg = dict(DEFAULT_TRAIN_CFG if train_cfg is None else train_cfg)
        unknown = set(tcfg) - {"init", "refine"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"model.train_cfg.{key}: RepPointsHead takes a train_cfg with 'init' and 'refine' "
                              f"stages only", path=f"model.train_cfg.{key}")
        self.init_assigner, self.init_kwargs, self.init_pos_weight = _stage_assigner(
            tcfg, "init", ("PointAssigner", "MaxIoUAssigner"))
        _, self.refine_kwargs, self.refine_pos_weight = _stage_assigner(tcfg, "refine", ("MaxIoUAssigner",))

        pts_out = 2 * num_points
        self.cls_convs = self._build_tower()
        self.reg_convs = self._build_tower()
        self.reppoints_cls_conv = DeformConv2d(feat_channels, point_feat_channels, kernel, 1, self.dcn_pad)
        self.reppoints_cls_out = nn.Conv2d(point_feat_channels, num_classes, 1)
        self.reppoints_pts_init_conv = nn.Conv2d(feat_channels, point_feat_channels, 3, 1, 1)
        self.reppoints_pts_init_out = nn.Conv2d(point_feat_channels, pts_out, 1)
        self.reppoints_pts_refine_conv = DeformConv2d(feat_channels, point_feat_channels, kernel, 1, self.dcn_pad)
        self.reppoints_pts_refine_out = nn.Conv2d(point_feat_channels, pts_out, 1)
        if transform_method == "moment":
            self.moment_transfer = nn.Parameter(torch.zeros(2))

    def classifier(self) -> nn.Conv2d:
        return self.reppoints_cls_out

    def init_weights(self) -> None:
        """Normal(0, 0.01) for every conv, deformable ones included; classifier bias at prior 0.01."""
        super().init_weights()
        for m in (self.reppoints_cls_conv, self.reppoints_pts_refine_conv):
            nn.init.normal_(m.weight, 0.0, 0.01)
        if self.transform_method == "moment":
            nn.init.zeros_(self.moment_transfer)

    # ------------------------------------------------------------------ forward
    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, Tensor, Tensor]:
        base = self.dcn_base_offset.to(x.dtype)
        c, r = self.towers(x)
        pts_init = self.reppoints_pts_init_out(F.relu(self.reppoints_pts_init_conv(r)))
        if not self.center_init:
            # start from the regular grid scaled to a point_base_scale-wide box instead of the centre
            pts_init = pts_init + base / base.max() * (self.point_base_scale / 2)
        # the classification / refinement branches pass only gradient_mul of their gradient to the init points
        pts_grad_mul = (1 - self.gradient_mul) * pts_init.detach() + self.gradient_mul * pts_init
        dcn_offset = pts_grad_mul - base
        cls = self.reppoints_cls_out(F.relu(self.reppoints_cls_conv(c, dcn_offset)))
        pts_refine = self.reppoints_pts_refine_out(F.relu(self.reppoints_pts_refine_conv(r, dcn_offset)))
        return cls, pts_init, pts_refine + pts_init.detach()

    # ------------------------------------------------------------------ geometry
    def points2bbox(self, pts: Tensor) -> Tensor:
        """Point sets -> boxes.

        Args:
            pts: ``(..., num_points, 2)`` points ``(x, y)`` (any unit; boxes come out in the same unit).

        Returns:
            ``(..., 4)`` xyxy. ``moment``: centre = mean, half size = (unbiased) std * exp(moment_transfer)
            (RepPoints paper sec. 3.2; ``moment_transfer`` = (width, height) log-scales whose gradient is scaled by
            ``moment_mul``); ``minmax``: the points' bounding box; ``partial_minmax``: that of the first 4 points.
        """
        x, y = pts[..., 0], pts[..., 1]
        if self.transform_method == "moment":
            mx, my = x.mean(-1), y.mean(-1)
            sx, sy = torch.std(x - mx[..., None], dim=-1), torch.std(y - my[..., None], dim=-1)
            mt = self.moment_transfer * self.moment_mul + self.moment_transfer.detach() * (1 - self.moment_mul)
            hw, hh = sx * torch.exp(mt[0]), sy * torch.exp(mt[1])
            return torch.stack([mx - hw, my - hh, mx + hw, my + hh], dim=-1)
        if self.transform_method == "partial_minmax":
            x, y = x[..., :4], y[..., :4]
        return torch.stack([x.amin(-1), y.amin(-1), x.amax(-1), y.amax(-1)], dim=-1)

    def offsets_to_xy(self, offsets: Tensor) -> Tensor:
        """``(..., 2 * num_points)`` interleaved ``(dy, dx)`` -> ``(..., num_points, 2)`` ``(dx, dy)``."""
        return offsets.reshape(*offsets.shape[:-1], self.num_points, 2).flip(-1)

    def points(self, featmap_sizes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor, list[int]]:
        """Locations ``(N, 2)`` ``(x, y)`` at ``(j * stride, i * stride)``, their strides ``(N,)``, count per level."""
        per_level = self.prior_generator.grid_priors(featmap_sizes, dtype=torch.float32, device=device)
        counts = [p.shape[0] for p in per_level]
        return torch.cat(per_level, 0), expand_strides(self.strides, counts, device), counts

    @torch.no_grad()
    def assign_priors(self, featmap_sizes: list[tuple[int, int]], gt: Any,
                      metas: list[dict[str, Any]]) -> tuple[Tensor, list[int]]:
        """The init stage's assignment (point or max-IoU assigner) of the locations; padding locations negative."""
        device = gt.gt_boxes.device
        points, strides, per_level = self.points(featmap_sizes, device)
        valid = self.valid_prior_mask(featmap_sizes, self.strides, 1, metas, device)
        return self.init_targets(points, strides, gt, valid).gt_inds.masked_fill(~valid, -1), per_level

    # ------------------------------------------------------------------ training
    def _num_samples(self, pos: Tensor, neg: Tensor) -> float:
        """mmdet ``get_targets``: sum over images of ``max(#pos, 1)`` (+ the same for negatives when sampling)."""
        total = pos.sum(1).clamp(min=1).sum()
        if self.sampling:
            total = total + neg.sum(1).clamp(min=1).sum()
        return float(total.item())

    def _box_loss(self, loss_fn: nn.Module, pred: Tensor, target: Tensor, norm: Tensor, pos: Tensor,
                  avg: float) -> Tensor:
        if not bool(pos.any()):
            return pred.sum() * 0
        return loss_fn(pred[pos] / norm[pos], target[pos] / norm[pos], avg_factor=avg)

    @torch.no_grad()
    def init_targets(self, points: Tensor, strides: Tensor, gt: Any, valid: Tensor) -> AssignResult:
        """Init-stage assignment of the locations ``(N, 2)`` for the batch; ``valid`` ``(B, N)``."""
        if self.init_assigner == "PointAssigner":
            return point_assign(points, strides, gt, prior_valid=valid, **self.init_kwargs)
        half = (self.point_base_scale * strides / 2)[:, None]
        return max_iou_assign(torch.cat([points - half, points + half], 1), gt, prior_valid=valid,
                              **self.init_kwargs)

    @torch.no_grad()
    def refine_targets(self, proposals: Tensor, gt: Any, valid: Tensor) -> AssignResult:
        """Refine-stage max-IoU assignment of per-image boxes ``(B, N, 4)`` (the initial points' boxes).

        Invalid proposals are moved to an empty box far outside the image, so they overlap no gt and can neither
        match nor take a gt's best-IoU match from a valid one, and are then marked ignored: the same result as
        mmdet dropping them before assignment.
        """
        proposals = torch.where(valid[..., None], proposals, proposals.new_full((), _FAR))
        res = max_iou_assign(proposals, gt, **self.refine_kwargs)
        return AssignResult(gt_inds=torch.where(valid, res.gt_inds, IGNORED), max_overlaps=res.max_overlaps)

    def vfl_targets(self, boxes: Tensor, labels: Tensor, gt_boxes: Tensor, pos: Tensor) -> Tensor:
        """Varifocal targets ``(B, N, C)``: IoU(refined box, its gt) at the gt class of positives, 0 elsewhere.

        Args: boxes / gt_boxes ``(B, N, 4)`` xyxy, labels ``(B, N)``, pos ``(B, N)`` bool.
        """
        iou = bbox_overlaps(boxes[pos].detach(), gt_boxes[pos], is_aligned=True)
        return iou_class_targets(pos, labels, iou, self.num_classes).to(boxes.dtype)

    def loss(self, outs: tuple[list[Tensor], ...], targets: list[dict[str, Tensor]],
             metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        cls_scores, pts_init, pts_refine = outs
        device = cls_scores[0].device
        sizes = [tuple(m.shape[-2:]) for m in cls_scores]
        points, strides, per_level = self.points(sizes, device)
        valid = self.valid_prior_mask(sizes, self.strides, 1, metas, device)
        gt = pad_targets(targets, device=device)
        c = self.num_classes
        scale = strides[None, :, None, None]
        init_xy = self.offsets_to_xy(flatten_levels(pts_init, 2 * self.num_points).float()) * scale + points[:, None]
        refine_xy = self.offsets_to_xy(flatten_levels(pts_refine, 2 * self.num_points).float()) * scale \
            + points[:, None]
        cls_flat = flatten_levels(cls_scores, c)
        norm = (self.point_base_scale * strides)[None, :, None].expand(cls_flat.shape[0], -1, 1)  # (B, N, 1)

        # init stage: the initial points' box against the gt of the assigned location
        a_init = self.init_targets(points, strides, gt, valid)
        _, gt_init = a_init.gather(gt.gt_labels, gt.gt_boxes, c)
        pos_init = a_init.pos_mask
        num_init = self._num_samples(pos_init, a_init.neg_mask)
        box_init = self.points2bbox(init_xy)
        loss_init = self._box_loss(self.loss_bbox_init, box_init, gt_init, norm, pos_init, num_init)

        # refine stage: proposals are the boxes of the detached initial points
        a_ref = self.refine_targets(box_init.detach(), gt, valid)
        labels, gt_ref = a_ref.gather(gt.gt_labels, gt.gt_boxes, c)
        pos, neg = a_ref.pos_mask, a_ref.neg_mask
        label_weights = (pos | neg).float()
        if self.refine_pos_weight > 0:
            label_weights = torch.where(pos, label_weights.new_full((), self.refine_pos_weight), label_weights)
        num_ref = self._num_samples(pos, neg)
        box_ref = self.points2bbox(refine_xy)
        loss_refine = self._box_loss(self.loss_bbox_refine, box_ref, gt_ref, norm, pos, num_ref)

        if self.use_vfl:
            cls_target = self.vfl_targets(box_ref, labels, gt_ref, pos).reshape(-1, c)
        else:
            cls_target = labels.reshape(-1)
        # GHM: one call per level, as the reference's loss_single (rows image-major: level ids repeat per image)
        per_level_kw = level_kwargs(self.loss_cls, self.level_ids(per_level, device).repeat(cls_flat.shape[0]),
                                    len(per_level))
        loss_cls = self.loss_cls(cls_flat.reshape(-1, c), cls_target, label_weights.reshape(-1), avg_factor=num_ref,
                                 **per_level_kw)
        out = {"loss_cls": loss_cls, "loss_pts_init": loss_init, "loss_pts_refine": loss_refine,
               "num_pos": pos.sum().float().detach()}
        out.update(self.loss_level_stats(per_level, pos, neg, cls_flat, labels, label_weights,
                                         soft_targets=cls_target if self.use_vfl else None))
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def decode_levels(self, outs: tuple[list[Tensor], ...], metas: list[dict[str, Any]]) -> LevelPredictions:
        """Sigmoid class scores; boxes of the refined points (decoded around each location, clipped)."""
        cls_scores, _, pts_refine = outs
        device = cls_scores[0].device
        per_level = self.prior_generator.grid_priors(self.level_sizes(cls_scores), dtype=torch.float32,
                                                     device=device)
        offsets = [o.float() for o in self.flat_levels(pts_refine, 2 * self.num_points)]
        img_shapes = self.img_shapes(metas, device)

        def decode(lvl: int, idx: Tensor) -> Tensor:
            off = offsets[lvl].gather(1, idx[..., None].expand(-1, -1, offsets[lvl].shape[-1]))
            centre = per_level[lvl][idx].repeat(1, 1, 2)  # (B, k, 4) = (x, y, x, y)
            boxes = self.points2bbox(self.offsets_to_xy(off)) * self.strides[lvl] + centre
            return clip_boxes(boxes, img_shapes)

        return LevelPredictions(self.flat_levels(cls_scores, self.num_classes, sigmoid=True), None, decode)
