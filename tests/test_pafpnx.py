"""PAFPNX (VFNet-X neck): mmdet key layout of the released VFNet-X neck, mmdet 2.x extra-conv flags, the forward
against a hand-written path, and DCNv2 output convs at zero offsets against plain convs with half the weight."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from densedet.models.dcn import ModulatedDeformConv2dPack
from densedet.models.necks.fpn import FPN
from densedet.models.necks.pafpnx import PAFPNX
from densedet.registry import NECKS, ConfigError

IN_CHANNELS = [16, 24, 32, 40]


def _inputs(batch: int, h: int, w: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, c, math.ceil(h / s), math.ceil(w / s), generator=g)
            for c, s in zip(IN_CHANNELS, (4, 8, 16, 32), strict=True)]


def vfnetx_neck_keys(prefix: str = "") -> dict[str, tuple]:
    """The VFNet-X neck's key/shape list, written from the reference module definitions (see the test below)."""
    expected: dict[str, tuple] = {}
    for i, c in enumerate([512, 1024, 2048]):
        expected[f"{prefix}lateral_convs.{i}.conv.weight"] = (384, c, 1, 1)
        expected[f"{prefix}lateral_convs.{i}.conv.bias"] = (384,)
    gn = {"gn.weight": (384,), "gn.bias": (384,)}
    for name, n in (("fpn_convs", 5), ("downsample_convs", 2), ("pafpn_convs", 3)):
        for i in range(n):
            expected[f"{prefix}{name}.{i}.conv.weight"] = (384, 384, 3, 3)
            expected.update({f"{prefix}{name}.{i}.{k}": v for k, v in gn.items()})
    for i in range(3):
        expected[f"{prefix}pafpn_convs.{i}.conv.conv_offset.weight"] = (27, 384, 3, 3)
        expected[f"{prefix}pafpn_convs.{i}.conv.conv_offset.bias"] = (27,)
    return expected


def test_vfnetx_key_layout() -> None:
    """The VFNet-X neck (configs/vfnet/vfnetx_r2_101_fpn_mdconv_c3-c5_mstrain_2x_coco.py) as mmdet names it:
    laterals without norm (conv bias), GN elsewhere (no conv bias), 3 DCNv2 pafpn convs whose conv_offset predicts
    3 x 9 channels (offsets + mask), 2 downsample convs, 5 fpn convs (2 extra, on P5's output: 384 in)."""
    with torch.device("meta"):
        neck = NECKS.build({
            "type": "PAFPNX", "in_channels": [256, 512, 1024, 2048], "out_channels": 384, "start_level": 1,
            "add_extra_convs": True, "extra_convs_on_inputs": False, "num_outs": 5, "relu_before_extra_convs": True,
            "pafpn_conv_cfg": {"type": "DCNv2"}, "no_norm_on_lateral": True,
            "norm_cfg": {"type": "GN", "num_groups": 32, "requires_grad": True}})
    assert {k: tuple(v.shape) for k, v in neck.state_dict().items()} == vfnetx_neck_keys()
    assert neck.add_extra_convs == "on_output"
    assert all(isinstance(m.conv, ModulatedDeformConv2dPack) for m in neck.pafpn_convs)
    assert not any(isinstance(m.conv, ModulatedDeformConv2dPack) for m in neck.downsample_convs)


def test_extra_convs_on_inputs_flag() -> None:
    """mmdet 2.x: add_extra_convs=True reads extra_convs_on_inputs (default True -> the C5 input)."""
    with torch.device("meta"):
        on_input = PAFPNX([256, 512, 1024, 2048], 64, num_outs=5, start_level=1, add_extra_convs=True)
        named = PAFPNX([256, 512, 1024, 2048], 64, num_outs=5, start_level=1, add_extra_convs="on_lateral",
                       extra_convs_on_inputs=False)
    assert on_input.add_extra_convs == "on_input" and on_input.fpn_convs[3].conv.weight.shape[1] == 2048
    assert named.add_extra_convs == "on_lateral"  # a string wins over the flag
    with pytest.raises(ConfigError, match="extra_convs_on_inputs"):
        PAFPNX(IN_CHANNELS, 8, num_outs=4, extra_convs_on_inputs="yes")


@pytest.mark.parametrize(("start_level", "num_outs", "extra"), [(0, 4, False), (1, 5, "on_output"), (1, 6, False)])
def test_forward_against_hand_written_path(start_level: int, num_outs: int, extra) -> None:
    """Reference forward: P_i from FPN (same weights), N_0 = P_0, N_i = P_i + down_{i-1}(N_{i-1}), output i =
    pafpn_i(N_i) on *every* level (PAFPN leaves level 0 alone), extra levels from the last output with ReLU."""
    torch.manual_seed(0)
    neck = PAFPNX(IN_CHANNELS, 8, num_outs=num_outs, start_level=start_level, add_extra_convs=extra,
                  relu_before_extra_convs=True).eval()
    used = len(IN_CHANNELS) - start_level
    assert len(neck.pafpn_convs) == used and len(neck.downsample_convs) == used - 1
    fpn = FPN(IN_CHANNELS, 8, num_outs=used, start_level=start_level).eval()
    with torch.no_grad():
        for p in neck.parameters():
            if p.dim() == 1:
                torch.nn.init.normal_(p, std=0.1)
    fpn.load_state_dict({k: v for k, v in neck.state_dict().items() if k in fpn.state_dict()}, strict=True)
    xs = _inputs(2, 97, 131)
    with torch.no_grad():
        p = list(fpn(xs))
        n = [p[0]]
        for i in range(1, used):
            n.append(p[i] + neck.downsample_convs[i - 1](n[-1]))
        expected = [neck.pafpn_convs[i](n[i]) for i in range(used)]
        for i in range(used, num_outs):
            if extra:
                prev = expected[-1] if i == used else F.relu(expected[-1])
                expected.append(neck.fpn_convs[i](prev))
            else:
                expected.append(F.max_pool2d(expected[-1], 1, stride=2))
        outs = neck(xs)
    assert len(outs) == num_outs
    for a, b in zip(outs, expected, strict=True):
        torch.testing.assert_close(a, b)
    sizes = [tuple(o.shape[2:]) for o in outs]
    for fine, coarse in zip(sizes, sizes[1:]):
        assert coarse == (math.ceil(fine[0] / 2), math.ceil(fine[1] / 2))


def test_dcn_output_convs_at_zero_offsets_are_half_weight_convs() -> None:
    """A DCNv2 with zero offsets samples the regular grid with mask sigmoid(0) = 0.5, so the DCNv2 neck equals a
    plain-conv neck whose pafpn conv weights are halved (biases unchanged); every other weight is shared."""
    torch.manual_seed(0)
    dcn = PAFPNX(IN_CHANNELS, 8, num_outs=5, start_level=1, add_extra_convs=True, extra_convs_on_inputs=False,
                 pafpn_conv_cfg={"type": "DCNv2"}).eval()
    plain = PAFPNX(IN_CHANNELS, 8, num_outs=5, start_level=1, add_extra_convs=True,
                   extra_convs_on_inputs=False).eval()
    assert all(torch.count_nonzero(m.conv.conv_offset.weight) == 0 for m in dcn.pafpn_convs)
    state = {k: v for k, v in dcn.state_dict().items() if "conv_offset" not in k}
    for i in range(len(dcn.pafpn_convs)):
        state[f"pafpn_convs.{i}.conv.weight"] = 0.5 * state[f"pafpn_convs.{i}.conv.weight"]
        torch.nn.init.normal_(dcn.pafpn_convs[i].conv.bias, std=0.1)
        state[f"pafpn_convs.{i}.conv.bias"] = dcn.pafpn_convs[i].conv.bias.detach().clone()
    plain.load_state_dict(state, strict=True)
    xs = _inputs(1, 64, 96)
    with torch.no_grad():
        for a, b in zip(dcn(xs), plain(xs), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_vfnetx_config_builds_with_pafpnx_and_the_wide_head() -> None:
    from densedet.config import load_config
    from densedet.models.build import build_detector

    cfg = load_config("vfnetx_r2_101_fpn_mdconv_c3-c5_mstrain_59e_coco")
    with torch.device("meta"):
        model = build_detector(cfg.model, init=False)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert type(model.neck).__name__ == "PAFPNX" and shapes["neck.pafpn_convs.2.conv.conv_offset.weight"] == (
        27, 384, 3, 3)
    assert "neck.pafpn_convs.3.conv.weight" not in shapes and "neck.fpn_convs.4.gn.weight" in shapes
    assert shapes["bbox_head.cls_convs.3.conv.weight"] == (384, 384, 3, 3)  # 4 stacked convs, 384 wide
    assert "bbox_head.cls_convs.4.conv.weight" not in shapes
    assert cfg.model["test_cfg"]["nms"] == {"type": "soft_nms", "iou_threshold": 0.65}
    assert (cfg.schedule.epochs, cfg.schedule.steps, cfg.swa.swa_total_epochs) == (41, [36, 40], 18)
    assert cfg.swa.swa_training and cfg.swa.swa_lr_config.cyclic_times == 18
    assert [t["type"] for t in cfg.data.train.pipeline] == ["RandomCrop", "Resize", "CutOut", "RandomFlip"]
    assert cfg.model["data_preprocessor"]["to_rgb"] is True  # normalisation is the model's
