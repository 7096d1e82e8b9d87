"""ResNet backbone: mmdet/torchvision layout, shapes, freezing, checkpoint loading, options."""

from __future__ import annotations

import copy
import math
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

from densedet.models.backbones.resnet import ResNet, ResNetV1d
from densedet.models.layers import CONV_LAYERS
from densedet.registry import BACKBONES, ConfigError

H, W = 333, 517  # odd on purpose: every stride-2 op rounds up


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN buffer non-trivial values, so a mix-up of keys cannot go unnoticed."""
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


@pytest.mark.parametrize(("depth", "channels"), [(18, [64, 128, 256, 512]), (50, [256, 512, 1024, 2048])])
def test_output_strides_and_channels(depth: int, channels: list[int]) -> None:
    model = ResNet(depth).eval()
    assert model.out_channels == channels
    with torch.no_grad():
        outs = model(torch.randn(1, 3, H, W))
    assert len(outs) == 4
    for out, c, s in zip(outs, channels, (4, 8, 16, 32), strict=True):
        assert tuple(out.shape) == (1, c, math.ceil(H / s), math.ceil(W / s))


def test_out_indices_and_num_stages_select_stages() -> None:
    model = ResNet(18, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(1, 2)).eval()
    assert model.out_channels == [128, 256]
    assert not hasattr(model, "layer4")
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 128, 8, 12), (1, 256, 4, 6)]


def test_dilated_last_stage_keeps_stride_16() -> None:
    model = ResNet(18, strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), out_indices=(3,)).eval()
    assert model.layer4[1].conv1.dilation == (2, 2) and model.layer4[1].conv1.padding == (2, 2)
    with torch.no_grad():
        (c5,) = model(torch.randn(1, 3, 64, 96))
    assert tuple(c5.shape) == (1, 512, 4, 6)


@pytest.mark.parametrize(("depth", "factory"), [(18, torchvision.models.resnet18), (50, torchvision.models.resnet50)])
def test_state_dict_equals_torchvision(depth: int, factory) -> None:
    ours = {k: tuple(v.shape) for k, v in ResNet(depth).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in factory(weights=None).state_dict().items() if not k.startswith("fc.")}
    assert ours == theirs


@pytest.mark.parametrize(("depth", "factory"), [(18, torchvision.models.resnet18), (50, torchvision.models.resnet50)])
def test_forward_equals_torchvision_with_same_weights(depth: int, factory) -> None:
    tv = _randomize(factory(weights=None)).eval()
    ours = ResNet(depth).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}, strict=True)
    x = torch.randn(2, 3, 67, 45)
    with torch.no_grad():
        for a, b in zip(ours(x), _tv_stages(tv, x), strict=True):
            torch.testing.assert_close(a, b)


def test_resnet_v1d_equals_timm_resnet18d() -> None:
    """Deep stem + avg-pool shortcut match timm's ResNet-D; only the stem keys are named differently."""
    tm = _randomize(timm.create_model("resnet18d", pretrained=False)).eval()
    ours = ResNetV1d(depth=18).eval()
    stem_map = {"conv1.0": "stem.0", "conv1.1": "stem.1", "conv1.3": "stem.3", "conv1.4": "stem.4", "conv1.6": "stem.6"}
    state = {}
    for k, v in tm.state_dict().items():
        if k.startswith("fc."):
            continue
        head, _, tail = k.rpartition(".")
        if head in stem_map:
            k = f"{stem_map[head]}.{tail}"
        elif head == "bn1":
            k = f"stem.7.{tail}"
        state[k] = v
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = tm.maxpool(tm.act1(tm.bn1(tm.conv1(x))))
        feats = []
        for layer in (tm.layer1, tm.layer2, tm.layer3, tm.layer4):
            y = layer(y)
            feats.append(y)
        for a, b in zip(ours(x), feats, strict=True):
            torch.testing.assert_close(a, b)


def test_avg_down_layout_bottleneck() -> None:
    model = ResNet(50, avg_down=True, deep_stem=True)
    keys = model.state_dict().keys()
    # mmdet puts an AvgPool (kernel 1 for stride-1 layer1) at downsample.0 so the conv/bn keys are .1/.2 everywhere.
    assert isinstance(model.layer1[0].downsample[0], nn.AvgPool2d)
    assert model.layer2[0].downsample[0].kernel_size == 2
    assert model.layer2[0].downsample[1].stride == (1, 1)
    assert {"layer1.0.downsample.1.weight", "layer1.0.downsample.2.running_mean", "stem.7.weight"} <= set(keys)
    assert "conv1.weight" not in keys


@pytest.mark.parametrize(("style", "conv1_stride", "conv2_stride"), [("pytorch", 1, 2), ("caffe", 2, 1)])
def test_style_puts_stride_on_the_right_conv(style: str, conv1_stride: int, conv2_stride: int) -> None:
    model = ResNet(50, style=style).eval()
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(model, name)[0]
        assert block.conv1.stride == (conv1_stride, conv1_stride)
        assert block.conv2.stride == (conv2_stride, conv2_stride)
        assert block.downsample[0].stride == (2, 2)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 65, 65))
    assert [o.shape[-1] for o in outs] == [17, 9, 5, 3]


def test_frozen_stages_and_norm_eval_survive_an_optimizer_step() -> None:
    torch.manual_seed(0)
    model = ResNet(18, frozen_stages=1, norm_eval=True, zero_init_residual=False)
    model.train()
    assert model.training
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not bn.training for bn in bns)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("conv1", "bn1", "layer1"))}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    trainable_before = model.layer3[0].conv1.weight.detach().clone()

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss = sum(o.mean() for o in model(torch.randn(2, 3, 64, 64)))
    loss.backward()
    opt.step()

    state = model.state_dict()
    for k, v in frozen.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    for k, v in stats.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    for name, p in model.named_parameters():
        assert p.requires_grad == (not name.startswith(("conv1", "bn1", "layer1"))), name
    assert not torch.equal(model.layer3[0].conv1.weight, trainable_before)  # the step did happen

    # Re-applying train() after eval() keeps the frozen parts frozen.
    model.eval().train()
    assert not model.layer1.training and model.layer2.training and not model.layer2[0].bn1.training


def test_without_norm_eval_bn_statistics_update() -> None:
    model = ResNet(18, frozen_stages=-1, norm_eval=False).train()
    before = model.layer2[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(model.layer2[0].bn1.running_mean, before)
    assert all(p.requires_grad for p in model.parameters())


def test_norm_requires_grad_false_freezes_affine_only() -> None:
    model = ResNet(18, norm_cfg={"type": "BN", "requires_grad": False})
    assert not model.layer3[1].bn2.weight.requires_grad
    assert model.layer3[1].conv2.weight.requires_grad


def test_group_norm_names_follow_mmdet() -> None:
    model = ResNet(50, norm_cfg={"type": "GN", "num_groups": 32}).eval()
    keys = set(model.state_dict())
    assert {"gn1.weight", "layer1.0.gn1.weight", "layer1.0.gn3.bias"} <= keys
    assert isinstance(model.layer1[0].downsample[1], nn.GroupNorm)
    assert not any(".bn" in k or k.startswith("bn") for k in keys)


def test_default_init() -> None:
    torch.manual_seed(0)
    model = ResNet(18)
    # zero_init_residual: each residual branch is zero, so a block without projection is relu(identity).
    block = model.layer1[0]
    assert torch.count_nonzero(block.bn2.weight) == 0
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(block.eval()(x), torch.relu(x))
    assert torch.all(model.layer1[0].bn1.weight == 1) and torch.all(model.layer1[0].bn1.bias == 0)
    # Kaiming normal, fan_out mode: std = sqrt(2 / (out_channels * k * k)).
    w = model.layer4[0].conv2.weight
    expected = math.sqrt(2.0 / (512 * 9))
    assert abs(w.std().item() / expected - 1) < 0.03
    assert torch.count_nonzero(ResNet(18, zero_init_residual=False).layer1[0].bn2.weight) == 64


def test_with_cp_gives_same_gradients() -> None:
    torch.manual_seed(0)
    plain = _randomize(ResNet(18, norm_eval=True, with_cp=False)).train()
    ckpt = copy.deepcopy(plain)
    for blk in ckpt.modules():
        if hasattr(blk, "with_cp"):
            blk.with_cp = True
    x = torch.randn(2, 3, 48, 48)
    sum(o.square().mean() for o in plain(x)).backward()
    sum(o.square().mean() for o in ckpt(x)).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_dcn_option_uses_registered_conv_type(monkeypatch: pytest.MonkeyPatch) -> None:
    class MarkedConv(nn.Conv2d):
        def __init__(self, *args, deform_groups: int = 1, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.deform_groups = deform_groups

    with pytest.raises(ConfigError, match="unknown conv type 'FakeDCN'"):
        ResNet(50, dcn={"type": "FakeDCN"}, stage_with_dcn=(False, True, True, True))
    monkeypatch.setitem(CONV_LAYERS, "FakeDCN", MarkedConv)
    dcn = {"type": "FakeDCN", "deform_groups": 2, "fallback_on_stride": True}
    model = ResNet(50, dcn=dcn, stage_with_dcn=(False, True, True, True))
    assert not isinstance(model.layer1[0].conv2, MarkedConv)
    assert not isinstance(model.layer2[0].conv2, MarkedConv)  # stride-2 block falls back to a plain conv
    assert isinstance(model.layer2[1].conv2, MarkedConv) and model.layer2[1].conv2.deform_groups == 2
    assert not isinstance(model.layer2[1].conv1, MarkedConv)
    assert isinstance(model.layer4[2].conv2, MarkedConv)
    with pytest.raises(ConfigError, match="Bottleneck"):
        ResNet(18, dcn=dcn, stage_with_dcn=(False, True, True, True))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 26},
        {"depth": 50, "style": "tf"},
        {"depth": 50, "out_indices": (0, 4)},
        {"depth": 50, "num_stages": 3},  # strides/dilations still have 4 entries
        {"depth": 50, "frozen_stages": 5},
        {"depth": 50, "pretrained": "a.pth", "init_cfg": {"type": "Pretrained", "checkpoint": "b.pth"}},
        {"depth": 50, "init_cfg": {"type": "Kaiming"}},
    ],
)
def test_bad_config_raises(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        ResNet(**kwargs)


def test_registry_build() -> None:
    model = BACKBONES.build({"type": "ResNet", "depth": 18, "out_indices": (1, 2, 3)})
    assert isinstance(model, ResNet) and model.out_channels == [128, 256, 512]
    with pytest.raises(ConfigError, match="norm_evl"):
        BACKBONES.build({"type": "ResNet", "depth": 18, "norm_evl": True})


# --------------------------------------------------------------------------------------- pretrained checkpoints


@pytest.fixture(scope="module")
def tv18_state() -> dict[str, torch.Tensor]:
    return _randomize(torchvision.models.resnet18(weights=None), seed=1).state_dict()


def _assert_loaded(model: ResNet, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)


def test_pretrained_local_torchvision_file(tmp_path: Path, tv18_state) -> None:
    path = tmp_path / "r18.pth"
    torch.save({**tv18_state, "extra.weight": torch.zeros(3)}, path)
    model = ResNet(18, pretrained=str(path))
    with pytest.warns(UserWarning, match=r"unexpected keys.*extra\.weight") as record:
        model.init_weights()
    assert "fc." not in str(record[0].message)  # the classifier is expected to be left over
    _assert_loaded(model, tv18_state)


def test_pretrained_silent_when_everything_matches(tmp_path: Path, tv18_state, recwarn) -> None:
    path = tmp_path / "r18.pth"
    torch.save(tv18_state, path)
    ResNet(18, pretrained=str(path)).init_weights()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_pretrained_unwraps_and_strips_prefixes(tmp_path: Path, tv18_state, recwarn) -> None:
    path = tmp_path / "detector.pth"
    wrapped = {f"module.backbone.{k}": v for k, v in tv18_state.items()}
    wrapped["module.neck.lateral_convs.0.conv.weight"] = torch.zeros(1)
    torch.save({"state_dict": wrapped, "meta": {"epoch": 12}}, path)
    model = ResNet(18, init_cfg={"type": "Pretrained", "checkpoint": str(path)})
    model.init_weights()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]  # neck keys are not the backbone's
    _assert_loaded(model, tv18_state)


def test_pretrained_reports_missing_and_mismatched(tmp_path: Path, tv18_state) -> None:
    path = tmp_path / "partial.pth"
    state = {k: v for k, v in tv18_state.items() if k != "layer2.0.conv1.weight"}
    state["layer3.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save({"model": state}, path)
    model = ResNet(18, pretrained=str(path))
    with pytest.warns(UserWarning) as record:
        model.init_weights()
    msg = str(record[0].message)
    assert "missing keys" in msg and "layer2.0.conv1.weight" in msg
    assert "size mismatch" in msg and "layer3.0.conv1.weight" in msg
    torch.testing.assert_close(model.layer1[0].conv1.weight, tv18_state["layer1.0.conv1.weight"])


def test_pretrained_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ResNet(18, pretrained=str(tmp_path / "nope.pth")).init_weights()


def test_torchvision_scheme_uses_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tv18_state) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save(tv18_state, cached)
    model = ResNet(18, pretrained="torchvision://resnet18")
    model.init_weights()
    _assert_loaded(model, tv18_state)


def test_torchvision_scheme_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DENSEDET_HOME", str(tmp_path / "dd"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # downloads go through densedet.weights.download
    filename = Path(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url).name
    with pytest.raises(RuntimeError, match=rf"{filename}.*local path"):
        ResNet(50, pretrained="torchvision://resnet50").init_weights()
    with pytest.raises(ConfigError, match="not_a_model"):
        ResNet(50, pretrained="torchvision://not_a_model").init_weights()


def test_timm_scheme_offline_error(monkeypatch, tmp_path) -> None:
    """``timm:NAME`` asks timm for its weights; offline the error says how to provide a local file."""
    import timm

    from densedet.registry import ConfigError
    from densedet.weights.sources import read_state_dict as read_checkpoint

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setenv("DENSEDET_HOME", str(tmp_path))

    monkeypatch.setattr(timm, "create_model", offline)  # what an offline hub download ends in
    monkeypatch.setattr(urllib.request, "urlopen", offline)  # the DenseDet cache's download, offline
    with pytest.raises(RuntimeError, match="resnet18.*local file"):
        read_checkpoint("timm:resnet18")
    with pytest.raises(ConfigError, match="no pretrained model"):
        read_checkpoint("timm:not_a_model_xyz")
