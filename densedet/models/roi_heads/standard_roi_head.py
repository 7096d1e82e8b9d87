"""The standard RoI head of Faster/Mask R-CNN: proposals -> sampled RoIs -> box head (+ mask head on positives).

MMDetection 2.x ``StandardRoIHead`` (mmdet/models/roi_heads/standard_roi_head.py) with its ``train_cfg.rcnn`` /
``test_cfg.rcnn``. Assignment and sampling run on the whole batch padded to the largest proposal count
(:func:`~densedet.assigners.max_iou_assign`, :func:`~densedet.models.roi_heads.sampler.random_sample`); the gt boxes
are prepended to the proposals after assignment and assigned to themselves (mmdet ``add_gt_as_proposals``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from densedet.assigners import max_iou_assign
from densedet.models.heads.postprocess import Candidates, multiclass_nms_batched, parse_test_cfg
from densedet.models.roi_heads.bbox_head import Shared2FCBBoxHead
from densedet.models.roi_heads.mask_head import FCNMaskHead, paste_masks_in_boxes
from densedet.models.roi_heads.roi_extractor import SingleRoIExtractor, static_shapes
from densedet.models.roi_heads.sampler import random_sample, sampling_generator
from densedet.registry import ConfigError, check_kwargs
from densedet.structures import pad_targets
from densedet.structures.masks import InstanceMasks

__all__ = ["RCNNTestConfig", "RCNNTrainConfig", "StandardRoIHead", "pad_proposals", "rois_of_all_slots"]

_COMPONENTS: dict[str, dict[str, type]] = {
    "bbox_roi_extractor": {"SingleRoIExtractor": SingleRoIExtractor},
    "mask_roi_extractor": {"SingleRoIExtractor": SingleRoIExtractor},
    "bbox_head": {"Shared2FCBBoxHead": Shared2FCBBoxHead},
    "mask_head": {"FCNMaskHead": FCNMaskHead},
}


_MASK_CHUNK = 32  # detections per mask-head call at inference (bounds its temporary memory)


def _build(key: str, cfg: dict) -> nn.Module:
    cfg = dict(cfg)
    kinds = _COMPONENTS[key]
    kind = cfg.pop("type", None)
    if kind not in kinds:
        raise ConfigError(f"model.roi_head.{key}.type: one of {sorted(kinds)}, got {kind!r}",
                          path=f"model.roi_head.{key}.type")
    check_kwargs(kinds[kind], cfg, f"model.roi_head.{key}")
    return kinds[kind](**cfg)


@dataclass
class RCNNTrainConfig:
    """mmdet ``train_cfg.rcnn``: MaxIoUAssigner kwargs, RandomSampler settings, ``mask_size``."""

    assigner: dict[str, Any] = field(default_factory=lambda: {
        "type": "MaxIoUAssigner", "pos_iou_thr": 0.5, "neg_iou_thr": 0.5, "min_pos_iou": 0.5,
        "match_low_quality": True, "ignore_iof_thr": -1})
    sampler: dict[str, Any] = field(default_factory=lambda: {
        "type": "RandomSampler", "num": 512, "pos_fraction": 0.25, "neg_pos_ub": -1, "add_gt_as_proposals": True})
    mask_size: int = 28
    pos_weight: float = -1
    debug: bool = False

    def assigner_kwargs(self, where: str) -> dict[str, Any]:
        a = dict(self.assigner)
        if a.pop("type", "MaxIoUAssigner") != "MaxIoUAssigner":
            raise ConfigError(f"{where}.assigner.type: only MaxIoUAssigner is available", path=f"{where}.assigner")
        check_kwargs(max_iou_assign, a, f"{where}.assigner")
        return a

    def sampler_kwargs(self, where: str) -> dict[str, Any]:
        s = dict(self.sampler)
        if s.pop("type", "RandomSampler") != "RandomSampler":
            raise ConfigError(f"{where}.sampler.type: only RandomSampler is available", path=f"{where}.sampler")
        s.pop("add_gt_as_proposals", None)
        check_kwargs(lambda num, pos_fraction, neg_pos_ub=-1: None, s, f"{where}.sampler")
        return s


@dataclass
class RCNNTestConfig:
    """mmdet ``test_cfg.rcnn``."""

    score_thr: float = 0.05
    nms: dict[str, Any] | None = None
    max_per_img: int = 100
    mask_thr_binary: float = 0.5


def _parse(cls: type, cfg: dict | None, where: str) -> Any:
    cfg = dict(cfg or {})
    check_kwargs(cls, cfg, where)
    return cls(**cfg)


def pad_proposals(proposals: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-image ``(P_i, 4)`` boxes -> ``(B, P, 4)`` zero-padded and ``(B, P)`` validity."""
    b = len(proposals)
    p = max(1, max(x.shape[0] for x in proposals))
    boxes = proposals[0].new_zeros((b, p, 4))
    valid = torch.zeros((b, p), dtype=torch.bool, device=boxes.device)
    for i, x in enumerate(proposals):
        boxes[i, : x.shape[0]] = x[:, :4]
        valid[i, : x.shape[0]] = True
    return boxes, valid


def rois_of_all_slots(boxes: Tensor) -> Tensor:
    """``(B, N, 4)`` -> ``(B * N, 5)`` RoIs ``(batch_index, x1, y1, x2, y2)`` of every slot (static shapes)."""
    b, n = boxes.shape[:2]
    idx = torch.arange(b, device=boxes.device, dtype=boxes.dtype).view(b, 1, 1).expand(b, n, 1)
    return torch.cat([idx, boxes], -1).reshape(-1, 5)


def rois_from(boxes: Tensor, sel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Selected entries of ``(B, P, 4)`` boxes as ``(R, 5)`` RoIs ``(batch_index, x1, y1, x2, y2)``, with their
    image and slot indices."""
    b_idx, p_idx = sel.nonzero(as_tuple=True)
    rois = torch.cat([b_idx[:, None].to(boxes.dtype), boxes[b_idx, p_idx]], 1)
    return rois, b_idx, p_idx


class StandardRoIHead(nn.Module):
    """Box branch (``bbox_roi_extractor`` + ``bbox_head``) and optional mask branch (``mask_roi_extractor`` +
    ``mask_head``), as MMDetection names them."""

    def __init__(self, bbox_roi_extractor: dict, bbox_head: dict, mask_roi_extractor: dict | None = None,
                 mask_head: dict | None = None, shared_head: dict | None = None, train_cfg: dict | None = None,
                 test_cfg: dict | None = None, pretrained: str | None = None, init_cfg: dict | None = None) -> None:
        super().__init__()
        if shared_head is not None:
            raise ConfigError("model.roi_head.shared_head: shared heads (C4 models) are not available")
        self.bbox_roi_extractor = _build("bbox_roi_extractor", bbox_roi_extractor)
        self.bbox_head = _build("bbox_head", bbox_head)
        self.with_mask = mask_head is not None
        if self.with_mask:
            if mask_roi_extractor is None:
                raise ConfigError("model.roi_head.mask_roi_extractor is required with a mask_head")
            self.mask_roi_extractor = _build("mask_roi_extractor", mask_roi_extractor)
            self.mask_head = _build("mask_head", mask_head)
        where = "model.train_cfg.rcnn"
        self.train_cfg: RCNNTrainConfig = _parse(RCNNTrainConfig, train_cfg, where)
        self.assigner_kwargs = self.train_cfg.assigner_kwargs(where)
        self.sampler_kwargs = self.train_cfg.sampler_kwargs(where)
        self.add_gt_as_proposals = bool(self.train_cfg.sampler.get("add_gt_as_proposals", True))
        self.test_cfg: RCNNTestConfig = _parse(RCNNTestConfig, test_cfg, "model.test_cfg.rcnn")
        # the R-CNN stage's detection config (score_thr, nms, max_per_img): what candidates_from and the NMS read
        self.nms_cfg = parse_test_cfg({"score_thr": self.test_cfg.score_thr, "nms": self.test_cfg.nms,
                                       "max_per_img": self.test_cfg.max_per_img})
        self.precision = "fp32"  # the detector's inference precision (TwoStageDetector.set_precision)

    @property
    def num_classes(self) -> int:
        return self.bbox_head.num_classes

    def reset_classifier(self, num_classes: int | None = None) -> None:
        """Re-create the class-dependent layers (``fc_cls``, ``fc_reg``, ``conv_logits``) for ``num_classes``."""
        self.bbox_head.reset_classifier(num_classes)
        if self.with_mask:
            self.mask_head.reset_classifier(num_classes)

    def init_weights(self) -> None:
        self.bbox_head.init_weights()
        if self.with_mask:
            self.mask_head.init_weights()

    # ------------------------------------------------------------------------------------------------ training
    @torch.no_grad()
    def sample(self, proposals: list[Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Assign and sample the RoIs of a batch.

        Returns ``rois`` (R, 5), ``labels`` (R,) (``num_classes`` = background), ``gt_inds`` (R,) index of the
        assigned gt in its image (-1 for negatives), ``bbox_targets`` (R, 4) encoded deltas (0 for negatives).
        """
        device = proposals[0].device
        gt = pad_targets(targets, device=device)
        props, valid = pad_proposals(proposals)
        assign = max_iou_assign(props, gt, prior_valid=valid, **self.assigner_kwargs)
        gt_inds = assign.gt_inds
        boxes = props
        if self.add_gt_as_proposals:
            m = gt.gt_boxes.shape[1]
            own = torch.arange(m, device=device).expand(gt.batch_size, m)
            gt_inds = torch.cat([torch.where(gt.gt_valid, own, -2), gt_inds], 1)
            boxes = torch.cat([gt.gt_boxes, props], 1)
        pos_sel, neg_sel = random_sample(gt_inds >= 0, gt_inds == -1, generator=sampling_generator(),
                                         **self.sampler_kwargs)
        rois, b_idx, p_idx = rois_from(boxes, pos_sel | neg_sel)
        inds = gt_inds[b_idx, p_idx]
        pos = inds >= 0
        labels = torch.where(pos, gt.gt_labels[b_idx, inds.clamp(min=0)], self.num_classes)
        matched = gt.gt_boxes[b_idx, inds.clamp(min=0)]
        bbox_targets = torch.zeros_like(matched)
        if bool(pos.any()):
            bbox_targets[pos] = self.bbox_head.bbox_coder.encode(rois[pos, 1:], matched[pos])
        return {"rois": rois, "labels": labels, "gt_inds": torch.where(pos, inds, -1), "bbox_targets": bbox_targets}

    def loss(self, feats: tuple[Tensor, ...], proposals: list[Tensor], targets: list[dict[str, Any]],
             metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        s = self.sample(proposals, targets)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, s["rois"]))
        losses = self.bbox_head.loss(cls_score, bbox_pred, s["labels"], s["bbox_targets"])
        if self.with_mask:
            losses["loss_mask"] = self._mask_loss(feats, s, targets)
        return losses

    def _mask_loss(self, feats: tuple[Tensor, ...], s: dict[str, Tensor], targets: list[dict[str, Any]]) -> Tensor:
        pos = s["gt_inds"] >= 0
        rois, inds, labels = s["rois"][pos], s["gt_inds"][pos], s["labels"][pos]
        mask_pred = self.mask_head.forward_labels(self.mask_roi_extractor(feats, rois), labels)  # (P, 28, 28)
        size = self.train_cfg.mask_size
        mask_targets = mask_pred.new_zeros((rois.shape[0], size, size))
        img_idx = rois[:, 0].long()
        for b in torch.unique(img_idx).tolist():
            if "masks" not in targets[b]:
                raise ValueError("Mask R-CNN training needs instance masks: set data.train.with_mask: true")
            sel = (img_idx == b).nonzero(as_tuple=True)[0]
            mask_targets[sel] = targets[b]["masks"].roi_targets(rois[sel, 1:], inds[sel], size).to(mask_pred.dtype)
        return self.mask_head.loss(mask_pred, mask_targets, labels)

    # ------------------------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, feats: tuple[Tensor, ...], proposals: list[Tensor], metas: list[dict[str, Any]],
                rescale: bool = True) -> list[dict[str, Any]]:
        """Per image ``boxes (D, 4)`` xyxy (original-image pixels when ``rescale``), ``scores``, ``labels`` and,
        with a mask head, ``masks`` (:class:`~densedet.structures.masks.InstanceMasks` of the original image).

        :meth:`box_candidates` -> class-wise NMS (``score_thr``, ``max_per_img``) -> :meth:`mask_probs` of the kept
        boxes -> masks pasted into their boxes; the exported graph runs the same two pieces with static shapes."""
        props, valid = pad_proposals(proposals)
        img_shapes = torch.tensor([m["img_shape"][:2] for m in metas], device=props.device, dtype=torch.float32)
        dets = multiclass_nms_batched(*self.box_candidates(feats, props, valid, img_shapes), self.num_classes,
                                      self.nms_cfg, best_only=True)
        if self.with_mask:
            self._paste_masks(feats, dets, metas, rescale)
        if rescale:
            for det, meta in zip(dets, metas):
                sw, sh = meta["scale_factor"][:2]
                det["boxes"] = det["boxes"] / det["boxes"].new_tensor([sw, sh, sw, sh])
        return dets

    def box_predictions(self, feats: tuple[Tensor, ...], props: Tensor, valid: Tensor,
                        img_shapes: Tensor) -> tuple[Tensor, Tensor]:
        """The box branch on proposals: ``(boxes (B, P, C, 4), probs (B, P, C + 1))``, the class-specific boxes
        decoded from each proposal and clipped, and the softmax probabilities (background last).

        Args:
            feats: FPN levels; props: ``(B, P, 4)`` proposals xyxy input pixels; valid: ``(B, P)``.
            img_shapes: ``(B, 2)`` per image ``(h, w)`` (or ``(1, 2)`` for the batch) to clip the boxes.

        Eagerly only the valid proposals run through the box head (padding slots get probability 0); while tracing /
        exporting every slot does (static shapes) and the caller masks the padding by ``valid``.
        """
        b, p = valid.shape
        static = static_shapes()
        if static:
            rois = rois_of_all_slots(props)
        else:
            rois, b_idx, p_idx = rois_from(props, valid)
        roi_feats = self.bbox_roi_extractor(feats, rois)  # RoIAlign in float32, the box head under bf16 autocast
        with self.autocast():
            cls_score, bbox_pred = self.bbox_head(roi_feats)
        if static:
            probs = cls_score.float().softmax(-1).reshape(b, p, -1)
            deltas = bbox_pred.float().reshape(b, p, -1)
        else:
            probs = props.new_zeros((b, p, self.num_classes + 1))
            probs[b_idx, p_idx] = cls_score.float().softmax(-1)
            deltas = props.new_zeros((b, p, 4 * self.num_classes))
            deltas[b_idx, p_idx] = bbox_pred.float()
        return self.bbox_head.decode(props, deltas, img_shapes), probs

    def box_candidates(self, feats: tuple[Tensor, ...], props: Tensor, valid: Tensor,
                       img_shapes: Tensor) -> Candidates:
        """The box branch up to NMS (arguments as :meth:`box_predictions`): every (proposal, class) pair as a
        candidate, ``(B, P * C)`` (:meth:`candidates_from`). Eager :meth:`predict` and the exported graph both call
        it."""
        boxes, probs = self.box_predictions(feats, props, valid, img_shapes)
        return self.candidates_from(boxes, probs, valid)

    def candidates_from(self, boxes: Tensor, probs: Tensor, valid: Tensor) -> Candidates:
        """``boxes (B, P, C, 4)``, ``probs (B, P, C + 1)``, ``valid (B, P)`` -> :class:`Candidates` ``(B, P * C)``:
        class labels, valid where the class probability is above ``score_thr`` (mmdet ``multiclass_nms``)."""
        b, p = valid.shape
        c = self.num_classes
        fg = probs[..., :c]
        cand_valid = (fg > self.nms_cfg.score_thr) & valid[..., None]
        labels = torch.arange(c, device=boxes.device).expand(b, p, c)
        return Candidates(boxes.reshape(b, p * c, 4), fg.reshape(b, p * c), labels.reshape(b, p * c),
                          cand_valid.reshape(b, p * c))

    def mask_probs(self, feats: tuple[Tensor, ...], rois: Tensor, labels: Tensor) -> Tensor:
        """Mask probabilities of detections: ``rois`` ``(R, 5)`` ``(batch_index, x1, y1, x2, y2)`` input pixels and
        their class ``labels`` ``(R,)`` -> ``(R, M, M)`` float32 sigmoid of each RoI's own class channel. Eagerly in
        chunks of 32 detections (the ``(D, 256, 28, 28)`` upsampled features of all detections at once would be the
        largest tensor of the whole inference); in one piece while tracing / exporting."""
        roi_feats = self.mask_roi_extractor(feats, rois)
        if static_shapes():  # one call: the number of detections is the graph's data-dependent size
            with self.autocast():
                return self.mask_head.forward_labels(roi_feats, labels).float().sigmoid()
        out = []
        for f, lab in zip(roi_feats.split(_MASK_CHUNK), labels.split(_MASK_CHUNK)):
            with self.autocast():
                logits = self.mask_head.forward_labels(f, lab)
            out.append(logits.float().sigmoid())
        if not out:
            m = 2 * self.mask_roi_extractor.output_size[0]
            return roi_feats.new_zeros((0, m, m))
        return torch.cat(out)

    def _paste_masks(self, feats: tuple[Tensor, ...], dets: list[dict[str, Any]], metas: list[dict[str, Any]],
                     rescale: bool) -> None:
        rois = torch.cat([torch.cat([d["boxes"].new_full((len(d["boxes"]), 1), float(i)), d["boxes"]], 1)
                          for i, d in enumerate(dets)], 0)
        labels = torch.cat([d["labels"] for d in dets])
        probs_all = self.mask_probs(feats, rois, labels) if len(rois) else None
        start = 0
        for det, meta in zip(dets, metas):
            n = len(det["boxes"])
            if rescale:
                h, w = meta.get("ori_shape", meta["img_shape"])[:2]
                sw, sh = meta["scale_factor"][:2]
                boxes = det["boxes"] / det["boxes"].new_tensor([sw, sh, sw, sh])
            else:
                h, w = meta["img_shape"][:2]
                boxes = det["boxes"]
            if n:
                assert probs_all is not None
                crops = paste_masks_in_boxes(probs_all[start:start + n], boxes, int(h), int(w),
                                             self.test_cfg.mask_thr_binary)
            else:
                crops = []
            det["masks"] = InstanceMasks(crops, int(h), int(w))
            start += n

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around the box and mask heads when the detector runs bf16 inference (``precision``)."""
        if self.precision == "bf16" and not self.training:
            device = next(self.parameters()).device
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
