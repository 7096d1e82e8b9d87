"""PAFPN neck: mmdet key layout, output strides at odd sizes, bottom-up path against FPN + a hand-written path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from densedet.models.dcn import ModulatedDeformConv2dPack
from densedet.models.necks.fpn import FPN
from densedet.models.necks.pafpn import PAFPN
from densedet.registry import NECKS

H, W = 333, 517
IN_CHANNELS = [16, 24, 32, 40]


def _inputs(batch: int = 2, h: int = H, w: int = W) -> list[torch.Tensor]:
    """Backbone-like maps at strides 4..32 (sizes rounded up, as a ResNet produces them)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, math.ceil(h / s), math.ceil(w / s), generator=g)
            for c, s in zip(IN_CHANNELS, (4, 8, 16, 32), strict=True)]


def test_mmdet_key_layout_retinanet_style() -> None:
    with torch.device("meta"):
        neck = PAFPN([256, 512, 1024, 2048], 256, num_outs=5, start_level=1, add_extra_convs="on_input")
    shapes = {k: tuple(v.shape) for k, v in neck.state_dict().items()}
    expected = {}
    for i, c in enumerate([512, 1024, 2048]):
        expected[f"lateral_convs.{i}.conv.weight"] = (256, c, 1, 1)
        expected[f"lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(5):
        expected[f"fpn_convs.{i}.conv.weight"] = (256, 2048 if i == 3 else 256, 3, 3)
        expected[f"fpn_convs.{i}.conv.bias"] = (256,)
    for name in ("downsample_convs", "pafpn_convs"):
        for i in range(2):  # one per used level above start_level
            expected[f"{name}.{i}.conv.weight"] = (256, 256, 3, 3)
            expected[f"{name}.{i}.conv.bias"] = (256,)
    assert shapes == expected
    assert neck.downsample_convs[0].conv.stride == (2, 2) and neck.pafpn_convs[0].conv.stride == (1, 1)


@pytest.mark.parametrize("extra", [False, "on_input", "on_lateral", "on_output"])
def test_output_strides_at_odd_size(extra) -> None:
    neck = PAFPN(IN_CHANNELS, 8, num_outs=6, add_extra_convs=extra, relu_before_extra_convs=True).eval()
    with torch.no_grad():
        outs = neck(_inputs(1))
    sizes = [(math.ceil(H / 4), math.ceil(W / 4))]
    for _ in range(5):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    assert [tuple(o.shape) for o in outs] == [(1, 8, h, w) for h, w in sizes]


@pytest.mark.parametrize(("start_level", "num_outs", "extra"), [(0, 4, False), (1, 5, "on_output"), (1, 5, False)])
def test_bottom_up_path_against_fpn_and_hand_written_path(start_level: int, num_outs: int, extra) -> None:
    """mmdet's PAFPN: N_0 = P_0, N_i = P_i + down_{i-1}(N_{i-1}); outputs N_0, pafpn_{i-1}(N_i); extra levels as
    FPN's but from the bottom-up outputs. The top-down P_i come from our FPN with the same weights."""
    torch.manual_seed(0)
    neck = PAFPN(IN_CHANNELS, 8, num_outs=num_outs, start_level=start_level, add_extra_convs=extra).eval()
    used = len(IN_CHANNELS) - start_level
    fpn = FPN(IN_CHANNELS, 8, num_outs=used, start_level=start_level).eval()
    with torch.no_grad():
        for p in neck.parameters():  # non-zero biases so a missing/extra addition shows
            if p.dim() == 1:
                torch.nn.init.normal_(p, std=0.1)
    fpn.load_state_dict({k: v for k, v in neck.state_dict().items() if k in fpn.state_dict()}, strict=True)
    xs = _inputs(2, 97, 131)
    with torch.no_grad():
        p = list(fpn(xs))
        n = [p[0]]
        for i in range(1, used):
            n.append(p[i] + neck.downsample_convs[i - 1](n[-1]))
        expected = [n[0]] + [neck.pafpn_convs[i - 1](n[i]) for i in range(1, used)]
        for i in range(used, num_outs):
            expected.append(neck.fpn_convs[i](expected[-1]) if extra else F.max_pool2d(expected[-1], 1, stride=2))
        outs = neck(xs)
    assert len(outs) == num_outs
    for a, b in zip(outs, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(outs[1], p[1])  # the bottom-up path changes the pyramid


def test_group_norm_names_and_init() -> None:
    neck = PAFPN(IN_CHANNELS, 32, num_outs=5, start_level=1, add_extra_convs="on_output",
                 norm_cfg={"type": "GN", "num_groups": 8})
    keys = set(neck.state_dict())
    assert {"downsample_convs.0.gn.weight", "pafpn_convs.1.gn.bias", "lateral_convs.0.gn.weight"} <= keys
    assert "downsample_convs.0.conv.bias" not in keys  # bias='auto': no bias before a norm
    # Xavier-uniform (FPN's init): bound sqrt(6 / (fan_in + fan_out)).
    w = neck.pafpn_convs[0].conv.weight
    bound = math.sqrt(6.0 / (32 * 9 + 32 * 9))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound


def test_deformable_neck_convs_keep_zero_offsets() -> None:
    neck = PAFPN(IN_CHANNELS, 8, num_outs=4, conv_cfg={"type": "DCNv2"})
    dcns = [m for m in neck.modules() if isinstance(m, ModulatedDeformConv2dPack)]
    assert len(dcns) == 4 + 4 + 3 + 3  # lateral, fpn, downsample, pafpn convs
    assert all(torch.count_nonzero(m.conv_offset.weight) == 0 for m in dcns)
    with torch.no_grad():
        outs = neck(_inputs(1, 64, 96))
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_registry_and_input_count_check() -> None:
    neck = NECKS.build({"type": "PAFPN", "in_channels": IN_CHANNELS, "out_channels": 8, "num_outs": 4})
    assert isinstance(neck, PAFPN)
    with pytest.raises(ValueError, match="expects 4 input maps"):
        neck(_inputs(1)[:3])
