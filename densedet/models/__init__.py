"""Model components. Importing this package registers backbones and necks in ``densedet.registry``."""

from densedet.models.backbones import ResNet, ResNetV1d
from densedet.models.layers import ConvModule, Scale, build_norm_layer
from densedet.models.necks import FPN

__all__ = ["FPN", "ConvModule", "ResNet", "ResNetV1d", "Scale", "build_norm_layer"]
