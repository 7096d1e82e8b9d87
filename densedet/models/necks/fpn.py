"""Feature Pyramid Network with MMDetection 2.x parameter names and semantics.

Reference: Lin et al., "Feature Pyramid Networks for Object Detection" (CVPR 2017); extra levels as in RetinaNet
(P6/P7 from C5, Lin et al. 2017) and FCOS (from P5 with ReLU between). Layout follows ``mmdet/models/necks/fpn.py``
(v2.x): ``lateral_convs.{i}.conv`` (1x1) and ``fpn_convs.{i}.conv`` (3x3), extra stride-2 convs appended to
``fpn_convs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densedet.models.layers import ConvModule, xavier_init
from densedet.registry import NECKS, ConfigError

__all__ = ["FPN"]

_EXTRA_SOURCES = ("on_input", "on_lateral", "on_output")


@NECKS.register()
class FPN(nn.Module):
    """Top-down feature pyramid with optional extra coarse levels.

    Args:
        in_channels: channels of each backbone feature passed to ``forward`` (e.g. ``[256, 512, 1024, 2048]``).
        out_channels: channels of every output level.
        num_outs: number of output levels.
        start_level / end_level: first / last input index used to build the pyramid (``end_level=-1``: the last).
        add_extra_convs: False -> extra levels by ``max_pool2d(k=1, s=2)`` of the last output; ``'on_input'``
            (or True), ``'on_lateral'``, ``'on_output'`` -> stride-2 3x3 convs whose first one reads the last used
            input, its lateral, or its output.
        relu_before_extra_convs: apply ReLU to the input of the second and later extra convs.
        no_norm_on_lateral: build lateral convs without ``norm_cfg``.
        conv_cfg / norm_cfg / act_cfg: passed to every :class:`ConvModule` (mmdet default: plain conv with bias).
        upsample_cfg: ``F.interpolate`` keywords for the top-down path; without ``scale_factor`` the coarser map is
            resized to the finer one's exact size, so odd sizes work.
        init_cfg: ``None`` or ``{'type': 'Xavier', 'distribution': 'uniform'|'normal', ...}``; the default is
            Xavier-uniform conv weights and zero biases, as mmdet 2.x FPN.

    ``forward``: tuple of ``len(in_channels)`` maps ``(B, in_channels[i], H_i, W_i)`` -> tuple of ``num_outs`` maps
    ``(B, out_channels, H_j, W_j)``; each extra level halves the size (``ceil``).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        num_outs: int,
        start_level: int = 0,
        end_level: int = -1,
        add_extra_convs: bool | str = False,
        relu_before_extra_convs: bool = False,
        no_norm_on_lateral: bool = False,
        conv_cfg: dict[str, Any] | None = None,
        norm_cfg: dict[str, Any] | None = None,
        act_cfg: dict[str, Any] | None = None,
        upsample_cfg: dict[str, Any] | None = None,
        init_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, Sequence) or isinstance(in_channels, str) or not in_channels:
            raise ConfigError(f"FPN: in_channels must be a non-empty list of ints, got {in_channels!r}")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_ins = len(self.in_channels)
        self.num_outs = num_outs
        self.relu_before_extra_convs = relu_before_extra_convs
        self.no_norm_on_lateral = no_norm_on_lateral
        self.upsample_cfg = dict(upsample_cfg) if upsample_cfg is not None else {"mode": "nearest"}

        if not 0 <= start_level < self.num_ins:
            raise ConfigError(f"FPN: start_level {start_level} out of range for {self.num_ins} inputs")
        if end_level == -1 or end_level == self.num_ins - 1:
            self.backbone_end_level = self.num_ins
            if num_outs < self.num_ins - start_level:
                raise ConfigError(f"FPN: num_outs {num_outs} < number of used inputs {self.num_ins - start_level}")
        else:
            # A pyramid that stops before the last input gets no extra levels (mmdet asserts the same).
            if not start_level <= end_level < self.num_ins:
                raise ConfigError(f"FPN: end_level {end_level} must be in {start_level}..{self.num_ins - 1} or -1")
            if num_outs != end_level - start_level + 1:
                raise ConfigError(f"FPN: with end_level {end_level}, num_outs must be {end_level - start_level + 1}")
            self.backbone_end_level = end_level + 1
        self.start_level = start_level
        self.end_level = end_level

        if isinstance(add_extra_convs, str):
            if add_extra_convs not in _EXTRA_SOURCES:
                raise ConfigError(
                    f"FPN: add_extra_convs must be a bool or one of {_EXTRA_SOURCES}, got {add_extra_convs!r}"
                )
            self.add_extra_convs: str | bool = add_extra_convs
        elif isinstance(add_extra_convs, bool):
            self.add_extra_convs = "on_input" if add_extra_convs else False  # True kept for old configs
        else:
            raise ConfigError(f"FPN: add_extra_convs must be a bool or str, got {add_extra_convs!r}")

        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for i in range(self.start_level, self.backbone_end_level):
            self.lateral_convs.append(
                ConvModule(
                    self.in_channels[i],
                    out_channels,
                    1,
                    conv_cfg=conv_cfg,
                    norm_cfg=None if no_norm_on_lateral else norm_cfg,
                    act_cfg=act_cfg,
                    inplace=False,
                )
            )
            self.fpn_convs.append(
                ConvModule(
                    out_channels,
                    out_channels,
                    3,
                    padding=1,
                    conv_cfg=conv_cfg,
                    norm_cfg=norm_cfg,
                    act_cfg=act_cfg,
                    inplace=False,
                )
            )

        extra_levels = num_outs - self.backbone_end_level + self.start_level
        if self.add_extra_convs and extra_levels >= 1:
            for i in range(extra_levels):
                if i == 0 and self.add_extra_convs == "on_input":
                    extra_in = self.in_channels[self.backbone_end_level - 1]
                else:
                    extra_in = out_channels
                self.fpn_convs.append(
                    ConvModule(
                        extra_in,
                        out_channels,
                        3,
                        stride=2,
                        padding=1,
                        conv_cfg=conv_cfg,
                        norm_cfg=norm_cfg,
                        act_cfg=act_cfg,
                        inplace=False,
                    )
                )
        self._init_kwargs = _parse_init_cfg(init_cfg)
        self.init_weights()

    def init_weights(self) -> None:
        """Xavier (uniform by default) conv weights, zero bias, as mmdet 2.x FPN's ``init_cfg``.

        Norm layers keep ConvModule's weight 1 / bias 0.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                xavier_init(m, **self._init_kwargs)

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``inputs``: one ``(B, C_i, H_i, W_i)`` map per ``in_channels`` entry -> ``num_outs`` maps."""
        if len(inputs) != self.num_ins:
            raise ValueError(
                f"FPN expects {self.num_ins} input maps (in_channels={self.in_channels}), got {len(inputs)}"
            )
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]

        # Top-down: add the upsampled coarser lateral into each finer one.
        used = len(laterals)
        for i in range(used - 1, 0, -1):
            if "scale_factor" in self.upsample_cfg:
                up = F.interpolate(laterals[i], **self.upsample_cfg)
            else:
                up = F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], **self.upsample_cfg)
            laterals[i - 1] = laterals[i - 1] + up

        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]

        if self.num_outs > used:
            if not self.add_extra_convs:
                # RetinaNet paper's max-pool P6 for Faster R-CNN style FPN (kernel 1, stride 2 == subsampling).
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                if self.add_extra_convs == "on_input":
                    source = inputs[self.backbone_end_level - 1]
                elif self.add_extra_convs == "on_lateral":
                    source = laterals[-1]
                else:  # on_output
                    source = outs[-1]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    prev = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](prev))
        return tuple(outs)


def _parse_init_cfg(init_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Turn FPN's ``init_cfg`` into :func:`xavier_init` keywords (only Xavier on Conv2d is meaningful here)."""
    if init_cfg is None:
        return {"distribution": "uniform"}
    if not isinstance(init_cfg, Mapping) or init_cfg.get("type") != "Xavier":
        raise ConfigError(f"FPN: init_cfg must be None or {{'type': 'Xavier', ...}}, got {init_cfg!r}")
    extra = set(init_cfg) - {"type", "layer", "distribution", "gain", "bias"}
    if extra:
        raise ConfigError(f"FPN: unknown init_cfg keys {sorted(extra)}")
    if init_cfg.get("layer", "Conv2d") not in ("Conv2d", ["Conv2d"]):
        raise ConfigError(f"FPN: init_cfg layer must be 'Conv2d', got {init_cfg['layer']!r}")
    kwargs = {k: init_cfg[k] for k in ("distribution", "gain", "bias") if k in init_cfg}
    kwargs.setdefault("distribution", "normal")  # mmcv XavierInit's own default; FPN's default cfg says uniform
    return kwargs
