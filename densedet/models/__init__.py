"""Model components. Importing this package registers backbones and necks in ``densedet.registry``."""

from densedet.models.backbones import Res2Net, ResNet, ResNetV1d, ResNeXt
from densedet.models.dcn import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2d, ModulatedDeformConv2dPack
from densedet.models.layers import ConvModule, Scale, build_norm_layer
from densedet.models.necks import FPN, PAFPN

__all__ = [
    "FPN",
    "PAFPN",
    "ConvModule",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "Res2Net",
    "ResNeXt",
    "ResNet",
    "ResNetV1d",
    "Scale",
    "build_norm_layer",
]
