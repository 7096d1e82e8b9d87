"""The released VFNet R-50 checkpoints (plain and mdconv c3-c5) load with strict=True.

Key/shape lists written out from the reference modules (hyz-xmaster/VarifocalNet and MMDetection 2.x
``VFNetHead._init_layers``, mmcv ``ConvModule`` / ``DeformConv2d`` / ``ModulatedDeformConv2dPack``), independently of
DenseDet's code: ResNet = torchvision's keys; FPN ``lateral_convs.i.conv`` / ``fpn_convs.i.conv`` with bias (no
norm; the extra convs read P5's output, so all are 256 -> 256); head GN towers of 3 convs without conv bias
(``cls_convs.i.gn``), ``vfnet_reg_conv`` (ConvModule + GN), ``vfnet_reg`` / ``vfnet_reg_refine`` / ``vfnet_cls``
with bias, the star dconvs ``vfnet_reg_refine_dconv`` / ``vfnet_cls_dconv`` (mmcv DeformConv2d: weight only),
``scales.i.scale`` / ``scales_refine.i.scale`` 0-d. mdconv: every ``conv2`` of layer2-4 (fallback_on_stride=False, so
the strided first blocks too) and the last conv of both head towers are DCNv2: the conv weight without bias plus
``conv_offset`` (27 = 3 * 3x3 channels: offsets and mask) with bias.
"""

from __future__ import annotations

import torch
import torchvision
from test_checkpoint_layout import _fake_release, _fpn

import densedet

RESNET50_BLOCKS = {"layer1": (3, 64), "layer2": (4, 128), "layer3": (6, 256), "layer4": (3, 512)}


def _backbone_r50(mdconv: bool) -> dict[str, tuple]:
    sd = torchvision.models.resnet50(weights=None).state_dict()
    keys = {f"backbone.{k}": tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.")}
    if mdconv:
        for layer in ("layer2", "layer3", "layer4"):
            blocks, planes = RESNET50_BLOCKS[layer]
            for i in range(blocks):
                keys[f"backbone.{layer}.{i}.conv2.conv_offset.weight"] = (27, planes, 3, 3)
                keys[f"backbone.{layer}.{i}.conv2.conv_offset.bias"] = (27,)
    return keys


def _vfnet_head(mdconv: bool, c: int = 256, convs: int = 3) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}
    for branch in ("cls_convs", "reg_convs"):
        for i in range(convs):
            keys[f"bbox_head.{branch}.{i}.conv.weight"] = (c, c, 3, 3)
            keys[f"bbox_head.{branch}.{i}.gn.weight"] = (c,)
            keys[f"bbox_head.{branch}.{i}.gn.bias"] = (c,)
        if mdconv:
            keys[f"bbox_head.{branch}.{convs - 1}.conv.conv_offset.weight"] = (27, c, 3, 3)
            keys[f"bbox_head.{branch}.{convs - 1}.conv.conv_offset.bias"] = (27,)
    keys["bbox_head.vfnet_reg_conv.conv.weight"] = (c, c, 3, 3)
    keys["bbox_head.vfnet_reg_conv.gn.weight"] = (c,)
    keys["bbox_head.vfnet_reg_conv.gn.bias"] = (c,)
    for name, cout in (("vfnet_reg", 4), ("vfnet_reg_refine", 4), ("vfnet_cls", 80)):
        keys[f"bbox_head.{name}.weight"] = (cout, c, 3, 3)
        keys[f"bbox_head.{name}.bias"] = (cout,)
    for name in ("vfnet_reg_refine_dconv", "vfnet_cls_dconv"):
        keys[f"bbox_head.{name}.weight"] = (c, c, 3, 3)
    for i in range(5):
        keys[f"bbox_head.scales.{i}.scale"] = ()
        keys[f"bbox_head.scales_refine.{i}.scale"] = ()
    return keys


def vfnet_r50_keys(mdconv: bool = False) -> dict[str, tuple]:
    return {**_backbone_r50(mdconv), **_fpn(False), **_vfnet_head(mdconv)}


def _check(name: str, keys: dict[str, tuple]) -> None:
    model = densedet.build_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(ours) ^ set(keys)) == []
    assert ours == keys
    sd = _fake_release(keys)
    model.load_state_dict(sd, strict=True)
    for k in ("bbox_head.vfnet_cls_dconv.weight", "bbox_head.scales_refine.4.scale", "neck.fpn_convs.4.conv.weight"):
        assert torch.equal(model.state_dict()[k], sd[k])


def test_vfnet_r50_fpn_layout() -> None:
    _check("vfnet_r50_fpn_1x_coco", vfnet_r50_keys())


def test_vfnet_r50_fpn_mdconv_layout() -> None:
    keys = vfnet_r50_keys(mdconv=True)
    _check("vfnet_r50_fpn_mdconv_c3-c5_mstrain_2x_coco", keys)
    # the loaded DCNv2 offsets are used: a changed conv_offset changes the head's output
    model = densedet.build_model("vfnet_r50_fpn_mdconv_c3-c5_mstrain_2x_coco").eval()
    model.load_state_dict(_fake_release(keys, seed=1), strict=True)
    feats = [torch.randn(1, 256, 4, 4), torch.randn(1, 256, 2, 2), torch.randn(1, 256, 1, 1),
             torch.randn(1, 256, 1, 1), torch.randn(1, 256, 1, 1)]
    with torch.no_grad():
        before = model.bbox_head(feats)[0][0].clone()
        model.bbox_head.cls_convs[2].conv.conv_offset.weight.zero_()
        model.bbox_head.cls_convs[2].conv.conv_offset.bias.zero_()
        after = model.bbox_head(feats)[0][0]
    assert not torch.allclose(before, after)


def test_vfnetx_release_layout() -> None:
    """VFNet-X (vfnetx_r2_101_fpn_mdconv_c3-c5_mstrain_2x_coco.py): the R2-101 DCN backbone of the mdconv VFNet row
    (its own layout is checked in tests/test_res2net.py), the PAFPNX neck (tests/test_pafpnx.py's list) and the
    VFNet head with 4 convs of 384 channels, DCNv2 on the last. Shapes only, on the meta device (a strict load is
    exactly a key/shape match)."""
    from test_pafpnx import vfnetx_neck_keys

    from densedet.config import load_config
    from densedet.models.build import build_detector

    def shapes(name: str) -> dict[str, tuple]:
        with torch.device("meta"):
            model = build_detector(load_config(name).model, init=False)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    r2 = {k: v for k, v in shapes("vfnet_r2_101_fpn_mdconv_c3-c5_mstrain_2x_coco").items() if k.startswith("backbone.")}
    expected = {**r2, **vfnetx_neck_keys("neck."), **_vfnet_head(True, c=384, convs=4)}
    ours = shapes("vfnetx_r2_101_fpn_mdconv_c3-c5_mstrain_59e_coco")
    assert sorted(set(ours) ^ set(expected)) == []
    assert ours == expected
