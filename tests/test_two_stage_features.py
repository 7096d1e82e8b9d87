"""Every feature works for two-stage detectors too (issue "one detector contract"): test-time augmentation with
MMDetection 2.x ``aug_test`` semantics, bf16 inference, ``--data`` sizing the RoI heads, ``data check`` through the
RPN, and the contract's own methods (``reset_classifier``, ``detection_cfg``)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.ops import box_iou

from densedet.analysis.data_check import data_check
from densedet.api import build_model
from densedet.config import load_config
from densedet.data.synth import make_synthetic_coco
from densedet.models.tta import bbox_mapping, bbox_mapping_back


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEDET_HOME", str(tmp_path / "home"))


def _model():
    """The synthetic Mask R-CNN at random weights, every detection kept (random scores are ~1 / (C + 1))."""
    torch.manual_seed(0)
    return build_model("mask_rcnn_r18_fpn_synth", **{"test_cfg.rcnn.score_thr": 0.0}).eval()


def _pixels(b: int = 2, h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def _metas(b: int, h: int, w: int, **kw) -> list[dict]:
    return [{"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0), "flip": False,
             "flip_direction": None, **kw} for _ in range(b)]


def test_bbox_mapping_is_scale_then_flip_and_its_inverse() -> None:
    """mmdet 2.x ``bbox_mapping``: multiply by the scale factor, then flip in the view's frame; ``bbox_mapping_back``
    undoes it. Hand-computed: box (10, 20, 30, 60) in a 100-wide original, view scaled by 2 and flipped in its
    200-wide frame: x -> (200 - 60, 40, 200 - 20, 120)."""
    meta = {"img_shape": (160, 200), "scale_factor": (2.0, 2.0), "flip": True, "flip_direction": "horizontal"}
    box = torch.tensor([[[10.0, 20.0, 30.0, 60.0]]])
    view = bbox_mapping(box, [meta])
    assert view.tolist() == [[[140.0, 40.0, 180.0, 120.0]]]
    assert torch.allclose(bbox_mapping_back(view, [meta]), box)
    vflip = {**meta, "flip_direction": "vertical"}  # y -> (160 - 120, 160 - 40)
    assert bbox_mapping(box, [vflip]).tolist() == [[[20.0, 40.0, 60.0, 120.0]]]


@torch.no_grad()
def test_identical_views_merge_to_the_single_view_result(monkeypatch) -> None:
    """Two identical views: the merged proposals are the single view's (the duplicates removed by the merge's NMS),
    the averaged boxes and scores are its boxes and scores, the averaged masks its masks: the same detections as
    predict. (mmdet merges the views' proposals with one class-agnostic NMS while a single view's RPN runs NMS per
    level; the RPN here is made class-agnostic too, so that both see one proposal set.)"""
    model = _model()
    rpn_proposals = model.rpn_head.proposals

    def agnostic(outs, metas, cfg=None):
        out = []
        for p in rpn_proposals(outs, metas, cfg):
            keep = torchvision.ops.nms(p[:, :4], p[:, 4], 0.7)
            out.append(p[keep])
        return out

    monkeypatch.setattr(model.rpn_head, "proposals", agnostic)
    x = _pixels()
    metas = _metas(2, 64, 96)
    single = model(x, None, metas, mode="predict")
    merged = model([x, x], None, [metas, metas], mode="predict_aug")
    for a, b in zip(merged, single):
        assert len(a["scores"]) == len(b["scores"]) > 0
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-5, atol=1e-4)
        assert torch.equal(a["labels"], b["labels"])
        assert [int(a["masks"].to_full(i).sum()) for i in range(len(a["masks"]))] == \
            [int(b["masks"].to_full(i).sum()) for i in range(len(b["masks"]))]


@torch.no_grad()
def test_merge_averages_boxes_and_scores_of_the_views(monkeypatch) -> None:
    """The R-CNN merge of mmdet 2.x ``merge_aug_bboxes`` on hand-made view outputs: each view's class boxes mapped
    back to the original image and averaged, the softmax scores averaged, then NMS; one image, one proposal."""
    model = _model()
    roi = model.roi_head
    c = roi.num_classes
    prop = torch.tensor([[20.0, 10.0, 60.0, 50.0, 0.9]])
    calls = []

    def proposals(outs, metas, cfg=None):  # the same object in both views, in each view's frame
        return [torch.cat([bbox_mapping(prop[None, :, :4], [m])[0], prop[:, 4:]], 1) for m in metas]

    def box_predictions(feats, props, valid, img_shapes):
        calls.append(props.clone())
        view = len(calls) - 1
        probs = torch.zeros(props.shape[0], props.shape[1], c + 1)
        probs[..., 0] = 0.6 if view == 0 else 0.2  # class 0: averaged to 0.4
        probs[..., -1] = 1 - probs[..., 0]
        boxes = props[:, :, None, :].repeat(1, 1, c, 1).clone()
        boxes[..., 0] += 4.0 if view == 0 else -2.0  # view frame: +4 px (scale 1) / -2 px (scale 2: -1 original px)
        return boxes, probs

    monkeypatch.setattr(model.rpn_head, "proposals", proposals)
    monkeypatch.setattr(roi, "box_predictions", box_predictions)
    monkeypatch.setattr(roi, "with_mask", False)
    x = _pixels(1)
    big = torch.nn.functional.interpolate(x.float(), scale_factor=2.0).to(torch.uint8)
    metas = [_metas(1, 64, 96), _metas(1, 128, 192, scale_factor=(2.0, 2.0))]
    det = model([x, big], None, metas, mode="predict_aug")[0]
    # the merged proposal mapped into each view: as is, then x2
    assert torch.allclose(calls[0][0, 0], prop[0, :4]) and torch.allclose(calls[1][0, 0], prop[0, :4] * 2)
    top = det["scores"].argmax()
    assert det["labels"][top] == 0 and det["scores"][top] == pytest.approx(0.4)
    # x1: (20 + 4) in view 0, (40 - 2) / 2 = 19 in view 1 -> averaged 21.5
    assert det["boxes"][top].tolist() == pytest.approx([21.5, 10.0, 60.0, 50.0])


@torch.no_grad()
def test_flip_tta_masks_live_in_the_original_image() -> None:
    """Original + horizontally flipped view: detections and masks are in the original image's frame and size."""
    model = _model()
    x = _pixels(1, 64, 96)
    metas = [_metas(1, 64, 96, ori_shape=(64, 96)), _metas(1, 64, 96, flip=True, flip_direction="horizontal")]
    det = model([x, x.flip(-1)], None, metas, mode="predict_aug")[0]
    assert len(det["boxes"]) > 0 and len(det["masks"]) == len(det["boxes"])
    assert (det["masks"].height, det["masks"].width) == (64, 96)
    assert det["boxes"][:, 2].max() <= 96 + 1e-3 and det["boxes"][:, 3].max() <= 64 + 1e-3
    assert (det["boxes"][:, 2:] >= det["boxes"][:, :2]).all()


@torch.no_grad()
def test_bf16_inference_runs_the_heads_in_bf16_and_keeps_boxes_float32() -> None:
    model = _model().fuse()
    x = _pixels(1)
    ref = model(x, mode="predict")[0]
    seen = []
    hook = model.roi_head.bbox_head.shared_fcs[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model.set_precision("bf16")
    got = model(x, mode="predict")[0]
    hook.remove()
    assert seen == [torch.bfloat16]  # the box head under autocast
    assert got["boxes"].dtype == torch.float32 and got["scores"].dtype == torch.float32
    assert len(got["masks"]) == len(got["boxes"]) > 0
    # bf16 moves scores a little: the best detections stay (same label, boxes within a few pixels)
    n = 10
    best = box_iou(ref["boxes"][:n], got["boxes"]).max(1).values
    assert (best > 0.7).float().mean() >= 0.8, best


def test_data_flag_sizes_the_roi_heads_from_the_dataset(tmp_path) -> None:
    root = make_synthetic_coco(tmp_path / "synth", num_train=2, num_val=1, size=64, seed=0)["root"]
    ann = json.loads((root / "annotations" / "instances_train.json").read_text())
    ann["categories"].append({"id": 4, "name": "star"})  # a fourth class
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann if split == "train" else {
            **json.loads((root / "annotations" / "instances_val.json").read_text()),
            "categories": ann["categories"]}))
    cfg = load_config("mask_rcnn_r50_fpn_1x_coco", data=root)
    roi = cfg.model["roi_head"]
    assert roi["bbox_head"]["num_classes"] == 4 and roi["mask_head"]["num_classes"] == 4
    assert cfg.data.train.with_mask is True
    with pytest.raises(Exception, match="roi_head.bbox_head.num_classes is 80"):
        load_config("mask_rcnn_r50_fpn_1x_coco", ["model.roi_head.bbox_head.num_classes=80"], data=root)


def test_data_check_of_a_two_stage_config_assigns_the_rpn_anchors(tmp_path) -> None:
    """One 32x32 box centred on a stride-4 grid point: the RPN's P2 anchor of ratio 1 (8 x 4 = 32 px) matches it with
    IoU 1, the four anchors one grid step away along x or y with IoU 28*32 / (2*1024 - 28*32) = 0.78 >= 0.7; the
    diagonal neighbours (0.62), the other ratios (0.55) and the 64 px P3 anchors (0.25) stay below. Expected
    positives per level: P2..P6 = 5, 0, 0, 0, 0."""
    root = tmp_path / "d"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        Image.new("RGB", (320, 320)).save(root / split / "0.png")
        coco = {"images": [{"id": 1, "file_name": "0.png", "width": 320, "height": 320}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [84, 84, 32, 32]}],
                "categories": [{"id": 1, "name": "a"}]}
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    text, _, res = data_check(root, "mask_rcnn_r18_fpn_synth", out_png=tmp_path / "c.png",
                              overrides=["data.train.pipeline=[{type: Resize, img_scale: [320, 320]}]"])
    report = res["assignment"]
    assert report.head == "RPNHead"
    assert report.level_names == ["P2", "P3", "P4", "P5", "P6"]
    assert report.pos_per_level == [5, 0, 0, 0, 0], text
    assert "P2" in text and "RPNHead" in text


def test_reset_classifier_resizes_the_class_layers_and_detection_cfg_is_the_rcnn_stage() -> None:
    model = _model()
    model.reset_classifier(5)
    assert model.num_classes == 5
    assert model.roi_head.bbox_head.fc_cls.out_features == 6 and model.roi_head.bbox_head.fc_reg.out_features == 20
    assert model.roi_head.mask_head.conv_logits.out_channels == 5
    model.set_score_thr(0.3)
    assert model.detection_cfg is model.roi_head.nms_cfg and model.roi_head.nms_cfg.score_thr == 0.3
    with torch.no_grad():
        det = model(_pixels(1), mode="predict")[0]
    assert det["labels"].numel() == 0 or int(det["labels"].max()) < 5
    assert (det["scores"] > 0.3).all()
