"""Confusion matrix (issue 19, item 4): MMDetection confusion_matrix.py's counting rules on hand-built scenes, and
agreement with faster-coco-eval's one-to-one matrix where the two definitions coincide."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
from faster_coco_eval import COCO
from faster_coco_eval.extra import PreviewResults
from PIL import Image

from densedet.evaluation import confusion_matrix, plot_confusion_matrix, save_confusion_csv


def _gt(anns: list[tuple[int, int, list[float], int]], n_images: int = 2) -> dict:
    """(image_id, category_id, xywh, iscrowd) -> COCO dict; categories 7 'cat' and 3 'dog' (ids out of order)."""
    return {"images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in range(1, n_images + 1)],
            "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
            "annotations": [{"id": n + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": crowd} for n, (im, c, b, crowd) in enumerate(anns)]}


def _det(im: int, c: int, b: list[float], s: float) -> dict:
    return {"image_id": im, "category_id": c, "bbox": b, "score": s}


def test_counts_pairs_background_and_misses_as_mmdetection() -> None:
    # classes in category-id order: dog (3) = 0, cat (7) = 1, background = 2
    gt = _gt([(1, 3, [0, 0, 20, 20], 0),      # dog A: found twice (two pairs), and once as a cat
              (1, 7, [50, 50, 20, 20], 0),    # cat B: only a dog detection on it -> [cat, dog] and [cat, bg]
              (1, 7, [100, 100, 20, 20], 0),  # cat C: its detection scores below 0.3 -> missed
              (2, 3, [0, 0, 40, 40], 1)])     # crowd: not ground truth here (MMDetection 2.x)
    dets = [_det(1, 3, [0, 0, 20, 20], 0.9), _det(1, 3, [1, 0, 20, 20], 0.8),  # both on dog A
            _det(1, 7, [0, 1, 20, 20], 0.7),                                    # a cat on dog A
            _det(1, 3, [50, 50, 20, 21], 0.6),                                  # a dog on cat B
            _det(1, 7, [100, 100, 20, 20], 0.2),                                # below score_thr
            _det(1, 7, [150, 150, 10, 10], 0.5),                                # a cat on nothing
            _det(2, 3, [5, 5, 20, 20], 0.9)]                                    # a dog on the crowd region
    cm = confusion_matrix(gt, dets)
    assert cm.classes == ["dog", "cat", "background"] and cm.cat_ids == [3, 7]
    assert (cm.score_thr, cm.iou_thr) == (0.3, 0.5)
    assert cm.matrix.tolist() == [[2, 1, 0],   # dog A: two dog pairs and a cat pair; found by a dog: no miss
                                  [1, 0, 2],   # cat B: a dog pair and no cat on it; cat C: missed
                                  [1, 1, 0]]   # background: the dog on the crowd, the cat on nothing
    # rows normalised to percent, background row included; [bg, bg] is never counted
    pct = cm.normalized()
    np.testing.assert_allclose(pct[0], [200 / 3, 100 / 3, 0])
    assert cm.matrix[2, 2] == 0


def test_thresholds_change_what_counts() -> None:
    gt = _gt([(1, 3, [0, 0, 10, 10], 0)])
    dets = [_det(1, 3, [0, 0, 10, 6], 0.25)]  # IoU 0.6, score 0.25
    assert confusion_matrix(gt, dets).matrix.tolist() == [[0, 0, 1], [0, 0, 0], [0, 0, 0]]  # filtered: missed
    assert confusion_matrix(gt, dets, score_thr=0.2).matrix.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert confusion_matrix(gt, dets, score_thr=0.2, iou_thr=0.7).matrix.tolist() == [[0, 0, 1], [0, 0, 0],
                                                                                       [1, 0, 0]]


def test_agrees_with_faster_coco_eval_when_matching_is_one_to_one() -> None:
    """Each object overlapped by at most one detection and vice versa: MMDetection's pair counts equal
    faster-coco-eval's one-to-one matches; its per-class FP column is our background row, and our [k, bg] is its
    FN column plus the objects of class k matched by another class."""
    rng = np.random.default_rng(0)
    anns, dets = [], []
    for im in range(1, 4):
        for slot in range(6):  # objects on a grid, far apart
            x, y = 30 * slot, 30 * (im % 2)
            c = int(rng.choice([3, 7]))
            anns.append((im, c, [x, y, 20, 20], 0))
            fate = rng.integers(0, 4)
            if fate == 0:
                dets.append(_det(im, c, [x + 1, y, 20, 20], float(rng.uniform(0.3, 1))))  # right class
            elif fate == 1:
                dets.append(_det(im, 10 - c, [x, y + 1, 20, 20], float(rng.uniform(0.3, 1))))  # wrong class
            elif fate == 2:
                dets.append(_det(im, c, [x, y + 150, 10, 10], float(rng.uniform(0.3, 1))))  # on background
    gt = _gt(anns, 3)
    cm = confusion_matrix(gt, dets, score_thr=0.3, iou_thr=0.5)
    coco_gt = COCO(copy.deepcopy(gt))
    coco_gt.print_function = lambda *a, **k: None
    ref = PreviewResults(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), iou_tresh=0.5, min_score=0.3,
                         useCats=False).compute_confusion_matrix()
    # faster-coco-eval orders its K axis as the gt's categories appear (7, 3): reorder to ours (3, 7)
    order = [list(coco_gt.cats).index(c) for c in cm.cat_ids]
    ref = ref[order][:, [*order, 2, 3]]
    k = len(order)
    np.testing.assert_array_equal(cm.matrix[:k, :k], ref[:, :k])
    np.testing.assert_array_equal(cm.matrix[k, :k], ref[:, k])
    np.testing.assert_array_equal(cm.matrix[:k, k], ref[:, k + 1] + (ref[:, :k].sum(1) - np.diag(ref[:, :k])))


def test_csv_and_png(tmp_path: Path) -> None:
    gt = _gt([(1, 3, [0, 0, 20, 20], 0), (1, 7, [50, 50, 20, 20], 0)])
    cm = confusion_matrix(gt, [_det(1, 3, [0, 0, 20, 20], 0.9), _det(1, 3, [50, 50, 20, 20], 0.9)])
    rows = list(csv.reader((save_confusion_csv(cm, tmp_path / "cm.csv")).open()))
    assert rows[0] == ["gt \\ pred", "dog", "cat", "background"]
    assert rows[1] == ["dog", "1", "0", "0"] and rows[2] == ["cat", "1", "0", "1"] and rows[3][0] == "background"
    png = plot_confusion_matrix(cm, tmp_path / "cm.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 300
