"""Released MMDetection checkpoints load with strict=True.

The expected key/shape lists are written out here from MMDetection 2.x's module definitions (ResNet = torchvision's
ResNet keys; FPN ``lateral_convs.i.conv`` / ``fpn_convs.i.conv`` with bias because no norm; RetinaHead
``cls_convs.i.conv`` with bias, ``retina_cls`` / ``retina_reg``; ATSSHead/FCOSHead GN towers without conv bias,
``cls_convs.i.gn``, ``atss_*`` / ``conv_*``, ``scales.i.scale`` 0-d), independently of DenseDet's code.
"""

from __future__ import annotations

import torch
import torchvision

import densedet
from densedet.engine.checkpoint import load_checkpoint, load_model_weights
from densedet.weights.mmdet import convert_mmdet_checkpoint


def _backbone_r50() -> dict[str, tuple]:
    sd = torchvision.models.resnet50(weights=None).state_dict()
    return {f"backbone.{k}": tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.")}


def _fpn(extra_on_input: bool) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}
    for i, cin in enumerate([512, 1024, 2048]):
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (256, cin, 1, 1)
        keys[f"neck.lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(5):
        cin = 2048 if (i == 3 and extra_on_input) else 256
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (256, cin, 3, 3)
        keys[f"neck.fpn_convs.{i}.conv.bias"] = (256,)
    return keys


def _tower(gn: bool) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}
    for branch in ("cls_convs", "reg_convs"):
        for i in range(4):
            keys[f"bbox_head.{branch}.{i}.conv.weight"] = (256, 256, 3, 3)
            if gn:
                keys[f"bbox_head.{branch}.{i}.gn.weight"] = (256,)
                keys[f"bbox_head.{branch}.{i}.gn.bias"] = (256,)
            else:
                keys[f"bbox_head.{branch}.{i}.conv.bias"] = (256,)
    return keys


def _conv(name: str, cout: int) -> dict[str, tuple]:
    return {f"bbox_head.{name}.weight": (cout, 256, 3, 3), f"bbox_head.{name}.bias": (cout,)}


def retinanet_r50_keys() -> dict[str, tuple]:
    return {**_backbone_r50(), **_fpn(True), **_tower(False), **_conv("retina_cls", 9 * 80), **_conv("retina_reg", 36)}


def atss_r50_keys() -> dict[str, tuple]:
    scales = {f"bbox_head.scales.{i}.scale": () for i in range(5)}
    return {**_backbone_r50(), **_fpn(False), **_tower(True), **_conv("atss_cls", 80), **_conv("atss_reg", 4),
            **_conv("atss_centerness", 1), **scales}


def fcos_r50_keys() -> dict[str, tuple]:
    scales = {f"bbox_head.scales.{i}.scale": () for i in range(5)}
    return {**_backbone_r50(), **_fpn(False), **_tower(True), **_conv("conv_cls", 80), **_conv("conv_reg", 4),
            **_conv("conv_centerness", 1), **scales}


def _fake_release(keys: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 5, s, generator=g) if k.endswith("num_batches_tracked")
                else torch.randn(s, generator=g)) for k, s in keys.items()}


def _check(name: str, keys: dict[str, tuple]) -> None:
    model = densedet.build_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == keys
    sd = _fake_release(keys)
    model.load_state_dict(sd, strict=True)
    for k in ("backbone.layer1.0.conv1.weight", "neck.fpn_convs.4.conv.weight"):
        assert torch.equal(model.state_dict()[k], sd[k])


def test_retinanet_r50_fpn_layout() -> None:
    _check("retinanet_r50_fpn_1x_coco", retinanet_r50_keys())


def test_atss_r50_fpn_layout() -> None:
    _check("atss_r50_fpn_1x_coco", atss_r50_keys())


def test_fcos_r50_layout() -> None:
    _check("fcos_r50_caffe_fpn_gn-head_1x_coco", fcos_r50_keys())


class _MmcvConfigLike:
    """Plays an object of a foreign class pickled into a released checkpoint's meta."""

    def __init__(self) -> None:
        self.text = "model = dict(...)"


def test_convert_released_checkpoint_with_refused_meta(tmp_path) -> None:
    keys = atss_r50_keys()
    sd = _fake_release(keys, seed=1)
    src = tmp_path / "atss_release.pth"
    torch.save({"state_dict": sd, "meta": {"CLASSES": ("person", "car"), "config": _MmcvConfigLike(),
                                           "epoch": 12}, "optimizer": {"state": {}}}, src)
    # Safe loading refuses the foreign class outright ...
    try:
        torch.load(src, weights_only=True)
        raise AssertionError("weights_only load should refuse a foreign class")
    except Exception as e:  # noqa: BLE001 - any refusal will do
        assert "_MmcvConfigLike" in str(e)
    dst = tmp_path / "atss_densedet.pth"
    report = convert_mmdet_checkpoint(src, dst)
    assert report["num_tensors"] == len(keys)
    assert any(r.endswith("_MmcvConfigLike") for r in report["refused_meta"])
    ckpt = load_checkpoint(dst)  # our output is plain-safe
    assert ckpt["meta"]["classes"] == ["person", "car"]
    model = densedet.build_model("atss_r50_fpn_1x_coco")
    load_model_weights(model, ckpt, strict=True)
    assert torch.equal(model.state_dict()["bbox_head.atss_cls.weight"], sd["bbox_head.atss_cls.weight"])
