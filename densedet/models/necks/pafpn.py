"""Path Aggregation FPN with MMDetection 2.x parameter names and semantics.

Reference: Liu et al., "Path Aggregation Network for Instance Segmentation" (CVPR 2018). Layout follows
``mmdet/models/necks/pafpn.py`` (v2.x): FPN's ``lateral_convs`` / ``fpn_convs`` (extra levels appended to
``fpn_convs``), plus a bottom-up path of stride-2 3x3 ``downsample_convs.{i}.conv`` and 3x3 ``pafpn_convs.{i}.conv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densedet.models.layers import ConvModule
from densedet.models.necks.fpn import FPN
from densedet.registry import NECKS

__all__ = ["PAFPN"]


@NECKS.register()
class PAFPN(FPN):
    """FPN followed by a bottom-up path augmentation.

    Arguments are :class:`FPN`'s (``upsample_cfg`` excepted: the top-down path is nearest-neighbour resizing to the
    finer map's size, as mmdet's PAFPN). ``conv_cfg`` / ``norm_cfg`` / ``act_cfg`` also apply to the bottom-up convs,
    so GN (``norm_cfg={'type': 'GN', 'num_groups': 32}``) or deformable convs (``conv_cfg={'type': 'DCNv2'}``) reach
    every conv of the neck.

    ``forward``: one ``(B, in_channels[i], H_i, W_i)`` map per input -> ``num_outs`` maps ``(B, out_channels, ...)``;
    level ``i`` of the bottom-up path is ``N_i = pafpn_conv(P_i + downsample_conv(N_{i-1}))`` with ``N_0 = P_0``.
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
        init_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            num_outs,
            start_level=start_level,
            end_level=end_level,
            add_extra_convs=add_extra_convs,
            relu_before_extra_convs=relu_before_extra_convs,
            no_norm_on_lateral=no_norm_on_lateral,
            conv_cfg=conv_cfg,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg,
            init_cfg=init_cfg,
        )
        common = {"conv_cfg": conv_cfg, "norm_cfg": norm_cfg, "act_cfg": act_cfg, "inplace": False}
        self.downsample_convs = nn.ModuleList()
        self.pafpn_convs = nn.ModuleList()
        for _ in range(self.start_level + 1, self.backbone_end_level):
            self.downsample_convs.append(ConvModule(out_channels, out_channels, 3, stride=2, padding=1, **common))
            self.pafpn_convs.append(ConvModule(out_channels, out_channels, 3, padding=1, **common))
        self.init_weights()

    def init_weights(self) -> None:
        """FPN's Xavier init for every ``nn.Conv2d``; deformable convs then redo their own init (zero offsets)."""
        super().init_weights()
        for m in self.modules():
            if m is not self and hasattr(m, "conv_offset") and hasattr(m, "init_weights"):
                m.init_weights()

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``inputs``: one ``(B, C_i, H_i, W_i)`` map per ``in_channels`` entry -> ``num_outs`` maps."""
        if len(inputs) != self.num_ins:
            raise ValueError(
                f"PAFPN expects {self.num_ins} input maps (in_channels={self.in_channels}), got {len(inputs)}"
            )
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        used = len(laterals)
        # Top-down (FPN).
        for i in range(used - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        inter = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        # Bottom-up path augmentation: a stride-2 conv carries each finer level into the next coarser one. For odd
        # sizes the stride-2 conv gives ceil(n / 2), the size the backbone produced for the coarser level.
        for i in range(used - 1):
            inter[i + 1] = inter[i + 1] + self.downsample_convs[i](inter[i])
        outs = [inter[0]] + [self.pafpn_convs[i - 1](inter[i]) for i in range(1, used)]

        if self.num_outs > used:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                if self.add_extra_convs == "on_input":
                    source = inputs[self.backbone_end_level - 1]
                elif self.add_extra_convs == "on_lateral":
                    source = laterals[-1]
                else:  # on_output: the last bottom-up output
                    source = outs[-1]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    prev = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](prev))
        return tuple(outs)
