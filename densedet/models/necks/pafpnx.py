"""PAFPNX: the PAFPN variant of VFNet-X (Zhang et al., "VarifocalNet: An IoU-aware Dense Object Detector", CVPR 2021).

Reference: ``mmdet/models/necks/pafpnx.py`` of hyz-xmaster/VarifocalNet. Two differences from :class:`PAFPN`:

- a ``pafpn_convs`` conv on *every* used level (``len == #used levels``), the finest included, where PAFPN passes the
  finest bottom-up level through unchanged (``len == #used levels - 1``);
- those convs are built from ``pafpn_conv_cfg`` (VFNet-X: ``{'type': 'DCNv2'}``), falling back to ``conv_cfg``;
  lateral / fpn / downsample / extra convs keep ``conv_cfg``.

It also accepts mmdet 2.x's ``extra_convs_on_inputs`` (the VFNet-X config sets ``add_extra_convs=True,
extra_convs_on_inputs=False``, i.e. extra levels from the last bottom-up output, ``'on_output'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densedet.models.layers import ConvModule
from densedet.models.necks.pafpn import PAFPN
from densedet.registry import NECKS, ConfigError

__all__ = ["PAFPNX"]


@NECKS.register()
class PAFPNX(PAFPN):
    """FPN + bottom-up path with a (deformable) output conv on every level.

    Args: those of :class:`PAFPN`, plus
        extra_convs_on_inputs: only read when ``add_extra_convs is True`` (mmdet 2.x): True -> ``'on_input'``,
            False -> ``'on_output'``. The reference's default is True.
        pafpn_conv_cfg: conv config of the ``pafpn_convs`` (``None``: ``conv_cfg``).

    ``forward``: one ``(B, in_channels[i], H_i, W_i)`` map per input -> ``num_outs`` maps ``(B, out_channels, ...)``.
    With ``P_i`` the FPN outputs: ``N_0 = P_0``, ``N_i = P_i + downsample_{i-1}(N_{i-1})``, output ``i`` is
    ``pafpn_conv_i(N_i)``; extra levels are read from the last output (``'on_output'``) as in FPN.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        num_outs: int,
        start_level: int = 0,
        end_level: int = -1,
        add_extra_convs: bool | str = False,
        extra_convs_on_inputs: bool = True,
        relu_before_extra_convs: bool = False,
        no_norm_on_lateral: bool = False,
        conv_cfg: dict[str, Any] | None = None,
        norm_cfg: dict[str, Any] | None = None,
        act_cfg: dict[str, Any] | None = None,
        pafpn_conv_cfg: dict[str, Any] | None = None,
        init_cfg: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(extra_convs_on_inputs, bool):
            raise ConfigError(f"PAFPNX: extra_convs_on_inputs must be a bool, got {extra_convs_on_inputs!r}")
        if add_extra_convs is True:  # mmdet 2.x FPN: the bool picks the source via extra_convs_on_inputs
            add_extra_convs = "on_input" if extra_convs_on_inputs else "on_output"
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
        self.pafpn_conv_cfg = dict(pafpn_conv_cfg) if pafpn_conv_cfg is not None else conv_cfg
        # PAFPN built one pafpn conv per level above start_level with conv_cfg; PAFPNX has one per used level.
        self.pafpn_convs = nn.ModuleList(
            ConvModule(out_channels, out_channels, 3, padding=1, conv_cfg=self.pafpn_conv_cfg, norm_cfg=norm_cfg,
                       act_cfg=act_cfg, inplace=False)
            for _ in range(self.start_level, self.backbone_end_level)
        )
        self.init_weights()

    def forward(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """``inputs``: one ``(B, C_i, H_i, W_i)`` map per ``in_channels`` entry -> ``num_outs`` maps."""
        if len(inputs) != self.num_ins:
            raise ValueError(
                f"PAFPNX expects {self.num_ins} input maps (in_channels={self.in_channels}), got {len(inputs)}"
            )
        laterals = [conv(inputs[i + self.start_level]) for i, conv in enumerate(self.lateral_convs)]
        used = len(laterals)
        for i in range(used - 1, 0, -1):  # top-down (FPN), nearest resize to the finer map's exact size
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        inter = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        for i in range(used - 1):  # bottom-up path augmentation
            inter[i + 1] = inter[i + 1] + self.downsample_convs[i](inter[i])
        outs = [self.pafpn_convs[i](inter[i]) for i in range(used)]

        if self.num_outs > used:
            if not self.add_extra_convs:
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:
                if self.add_extra_convs == "on_input":
                    source = inputs[self.backbone_end_level - 1]
                elif self.add_extra_convs == "on_lateral":
                    source = laterals[-1]
                else:  # on_output: the last pafpn output
                    source = outs[-1]
                outs.append(self.fpn_convs[used](source))
                for i in range(used + 1, self.num_outs):
                    prev = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](prev))
        return tuple(outs)
