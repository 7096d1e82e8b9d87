"""Backbones; each registers itself in ``densedet.registry.BACKBONES``."""

from densedet.models.backbones.biformer import BiFormer
from densedet.models.backbones.res2net import Res2Net
from densedet.models.backbones.resnet import ResNet, ResNetV1d
from densedet.models.backbones.resnext import ResNeXt
from densedet.models.backbones.swin import SwinTransformer

__all__ = ["BiFormer", "Res2Net", "ResNeXt", "ResNet", "ResNetV1d", "SwinTransformer"]
