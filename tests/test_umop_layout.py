"""UMOP's released X-101 checkpoints (zimoqingfeng/UMOP, configs/umop/umop_x101_fpn*_1.5x_coco.py) load with
strict=True.

Expected keys are derived independently of DenseDet: the backbone from torchvision's ResNeXt-101 64x4d (the
mmdet ResNeXt layout uses the same names), plus, for the mdconv rows, mmcv's ModulatedDeformConv2dPack offset conv
``conv2.conv_offset`` (3 x 3 x (2 + 1) = 27 output channels, with bias) in every block of stages c3-c5; the neck
and head are those of ATSS (LRPHead keeps ATSSHead's layers), from tests/test_checkpoint_layout.py.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from test_checkpoint_layout import _conv, _fake_release, _fpn, _tower

import densedet


def _x101_64x4d(mdconv: bool) -> dict[str, tuple]:
    sd = torchvision.models.resnext101_64x4d(weights=None).state_dict()
    keys = {f"backbone.{k}": tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.")}
    if mdconv:
        for k, shape in list(keys.items()):
            if k.endswith("conv2.weight") and k.split(".")[1] in ("layer2", "layer3", "layer4"):
                stem = k[: -len("weight")]
                keys[f"{stem}conv_offset.weight"] = (27, shape[0], 3, 3)  # groups do not split the offset conv
                keys[f"{stem}conv_offset.bias"] = (27,)
    return keys


@pytest.mark.parametrize("name,mdconv", [("umop_x101_fpn_1.5x_coco", False),
                                         ("umop_x101_fpn_mdconv_c3-c5_1.5x_coco", True)])
def test_umop_x101_release_layout_loads_strict(name: str, mdconv: bool) -> None:
    scales = {f"bbox_head.scales.{i}.scale": () for i in range(5)}
    keys = {**_x101_64x4d(mdconv), **_fpn(False), **_tower(True), **_conv("atss_cls", 80), **_conv("atss_reg", 4),
            **_conv("atss_centerness", 1), **scales}
    model = densedet.build_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) - set(keys) == set() and set(keys) - set(ours) == set()
    assert ours == keys
    sd = _fake_release(keys)
    model.load_state_dict(sd, strict=True)
    k = "backbone.layer3.5.conv2.conv_offset.weight" if mdconv else "backbone.layer3.5.conv2.weight"
    assert torch.equal(model.state_dict()[k], sd[k])


def _fpn_keys(in_channels: list[int]) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}
    for i, cin in enumerate(in_channels[1:]):  # start_level 1
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (256, cin, 1, 1)
        keys[f"neck.lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(5):  # add_extra_convs on_output: every fpn conv is 256 -> 256
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        keys[f"neck.fpn_convs.{i}.conv.bias"] = (256,)
    return keys


@pytest.mark.parametrize("name,in_channels", [
    ("umop_r2_101_fpn_mdconv_c3-c5_mstrain_2x_coco", [256, 512, 1024, 2048]),
    ("umop_swin-S_fpn_2x_coco_mstrain", [96, 192, 384, 768]),
    ("umop_swin-B_fpn_2x_coco_mstrain", [128, 256, 512, 1024]),
    ("umop_swin-L_fpn_2x_coco_mstrain", [192, 384, 768, 1536]),
])
def test_umop_r2_and_swin_release_layouts(name: str, in_channels: list[int]) -> None:
    """The other UMOP rows: their backbones' own layouts are checked in tests/test_res2net.py / tests/test_swin.py
    (mmdet / Swin-Transformer-Object-Detection names); here the whole detector is that backbone + an FPN over the
    backbone's channels + the ATSS head lists, nothing more or less. Shapes on the meta device (a strict load is
    exactly a key/shape match)."""
    from densedet.config import load_config
    from densedet.models.build import build_detector

    with torch.device("meta"):
        model = build_detector(load_config(name).model, init=False)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    backbone = {k: v for k, v in ours.items() if k.startswith("backbone.")}
    scales = {f"bbox_head.scales.{i}.scale": () for i in range(5)}
    expected = {**backbone, **_fpn_keys(in_channels), **_tower(True), **_conv("atss_cls", 80),
                **_conv("atss_reg", 4), **_conv("atss_centerness", 1), **scales}
    assert sorted(set(ours) ^ set(expected)) == []
    assert ours == expected
    if "swin" in name:
        assert "backbone.layers.3.blocks.1.attn.relative_position_bias_table" in backbone
    else:
        assert "backbone.layer4.2.convs.0.conv_offset.weight" in backbone  # DCNv2 on every split conv of c5
