"""COCO-style evaluation on top of faster-coco-eval, with MMDetection 2.x metric names.

Flow: detections (xyxy, contiguous labels) -> :func:`detections_to_coco_results` (COCO ``[x, y, w, h]``, dataset
category ids) -> :func:`evaluate_coco` -> :class:`EvalResult` -> :func:`format_metrics_table` /
:func:`format_per_class_table`. Metric semantics follow ``mmdet/datasets/coco.py`` (v2.x ``CocoDataset.evaluate``):
``bbox_mAP`` is AP@[.5:.95], ``bbox_mAP_50`` / ``_75`` at one IoU, ``_s/_m/_l`` per COCO area range, all at the
largest ``max_dets``; the classwise AP is the mean of the valid (> -1) precision entries of that class.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from densedet.io import atomic_write, atomic_write_json
from densedet.structures.masks import polygon_limits

__all__ = [
    "EvalResult",
    "atomic_write",
    "detections_to_coco_results",
    "evaluate_coco",
    "format_metrics_table",
    "format_per_class_table",
    "save_results_json",
]

_SUPPORTED_IOU_TYPES = ("bbox", "segm")
# Index of each COCO area range in the precision array's A axis (faster-coco-eval's default ranges, same order as
# pycocotools: all, small, medium, large).
_AREA_INDEX = {"": 0, "_s": 1, "_m": 2, "_l": 3}


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """Swallow faster-coco-eval's progress messages; we print our own tables."""


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate_coco`.

    Attributes:
        metrics: ``{"<iou_type>_mAP": ..., "_mAP_50", "_mAP_75", "_mAP_s", "_mAP_m", "_mAP_l", "_AR_<m>" for every
            max_dets m}``, values in [0, 1]; ``nan`` where COCO leaves a metric undefined (no ground truth at all, or
            none in that area range -- pycocotools reports -1 there).
        per_class: one row per category, in ascending category-id order (the K axis of ``precision``):
            ``{"class": name, "category_id": id, "AP": AP@[.5:.95], "AP50": AP@.5}``, ``nan`` for a class with no
            ground truth.
        precision: raw COCO precision array, shape (T=10 IoU thresholds, R=101 recall thresholds, K categories,
            A=4 area ranges [all, small, medium, large], M=len(max_dets)), -1 where undefined; ``None`` if not run.
        recall: raw COCO recall array, shape (T, K, A, M), -1 where undefined.
        cat_ids: category ids along the K axis.
        max_dets: the maxDets values along the M axis (ascending).
    """

    metrics: dict[str, float]
    per_class: list[dict]
    precision: np.ndarray | None
    recall: np.ndarray | None = None
    cat_ids: list[int] = field(default_factory=list)
    max_dets: tuple[int, ...] = (1, 10, 100)
    iou_type: str = "bbox"
    segm: EvalResult | None = None  # the mask evaluation of a Mask R-CNN run, beside this bbox one


def _to_numpy(x: Any) -> np.ndarray:
    """Tensor / array / list -> numpy array on CPU (no torch import needed for numpy callers)."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def detections_to_coco_results(dets: Sequence[dict], image_ids: Sequence[int], label2cat: dict[int, int]) -> list[dict]:
    """Convert per-image detections to COCO results entries.

    Args:
        dets: one dict per image with ``boxes`` (K, 4) xyxy in original-image pixels, ``scores`` (K,) and
            ``labels`` (K,) contiguous class indices 0..C-1 (torch tensors or numpy arrays).
        image_ids: COCO image id of each entry of ``dets``.
        label2cat: contiguous label -> dataset category id (category ids may be non-contiguous, e.g. COCO's 1..90).

    Returns:
        ``[{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}, ...]`` with
        ``w = x2 - x1`` and ``h = y2 - y1`` (MMDetection 2.x ``xyxy2xywh``, no +1), box coordinates rounded to 3
        decimals (sub-pixel precision far below COCO's IoU granularity; keeps result files small).
    """
    if len(dets) != len(image_ids):
        raise ValueError(f"detections_to_coco_results: {len(dets)} detection entries but {len(image_ids)} image ids")
    if not label2cat:
        raise ValueError("detections_to_coco_results: label2cat is empty")
    max_label = max(label2cat)
    lut = np.full(max_label + 1, -1, dtype=np.int64)  # vectorised label -> category id lookup
    for label, cat in label2cat.items():
        if label < 0:
            raise ValueError(f"detections_to_coco_results: negative label {label} in label2cat")
        lut[label] = cat

    results: list[dict] = []
    for det, image_id in zip(dets, image_ids):
        missing = {"boxes", "scores", "labels"} - set(det)
        if missing:
            raise ValueError(f"detections_to_coco_results: image {image_id}: detection dict lacks {sorted(missing)}")
        boxes = _to_numpy(det["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _to_numpy(det["scores"]).astype(np.float64).reshape(-1)
        labels = _to_numpy(det["labels"]).astype(np.int64).reshape(-1)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(
                f"detections_to_coco_results: image {image_id}: boxes {len(boxes)}, scores {len(scores)} and "
                f"labels {len(labels)} differ in length"
            )
        if len(labels) == 0:
            continue
        bad = (labels < 0) | (labels > max_label)
        cats = lut[np.clip(labels, 0, max_label)]
        bad |= cats < 0
        if bad.any():
            raise ValueError(
                f"detections_to_coco_results: image {image_id}: labels {sorted(set(labels[bad].tolist()))} have no "
                f"entry in label2cat (known labels {sorted(label2cat)})"
            )
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).round(3)
        img = int(image_id)
        results.extend(
            {"image_id": img, "category_id": c, "bbox": b, "score": s}
            for c, b, s in zip(cats.tolist(), xywh.tolist(), scores.tolist())
        )
    return results


def _load_gt(gt: dict | str | Path) -> dict:
    """Load a COCO ground-truth dict and fill the optional fields pycocotools expects (on a copy)."""
    if isinstance(gt, (str, Path)):
        with open(gt) as f:
            data = json.load(f)
        where = str(gt)
    elif isinstance(gt, dict):
        data = copy.deepcopy(gt)  # faster-coco-eval writes "ignore" flags into the annotation dicts
        where = "gt dict"
    else:
        raise TypeError(f"evaluate_coco: gt must be a dict or a path, got {type(gt).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise ValueError(f"evaluate_coco: {where} has no '{key}' list")
    anns = data.setdefault("annotations", [])
    for i, ann in enumerate(anns):
        if "bbox" not in ann and "segmentation" not in ann:
            raise ValueError(f"evaluate_coco: {where}: annotation #{i} has neither 'bbox' nor 'segmentation'")
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and "bbox" in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    return data


def _check_polygons(entries: list[dict], sizes: dict[Any, tuple[float, float]], what: str) -> None:
    """Refuse polygons that would make the rasteriser allocate without bound (NaN / inf coordinates, or vertices
    more than one image size outside the image, :func:`~densedet.structures.masks.polygon_limits`) before
    faster-coco-eval rasterises anything. A :class:`~densedet.data.CocoDataset`'s ground truth never holds them
    (its loader skips them); a hand-written gt or results file may."""
    for i, entry in enumerate(entries):
        segm = entry.get("segmentation")
        if not isinstance(segm, list):
            continue
        size = sizes.get(entry.get("image_id"))
        name = f"{what} id {entry['id']}" if "id" in entry else f"{what} #{i}"
        for j, poly in enumerate(segm):
            try:
                pts = np.asarray(poly, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise ValueError(f"evaluate_coco: {name}: polygon {j} is not a list of numbers") from None
            if not np.isfinite(pts).all():
                raise ValueError(f"evaluate_coco: {name}: polygon {j} has NaN or inf coordinates (rasterising it "
                                 f"would allocate without bound)")
            if size is not None and pts.size:
                x_lo, x_hi, y_lo, y_hi = polygon_limits(size[0], size[1])
                xs, ys = pts[0::2], pts[1::2]
                if xs.min() < x_lo or xs.max() > x_hi or (ys.size and (ys.min() < y_lo or ys.max() > y_hi)):
                    raise ValueError(f"evaluate_coco: {name}: polygon {j} has coordinates more than one image "
                                     f"size outside its {size[1]:g}x{size[0]:g} image")


def _check_results(results: list[dict], coco_gt: COCO) -> list[dict]:
    """Validate results against the gt and return fresh dicts (faster-coco-eval mutates what it loads)."""
    img_ids = set(coco_gt.getImgIds())
    cat_ids = set(coco_gt.getCatIds())
    res_imgs = {r["image_id"] for r in results}
    res_cats = {r["category_id"] for r in results}
    if not res_imgs <= img_ids:
        unknown = sorted(res_imgs - img_ids)
        raise ValueError(f"evaluate_coco: results refer to image ids not in the ground truth: {unknown[:10]}")
    if not res_cats <= cat_ids:
        unknown = sorted(res_cats - cat_ids)
        raise ValueError(
            f"evaluate_coco: results refer to category ids not in the ground truth: {unknown[:10]} "
            f"(known: {sorted(cat_ids)[:20]}); is label2cat right?"
        )
    return [dict(r) for r in results]


def _mean_valid(a: np.ndarray) -> float:
    """Mean of the entries COCO marks valid (> -1); nan when there are none (pycocotools would say -1)."""
    valid = a[a > -1]
    return float(valid.mean()) if valid.size else float("nan")


def evaluate_coco(
    gt: dict | str | Path,
    results: list[dict] | str | Path,
    iou_type: str = "bbox",
    classwise: bool = True,
    max_dets: Sequence[int] = (1, 10, 100),
) -> EvalResult:
    """Run COCO evaluation with faster-coco-eval.

    Args:
        gt: COCO ground-truth dict or path to its json. Images without annotations are fine (detections on them
            count as false positives). Missing ``area`` is filled with the box area and ``iscrowd`` with 0.
        results: COCO results entries (see :func:`detections_to_coco_results`) or a path to a results json.
        iou_type: ``"bbox"`` or ``"segm"`` (segm results need RLE ``segmentation``); it prefixes the metric keys.
        classwise: fill ``per_class`` (one row per gt category).
        max_dets: COCO maxDets; AP metrics use the largest, ``<iou_type>_AR_<m>`` is reported for each.

    Returns:
        :class:`EvalResult`. An empty ``results`` gives 0 for every metric that has ground truth.
    """
    if iou_type not in _SUPPORTED_IOU_TYPES:
        raise ValueError(f"evaluate_coco: iou_type must be one of {_SUPPORTED_IOU_TYPES}, got '{iou_type}'")
    max_dets = tuple(sorted(int(m) for m in max_dets))
    if not max_dets or max_dets[0] < 1:
        raise ValueError(f"evaluate_coco: max_dets must be positive integers, got {max_dets}")
    if isinstance(results, (str, Path)):
        with open(results) as f:
            results = json.load(f)
    if not isinstance(results, list):
        raise TypeError(f"evaluate_coco: results must be a list of dicts, got {type(results).__name__}")

    gt_data = _load_gt(gt)
    if iou_type == "segm":
        sizes = {img.get("id"): (float(img["height"]), float(img["width"])) for img in gt_data["images"]
                 if isinstance(img, dict) and all(isinstance(img.get(k), (int, float)) for k in ("height", "width"))}
        _check_polygons(gt_data["annotations"], sizes, "ground-truth annotation")
        _check_polygons(results, sizes, "result")
    coco_gt = COCO(gt_data, print_function=_quiet)
    coco_dt = coco_gt.loadRes(_check_results(results, coco_gt))
    coco_dt.print_function = _quiet
    evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_quiet)
    evaluator.params.maxDets = list(max_dets)
    evaluator.evaluate()
    evaluator.accumulate()

    precision = np.asarray(evaluator.eval["precision"])  # (T, R, K, A, M)
    recall = np.asarray(evaluator.eval["recall"])  # (T, K, A, M)
    iou_thrs = np.asarray(evaluator.params.iouThrs)
    cat_ids = [int(c) for c in evaluator.params.catIds]  # sorted by faster-coco-eval, = K axis order

    def iou_index(thr: float) -> int:
        return int(np.argmin(np.abs(iou_thrs - thr)))

    metrics: dict[str, float] = {}
    p_all = precision[..., -1]  # largest maxDets
    metrics[f"{iou_type}_mAP"] = _mean_valid(p_all[:, :, :, 0])
    metrics[f"{iou_type}_mAP_50"] = _mean_valid(p_all[iou_index(0.5), :, :, 0])
    metrics[f"{iou_type}_mAP_75"] = _mean_valid(p_all[iou_index(0.75), :, :, 0])
    for suffix in ("_s", "_m", "_l"):
        metrics[f"{iou_type}_mAP{suffix}"] = _mean_valid(p_all[:, :, :, _AREA_INDEX[suffix]])
    for m_idx, m in enumerate(max_dets):
        metrics[f"{iou_type}_AR_{m}"] = _mean_valid(recall[:, :, 0, m_idx])

    per_class: list[dict] = []
    if classwise:
        # mmdet 2.x classwise table: precision[:, :, k, area=all, maxDets=last], mean over valid entries.
        names = {c["id"]: c.get("name", str(c["id"])) for c in coco_gt.loadCats(cat_ids)}
        for k, cat in enumerate(cat_ids):
            per_class.append(
                {
                    "class": names[cat],
                    "category_id": cat,
                    "AP": _mean_valid(p_all[:, :, k, 0]),
                    "AP50": _mean_valid(p_all[iou_index(0.5), :, k, 0]),
                }
            )
    return EvalResult(
        metrics=metrics,
        per_class=per_class,
        precision=precision,
        recall=recall,
        cat_ids=cat_ids,
        max_dets=max_dets,
        iou_type=iou_type,
    )


def format_metrics_table(result: EvalResult) -> str:
    """COCO-summary-style lines: AP, AP50, AP75, APs, APm, APl and AR at the largest max_dets."""
    m = result.metrics
    t = result.iou_type
    top = result.max_dets[-1]
    rows = [
        ("Average Precision  (AP)", "0.50:0.95", "all", m[f"{t}_mAP"]),
        ("Average Precision  (AP)", "0.50", "all", m[f"{t}_mAP_50"]),
        ("Average Precision  (AP)", "0.75", "all", m[f"{t}_mAP_75"]),
        ("Average Precision  (AP)", "0.50:0.95", "small", m[f"{t}_mAP_s"]),
        ("Average Precision  (AP)", "0.50:0.95", "medium", m[f"{t}_mAP_m"]),
        ("Average Precision  (AP)", "0.50:0.95", "large", m[f"{t}_mAP_l"]),
        ("Average Recall     (AR)", "0.50:0.95", "all", m[f"{t}_AR_{top}"]),
    ]
    return "\n".join(
        f" {title} @[ IoU={iou:<9} | area={area:>6s} | maxDets={top:>3d} ] = {value:0.3f}"
        for title, iou, area, value in rows
    )


def format_per_class_table(result: EvalResult) -> str:
    """Aligned per-class table (one line per category): ``category | AP | AP50``, ``nan`` for a class without gt."""
    if not result.per_class:
        return "(no per-class results: evaluate_coco was run with classwise=False)"
    header = ("category", "AP", "AP50")
    rows = [(str(r["class"]), f"{r['AP']:0.3f}", f"{r['AP50']:0.3f}") for r in result.per_class]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = " | ".join(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return f"| {first} | {rest} |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])


def save_results_json(results: list[dict], path: str | Path) -> Path:
    """Write COCO results entries to ``path`` atomically (:func:`densedet.io.atomic_write_json`)."""
    return atomic_write_json(path, results)
