"""Error breakdown by type with the AP each type costs: TIDE (Bolya, Foley, Hays, Hoffman, "TIDE: A General Toolbox
for Identifying Object Detection Errors", ECCV 2020).

Why not the package: ``tidecv`` 1.0.1 (PyPI, last released 2020) imports pycocotools, OpenCV, seaborn and pandas for
its evaluation and plots; ``tidecv-light`` 1.0.2 needs only numpy but left the crowd-region IoU unfinished
(``ignore_iou`` is never assigned: an ``UnboundLocalError`` as soon as a crowd region is given). DenseDet implements the
definitions below from the paper and tidecv's ``quantify.py`` / ``errors/main_errors.py`` semantics, on COCO dicts,
with the COCO API's IoU (faster-coco-eval) for boxes and masks.

Matching, at ``pos_thr`` (0.5) like TIDE's error analysis: per image, detections in descending score order (at most
``max_dets`` = 100 per image) each take the unmatched same-class ground truth of highest IoU if that IoU >=
``pos_thr`` (true positive). A detection left unmatched whose crowd-IoU (intersection / detection area, the COCO
API's ``iscrowd``) with a crowd region of its class is >= ``pos_thr`` is ignored, as COCO ignores it (tidecv uses
``>`` there and still classifies such detections; here they are neither counted nor classified). Every other
unmatched detection is a false positive of the first type that fits, in TIDE's order (IoU with the ground truth of
the image, ``bg_thr`` = 0.1):

==========  ===================================================================================================
``loc``     ``bg_thr <= max IoU with a same-class object <= pos_thr``: right class, poorly localised
``cls``     IoU >= ``pos_thr`` with an object of another class: localised, wrong class
``dupe``    IoU >= ``pos_thr`` with a same-class object already matched by a higher-scored detection
``bkg``     max IoU with every object <= ``bg_thr`` (or no object in the image): fired on background
``both``    none of the above (wrong class and poorly localised)
``miss``    an object no detection matched, and that no ``cls`` / ``loc`` error could have matched
==========  ===================================================================================================

dAP of a type (``main``): AP50 after fixing only the errors of that type, minus AP50, floored at 0. Fixing a
``cls`` / ``loc`` error makes it a true positive (in the object's / its own class) when its object is unmatched
and it is the highest-scored such error of that object; every other ``cls`` / ``loc`` error, and every ``dupe``,
``bkg`` and ``both`` error, is removed; a ``miss`` is removed from the object count. ``special`` dAPs: ``fp`` --
every false positive scored below every true positive (perfect precision at the same recall); ``fn`` -- every
unmatched object removed from the count (perfect recall at the same precision).

AP (TIDE's, COCO's 101-point interpolation) per class at ``pos_thr``, mean over the classes that have ground truth
or detections (a class with detections but no ground truth has AP 0, as in tidecv; COCO leaves it out). With the
same classes in both, ``ap`` equals COCO's AP50 (tested).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval.core import mask as mask_api
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from densedet.io import atomic_write

__all__ = ["ERROR_TYPES", "TideResult", "format_tide_table", "plot_tide", "tide_errors"]

#: TIDE's main error types, in its order (``quantify.TIDE._error_types``: Cls, Loc, Both, Dupe, Bkg, Miss)
ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
ERROR_NAMES = {"cls": "classification", "loc": "localisation", "both": "both (cls + loc)", "dupe": "duplicate",
               "bkg": "background", "miss": "missed", "fp": "all false positives", "fn": "all false negatives"}
_R = np.linspace(0.0, 1.0, 101)  # COCO's recall thresholds


@dataclass
class TideResult:
    """Outcome of :func:`tide_errors`. AP values are fractions in [0, 1] (TIDE prints them x100).

    Attributes:
        ap: AP at ``pos_thr`` (mean over classes, TIDE's rule).
        main: dAP of each type in :data:`ERROR_TYPES`.
        special: ``{"fp": dAP, "fn": dAP}``.
        counts: number of errors of each main type (``miss``: objects), ``tp``, ``gt`` (non-crowd objects) and
            ``ignored`` (detections on crowd regions).
    """

    ap: float
    main: dict[str, float]
    special: dict[str, float]
    counts: dict[str, int]
    iou_type: str = "bbox"
    pos_thr: float = 0.5
    bg_thr: float = 0.1
    per_class_ap: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"iou_type": self.iou_type, "pos_thr": self.pos_thr, "bg_thr": self.bg_thr, "ap": self.ap,
                "dAP": dict(self.main), "dAP_special": dict(self.special), "counts": dict(self.counts)}


# ------------------------------------------------------------------------------------------------------ geometry
def _iou(dt: list, gt: list, crowd: bool) -> np.ndarray:
    """(D, G) IoU (``crowd``: intersection over the detection's area) by the COCO API; boxes are (N, 4) xywh
    arrays, masks lists of RLE dicts."""
    if len(dt) == 0 or len(gt) == 0:
        return np.zeros((len(dt), len(gt)))
    return np.asarray(mask_api.iou(dt, gt, [int(crowd)] * len(gt)), dtype=np.float64).reshape(len(dt), len(gt))


def _geometries(items: list[dict], iou_type: str, sizes: dict[int, tuple[int, int]]) -> Any:
    if iou_type == "bbox":
        return np.asarray([a["bbox"] for a in items], dtype=np.float64).reshape(-1, 4)
    rles = []
    for a in items:
        segm = a["segmentation"]
        h, w = sizes[int(a["image_id"])]
        if isinstance(segm, list):  # polygons: one RLE of their union
            rles.append(mask_api.merge(mask_api.frPyObjects(segm, h, w)))
        elif isinstance(segm.get("counts"), list):  # uncompressed RLE
            rles.append(mask_api.frPyObjects(segm, h, w))
        else:
            rles.append(segm)
    return rles


# ------------------------------------------------------------------------------------------------------ AP
def _class_ap(scores: np.ndarray, seq: np.ndarray, is_tp: np.ndarray, num_gt: int) -> float:
    """COCO 101-point interpolated AP of one class's detections (TIDE ``APDataObject.get_ap``); 0 without gt.
    Equal scores keep detection order (``seq``: image id, then score order within the image), as COCO's
    ``accumulate`` does."""
    if num_gt <= 0 or len(scores) == 0:
        return 0.0
    order = np.lexsort((seq, -scores))
    tp = np.cumsum(is_tp[order])
    fp = np.cumsum(~is_tp[order])
    recall = tp / num_gt
    precision = np.maximum.accumulate((tp / (tp + fp))[::-1])[::-1]  # envelope from the right
    idx = np.searchsorted(recall, _R, side="left")
    return float(np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0).mean())


def _mean_ap(points: _Points, num_gt: dict[int, int]) -> tuple[float, dict[int, float]]:
    """Mean over the classes with ground truth or detections (TIDE ``ClassedAPDataObject.get_mAP``)."""
    per_class = {}
    for c in sorted(set(np.unique(points.cls).tolist()) | {c for c, n in num_gt.items() if n > 0}):
        sel = points.cls == c
        per_class[c] = _class_ap(points.score[sel], points.seq[sel], points.tp[sel], num_gt.get(c, 0))
    return (float(np.mean(list(per_class.values()))) if per_class else 0.0), per_class


@dataclass
class _Points:
    """Detections as AP data points: class (category id), score, detection order, true positive."""

    cls: np.ndarray
    score: np.ndarray
    seq: np.ndarray
    tp: np.ndarray


# ------------------------------------------------------------------------------------------------------ analysis
_KIND = {k: n for n, k in enumerate(ERROR_TYPES)}


def tide_errors(gt: dict, results: Sequence[dict], iou_type: str = "bbox", pos_thr: float = 0.5,
                bg_thr: float = 0.1, max_dets: int = 100) -> TideResult:
    """TIDE error breakdown of COCO results (see the module docstring for every rule).

    Args:
        gt: COCO ground truth (``images`` with ``width`` / ``height``, ``annotations``, ``categories``).
        results: COCO results entries with ``bbox`` (xywh) or, for ``iou_type="segm"``, ``segmentation`` (RLE).
        pos_thr / bg_thr: TIDE's foreground / background IoU thresholds (0.5 / 0.1).
        max_dets: detections kept per image, highest scores first.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"tide_errors: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    key = "bbox" if iou_type == "bbox" else "segmentation"
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in gt["images"]}
    known_cats = {int(c["id"]) for c in gt["categories"]}
    objects: dict[int, list[dict]] = defaultdict(list)
    crowds: dict[int, list[dict]] = defaultdict(list)
    for a in gt.get("annotations", []):
        if key not in a:
            raise ValueError(f"tide_errors: annotation {a.get('id')} has no '{key}' for a {iou_type} analysis")
        (crowds if a.get("iscrowd", 0) else objects)[int(a["image_id"])].append(a)
    preds: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        if r["category_id"] not in known_cats:
            raise ValueError(f"tide_errors: result category id {r['category_id']} is not a ground-truth category")
        preds[int(r["image_id"])].append(r)

    # Per detection (in processing order): class, score, matched, ignored, error kind, target object / its class.
    cols: dict[str, list[np.ndarray]] = defaultdict(list)
    gt_cls_all: list[np.ndarray] = []
    gt_used_all: list[np.ndarray] = []
    obj_base = 0
    for image_id in sorted(set(objects) | set(preds)):
        g, c = objects.get(image_id, []), crowds.get(image_id, [])
        d = sorted(preds.get(image_id, []), key=lambda r: -r["score"])[:max_dets]  # stable: ties keep file order
        g_cls = np.array([a["category_id"] for a in g], dtype=np.int64)
        d_cls = np.array([r["category_id"] for r in d], dtype=np.int64)
        dt_geo = _geometries(d, iou_type, sizes)
        iou = _iou(dt_geo, _geometries(g, iou_type, sizes), crowd=False)  # (D, G)
        same = d_cls[:, None] == g_cls[None, :]
        same_iou = iou * same
        used = np.zeros(len(g), dtype=bool)
        matched = np.zeros(len(d), dtype=bool)
        for i in np.flatnonzero((same_iou >= pos_thr).any(axis=1)):  # in score order
            cand = np.where(used, 0.0, same_iou[i])
            j = int(np.argmax(cand))
            if cand[j] >= pos_thr:
                used[j] = matched[i] = True
        on_crowd = np.zeros(len(d), dtype=bool)
        if c and len(d):
            c_cls = np.array([a["category_id"] for a in c], dtype=np.int64)
            crowd_iou = _iou(dt_geo, _geometries(c, iou_type, sizes), crowd=True)
            on_crowd = ((crowd_iou >= pos_thr) & (d_cls[:, None] == c_cls[None, :])).any(axis=1) & ~matched
        kind, target, target_cls = _classify(iou, same, used, g_cls, pos_thr, bg_thr)
        cols["cls"].append(d_cls)
        cols["score"].append(np.array([r["score"] for r in d], dtype=np.float64))
        cols["tp"].append(matched)
        cols["ignored"].append(on_crowd)
        cols["kind"].append(np.where(matched | on_crowd, -1, kind))
        cols["target"].append(np.where(target >= 0, target + obj_base, -1))
        cols["target_cls"].append(target_cls)
        gt_cls_all.append(g_cls)
        gt_used_all.append(used)
        obj_base += len(g)

    det = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
    if not cols:
        det = {k: np.zeros(0, dtype=bool if k in ("tp", "ignored") else np.int64) for k in
               ("cls", "score", "tp", "ignored", "kind", "target", "target_cls")}
    det["seq"] = np.arange(len(det["cls"]))
    obj_cls = np.concatenate(gt_cls_all) if gt_cls_all else np.zeros(0, dtype=np.int64)
    obj_used = np.concatenate(gt_used_all) if gt_used_all else np.zeros(0, dtype=bool)
    num_gt = {int(k): int(n) for k, n in zip(*np.unique(obj_cls, return_counts=True))}

    # TIDE's BestGTMatch: of the cls / loc errors pointing at one unmatched object, the highest-scored one (the
    # first in detection order among equals) is the one a fix turns into a true positive.
    err = np.flatnonzero(det["kind"] >= 0)
    aimed = err[det["target"][err] >= 0]
    aimed = aimed[np.lexsort((det["seq"][aimed], -det["score"][aimed], det["target"][aimed]))]
    first = np.ones(len(aimed), dtype=bool)
    first[1:] = det["target"][aimed][1:] != det["target"][aimed][:-1]
    fixer = np.zeros(len(det["cls"]), dtype=bool)
    fixer[aimed[first]] = True
    usable = np.zeros(len(obj_cls), dtype=bool)
    usable[det["target"][aimed]] = True
    missed = ~obj_used & ~usable

    base = _points(det, None)
    base_ap, per_class = _mean_ap(base, num_gt)
    main: dict[str, float] = {}
    for kind in ERROR_TYPES:
        count = dict(num_gt)
        if kind == "miss":
            for k, n in zip(*np.unique(obj_cls[missed], return_counts=True)):
                count[int(k)] -= int(n)
        main[kind] = max(_mean_ap(_points(det, kind, fixer), count)[0] - base_ap, 0.0)
    perfect_precision = _Points(base.cls, base.tp.astype(np.float64), base.seq, base.tp)  # FalsePositiveError.fix
    fn_count = dict(num_gt)
    for k, n in zip(*np.unique(obj_cls[~obj_used], return_counts=True)):
        fn_count[int(k)] -= int(n)
    special = {"fp": max(_mean_ap(perfect_precision, num_gt)[0] - base_ap, 0.0),
               "fn": max(_mean_ap(base, fn_count)[0] - base_ap, 0.0)}
    counts = {k: int((det["kind"] == _KIND[k]).sum()) for k in ERROR_TYPES if k != "miss"}
    counts.update(miss=int(missed.sum()), tp=int(det["tp"].sum()), gt=len(obj_cls), ignored=int(det["ignored"].sum()))
    return TideResult(base_ap, main, special, counts, iou_type, float(pos_thr), float(bg_thr), per_class)


def _classify(iou: np.ndarray, same: np.ndarray, used: np.ndarray, g_cls: np.ndarray, pos_thr: float,
              bg_thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Error type of every detection of an image as if unmatched (TIDE ``TIDERun._eval_image``: loc, cls, dupe,
    bkg, else both, tested in that order), the object a loc / cls error points at (-1 if none or already matched:
    fixing it then removes the detection) and that object's class."""
    n = iou.shape[0]
    if iou.shape[1] == 0:
        return np.full(n, _KIND["bkg"]), np.full(n, -1), np.full(n, -1)
    same_iou, other_iou = iou * same, iou * ~same
    j_same, j_other = same_iou.argmax(axis=1), other_iou.argmax(axis=1)
    best_same = same_iou[np.arange(n), j_same]
    best_other = other_iou[np.arange(n), j_other]
    loc = (bg_thr <= best_same) & (best_same <= pos_thr)
    cls = ~loc & (best_other >= pos_thr)
    dupe = ~loc & ~cls & ((same_iou * used).max(axis=1) >= pos_thr)
    bkg = ~loc & ~cls & ~dupe & (iou.max(axis=1) <= bg_thr)
    kind = np.select([loc, cls, dupe, bkg], [_KIND["loc"], _KIND["cls"], _KIND["dupe"], _KIND["bkg"]], _KIND["both"])
    j = np.where(loc, j_same, j_other)
    target = np.where((loc | cls) & ~used[j], j, -1)
    return kind, target, np.where(cls, g_cls[j], -1)


def _points(det: dict[str, np.ndarray], fix: str | None, fixer: np.ndarray | None = None) -> _Points:
    """AP data points with the errors of type ``fix`` fixed (None: as detected): a fixed cls / loc error that is
    its object's fixer becomes a true positive (a cls one in the object's class), every other fixed error is
    removed; ignored detections are never data points."""
    keep = ~det["ignored"].astype(bool)
    cls = det["cls"].astype(np.int64).copy()
    tp = det["tp"].astype(bool).copy()
    if fix is not None:
        fixed = det["kind"] == _KIND[fix]
        if fix in ("cls", "loc"):
            turned = fixed & fixer
            tp |= turned
            if fix == "cls":
                cls = np.where(turned, det["target_cls"], cls)
            keep &= ~fixed | turned
        else:
            keep &= ~fixed
    return _Points(cls[keep], det["score"].astype(np.float64)[keep], det["seq"][keep], tp[keep])


# ------------------------------------------------------------------------------------------------------ output
def format_tide_table(result: TideResult) -> str:
    """TIDE-summary-style table: AP at ``pos_thr`` and each type's count and dAP, in AP points (x100)."""
    lines = [f"TIDE errors ({result.iou_type}, AP{int(round(result.pos_thr * 100))} = {result.ap * 100:.2f}; "
             f"dAP: AP points gained if that type were fixed)",
             f"| {'type':<22} | {'count':>6} | {'dAP':>6} |", f"|{'-' * 24}|{'-' * 8}|{'-' * 8}|"]
    for kind in ERROR_TYPES:
        lines.append(f"| {ERROR_NAMES[kind]:<22} | {result.counts[kind]:>6d} | {result.main[kind] * 100:>6.2f} |")
    for kind in ("fp", "fn"):
        lines.append(f"| {ERROR_NAMES[kind]:<22} | {'':>6} | {result.special[kind] * 100:>6.2f} |")
    return "\n".join(lines)


def plot_tide(results: Sequence[TideResult], path: str | Path) -> Path:
    """Bar charts of the main and special dAPs (one colour per result: bbox, segm). Written atomically as PNG."""
    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    ax_main, ax_special = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(results), 1)
    for n, res in enumerate(results):
        label = f"{res.iou_type} (AP{int(round(res.pos_thr * 100))} {res.ap * 100:.1f})"
        x = np.arange(len(ERROR_TYPES)) + (n - (len(results) - 1) / 2) * width
        ax_main.bar(x, [res.main[k] * 100 for k in ERROR_TYPES], width, label=label, color=f"C{n}")
        xs = np.arange(2) + (n - (len(results) - 1) / 2) * width
        ax_special.bar(xs, [res.special[k] * 100 for k in ("fp", "fn")], width, color=f"C{n}")
    ax_main.set_xticks(range(len(ERROR_TYPES)), [ERROR_NAMES[k] for k in ERROR_TYPES], rotation=20)
    ax_main.set(title="dAP if one error type were fixed (TIDE)", ylabel="AP points")
    ax_main.legend(fontsize=8)
    ax_special.set_xticks(range(2), ["false pos.", "false neg."])
    ax_special.set(title="perfect precision / recall")
    for ax in (ax_main, ax_special):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))

