"""FPN neck and the ConvModule / norm / Scale building blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densedet.models.layers import ConvModule, Scale, build_norm_layer
from densedet.models.necks.fpn import FPN
from densedet.registry import NECKS, ConfigError

R50_CHANNELS = [256, 512, 1024, 2048]
H, W = 333, 517


def _c2_c5(batch: int = 1, channels: list[int] = R50_CHANNELS, h: int = H, w: int = W) -> list[torch.Tensor]:
    """Random ResNet-like features at strides 4..32 of an ``h x w`` image (sizes round up like the convs)."""
    return [torch.randn(batch, c, math.ceil(h / s), math.ceil(w / s)) for c, s in zip(channels, (4, 8, 16, 32))]


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_retinanet_layout() -> None:
    fpn = FPN(R50_CHANNELS, 256, num_outs=5, start_level=1, add_extra_convs="on_input")
    expected = {}
    for i, c in enumerate([512, 1024, 2048]):
        expected[f"lateral_convs.{i}.conv.weight"] = (256, c, 1, 1)
        expected[f"lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(5):
        expected[f"fpn_convs.{i}.conv.weight"] = (256, 2048 if i == 3 else 256, 3, 3)
        expected[f"fpn_convs.{i}.conv.bias"] = (256,)
    assert _shapes(fpn) == expected
    assert fpn.fpn_convs[3].conv.stride == (2, 2) and fpn.fpn_convs[2].conv.stride == (1, 1)


def test_fcos_layout_and_output_strides() -> None:
    fpn = FPN(R50_CHANNELS, 256, num_outs=5, start_level=1, add_extra_convs="on_output", relu_before_extra_convs=True)
    assert _shapes(fpn)["fpn_convs.3.conv.weight"] == (256, 256, 3, 3)
    assert len(fpn.lateral_convs) == 3 and len(fpn.fpn_convs) == 5
    with torch.no_grad():
        outs = fpn(_c2_c5())
    assert [tuple(o.shape) for o in outs] == [
        (1, 256, math.ceil(H / s), math.ceil(W / s)) for s in (8, 16, 32, 64, 128)
    ]


def test_bool_true_means_on_input() -> None:
    fpn = FPN(R50_CHANNELS, 64, num_outs=5, start_level=1, add_extra_convs=True)
    assert fpn.add_extra_convs == "on_input"
    assert fpn.fpn_convs[3].conv.in_channels == 2048


def _conv(module: ConvModule, x: torch.Tensor) -> torch.Tensor:
    c = module.conv
    return F.conv2d(x, c.weight, c.bias, stride=c.stride, padding=c.padding)


@pytest.mark.parametrize("source", ["on_input", "on_lateral", "on_output"])
@pytest.mark.parametrize("relu_first", [False, True])
def test_extra_levels_read_the_configured_source(source: str, relu_first: bool) -> None:
    torch.manual_seed(0)
    fpn = FPN([8, 16, 32], 8, num_outs=5, add_extra_convs=source, relu_before_extra_convs=relu_first).eval()
    feats = _c2_c5(2, [8, 16, 32], 64, 64)[:3]
    with torch.no_grad():
        outs = fpn(feats)
        c_top = feats[2]
        lateral_top = _conv(fpn.lateral_convs[2], c_top)  # the coarsest lateral gets nothing added top-down
        p_top = _conv(fpn.fpn_convs[2], lateral_top)
        src = {"on_input": c_top, "on_lateral": lateral_top, "on_output": p_top}[source]
        p_extra1 = _conv(fpn.fpn_convs[3], src)
        p_extra2 = _conv(fpn.fpn_convs[4], F.relu(p_extra1) if relu_first else p_extra1)
    torch.testing.assert_close(outs[2], p_top)
    torch.testing.assert_close(outs[3], p_extra1)
    torch.testing.assert_close(outs[4], p_extra2)


def test_maxpool_extra_level_without_extra_convs() -> None:
    fpn = FPN(R50_CHANNELS, 32, num_outs=5)  # Faster R-CNN layout: P2..P5 + P6 by subsampling
    assert len(fpn.fpn_convs) == 4
    with torch.no_grad():
        outs = fpn(_c2_c5(1, R50_CHANNELS, 99, 131))
    assert len(outs) == 5
    torch.testing.assert_close(outs[4], outs[3][:, :, ::2, ::2], rtol=0, atol=0)


def _identity_fpn(channels: int, levels: int) -> FPN:
    """An FPN whose lateral and output convs are identities, so outputs are the pure top-down sums."""
    fpn = FPN([channels] * levels, channels, num_outs=levels)
    with torch.no_grad():
        for m in [*fpn.lateral_convs, *fpn.fpn_convs]:
            w = m.conv.weight
            w.zero_()
            k = w.shape[-1] // 2
            w[:, :, k, k] = torch.eye(channels)
            m.conv.bias.zero_()
    return fpn


def test_top_down_sum_closed_form_even_sizes() -> None:
    fpn = _identity_fpn(4, 3)
    c3, c4, c5 = (torch.randn(1, 4, s, s) for s in (16, 8, 4))
    with torch.no_grad():
        p3, p4, p5 = fpn([c3, c4, c5])
    up = lambda t: t.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # noqa: E731
    torch.testing.assert_close(p5, c5)
    torch.testing.assert_close(p4, c4 + up(c5))
    torch.testing.assert_close(p3, c3 + up(c4 + up(c5)))


def test_top_down_uses_target_size_for_odd_maps() -> None:
    fpn = _identity_fpn(2, 2)
    fine, coarse = torch.randn(1, 2, 21, 11), torch.randn(1, 2, 11, 6)
    with torch.no_grad():
        p_fine, _ = fpn([fine, coarse])
    # Legacy 'nearest': output index i reads input floor(i * in / out).
    rows = (torch.arange(21) * 11 / 21).floor().long()
    cols = (torch.arange(11) * 6 / 11).floor().long()
    torch.testing.assert_close(p_fine, fine + coarse[:, :, rows][:, :, :, cols])


def test_end_level_limits_the_pyramid() -> None:
    fpn = FPN(R50_CHANNELS, 16, num_outs=2, start_level=1, end_level=2)
    assert len(fpn.lateral_convs) == 2 and fpn.lateral_convs[1].conv.in_channels == 1024
    with torch.no_grad():
        outs = fpn(_c2_c5(1, R50_CHANNELS, 64, 64))
    assert [o.shape[-1] for o in outs] == [8, 4]
    with pytest.raises(ConfigError, match="num_outs"):
        FPN(R50_CHANNELS, 16, num_outs=3, start_level=1, end_level=2)


def test_norm_cfg_and_no_norm_on_lateral() -> None:
    gn = {"type": "GN", "num_groups": 8}
    fpn = FPN(
        R50_CHANNELS, 32, num_outs=5, start_level=1, add_extra_convs="on_output", norm_cfg=gn, no_norm_on_lateral=True
    )
    keys = set(fpn.state_dict())
    assert "fpn_convs.0.gn.weight" in keys and "fpn_convs.0.conv.bias" not in keys
    assert "lateral_convs.0.conv.bias" in keys and "lateral_convs.0.gn.weight" not in keys


def test_default_init_is_xavier_uniform_with_zero_bias() -> None:
    torch.manual_seed(0)
    fpn = FPN(R50_CHANNELS, 256, num_outs=5, start_level=1, add_extra_convs="on_input")
    w = fpn.fpn_convs[3].conv.weight
    bound = math.sqrt(6.0 / (2048 * 9 + 256 * 9))  # Glorot & Bengio 2010, uniform(-a, a)
    assert w.abs().max() <= bound
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.02
    assert all(torch.count_nonzero(m.conv.bias) == 0 for m in [*fpn.lateral_convs, *fpn.fpn_convs])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"add_extra_convs": "on_top"},
        {"num_outs": 2},  # fewer outputs than used inputs
        {"start_level": 4},
        {"init_cfg": {"type": "Kaiming"}},
    ],
)
def test_bad_config_raises(kwargs: dict) -> None:
    args = {"in_channels": R50_CHANNELS, "out_channels": 8, "num_outs": 5, **kwargs}
    with pytest.raises(ConfigError):
        FPN(**args)


def test_wrong_number_of_inputs() -> None:
    fpn = FPN(R50_CHANNELS, 8, num_outs=5, start_level=1, add_extra_convs="on_input")
    with pytest.raises(ValueError, match="expects 4"):
        fpn(_c2_c5(1, R50_CHANNELS, 64, 64)[1:])


def test_registry_build() -> None:
    fpn = NECKS.build({"type": "FPN", "in_channels": [8, 16], "out_channels": 8, "num_outs": 3})
    assert isinstance(fpn, FPN) and len(fpn.fpn_convs) == 2


# ----------------------------------------------------------------------------------------------- building blocks


def test_conv_module_gn_naming_and_auto_bias() -> None:
    m = ConvModule(4, 8, 3, padding=1, norm_cfg={"type": "GN", "num_groups": 2})
    assert set(m.state_dict()) == {"conv.weight", "gn.weight", "gn.bias"}
    assert m.conv.bias is None and m.norm is m.gn
    assert set(ConvModule(4, 8, 1).state_dict()) == {"conv.weight", "conv.bias"}
    assert ConvModule(4, 8, 1, norm_cfg={"type": "BN"}, bias=True).conv.bias is not None
    assert {"bn.running_mean", "bn.weight"} <= set(ConvModule(4, 8, 1, norm_cfg={"type": "BN"}).state_dict())


def test_conv_module_order_is_conv_norm_act() -> None:
    torch.manual_seed(0)
    m = ConvModule(3, 6, 3, stride=2, padding=1, norm_cfg={"type": "GN", "num_groups": 3}).eval()
    with torch.no_grad():
        m.gn.weight.uniform_(0.5, 2.0)
        m.gn.bias.uniform_(-1.0, 1.0)
        x = torch.randn(2, 3, 9, 9)
        expected = F.relu(F.group_norm(F.conv2d(x, m.conv.weight, None, 2, 1), 3, m.gn.weight, m.gn.bias))
        torch.testing.assert_close(m(x), expected)
    plain = ConvModule(3, 6, 3, act_cfg=None)
    assert not hasattr(plain, "activate")
    with torch.no_grad():
        assert (plain(torch.randn(1, 3, 5, 5)) < 0).any()


def test_conv_module_inplace_flag_and_leaky_relu() -> None:
    assert ConvModule(2, 2, 1).activate.inplace
    leaky = ConvModule(2, 2, 1, act_cfg={"type": "LeakyReLU", "negative_slope": 0.2}, inplace=False)
    assert isinstance(leaky.activate, nn.LeakyReLU) and not leaky.activate.inplace
    assert leaky.activate.negative_slope == 0.2
    with pytest.raises(ConfigError, match="Swoosh"):
        ConvModule(2, 2, 1, act_cfg={"type": "Swoosh"})


def test_build_norm_layer() -> None:
    name, bn = build_norm_layer({"type": "BN", "requires_grad": False}, 16, postfix=1)
    assert name == "bn1" and isinstance(bn, nn.BatchNorm2d) and bn.num_features == 16
    assert not any(p.requires_grad for p in bn.parameters())
    name, sync = build_norm_layer({"type": "SyncBN"}, 8)
    assert name == "bn" and isinstance(sync, nn.SyncBatchNorm)
    name, gn = build_norm_layer({"type": "GN", "num_groups": 4, "eps": 1e-6}, 8, postfix=2)
    assert name == "gn2" and gn.num_groups == 4 and gn.eps == 1e-6 and gn.weight.requires_grad
    with pytest.raises(ConfigError, match="num_groups"):
        build_norm_layer({"type": "GN"}, 8)
    with pytest.raises(ConfigError, match="unknown norm type"):
        build_norm_layer({"type": "FrozenBN"}, 8)


def test_scale() -> None:
    s = Scale(2.5)
    assert [n for n, _ in s.named_parameters()] == ["scale"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(s(x), 2.5 * x)
    s(x).sum().backward()
    torch.testing.assert_close(s.scale.grad, x.sum())
