"""ResNeXt backbone with MMDetection 2.x parameter names and semantics.

Reference: Xie et al., "Aggregated Residual Transformations for Deep Neural Networks" (CVPR 2017). Layout follows
``mmdet/models/backbones/resnext.py`` (v2.x): ResNet's keys, with the bottleneck's inner width
``floor(planes * base_width / base_channels) * groups`` and a grouped 3x3 ``conv2``. For the default options the keys
equal torchvision's ``resnext*`` models (``layer{1..4}.{j}.conv{1,2,3}``, ``bn{1,2,3}``, ``downsample.{0,1}``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from densedet.models.backbones.resnet import _DEFAULT_NORM, OPEN_MMLAB_URLS, ResNet
from densedet.models.backbones.resnet import Bottleneck as _Bottleneck
from densedet.models.layers import build_conv_layer, build_norm_layer
from densedet.registry import BACKBONES, ConfigError

__all__ = ["BlockFactory", "Bottleneck", "ResNeXt", "signature_with_base"]

# ``open-mmlab://NAME`` checkpoints of ResNeXt (mmcv/model_zoo/open_mmlab.json); the configs name them.
for _name, _file in (
    ("resnext50_32x4d", "resnext50-32x4d-0ab1a123.pth"),
    ("resnext101_32x4d", "resnext101_32x4d-a5af3160.pth"),
    ("resnext101_64x4d", "resnext101_64x4d-ee2c6f71.pth"),
):
    OPEN_MMLAB_URLS.setdefault(_name, f"https://download.openmmlab.com/pretrain/third_party/{_file}")


def signature_with_base(own: Callable[..., Any], base: Callable[..., Any]) -> inspect.Signature:
    """``own``'s parameters followed by ``base``'s (keyword-only), without ``self`` / ``**kwargs``.

    Set as a subclass's ``__signature__`` so that the registry's key check (``inspect.signature``) validates the
    ``**kwargs`` a subclass forwards to ``ResNet`` and names the closest valid key for a typo.
    """
    skip = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    params = [p for n, p in inspect.signature(own).parameters.items() if n != "self" and p.kind not in skip]
    names = {p.name for p in params}
    params += [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for n, p in inspect.signature(base).parameters.items()
        if n != "self" and n not in names and p.kind not in skip
    ]
    return inspect.Signature(params)


class BlockFactory:
    """Stands in for a block class in ``ResNet.arch_settings`` and adds fixed keywords to every block it builds.

    ``ResNet`` builds its stages as ``ResLayer(block, ...)``, which only needs ``block.expansion`` and
    ``block(...)``; this lets ResNeXt / Res2Net pass their per-backbone options (groups, widths) without re-implementing
    ResNet's stage construction (mmdet 2.x uses a ``make_res_layer`` hook for the same purpose).
    """

    def __init__(self, block: type[nn.Module], **fixed: Any) -> None:
        self.block = block
        self.fixed = fixed
        self.expansion = block.expansion

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return self.block(*args, **self.fixed, **kwargs)


class Bottleneck(_Bottleneck):
    """ResNeXt bottleneck: 1x1 (width) -> grouped 3x3 (width, ``groups``) -> 1x1 (``planes * 4``).

    ``width = floor(planes * base_width / base_channels) * groups`` (``planes`` when ``groups == 1``, i.e. a plain
    ResNet bottleneck). Stride on ``conv2`` for ``style='pytorch'``, on ``conv1`` for ``'caffe'``. ``dcn`` replaces
    ``conv2`` by the registered deformable conv (keeping ``groups``), except on strided blocks when
    ``fallback_on_stride`` is set. Forward, norm properties and ``last_norm`` are ResNet's.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        style: str = "pytorch",
        with_cp: bool = False,
        conv_cfg: dict[str, Any] | None = None,
        norm_cfg: dict[str, Any] = _DEFAULT_NORM,
        dcn: dict[str, Any] | None = None,
        groups: int = 1,
        base_width: int = 4,
        base_channels: int = 64,
    ) -> None:
        # The layers differ in width from ResNet's, so this builds its own instead of letting the parent build and
        # then replace them (as mmdet does); everything the parent's forward reads is set below.
        nn.Module.__init__(self)
        width = planes if groups == 1 else math.floor(planes * base_width / base_channels) * groups
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1_stride, self.conv2_stride = conv1_stride, conv2_stride
        self.norm1_name, norm1 = build_norm_layer(norm_cfg, width, postfix=1)
        self.norm2_name, norm2 = build_norm_layer(norm_cfg, width, postfix=2)
        self.norm3_name, norm3 = build_norm_layer(norm_cfg, planes * self.expansion, postfix=3)

        self.conv1 = build_conv_layer(conv_cfg, inplanes, width, 1, stride=conv1_stride, bias=False)
        self.add_module(self.norm1_name, norm1)
        dcn = dict(dcn) if dcn is not None else None
        fallback_on_stride = dcn.pop("fallback_on_stride", False) if dcn is not None else False
        if dcn is None or (fallback_on_stride and conv2_stride != 1):
            conv2_cfg = conv_cfg
        else:
            if conv_cfg is not None:
                raise ConfigError("ResNeXt: conv_cfg must be None when dcn is set (mmdet asserts the same)")
            conv2_cfg = dcn
        self.conv2 = build_conv_layer(
            conv2_cfg, width, width, 3, stride=conv2_stride, padding=dilation, dilation=dilation, groups=groups,
            bias=False,
        )
        self.add_module(self.norm2_name, norm2)
        self.conv3 = build_conv_layer(conv_cfg, width, planes * self.expansion, 1, bias=False)
        self.add_module(self.norm3_name, norm3)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.with_cp = with_cp
        self.groups = groups
        self.width = width


@BACKBONES.register()
class ResNeXt(ResNet):
    """ResNeXt backbone (mmdet ``ResNeXt``): ResNet with grouped bottlenecks.

    Args:
        depth: 50, 101 or 152.
        groups: cardinality (32 for X-101-32x4d, 64 for X-101-64x4d).
        base_width: width of each group at ``base_channels`` planes (4 for ``...x4d``).
        **kwargs: every :class:`ResNet` option (``out_indices``, ``frozen_stages``, ``norm_eval``, ``style``,
            ``dcn`` + ``stage_with_dcn``, ``pretrained`` / ``init_cfg``, ``deep_stem``, ``avg_down``, ...).

    ``forward``: ``(B, 3, H, W)`` -> stage outputs with ``256, 512, 1024, 2048`` channels at strides 4..32.
    """

    arch_settings: ClassVar[dict[int, tuple[Any, tuple[int, ...]]]] = {
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }

    def __init__(self, depth: int, groups: int = 1, base_width: int = 4, **kwargs: Any) -> None:
        cls_settings = type(self).arch_settings
        if depth not in cls_settings:
            raise ConfigError(f"ResNeXt: invalid depth {depth}; expected one of {sorted(cls_settings)}")
        for key, value in (("groups", groups), ("base_width", base_width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ResNeXt: {key} must be a positive int, got {value!r}")
        block, stages = cls_settings[depth]
        factory = BlockFactory(
            block, groups=groups, base_width=base_width, base_channels=kwargs.get("base_channels", 64)
        )
        # Instance-level override read by ResNet.__init__ when it builds the stages; removed right after.
        self.arch_settings = {depth: (factory, stages)}
        super().__init__(depth, **kwargs)
        del self.arch_settings
        self.block = block
        self.groups = groups
        self.base_width = base_width


ResNeXt.__signature__ = signature_with_base(ResNeXt.__init__, ResNet.__init__)  # type: ignore[attr-defined]
