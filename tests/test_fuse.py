"""BN folding (model.fuse) and FrozenBatchNorm2d."""

import pytest
import torch
from torch import nn

from densedet.api import build_model
from densedet.models.dcn import ModulatedDeformConv2dPack
from densedet.models.fuse import fold_bn_into_conv, fuse_conv_bn
from densedet.models.layers import ConvModule, FrozenBatchNorm2d, freeze_batchnorms


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial statistics and affine parameters, so folding has something to do."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
            m.num_batches_tracked.fill_(7)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-12))


def test_fold_matches_closed_form_on_one_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    bn = nn.BatchNorm2d(4).eval()
    _randomise_bn(bn)
    x = torch.randn(2, 3, 9, 7)
    # closed form of eval BN: (y - mean) / sqrt(var + eps) * gamma + beta
    y = conv(x)
    expected = (y - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps) \
        * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    fold_bn_into_conv(conv, bn)
    assert _rel_err(conv(x), expected.detach()) < 1e-5


def test_fold_creates_bias_for_biasless_conv_and_dcn():
    torch.manual_seed(1)
    dcn = ModulatedDeformConv2dPack(4, 6, 3, padding=1, bias=False)
    nn.init.normal_(dcn.conv_offset.weight, std=0.1)  # real offsets and masks
    bn = nn.BatchNorm2d(6).eval()
    _randomise_bn(bn, seed=3)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = bn(dcn(x))
        fold_bn_into_conv(dcn, bn)
        assert dcn.bias is not None and dcn.bias.shape == (6,)
        assert _rel_err(dcn(x), expected) < 1e-5


def test_frozen_batchnorm_keeps_keys_values_and_forward():
    bn = nn.BatchNorm2d(5)
    _randomise_bn(bn)
    bn.eval()
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    assert list(frozen.state_dict()) == list(bn.state_dict())  # num_batches_tracked included, same order
    assert int(frozen.num_batches_tracked) == 7
    assert frozen.weight is bn.weight  # the optimizer's Parameter objects stay the same
    x = torch.randn(2, 5, 4, 4)
    frozen.train()  # frozen: running statistics even in train mode
    assert _rel_err(frozen(x), bn(x).detach()) < 1e-6
    # a strict load from a plain BN state dict works both ways
    nn.BatchNorm2d(5).load_state_dict(frozen.state_dict(), strict=True)
    FrozenBatchNorm2d(5).load_state_dict(bn.state_dict(), strict=True)


def test_frozen_batchnorm_saves_no_input_for_backward():
    """With a frozen affine, backward needs only the per-channel scale, not the (B, C, H, W) input."""
    bn = nn.BatchNorm2d(8).eval().requires_grad_(False)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(2, 8, 32, 32, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    for layer, big_expected in ((bn, True), (frozen, False)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum().backward()
        big = any(t.numel() >= x.numel() for t in saved)
        assert big == big_expected, (type(layer).__name__, [tuple(t.shape) for t in saved])


def test_resnet_frozen_stages_use_frozen_bn_and_checkpoints_load_both_ways():
    kw = dict(backbone__depth=18, backbone__base_channels=16, backbone__frozen_stages=1,
              backbone__norm_eval=False, backbone__out_indices=[1, 2, 3], neck__in_channels=[32, 64, 128],
              neck__out_channels=32, bbox_head__in_channels=32, bbox_head__feat_channels=32,
              bbox_head__stacked_convs=1, num_classes=3)
    model = build_model("retinanet_r50_fpn_1x_coco", **kw)
    bb = model.backbone
    assert isinstance(bb.norm1, FrozenBatchNorm2d) and isinstance(bb.layer1[0].bn1, FrozenBatchNorm2d)
    assert type(bb.layer2[0].bn1) is nn.BatchNorm2d  # trained stage, batch statistics (norm_eval False)
    # the state dict has the plain layout: a model without FrozenBatchNorm2d loads it strictly and vice versa
    plain = build_model("retinanet_r50_fpn_1x_coco", **{**kw, "backbone__frozen_stages": -1})
    assert list(plain.state_dict()) == list(model.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(plain.state_dict(), strict=True)
    assert freeze_batchnorms(bb.layer1) == 0  # idempotent: already frozen


def _tiny_detector(config: str, **kw):
    base = dict(backbone__depth=18, backbone__base_channels=16, backbone__out_indices=[1, 2, 3],
                neck__in_channels=[32, 64, 128], neck__out_channels=32, bbox_head__in_channels=32,
                bbox_head__feat_channels=32, bbox_head__stacked_convs=1, num_classes=3)
    return build_model(config, **{**base, **kw})


@pytest.mark.parametrize("config,extra", [
    ("retinanet_r50_fpn_1x_coco", {"backbone__frozen_stages": 1}),
    # BN in the head (ConvModule) and DCNv2 in the backbone's conv2 of stages 2-3
    ("atss_r50_fpn_1x_coco", {"bbox_head__norm_cfg": {"type": "BN", "requires_grad": True},
                              "backbone__depth": 50, "backbone__base_channels": 8,
                              "neck__in_channels": [64, 128, 256],
                              "backbone__dcn": {"type": "DCNv2", "deform_groups": 1},
                              "backbone__stage_with_dcn": [False, True, True, False]}),
])
def test_fused_detector_equals_unfused(config, extra):
    torch.manual_seed(0)
    model = _tiny_detector(config, **extra)
    _randomise_bn(model)
    for m in model.modules():  # real deformations
        if isinstance(m, ModulatedDeformConv2dPack):
            nn.init.normal_(m.conv_offset.weight, std=0.05)
    model.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = model(x, mode="tensor")
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        model.fuse()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "every BN follows a conv"
        assert n_bn > 0
        out = model(x, mode="tensor")
    for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)):
        assert _rel_err(a, b) < 1e-5
    with pytest.raises(RuntimeError, match="fused"):
        model.train()


def test_training_mode_bn_is_not_folded():
    m = ConvModule(3, 4, 3, padding=1, norm_cfg={"type": "BN"})
    assert fuse_conv_bn(m) == 0  # train mode: batch statistics, not a fixed affine map
    m.eval()
    assert fuse_conv_bn(m) == 1 and isinstance(m.bn, nn.Identity)


def test_bf16_inference_returns_fp32_within_tolerance():
    """bf16 autocast on backbone/neck/head: every head output within 5% of its fp32 value (relative to the output's
    largest magnitude; bf16 keeps 8 mantissa bits, ~0.4% per rounding), returned as float32; detections float32."""
    torch.manual_seed(0)
    model = build_model("atss_r18_fpn_synth").eval()
    model.bbox_head.test_cfg.score_thr = 0.0  # keep candidates so decode + NMS really run on the outputs
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        ref = model(x, mode="tensor")
        model.set_precision("bf16")
        out = model(x, mode="tensor")
        dets = model(x, mode="predict")[0]
    errs = [_rel_err(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref))]
    assert all(a.dtype == torch.float32 for a in torch.utils._pytree.tree_leaves(out))
    assert max(errs) < 0.05, errs
    assert max(errs) > 1e-4, "bf16 autocast did not run (outputs identical to fp32)"
    assert len(dets["boxes"]) > 0 and dets["boxes"].dtype == torch.float32 and dets["scores"].dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        model.set_precision("fp16")
