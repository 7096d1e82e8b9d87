"""ResNet / ResNetV1d backbones with MMDetection 2.x parameter names and semantics.

Reference: He et al., "Deep Residual Learning for Image Recognition" (2016); "Bag of Tricks for Image Classification"
(He et al. 2019) for the V1d deep stem and average-pool downsample. Layout and options follow
``mmdet/models/backbones/resnet.py`` (v2.x): ``conv1``/``bn1`` stem, ``layer{1..4}.{j}.{conv,bn}{1..3}`` blocks,
``downsample.{0,1}`` (``{0,1,2}`` with ``avg_down``), which for the default options equals torchvision's resnet keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.utils.checkpoint as cp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from densedet.models.layers import (
    build_conv_layer,
    build_norm_layer,
    constant_init,
    freeze_batchnorms,
    kaiming_init,
)
from densedet.registry import BACKBONES, ConfigError
from densedet.weights.sources import load_pretrained, pretrained_source

__all__ = ["BasicBlock", "Bottleneck", "ResLayer", "ResNet", "ResNetV1d"]

_DEFAULT_NORM = {"type": "BN", "requires_grad": True}

class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Keys: ``conv1, bn1, conv2, bn2[, downsample]``; stride on ``conv1``."""

    expansion = 1

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
    ) -> None:
        super().__init__()
        if dcn is not None:
            raise ConfigError("ResNet: dcn is only supported for Bottleneck blocks (depth 50/101/152), as in mmdet")
        self.norm1_name, norm1 = build_norm_layer(norm_cfg, planes, postfix=1)
        self.norm2_name, norm2 = build_norm_layer(norm_cfg, planes, postfix=2)
        self.conv1 = build_conv_layer(
            conv_cfg, inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.add_module(self.norm1_name, norm1)
        self.conv2 = build_conv_layer(conv_cfg, planes, planes, 3, padding=1, bias=False)
        self.add_module(self.norm2_name, norm2)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.with_cp = with_cp

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    @property
    def norm2(self) -> nn.Module:
        return getattr(self, self.norm2_name)

    @property
    def last_norm(self) -> nn.Module:
        """The norm whose gamma ``zero_init_residual`` zeroes."""
        return self.norm2

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity  # in place: the norm's backward does not need its output (saves a pass + memory)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            out = cp.checkpoint(self._residual, x, use_reentrant=False)
        else:
            out = self._residual(x)
        return self.relu(out)


def conv2_config(conv_cfg: dict[str, Any] | None, dcn: dict[str, Any] | None, conv2_stride: int,
                 owner: str) -> dict[str, Any] | None:
    """The conv config of a bottleneck's 3x3 conv(s): ``dcn`` (mmdet's ``dcn=dict(type='DCNv2', ...)``) unless it
    is None or ``fallback_on_stride`` is set on a strided block; ``conv_cfg`` otherwise. ``owner`` names the
    backbone in the error for ``conv_cfg`` and ``dcn`` both set (mmdet asserts the same)."""
    dcn = dict(dcn) if dcn is not None else None
    fallback_on_stride = dcn.pop("fallback_on_stride", False) if dcn is not None else False
    if dcn is None or (fallback_on_stride and conv2_stride != 1):
        return conv_cfg
    if conv_cfg is not None:
        raise ConfigError(f"{owner}: conv_cfg must be None when dcn is set (mmdet asserts the same)")
    return dcn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck (ResNet-50/101/152, and ResNeXt's with ``groups > 1``).
    Keys: ``conv1..3, bn1..3[, downsample]``.

    ``style='pytorch'`` puts the stride on the 3x3 ``conv2`` (torchvision, "ResNet v1.5"); ``style='caffe'`` on the
    1x1 ``conv1`` (original paper / Detectron weights). ``dcn`` (a conv config, e.g. ``{'type': 'DCNv2',
    'deform_groups': 1, 'fallback_on_stride': False}``) replaces ``conv2`` as in mmdet. ResNeXt (mmdet
    ``resnext.Bottleneck``): the inner width is ``floor(planes * base_width / base_channels) * groups`` and
    ``conv2`` is grouped; ``groups == 1`` is the plain ResNet bottleneck (inner width ``planes``).
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
        super().__init__()
        width = planes if groups == 1 else math.floor(planes * base_width / base_channels) * groups
        conv1_stride, conv2_stride = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1_stride, self.conv2_stride = conv1_stride, conv2_stride
        self.norm1_name, norm1 = build_norm_layer(norm_cfg, width, postfix=1)
        self.norm2_name, norm2 = build_norm_layer(norm_cfg, width, postfix=2)
        self.norm3_name, norm3 = build_norm_layer(norm_cfg, planes * self.expansion, postfix=3)

        self.conv1 = build_conv_layer(conv_cfg, inplanes, width, 1, stride=conv1_stride, bias=False)
        self.add_module(self.norm1_name, norm1)
        owner = "ResNet" if groups == 1 else "ResNeXt"
        self.conv2 = build_conv_layer(
            conv2_config(conv_cfg, dcn, conv2_stride, owner), width, width, 3, stride=conv2_stride,
            padding=dilation, dilation=dilation, groups=groups, bias=False,
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

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    @property
    def norm2(self) -> nn.Module:
        return getattr(self, self.norm2_name)

    @property
    def norm3(self) -> nn.Module:
        return getattr(self, self.norm3_name)

    @property
    def last_norm(self) -> nn.Module:
        """The norm whose gamma ``zero_init_residual`` zeroes."""
        return self.norm3

    def _residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity  # in place: the norm's backward does not need its output (saves a pass + memory)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Checkpointing trades compute for memory; BN layers in train mode would update running stats twice, which
        # is harmless with the detection default norm_eval=True.
        if self.with_cp and self.training and torch.is_grad_enabled():
            out = cp.checkpoint(self._residual, x, use_reentrant=False)
        else:
            out = self._residual(x)
        return self.relu(out)


class ResLayer(nn.Sequential):
    """One ResNet stage: ``num_blocks`` blocks, the first carrying the stride and the projection shortcut.

    With ``avg_down`` the shortcut is ``AvgPool(stride) -> 1x1 conv (stride 1) -> norm`` (ResNet-D), else
    ``1x1 conv (stride) -> norm``.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        inplanes: int,
        planes: int,
        num_blocks: int,
        stride: int = 1,
        dilation: int = 1,
        avg_down: bool = False,
        conv_cfg: dict[str, Any] | None = None,
        norm_cfg: dict[str, Any] = _DEFAULT_NORM,
        **block_kwargs: Any,
    ) -> None:
        downsample = None
        out_planes = planes * block.expansion
        if stride != 1 or inplanes != out_planes:
            layers: list[nn.Module] = []
            conv_stride = stride
            if avg_down:
                conv_stride = 1
                # mmdet appends the pool even for stride 1 (kernel 1 = identity) so key indices stay fixed.
                layers.append(nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False))
            layers.append(build_conv_layer(conv_cfg, inplanes, out_planes, 1, stride=conv_stride, bias=False))
            layers.append(build_norm_layer(norm_cfg, out_planes)[1])
            downsample = nn.Sequential(*layers)

        blocks = [
            block(
                inplanes,
                planes,
                stride=stride,
                dilation=dilation,
                downsample=downsample,
                conv_cfg=conv_cfg,
                norm_cfg=norm_cfg,
                **block_kwargs,
            )
        ]
        blocks += [
            block(out_planes, planes, stride=1, dilation=dilation, conv_cfg=conv_cfg, norm_cfg=norm_cfg, **block_kwargs)
            for _ in range(1, num_blocks)
        ]
        super().__init__(*blocks)


@BACKBONES.register()
class ResNet(nn.Module):
    """ResNet backbone returning the outputs of selected stages.

    Args mirror mmdet 2.x ``ResNet``: ``depth`` in {18, 34, 50, 101, 152}; ``strides``/``dilations`` per stage;
    ``out_indices`` select stages (0 -> C2, stride 4 ... 3 -> C5, stride 32); ``style`` 'pytorch' or 'caffe';
    ``deep_stem`` (three 3x3 convs, ``stem.0..8``) and ``avg_down`` (ResNet-D shortcut); ``frozen_stages`` k freezes
    the stem and ``layer1..k``; ``norm_eval`` keeps every BN layer in eval mode during training; ``with_cp``
    checkpoints each block; ``dcn``/``stage_with_dcn`` put a deformable ``conv2`` in the chosen stages (the conv
    type must be registered in ``densedet.models.layers.CONV_LAYERS``). ``pretrained`` (or
    ``init_cfg={'type': 'Pretrained', 'checkpoint': ..., 'prefix': ...}``, as mmdet 2.x configs write it) is a local
    path, ``torchvision://resnet50``, ``open-mmlab://...`` or an http(s) URL; it is loaded by :meth:`init_weights`.

    Construction applies the default initialisation (kaiming fan_out convs, norm 1/0, zero-init of each residual
    branch's last norm); call :meth:`init_weights` before training to load ``pretrained``.

    ``forward``: ``(B, in_channels, H, W)`` -> tuple of ``(B, out_channels[i], ceil(H / s), ceil(W / s))`` with
    ``s = 4, 8, 16, 32`` for the default strides.
    """

    arch_settings: ClassVar[dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, ...]]]] = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }

    def __init__(
        self,
        depth: int,
        in_channels: int = 3,
        stem_channels: int | None = None,
        base_channels: int = 64,
        num_stages: int = 4,
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
        out_indices: Sequence[int] = (0, 1, 2, 3),
        style: str = "pytorch",
        deep_stem: bool = False,
        avg_down: bool = False,
        frozen_stages: int = -1,
        conv_cfg: dict[str, Any] | None = None,
        norm_cfg: dict[str, Any] = _DEFAULT_NORM,
        norm_eval: bool = True,
        dcn: dict[str, Any] | None = None,
        stage_with_dcn: Sequence[bool] = (False, False, False, False),
        with_cp: bool = False,
        zero_init_residual: bool = True,
        pretrained: str | None = None,
        init_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if depth not in self.arch_settings:
            raise ConfigError(f"ResNet: invalid depth {depth}; expected one of {sorted(self.arch_settings)}")
        if style not in ("pytorch", "caffe"):
            raise ConfigError(f"ResNet: style must be 'pytorch' or 'caffe', got {style!r}")
        if not 1 <= num_stages <= 4:
            raise ConfigError(f"ResNet: num_stages must be in 1..4, got {num_stages}")
        if len(strides) != num_stages or len(dilations) != num_stages:
            raise ConfigError(
                f"ResNet: strides {tuple(strides)} and dilations {tuple(dilations)} need {num_stages} entries each"
            )
        out_indices = tuple(out_indices)
        if not out_indices or any(not 0 <= i < num_stages for i in out_indices):
            raise ConfigError(f"ResNet: out_indices {out_indices} must be non-empty and within 0..{num_stages - 1}")
        if not -1 <= frozen_stages <= num_stages:
            raise ConfigError(f"ResNet: frozen_stages must be in -1..{num_stages}, got {frozen_stages}")
        if dcn is not None and len(stage_with_dcn) != num_stages:
            raise ConfigError(f"ResNet: stage_with_dcn {tuple(stage_with_dcn)} needs {num_stages} entries")
        self.pretrained = pretrained_source(pretrained, init_cfg)

        self.depth = depth
        self.stem_channels = base_channels if stem_channels is None else stem_channels
        self.base_channels = base_channels
        self.num_stages = num_stages
        self.strides = tuple(strides)
        self.dilations = tuple(dilations)
        self.out_indices = out_indices
        self.style = style
        self.deep_stem = deep_stem
        self.avg_down = avg_down
        self.frozen_stages = frozen_stages
        self.conv_cfg = conv_cfg
        self.norm_cfg = dict(norm_cfg)
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self.zero_init_residual = zero_init_residual
        self.block, stage_blocks = self.arch_settings[depth]
        self.stage_blocks = stage_blocks[:num_stages]

        self._make_stem(in_channels, self.stem_channels)
        inplanes = self.stem_channels
        self.res_layers: list[str] = []
        for i, num_blocks in enumerate(self.stage_blocks):
            planes = base_channels * 2**i
            layer = ResLayer(
                self.block,
                inplanes,
                planes,
                num_blocks,
                stride=self.strides[i],
                dilation=self.dilations[i],
                avg_down=avg_down,
                conv_cfg=conv_cfg,
                norm_cfg=self.norm_cfg,
                style=style,
                with_cp=with_cp,
                dcn=dcn if (dcn is not None and stage_with_dcn[i]) else None,
            )
            inplanes = planes * self.block.expansion
            name = f"layer{i + 1}"
            self.add_module(name, layer)
            self.res_layers.append(name)
        self.feat_dim = inplanes
        self.out_channels: list[int] = [base_channels * 2**i * self.block.expansion for i in self.out_indices]

        self._default_init()
        self._freeze_stages()

    def _make_stem(self, in_channels: int, stem_channels: int) -> None:
        if self.deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                build_conv_layer(self.conv_cfg, in_channels, half, 3, stride=2, padding=1, bias=False),
                build_norm_layer(self.norm_cfg, half)[1],
                nn.ReLU(inplace=True),
                build_conv_layer(self.conv_cfg, half, half, 3, stride=1, padding=1, bias=False),
                build_norm_layer(self.norm_cfg, half)[1],
                nn.ReLU(inplace=True),
                build_conv_layer(self.conv_cfg, half, stem_channels, 3, stride=1, padding=1, bias=False),
                build_norm_layer(self.norm_cfg, stem_channels)[1],
                nn.ReLU(inplace=True),
            )
        else:
            self.conv1 = build_conv_layer(self.conv_cfg, in_channels, stem_channels, 7, stride=2, padding=3, bias=False)
            self.norm1_name, norm1 = build_norm_layer(self.norm_cfg, stem_channels, postfix=1)
            self.add_module(self.norm1_name, norm1)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, self.norm1_name)

    def _default_init(self) -> None:
        """Kaiming-normal (fan_out) convs, norm weight 1 / bias 0, last norm of each block 0 if zero_init_residual."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                kaiming_init(m)
            elif isinstance(m, (_BatchNorm, nn.GroupNorm)):
                constant_init(m, 1.0)
        for m in self.modules():
            # Custom convs (e.g. DCN) that bring their own init_weights run it after the generic pass.
            if m is not self and hasattr(m, "init_weights") and not isinstance(m, ResNet):
                m.init_weights()
        if self.zero_init_residual:
            # Each residual branch then starts as identity (Goyal et al. 2017); mmdet 2.x default.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    constant_init(m.last_norm, 0.0)

    def init_weights(self) -> None:
        """Default initialisation, then load ``pretrained`` if set (missing/unexpected keys are warned about)."""
        self._default_init()
        if self.pretrained is not None:
            source, prefix = self.pretrained
            load_pretrained(self, source, prefix=prefix)

    def _freeze_stages(self) -> None:
        # mmdet ResNet._freeze_stages: stem and layer1..k -> eval mode and requires_grad False.
        if self.frozen_stages >= 0:
            stem = [self.stem] if self.deep_stem else [self.conv1, self.norm1]
            for m in stem:
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False
        for i in range(1, self.frozen_stages + 1):
            m = getattr(self, f"layer{i}")
            m.eval()
            for p in m.parameters():
                p.requires_grad = False
        # BNs that never update (frozen stages; with norm_eval, those whose affine is not trained either) become
        # FrozenBatchNorm2d: same keys and values, no saved activations in backward.
        if self.norm_eval:
            freeze_batchnorms(self, only_without_grad=True)
        elif self.frozen_stages >= 0:
            freeze_batchnorms(self.stem if self.deep_stem else self, only_without_grad=True, recurse=self.deep_stem)
            for i in range(1, self.frozen_stages + 1):
                freeze_batchnorms(getattr(self, f"layer{i}"))

    def train(self, mode: bool = True) -> ResNet:
        """Set train/eval mode, keeping frozen stages in eval and, with ``norm_eval``, every BN layer in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x``: ``(B, in_channels, H, W)`` -> tuple of the ``out_indices`` stage outputs."""
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.norm1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


@BACKBONES.register()
class ResNetV1d(ResNet):
    """ResNet-D: deep stem and average-pool shortcut (mmdet ``ResNetV1d``: ``deep_stem=True, avg_down=True``)."""

    def __init__(self, **kwargs: Any) -> None:
        for key in ("deep_stem", "avg_down"):
            if key in kwargs:
                raise ConfigError(f"ResNetV1d: '{key}' is fixed to True; use ResNet to choose it")
        super().__init__(deep_stem=True, avg_down=True, **kwargs)
