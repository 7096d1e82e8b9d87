"""The module that is exported: raw pixels in, fixed-shape padded detections out.

``DeployDetector(detector, mean, std, ...)(images)``:

* ``images``: ``(B, 3, H, W)`` RGB pixels, uint8 or float in 0..255, at network resolution (the caller resizes);
* normalisation ``(x - mean) / std`` (channel flip first for Caffe-style ``to_rgb=False`` configs) and zero padding
  of the normalised image to a multiple of ``size_divisor`` (as :func:`densedet.data.collate.collate`) inside;
* backbone, neck, head, the head's own decoding and candidate selection (``predict_candidates``: per-level
  ``nms_pre`` top-k above ``score_thr``, score factors, boxes clipped to ``(H, W)``);
* with NMS (default): class-aware NMS (``densedet::nms_keep`` -> ONNX ``NonMaxSuppression``), the ``max_det`` best
  survivors, padded: ``boxes (B, max_det, 4)`` xyxy input pixels (0 on padding), ``scores (B, max_det)`` (0 on
  padding), ``labels (B, max_det)`` int64 (-1 on padding), ``num_dets (B,)`` int64;
* ``nms=False``: the pre-NMS candidates ``boxes (B, K, 4)``, ``scores (B, K)`` (0 where invalid), ``labels (B, K)``
  (-1 where invalid), K fixed by the input size and ``test_cfg.nms_pre``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.deploy.ops import nms_keep

__all__ = ["DeployDetector", "PixelsIn", "padded_nms"]


class PixelsIn(nn.Module):
    """Base of the exported modules: raw RGB pixels -> the normalised, zero-padded network input (as the data
    pipeline's ``Normalize`` and :func:`densedet.data.collate.collate` make it)."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float], to_rgb: bool = True,
                 size_divisor: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.flip_channels = not to_rgb
        self.size_divisor = size_divisor

    def preprocess(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` pixels -> ``(B, 3, Hp, Wp)`` normalised, zero-padded bottom/right to ``size_divisor``."""
        h, w = images.shape[-2:]
        x = images.float()
        if self.flip_channels:
            x = x.flip(1)
        x = (x - self.mean) * self.inv_std
        if self.size_divisor > 1:  # zero padding after normalisation, bottom/right (as collate)
            d = self.size_divisor
            padded = x.new_zeros(x.shape[0], 3, (h + d - 1) // d * d, (w + d - 1) // d * d)
            padded[:, :, :h, :w] = x
            x = padded
        return x

    @staticmethod
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


class DeployDetector(PixelsIn):
    """Wraps a :class:`~densedet.models.detector.SingleStageDetector` for export (see the module doc)."""

    def __init__(self, detector: nn.Module, mean: tuple[float, float, float], std: tuple[float, float, float],
                 to_rgb: bool = True, size_divisor: int = 32, nms: bool = True, max_det: int | None = None) -> None:
        super().__init__(mean, std, to_rgb, size_divisor)
        self.detector = detector
        self.nms = nms
        cfg = detector.bbox_head.test_cfg
        self.iou_threshold = float(cfg.nms_kwargs()["iou_threshold"])
        self.max_det = int(max_det if max_det is not None else cfg.max_per_img)
        self.min_bbox_size = float(cfg.min_bbox_size)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        outs = self.detector._head_outputs(self.preprocess(images))
        boxes, scores, labels, valid = self.detector.bbox_head.predict_candidates(outs, self.batch_metas(images))
        if self.min_bbox_size > 0:
            valid = valid & ((boxes[..., 2:] - boxes[..., :2]) > self.min_bbox_size).all(-1)
        scores = torch.where(valid, scores, torch.zeros_like(scores))
        labels = torch.where(valid, labels, torch.full_like(labels, -1))
        if not self.nms:
            return boxes, scores, labels
        return padded_nms(boxes, scores, labels, self.iou_threshold, self.max_det)[:4]
