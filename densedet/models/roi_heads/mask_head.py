"""The Mask R-CNN mask head: MMDetection 2.x ``FCNMaskHead`` (mmdet/models/roi_heads/mask_heads/fcn_mask_head.py),
and the paste of its 28x28 outputs into their boxes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.models.layers import ConvModule
from densedet.registry import ConfigError
from densedet.structures.masks import BitmapCrop

__all__ = ["FCNMaskHead", "paste_masks_in_boxes"]


class FCNMaskHead(nn.Module):
    """``num_convs`` x (3x3 conv + ReLU) -> 2x2 stride-2 ``upsample`` deconv + ReLU -> 1x1 ``conv_logits``.

    Parameter names: ``convs.i.conv``, ``upsample``, ``conv_logits`` (mmdet). Loss: sigmoid BCE of each positive
    RoI's gt-class channel against its 28x28 target, mean over all pixels of all positives (mmdet
    ``mask_cross_entropy``), times ``loss_mask.loss_weight``.
    """

    def __init__(self, num_convs: int = 4, roi_feat_size: int = 14, in_channels: int = 256,
                 conv_kernel_size: int = 3, conv_out_channels: int = 256, num_classes: int = 80,
                 class_agnostic: bool = False, upsample_cfg: dict | None = None, conv_cfg: dict | None = None,
                 norm_cfg: dict | None = None, loss_mask: dict | None = None, init_cfg: dict | None = None) -> None:
        super().__init__()
        up = dict(upsample_cfg or {"type": "deconv", "scale_factor": 2})
        if up.get("type", "deconv") != "deconv" or up.get("scale_factor", 2) != 2:
            raise ConfigError("model.roi_head.mask_head.upsample_cfg: only {type: deconv, scale_factor: 2}")
        if class_agnostic:
            raise ConfigError("model.roi_head.mask_head.class_agnostic: only class-specific masks are available")
        loss = dict(loss_mask or {"type": "CrossEntropyLoss", "use_mask": True, "loss_weight": 1.0})
        if loss.get("type") != "CrossEntropyLoss" or not loss.get("use_mask", False):
            raise ConfigError("model.roi_head.mask_head.loss_mask: only {type: CrossEntropyLoss, use_mask: true}")
        unknown = set(loss) - {"type", "use_mask", "loss_weight"}
        if unknown:
            raise ConfigError(f"model.roi_head.mask_head.loss_mask: unknown keys {sorted(unknown)}")
        self.loss_weight = float(loss.get("loss_weight", 1.0))
        self.num_classes = num_classes
        self.roi_feat_size = roi_feat_size
        pad = (conv_kernel_size - 1) // 2
        self.convs = nn.ModuleList([
            ConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, conv_kernel_size,
                       padding=pad, conv_cfg=conv_cfg, norm_cfg=norm_cfg) for i in range(num_convs)])
        last = conv_out_channels if num_convs > 0 else in_channels
        self.upsample = nn.ConvTranspose2d(last, conv_out_channels, 2, stride=2)
        self.relu = nn.ReLU(inplace=True)
        self.conv_logits = nn.Conv2d(conv_out_channels, num_classes, 1)

    def init_weights(self) -> None:
        """mmdet: Kaiming-normal (fan_out, relu) ``upsample`` and ``conv_logits``, zero bias; the convs keep
        ConvModule's Kaiming init."""
        for m in (self.upsample, self.conv_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def reset_classifier(self, num_classes: int | None = None) -> None:
        """Re-initialise ``conv_logits`` as :meth:`init_weights`, in place; for another ``num_classes`` it is
        re-created first."""
        n = self.num_classes if num_classes is None else int(num_classes)
        if n < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        if n != self.num_classes:
            old = self.conv_logits
            self.conv_logits = nn.Conv2d(old.in_channels, n, 1).to(old.weight.device, old.weight.dtype)
            self.num_classes = n
        with torch.no_grad():
            nn.init.kaiming_normal_(self.conv_logits.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(self.conv_logits.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(R, C, 14, 14)`` -> ``(R, num_classes, 28, 28)`` logits."""
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(self.relu(self.upsample(x)))

    def forward_labels(self, x: Tensor, labels: Tensor) -> Tensor:
        """``(R, C, 14, 14)`` features, ``(R,)`` class per RoI -> ``(R, 28, 28)`` logits of that class only:
        ``forward(x)[arange(R), labels]`` (same values and gradients to float rounding) without computing the other
        ``num_classes - 1`` channels, which mmdet's loss and inference never read (for 80 classes the 1x1
        ``conv_logits`` is then 80x cheaper and its ``(R, 80, 28, 28)`` output is never held)."""
        for conv in self.convs:
            x = conv(x)
        x = self.relu(self.upsample(x))
        r, c, h, w = x.shape
        weight = self.conv_logits.weight.reshape(self.num_classes, c)[labels]  # (R, C)
        logits = torch.bmm(weight[:, None, :], x.reshape(r, c, h * w))  # (R, 1, h * w)
        return logits.view(r, h, w) + self.conv_logits.bias[labels][:, None, None]

    def loss(self, mask_pred: Tensor, mask_targets: Tensor, labels: Tensor) -> Tensor:
        """``mask_pred (P, C, 28, 28)`` (or ``(P, 28, 28)``: already the gt class channel, from
        :meth:`forward_labels`), ``mask_targets (P, 28, 28)`` in {0, 1}, ``labels (P,)`` gt classes."""
        if mask_pred.shape[0] == 0:
            return mask_pred.sum() * 0
        picked = mask_pred
        if mask_pred.dim() == 4:
            picked = mask_pred[torch.arange(mask_pred.shape[0], device=mask_pred.device), labels]
        return F.binary_cross_entropy_with_logits(picked.float(), mask_targets.float()) * self.loss_weight


def paste_masks_in_boxes(probs: Tensor, boxes: Tensor, img_h: int, img_w: int,
                         threshold: float = 0.5) -> list[BitmapCrop]:
    """Paste ``(D, M, M)`` mask probabilities into their ``(D, 4)`` xyxy boxes of an ``img_h x img_w`` image.

    Same values as MMDetection 2.x ``_do_paste_mask`` (bilinear ``grid_sample`` with ``align_corners=False``, pixel
    centres ``i + 0.5`` mapped to ``[-1, 1]`` across the box, then ``>= threshold``), but computed only on the
    pixels ``[floor(x1), ceil(x2)) x [floor(y1), ceil(y2))`` clipped to the image: outside its box a pasted value is
    at most half the border probability, below any threshold >= 0.5, so nothing outside is lost. Memory is the sum
    of the box areas, never ``D x H x W``.

    Returns:
        one :class:`~densedet.structures.masks.BitmapCrop` (uint8 bits, placed at its box) per detection.
    """
    if threshold < 0.5:
        raise ValueError(f"paste_masks_in_boxes: threshold must be >= 0.5 for the box-only paste, got {threshold}")
    out: list[BitmapCrop] = []
    probs = probs.float()
    boxes = boxes.float().cpu()
    for i in range(probs.shape[0]):
        x1, y1, x2, y2 = boxes[i].tolist()
        x0i, y0i = min(max(math.floor(x1), 0), img_w), min(max(math.floor(y1), 0), img_h)
        x1i, y1i = min(max(math.ceil(x2), 0), img_w), min(max(math.ceil(y2), 0), img_h)
        if x1i <= x0i or y1i <= y0i or x2 <= x1 or y2 <= y1:
            out.append(BitmapCrop(x0i, y0i, torch.zeros((0, 0), dtype=torch.uint8).numpy()))
            continue
        gx = (torch.arange(x0i, x1i, dtype=torch.float32) + 0.5 - x1) / (x2 - x1) * 2 - 1
        gy = (torch.arange(y0i, y1i, dtype=torch.float32) + 0.5 - y1) / (y2 - y1) * 2 - 1
        grid = torch.stack([gx[None, :].expand(len(gy), -1), gy[:, None].expand(-1, len(gx))], -1)
        pasted = F.grid_sample(probs[i][None, None], grid[None].to(probs.device), align_corners=False)[0, 0]
        out.append(BitmapCrop(x0i, y0i, (pasted >= threshold).to(torch.uint8).cpu().numpy()))
    return out
