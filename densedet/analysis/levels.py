"""Per-pyramid-level imbalance diagnostics read back from a training log (``densedet levels WORK_DIR``).

During training every dense head logs, on the iterations the trainer writes a line for, ``lvl{i}_pos``,
``lvl{i}_neg``, ``lvl{i}_pos_neg_ratio``, ``lvl{i}_pos_cls_loss`` and ``lvl{i}_neg_cls_loss`` per level ``i``
(:meth:`densedet.models.heads.dense_head.DenseHead.level_stats`); UMOP adds ``lvl{i}_gamma`` / ``lvl{i}_alpha``.
This module turns those ``log.jsonl`` lines into a text table and a PNG plot. Plotting uses a
``matplotlib.figure.Figure`` on the Agg canvas directly (no pyplot globals), as densedet/evaluation/plots.py does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from densedet.evaluation.plots import read_log_jsonl
from densedet.io import atomic_write

__all__ = ["LevelLog", "LevelLogError", "format_level_table", "levels_report", "plot_levels", "read_level_log"]

LEVEL_KEY = re.compile(r"^lvl(\d+)_(\w+)$")
#: display order of the quantities the heads (and UMOP) log; any other ``lvl{i}_*`` key follows, sorted
KNOWN_QUANTITIES = ("pos", "neg", "pos_neg_ratio", "pos_cls_loss", "neg_cls_loss", "gamma", "alpha")
_TITLES = {"pos": "positives", "neg": "negatives", "pos_neg_ratio": "pos / neg",
           "pos_cls_loss": "mean positive cls loss", "neg_cls_loss": "mean negative cls loss",
           "gamma": "UMOP gamma", "alpha": "UMOP alpha"}
_LOG_SCALE = ("pos", "neg", "pos_neg_ratio")  # spans orders of magnitude across levels


class LevelLogError(ValueError):
    """The training log holds no per-level statistics."""


@dataclass
class LevelLog:
    """Per-level series of one training log.

    ``series[level][quantity]`` is ``(iters, values)``: float arrays of the logged iterations with a finite value,
    in file order. ``levels`` and ``quantities`` are sorted (quantities in :data:`KNOWN_QUANTITIES` order first).
    """

    path: Path
    levels: list[int]
    quantities: list[str]
    series: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    def get(self, level: int, quantity: str) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros(0)
        return self.series.get(level, {}).get(quantity, (empty, empty))


def _order(quantity: str) -> tuple[int, str]:
    return (KNOWN_QUANTITIES.index(quantity), "") if quantity in KNOWN_QUANTITIES else (len(KNOWN_QUANTITIES),
                                                                                         quantity)


def read_level_log(log_jsonl: str | Path) -> LevelLog:
    """Collect the ``lvl{i}_*`` values of the ``"type": "train"`` lines of a JSONL training log.

    Raises:
        FileNotFoundError: the file does not exist.
        LevelLogError: no train line carries a ``lvl*`` key (the message names the file and says why).
    """
    path = Path(log_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log here (is this a DenseDet work dir?)")
    raw: dict[int, dict[str, tuple[list[float], list[float]]]] = {}
    for rec in read_log_jsonl(path):
        if rec.get("type") != "train" or not isinstance(rec.get("iter"), (int, float)):
            continue
        for key, value in rec.items():
            m = LEVEL_KEY.match(key)
            # null (a non-finite value in the log) and strings ("inf") are skipped: gaps, not zeros
            if m is None or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            xs, ys = raw.setdefault(int(m.group(1)), {}).setdefault(m.group(2), ([], []))
            xs.append(float(rec["iter"]))
            ys.append(float(value))
    if not raw:
        raise LevelLogError(f"{path}: no per-level statistics (lvl* keys) in this log; train with a dense head; "
                            f"stats are logged every runtime.log_interval iterations")
    quantities = sorted({q for per in raw.values() for q in per}, key=_order)
    series = {lvl: {q: (np.asarray(x), np.asarray(y)) for q, (x, y) in per.items()} for lvl, per in raw.items()}
    return LevelLog(path=path, levels=sorted(raw), quantities=quantities, series=series)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "-"
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


def format_level_table(log: LevelLog) -> str:
    """One table per level: every quantity's first and last logged value and its mean over the logged lines."""
    width = max(len(q) for q in log.quantities) + 2
    blocks = []
    for lvl in log.levels:
        lines = [f"level {lvl}", f"{'quantity':<{width}}{'first':>12}{'last':>12}{'mean':>12}{'lines':>7}"]
        for q in log.quantities:
            _, ys = log.get(lvl, q)
            if ys.size:
                row = (_fmt(ys[0]), _fmt(ys[-1]), _fmt(float(ys.mean())), str(ys.size))
            else:
                row = ("-", "-", "-", "0")
            lines.append(f"{q:<{width}}{row[0]:>12}{row[1]:>12}{row[2]:>12}{row[3]:>7}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def plot_levels(log: LevelLog, out_png: str | Path) -> Path:
    """One panel per quantity vs iteration, one line per level; written atomically to ``out_png``."""
    n = len(log.quantities)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, q in zip(axes, log.quantities):
        positive = True
        for lvl in log.levels:
            xs, ys = log.get(lvl, q)
            if xs.size:
                ax.plot(xs, ys, color=f"C{lvl % 10}", linewidth=1.3, marker="." if xs.size < 30 else None,
                        label=f"level {lvl}")
                positive = positive and bool((ys > 0).all())
        if q in _LOG_SCALE and positive:
            ax.set_yscale("log")
        ax.set(title=_TITLES.get(q, q), xlabel="iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.set_visible(False)
    FigureCanvasAgg(fig)  # the Agg canvas explicitly: rendering never depends on the global backend
    fig.tight_layout()
    return atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def levels_report(work_dir: str | Path, out_png: str | Path | None = None) -> tuple[str, Path]:
    """Read ``WORK_DIR/log.jsonl``; return the per-level table and the path of the plot written
    (``out_png``, default ``WORK_DIR/levels.png``)."""
    work_dir = Path(work_dir)
    log = read_level_log(work_dir / "log.jsonl")
    png = plot_levels(log, Path(out_png) if out_png else work_dir / "levels.png")
    return format_level_table(log), png
