"""ResNeXt backbone with MMDetection 2.x parameter names and semantics.

Reference: Xie et al., "Aggregated Residual Transformations for Deep Neural Networks" (CVPR 2017). Layout follows
``mmdet/models/backbones/resnext.py`` (v2.x): ResNet's keys, with the bottleneck's inner width
``floor(planes * base_width / base_channels) * groups`` and a grouped 3x3 ``conv2``. For the default options the keys
equal torchvision's ``resnext*`` models (``layer{1..4}.{j}.conv{1,2,3}``, ``bn{1,2,3}``, ``downsample.{0,1}``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from densedet.models.backbones.resnet import Bottleneck as _Bottleneck
from densedet.models.backbones.resnet import ResNet
from densedet.registry import BACKBONES, ConfigError

__all__ = ["BlockFactory", "Bottleneck", "ResNeXt", "signature_with_base"]

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


# mmdet's ``resnext.Bottleneck``: ResNet's bottleneck with ``groups`` / ``base_width`` (the inner width formula
# lives there, so ResNet and ResNeXt share one block).
Bottleneck = _Bottleneck


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
