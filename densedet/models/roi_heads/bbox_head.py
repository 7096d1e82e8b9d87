"""The R-CNN box head: MMDetection 2.x ``Shared2FCBBoxHead`` (``ConvFCBBoxHead`` with two shared fully connected
layers, mmdet/models/roi_heads/bbox_heads/convfc_bbox_head.py and bbox_head.py)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.losses import build_loss
from densedet.registry import ConfigError, check_kwargs
from densedet.structures import DeltaXYWHBBoxCoder

__all__ = ["Shared2FCBBoxHead"]


class Shared2FCBBoxHead(nn.Module):
    """Flattened RoI features -> ``shared_fcs.0`` -> ReLU -> ``shared_fcs.1`` -> ReLU -> ``fc_cls`` / ``fc_reg``.

    ``fc_cls`` has ``num_classes + 1`` outputs with background LAST (softmax); ``fc_reg`` has ``4 * num_classes``
    class-specific deltas (``DeltaXYWHBBoxCoder``, stds 0.1/0.1/0.2/0.2 by default). Loss: softmax CE over all
    sampled RoIs (averaged over them) + L1 on the positives' deltas of their gt class, averaged over all sampled
    RoIs (mmdet ``BBoxHead.loss``: ``avg_factor=bbox_targets.size(0)``).
    """

    def __init__(self, num_classes: int = 80, in_channels: int = 256, fc_out_channels: int = 1024,
                 roi_feat_size: int = 7, bbox_coder: dict | None = None, reg_class_agnostic: bool = False,
                 reg_decoded_bbox: bool = False, loss_cls: dict | None = None, loss_bbox: dict | None = None,
                 init_cfg: dict | None = None) -> None:
        super().__init__()
        if reg_class_agnostic or reg_decoded_bbox:
            raise ConfigError("roi_head.bbox_head: only class-specific regression of encoded deltas "
                              "(reg_class_agnostic: false, reg_decoded_bbox: false) is available")
        self.num_classes = num_classes
        self.roi_feat_size = roi_feat_size
        coder = dict(bbox_coder or {"target_means": [0.0] * 4, "target_stds": [0.1, 0.1, 0.2, 0.2]})
        if coder.pop("type", "DeltaXYWHBBoxCoder") != "DeltaXYWHBBoxCoder":
            raise ConfigError("model.roi_head.bbox_head.bbox_coder.type: only DeltaXYWHBBoxCoder is available")
        check_kwargs(DeltaXYWHBBoxCoder, coder, "model.roi_head.bbox_head.bbox_coder")
        self.bbox_coder = DeltaXYWHBBoxCoder(**coder)
        loss_cls = loss_cls or {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0}
        if loss_cls.get("use_sigmoid", False):
            raise ConfigError("model.roi_head.bbox_head.loss_cls: the R-CNN classifier is a softmax (use_sigmoid: "
                              "false)")
        self.loss_cls = build_loss(loss_cls, "model.roi_head.bbox_head.loss_cls")
        self.loss_bbox = build_loss(loss_bbox or {"type": "L1Loss", "loss_weight": 1.0},
                                    "model.roi_head.bbox_head.loss_bbox")
        self.shared_fcs = nn.ModuleList([
            nn.Linear(in_channels * roi_feat_size * roi_feat_size, fc_out_channels),
            nn.Linear(fc_out_channels, fc_out_channels)])
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_out_channels, 4 * num_classes)

    def init_weights(self) -> None:
        """mmdet init_cfg: Normal(0, 0.01) ``fc_cls``, Normal(0, 0.001) ``fc_reg``, Xavier-uniform shared fcs; zero
        biases."""
        nn.init.normal_(self.fc_cls.weight, 0, 0.01)
        nn.init.normal_(self.fc_reg.weight, 0, 0.001)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
        for m in (self.fc_cls, self.fc_reg, *self.shared_fcs):
            nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int | None = None) -> None:
        """Re-initialise ``fc_cls`` (C + 1) and ``fc_reg`` (4C) as :meth:`init_weights`, in place; for another
        ``num_classes`` they are re-created first."""
        n = self.num_classes if num_classes is None else int(num_classes)
        if n < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if n != self.num_classes:
            dev, dt = self.fc_cls.weight.device, self.fc_cls.weight.dtype
            self.fc_cls = nn.Linear(self.fc_cls.in_features, n + 1).to(dev, dt)
            self.fc_reg = nn.Linear(self.fc_reg.in_features, 4 * n).to(dev, dt)
            self.num_classes = n
        with torch.no_grad():
            nn.init.normal_(self.fc_cls.weight, 0, 0.01)
            nn.init.normal_(self.fc_reg.weight, 0, 0.001)
            nn.init.zeros_(self.fc_cls.bias)
            nn.init.zeros_(self.fc_reg.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(R, C, 7, 7)`` -> ``cls_score (R, num_classes + 1)``, ``bbox_pred (R, 4 * num_classes)``."""
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)

    def loss(self, cls_score: Tensor, bbox_pred: Tensor, labels: Tensor, bbox_targets: Tensor) -> dict[str, Tensor]:
        """Args: ``labels`` ``(R,)`` (``num_classes`` = background) of the sampled RoIs; ``bbox_targets`` ``(R, 4)``
        encoded deltas (read at the positives only)."""
        num = labels.numel()
        avg = float(max(num, 1))
        loss_cls = self.loss_cls(cls_score, labels, torch.ones_like(labels, dtype=cls_score.dtype), avg_factor=avg)
        pos = (labels >= 0) & (labels < self.num_classes)
        if bool(pos.any()):
            pred = bbox_pred.view(num, -1, 4)[pos, labels[pos]]
            loss_bbox = self.loss_bbox(pred, bbox_targets[pos], torch.ones_like(pred), avg_factor=avg)
        else:
            loss_bbox = bbox_pred[pos].sum()
        with torch.no_grad():
            acc = (cls_score.argmax(1) == labels).float().mean() * 100 if num else cls_score.new_zeros(())
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "acc": acc}

    def decode(self, rois: Tensor, bbox_pred: Tensor, max_shape: Any) -> Tensor:
        """Class-specific boxes: ``rois (..., 4)``, ``bbox_pred (..., 4C)`` -> ``(..., C, 4)`` xyxy clipped to
        ``max_shape`` (``(B, 2)`` per image when ``rois`` is ``(B, P, 4)``)."""
        deltas = bbox_pred.reshape(*bbox_pred.shape[:-1], self.num_classes, 4)
        priors = rois.unsqueeze(-2).expand_as(deltas)
        if isinstance(max_shape, Tensor) and max_shape.dim() == 2:  # (B, 2) -> broadcast over (B, P, C)
            boxes = self.bbox_coder.decode(priors, deltas)
            hw = max_shape[:, None, None, :].to(boxes.dtype)
            x = boxes[..., 0::2].clamp(min=0).minimum(hw[..., 1:2])
            y = boxes[..., 1::2].clamp(min=0).minimum(hw[..., 0:1])
            return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)
        return self.bbox_coder.decode(priors, deltas, max_shape=max_shape)
