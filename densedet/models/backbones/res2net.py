"""Res2Net backbone with MMDetection 2.x parameter names and semantics.

Reference: Gao et al., "Res2Net: A New Multi-scale Backbone Architecture" (TPAMI 2021). Layout follows
``mmdet/models/backbones/res2net.py`` (v2.x), the variant of the released R2-101 detection checkpoints: the ResNet-D
deep stem (``stem.0..8``), average-pool shortcuts (``downsample.{1,2}``), and ``Bottle2neck`` blocks whose 3x3 stage
is ``scales - 1`` convs ``convs.{i}`` / ``bns.{i}`` over channel splits of width ``floor(planes * base_width / 64)``.

Two details of mmdet's block (kept here, as released checkpoints were trained with them): the first block of a stage
(``stage_type='stage'``) convolves each split independently and average-pools the last split only when it is
strided; the official Res2Net code and timm also pool it (3x3, stride 1) in the stride-1 first block of ``layer1``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from densedet.models.backbones.resnet import _DEFAULT_NORM, ResNet, conv2_config
from densedet.models.backbones.resnet import Bottleneck as _Bottleneck
from densedet.models.backbones.resnext import BlockFactory, signature_with_base
from densedet.models.layers import build_conv_layer, build_norm_layer
from densedet.registry import BACKBONES, ConfigError
from densedet.weights.sources import read_state_dict

__all__ = ["Bottle2neck", "Res2Net", "official_to_mmdet"]

# Official Res2Net (Res2Net-PretrainedModels ``res2net*_v1b/v1d``) and timm name the deep stem ``conv1.{0,1,3,4,6}`` +
# ``bn1``; mmdet names it ``stem.{0,1,3,4,6,7}``. Every other key is the same in the three layouts.
_OFFICIAL_STEM = {"conv1.0": "stem.0", "conv1.1": "stem.1", "conv1.3": "stem.3", "conv1.4": "stem.4",
                  "conv1.6": "stem.6", "bn1": "stem.7"}


def official_to_mmdet(state: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the stem keys of an official-Res2Net / timm state dict to mmdet's (other keys unchanged)."""
    out = {}
    for key, value in state.items():
        head, _, tail = key.rpartition(".")
        out[f"{_OFFICIAL_STEM[head]}.{tail}" if head in _OFFICIAL_STEM else key] = value
    return out


class Bottle2neck(_Bottleneck):
    """Res2Net bottleneck: 1x1 (``width * scales``) -> hierarchical 3x3 convs on splits -> 1x1 (``planes * 4``).

    Keys: ``conv1, bn1, convs.{0..scales-2}, bns.{0..scales-2}, conv3, bn3[, downsample]``. ``stage_type`` is
    ``'stage'`` for the first block of each stage (splits convolved independently, last split average-pooled when
    strided) and ``'normal'`` otherwise (split ``i`` gets the previous conv output added before its conv). ``dcn``
    makes every 3x3 conv deformable (strided blocks keep plain convs when ``fallback_on_stride`` is set, as ResNet;
    mmdet's Res2Net instead drops DCN from every block then, which no released config uses).
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
        scales: int = 4,
        base_width: int = 26,
        base_channels: int = 64,
        stage_type: str | None = None,
    ) -> None:
        # Builds its own layers (ResNet's conv2/bn2 do not exist here); the parent's forward/with_cp path is reused
        # through the overridden ``_residual``.
        nn.Module.__init__(self)
        if scales < 2:
            raise ConfigError(f"Res2Net: scales must be >= 2 (scales=1 is a plain ResNet), got {scales}")
        if stage_type is None:
            # Res2Layer marks its first block, which is the one with the projection shortcut (Res2Net checks that
            # every stage's first block has one).
            stage_type = "stage" if downsample is not None else "normal"
        if stage_type not in ("stage", "normal"):
            raise ConfigError(f"Res2Net: stage_type must be 'stage' or 'normal', got {stage_type!r}")
        width = math.floor(planes * base_width / base_channels)
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1_stride, self.conv2_stride = conv1_stride, conv2_stride

        self.norm1_name, norm1 = build_norm_layer(norm_cfg, width * scales, postfix=1)
        self.norm3_name, norm3 = build_norm_layer(norm_cfg, planes * self.expansion, postfix=3)
        self.conv1 = build_conv_layer(conv_cfg, inplanes, width * scales, 1, stride=conv1_stride, bias=False)
        self.add_module(self.norm1_name, norm1)

        if stage_type == "stage" and conv2_stride != 1:
            self.pool = nn.AvgPool2d(kernel_size=3, stride=conv2_stride, padding=1)
        conv2_cfg = conv2_config(conv_cfg, dcn, conv2_stride, "Res2Net")
        self.convs = nn.ModuleList(
            build_conv_layer(
                conv2_cfg, width, width, 3, stride=conv2_stride, padding=dilation, dilation=dilation, bias=False
            )
            for _ in range(scales - 1)
        )
        self.bns = nn.ModuleList(build_norm_layer(norm_cfg, width, postfix=i + 1)[1] for i in range(scales - 1))
        self.conv3 = build_conv_layer(conv_cfg, width * scales, planes * self.expansion, 1, bias=False)
        self.add_module(self.norm3_name, norm3)

        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.with_cp = with_cp
        self.scales = scales
        self.width = width
        self.stage_type = stage_type

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        spx = torch.split(out, self.width, dim=1)
        pieces = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            # 'normal' blocks feed each conv the previous conv's output plus the next split (the hierarchy).
            sp = spx[i] if i == 0 or self.stage_type == "stage" else sp + spx[i]
            sp = self.relu(bn(conv(sp)))  # no .contiguous(): under channels_last it would copy to NCHW
            pieces.append(sp)
        last = spx[-1]
        if self.stage_type == "stage" and self.conv2_stride != 1:
            last = self.pool(last)
        pieces.append(last)
        out = self.norm3(self.conv3(torch.cat(pieces, dim=1)))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity  # in place: the norm's backward does not need its output (saves a pass + memory)
        return out


@BACKBONES.register()
class Res2Net(ResNet):
    """Res2Net backbone (mmdet ``Res2Net``): deep stem, average-pool shortcuts, :class:`Bottle2neck` stages.

    Args:
        depth: 50, 101 or 152.
        scales: number of channel splits per block (4 for ``26w_4s``).
        base_width: split width at ``base_channels`` planes (26 for ``26w_4s``).
        **kwargs: :class:`ResNet` options (``out_indices``, ``frozen_stages``, ``norm_eval``, ``dcn`` +
            ``stage_with_dcn``, ``pretrained`` / ``init_cfg``, ``with_cp``, ...). ``style``, ``deep_stem`` and
            ``avg_down`` are fixed to ``'pytorch'``, True, True as mmdet fixes them; other values are an error
            rather than silently ignored.

    ``forward``: ``(B, 3, H, W)`` -> stage outputs with ``256, 512, 1024, 2048`` channels at strides 4..32.
    """

    arch_settings: ClassVar[dict[int, tuple[Any, tuple[int, ...]]]] = {
        50: (Bottle2neck, (3, 4, 6, 3)),
        101: (Bottle2neck, (3, 4, 23, 3)),
        152: (Bottle2neck, (3, 8, 36, 3)),
    }

    def __init__(self, depth: int, scales: int = 4, base_width: int = 26, **kwargs: Any) -> None:
        cls_settings = type(self).arch_settings
        if depth not in cls_settings:
            raise ConfigError(f"Res2Net: invalid depth {depth}; expected one of {sorted(cls_settings)}")
        for key, value, low in (("scales", scales, 2), ("base_width", base_width, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"Res2Net: {key} must be an int >= {low}, got {value!r}")
        for key, fixed in (("style", "pytorch"), ("deep_stem", True), ("avg_down", True)):
            if key in kwargs and kwargs.pop(key) != fixed:
                raise ConfigError(f"Res2Net: '{key}' is fixed to {fixed!r} (as in mmdet)")
        base_channels = kwargs.get("base_channels", 64)
        stem_channels = kwargs.get("stem_channels") or base_channels
        if stem_channels == base_channels * Bottle2neck.expansion:
            # layer1's first block would get no projection shortcut and so would not be marked as a 'stage' block.
            raise ConfigError("Res2Net: stem_channels must differ from 4 * base_channels")
        block, stages = cls_settings[depth]
        factory = BlockFactory(block, scales=scales, base_width=base_width, base_channels=base_channels)
        # Instance-level override read by ResNet.__init__ when it builds the stages; removed right after.
        self.arch_settings = {depth: (factory, stages)}
        super().__init__(depth, style="pytorch", deep_stem=True, avg_down=True, **kwargs)
        del self.arch_settings
        self.block = block
        self.scales = scales
        self.base_width = base_width

    def init_weights(self) -> None:
        """Default init, then ``pretrained``: an mmdet-layout file (``stem.*``, e.g. ``open-mmlab://res2net101_v1d_26w_4s``)
        loads as for ResNet; an official Res2Net / timm file (``conv1.0.weight`` ...) has its stem keys renamed first.
        Missing, unexpected (other than ``fc.*``) and mis-shaped keys are warned about."""
        if self.pretrained is None or self.pretrained[1] is not None:
            super().init_weights()
            return
        source = self.pretrained[0]
        state = read_state_dict(source)
        if "conv1.0.weight" not in state:
            super().init_weights()  # mmdet layout (or a detector checkpoint): ResNet's loader handles it
            return
        self._default_init()
        state = official_to_mmdet(state)
        own = self.state_dict()
        loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        unexpected = [k for k in state if k not in own and not k.startswith("fc.")]
        mismatched = [k for k in state if k in own and k not in loadable]
        missing = [k for k in own if k not in loadable and "num_batches_tracked" not in k]
        self.load_state_dict(loadable, strict=False)
        if missing or unexpected or mismatched:
            warnings.warn(
                f"Res2Net: loading '{source}' (official layout): missing keys {missing}; unexpected keys {unexpected}; "
                f"size mismatch (skipped) {mismatched}",
                UserWarning,
                stacklevel=2,
            )


Res2Net.__signature__ = signature_with_base(Res2Net.__init__, ResNet.__init__)  # type: ignore[attr-defined]
