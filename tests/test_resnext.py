"""ResNeXt backbone: torchvision/timm equivalence, widths, parameter counts, DCN stages, freezing, loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from densedet.models.backbones.resnext import Bottleneck, ResNeXt
from densedet.models.dcn import ModulatedDeformConv2dPack
from densedet.registry import BACKBONES, ConfigError
from densedet.weights.sources import OPEN_MMLAB_URLS

H, W = 333, 517


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values for every parameter and BN buffer, so a mix-up of keys cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.2))
    return model


def _tv_stages(tv: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    outs = []
    for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
        x = layer(x)
        outs.append(x)
    return outs


def _tiny(**kwargs) -> ResNeXt:
    """ResNeXt-50 at 1/4 width: planes 16..128, 4 groups of width 4 (16 channels) in layer1."""
    return ResNeXt(50, groups=4, base_width=4, base_channels=16, stem_channels=16, **kwargs)


def test_output_strides_and_channels_at_odd_size() -> None:
    model = ResNeXt(50, groups=32, base_width=4).eval()
    assert model.out_channels == [256, 512, 1024, 2048]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, H, W))
    for out, c, s in zip(outs, (256, 512, 1024, 2048), (4, 8, 16, 32), strict=True):
        assert tuple(out.shape) == (1, c, math.ceil(H / s), math.ceil(W / s))


@pytest.mark.parametrize(("groups", "widths"), [(32, (128, 256, 512, 1024)), (64, (256, 512, 1024, 2048))])
def test_grouped_widths(groups: int, widths: tuple[int, ...]) -> None:
    # width = floor(planes * base_width / 64) * groups with planes 64, 128, 256, 512 (Xie et al. 2017, Table 1).
    with torch.device("meta"):
        model = ResNeXt(101, groups=groups, base_width=4)
    for i, width in enumerate(widths):
        block = getattr(model, f"layer{i + 1}")[1]
        assert isinstance(block, Bottleneck)
        assert block.conv1.out_channels == width and block.conv2.groups == groups
        assert tuple(block.conv2.weight.shape) == (width, width // groups, 3, 3)
        assert block.conv3.out_channels == 256 * 2**i


def test_groups_one_is_a_plain_resnet_bottleneck() -> None:
    model = ResNeXt(50, groups=1, base_width=4, base_channels=16, stem_channels=16)
    assert model.layer2[0].conv2.out_channels == 32 and model.layer2[0].conv2.groups == 1


def test_state_dict_and_forward_equal_torchvision_resnext50() -> None:
    tv = _randomize(torchvision.models.resnext50_32x4d(weights=None)).eval()
    ours = ResNeXt(50, groups=32, base_width=4).eval()
    theirs = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    ours.load_state_dict(theirs, strict=True)
    x = torch.randn(2, 3, 67, 45)
    with torch.no_grad():
        for a, b in zip(ours(x), _tv_stages(tv, x), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("groups", "timm_name", "published_m"),
    # Published: timm model cards / results tables: resnext101_32x4d 44.18 M; torchvision ResNeXt101_64X4D_Weights
    # docs (num_params 83,455,272) and timm resnext101_64x4d 83.46 M. Both include the 1000-class fc.
    [(32, "resnext101_32x4d", 44.18), (64, "resnext101_64x4d", 83.46)],
)
def test_parameter_counts_match_published(groups: int, timm_name: str, published_m: float) -> None:
    with torch.device("meta"):
        ours = ResNeXt(101, groups=groups, base_width=4)
        ref = timm.create_model(timm_name, pretrained=False)
    fc = 2048 * 1000 + 1000
    n = sum(p.numel() for p in ours.parameters()) + fc
    assert n == sum(p.numel() for p in ref.parameters())
    assert round(n / 1e6, 2) == published_m


def test_caffe_style_puts_stride_on_conv1() -> None:
    model = _tiny(style="caffe").eval()
    assert model.layer3[0].conv1.stride == (2, 2) and model.layer3[0].conv2.stride == (1, 1)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 65, 65))
    assert [o.shape[-1] for o in outs] == [17, 9, 5, 3]


def test_dcn_stages_keep_groups_and_mmdet_names() -> None:
    dcn = {"type": "DCNv2", "deform_groups": 1, "fallback_on_stride": False}
    with torch.device("meta"):
        model = ResNeXt(101, groups=32, base_width=4, dcn=dcn, stage_with_dcn=(False, True, True, True))
    keys = set(model.state_dict())
    assert {"layer2.0.conv2.weight", "layer2.0.conv2.conv_offset.weight", "layer4.2.conv2.conv_offset.bias"} <= keys
    assert not any(k.startswith("layer1.") and "conv_offset" in k for k in keys)
    conv2 = model.layer3[7].conv2
    assert isinstance(conv2, ModulatedDeformConv2dPack) and conv2.groups == 32
    assert tuple(conv2.weight.shape) == (512, 16, 3, 3) and tuple(conv2.conv_offset.weight.shape) == (27, 512, 3, 3)


def test_dcn_stage_runs_and_starts_as_half_modulated_conv() -> None:
    torch.manual_seed(0)
    dcn = {"type": "DCNv2", "deform_groups": 1}
    model = _tiny(dcn=dcn, stage_with_dcn=(False, False, False, True)).eval()
    assert all(torch.count_nonzero(b.conv2.conv_offset.weight) == 0 for b in model.layer4)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 70, 50))
    assert tuple(outs[-1].shape) == (1, 512, 3, 2)


def test_frozen_stages_and_norm_eval_survive_an_optimizer_step() -> None:
    torch.manual_seed(0)
    model = _tiny(frozen_stages=2, norm_eval=True, zero_init_residual=False).train()
    frozen_prefixes = ("conv1", "bn1", "layer1", "layer2")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(frozen_prefixes)}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen_prefixes)), name
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    before = model.layer3[0].conv2.weight.detach().clone()
    sum(o.mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    state = model.state_dict()
    for k, v in {**frozen, **stats}.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(model.layer3[0].conv2.weight, before)


def test_zero_init_residual_zeroes_bn3() -> None:
    model = _tiny()
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in model.layer2)
    assert torch.count_nonzero(model.layer2[0].bn2.weight) == model.layer2[0].bn2.num_features


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_pretrained_local_file_maps_every_key(tmp_path: Path, recwarn, source: str) -> None:
    if source == "torchvision":
        net = torchvision.models.resnext50_32x4d(weights=None)
    else:
        net = timm.create_model("resnext50_32x4d", pretrained=False)
    state = _randomize(net, seed=3).state_dict()
    path = tmp_path / "x50.pth"
    torch.save({"state_dict": state}, path)
    model = ResNeXt(50, groups=32, base_width=4, pretrained=str(path))
    model.init_weights()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]  # every key mapped (fc ignored)
    own = model.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


def test_open_mmlab_names_of_the_configs_are_known() -> None:
    for name in ("resnext101_32x4d", "resnext101_64x4d"):
        assert OPEN_MMLAB_URLS[name].startswith("https://download.openmmlab.com/pretrain/third_party/resnext101_")


def test_registry_and_bad_config() -> None:
    model = BACKBONES.build({"type": "ResNeXt", "depth": 50, "groups": 4, "base_width": 4, "base_channels": 16,
                             "stem_channels": 16, "out_indices": (2, 3)})
    assert isinstance(model, ResNeXt) and model.out_channels == [256, 512]
    assert "arch_settings" not in vars(model) and model.block is Bottleneck
    with pytest.raises(ConfigError, match="did you mean 'norm_eval'"):  # forwarded ResNet keys are checked too
        BACKBONES.build({"type": "ResNeXt", "depth": 50, "norm_evl": True}, where="model.backbone")
    for kwargs in ({"depth": 18}, {"depth": 50, "groups": 0}, {"depth": 50, "base_width": 2.5},
                   {"depth": 50, "frozen_stages": 7}):
        with pytest.raises(ConfigError):
            ResNeXt(**kwargs)
