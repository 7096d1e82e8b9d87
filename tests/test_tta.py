"""Test-time augmentation: MultiScaleFlipAug views, mapping boxes back, merging views, the dataset / evaluator /
predictor paths and the TTA configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densedet.config import load_config
from densedet.data import CocoDataset, build_dataloader, build_pipeline, make_synthetic_coco, tta_pipeline
from densedet.data.tta import MultiScaleFlipAug
from densedet.engine.evaluator import run_inference
from densedet.inference.predictor import Predictor
from densedet.models.build import build_detector
from densedet.models.tta import bbox_mapping_back
from densedet.registry import ConfigError

# a step after Resize that is not a flip (CutOut that never cuts)
EXTRA = {"type": "CutOut", "n_holes": 1, "cutout_shape": [4, 4], "cutout_p": 0.0}
TINY = [
    "model.backbone.base_channels=8", "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
    "model.bbox_head.in_channels=16", "model.bbox_head.feat_channels=16", "model.bbox_head.stacked_convs=1",
    "model.bbox_head.norm_cfg={type: GN, num_groups: 4}", "model.test_cfg.score_thr=0.0",
]


def _msfa(scales, flip=True, **kw):
    return {"type": "MultiScaleFlipAug", "img_scale": scales, "flip": flip,
            "transforms": [{"type": "Resize", "keep_ratio": True}, {"type": "RandomFlip"}], **kw}


def _sample(h=20, w=40, boxes=((4.0, 2.0, 12.0, 18.0),)):
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return {"img": img, "boxes": np.array(boxes, np.float32).reshape(-1, 4), "labels": np.zeros(len(boxes), np.int64),
            "ignore_boxes": np.zeros((0, 4), np.float32),
            "meta": {"image_id": 7, "ori_shape": (h, w), "img_shape": (h, w), "scale_factor": (1.0, 1.0),
                     "flip": False}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_config("atss_r18_fpn_synth", TINY)
    return build_detector({**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}}).eval()


# ----------------------------------------------------------------------------------------------- mapping back
def test_bbox_mapping_back_hand_example() -> None:
    # original image 100 x 50 (w x h), box [10, 5, 30, 25]
    # view 0: resized 2x -> 200 x 100, box [20, 10, 60, 50], then flipped: x1' = 200 - 60, x2' = 200 - 20
    # view 1: resized 2x, not flipped; view 2: flipped vertically at scale 1: y1' = 50 - 25, y2' = 50 - 5
    boxes = torch.tensor([[[140.0, 10.0, 180.0, 50.0]], [[20.0, 10.0, 60.0, 50.0]], [[10.0, 25.0, 30.0, 45.0]]])
    metas = [{"img_shape": (100, 200), "scale_factor": (2.0, 2.0), "flip": True, "flip_direction": "horizontal"},
             {"img_shape": (100, 200), "scale_factor": (2.0, 2.0), "flip": False, "flip_direction": None},
             {"img_shape": (50, 100), "scale_factor": (1.0, 1.0), "flip": True, "flip_direction": "vertical"}]
    out = bbox_mapping_back(boxes, metas)
    assert torch.equal(out, torch.tensor([[10.0, 5.0, 30.0, 25.0]]).expand(3, 1, 4))


def test_views_order_sizes_and_boxes_round_trip() -> None:
    aug = MultiScaleFlipAug(**{k: v for k, v in _msfa([[80, 40], [40, 20]]).items() if k != "type"})
    out = aug(_sample())
    views = out["views"]
    # mmdet order: per scale, unflipped then flipped
    assert [(v["meta"]["img_shape"], v["meta"]["flip"]) for v in views] == [
        ((40, 80), False), ((40, 80), True), ((20, 40), False), ((20, 40), True)]
    assert views[1]["meta"]["flip_direction"] == "horizontal" and views[0]["meta"]["flip_direction"] is None
    # 40x20 -> 80x40 (factor 2): box [8, 4, 24, 36]; flipped in an 80-wide image: [80 - 24, 4, 80 - 8, 36]
    assert np.allclose(views[1]["boxes"], [[56.0, 4.0, 72.0, 36.0]])
    assert tuple(views[1]["img"].shape) == (40, 80, 3)  # (H, W, 3) pixels until the dataset makes tensors
    # the flipped view's pixels are the unflipped view's, mirrored
    assert np.array_equal(views[1]["img"], views[0]["img"][:, ::-1])
    for v in views:  # every view's boxes map back to the original box
        back = bbox_mapping_back(torch.from_numpy(v["boxes"])[None], [v["meta"]])[0]
        assert torch.allclose(back, torch.tensor([[4.0, 2.0, 12.0, 18.0]]))
    assert out["meta"]["image_id"] == 7


def test_single_scale_in_one_pair_and_directions() -> None:
    aug = MultiScaleFlipAug([{"type": "Resize"}, {"type": "RandomFlip"}], img_scale=[64, 32], flip=True,
                            flip_direction=["horizontal", "vertical"])
    assert aug.img_scale == [(64, 32)] and aug.num_views == 3
    assert [v[2] for v in aug.views] == [None, "horizontal", "vertical"]


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"flip": True, "transforms": [{"type": "Resize"}, EXTRA]}, "MultiScaleFlipAug.flip"),
    ({"transforms": [EXTRA]}, "MultiScaleFlipAug.transforms"),
    ({"scale_factor": [1.0, 2.0]}, "MultiScaleFlipAug.scale_factor"),
    ({"img_scale": [[1333]]}, "MultiScaleFlipAug.img_scale"),
    ({"flip_direction": "diagonal"}, "MultiScaleFlipAug.flip_direction"),
    ({"transforms": [{"type": "Resize", "ratio_range": [0.5, 1.5]}]}, "ratio_range"),
    ({"transforms": [{"type": "Resise"}]}, "MultiScaleFlipAug.transforms"),
    ({"flipp": True}, "flipp"),
])
def test_bad_config_names_the_key(kwargs, key) -> None:
    cfg = {"type": "MultiScaleFlipAug", "img_scale": [64, 32], "transforms": [{"type": "Resize"}], **kwargs}
    with pytest.raises(ConfigError, match=key):
        build_pipeline([cfg], "data.val.pipeline")


def test_tta_switch() -> None:
    plain = [{"type": "Resize", "img_scale": [96, 64], "keep_ratio": True}, EXTRA]
    on = tta_pipeline(plain, True)
    assert on == [{"type": "MultiScaleFlipAug", "img_scale": [96, 64], "flip": True,
                   "transforms": [plain[0], {"type": "RandomFlip"}, EXTRA]}]
    assert tta_pipeline(on, True) == on and tta_pipeline(plain, None) == plain and tta_pipeline(plain, False) == plain
    off = tta_pipeline([_msfa([[96, 64], [128, 96]])], False)
    assert off[0]["img_scale"] == [96, 64] and off[0]["flip"] is False
    assert build_pipeline(off).transforms[0].num_views == 1
    with pytest.raises(ConfigError, match=r"data.val.pipeline\[0\].img_scale"):
        tta_pipeline([{"type": "Resize", "img_scale": [[96, 64], [128, 96]]}, EXTRA], True)


# ----------------------------------------------------------------------------------------------- merging views
def _views(images: torch.Tensor):
    """Original, horizontally flipped and 2x-resized views of a (B, 3, H, W) batch, with their metas."""
    b, _, h, w = images.shape
    base = {"img_shape": (h, w), "scale_factor": (1.0, 1.0), "flip": False, "flip_direction": None}
    big = F.interpolate(images, scale_factor=2.0, mode="bilinear", align_corners=False)
    metas = [[dict(base) for _ in range(b)],
             [{**base, "flip": True, "flip_direction": "horizontal"} for _ in range(b)],
             [{**base, "img_shape": (2 * h, 2 * w), "scale_factor": (2.0, 2.0)} for _ in range(b)]]
    return [images, images.flip(-1), big], metas


@torch.no_grad()
def test_merge_is_the_union_of_the_views_mapped_back(model) -> None:
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    head = model.bbox_head
    old = head.test_cfg.nms, head.test_cfg.max_per_img
    head.test_cfg.nms, head.test_cfg.max_per_img = {"type": "nms", "iou_threshold": 1.0}, -1  # keep all (mmdet)
    try:
        views, metas = _views(images)
        merged = model(views, None, metas, mode="predict_aug")
        # expectation: each view predicted alone (boxes / scale_factor), the flipped view's boxes un-flipped by
        # hand in the 64-wide original (x1 = 64 - x2, x2 = 64 - x1), all candidates together, sorted by score
        per_view = [model(v, None, m, mode="predict") for v, m in zip(views, metas)]
        for d in per_view[1]:
            x1, y1, x2, y2 = d["boxes"].unbind(-1)
            d["boxes"] = torch.stack([64 - x2, y1, 64 - x1, y2], -1)
    finally:
        head.test_cfg.nms, head.test_cfg.max_per_img = old
    def rows(scores, labels, boxes):  # detections of exactly equal score may come in any order: sort them
        table = torch.cat([scores[:, None].double(), labels[:, None].double(), boxes.double()], 1)
        keys = torch.cat([-table[:, :2], torch.round(table[:, 2:] * 1e3)], 1).tolist()  # exact scores, labels
        order = sorted(range(len(table)), key=lambda r: keys[r])
        return table[order]

    for i in range(2):
        scores = torch.cat([pv[i]["scores"] for pv in per_view])
        boxes = torch.cat([pv[i]["boxes"] for pv in per_view])
        labels = torch.cat([pv[i]["labels"] for pv in per_view])
        assert len(merged[i]["scores"]) == len(scores) > 100
        assert torch.equal(merged[i]["scores"], scores.sort(descending=True)[0])  # sorted by score
        got, want = rows(merged[i]["scores"], merged[i]["labels"], merged[i]["boxes"]), rows(scores, labels, boxes)
        assert torch.equal(got[:, :2], want[:, :2])
        assert torch.allclose(got[:, 2:], want[:, 2:], atol=1e-4)


@torch.no_grad()
def test_identical_views_merge_to_the_single_view_result(model) -> None:
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    views, metas = _views(images)
    single = model(images, None, metas[0], mode="predict")
    # the merge path (two views): every candidate twice, the copy is suppressed by NMS (IoU 1)
    twice = model([images, images], None, [metas[0], metas[0]], mode="predict_aug")
    for a, b in zip(single, twice):
        assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["boxes"], b["boxes"])
    # one view is exactly predict (mmdet's simple_test)
    one = model([images], None, [metas[0]], mode="predict_aug")
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(single, one))
    with pytest.raises(ValueError, match="same images"):
        model([images, images[:1]], None, [metas[0], metas[0][:1]], mode="predict_aug")


@torch.no_grad()
def test_merge_with_soft_nms_runs_and_is_sorted(model) -> None:
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    head = model.bbox_head
    old = head.test_cfg.nms
    head.test_cfg.nms = {"type": "soft_nms", "iou_threshold": 0.6, "method": "gaussian", "sigma": 0.5,
                         "min_score": 1e-3}
    views, metas = _views(images)
    try:
        out = model(views, None, metas, mode="predict_aug")[0]
    finally:
        head.test_cfg.nms = old
    assert 0 < len(out["scores"]) <= head.test_cfg.max_per_img
    assert (out["scores"][:-1] >= out["scores"][1:]).all()


# ----------------------------------------------------------------------------------------------- data paths
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("tta"), num_train=1, num_val=3, size=96, seed=0)


def test_dataset_loader_and_inference_with_tta(synth, model) -> None:
    ds = CocoDataset(synth["val_ann_file"], synth["val_img_dir"], pipeline=[_msfa([[96, 96], [128, 128]])],
                     test_mode=True)
    item = ds[0]
    assert len(item["views"]) == 4 and item["views"][3]["meta"]["img_shape"] == (128, 128)
    loader = build_dataloader(ds, batch_size=2, num_workers=0, shuffle=False, seed=0, size_divisor=32)
    batch = next(iter(loader))
    assert len(batch["views"]) == 4 and batch["views"][2]["images"].shape == (2, 3, 128, 128)
    assert [m["image_id"] for m in batch["metas"]] == [m["image_id"] for m in batch["views"][3]["metas"]]
    dets = run_inference(model, loader, "cpu")
    assert len(dets) == 3
    for d in dets:  # boxes in original (96 x 96) pixels, clipped per view then mapped back
        assert 0 < len(d["boxes"]) <= 100
        assert d["boxes"].min() >= 0 and d["boxes"].max() <= 96 + 1e-4


def test_single_view_tta_equals_plain_pipeline_in_predictor() -> None:
    torch.manual_seed(0)
    cfg = load_config("atss_r18_fpn_synth", TINY + ["data.val.pipeline=[{type: MultiScaleFlipAug, "
                      "img_scale: [80, 60], flip: false, transforms: [{type: Resize}, {type: RandomFlip}]}]"])
    pred = Predictor(cfg, None, device="cpu")
    img = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    tta = pred(img)
    pred.pipeline = build_pipeline([{"type": "Resize", "img_scale": [80, 60]}])
    plain = pred(img)
    assert len(tta["scores"]) > 0
    for k in ("boxes", "scores", "labels"):
        assert torch.equal(tta[k], plain[k])
    flip = Predictor(cfg, None, device="cpu", tta=True)  # MultiScaleFlipAug already there: unchanged, one view
    assert flip.pipeline.transforms[0].num_views == 1
    flip = Predictor(load_config("atss_r18_fpn_synth", TINY), None, device="cpu", tta=True)
    assert flip.pipeline.transforms[0].num_views == 2
    out = flip([img, img[:, ::-1].copy()])
    assert all(d["boxes"][:, 2].max() <= 70 + 1e-4 and d["boxes"][:, 3].max() <= 50 + 1e-4 for d in out)


# ----------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["umop_swin-L_fpn_2x_coco_mstrain_mstest", "vfnet_r50_fpn_1x_coco_tta"])
def test_tta_configs_build_and_pipelines_parse(name) -> None:
    cfg = load_config(name)
    for split in ("val", "test"):
        pipe = build_pipeline(getattr(cfg.data, split).pipeline, f"data.{split}.pipeline")
        aug = pipe.transforms[0]
        assert isinstance(aug, MultiScaleFlipAug) and aug.num_views == 8
        assert aug.img_scale == [(1200, 800), (1300, 900), (1500, 1000), (1600, 1200)]
    out = aug(_sample(h=100, w=200))
    assert out["views"][0]["meta"]["img_shape"] == (600, 1200)  # 200x100 at (1200, 800): factor min(6, 8) = 6


def test_cli_test_uses_the_config_tta_and_no_tta_switches_it_off(synth, model, tmp_path) -> None:
    import json

    from densedet.cli import main
    from densedet.engine.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "tiny.pth", model)
    common = [*TINY, f"data.root={synth['root']}", "data.workers_per_gpu=0", "data.val_samples_per_gpu=2"]
    msfa = ("data.val.pipeline=[{type: MultiScaleFlipAug, img_scale: [96, 96], flip: true, transforms: "
            "[{type: Resize}, {type: RandomFlip}]}]")
    plain = "data.val.pipeline=[{type: Resize, img_scale: [96, 96]}]"
    runs = {"tta": [msfa], "no_tta": [msfa, "--no-tta"], "plain": [plain], "plain_tta": [plain, "--tta"]}
    results = {}
    for name, extra in runs.items():
        assert main(["test", "atss_r18_fpn_synth", str(ckpt), "--out", str(tmp_path / name), *common, *extra]) == 0
        results[name] = json.loads((tmp_path / name / "results.bbox.json").read_text())
    assert results["no_tta"] == results["plain"]  # first scale, no flip: plain single-scale testing
    assert results["tta"] == results["plain_tta"]  # --tta on a plain pipeline: flip TTA at its scale
    assert results["tta"] != results["plain"]
