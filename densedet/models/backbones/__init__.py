"""Backbones; each registers itself in ``densedet.registry.BACKBONES``."""

from densedet.models.backbones.biformer import BiFormer
from densedet.models.backbones.resnet import ResNet, ResNetV1d

__all__ = ["BiFormer", "ResNet", "ResNetV1d"]
