"""Looking at data, training runs and models: ``densedet data check`` (dataset statistics and what a config's head
would assign), ``densedet levels`` (per-pyramid-level statistics of a run) and ``densedet bench`` (latency of
inference / training options side by side, and torchvision's peer)."""

from densedet.analysis.bench import BenchResult, format_table, run_bench
from densedet.analysis.data_check import data_check
from densedet.analysis.levels import LevelLogError, levels_report

__all__ = ["BenchResult", "LevelLogError", "data_check", "format_table", "levels_report", "run_bench"]
