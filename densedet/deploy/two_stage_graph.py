"""The exported module of a two-stage detector (Faster / Mask R-CNN): raw pixels in, padded detections and 28x28
masks out.

``DeployTwoStage(detector, mean, std, ...)(images)`` runs what ``TwoStageDetector.forward(mode="predict")`` runs,
with static shapes after every data-dependent step:

* ``images`` ``(B, 3, H, W)`` RGB pixels -> normalise + zero padding (:class:`~densedet.deploy.graph.PixelsIn`);
* backbone, neck, RPN; proposals as :meth:`RPNHead.proposals`: per level the ``nms_pre`` best anchors, decoded and
  clipped, ``w, h > min_bbox_size``, NMS per level (``densedet::nms_keep`` with per-level coordinate offsets ->
  ONNX ``NonMaxSuppression``), the ``test_cfg.rpn.max_per_img`` best kept -> ``(B, P, 4)`` + validity;
* box branch on every proposal slot: multi-level RoIAlign (:func:`roi_align_levels`), ``Shared2FCBBoxHead``,
  softmax, class-specific decode clipped to ``(H, W)``, ``score_thr``, class-aware NMS, ``test_cfg.rcnn.max_per_img``
  best (:meth:`StandardRoIHead.bbox_candidates` + :func:`~densedet.deploy.graph.padded_nms`);
* mask branch on the kept boxes (input pixels): RoIAlign 14x14, ``FCNMaskHead``, the channel of each detection's
  own class, sigmoid - on the first ``max(num_dets)`` slots only (at least 1), the graph's one data-dependent
  size; the other slots are zero padding.

Outputs: ``boxes (B, max_det, 4)`` xyxy input pixels (0 on padding), ``scores (B, max_det)`` (0), ``labels (B,
max_det)`` int64 (-1), ``num_dets (B,)`` and, with a mask head, ``masks (B, max_det, 28, 28)`` float probabilities
(0 on padding). Pasting the masks into the image (bilinear, ``>= mask_thr_binary``) is left to the caller:
:func:`densedet.models.roi_heads.paste_masks_in_boxes`, which only touches each box's pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from densedet.deploy.graph import PixelsIn, padded_nms
from densedet.errors import ConfigError
from densedet.models.roi_heads.roi_extractor import SingleRoIExtractor, map_roi_levels

__all__ = ["DeployTwoStage", "roi_align_levels"]


def roi_align_levels(extractor: SingleRoIExtractor, feats: tuple[Tensor, ...] | list[Tensor], rois: Tensor) -> Tensor:
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


def _with_batch_index(boxes: Tensor) -> Tensor:
    """``(B, N, 4)`` -> ``(B * N, 5)`` RoIs ``(batch_index, x1, y1, x2, y2)``."""
    b, n = boxes.shape[:2]
    idx = torch.arange(b, device=boxes.device, dtype=boxes.dtype).view(b, 1, 1).expand(b, n, 1)
    return torch.cat([idx, boxes], -1).reshape(-1, 5)


def _positive(value: int, where: str) -> int:
    if value <= 0:
        raise ConfigError(f"{where}={value}: the exported graph keeps a fixed number of boxes; set a positive "
                          "max_per_img to export", path=where)
    return int(value)


class DeployTwoStage(PixelsIn):
    """Wraps a :class:`~densedet.models.two_stage.TwoStageDetector` for export (see the module doc)."""

    def __init__(self, detector: nn.Module, mean: tuple[float, float, float], std: tuple[float, float, float],
                 to_rgb: bool = True, size_divisor: int = 32, max_det: int | None = None) -> None:
        super().__init__(mean, std, to_rgb, size_divisor)
        self.detector = detector
        rpn_cfg = detector.rpn_head.test_cfg
        self.rpn_iou = float(rpn_cfg.nms_kwargs()["iou_threshold"])
        self.num_proposals = _positive(rpn_cfg.max_per_img, "model.test_cfg.rpn.max_per_img")
        roi = detector.roi_head
        self.iou_threshold = float(roi.nms_cfg.nms_kwargs()["iou_threshold"])
        self.max_det = _positive(int(max_det if max_det is not None else roi.test_cfg.max_per_img),
                                 "model.test_cfg.rcnn.max_per_img")

    @property
    def with_mask(self) -> bool:
        return bool(self.detector.roi_head.with_mask)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        det = self.detector
        feats = det.extract_feat(self.preprocess(images))
        img_shape = torch.tensor([self.batch_metas(images)[0]["img_shape"]], dtype=torch.float32,
                                 device=images.device)  # (1, 2): one size for the batch
        # RPN proposals: NMS per level = class-aware NMS with the level as the class
        cand = det.rpn_head.proposal_candidates(det.rpn_head(feats), img_shape, det.rpn_head.test_cfg)
        scores = torch.where(cand.valid, cand.scores, torch.zeros_like(cand.scores))
        props, _, _, num_props, _ = padded_nms(cand.boxes, scores, cand.labels, self.rpn_iou, self.num_proposals)
        b, p = props.shape[:2]
        props_valid = torch.arange(p, device=props.device)[None] < num_props[:, None]
        # box branch on every proposal slot (padding slots are masked out by props_valid)
        roi = det.roi_head
        cls_score, bbox_pred = roi.bbox_head(roi_align_levels(roi.bbox_roi_extractor, feats, _with_batch_index(props)))
        probs = cls_score.float().softmax(-1).reshape(b, p, -1)
        deltas = bbox_pred.float().reshape(b, p, -1)
        boxes, scores, labels, valid = roi.bbox_candidates(props, props_valid, probs, deltas, img_shape)
        scores = torch.where(valid, scores, torch.zeros_like(scores))
        labels = torch.where(valid, labels, torch.full_like(labels, -1))
        out_boxes, out_scores, out_labels, num_dets, _ = padded_nms(boxes, scores, labels, self.iou_threshold,
                                                                    self.max_det)
        if not self.with_mask:
            return out_boxes, out_scores, out_labels, num_dets
        # mask branch on the kept boxes: the logits of each detection's own class, as StandardRoIHead._predict_masks.
        # Only the first n = max(num_dets) slots (at least 1: no zero-size convs) run the mask head, a
        # data-dependent size; the rest is zero padding.
        n = num_dets.max().clamp_min(1).item()
        torch._check(n >= 1)
        torch._check(n <= self.max_det)
        boxes_n, labels_n = out_boxes[:, :n], out_labels[:, :n]
        mask_feats = roi_align_levels(roi.mask_roi_extractor, feats, _with_batch_index(boxes_n))
        logits = roi.mask_head.forward_labels(mask_feats, labels_n.clamp_min(0).reshape(-1))  # (B * n, 28, 28)
        m = logits.shape[-1]
        probs = logits.float().reshape(b, n, m, m).sigmoid()
        probs = torch.where((labels_n >= 0)[..., None, None], probs, torch.zeros_like(probs))
        masks = torch.cat([probs, probs.new_zeros((b, self.max_det - n, m, m))], 1)
        return out_boxes, out_scores, out_labels, num_dets, masks
