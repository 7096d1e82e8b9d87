"""TIDE error breakdown (issue 19, item 4): hand-built scenes whose AP and dAP are worked out by hand below
(COCO's 101 recall thresholds r = 0, 0.01, ..., 1; AP = mean over r of the interpolated precision at the first
recall >= r), and COCO's AP50 as an independent reference for the base AP."""

from __future__ import annotations

import numpy as np
import pytest
from faster_coco_eval.core import mask as mask_api

from densedet.evaluation import evaluate_coco, tide_errors, write_error_analysis

R = 101  # recall thresholds


def _gt(objects: list[tuple[int, list[float]]], crowds: list[tuple[int, list[float]]] = ()) -> dict:
    """One 200x200 image; (category_id, xywh) objects and crowd regions; categories 1 'a' and 2 'b'."""
    anns = [{"id": n + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (c, b) in enumerate(objects)]
    anns += [{"id": 100 + n, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 1}
             for n, (c, b) in enumerate(crowds)]
    return {"images": [{"id": 1, "width": 200, "height": 200, "file_name": "1.png"}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": anns}


def _det(c: int, b: list[float], s: float) -> dict:
    return {"image_id": 1, "category_id": c, "bbox": b, "score": s}


G1, G2, G3, G4, G5 = [0, 0, 10, 10], [20, 0, 10, 10], [40, 0, 10, 10], [60, 0, 10, 10], [80, 0, 10, 10]
LOC_G2 = [20, 0, 3, 10]  # IoU 0.3 with G2: between bg_thr 0.1 and pos_thr 0.5
BACKGROUND = [0, 50, 10, 10]


def test_recall_threshold_half_is_exact() -> None:
    """Precondition of the hand computations: COCO's grid holds 0.5 exactly (recall 1/2 hits it)."""
    assert np.linspace(0, 1, 101)[50] == 0.5


def test_dupe_loc_bkg_and_the_special_errors() -> None:
    """One class, objects G1..G3. Detections by score: .9 on G1 (TP), .8 on G1 again (dupe), .7 at IoU .3 with G2
    (loc), .6 on background (bkg), .5 on G3 (TP).

    base: T F F F T, 3 objects: precision envelope 1 up to recall 1/3 (34 thresholds), then max(2/5) = .4 up to
    2/3 (33 thresholds): AP = (34 + 33 * .4) / 101 = 47.2 / 101.
    loc fixed (.7 becomes a TP on G2): T F T F T: 34 * 1 + 33 * 2/3 + 34 * .6 = 76.4 -> dAP 29.2 / 101.
    dupe fixed (.8 removed): T F F T: 34 + 33 * .5 = 50.5 -> dAP 3.3 / 101; bkg fixed (.6 removed): the same.
    fp (every FP below every TP): T T F F F: 34 + 33 = 67 -> dAP 19.8 / 101.
    fn (G2, the unmatched object, removed from the count): 2 objects, recall 1/2 then 1: 51 * 1 + 50 * .4 = 71
    -> dAP 23.8 / 101.
    """
    gt = _gt([(1, G1), (1, G2), (1, G3)])
    dets = [_det(1, G1, 0.9), _det(1, G1, 0.8), _det(1, LOC_G2, 0.7), _det(1, BACKGROUND, 0.6), _det(1, G3, 0.5)]
    t = tide_errors(gt, dets)
    assert t.ap == pytest.approx(47.2 / R)
    assert t.main == pytest.approx({"cls": 0, "loc": 29.2 / R, "both": 0, "dupe": 3.3 / R, "bkg": 3.3 / R, "miss": 0})
    assert t.special == pytest.approx({"fp": 19.8 / R, "fn": 23.8 / R})
    assert t.counts == {"cls": 0, "loc": 1, "both": 0, "dupe": 1, "bkg": 1, "miss": 0, "tp": 2, "gt": 3, "ignored": 0}


def test_cls_both_and_miss_over_two_classes() -> None:
    """Class a: G1, G3, G5; class b: G2, G4. Detections: b .9 on G1 (cls, pointing at G1), b .8 on G2 (TP),
    a .7 at IoU .3 with G2 only (both: another class, poorly localised), b .6 on G4 (TP), a .5 on G3 (TP); G5 has
    nothing near it (miss).

    base: a: F T over 3 objects -> .5 up to recall 1/3: 34 * .5 = 17 -> AP_a = 17/101; b: F T T over 2 -> 2/3
    everywhere: AP_b = 2/3. mAP = (17/101 + 2/3) / 2.
    cls fixed (b .9 -> a TP): a: T F T -> 34 + 33 * 2/3 = 56 -> 56/101; b: T T -> 1. dAP = (39/101 + 1/3) / 2.
    both fixed (a .7 removed): a: T -> 34/101: dAP = (17/101) / 2.
    miss fixed (G5 out of the count): a: F T over 2 -> .5 up to recall 1/2: 25.5/101: dAP = (8.5/101) / 2.
    fp: a: T F -> 34/101; b: T T F -> 1: dAP = (17/101 + 1/3) / 2.
    fn (G1 and G5 out): a: F T over 1 -> .5 everywhere: dAP = (.5 - 17/101) / 2.
    """
    gt = _gt([(1, G1), (2, G2), (1, G3), (2, G4), (1, G5)])
    dets = [_det(2, G1, 0.9), _det(2, G2, 0.8), _det(1, LOC_G2, 0.7), _det(2, G4, 0.6), _det(1, G3, 0.5)]
    t = tide_errors(gt, dets)
    base = (17 / R + 2 / 3) / 2
    assert t.ap == pytest.approx(base)
    assert t.per_class_ap == pytest.approx({1: 17 / R, 2: 2 / 3})
    assert t.main == pytest.approx({"cls": (39 / R + 1 / 3) / 2, "loc": 0, "both": (17 / R) / 2, "dupe": 0,
                                    "bkg": 0, "miss": (8.5 / R) / 2})
    assert t.special == pytest.approx({"fp": (17 / R + 1 / 3) / 2, "fn": (0.5 - 17 / R) / 2})
    assert t.counts == {"cls": 1, "loc": 0, "both": 1, "dupe": 0, "bkg": 0, "miss": 1, "tp": 3, "gt": 5, "ignored": 0}


def test_only_the_best_scored_error_per_object_is_fixed() -> None:
    """Two loc errors on G1 (.9 at IoU .3, .8 at IoU .4), a background .7, a TP .6 on G2; G3 missed.

    loc fixed: .9 becomes G1's TP, .8 is removed (TIDE's BestGTMatch): T F T -> 34 + 33 * 2/3 = 56 / 101
    (both as TPs would give 92.5 / 101, the .8 kept as an FP 50.5 / 101). base: F F F T: .25 up to 1/3 -> 8.5/101.
    miss fixed (G3 out): .25 up to recall 1/2: 12.75/101.
    """
    gt = _gt([(1, G1), (1, G2), (1, G3)])
    dets = [_det(1, [0, 0, 3, 10], 0.9), _det(1, [0, 0, 4, 10], 0.8), _det(1, BACKGROUND, 0.7), _det(1, G2, 0.6)]
    t = tide_errors(gt, dets)
    assert t.ap == pytest.approx(8.5 / R)
    assert t.main["loc"] == pytest.approx((56 - 8.5) / R)
    assert t.main["miss"] == pytest.approx((12.75 - 8.5) / R)
    assert t.counts["loc"] == 2 and t.counts["miss"] == 1  # G1 is fixable by a loc error: not missed


def test_an_error_on_an_already_matched_object_is_removed_when_fixed() -> None:
    """.9 on G1 (TP), .8 at IoU .3 with G1 (loc, but G1 is taken), .7 on G2 (TP): T F T over 2 objects ->
    51 * 1 + 50 * 2/3; loc fixed removes the .8 (it cannot become a TP): AP 1."""
    gt = _gt([(1, G1), (1, G2)])
    t = tide_errors(gt, [_det(1, G1, 0.9), _det(1, [0, 0, 3, 10], 0.8), _det(1, G2, 0.7)])
    assert t.ap == pytest.approx((51 + 50 * 2 / 3) / R)
    assert t.main["loc"] == pytest.approx(1 - (51 + 50 * 2 / 3) / R)


def test_detections_on_a_crowd_region_are_ignored() -> None:
    gt = _gt([(1, G1)], crowds=[(1, [100, 100, 60, 60])])
    dets = [_det(1, [110, 110, 20, 20], 0.9), _det(1, G1, 0.8)]  # inside the crowd (crowd IoU 1), then a TP
    t = tide_errors(gt, dets)
    assert t.ap == pytest.approx(1.0) and t.counts["ignored"] == 1 and t.counts["bkg"] == 0
    t = tide_errors(gt, [_det(2, [110, 110, 20, 20], 0.9), _det(1, G1, 0.8)])  # another class: background
    assert t.counts["ignored"] == 0 and t.counts["bkg"] == 1


def _random_scene(seed: int, crowd: bool) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    gt = {"images": [], "annotations": [], "categories": [{"id": c, "name": str(c)} for c in (1, 2, 5)]}
    dets = []
    for im in range(1, 31):
        gt["images"].append({"id": im, "width": 200, "height": 200, "file_name": f"{im}.png"})
        for _ in range(rng.integers(1, 5)):
            x, y, w, h = *rng.uniform(0, 150, 2), *rng.uniform(10, 50, 2)
            c = int(rng.choice([1, 2, 5]))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": im, "category_id": c,
                                      "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 0.25, 4) * [w, h, w, h]
                cc = c if rng.random() < 0.7 else int(rng.choice([1, 2, 5]))
                dets.append({"image_id": im, "category_id": cc, "score": float(rng.random()),
                             "bbox": [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]})
        if crowd and im % 3 == 0:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": im, "iscrowd": 1,
                                      "category_id": int(rng.choice([1, 2, 5])), "bbox": [120, 120, 70, 70],
                                      "area": 4900})
        for _ in range(rng.integers(0, 3)):
            dets.append({"image_id": im, "category_id": int(rng.choice([1, 2, 5])), "score": float(rng.random()),
                         "bbox": [*rng.uniform(0, 150, 2), *rng.uniform(5, 60, 2)]})
    return gt, dets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_base_ap_equals_coco_ap50(seed: int) -> None:
    """TIDE's AP at pos_thr 0.5 is COCO's AP50 when every class has ground truth (crowd regions included)."""
    gt, dets = _random_scene(seed, crowd=True)
    t = tide_errors(gt, dets)
    assert t.ap == pytest.approx(evaluate_coco(gt, dets).metrics["bbox_mAP_50"], abs=1e-12)
    counts = t.counts
    assert counts["tp"] + sum(counts[k] for k in ("cls", "loc", "both", "dupe", "bkg")) + counts["ignored"] == len(dets)
    assert all(v >= 0 for v in t.main.values())


def _rect_rle(box: list[float]) -> dict:
    x, y, w, h = (int(v) for v in box)
    m = np.zeros((200, 200), dtype=np.uint8, order="F")
    m[y:y + h, x:x + w] = 1
    rle = mask_api.encode(m)
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode() if isinstance(counts, bytes) else counts}


def test_segm_with_rectangle_masks_equals_bbox() -> None:
    """Masks that fill their (integer) boxes have mask IoU = box IoU: the segm analysis equals the bbox one."""
    gt, dets = _random_scene(3, crowd=False)
    for a in gt["annotations"] + dets:  # integer boxes inside the image, as masks have them
        x, y, w, h = (float(round(v)) for v in a["bbox"])
        x1, y1 = min(max(x, 0.0), 199.0), min(max(y, 0.0), 199.0)
        a["bbox"] = [x1, y1, max(min(x + w, 200) - x1, 1.0), max(min(y + h, 200) - y1, 1.0)]
    for a in gt["annotations"]:
        a["segmentation"] = _rect_rle(a["bbox"])
    seg = [{"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"],
            "segmentation": _rect_rle(r["bbox"])} for r in dets]
    tb, ts = tide_errors(gt, dets), tide_errors(gt, seg, "segm")
    assert ts.counts == tb.counts
    assert ts.ap == pytest.approx(tb.ap) and ts.main == pytest.approx(tb.main)


def test_segm_reads_polygon_ground_truth() -> None:
    """A polygon object and a detection whose RLE is that polygon rasterised: a true positive (mask IoU 1)."""
    poly = [[10.0, 10.0, 60.0, 15.0, 40.0, 70.0]]
    gt = _gt([(1, [10, 10, 50, 60])])
    gt["annotations"][0]["segmentation"] = poly
    rle = mask_api.merge(mask_api.frPyObjects(poly, 200, 200))
    counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
    det = {"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": {"size": [200, 200], "counts": counts}}
    t = tide_errors(gt, [det], "segm")
    assert t.counts["tp"] == 1 and t.ap == pytest.approx(1.0)


def test_write_error_analysis_files(tmp_path) -> None:
    gt, dets = _random_scene(4, crowd=False)
    analysis = write_error_analysis(gt, dets, tmp_path)
    assert {p.name for p in analysis.files.values()} == {"confusion_matrix.png", "confusion_matrix.csv",
                                                         "tide_errors.json", "tide_errors.png", "tide_errors.txt"}
    assert all(p.stat().st_size > 0 for p in analysis.files.values())
    assert "classification" in analysis.summary() and "dAP" in analysis.summary()
