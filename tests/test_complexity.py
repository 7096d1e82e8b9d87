"""Model complexity (issue 19, item 5): parameters and multiply-adds against published figures (torchvision's
ResNet-50, MMDetection's RetinaNet-R50 get_flops output), R-CNN heads and activation memory against closed forms,
and `densedet info`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torchvision.models import ResNet50_Weights

from densedet.analysis.complexity import _LiveTensors, _saved_for_backward, model_complexity
from densedet.cli import main
from densedet.config import load_config
from densedet.models.build import build_detector


@pytest.fixture(scope="module")
def retinanet_r50() -> nn.Module:
    cfg = load_config("retinanet_r50_fpn_1x_coco", ["model.backbone.pretrained=null"])
    return build_detector(cfg.model, init=False)


def test_resnet50_backbone_matches_torchvision_published_figures(retinanet_r50) -> None:
    """torchvision publishes ResNet-50 (IMAGENET1K_V1) at 224x224 as 4.089 GFLOPS -- multiply-adds, its fc
    included -- and 25,557,032 parameters. DenseDet's ResNet-50 is the same network without the fc (2048 x 1000
    weights + 1000 biases, 2048 x 1000 multiply-adds)."""
    meta = ResNet50_Weights.IMAGENET1K_V1.meta
    c = model_complexity(retinanet_r50, (224, 224), memory=False)
    backbone = next(m for m in c.modules if m.name == "backbone")
    assert backbone.params == meta["num_params"] - (2048 * 1000 + 1000)
    assert round((backbone.macs + 2048 * 1000) / 1e9, 3) == meta["_ops"]
    stem = next(s for s in c.stages if s.name == "conv1")  # closed form: 112 x 112 outputs of a 7x7x3 -> 64 conv
    assert stem.macs == 112 * 112 * 64 * 7 * 7 * 3 and stem.out_shape == (1, 64, 112, 112) and stem.stride == 2
    assert [s.stride for s in c.stages if s.name.startswith("layer")] == [4, 8, 16, 32]


def test_retinanet_r50_matches_mmdetection_get_flops(retinanet_r50) -> None:
    """MMDetection's docs (useful_tools.md, "Model Complexity") print RetinaNet-R50 at the default input
    (1, 3, 1280, 800) as "Flops: 239.32 GFLOPs, Params: 37.74 M". mmcv counts trainable parameters only (the frozen
    stem and stage 1 are left out) and multiply-adds as FLOPs, including BatchNorm, ReLU, pooling and conv bias adds;
    FlopCounterMode counts convolutions and matrix products, which are all but about 0.3 % of it."""
    c = model_complexity(retinanet_r50, (1280, 800), memory=False)
    assert round(c.trainable / 1e6, 2) == 37.74
    assert c.params > c.trainable  # the frozen stem and layer1
    assert 0.995 * 239.32e9 < c.macs < 239.32e9
    assert sum(m.macs for m in c.modules) == c.macs


def test_rcnn_heads_are_counted_in_closed_form() -> None:
    cfg = load_config("mask_rcnn_r18_fpn_synth", ["model.backbone.pretrained=null"])
    model = build_detector(cfg.model, init=False)
    base = model_complexity(model, (320, 320), proposals=0, mask_rois=0, memory=False)
    c = model_complexity(model, (320, 320), proposals=50, mask_rois=7, memory=False)
    roi = model.roi_head
    box = 50 * sum(fc.in_features * fc.out_features for fc in roi.bbox_head.modules() if isinstance(fc, nn.Linear))
    mh, s = roi.mask_head, roi.mask_head.roi_feat_size
    mask = 7 * (sum(s * s * conv.in_channels * conv.out_channels * 9 for conv in mh.modules()
                    if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3))
                + s * s * mh.upsample.in_channels * mh.upsample.out_channels * 4  # 2x2 transposed conv, stride 2
                + (2 * s) ** 2 * mh.conv_logits.in_channels * mh.conv_logits.out_channels)
    assert c.macs - base.macs == box + mask
    assert next(m for m in c.modules if m.name == "roi_head").macs == box + mask
    assert c.roi == {"proposals": 50, "mask_rois": 7}


def test_activation_memory_of_a_hand_counted_network() -> None:
    """conv(3->4) -> ReLU -> conv(4->2) on a 1x3x8x8 input, float32. Inference: the conv output (4x8x8x4 B = 1024)
    is alive while ReLU writes its own (1024): peak 2048 B. Training: ReLU saves its output (1024 B), the second conv
    saves the same tensor as its input and its weight (excluded); the first conv's input is the image: 1024 B."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        x = torch.zeros(1, 3, 8, 8)
        twins = [fake.from_tensor(p) for p in net.parameters()]  # held: their storages must stay theirs
        skip = {t.untyped_storage()._cdata for t in (*net.parameters(), *twins, x)}
        meter = _LiveTensors(skip)
        with torch.no_grad(), meter:
            net(x)
        with _saved_for_backward(skip) as saved:
            net(x)
    assert meter.peak == 2048
    assert sum(saved.values()) == 1024


def test_memory_scales_with_the_batch_and_the_model_is_untouched() -> None:
    cfg = load_config("retinanet_r18_fpn_synth", ["model.backbone.pretrained=null"])
    model = build_detector(cfg.model, init=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = model_complexity(model, (128, 128))
    two = model_complexity(model, (128, 128), batch=2)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert two.macs == 2 * one.macs
    assert 0 < one.inference_peak_bytes < one.train_saved_bytes  # a training forward keeps every layer's input
    # per-channel BatchNorm statistics are saved once per batch, everything else per image
    assert 1.99 * one.train_saved_bytes < two.train_saved_bytes <= 2 * one.train_saved_bytes


def test_info_command(tmp_path: Path, capsys) -> None:
    out = tmp_path / "info.json"
    assert main(["info", "atss_r18_fpn_synth", "--size", "160x224", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["size"] == [160, 224] and data["macs"] > 0 and data["inference_peak_bytes"] > 0
    assert "GMac" in text and "MMDetection" in text and "layer4 (ResLayer)" in text and "bbox_head (ATSSHead)" in text
    with pytest.raises(SystemExit) as e:
        main(["info", "atss_r18_fpn_synth", "--size", "big"])
    assert e.value.code == 2
