"""Detection confusion matrix (classes + background) from a COCO ground truth and a COCO results list.

Semantics and default thresholds are MMDetection's ``tools/analysis_tools/confusion_matrix.py``
(``calculate_confusion_matrix`` / ``analyze_per_img_dets``; ``--score-thr 0.3``, ``--tp-iou-thr 0.5``):

- detections scored below ``score_thr`` are dropped;
- every (ground truth, detection) pair with IoU >= ``iou_thr`` adds 1 to ``[gt class, detected class]`` (a detection
  overlapping two objects counts twice, two detections of one object count twice: the reference counts pairs);
- a detection that overlaps no ground truth that much adds 1 to ``[background, detected class]``;
- a ground truth that no detection *of its own class* overlaps that much adds 1 to ``[gt class, background]``.

Rows are ground truth, columns predictions, the last row / column is background; ``[background, background]`` is
always 0. Crowd (``iscrowd=1``) annotations are not ground truth here (MMDetection 2.x reads the non-crowd boxes
only), so a detection on a crowd region counts as background. IoU is the COCO API's box IoU (faster-coco-eval).

faster-coco-eval's own ``PreviewResults.compute_confusion_matrix`` matches one-to-one and class-agnostically in
score order, so a correct detection that scores below a wrong-class one on the same object becomes a background
false positive there; its drawing needs plotly. The two agree when every object has at most one detection and
every detection at most one object (tested); DenseDet reports the MMDetection matrix, drawn with matplotlib.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from faster_coco_eval.core import mask as mask_api
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from densedet.io import atomic_write, atomic_write_text

__all__ = ["ConfusionMatrix", "confusion_matrix", "plot_confusion_matrix", "save_confusion_csv"]

#: MMDetection confusion_matrix.py's defaults (--score-thr, --tp-iou-thr)
DEFAULT_SCORE_THR = 0.3
DEFAULT_IOU_THR = 0.5


@dataclass
class ConfusionMatrix:
    """``matrix``: int64 ``(K + 1, K + 1)`` counts, rows = ground-truth class, columns = predicted class, index
    ``K`` = background; ``classes``: the K names (categories in ascending id order) then ``"background"``."""

    matrix: np.ndarray
    classes: list[str]
    cat_ids: list[int]
    score_thr: float
    iou_thr: float

    def normalized(self) -> np.ndarray:
        """Each row divided by its sum, in percent (MMDetection's plot); rows summing to 0 stay 0."""
        sums = self.matrix.sum(axis=1, keepdims=True)
        return np.where(sums > 0, self.matrix / np.maximum(sums, 1) * 100.0, 0.0)


def _xywh(boxes: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _box_iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(D, 4) x (G, 4) xywh -> (D, G) IoU by the COCO API (an empty side gives an empty matrix)."""
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    return np.asarray(mask_api.iou(dt, gt, [0] * len(gt)), dtype=np.float64).reshape(len(dt), len(gt))


def confusion_matrix(gt: dict, results: Sequence[dict], score_thr: float = DEFAULT_SCORE_THR,
                     iou_thr: float = DEFAULT_IOU_THR) -> ConfusionMatrix:
    """Count the confusion matrix of box detections (see the module docstring for the rules).

    Args:
        gt: COCO ground truth (``images``, ``annotations`` with ``bbox`` xywh, ``categories``).
        results: COCO results entries ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
        score_thr / iou_thr: MMDetection's defaults 0.3 / 0.5.
    """
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    cat_ids = [int(c["id"]) for c in cats]
    index = {c: k for k, c in enumerate(cat_ids)}
    k_bg = len(cat_ids)
    gts: dict[int, list[dict]] = defaultdict(list)
    for a in gt.get("annotations", []):
        if not a.get("iscrowd", 0):
            gts[int(a["image_id"])].append(a)
    dts: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        if r["score"] >= score_thr:
            if r["category_id"] not in index:
                raise ValueError(f"confusion_matrix: result category id {r['category_id']} is not among the ground "
                                 f"truth's categories {cat_ids[:20]}")
            dts[int(r["image_id"])].append(r)

    matrix = np.zeros((k_bg + 1, k_bg + 1), dtype=np.int64)
    for image_id in set(gts) | set(dts):
        g, d = gts.get(image_id, []), dts.get(image_id, [])
        g_lab = np.array([index[a["category_id"]] for a in g], dtype=np.int64)
        d_lab = np.array([index[r["category_id"]] for r in d], dtype=np.int64)
        hit = _box_iou(_xywh([r["bbox"] for r in d]), _xywh([a["bbox"] for a in g])) >= iou_thr  # (D, G)
        di, gi = np.nonzero(hit)
        np.add.at(matrix, (g_lab[gi], d_lab[di]), 1)  # every overlapping pair
        np.add.at(matrix, (k_bg, d_lab[~hit.any(axis=1)]), 1)  # detections on background
        found = (hit & (d_lab[:, None] == g_lab[None, :])).any(axis=0)  # objects with a same-class detection
        np.add.at(matrix, (g_lab[~found], k_bg), 1)
    names = [str(c.get("name", c["id"])) for c in cats] + ["background"]
    return ConfusionMatrix(matrix, names, cat_ids, float(score_thr), float(iou_thr))


def save_confusion_csv(cm: ConfusionMatrix, path: str | Path) -> Path:
    """Counts as CSV: a header row ``gt \\ pred, <classes...>, background``, then one row per ground-truth class
    (and background) starting with its name. Written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["gt \\ pred", *cm.classes])
    for name, row in zip(cm.classes, cm.matrix.tolist()):
        w.writerow([name, *row])
    return atomic_write_text(path, buf.getvalue())


def plot_confusion_matrix(cm: ConfusionMatrix, path: str | Path, title: str | None = None) -> Path:
    """Row-normalised matrix (percent of each ground-truth row), the percentages written in the cells as
    MMDetection's confusion_matrix.py writes them, with the raw count below when there are at most 10 classes
    (at most 30: the percentage only); background last. The counts are in :func:`save_confusion_csv`. Written
    atomically as PNG."""
    pct = cm.normalized()
    n = len(cm.classes)
    side = max(5.0, 0.42 * n + 2.5)
    fig = Figure(figsize=(side, side * 0.85))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(pct, cmap="plasma", vmin=0, vmax=100)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="% of the ground-truth row")
    ax.set_xticks(range(n), cm.classes, rotation=60, ha="left", rotation_mode="anchor",
                  fontsize=8 if n <= 30 else 5)
    ax.set_yticks(range(n), cm.classes, fontsize=8 if n <= 30 else 5)
    ax.tick_params(axis="x", top=True, bottom=False, labeltop=True, labelbottom=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title or f"confusion matrix (score >= {cm.score_thr:g}, IoU >= {cm.iou_thr:g})", pad=20)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if cm.matrix[i, j]:
                    text = f"{pct[i, j]:.0f}%" + (f"\n({cm.matrix[i, j]})" if n <= 10 else "")
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="black" if pct[i, j] > 60 else "white")
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
