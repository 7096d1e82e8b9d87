"""The modules that are exported: raw pixels in, fixed-shape padded detections out.

Both wrap a :class:`~densedet.models.detector.Detector` and call its own pieces, so the graph cannot drift from eager
``predict``: the model's ``data_preprocessor`` (normalisation, zero padding to ``pad_size_divisor``), its
``network``, and the shared candidate selection (:meth:`DenseHead.candidates`, :meth:`RPNHead.proposal_candidates`,
:meth:`StandardRoIHead.box_candidates` / :meth:`StandardRoIHead.mask_probs`), which take static-shape paths while
exporting. Only the data-dependent NMS is replaced, by :func:`padded_nms` (``densedet::nms_keep`` -> ONNX
``NonMaxSuppression``).

``images``: ``(B, 3, H, W)`` RGB pixels, uint8 or float in 0..255, at network resolution (the caller resizes). The
graph gives every image of a batch the same ``(H, W)`` (one meta for the batch, so the batch size stays dynamic).

:class:`DeployDetector` (dense heads): with NMS ``boxes (B, max_det, 4)`` xyxy input pixels (0 on padding),
``scores (B, max_det)`` (0), ``labels (B, max_det)`` int64 (-1), ``num_dets (B,)``; ``nms=False``: the pre-NMS
candidates ``boxes (B, K, 4)``, ``scores (B, K)`` (0 where invalid), ``labels (B, K)`` (-1 where invalid).

:class:`DeployTwoStage` (Faster / Mask R-CNN): proposals per level (``nms_pre``, clip, ``min_bbox_size``), NMS per
level, the ``test_cfg.rpn.max_per_img`` best -> box branch on every proposal slot -> class-aware NMS, the
``test_cfg.rcnn.max_per_img`` best -> with a mask head the 28x28 mask probabilities of the kept boxes (their own
class; only on the first ``max(num_dets)`` slots, the graph's one data-dependent size; zero padding elsewhere):
``boxes, scores, labels, num_dets`` as above and ``masks (B, max_det, 28, 28)``. Pasting the masks into the image is
left to the caller (:func:`densedet.models.roi_heads.paste_masks_in_boxes`, box-only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.deploy.ops import nms_keep
from densedet.errors import ConfigError
from densedet.models.roi_heads.standard_roi_head import rois_of_all_slots
from densedet.models.two_stage import TwoStageDetector

__all__ = ["DeployDetector", "DeployTwoStage", "batch_metas", "build_deploy_module", "padded_nms"]


def batch_metas(images: Tensor) -> list[dict[str, Any]]:
    """ONE meta for the whole batch (every image of a graph input has its size): the heads clip with a ``(1, 2)``
    image shape that broadcasts over the batch, so the batch size stays a free (dynamic) dimension."""
    return [{"img_shape": tuple(images.shape[-2:]), "scale_factor": (1.0, 1.0)}]


def padded_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float,
               max_det: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Class-aware NMS of ``(B, K)`` candidates (``scores`` 0 and ``labels`` -1 where invalid), then the ``max_det``
    best survivors per image, padded.

    Returns ``boxes (B, max_det, 4)`` (0 on padding), ``scores (B, max_det)`` (0), ``labels (B, max_det)`` (-1),
    ``num_dets (B,)`` and ``index (B, max_det)`` of each detection among the K candidates (clamped on padding)."""
    # class-aware NMS in one call: each class's boxes moved to their own region (torchvision batched_nms)
    offset = (labels.clamp_min(0).to(boxes.dtype) * (boxes.max() + 1.0)).unsqueeze(-1)
    keep = nms_keep(boxes + offset, scores, iou_threshold, max_det)
    kept = torch.where(keep, scores, torch.zeros_like(scores))
    # pad K up to max_det so top-k always has max_det entries (tiny inputs have few candidates)
    kept = F.pad(kept, (0, max_det))
    top, idx = kept.topk(max_det, dim=1)
    found = top > 0
    idx = idx.clamp_max(boxes.shape[1] - 1)  # padded slots point anywhere; masked below
    out_boxes = torch.where(found.unsqueeze(-1), boxes.gather(1, idx.unsqueeze(-1).expand(-1, -1, 4)),
                            torch.zeros((), dtype=boxes.dtype, device=boxes.device))
    out_labels = torch.where(found, labels.gather(1, idx), torch.full_like(idx, -1))
    out_scores = torch.where(found, top, torch.zeros_like(top))
    return out_boxes, out_scores, out_labels, found.sum(1), idx


def _mask_invalid(scores: Tensor, labels: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    return (torch.where(valid, scores, torch.zeros_like(scores)),
            torch.where(valid, labels, torch.full_like(labels, -1)))


class DeployDetector(nn.Module):
    """Wraps a :class:`~densedet.models.detector.SingleStageDetector` for export (see the module doc)."""

    def __init__(self, detector: nn.Module, nms: bool = True, max_det: int | None = None) -> None:
        super().__init__()
        self.detector = detector
        self.nms = nms
        cfg = detector.dense_head.test_cfg
        self.iou_threshold = float(cfg.nms_kwargs()["iou_threshold"])
        self.max_det = int(max_det if max_det is not None else cfg.max_per_img)
        self.min_bbox_size = float(cfg.min_bbox_size)
        self.with_mask = False

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        det = self.detector
        outs = det.network(det.data_preprocessor(images))
        boxes, scores, labels, valid = det.candidates(outs, batch_metas(images))
        if self.min_bbox_size > 0:
            valid = valid & ((boxes[..., 2:] - boxes[..., :2]) > self.min_bbox_size).all(-1)
        scores, labels = _mask_invalid(scores, labels, valid)
        if not self.nms:
            return boxes, scores, labels
        return padded_nms(boxes, scores, labels, self.iou_threshold, self.max_det)[:4]


def _positive(value: int, where: str) -> int:
    if value <= 0:
        raise ConfigError(f"{where}={value}: the exported graph keeps a fixed number of boxes; set a positive "
                          "max_per_img to export", path=where)
    return int(value)


class DeployTwoStage(nn.Module):
    """Wraps a :class:`~densedet.models.two_stage.TwoStageDetector` for export (see the module doc)."""

    def __init__(self, detector: nn.Module, max_det: int | None = None) -> None:
        super().__init__()
        self.detector = detector
        rpn_cfg = detector.rpn_head.test_cfg
        self.rpn_iou = float(rpn_cfg.nms_kwargs()["iou_threshold"])
        self.num_proposals = _positive(rpn_cfg.max_per_img, "model.test_cfg.rpn.max_per_img")
        roi = detector.roi_head
        self.iou_threshold = float(roi.nms_cfg.nms_kwargs()["iou_threshold"])
        self.max_det = _positive(int(max_det if max_det is not None else roi.test_cfg.max_per_img),
                                 "model.test_cfg.rcnn.max_per_img")
        self.with_mask = bool(roi.with_mask)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        det = self.detector
        metas = batch_metas(images)
        feats, rpn_outs = det.network(det.data_preprocessor(images))
        img_shape = torch.tensor([metas[0]["img_shape"]], dtype=torch.float32, device=images.device)  # (1, 2)
        # RPN proposals: NMS per level = class-aware NMS with the level as the class
        cand = det.rpn_head.proposal_candidates(rpn_outs, metas)
        scores = torch.where(cand.valid, cand.scores, torch.zeros_like(cand.scores))
        props, _, _, num_props, _ = padded_nms(cand.boxes, scores, cand.labels, self.rpn_iou, self.num_proposals)
        props_valid = torch.arange(props.shape[1], device=props.device)[None] < num_props[:, None]
        roi = det.roi_head
        boxes, scores, labels, valid = roi.box_candidates(feats, props, props_valid, img_shape)
        scores, labels = _mask_invalid(scores, labels, valid)
        out_boxes, out_scores, out_labels, num_dets, _ = padded_nms(boxes, scores, labels, self.iou_threshold,
                                                                    self.max_det)
        if not self.with_mask:
            return out_boxes, out_scores, out_labels, num_dets
        # Only the first n = max(num_dets) slots (at least 1: no zero-size convs) run the mask head, a
        # data-dependent size; the rest is zero padding.
        b = out_boxes.shape[0]
        n = num_dets.max().clamp_min(1).item()
        torch._check(n >= 1)
        torch._check(n <= self.max_det)
        labels_n = out_labels[:, :n]
        probs = roi.mask_probs(feats, rois_of_all_slots(out_boxes[:, :n]), labels_n.clamp_min(0).reshape(-1))
        m = probs.shape[-1]
        probs = probs.reshape(b, n, m, m)
        probs = torch.where((labels_n >= 0)[..., None, None], probs, torch.zeros_like(probs))
        masks = torch.cat([probs, probs.new_zeros((b, self.max_det - n, m, m))], 1)
        return out_boxes, out_scores, out_labels, num_dets, masks


def build_deploy_module(detector: nn.Module, nms: bool = True, max_det: int | None = None) -> nn.Module:
    """The exported module of ``detector`` (eval mode, typically fused): :class:`DeployTwoStage` for a
    :class:`~densedet.models.two_stage.TwoStageDetector`, else :class:`DeployDetector`. The one place that picks a
    graph by the kind of detector."""
    if isinstance(detector, TwoStageDetector):
        if not nms:
            raise ConfigError("--no-nms (pre-NMS candidates) is implemented for dense heads only; a two-stage graph "
                              "always ends with the R-CNN NMS (and the masks of the kept boxes)", path="export.nms")
        return DeployTwoStage(detector, max_det=max_det).eval()
    return DeployDetector(detector, nms=nms, max_det=max_det).eval()
