"""Backbones; each registers itself in ``densedet.registry.BACKBONES``."""

from densedet.models.backbones.resnet import ResNet, ResNetV1d

__all__ = ["ResNet", "ResNetV1d"]
