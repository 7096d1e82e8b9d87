"""Released Mask R-CNN layouts load with strict=True: MMDetection 2.x Mask R-CNN R-50-FPN and the BiFormer-S
variant of rayleizhu/BiFormer, key and shape lists written out by hand from mmdet's module definitions
(``RPNHead``: ``rpn_conv`` 3x3, ``rpn_cls`` 1x1 with 3 anchors, ``rpn_reg`` 1x1 with 12 outputs;
``Shared2FCBBoxHead``: ``shared_fcs.{0,1}`` 12544 -> 1024 -> 1024, ``fc_cls`` 81 (background last), ``fc_reg``
320; ``FCNMaskHead``: ``convs.{0..3}.conv`` 3x3 with bias, ``upsample`` 2x2 deconv, ``conv_logits`` 80), and
``densedet convert`` reads such files."""

from __future__ import annotations

import pytest
import torch
from test_biformer import _expected_keys_and_shapes
from test_checkpoint_layout import _backbone_r50, _fake_release

from densedet.cli import main
from densedet.config import load_config
from densedet.engine.checkpoint import load_checkpoint, load_model_weights
from densedet.models.build import build_detector


def _fpn(in_channels: list[int]) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}
    for i, cin in enumerate(in_channels):
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (256, cin, 1, 1)
        keys[f"neck.lateral_convs.{i}.conv.bias"] = (256,)
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        keys[f"neck.fpn_convs.{i}.conv.bias"] = (256,)
    return keys


def _heads() -> dict[str, tuple]:
    keys = {"rpn_head.rpn_conv.weight": (256, 256, 3, 3), "rpn_head.rpn_conv.bias": (256,),
            "rpn_head.rpn_cls.weight": (3, 256, 1, 1), "rpn_head.rpn_cls.bias": (3,),
            "rpn_head.rpn_reg.weight": (12, 256, 1, 1), "rpn_head.rpn_reg.bias": (12,),
            "roi_head.bbox_head.shared_fcs.0.weight": (1024, 256 * 7 * 7),
            "roi_head.bbox_head.shared_fcs.0.bias": (1024,),
            "roi_head.bbox_head.shared_fcs.1.weight": (1024, 1024), "roi_head.bbox_head.shared_fcs.1.bias": (1024,),
            "roi_head.bbox_head.fc_cls.weight": (81, 1024), "roi_head.bbox_head.fc_cls.bias": (81,),
            "roi_head.bbox_head.fc_reg.weight": (320, 1024), "roi_head.bbox_head.fc_reg.bias": (320,),
            "roi_head.mask_head.upsample.weight": (256, 256, 2, 2), "roi_head.mask_head.upsample.bias": (256,),
            "roi_head.mask_head.conv_logits.weight": (80, 256, 1, 1), "roi_head.mask_head.conv_logits.bias": (80,)}
    for i in range(4):
        keys[f"roi_head.mask_head.convs.{i}.conv.weight"] = (256, 256, 3, 3)
        keys[f"roi_head.mask_head.convs.{i}.conv.bias"] = (256,)
    return keys


def mask_rcnn_r50_keys() -> dict[str, tuple]:
    return {**_backbone_r50(), **_fpn([256, 512, 1024, 2048]), **_heads()}


def mask_rcnn_biformer_s_keys() -> dict[str, tuple]:
    backbone = {f"backbone.{k}": v for k, v in _expected_keys_and_shapes([64, 128, 256, 512], [4, 4, 18, 4]).items()}
    return {**backbone, **_fpn([64, 128, 256, 512]), **_heads()}


@pytest.mark.parametrize(("name", "keys"), [("mask_rcnn_r50_fpn_1x_coco", mask_rcnn_r50_keys),
                                            ("maskrcnn.1x.biformer_small", mask_rcnn_biformer_s_keys)])
def test_released_mask_rcnn_layouts_load_strictly(name: str, keys) -> None:
    expected = keys()
    cfg = load_config(name)
    model = build_detector({**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}}, init=False)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    sd = _fake_release(expected, seed=3)
    model.load_state_dict(sd, strict=True)
    for k in ("rpn_head.rpn_cls.weight", "roi_head.bbox_head.fc_reg.weight", "roi_head.mask_head.conv_logits.bias"):
        assert torch.equal(model.state_dict()[k], sd[k])


def test_convert_reads_a_mask_rcnn_release(tmp_path) -> None:
    expected = mask_rcnn_r50_keys()
    sd = _fake_release(expected, seed=4)
    src = tmp_path / "mask_rcnn_r50_fpn_1x_coco_release.pth"
    torch.save({"state_dict": sd, "meta": {"CLASSES": tuple(f"c{i}" for i in range(80)), "epoch": 12}}, src)
    dst = tmp_path / "converted.pth"
    assert main(["convert", str(src), str(dst)]) == 0
    ckpt = load_checkpoint(dst)
    assert ckpt["meta"]["classes"][:2] == ["c0", "c1"]
    cfg = load_config("mask_rcnn_r50_fpn_1x_coco")
    model = build_detector({**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}}, init=False)
    load_model_weights(model, ckpt, strict=True)
    key = "roi_head.mask_head.upsample.weight"
    assert torch.equal(model.state_dict()[key], sd[key])
