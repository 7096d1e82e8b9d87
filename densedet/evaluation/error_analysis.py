"""The error analysis ``densedet test`` and ``densedet analyze`` write beside the metrics: the confusion matrix
(:mod:`densedet.evaluation.confusion`, PNG + CSV) and the TIDE error breakdown (:mod:`densedet.evaluation.tide`,
table + JSON + PNG), from a COCO ground truth and COCO results lists."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from densedet.evaluation.confusion import (
    DEFAULT_IOU_THR,
    DEFAULT_SCORE_THR,
    ConfusionMatrix,
    confusion_matrix,
    plot_confusion_matrix,
    save_confusion_csv,
)
from densedet.evaluation.tide import TideResult, format_tide_table, plot_tide, tide_errors
from densedet.io import atomic_write_json, atomic_write_text

__all__ = ["ErrorAnalysis", "load_results_json", "write_error_analysis"]


@dataclass
class ErrorAnalysis:
    """What :func:`write_error_analysis` computed and the files it wrote (``files``: name -> path)."""

    confusion: ConfusionMatrix
    tide: list[TideResult]
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        """The TIDE tables, then where the files are."""
        parts = [format_tide_table(t) for t in self.tide]
        parts.append("analysis: " + "  ".join(f"{k}: {v}" for k, v in self.files.items()))
        return "\n\n".join(parts)


def write_error_analysis(gt: dict, bbox_results: Sequence[dict], out_dir: str | Path,
                         segm_results: Sequence[dict] | None = None, score_thr: float = DEFAULT_SCORE_THR,
                         iou_thr: float = DEFAULT_IOU_THR) -> ErrorAnalysis:
    """Write ``confusion_matrix.png`` / ``.csv`` (boxes, MMDetection's thresholds ``score_thr`` / ``iou_thr``),
    ``tide_errors.json`` and ``tide_errors.png`` / ``.txt`` (bbox, and segm when ``segm_results`` is given) into
    ``out_dir``.

    Args:
        gt: COCO ground truth with ``annotations`` (boxes; masks for the segm analysis).
        bbox_results / segm_results: COCO results entries.
    """
    out = Path(out_dir)
    cm = confusion_matrix(gt, bbox_results, score_thr=score_thr, iou_thr=iou_thr)
    tide = [tide_errors(gt, bbox_results, "bbox")]
    if segm_results is not None:
        tide.append(tide_errors(gt, segm_results, "segm"))
    files = {
        "confusion_png": plot_confusion_matrix(cm, out / "confusion_matrix.png"),
        "confusion_csv": save_confusion_csv(cm, out / "confusion_matrix.csv"),
        "tide_json": atomic_write_json(out / "tide_errors.json", {t.iou_type: t.to_dict() for t in tide}, indent=2),
        "tide_png": plot_tide(tide, out / "tide_errors.png"),
        "tide_txt": atomic_write_text(out / "tide_errors.txt", "\n\n".join(format_tide_table(t) for t in tide) + "\n"),
    }
    return ErrorAnalysis(cm, tide, files)


def load_results_json(path: str | Path) -> list[dict]:
    """A COCO results json (a list of entries); ``ValueError`` naming the file when it is something else."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: a COCO results file is a JSON list, got {type(data).__name__}")
    return data
