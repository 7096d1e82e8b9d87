"""COCO evaluation (faster-coco-eval), metric tables, results json and plots; server submissions; confusion matrix
and TIDE error analysis."""

from densedet.evaluation.coco_eval import (
    EvalResult,
    atomic_write,
    detections_to_coco_results,
    evaluate_coco,
    format_metrics_table,
    format_per_class_table,
    save_results_json,
)
from densedet.evaluation.confusion import ConfusionMatrix, confusion_matrix, plot_confusion_matrix, save_confusion_csv
from densedet.evaluation.error_analysis import ErrorAnalysis, load_results_json, write_error_analysis
from densedet.evaluation.plots import (
    plot_pr_curves,
    plot_training_curves,
    read_log_jsonl,
)
from densedet.evaluation.submission import (
    Submission,
    algorithm_name,
    coco_testset_name,
    submission_file_name,
    write_coco_submission,
)
from densedet.evaluation.tide import TideResult, format_tide_table, plot_tide, tide_errors

__all__ = [
    "ConfusionMatrix",
    "ErrorAnalysis",
    "EvalResult",
    "Submission",
    "TideResult",
    "algorithm_name",
    "atomic_write",
    "confusion_matrix",
    "detections_to_coco_results",
    "evaluate_coco",
    "format_metrics_table",
    "format_per_class_table",
    "format_tide_table",
    "load_results_json",
    "plot_confusion_matrix",
    "plot_pr_curves",
    "plot_tide",
    "plot_training_curves",
    "read_log_jsonl",
    "save_confusion_csv",
    "save_results_json",
    "submission_file_name",
    "coco_testset_name",
    "tide_errors",
    "write_coco_submission",
    "write_error_analysis",
]
