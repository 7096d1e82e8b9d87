"""Training-curve and precision-recall plots (matplotlib, headless).

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas directly, never through
``pyplot``: no window can open, no global backend is switched and no figure leaks between calls.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from densedet.evaluation.coco_eval import EvalResult
from densedet.io import atomic_write

__all__ = ["plot_pr_curves", "plot_training_curves", "read_log_jsonl"]


def read_log_jsonl(log_jsonl: str | Path) -> list[dict]:
    """Read a JSONL training log into a list of records (blank lines skipped).

    A malformed final line is skipped: the trainer may be appending to the file while we read it. A malformed
    line anywhere else is corruption and raises ``ValueError`` naming the file and line (``TypeError`` for a
    line that is valid JSON but not an object).
    """
    path = Path(log_jsonl)
    lines = path.read_text().splitlines()
    records: list[dict] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise TypeError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (partial windows at the start), via cumulative sums."""
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _finite_series(records: Sequence[dict], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the records that have a finite numeric ``y_key``, in file order."""
    xs, ys = [], []
    for r in records:
        y = r.get(y_key)
        x = r.get(x_key)
        if isinstance(y, (int, float)) and isinstance(x, (int, float)) and math.isfinite(y):
            xs.append(float(x))
            ys.append(float(y))
    return np.asarray(xs), np.asarray(ys)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _save(fig: Figure, out_png: str | Path) -> Path:
    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: rendering never depends on the global backend
    fig.tight_layout()
    return atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_training_curves(log_jsonl: str | Path, out_png: str | Path) -> Path:
    """Plot losses and lr vs iteration and validation mAP vs epoch from a JSONL training log.

    Log lines are ``{"type": "train", "iter", "epoch", "lr", "loss", "loss_cls", ...}`` (``iter`` = global
    iteration) or ``{"type": "val", "iter", "epoch", "bbox_mAP", "bbox_mAP_50", ...}``; other types are ignored.
    Panels: every ``loss*`` key (raw, faint; and a trailing moving average), the learning rate, and every
    ``*_mAP`` / ``*_mAP_50`` key per epoch. A log without val lines (or without train lines) still plots.

    Returns:
        ``out_png`` as a Path (written atomically).
    """
    records = read_log_jsonl(log_jsonl)
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]

    fig = Figure(figsize=(16, 4.5))
    ax_loss, ax_lr, ax_map = fig.subplots(1, 3)

    loss_keys = sorted({k for r in train for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k))
    for i, key in enumerate(loss_keys):
        x, y = _finite_series(train, "iter", key)
        if not x.size:
            continue
        color = f"C{i % 10}"
        window = max(1, min(50, y.size // 20))
        ax_loss.plot(x, y, color=color, alpha=0.2, linewidth=0.8)
        ax_loss.plot(x, _smooth(y, window), color=color, linewidth=1.6, label=key)
    if loss_keys:
        ax_loss.legend(fontsize=8)
    else:
        _note(ax_loss, "no train records")
    ax_loss.set(title="losses (faint: raw)", xlabel="iteration", ylabel="loss")
    ax_loss.grid(alpha=0.3)

    x, y = _finite_series(train, "iter", "lr")
    if x.size:
        ax_lr.plot(x, y, color="C3")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        _note(ax_lr, "no lr records")
    ax_lr.set(title="learning rate", xlabel="iteration", ylabel="lr")
    ax_lr.grid(alpha=0.3)

    map_keys = sorted({k for r in val for k in r if k.endswith(("_mAP", "_mAP_50"))})
    plotted = False
    for i, key in enumerate(map_keys):
        x, y = _finite_series(val, "epoch", key)
        if x.size:
            ax_map.plot(x, y, marker="o", color=f"C{i % 10}", label=key)
            plotted = True
    if plotted:
        ax_map.legend(fontsize=8)
        ax_map.set_ylim(0, max(1e-3, ax_map.get_ylim()[1]))
    else:
        _note(ax_map, "no validation records yet")
    ax_map.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_map.set(title="validation", xlabel="epoch", ylabel="mAP")
    ax_map.grid(alpha=0.3)
    return _save(fig, out_png)


def plot_pr_curves(result: EvalResult, class_names: Sequence[str] | None, out_png: str | Path) -> Path:
    """Precision-recall curves per class: at IoU 0.5 (left) and averaged over IoU .5:.95 (right).

    Uses ``result.precision`` (T, R, K, A, M) at area=all and the largest maxDets. Classes without ground truth
    are skipped; the thick black line is the mean over classes. ``class_names`` (length K, in the K order of
    ``result.cat_ids``) defaults to the names in ``result.per_class``. The legend is drawn for up to 20 classes.

    Returns:
        ``out_png`` as a Path (written atomically).
    """
    if result.precision is None:
        raise ValueError("plot_pr_curves: result has no precision array")
    prec = np.asarray(result.precision)[:, :, :, 0, -1]  # (T, R, K)
    num_classes = prec.shape[2]
    if class_names is None:
        class_names = [str(r["class"]) for r in result.per_class]
    if len(class_names) != num_classes:
        raise ValueError(f"plot_pr_curves: {len(class_names)} class names for {num_classes} evaluated categories")
    rec_thrs = np.linspace(0.0, 1.0, prec.shape[1])  # COCO's 101 recall thresholds
    prec = np.where(prec > -1, prec, np.nan)
    valid = ~np.isnan(prec).all(axis=(0, 1))  # classes that have ground truth

    fig = Figure(figsize=(13, 5.5))
    axes = fig.subplots(1, 2)
    panels = [("IoU=0.50", prec[0]), ("IoU=0.50:0.95 (mean)", prec.mean(axis=0))]
    for ax, (title, curves) in zip(axes, panels):  # curves: (R, K)
        for k in np.flatnonzero(valid):
            ap = float(np.nanmean(curves[:, k]))
            ax.plot(rec_thrs, curves[:, k], linewidth=1.0, color=f"C{k % 10}", label=f"{class_names[k]} {ap:.3f}")
        if valid.any():
            mean_curve = np.nanmean(curves[:, valid], axis=1)
            ax.plot(rec_thrs, mean_curve, color="black", linewidth=2.5, label=f"all {np.nanmean(mean_curve):.3f}")
            if valid.sum() <= 20:
                ax.legend(fontsize=7, loc="lower left")
        else:
            _note(ax, "no class has ground truth")
        ax.set(title=f"precision-recall, {title}", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    return _save(fig, out_png)
