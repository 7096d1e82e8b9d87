"""ONNX export: every head type through torch's dynamo exporter, run in onnxruntime, against eager PyTorch."""

import importlib.util

import numpy as np
import pytest
import torch

from densedet.cli import main
from densedet.deploy import EXPORT_INSTALL_HINT, compare_detections

# Tiny R-18 overrides for the COCO-sized R-50 configs (random weights; scores of a fresh head are ~0.01, so a low
# score_thr keeps candidates and NMS has real work).
TINY_R50 = ["model.backbone.depth=18", "model.backbone.base_channels=16", "model.backbone.out_indices=[0,1,2,3]",
            "model.backbone.frozen_stages=-1", "model.neck.in_channels=[16,32,64,128]", "model.neck.out_channels=32",
            "model.bbox_head.in_channels=32", "model.bbox_head.feat_channels=32", "model.bbox_head.stacked_convs=1",
            "model.bbox_head.num_classes=3"]
LOW_THR = ["model.test_cfg.score_thr=0.005"]

HEADS = [
    ("retinanet_r18_fpn_synth", []),
    ("fcos_r18_fpn_synth", []),
    ("fovea_r18_fpn_synth", []),
    ("reppoints_r18_fpn_synth", []),
    ("vfnet_r18_fpn_synth", []),  # DCN in the head: ONNX DeformConv
    ("umop_r50_fpn_1x_coco", TINY_R50),  # (its GN head needs > 1 value per group on the stride-128 level)
]
SIZES = {"umop_r50_fpn_1x_coco": (160, 192)}


def _need_export_deps():
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(mod)


@pytest.mark.parametrize("config,extra", HEADS, ids=[h[0].split("_")[0] for h in HEADS])
def test_export_matches_eager_in_onnxruntime(config, extra, tmp_path):
    """The exported graph (normalise, network, decode, NMS, padding) gives eager PyTorch's detections."""
    _need_export_deps()
    import onnx

    # Weights drawn per tensor name (tests/contract_fixture.py): a fresh head scores every location ~0.01, so its
    # candidates are near-ties that float rounding between torch and onnxruntime reorders; spread scores are not.
    from contract_fixture import fill_weights

    from densedet import export
    from densedet.config import load_config
    from densedet.models.build import build_detector

    cfg = load_config(config, extra + LOW_THR + ["model.backbone.pretrained=null"])
    model = build_detector(cfg.model, init=False)
    fill_weights(model)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    res = export(cfg, tmp_path / "w.pth", tmp_path / "m.onnx", size=SIZES.get(config, (96, 128)))
    assert res.check is not None and res.check["ok"], res.check
    assert res.check["eager"] > 0, "the check compared no detections"
    assert res.check["max_box_rel_diff"] <= 1e-3
    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert "NonMaxSuppression" in ops
    if config.startswith("vfnet"):
        assert "DeformConv" in ops and "GridSample" not in ops


def test_dcn_backbone_exports_as_deformconv(tmp_path):
    """mdconv rows: DCNv2 (modulated, with mask) in the backbone's stages 2-4."""
    _need_export_deps()
    import onnx

    from densedet import export

    torch.manual_seed(0)
    over = ["model.backbone.base_channels=8", "model.neck.in_channels=[32,64,128,256]", "model.neck.out_channels=32",
            "model.bbox_head.in_channels=32", "model.bbox_head.feat_channels=32", "model.bbox_head.stacked_convs=1",
            "model.bbox_head.num_classes=3"]
    res = export("vfnet_r50_fpn_mdconv_c3-c5_mstrain_2x_coco", None, tmp_path / "m.onnx", size=(160, 192),
                 overrides=over + LOW_THR)
    assert res.check["ok"] and res.check["eager"] > 0, res.check
    nodes = [n for n in onnx.load(str(res.path)).graph.node if n.op_type == "DeformConv"]
    assert len(nodes) > 3 and any(len(n.input) == 5 for n in nodes)  # v2: the mask input is wired


def test_dynamic_export_runs_at_two_sizes_and_in_the_predictor(tmp_path):
    """One dynamic export: exact at two batch sizes and two input sizes (one no multiple of 32: padded inside the
    graph), image by image, and the Predictor running the .onnx file gives the eager Predictor's detections."""
    _need_export_deps()
    from densedet import export
    from densedet.api import build_model
    from densedet.config import load_config
    from densedet.deploy import OnnxDetector, build_deploy_module, check_onnx
    from densedet.inference import Predictor, load_detector

    torch.manual_seed(0)
    ckpt = tmp_path / "random.pth"
    names = ["disc", "box", "wedge"]
    torch.save({"state_dict": build_model("atss_r18_fpn_synth").state_dict(), "meta": {"classes": names}}, ckpt)
    cfg = load_config("atss_r18_fpn_synth", LOW_THR)
    res = export(cfg, ckpt, tmp_path / "d.onnx", dynamic=True, size=(192, 288), check=False)
    assert OnnxDetector(res.path).dynamic
    deploy = build_deploy_module(load_detector(cfg, ckpt, device="cpu", backend="eager"))
    rng = np.random.default_rng(0)
    assert OnnxDetector(res.path).input_shape[0] != 2  # the batch is a named dynamic dim, not the traced 2
    for shape in [(1, 3, 96, 128), (3, 3, 150, 70)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        r = check_onnx(res.path, deploy, images)  # the worst image of the batch against eager
        assert r["ok"] and r["eager"] > 0, (shape, r)
        out = OnnxDetector(res.path).run(images)
        assert out["boxes"].shape == (shape[0], 100, 4) and out["num_dets"].shape == (shape[0],)
        if shape[0] > 1:  # each image of a batch gets its own detections (equal to that image run alone)
            alone = OnnxDetector(res.path).run(images[1:2])
            np.testing.assert_allclose(out["boxes"][1], alone["boxes"][0], rtol=1e-5, atol=1e-4)
            np.testing.assert_array_equal(out["labels"][1], alone["labels"][0])
            assert not np.array_equal(out["boxes"][0], out["boxes"][1])

    image = rng.integers(0, 256, (90, 200, 3), dtype=np.uint8)  # resized by the test pipeline to 144x320
    eager = Predictor(cfg, ckpt, device="cpu")(image)
    onnx_pred = Predictor(cfg, res.path)
    assert type(onnx_pred.model).__name__ == "OnnxRuntimeModel"
    got = onnx_pred(image)
    r = compare_detections({k: eager[k].numpy() for k in ("boxes", "scores", "labels")},
                           {k: got[k].numpy() for k in ("boxes", "scores", "labels")})
    assert r["ok"] and r["eager"] > 0, r
    assert got["class_names"] == eager["class_names"]  # the class names travel in the ONNX metadata
    assert onnx_pred.classes == names


def test_padded_output_contract_with_and_without_detections(tmp_path):
    _need_export_deps()
    from densedet import export
    from densedet.deploy import OnnxDetector

    torch.manual_seed(0)
    # 64x64: 86 locations x 3 classes = 258 candidates at most, fewer than max_det=300, so padding must appear
    res = export("atss_r18_fpn_synth", None, tmp_path / "p.onnx", size=(64, 64), max_det=300, check=False,
                 overrides=["model.test_cfg.score_thr=0.0101"])
    sess = OnnxDetector(res.path)
    black = np.zeros((1, 3, 64, 64), np.uint8)
    out = sess.run(black)
    assert out["boxes"].shape == (1, 300, 4) and out["scores"].shape == (1, 300) and out["labels"].shape == (1, 300)
    n = int(out["num_dets"][0])
    assert 0 < n <= 258  # mixed real and padded slots
    assert (out["labels"][0, :n] >= 0).all() and (out["scores"][0, :n] > 0).all()
    assert (np.diff(out["scores"][0, :n]) <= 0).all()  # sorted by score
    assert (out["boxes"][0, n:] == 0).all() and (out["scores"][0, n:] == 0).all() and (out["labels"][0, n:] == -1).all()

    none = export("atss_r18_fpn_synth", None, tmp_path / "n.onnx", size=(64, 64), max_det=20, check=False,
                  overrides=["model.test_cfg.score_thr=0.99"])
    out = OnnxDetector(none.path).run(black)
    assert int(out["num_dets"][0]) == 0
    assert (out["boxes"] == 0).all() and (out["scores"] == 0).all() and (out["labels"] == -1).all()


def test_no_nms_returns_the_eager_candidates(tmp_path):
    _need_export_deps()
    from densedet import export
    from densedet.config import load_config
    from densedet.deploy import OnnxDetector
    from densedet.inference import load_detector

    cfg = load_config("fcos_r18_fpn_synth", LOW_THR)
    torch.manual_seed(0)
    res = export(cfg, None, tmp_path / "c.onnx", size=(64, 96), nms=False, check=False)
    out = OnnxDetector(res.path).run(np.full((1, 3, 64, 96), 128, np.uint8))
    assert set(out) == {"boxes", "scores", "labels"}
    torch.manual_seed(0)
    model = load_detector(cfg, None, device="cpu", backend="eager")
    pixels = torch.full((1, 3, 64, 96), 128, dtype=torch.uint8)  # the model normalises, as the graph does
    with torch.no_grad():
        cand = model.candidates(model(pixels, mode="tensor"), [{"img_shape": (64, 96)}])
    assert out["boxes"].shape == tuple(cand.boxes.shape)
    valid = cand.valid[0].numpy()
    np.testing.assert_array_equal(out["labels"][0] >= 0, valid)
    # top-k may list candidates of exactly equal score in another order in onnxruntime: compare as sorted rows
    def rows(boxes, scores, labels):
        table = np.concatenate([labels[:, None].astype(np.float64), scores[:, None], boxes], 1)
        return table[np.lexsort(np.round(table, 3).T[::-1])]

    got = rows(out["boxes"][0][valid], out["scores"][0][valid], out["labels"][0][valid])
    want = rows(cand.boxes[0][valid].numpy(), cand.scores[0][valid].numpy(), cand.labels[0][valid].numpy())
    np.testing.assert_array_equal(got[:, 0], want[:, 0])
    np.testing.assert_allclose(got[:, 2:], want[:, 2:], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got[:, 1], want[:, 1], rtol=1e-4, atol=1e-6)


def test_export_cli_prints_the_check(tmp_path, capsys):
    _need_export_deps()
    rc = main(["export", "retinanet_r18_fpn_synth", "--out", str(tmp_path / "r.onnx"), "--size", "64x96",
               *LOW_THR])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "onnxruntime check" in text and "PASS" in text and (tmp_path / "r.onnx").is_file()


def test_export_without_optional_dependencies_prints_the_install_hint(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    rc = main(["export", "atss_r18_fpn_synth", "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "onnxscript" in err and EXPORT_INSTALL_HINT in err
    assert not (tmp_path / "x.onnx").exists()


def test_compare_detections_matches_by_label_and_tolerance():
    ref = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32), "scores": np.array([0.9, 0.8]),
           "labels": np.array([0, 1])}
    got = {k: v[::-1] for k, v in ref.items()}  # same detections, other order, boxes 5e-4 px off
    got["boxes"] = got["boxes"] + np.float32(5e-4)
    r = compare_detections(ref, got)
    assert r["ok"] and r["matched"] == 2 and r["max_box_rel_diff"] == pytest.approx(5e-4, rel=1e-2)
    got["boxes"][0, 0] += 0.01  # 1e-2 px off on a coordinate of 20 (relative 5e-4 -> ok) ...
    assert compare_detections(ref, got)["ok"]
    got["boxes"][1, 0] += 0.01  # ... but on a coordinate of 0 it is 1e-2 relative to 1 px: fails
    assert not compare_detections(ref, got)["ok"]
    got = {k: v[::-1] for k, v in ref.items()}
    got["labels"] = np.array([0, 1])  # labels swapped between the two boxes: no longer a match
    assert not compare_detections(ref, got)["ok"]
    got = {k: v[:1] for k, v in ref.items()}
    assert not compare_detections(ref, got)["ok"]  # a missing detection fails
    # a tie at the max_det cut: the last kept detections score the same, each side kept another member of it
    tie = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], np.float32),
           "scores": np.array([0.9, 0.5, 0.5]), "labels": np.array([0, 1, 1])}
    other = {k: v.copy() for k, v in tie.items()}
    other["boxes"][2] = [70, 70, 80, 80]  # another box of the same score
    r = compare_detections(tie, other)
    assert r["ok"] and r["matched"] == 2 and r["tied_at_cut"] == 1
    other["scores"][2] = 0.4  # not a tie: a real mismatch
    assert not compare_detections(tie, other)["ok"]


def test_soft_nms_and_tta_configs_get_a_note_of_what_the_graph_does(tmp_path):
    _need_export_deps()
    from densedet import export
    from densedet.config import load_config
    from densedet.deploy.onnx_export import graph_notes
    from densedet.models.build import build_detector

    cfg = load_config("vfnet_r18_fpn_synth_mstest", ["model.test_cfg.nms={type: soft_nms, iou_threshold: 0.4}"])
    notes = graph_notes(build_detector(cfg.model, init=False))
    assert any("soft-NMS" in n and "plain NMS" in n and "0.4" in n for n in notes), notes
    plain = load_config("atss_r18_fpn_synth")
    assert graph_notes(build_detector(plain.model, init=False)) == []
    # the TTA note is the config-level export's (the graph runs one view)
    torch.manual_seed(0)
    res = export("vfnet_r18_fpn_synth_mstest", None, tmp_path / "m.onnx", size=(64, 96), check=False)
    assert any("MultiScaleFlipAug" in n and "one view" in n for n in res.notes), res.notes


def test_two_stage_no_nms_export_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    """Mask R-CNN exports (tests/test_export_maskrcnn.py), but only with its R-CNN NMS: --no-nms is refused."""
    _need_export_deps()
    rc = main(["export", "mask_rcnn_r18_fpn_synth", "--out", str(tmp_path / "m.onnx"), "--no-check", "--no-nms"])
    err = capsys.readouterr().err
    assert rc == 2 and "--no-nms" in err and "two-stage" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
