"""ONNX export of Mask R-CNN: boxes + 28x28 masks per detection from the graph, equal to eager PyTorch in
onnxruntime (boxes, labels, pasted masks), the padded output contract, a dynamic batch, and `densedet test` of the
exported file giving the eager model's bbox and segm AP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_maskrcnn_train import make_cfg

from densedet.cli import main
from densedet.data import make_synthetic_coco


@pytest.fixture(autouse=True)
def _need_export_deps():
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(mod)


def test_export_cli_checks_boxes_and_pasted_masks(tmp_path, capsys):
    """The synth Mask R-CNN (random weights, score_thr 0 so the R-CNN NMS and the mask head get 100 detections):
    the CLI's check matches every eager detection and its pasted mask; the graph uses ONNX RoiAlign and
    NonMaxSuppression, and its masks are real 28x28 probability maps of each detection's own class."""
    import onnx

    from densedet.deploy import OnnxDetector

    torch.manual_seed(0)
    out = tmp_path / "mr.onnx"
    rc = main(["export", "mask_rcnn_r18_fpn_synth", "--out", str(out), "--size", "128x160",
               "model.test_cfg.rcnn.score_thr=0.0"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "PASS" in text and "100/100 eager detections matched" in text and "min mask IoU" in text, text
    assert "boxes, scores, labels, num_dets, masks" in text
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"RoiAlign", "NonMaxSuppression"} <= ops
    res = OnnxDetector(out).run(np.full((1, 3, 128, 160), 90, np.uint8))
    masks = res["masks"]
    assert masks.shape == (1, 100, 28, 28) and masks.dtype == np.float32
    assert 0.0 < masks.min() and masks.max() < 1.0  # sigmoid probabilities, every slot a detection here
    assert masks[0].std(axis=(1, 2)).min() > 0  # not constant maps


def test_faster_rcnn_without_a_mask_head_exports_boxes_only(tmp_path):
    from densedet import export
    from densedet.deploy import OnnxDetector

    torch.manual_seed(0)
    res = export("mask_rcnn_r18_fpn_synth", None, tmp_path / "f.onnx", size=(96, 128),
                 overrides=["model.roi_head.mask_head=null", "model.roi_head.mask_roi_extractor=null",
                            "model.test_cfg.rcnn.score_thr=0.0"])
    assert res.check["ok"] and res.check["eager"] == 100 and "min_mask_iou" not in res.check, res.check
    assert OnnxDetector(res.path).output_names == ["boxes", "scores", "labels", "num_dets"]


def test_static_multilevel_roi_align_equals_the_extractor_in_torch_and_onnxruntime(tmp_path):
    """roi_align_levels (every level on every RoI, empty boxes off-level) = SingleRoIExtractor (gathers RoIs per
    level), in eager and as ONNX RoiAlign in onnxruntime, on RoIs of all four levels including ones that cross or
    lie outside the image border, a degenerate one and sub-pixel ones."""
    import onnxruntime as ort
    from torch import nn

    from densedet.deploy.ops import OPSET
    from densedet.models.roi_heads import SingleRoIExtractor, map_roi_levels
    from densedet.models.roi_heads.roi_extractor import roi_align_levels

    ext = SingleRoIExtractor({"type": "RoIAlign", "output_size": 7, "sampling_ratio": 0}, 8, [4, 8, 16, 32])

    class Pool(nn.Module):
        def forward(self, f0, f1, f2, f3, rois):
            return roi_align_levels(ext, [f0, f1, f2, f3], rois)

    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 8, 96 // s, 128 // s, generator=g) for s in (4, 8, 16, 32)]
    rois = torch.tensor([[0, -20, -10, 30, 40], [1, 100, 70, 140, 110], [1, 10.3, 20.7, 11.1, 21.2],
                         [0, -50, -50, -10, -10], [0, 5, 5, 5, 5], [1, 2.5, 3.5, 90.25, 60.75],  # level 0
                         [0, 0, 0, 128, 96], [1, 60, 40, 200, 180],  # level 1 (112 <= sqrt(wh) < 224)
                         [0, -100, -80, 200, 150], [1, 0, 0, 300, 250],  # level 2
                         [0, -200, -200, 400, 300], [1, 50, 30, 700, 600]])  # level 3
    assert set(map_roi_levels(rois, 4).tolist()) == {0, 1, 2, 3}
    with torch.no_grad():
        ref = ext(feats, rois)
        # the extractor's CPU path is the sparse-product RoIAlign (same values to float rounding); the static
        # per-level path is torchvision's kernel, as the exported RoiAlign
        torch.testing.assert_close(Pool()(*feats, rois), ref, rtol=1e-5, atol=1e-6)
    names = ["f0", "f1", "f2", "f3", "rois"]
    torch.onnx.export(Pool().eval(), (*feats, rois), dynamo=True, opset_version=OPSET, input_names=names,
                      verbose=False).save(str(tmp_path / "roi.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "roi.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: t.numpy() for n, t in zip(names, [*feats, rois])})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_padded_output_contract_with_and_without_detections(tmp_path):
    """Two images of one batch keep different numbers of detections (the mask head runs on the larger count):
    each image's first num_dets slots are sorted detections with masks in (0, 1), the rest is padding (boxes,
    scores and masks 0, labels -1), equal to eager; a graph whose score_thr nothing passes gives only padding."""
    from densedet import export
    from densedet.config import load_config
    from densedet.deploy import OnnxDetector, build_deploy_module, check_onnx
    from densedet.inference import load_detector

    over = ["model.test_cfg.rcnn.score_thr=0.0", "model.test_cfg.rcnn.max_per_img=250"]
    torch.manual_seed(0)
    res = export("mask_rcnn_r18_fpn_synth", None, tmp_path / "p.onnx", size=(64, 96), batch=2, check=False,
                 overrides=over)
    # noise (a constant image ties many scores, and torch and onnxruntime may break ties differently)
    rng = np.random.default_rng(0)
    images = np.stack([rng.integers(0, 256, (3, 64, 96), dtype=np.uint8),
                       rng.integers(0, 64, (3, 64, 96), dtype=np.uint8)])
    out = OnnxDetector(res.path).run(images)
    assert out["boxes"].shape == (2, 250, 4) and out["masks"].shape == (2, 250, 28, 28)
    counts = [int(n) for n in out["num_dets"]]
    assert 0 < counts[0] < 250 and 0 < counts[1] < 250 and counts[0] != counts[1], counts
    for b, n in enumerate(counts):
        assert (out["labels"][b, :n] >= 0).all() and (out["scores"][b, :n] > 0).all()
        assert (np.diff(out["scores"][b, :n]) <= 0).all()
        assert (out["masks"][b, :n] > 0).all() and (out["masks"][b, :n] < 1).all()
        assert (out["boxes"][b, n:] == 0).all() and (out["scores"][b, n:] == 0).all()
        assert (out["labels"][b, n:] == -1).all() and (out["masks"][b, n:] == 0).all()
    cfg = load_config("mask_rcnn_r18_fpn_synth", over)
    torch.manual_seed(0)
    r = check_onnx(res.path, build_deploy_module(load_detector(cfg, None, device="cpu", backend="eager")), images)
    assert r["ok"] and r["masks_compared"] == r["eager"] > 0, r

    torch.manual_seed(0)
    # a fresh R-CNN classifier gives ~1 / (C + 1) = 0.25 to every class: nothing passes score_thr 0.9
    res = export("mask_rcnn_r18_fpn_synth", None, tmp_path / "n.onnx", size=(64, 96), max_det=7, check=False,
                 overrides=["model.test_cfg.rcnn.score_thr=0.9"])
    out = OnnxDetector(res.path).run(np.random.default_rng(0).integers(0, 256, (1, 3, 64, 96), dtype=np.uint8))
    assert out["boxes"].shape == (1, 7, 4) and out["masks"].shape == (1, 7, 28, 28)
    assert int(out["num_dets"][0]) == 0
    assert (out["boxes"] == 0).all() and (out["scores"] == 0).all() and (out["labels"] == -1).all()
    assert (out["masks"] == 0).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Mask R-CNN trained a few iterations on 96 px synthetic shapes with masks, and its dynamic export.

    Its mask logits are shifted by +3 (``conv_logits.bias``) so that a few-iteration model's masks mostly fill
    their boxes: squares and discs then overlap their gt masks and segm AP is above 0 (an untrained mask head
    gives segm AP 0 on both sides, which would compare nothing). The maps keep their shape (not all ones)."""
    from densedet import export
    from densedet.engine import Trainer

    root = tmp_path_factory.mktemp("mr_export")
    make_synthetic_coco(root / "data", num_train=8, num_val=4, size=96, seed=0)
    torch.manual_seed(0)
    cfg = make_cfg(root / "data", schedule={"epochs": 3})
    cfg.model["test_cfg"].setdefault("rcnn", {})["score_thr"] = 0.01  # barely trained: keep low scores
    Trainer(cfg, root / "w").train()
    ckpt = torch.load(root / "w" / "epoch_3.pth", map_location="cpu", weights_only=False)
    ckpt["state_dict"]["roi_head.mask_head.conv_logits.bias"] += 3.0
    torch.save({"state_dict": ckpt["state_dict"], "meta": ckpt.get("meta", {})}, root / "shifted.pth")
    cfg_file = root / "w" / "config.yaml"
    res = export(str(cfg_file), root / "shifted.pth", root / "dyn.onnx", dynamic=True, check=False)
    return {"root": root, "config": cfg_file, "ckpt": root / "shifted.pth", "onnx": res.path}


def test_dynamic_export_matches_eager_at_two_batch_sizes_and_sizes(trained):
    from densedet.config import load_config
    from densedet.deploy import OnnxDetector, build_deploy_module, check_onnx
    from densedet.inference import load_detector

    cfg = load_config(str(trained["config"]))
    deploy = build_deploy_module(load_detector(cfg, trained["ckpt"], device="cpu", backend="eager"))
    assert OnnxDetector(trained["onnx"]).dynamic
    rng = np.random.default_rng(1)
    for shape in [(1, 3, 96, 96), (2, 3, 80, 120)]:
        r = check_onnx(trained["onnx"], deploy, rng.integers(0, 256, shape, dtype=np.uint8))
        assert r["ok"] and r["eager"] > 0 and r["masks_compared"] == r["eager"], (shape, r)
        assert r["max_box_rel_diff"] <= 1e-3 and r["min_mask_iou"] >= 0.99


def test_predictor_with_the_onnx_file_returns_the_eager_masks_in_the_original_image(trained):
    """Predictor(config, model.onnx): resized input, boxes rescaled and masks pasted into the original 70x150
    image, equal to the eager Predictor's (same matching as the export check, mask IoU >= 0.99)."""
    from densedet.deploy.onnx_export import compare_detections, mask_iou
    from densedet.inference.predictor import Predictor

    image = np.random.default_rng(2).integers(0, 256, (70, 150, 3), dtype=np.uint8)
    eager = Predictor(str(trained["config"]), trained["ckpt"], device="cpu")(image)
    pred = Predictor(str(trained["config"]), trained["onnx"])
    assert type(pred.model).__name__ == "OnnxRuntimeModel"
    got = pred(image)
    keys = ("boxes", "scores", "labels")
    r = compare_detections({k: eager[k].numpy() for k in keys}, {k: got[k].numpy() for k in keys})
    assert r["ok"] and r["eager"] > 0, r
    assert (got["masks"].height, got["masks"].width) == (70, 150) and len(got["masks"]) == r["onnx"]
    assert min(mask_iou(eager["masks"], i, got["masks"], j) for i, j in r["pairs"]) >= 0.99
    assert sum(int(got["masks"].to_full(j).sum()) for _, j in r["pairs"]) > 0  # masks with pixels were compared


def _results_by_image(folder: Path) -> dict[int, dict[str, list]]:
    """results.bbox.json + results.segm.json (same order: one entry per detection) grouped by image."""
    boxes = json.loads((folder / "results.bbox.json").read_text())
    segms = json.loads((folder / "results.segm.json").read_text())
    assert len(boxes) == len(segms)
    out: dict[int, dict[str, list]] = {}
    for b, s in zip(boxes, segms):
        assert (b["image_id"], b["category_id"]) == (s["image_id"], s["category_id"])
        d = out.setdefault(b["image_id"], {"boxes": [], "scores": [], "labels": [], "segms": []})
        x, y, w, h = b["bbox"]
        d["boxes"].append([x, y, x + w, y + h])
        d["scores"].append(b["score"])
        d["labels"].append(b["category_id"])
        d["segms"].append(s["segmentation"])
    return out


def test_densedet_test_of_the_onnx_file_gives_the_eager_bbox_and_segm_ap(trained):
    """`densedet test` of the exported file (masks pasted by OnnxRuntimeModel) = eager `densedet test`: same AP,
    and every eager detection of the results files matched (box, label) with an RLE mask IoU >= 0.99."""
    from faster_coco_eval.core import mask as coco_mask

    from densedet.deploy.onnx_export import compare_detections

    out_e, out_o = trained["root"] / "t_eager", trained["root"] / "t_onnx"
    assert main(["test", str(trained["config"]), str(trained["ckpt"]), "--out", str(out_e)]) == 0
    assert main(["test", str(trained["config"]), str(trained["onnx"]), "--out", str(out_o)]) == 0
    eager = json.loads((out_e / "metrics.json").read_text())
    onnx = json.loads((out_o / "metrics.json").read_text())
    assert eager["bbox_mAP_50"] > 0 and eager["segm_mAP_50"] > 0, eager  # the comparison has matches to compare
    for key in ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50"):
        assert onnx[key] == pytest.approx(eager[key], abs=1e-3), key
    res_e, res_o = _results_by_image(out_e), _results_by_image(out_o)
    assert sorted(res_e) == sorted(res_o) and len(res_e) == 4
    for image_id, ref in res_e.items():
        got = res_o[image_id]
        arr = lambda d: {k: np.asarray(d[k], np.float64) for k in ("boxes", "scores", "labels")}  # noqa: E731
        r = compare_detections(arr(ref), arr(got))
        assert r["ok"] and r["eager"] > 0, (image_id, r)
        for i, j in r["pairs"]:
            iou = float(np.asarray(coco_mask.iou([ref["segms"][i]], [got["segms"][j]], [0])).reshape(-1)[0])
            assert iou >= 0.99, (image_id, i, iou)
    # densedet predict draws and writes the file's masks too
    out_p = trained["root"] / "p_onnx"
    assert main(["predict", str(trained["config"]), str(trained["onnx"]), str(trained["root"] / "data" / "val"),
                 "--out", str(out_p), "--limit", "2", "--score-thr", "0.0"]) == 0
    records = json.loads((out_p / "predictions.json").read_text())
    dets = [d for rec in records for d in rec["detections"]]
    assert dets and all("segmentation" in d for d in dets)
