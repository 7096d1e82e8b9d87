"""The standard RoI head of Faster/Mask R-CNN: proposals -> sampled RoIs -> box head (+ mask head on positives).

MMDetection 2.x ``StandardRoIHead`` (mmdet/models/roi_heads/standard_roi_head.py) with its ``train_cfg.rcnn`` /
``test_cfg.rcnn``. Assignment and sampling run on the whole batch padded to the largest proposal count
(:func:`~densedet.assigners.max_iou_assign`, :func:`~densedet.models.roi_heads.sampler.random_sample`); the gt boxes
are prepended to the proposals after assignment and assigned to themselves (mmdet ``add_gt_as_proposals``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from densedet.assigners import max_iou_assign
from densedet.models.heads.postprocess import Candidates, multiclass_nms_batched, parse_test_cfg
from densedet.models.roi_heads.bbox_head import Shared2FCBBoxHead
from densedet.models.roi_heads.mask_head import FCNMaskHead, paste_masks_in_boxes
from densedet.models.roi_heads.roi_extractor import SingleRoIExtractor
from densedet.models.roi_heads.sampler import random_sample, sampling_generator
from densedet.registry import ConfigError, check_kwargs
from densedet.structures import pad_targets

__all__ = ["RCNNTestConfig", "RCNNTrainConfig", "StandardRoIHead", "pad_proposals"]

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
        self.nms_cfg = parse_test_cfg({"score_thr": self.test_cfg.score_thr, "nms": self.test_cfg.nms,
                                       "max_per_img": self.test_cfg.max_per_img})

    @property
    def num_classes(self) -> int:
        return self.bbox_head.num_classes

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
        with a mask head, ``masks`` (:class:`~densedet.data.masks.InstanceMasks` of the original image)."""
        props, valid = pad_proposals(proposals)
        rois, b_idx, p_idx = rois_from(props, valid)
        cls_score, bbox_pred = self.bbox_head(self.bbox_roi_extractor(feats, rois))
        b, p = valid.shape
        c = self.num_classes
        scores = props.new_zeros((b, p, c + 1))
        scores[b_idx, p_idx] = cls_score.float().softmax(-1)
        deltas = props.new_zeros((b, p, 4 * c))
        deltas[b_idx, p_idx] = bbox_pred.float()
        img_shapes = torch.tensor([m["img_shape"][:2] for m in metas], device=props.device, dtype=torch.float32)
        dets = multiclass_nms_batched(*self.bbox_candidates(props, valid, scores, deltas, img_shapes), c,
                                      self.nms_cfg, best_only=True)
        if self.with_mask:
            self._predict_masks(feats, dets, metas, rescale)
        if rescale:
            for det, meta in zip(dets, metas):
                sw, sh = meta["scale_factor"][:2]
                det["boxes"] = det["boxes"] / det["boxes"].new_tensor([sw, sh, sw, sh])
        return dets

    def bbox_candidates(self, props: Tensor, valid: Tensor, probs: Tensor, deltas: Tensor,
                        img_shapes: Tensor) -> Candidates:
        """The pre-NMS detections of :meth:`predict`: every (proposal, class) pair, ``(B, P * C)``.

        Args:
            props: ``(B, P, 4)`` proposals xyxy input pixels, ``valid`` ``(B, P)``.
            probs: ``(B, P, C + 1)`` softmax (background last); ``deltas`` ``(B, P, 4C)`` class-specific.
            img_shapes: ``(B, 2)`` per image ``(h, w)`` (or ``(1, 2)`` for the batch) to clip the boxes.
        Returns:
            :class:`Candidates`: class-specific boxes, the class probabilities, class labels, valid where the
            probability is above ``score_thr`` (shared by :mod:`densedet.deploy`'s exported graph).
        """
        b, p = valid.shape
        c = self.num_classes
        boxes = self.bbox_head.decode(props, deltas, img_shapes)  # (B, P, C, 4)
        fg = probs[..., :c]
        cand_valid = (fg > self.test_cfg.score_thr) & valid[..., None]
        labels = torch.arange(c, device=props.device).expand(b, p, c)
        return Candidates(boxes.reshape(b, p * c, 4), fg.reshape(b, p * c), labels.reshape(b, p * c),
                          cand_valid.reshape(b, p * c))

    def _predict_masks(self, feats: tuple[Tensor, ...], dets: list[dict[str, Any]], metas: list[dict[str, Any]],
                       rescale: bool) -> None:
        from densedet.data.masks import InstanceMasks

        rois = torch.cat([torch.cat([d["boxes"].new_full((len(d["boxes"]), 1), float(i)), d["boxes"]], 1)
                          for i, d in enumerate(dets)], 0)
        labels = torch.cat([d["labels"] for d in dets])
        probs_all = None
        if len(rois):
            # only each detection's class channel, and in chunks: the (D, 256, 28, 28) upsampled features of all
            # detections at once would be the largest tensor of the whole inference (80 MB for 100 detections)
            roi_feats = self.mask_roi_extractor(feats, rois)
            exporting = torch.jit.is_tracing() or torch.compiler.is_compiling()  # no data-dependent chunk count
            chunk = len(rois) if exporting else _MASK_CHUNK
            probs_all = torch.cat([self.mask_head.forward_labels(f, lab).sigmoid()
                                   for f, lab in zip(roi_feats.split(chunk), labels.split(chunk))])
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
                probs = probs_all[start:start + n]
                crops = paste_masks_in_boxes(probs, boxes, int(h), int(w), self.test_cfg.mask_thr_binary)
            else:
                crops = []
            det["masks"] = InstanceMasks(crops, int(h), int(w))
            start += n
