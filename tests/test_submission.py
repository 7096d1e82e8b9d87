"""COCO test-dev submissions (issue 19, item 3): `densedet test --format-only`, automatic for an image-info file
without `annotations`; the server's file naming and zip; the test-dev config variants."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_ATSS, val_resize

from densedet.cli import _build_eval_dataset, main
from densedet.config import load_config
from densedet.data import SYNTH_CLASSES, CocoDataset, make_synthetic_coco
from densedet.engine.checkpoint import save_checkpoint
from densedet.errors import DataError
from densedet.evaluation import algorithm_name, coco_testset_name, submission_file_name, write_coco_submission
from densedet.models.build import build_detector

CFG = "atss_r18_fpn_synth"
TINY = [*TINY_ATSS, "model.test_cfg.score_thr=0.0", val_resize(64), "data.workers_per_gpu=0"]


def _image_info(ann_file: Path, out: Path) -> Path:
    """An image-info file as COCO ships image_info_test-dev2017.json: images and categories, no 'annotations'."""
    coco = json.loads(ann_file.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": {"description": "hand-made test-dev"}, "images": coco["images"],
                               "categories": coco["categories"]}))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("submission")
    torch.manual_seed(0)
    ckpt = root / "model.pth"
    save_checkpoint(ckpt, build_detector(load_config(CFG, TINY).model), meta={"classes": list(SYNTH_CLASSES)})
    paths = make_synthetic_coco(root / "data", num_train=1, num_val=3, size=96, seed=0)
    return ckpt, paths


def test_name_parts() -> None:
    assert coco_testset_name("annotations/image_info_test-dev2017.json") == "test-dev2017"
    assert coco_testset_name("instances_val2017.json") == "val2017"
    assert coco_testset_name("my_split.json") == "my-split"
    assert algorithm_name("vfnet_r50_fpn_1x_coco") == "vfnet-r50-fpn-1x-coco"
    assert algorithm_name("retinanet.1x.biformer_small") == "retinanet-1x-biformer-small"
    assert submission_file_name("test-dev2017", "fakeRCNN") == "detections_test-dev2017_fakeRCNN_results.json"
    with pytest.raises(ValueError):
        algorithm_name("__")


def test_submission_zip_holds_the_json_alone_at_its_root(tmp_path: Path) -> None:
    results = [{"image_id": 1, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    sub = write_coco_submission(results, tmp_path, "test-dev2017", "demo")
    name = "detections_test-dev2017_demo_results.json"
    assert sub.json_path == tmp_path / name and sub.zip_path == tmp_path / "detections_test-dev2017_demo_results.zip"
    with zipfile.ZipFile(sub.zip_path) as z:
        assert z.namelist() == [name]  # no folder inside: the server reads the root
        assert z.getinfo(name).compress_type == zipfile.ZIP_DEFLATED
        assert json.loads(z.read(name)) == results
    segm = [{"image_id": 1, "category_id": 3, "segmentation": {"size": [4, 4], "counts": "04L"}, "score": 0.5}]
    sub = write_coco_submission(segm, tmp_path, "test-dev2017", "demo", iou_type="segm")
    assert sub.zip_path == tmp_path / "segm" / "detections_test-dev2017_demo_results.zip"
    with pytest.raises(ValueError, match="no 'segmentation'"):
        write_coco_submission(results, tmp_path, "test-dev2017", "demo", iou_type="segm")


def test_dataset_reads_an_image_info_file_in_test_mode_only(setup, tmp_path: Path) -> None:
    _, paths = setup
    info = _image_info(paths["val_ann_file"], tmp_path / "image_info_test-dev2017.json")
    ds = CocoDataset(info, paths["val_img_dir"], test_mode=True)
    assert not ds.has_annotations and len(ds) == 3 and ds.classes == list(SYNTH_CLASSES)
    assert len(ds[0]["boxes"]) == 0
    assert CocoDataset(paths["val_ann_file"], paths["val_img_dir"], test_mode=True).has_annotations
    with pytest.raises(DataError, match="annotations"):
        CocoDataset(info, paths["val_img_dir"], test_mode=False)


def test_test_without_annotations_writes_the_submission_not_metrics(setup, tmp_path: Path, capsys) -> None:
    ckpt, paths = setup
    data = Path(paths["root"])
    # the normal test on the annotated val file, then the same images through an image-info file
    assert main(["test", CFG, str(ckpt), "--out", str(tmp_path / "val"), f"data.root={data}", *TINY]) == 0
    evaluated = json.loads((tmp_path / "val" / "results.bbox.json").read_text())
    capsys.readouterr()
    info = _image_info(paths["val_ann_file"], data / "annotations" / "image_info_test-dev2017.json")
    out = tmp_path / "dev"
    assert main(["test", CFG, str(ckpt), "--out", str(out), f"data.root={data}", f"data.val.ann_file={info}",
                 *TINY]) == 0
    captured = capsys.readouterr()
    assert "has no 'annotations'" in captured.err
    assert "Average Precision" not in captured.out  # no metrics
    assert not (out / "metrics.json").exists()
    name = "detections_test-dev2017_atss-r18-fpn-synth_results"
    with zipfile.ZipFile(out / f"{name}.zip") as z:
        submitted = json.loads(z.read(f"{name}.json"))
    assert submitted == evaluated and submitted  # the same detections the evaluation scored
    assert {r["image_id"] for r in submitted} <= {im["id"] for im in json.loads(info.read_text())["images"]}


def test_format_only_on_an_annotated_file_and_names(setup, tmp_path: Path) -> None:
    ckpt, paths = setup
    out = tmp_path / "fmt"
    assert main(["test", CFG, str(ckpt), "--out", str(out), "--format-only", "--testset", "test-challenge2017",
                 "--alg", "MyDet", f"data.root={paths['root']}", *TINY]) == 0
    assert (out / "detections_test-challenge2017_MyDet_results.zip").is_file()
    assert not (out / "metrics.json").exists() and not (out / "confusion_matrix.png").exists()


def test_mask_model_submits_boxes_and_masks_separately(setup, tmp_path: Path) -> None:
    _, paths = setup
    cfg = "mask_rcnn_r18_fpn_synth"
    tiny = ["model.backbone.base_channels=8", "model.neck.in_channels=[8,16,32,64]", "model.neck.out_channels=16",
            "model.rpn_head.in_channels=16", "model.rpn_head.feat_channels=16",
            "model.roi_head.bbox_roi_extractor.out_channels=16", "model.roi_head.mask_roi_extractor.out_channels=16",
            "model.roi_head.bbox_head.in_channels=16", "model.roi_head.bbox_head.fc_out_channels=32",
            "model.roi_head.mask_head.in_channels=16", "model.roi_head.mask_head.conv_out_channels=16",
            "model.roi_head.mask_head.num_convs=1", "model.test_cfg.rcnn.score_thr=0.0",
            "model.backbone.pretrained=null", val_resize(64), "data.workers_per_gpu=0"]
    torch.manual_seed(0)
    ckpt = tmp_path / "mask.pth"
    save_checkpoint(ckpt, build_detector(load_config(cfg, tiny).model), meta={"classes": list(SYNTH_CLASSES)})
    out = tmp_path / "out"
    assert main(["test", cfg, str(ckpt), "--out", str(out), "--format-only", f"data.root={paths['root']}",
                 *tiny]) == 0
    name = "detections_val_mask-rcnn-r18-fpn-synth_results"  # synthetic set: annotations/instances_val.json
    boxes = json.loads((out / f"{name}.json").read_text())
    masks = json.loads((out / "segm" / f"{name}.json").read_text())
    assert boxes and len(boxes) == len(masks)
    assert "bbox" in boxes[0] and "segmentation" not in boxes[0]
    assert "segmentation" in masks[0] and "bbox" not in masks[0]
    assert isinstance(masks[0]["segmentation"]["counts"], str)
    with zipfile.ZipFile(out / "segm" / f"{name}.zip") as z:
        assert z.namelist() == [f"{name}.json"]


def test_test_dev_variants_point_at_image_info_and_keep_the_model() -> None:
    pairs = {"vfnet_r50_fpn_1x_coco_test-dev": "vfnet_r50_fpn_1x_coco",
             "vfnetx_r2_101_fpn_mdconv_c3-c5_mstrain_59e_coco_1800x1200_test-dev":
                 "vfnetx_r2_101_fpn_mdconv_c3-c5_mstrain_59e_coco_1800x1200",
             "umop_swin-L_fpn_2x_coco_mstrain_mstest_test-dev": "umop_swin-L_fpn_2x_coco_mstrain_mstest"}
    for variant, row in pairs.items():
        cfg, ref = load_config(variant), load_config(row)
        assert cfg.model == ref.model and cfg.data.val == ref.data.val
        assert cfg.data.test.ann_file == "annotations/image_info_test-dev2017.json"
        assert cfg.data.test.img_dir == "test2017"
    # UMOP's MS-test row keeps its 4-scale x flip test pipeline on test-dev
    umop = load_config("umop_swin-L_fpn_2x_coco_mstrain_mstest_test-dev")
    assert umop.data.test.pipeline[0]["type"] == "MultiScaleFlipAug"


def test_base_file_end_to_end(setup, tmp_path: Path) -> None:
    """A config built on _base_/coco_test-dev.yaml: `densedet test` reads data.test by default, with data.val's
    pipeline, and writes the test-dev submission."""
    ckpt, paths = setup
    root = tmp_path / "coco"
    (root / "test2017").mkdir(parents=True)
    for p in Path(paths["val_img_dir"]).iterdir():
        (root / "test2017" / p.name).write_bytes(p.read_bytes())
    _image_info(paths["val_ann_file"], root / "annotations" / "image_info_test-dev2017.json")
    config = tmp_path / "mine_test-dev.yaml"
    config.write_text(f"_base_: [{CFG}, _base_/coco_test-dev.yaml]\ndata:\n  root: {root}\n")
    cfg = load_config(config, TINY)
    ds = _build_eval_dataset(cfg, "test")
    assert not ds.has_annotations and ds.pipeline.transforms[0].img_scale == [(64, 64)]
    out = tmp_path / "out"
    assert main(["test", str(config), str(ckpt), "--out", str(out), *TINY]) == 0
    assert (out / "detections_test-dev2017_mine-test-dev_results.zip").is_file()
