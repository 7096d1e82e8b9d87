"""Res2Net backbone (mmdet layout): shapes, keys, equality with timm's Res2Net-D, parameter counts, DCN, freezing."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from densedet.models.backbones.res2net import Bottle2neck, Res2Net
from densedet.models.dcn import DeformConv2dPack
from densedet.registry import BACKBONES, ConfigError
from densedet.weights.sources import OPEN_MMLAB_URLS

H, W = 333, 517
# timm / official Res2Net stem names -> mmdet's deep-stem names (conv1.{0,1,3,4,6} + bn1 -> stem.{0,1,3,4,6,7}).
STEM_MAP = {"conv1.0": "stem.0", "conv1.1": "stem.1", "conv1.3": "stem.3", "conv1.4": "stem.4", "conv1.6": "stem.6",
            "bn1": "stem.7"}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
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


def _timm_to_mmdet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith("fc."):
            continue
        head, _, tail = k.rpartition(".")
        out[f"{STEM_MAP[head]}.{tail}" if head in STEM_MAP else k] = v
    return out


def _timm_stages(tm: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = tm.maxpool(tm.act1(tm.bn1(tm.conv1(x))))
    outs = []
    for layer in (tm.layer1, tm.layer2, tm.layer3, tm.layer4):
        x = layer(x)
        outs.append(x)
    return outs


def test_output_strides_and_channels_at_odd_size() -> None:
    model = Res2Net(50).eval()
    assert model.out_channels == [256, 512, 1024, 2048]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, H, W))
    for out, c, s in zip(outs, (256, 512, 1024, 2048), (4, 8, 16, 32), strict=True):
        assert tuple(out.shape) == (1, c, math.ceil(H / s), math.ceil(W / s))


def test_mmdet_key_layout_and_widths() -> None:
    with torch.device("meta"):
        model = Res2Net(101, scales=4, base_width=26)
    keys = set(model.state_dict())
    assert {"stem.0.weight", "stem.7.running_var", "layer1.0.convs.2.weight", "layer1.0.bns.2.bias",
            "layer1.0.downsample.1.weight", "layer1.0.downsample.2.weight", "layer3.22.conv3.weight"} <= keys
    assert not any(".conv2." in k or ".bn2." in k or k.startswith("conv1.") for k in keys)
    for i, width in enumerate((26, 52, 104, 208)):  # floor(planes * 26 / 64) for planes 64..512
        block = getattr(model, f"layer{i + 1}")[0]
        assert isinstance(block, Bottle2neck) and block.width == width and block.conv1.out_channels == 4 * width
        assert len(block.convs) == 3 and block.convs[0].in_channels == width
        assert block.stage_type == "stage" and getattr(model, f"layer{i + 1}")[1].stage_type == "normal"
    # mmdet pools the last split only in strided 'stage' blocks.
    assert not hasattr(model.layer1[0], "pool") and model.layer2[0].pool.stride == 2
    assert isinstance(model.layer2[0].downsample[0], nn.AvgPool2d) and model.layer2[0].downsample[1].stride == (1, 1)


def test_forward_equals_timm_res2net50d_with_mmdet_layer1_pooling() -> None:
    """timm's res2net50d is the same network except that it also average-pools (3x3, stride 1) the last split of
    layer1's first block, as the official code does; mmdet skips that pool. Remove it and the outputs match."""
    tm = _randomize(timm.create_model("res2net50d", pretrained=False)).eval()
    ours = Res2Net(50).eval()
    ours.load_state_dict(_timm_to_mmdet(tm.state_dict()), strict=True)
    x = torch.randn(2, 3, 67, 45)
    with torch.no_grad():
        official = _timm_stages(tm, x)
        assert not torch.allclose(ours(x)[0], official[0], atol=1e-3)  # the documented difference is real
        tm.layer1[0].pool = None
        for a, b in zip(ours(x), _timm_stages(tm, x), strict=True):
            torch.testing.assert_close(a, b)


def test_parameter_count_matches_published() -> None:
    """Res2Net-101 26w x 4s: 45.21 M with the 1000-class fc and the 7x7 stem (timm res2net101_26w_4s model card /
    Res2Net-PretrainedModels). mmdet's R2-101 is the ResNet-D variant (deep stem + avg-pool shortcut, timm
    ``res2net101d``): the deep stem adds 3*32*9 + 32*32*9 + 32*64*9 conv weights and 2*(32+32) BN parameters in
    place of the 3*64*49 7x7 conv, i.e. +19,232 parameters; avg-pool shortcuts add none."""
    with torch.device("meta"):
        ours = Res2Net(101, scales=4, base_width=26)
        ref_d = timm.create_model("res2net101d", pretrained=False)
        ref_7x7 = timm.create_model("res2net101_26w_4s", pretrained=False)
    fc = 2048 * 1000 + 1000
    n = sum(p.numel() for p in ours.parameters()) + fc
    assert n == sum(p.numel() for p in ref_d.parameters())
    deep_minus_7x7 = (3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9) + 2 * (32 + 32) - 3 * 64 * 49
    assert n - deep_minus_7x7 == sum(p.numel() for p in ref_7x7.parameters())
    assert round((n - deep_minus_7x7) / 1e6, 2) == 45.21


def test_dcn_makes_every_split_conv_deformable() -> None:
    dcn = {"type": "DCN", "deform_groups": 1, "fallback_on_stride": False}
    with torch.device("meta"):
        model = Res2Net(101, dcn=dcn, stage_with_dcn=(False, True, True, True))
    keys = set(model.state_dict())
    assert {"layer2.0.convs.0.conv_offset.weight", "layer4.2.convs.2.conv_offset.bias"} <= keys
    assert not any(k.startswith("layer1.") and "conv_offset" in k for k in keys)
    assert all(isinstance(c, DeformConv2dPack) for c in model.layer3[4].convs)


def test_dcn_tiny_forward_and_zero_offsets() -> None:
    torch.manual_seed(0)
    model = Res2Net(50, base_channels=16, stem_channels=16, base_width=8, dcn={"type": "DCNv2"},
                    stage_with_dcn=(False, False, True, True)).eval()
    assert all(torch.count_nonzero(c.conv_offset.weight) == 0 for b in model.layer3 for c in b.convs)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 75, 61))
    assert [tuple(o.shape[1:]) for o in outs] == [(64, 19, 16), (128, 10, 8), (256, 5, 4), (512, 3, 2)]


def test_frozen_stages_and_norm_eval_survive_an_optimizer_step() -> None:
    torch.manual_seed(0)
    model = Res2Net(50, base_channels=16, stem_channels=16, base_width=8, frozen_stages=1,
                    zero_init_residual=False).train()
    frozen_prefixes = ("stem", "layer1")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(frozen_prefixes)}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen_prefixes)), name
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.layer2[1].convs[1].weight.detach().clone()
    sum(o.mean() for o in model(torch.randn(2, 3, 64, 64))).backward()
    opt.step()
    state = model.state_dict()
    for k, v in {**frozen, **stats}.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(model.layer2[1].convs[1].weight, before)


def test_zero_init_residual_and_registry() -> None:
    model = BACKBONES.build({"type": "Res2Net", "depth": 50, "base_channels": 16, "stem_channels": 16,
                             "base_width": 8, "out_indices": (1, 2, 3)})
    assert isinstance(model, Res2Net) and model.out_channels == [128, 256, 512]
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in model.layer1)
    assert "arch_settings" not in vars(model) and model.block is Bottle2neck
    with pytest.raises(ConfigError, match="did you mean 'frozen_stages'"):
        BACKBONES.build({"type": "Res2Net", "depth": 50, "frozen_stage": 1}, where="model.backbone")
    assert OPEN_MMLAB_URLS["res2net101_v1d_26w_4s"].endswith(".pth")


@pytest.mark.parametrize(
    "kwargs",
    [{"depth": 34}, {"depth": 50, "scales": 1}, {"depth": 50, "deep_stem": False}, {"depth": 50, "avg_down": False},
     {"depth": 50, "style": "caffe"}, {"depth": 50, "stem_channels": 256}],
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        Res2Net(**kwargs)


@pytest.fixture(scope="module")
def timm_state() -> dict[str, torch.Tensor]:
    return _randomize(timm.create_model("res2net50d", pretrained=False), seed=5).state_dict()


def _assert_loaded(model: Res2Net, mmdet_state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(mmdet_state) == set(own)
    for k, v in mmdet_state.items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("layout", ["official", "mmdet", "detector"])
def test_pretrained_local_file_maps_every_key(tmp_path, timm_state, recwarn, layout: str) -> None:
    """Official Res2Net / timm files (``conv1.0`` stem, ``fc``), mmdet-layout files and whole detector checkpoints."""
    mmdet_state = _timm_to_mmdet(timm_state)
    saved = {"official": dict(timm_state), "mmdet": mmdet_state,
             "detector": {"state_dict": {f"backbone.{k}": v for k, v in mmdet_state.items()}}}[layout]
    path = tmp_path / f"{layout}.pth"
    torch.save(saved, path)
    model = Res2Net(50, pretrained=str(path))
    model.init_weights()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    _assert_loaded(model, mmdet_state)


def test_pretrained_official_layout_reports_problems(tmp_path, timm_state) -> None:
    state = {k: v for k, v in timm_state.items() if not k.startswith("layer4.2.")}
    state["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    state["head.extra"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.warns(UserWarning, match=r"missing keys \[.*layer4\.2\.conv1\.weight") as record:
        Res2Net(50, pretrained=str(path)).init_weights()
    message = str(record[0].message)
    assert "head.extra" in message and "layer1.0.conv1.weight" in message and "fc.weight" not in message


def test_with_cp_gives_same_gradients() -> None:
    torch.manual_seed(0)
    kwargs = {"base_channels": 16, "stem_channels": 16, "base_width": 8, "dcn": {"type": "DCNv2"},
              "stage_with_dcn": (False, False, False, True)}
    plain = _randomize(Res2Net(50, **kwargs)).train()
    ckpt = _randomize(Res2Net(50, with_cp=True, **kwargs)).train()
    x = torch.randn(2, 3, 48, 48)
    sum(o.square().mean() for o in plain(x)).backward()
    sum(o.square().mean() for o in ckpt(x)).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=n)
    assert plain.layer4[0].convs[0].conv_offset.weight.grad.abs().sum() > 0
