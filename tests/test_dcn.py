"""Deformable conv v1/v2 wrappers: reduction to plain conv, offset/mask layout, zero init, registration, DCN stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densedet.models.backbones.resnet import ResNet
from densedet.models.dcn import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2d, ModulatedDeformConv2dPack
from densedet.models.layers import CONV_LAYERS, ConvModule, build_conv_layer
from densedet.registry import ConfigError

GEOMETRIES = [
    {"stride": 1, "padding": 1, "dilation": 1, "groups": 1},
    {"stride": 2, "padding": 2, "dilation": 2, "groups": 2},
    {"stride": 2, "padding": 0, "dilation": 1, "groups": 4},
]


def _conv(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
    """The plain convolution with the deformable layer's weight and geometry."""
    return F.conv2d(
        x, layer.weight if weight is None else weight, layer.bias if bias else None, stride=layer.stride,
        padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
    )


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [False, True])
def test_v1_pack_starts_as_the_plain_conv(geometry: dict, bias: bool) -> None:
    torch.manual_seed(0)
    layer = DeformConv2dPack(8, 12, 3, bias=bias, deform_groups=2, **geometry)
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randn(2, 8, 11, 14)
    torch.testing.assert_close(layer(x), _conv(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_v2_pack_zero_init_is_half_the_conv_and_saturated_mask_is_the_conv(geometry: dict) -> None:
    torch.manual_seed(0)
    layer = ModulatedDeformConv2dPack(8, 12, 3, deform_groups=2, **geometry)
    nn.init.normal_(layer.bias)
    x = torch.randn(2, 8, 11, 14)
    # Zero-initialised conv_offset: zero offsets, mask sigmoid(0) = 0.5 scaling the sampled input (not the bias).
    assert torch.count_nonzero(layer.conv_offset.weight) == 0 and torch.count_nonzero(layer.conv_offset.bias) == 0
    torch.testing.assert_close(layer(x), 0.5 * _conv(layer, x, bias=False) + layer.bias.view(1, -1, 1, 1),
                               rtol=1e-5, atol=1e-5)
    # Unit mask: large mask logits (last third of conv_offset's channels) -> sigmoid == 1 in float32.
    with torch.no_grad():
        layer.conv_offset.bias[2 * 2 * 9:] = 40.0
    torch.testing.assert_close(layer(x), _conv(layer, x), rtol=1e-5, atol=1e-5)


def test_v2_explicit_unit_mask_and_zero_offset_equals_conv() -> None:
    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(6, 4, 3, padding=1, deform_groups=3)
    x = torch.randn(1, 6, 9, 7)
    offset = torch.zeros(1, 2 * 3 * 9, 9, 7)
    mask = torch.ones(1, 3 * 9, 9, 7)
    torch.testing.assert_close(layer(x, offset, mask), _conv(layer, x), rtol=1e-5, atol=1e-5)


def _conv_shifted(layer: nn.Module, x: torch.Tensor, dx: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The plain conv sampling every tap ``dx`` in {0, 0.5, 1} pixels to the right: pad first (the image is zero
    outside), then shift the padded input left with zero fill and convolve without padding. ``dx = 0.5`` averages
    the two neighbours (bilinear)."""
    p = layer.padding[0]
    xp = F.pad(x, (p, p, p, p))
    shifted = F.pad(xp[..., 1:], (0, 1))
    src = {0.0: xp, 1.0: shifted, 0.5: 0.5 * (xp + shifted)}[dx]
    w = layer.weight if weight is None else weight
    return F.conv2d(src, w, None, stride=layer.stride, dilation=layer.dilation, groups=layer.groups)


def test_integer_and_fractional_offsets_sample_shifted_input() -> None:
    torch.manual_seed(0)
    layer = DeformConv2d(4, 5, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 8, 10)
    offset = torch.zeros(2, 18, 8, 10)
    offset[:, 1::2] = 1.0  # dx = +1 for every kernel point (channels 2k+1), dy = 0
    torch.testing.assert_close(layer(x, offset), _conv_shifted(layer, x, 1.0), rtol=1e-5, atol=1e-5)
    # Bilinear sampling half-way between two pixels averages them.
    offset[:, 1::2] = 0.5
    torch.testing.assert_close(layer(x, offset), _conv_shifted(layer, x, 0.5), rtol=1e-5, atol=1e-5)


def test_offset_and_mask_channel_layout_per_kernel_point() -> None:
    """Channel 2k is dy, 2k+1 is dx of kernel point k (row-major); mask channel k scales point k (mmcv layout)."""
    torch.manual_seed(0)
    layer = ModulatedDeformConv2d(3, 2, 3, padding=1, bias=False)
    x = torch.randn(1, 3, 7, 9)
    center = 4  # kernel point (1, 1)
    offset = torch.zeros(1, 18, 7, 9)
    offset[:, 2 * center + 1] = 1.0  # move only the centre tap one pixel right
    mask = torch.rand(9).view(1, 9, 1, 1).expand(1, 9, 7, 9).contiguous()
    w_mask = layer.weight * mask[0, :, 0, 0].view(1, 1, 3, 3)
    w_other = w_mask.clone()
    w_other[:, :, 1, 1] = 0
    w_center = w_mask - w_other
    expected = _conv(layer, x, w_other, bias=False) + _conv_shifted(layer, x, 1.0, w_center)
    torch.testing.assert_close(layer(x, offset, mask), expected, rtol=1e-5, atol=1e-5)


def test_v2_pack_uses_mmcv_chunk_split() -> None:
    """mmcv: ``o1, o2, m = chunk(conv_offset(x), 3); offset = cat(o1, o2); mask = sigmoid(m)``."""
    torch.manual_seed(0)
    layer = ModulatedDeformConv2dPack(4, 4, 3, padding=1, deform_groups=2)
    nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(1, 4, 8, 8)
    o1, o2, m = torch.chunk(layer.conv_offset(x), 3, dim=1)
    plain = ModulatedDeformConv2d(4, 4, 3, padding=1, deform_groups=2)
    plain.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    torch.testing.assert_close(layer(x), plain(x, torch.cat((o1, o2), 1), m.sigmoid()))
    assert not torch.allclose(layer(x), _conv(layer, x))  # the offsets really deform


def test_gradients_reach_weight_and_conv_offset() -> None:
    torch.manual_seed(0)
    for layer in (DeformConv2dPack(4, 4, 3, padding=1), ModulatedDeformConv2dPack(4, 4, 3, padding=1)):
        layer(torch.randn(2, 4, 6, 6)).square().sum().backward()
        assert layer.weight.grad.abs().sum() > 0
        assert layer.conv_offset.weight.grad.abs().sum() > 0, type(layer).__name__


def test_state_dict_names_and_shapes() -> None:
    v2 = ModulatedDeformConv2dPack(16, 32, 3, padding=1, bias=False, deform_groups=2, groups=4)
    assert {k: tuple(v.shape) for k, v in v2.state_dict().items()} == {
        "weight": (32, 4, 3, 3),
        "conv_offset.weight": (2 * 3 * 9, 16, 3, 3),
        "conv_offset.bias": (2 * 3 * 9,),
    }
    v1 = DeformConv2dPack(16, 32, 3, padding=1, deform_groups=4)
    assert {k: tuple(v.shape) for k, v in v1.state_dict().items()} == {
        "weight": (32, 16, 3, 3),
        "conv_offset.weight": (4 * 2 * 9, 16, 3, 3),
        "conv_offset.bias": (4 * 2 * 9,),
    }
    assert "bias" in ModulatedDeformConv2dPack(4, 4, 3).state_dict()  # mmcv's v2 default: bias=True


def test_legacy_conv_offset_mask_keys_load() -> None:
    src = ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    nn.init.normal_(src.conv_offset.weight)
    state = {k.replace("conv_offset.", "conv_offset_mask."): v for k, v in src.state_dict().items()}
    dst = ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    dst.load_state_dict(state, strict=True)
    torch.testing.assert_close(dst.conv_offset.weight, src.conv_offset.weight)


def test_registered_conv_types_build_through_conv_module() -> None:
    assert CONV_LAYERS["DCN"] is DeformConv2dPack and CONV_LAYERS["DCNv2"] is ModulatedDeformConv2dPack
    layer = build_conv_layer({"type": "DCNv2", "deform_groups": 2}, 8, 8, 3, padding=1, bias=False)
    assert isinstance(layer, ModulatedDeformConv2dPack) and layer.deform_groups == 2 and layer.bias is None
    legacy = build_conv_layer({"type": "DCN", "deformable_groups": 2}, 8, 8, 3, padding=1)
    assert legacy.deform_groups == 2
    module = ConvModule(8, 8, 3, padding=1, conv_cfg={"type": "DCNv2"}, norm_cfg={"type": "BN"})
    # ConvModule's kaiming pass skips convs with their own init, so conv_offset stays zero.
    assert torch.count_nonzero(module.conv.conv_offset.weight) == 0
    assert module(torch.randn(2, 8, 5, 5)).shape == (2, 8, 5, 5)


@pytest.mark.parametrize(
    "kwargs",
    [{"in_channels": 6, "deform_groups": 4}, {"in_channels": 6, "groups": 4}, {"in_channels": 8, "bias": "auto"}],
)
def test_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        ModulatedDeformConv2dPack(out_channels=8, kernel_size=3, **kwargs)


def test_meta_device_construction() -> None:
    with torch.device("meta"):
        layer = ModulatedDeformConv2dPack(256, 256, 3, padding=1)
    assert layer.weight.is_meta


# ------------------------------------------------------------------------------------------- DCN stages in ResNet


def _tiny_resnet(**kwargs) -> ResNet:
    return ResNet(50, base_channels=8, stem_channels=8, **kwargs)


def test_resnet_mdconv_c3_c5_names_init_and_equivalence() -> None:
    torch.manual_seed(0)
    dcn = {"type": "DCNv2", "deform_groups": 1, "fallback_on_stride": False}
    model = _tiny_resnet(dcn=dcn, stage_with_dcn=(False, True, True, True), zero_init_residual=False).eval()
    keys = set(model.state_dict())
    # The layout of mmdet's *_mdconv_c3-c5 checkpoints.
    assert {"layer2.0.conv2.weight", "layer2.0.conv2.conv_offset.weight", "layer2.0.conv2.conv_offset.bias",
            "layer4.2.conv2.conv_offset.weight"} <= keys
    assert "layer1.0.conv2.conv_offset.weight" not in keys and "layer2.0.conv2.bias" not in keys
    assert isinstance(model.layer1[0].conv2, nn.Conv2d) and isinstance(model.layer3[5].conv2, ModulatedDeformConv2dPack)
    assert model.layer2[0].conv2.stride == (2, 2)  # fallback_on_stride=False: the strided conv is deformable too
    # ResNet's generic kaiming pass must not leave conv_offset non-zero.
    offsets = [m.conv_offset for m in model.modules() if isinstance(m, ModulatedDeformConv2dPack)]
    assert len(offsets) == 4 + 6 + 3 and all(torch.count_nonzero(c.weight) == 0 for c in offsets)

    # With saturated masks the DCN backbone computes exactly the plain backbone with the same weights.
    plain = _tiny_resnet(zero_init_residual=False).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "conv_offset" not in k}, strict=True)
    with torch.no_grad():
        for c in offsets:
            c.bias.fill_(40.0)  # offsets would be 40 px too; zero them, keep the mask logits large
            c.bias[: 2 * 9] = 0.0
    x = torch.randn(2, 3, 45, 61)
    with torch.no_grad():
        for a, b in zip(model(x), plain(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_resnet_dcn_v1_fallback_on_stride() -> None:
    model = _tiny_resnet(dcn={"type": "DCN", "fallback_on_stride": True}, stage_with_dcn=(False, True, True, True))
    assert type(model.layer2[0].conv2) is nn.Conv2d  # strided block falls back
    assert isinstance(model.layer2[1].conv2, DeformConv2dPack)
    assert model.layer2[1].conv2.conv_offset.out_channels == 18


@pytest.mark.parametrize("geo", [
    {"c": 8, "cout": 6, "stride": 1, "pad": 1, "dil": 1, "groups": 1, "dg": 1, "k": 3, "mask": True},
    {"c": 8, "cout": 4, "stride": 2, "pad": 1, "dil": 1, "groups": 2, "dg": 4, "k": 3, "mask": True},
    {"c": 6, "cout": 6, "stride": 1, "pad": 2, "dil": 2, "groups": 3, "dg": 1, "k": 3, "mask": False},
    {"c": 4, "cout": 5, "stride": 1, "pad": 0, "dil": 1, "groups": 1, "dg": 2, "k": 1, "mask": False},
])
def test_sampled_implementation_equals_torchvision(geo: dict) -> None:
    """The CPU path (grid_sample + matmul) is the same operator as torchvision's kernel, values and gradients,
    with offsets large enough to sample outside the image (zero padding of out-of-image corners)."""
    from torchvision.ops import deform_conv2d

    from densedet.models.dcn import deform_conv2d_sampled

    g = torch.Generator().manual_seed(7)
    k, h, w = geo["k"], 9, 7
    x = torch.randn(2, geo["c"], h, w, generator=g, dtype=torch.float64, requires_grad=True)
    ho = (h + 2 * geo["pad"] - geo["dil"] * (k - 1) - 1) // geo["stride"] + 1
    wo = (w + 2 * geo["pad"] - geo["dil"] * (k - 1) - 1) // geo["stride"] + 1
    off = (3 * torch.randn(2, 2 * geo["dg"] * k * k, ho, wo, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.rand(2, geo["dg"] * k * k, ho, wo, generator=g, dtype=torch.float64).requires_grad_() \
        if geo["mask"] else None
    weight = torch.randn(geo["cout"], geo["c"] // geo["groups"], k, k, generator=g, dtype=torch.float64,
                         requires_grad=True)
    bias = torch.randn(geo["cout"], generator=g, dtype=torch.float64, requires_grad=True)
    kw = {"stride": (geo["stride"],) * 2, "padding": (geo["pad"],) * 2, "dilation": (geo["dil"],) * 2, "mask": mask}
    ref = deform_conv2d(x, off, weight, bias, **kw)
    got = deform_conv2d_sampled(x, off, weight, bias, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    inputs = [x, off, weight, bias] + ([mask] if mask is not None else [])
    cot = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ref, inputs, cot), torch.autograd.grad(got, inputs, cot)):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-7)


def test_layers_use_the_selected_implementation(monkeypatch) -> None:
    from densedet.models import dcn

    layer = dcn.ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    nn.init.normal_(layer.conv_offset.weight, std=0.3)
    x = torch.randn(1, 4, 6, 6)
    monkeypatch.setattr(dcn, "DCN_IMPL", "torchvision")
    a = layer(x)
    monkeypatch.setattr(dcn, "DCN_IMPL", "sampled")
    torch.testing.assert_close(layer(x), a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads,mask", [(3, True), (2, False)])
def test_single_image_chunked_sampling_equals_torchvision(threads: int, mask: bool) -> None:
    """One image and one deform group (inference) is sampled as ``threads`` chunks of an expanded input so that
    grid_sample uses every thread; values and gradients stay torchvision's (3 chunks do not divide the 8 x 7 = 56
    output locations: the padded points are cut off)."""
    from torchvision.ops import deform_conv2d

    from densedet.models import dcn

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 8, 7, generator=g, dtype=torch.float64, requires_grad=True)
    off = (3 * torch.randn(1, 18, 8, 7, generator=g, dtype=torch.float64)).requires_grad_()
    m = torch.rand(1, 9, 8, 7, generator=g, dtype=torch.float64).requires_grad_() if mask else None
    weight = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)  # 2 conv groups
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    kw = {"padding": (1, 1), "mask": m}
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert dcn._sampling_chunks(x, 1) == threads
        got = dcn.deform_conv2d_sampled(x, off, weight, bias, **kw)
        inputs = [x, off, weight, bias] + ([m] if m is not None else [])
        cot = torch.randn(got.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad(got, inputs, cot)
    finally:
        torch.set_num_threads(old)
    ref = deform_conv2d(x, off, weight, bias, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(torch.autograd.grad(ref, inputs, cot), grads):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-7)


def test_bf16_autocast_keeps_sampling_positions_in_float32() -> None:
    """Under bf16 autocast the offsets come in bf16; the positions must still be computed in float32 (bf16 cannot
    hold a column index of 300 plus a fraction): the result stays within bf16 matmul rounding of fp32."""
    from densedet.models.dcn import deform_conv2d_sampled

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 8, 4, 320, generator=g)
    off = torch.rand(1, 18, 4, 320, generator=g) * 0.9  # sub-pixel offsets, sampled along a wide row
    weight = torch.randn(8, 8, 3, 3, generator=g)
    ref = deform_conv2d_sampled(x, off, weight, padding=(1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = deform_conv2d_sampled(x.bfloat16(), off.bfloat16(), weight, padding=(1, 1))
    # bf16 offsets themselves are rounded (|off| < 1: ~0.004 px); bf16 positions (~1 px at 300) would be far off
    err = float((got.float() - ref).abs().max() / ref.abs().max())
    assert err < 0.03, err
