"""Losses: plain functions first, thin ``nn.Module`` wrappers registered in ``LOSSES`` under MMDetection names."""

from typing import Any

from torch import nn

from densedet.losses.box_losses import (
    GIoULoss,
    IoULoss,
    L1Loss,
    SmoothL1Loss,
    giou_loss,
    iou_loss,
    l1_loss,
    smooth_l1_loss,
)
from densedet.losses.cross_entropy import CrossEntropyLoss, binary_cross_entropy, cross_entropy
from densedet.losses.focal import FocalLoss, sigmoid_focal_loss
from densedet.losses.ghm import GHMC, GHMR, asl1_loss, ghm_weights
from densedet.losses.pfocal import ProgressiveFocalLoss, positive_ce_condition, progressive_gamma_alpha
from densedet.losses.utils import reduce_loss, weight_reduce_loss
from densedet.losses.varifocal import VarifocalLoss, varifocal_loss
from densedet.registry import LOSSES


def build_loss(cfg: dict[str, Any], where: str = "config") -> nn.Module:
    """Build a loss module from ``{"type": "FocalLoss", ...}``; ``where`` names the config location in errors."""
    return LOSSES.build(cfg, where)


__all__ = [
    "CrossEntropyLoss",
    "FocalLoss",
    "GHMC",
    "GHMR",
    "GIoULoss",
    "IoULoss",
    "L1Loss",
    "ProgressiveFocalLoss",
    "SmoothL1Loss",
    "VarifocalLoss",
    "asl1_loss",
    "binary_cross_entropy",
    "build_loss",
    "cross_entropy",
    "ghm_weights",
    "giou_loss",
    "iou_loss",
    "l1_loss",
    "positive_ce_condition",
    "progressive_gamma_alpha",
    "reduce_loss",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "varifocal_loss",
    "weight_reduce_loss",
]
