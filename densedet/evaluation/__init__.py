"""COCO evaluation (faster-coco-eval), metric tables, results json and plots."""

from densedet.evaluation.coco_eval import (
    EvalResult,
    atomic_write,
    detections_to_coco_results,
    evaluate_coco,
    format_metrics_table,
    format_per_class_table,
    save_results_json,
)
from densedet.evaluation.plots import (
    plot_pr_curves,
    plot_training_curves,
    read_log_jsonl,
)

__all__ = [
    "EvalResult",
    "atomic_write",
    "detections_to_coco_results",
    "evaluate_coco",
    "format_metrics_table",
    "format_per_class_table",
    "plot_pr_curves",
    "plot_training_curves",
    "read_log_jsonl",
    "save_results_json",
]
