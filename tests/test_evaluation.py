"""COCO evaluation, results conversion, tables and plots: checked against hand-computed COCO values."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from densedet.evaluation import (
    EvalResult,
    detections_to_coco_results,
    evaluate_coco,
    format_metrics_table,
    format_per_class_table,
    plot_pr_curves,
    plot_training_curves,
    read_log_jsonl,
    save_results_json,
)

METRIC_KEYS = ["bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l", "bbox_AR_100"]
# With COCO's 101 recall thresholds, a PR curve that is 1.0 up to recall 0.5 and 0 beyond has AP = 51/101
# (thresholds 0.00, 0.01, ..., 0.50 are reached with precision 1).
HALF_RECALL_AP = 51 / 101


def make_gt(images: list[tuple[int, int, int]], anns: list[tuple[int, int, list[float]]], cats: dict[int, str]):
    """COCO gt dict from (id, w, h) images, (image_id, category_id, xywh) annotations and {cat_id: name}."""
    return {
        "images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, w, h in images],
        "categories": [{"id": c, "name": n} for c, n in cats.items()],
        "annotations": [
            {"id": k + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for k, (img, cat, box) in enumerate(anns)
        ],
    }


def res(image_id: int, cat: int, xywh: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": xywh, "score": score}


@pytest.fixture
def multi_gt():
    """Three images, non-contiguous category ids, objects in all three COCO area ranges, one empty image."""
    anns = [
        (1, 1, [10.0, 10.0, 20.0, 20.0]),  # small (400 < 32^2)
        (1, 5, [40.0, 40.0, 60.0, 50.0]),  # medium
        (1, 9, [100.0, 20.0, 150.0, 120.0]),  # large
        (2, 5, [5.0, 5.0, 30.0, 25.0]),  # small
        (2, 1, [50.0, 60.0, 100.0, 110.0]),  # large
    ]
    return make_gt([(1, 300, 200), (2, 200, 200), (3, 100, 100)], anns, {1: "cat", 5: "dog", 9: "bird"})


def test_perfect_predictions_score_one(multi_gt):
    label2cat = {0: 1, 1: 5, 2: 9}
    cat2label = {c: lab for lab, c in label2cat.items()}
    dets, ids = [], []
    for img in multi_gt["images"]:
        anns = [a for a in multi_gt["annotations"] if a["image_id"] == img["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        labels = torch.tensor([cat2label[a["category_id"]] for a in anns], dtype=torch.long)
        dets.append({"boxes": xyxy, "scores": torch.ones(len(anns)), "labels": labels})
        ids.append(img["id"])
    results = detections_to_coco_results(dets, ids, label2cat)
    assert len(results) == len(multi_gt["annotations"])
    out = evaluate_coco(multi_gt, results)
    for key in METRIC_KEYS:
        assert out.metrics[key] == pytest.approx(1.0), key
    assert [r["AP"] for r in out.per_class] == pytest.approx([1.0, 1.0, 1.0])
    assert out.precision.shape == (10, 101, 3, 4, 3)


def test_one_match_one_false_positive_gives_51_over_101():
    gt = make_gt([(1, 200, 200)], [(1, 1, [10, 10, 40, 40]), (1, 1, [100, 100, 50, 50])], {1: "a"})
    results = [res(1, 1, [10, 10, 40, 40], 0.9), res(1, 1, [150, 0, 30, 30], 0.8)]  # 2nd: no overlap with any gt
    out = evaluate_coco(gt, results)
    # Same curve at every IoU threshold because the TP is exact and the FP overlaps nothing.
    assert out.metrics["bbox_mAP"] == pytest.approx(HALF_RECALL_AP)
    assert out.metrics["bbox_mAP_50"] == pytest.approx(HALF_RECALL_AP)
    assert out.metrics["bbox_mAP_75"] == pytest.approx(HALF_RECALL_AP)
    assert out.metrics["bbox_AR_100"] == pytest.approx(0.5)
    assert out.metrics["bbox_AR_1"] == pytest.approx(0.5)
    # Both gts are medium (1600, 2500 px^2): no small or large gt -> undefined (COCO's -1), reported as nan.
    assert out.metrics["bbox_mAP_m"] == pytest.approx(HALF_RECALL_AP)
    assert math.isnan(out.metrics["bbox_mAP_s"]) and math.isnan(out.metrics["bbox_mAP_l"])


def test_metrics_match_faster_coco_eval_summary():
    """Our metric indexing against the library's own summarize() on a random, imperfect detection set."""
    from faster_coco_eval import COCO, COCOeval_faster

    rng = np.random.default_rng(0)
    anns, results = [], []
    for img in range(1, 9):
        for cat in (1, 2, 3):
            for _ in range(int(rng.integers(0, 4))):
                x, y = rng.uniform(0, 300, 2)
                w, h = rng.uniform(8, 180, 2)
                anns.append((img, cat, [x, y, w, h]))
                results.append(res(img, cat, [x + rng.normal(0, 4), y + rng.normal(0, 4), w, h], float(rng.random())))
                results.append(res(img, cat, [*rng.uniform(0, 300, 2).tolist(), 40.0, 40.0], float(rng.random())))
    gt = make_gt([(i, 500, 500) for i in range(1, 9)], anns, {1: "a", 2: "b", 3: "c"})
    ours = evaluate_coco(gt, results).metrics

    def quiet(*_a, **_k) -> None:
        return None

    coco_gt = COCO(copy.deepcopy(gt), print_function=quiet)
    ev = COCOeval_faster(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox", print_function=quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    # pycocotools stats order: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ...
    expected = dict(zip([*METRIC_KEYS[:6], "bbox_AR_1", "bbox_AR_10", "bbox_AR_100"], ev.stats[:9]))
    assert 0.05 < expected["bbox_mAP"] < 0.95  # a non-trivial case
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value), key


def test_iou_threshold_dependence():
    # Prediction shifted by 9 px: IoU = 40*31 / (2*1600 - 40*31) = 0.633 -> TP at thresholds 0.50, 0.55, 0.60 only.
    gt = make_gt([(1, 200, 200)], [(1, 1, [10, 10, 40, 40])], {1: "a"})
    out = evaluate_coco(gt, [res(1, 1, [10, 19, 40, 40], 0.9)])
    assert out.metrics["bbox_mAP_50"] == pytest.approx(1.0)
    assert out.metrics["bbox_mAP_75"] == pytest.approx(0.0)
    assert out.metrics["bbox_mAP"] == pytest.approx(3 / 10)


def test_images_without_annotations_count_false_positives():
    gt = make_gt([(1, 100, 100), (2, 100, 100)], [(1, 1, [10, 10, 40, 40])], {1: "a"})
    tp = res(1, 1, [10, 10, 40, 40], 0.9)
    # FP on the empty image ranked above the TP: precision 1/2 at recall 1 -> AP 0.5 everywhere.
    assert evaluate_coco(gt, [tp, res(2, 1, [0, 0, 50, 50], 0.95)]).metrics["bbox_mAP"] == pytest.approx(0.5)
    # Ranked below the TP it cannot lower the interpolated precision.
    assert evaluate_coco(gt, [tp, res(2, 1, [0, 0, 50, 50], 0.5)]).metrics["bbox_mAP"] == pytest.approx(1.0)


def test_empty_results_give_zero(multi_gt):
    out = evaluate_coco(multi_gt, [])
    for key in METRIC_KEYS:
        assert out.metrics[key] == 0.0, key
    assert [r["AP"] for r in out.per_class] == [0.0, 0.0, 0.0]


def test_no_annotations_at_all_is_undefined_not_a_crash():
    gt = make_gt([(1, 100, 100)], [], {1: "a"})
    out = evaluate_coco(gt, [res(1, 1, [0, 0, 10, 10], 0.7)])
    assert all(math.isnan(v) for v in out.metrics.values())
    assert math.isnan(out.per_class[0]["AP"])


def test_classwise_rows_and_nan_for_class_without_gt():
    gt = make_gt(
        [(1, 200, 200)],
        [(1, 2, [10, 10, 40, 40]), (1, 7, [10, 10, 40, 40]), (1, 7, [100, 100, 50, 50])],
        {7: "b", 2: "a", 4: "no_gt"},
    )
    results = [
        res(1, 2, [10, 10, 40, 40], 0.9),  # class a: perfect
        res(1, 7, [10, 10, 40, 40], 0.9),  # class b: one TP, one FP, one gt missed -> 51/101
        res(1, 7, [150, 0, 30, 30], 0.8),
        res(1, 4, [0, 0, 20, 20], 0.5),  # class without gt: ignored by COCO
    ]
    out = evaluate_coco(gt, results)
    assert [r["class"] for r in out.per_class] == ["a", "no_gt", "b"]  # ascending category id
    assert [r["category_id"] for r in out.per_class] == [2, 4, 7]
    assert out.per_class[0]["AP"] == pytest.approx(1.0) and out.per_class[0]["AP50"] == pytest.approx(1.0)
    assert math.isnan(out.per_class[1]["AP"]) and math.isnan(out.per_class[1]["AP50"])
    assert out.per_class[2]["AP"] == pytest.approx(HALF_RECALL_AP)
    # mAP is the mean over classes that have gt.
    assert out.metrics["bbox_mAP"] == pytest.approx((1.0 + HALF_RECALL_AP) / 2)

    table = format_per_class_table(out)
    lines = table.splitlines()
    body = [ln for ln in lines if ln.startswith("| ") and "category" not in ln]
    assert len(body) == 3
    assert len({len(ln) for ln in lines}) == 1  # aligned: every line equally wide
    assert "nan" in next(ln for ln in body if "no_gt" in ln)
    assert evaluate_coco(gt, results, classwise=False).per_class == []


def test_max_dets_limits_recall():
    gt = make_gt([(1, 200, 200)], [(1, 1, [10, 10, 40, 40]), (1, 1, [100, 100, 50, 50])], {1: "a"})
    out = evaluate_coco(gt, [res(1, 1, [10, 10, 40, 40], 0.9), res(1, 1, [100, 100, 50, 50], 0.8)])
    assert out.metrics["bbox_AR_1"] == pytest.approx(0.5)
    assert out.metrics["bbox_AR_10"] == pytest.approx(1.0)
    assert out.metrics["bbox_AR_100"] == pytest.approx(1.0)


def test_gt_and_results_not_mutated(multi_gt):
    gt_before = copy.deepcopy(multi_gt)
    results = [res(1, 1, [10, 10, 20, 20], 0.9)]
    results_before = copy.deepcopy(results)
    evaluate_coco(multi_gt, results)
    assert multi_gt == gt_before and results == results_before


def test_gt_without_area_or_iscrowd_is_filled():
    gt = make_gt([(1, 100, 100)], [(1, 1, [10, 10, 20, 20])], {1: "a"})
    for ann in gt["annotations"]:
        del ann["area"], ann["iscrowd"]
    out = evaluate_coco(gt, [res(1, 1, [10, 10, 20, 20], 0.9)])
    assert out.metrics["bbox_mAP_s"] == pytest.approx(1.0)  # area 400 from the box -> small


def test_unknown_image_or_category_fails_loudly(multi_gt):
    with pytest.raises(ValueError, match="image ids"):
        evaluate_coco(multi_gt, [res(99, 1, [0, 0, 5, 5], 0.5)])
    with pytest.raises(ValueError, match="category ids"):
        evaluate_coco(multi_gt, [res(1, 3, [0, 0, 5, 5], 0.5)])
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_coco(multi_gt, [], iou_type="keypoints")


def test_detections_to_coco_results_mapping_and_xywh():
    label2cat = {0: 1, 1: 5, 2: 90}
    dets = [
        {
            "boxes": np.array([[10.0, 20.0, 30.0, 60.0], [0.5, 1.25, 2.5, 3.0]]),
            "scores": np.array([0.9, 0.4]),
            "labels": np.array([2, 0]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": torch.tensor([[1.0, 2.0, 4.0, 8.0]]), "scores": torch.tensor([0.25]), "labels": torch.tensor([1])},
    ]
    out = detections_to_coco_results(dets, [7, 8, 42], label2cat)
    assert out == [
        {"image_id": 7, "category_id": 90, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9)},
        {"image_id": 7, "category_id": 1, "bbox": [0.5, 1.25, 2.0, 1.75], "score": pytest.approx(0.4)},
        {"image_id": 42, "category_id": 5, "bbox": [1.0, 2.0, 3.0, 6.0], "score": pytest.approx(0.25)},
    ]
    assert all(type(r["image_id"]) is int and type(r["category_id"]) is int for r in out)
    with pytest.raises(ValueError, match="label2cat"):
        detections_to_coco_results([{"boxes": np.zeros((1, 4)), "scores": [1.0], "labels": [3]}], [1], label2cat)
    with pytest.raises(ValueError, match="image ids"):
        detections_to_coco_results(dets, [7, 8], label2cat)
    with pytest.raises(ValueError, match="differ in length"):
        detections_to_coco_results([{"boxes": np.zeros((2, 4)), "scores": [1.0], "labels": [0]}], [1], label2cat)


def test_results_json_round_trip(tmp_path, multi_gt):
    results = [res(1, 5, [40.0, 40.0, 60.0, 50.0], 0.75), res(2, 1, [50.0, 60.0, 100.0, 110.0], 0.5)]
    path = save_results_json(results, tmp_path / "sub" / "results.bbox.json")
    assert json.loads(path.read_text()) == results
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.bbox.json"]  # no temp file left behind
    from_file = evaluate_coco(multi_gt, path)
    from_list = evaluate_coco(multi_gt, results)
    assert from_file.metrics == pytest.approx(from_list.metrics, nan_ok=True)
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(multi_gt))
    assert evaluate_coco(gt_path, results).metrics == pytest.approx(from_list.metrics, nan_ok=True)


def test_metrics_table_lists_the_seven_summary_values():
    gt = make_gt([(1, 200, 200)], [(1, 1, [10, 10, 40, 40]), (1, 1, [100, 100, 50, 50])], {1: "a"})
    out = evaluate_coco(gt, [res(1, 1, [10, 10, 40, 40], 0.9), res(1, 1, [150, 0, 30, 30], 0.8)])
    lines = format_metrics_table(out).splitlines()
    assert len(lines) == 7
    values = [ln.rsplit("=", 1)[1].strip() for ln in lines]
    assert values == ["0.505", "0.505", "0.505", "nan", "0.505", "nan", "0.500"]
    assert "area= small" in lines[3] and "Average Recall" in lines[6]


def _assert_png(path) -> None:
    assert path.exists() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_plot_training_curves(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = []
    for it in range(1, 61):
        loss_cls, loss_bbox = 1.0 / it + 0.01 * (it % 3), 0.5 / it
        lines.append(
            {
                "type": "train",
                "iter": it,
                "epoch": 1 + (it - 1) // 30,
                "lr": 0.01 * min(1, it / 10),
                "loss": loss_cls + loss_bbox,
                "loss_cls": loss_cls,
                "loss_bbox": loss_bbox,
            }
        )
        if it % 30 == 0:
            lines.append(
                {"type": "val", "iter": it, "epoch": it // 30, "bbox_mAP": 0.1 * it / 30, "bbox_mAP_50": 0.2 * it / 30}
            )
    log.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    _assert_png(plot_training_curves(log, tmp_path / "plots" / "curves.png"))

    # No val lines, and a half-written last line (trainer still appending): still plots.
    train_only = tmp_path / "train_only.jsonl"
    train_only.write_text("\n".join(json.dumps(r) for r in lines if r["type"] == "train") + '\n{"type": "tra')
    assert len(read_log_jsonl(train_only)) == 60
    _assert_png(plot_training_curves(train_only, tmp_path / "curves2.png"))

    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text('{"type": "train", "iter": 1, "loss": 1.0}\nnot json\n{"type": "train", "iter": 2}\n')
    with pytest.raises(ValueError, match=r"corrupt.jsonl:2"):
        plot_training_curves(corrupt, tmp_path / "x.png")


def test_plot_pr_curves(tmp_path):
    gt = make_gt(
        [(1, 200, 200)],
        [(1, 1, [10, 10, 40, 40]), (1, 1, [100, 100, 50, 50]), (1, 3, [0, 0, 9, 9])],
        {1: "a", 2: "no_gt", 3: "c"},
    )
    out = evaluate_coco(
        gt, [res(1, 1, [10, 10, 40, 40], 0.9), res(1, 1, [150, 0, 30, 30], 0.8), res(1, 3, [0, 0, 9, 10], 0.6)]
    )
    _assert_png(plot_pr_curves(out, ["a", "no_gt", "c"], tmp_path / "pr.png"))
    _assert_png(plot_pr_curves(out, None, tmp_path / "pr_default_names.png"))
    with pytest.raises(ValueError, match="class names"):
        plot_pr_curves(out, ["a"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="precision"):
        plot_pr_curves(EvalResult(metrics={}, per_class=[], precision=None), ["a"], tmp_path / "none.png")
