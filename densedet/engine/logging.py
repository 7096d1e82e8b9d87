"""Training logs: the ``densedet`` Python logger, a tqdm progress display and a JSONL metrics log.

Only rank 0 writes. On a terminal the progress is one tqdm bar over the whole run (``epochs * iters_per_epoch``,
so its it/s and ETA are for the run) with loss components as postfix; without a TTY (CI, ``nohup``) a plain line
is printed every ``log_interval`` iterations instead:
``epoch 2/12 iter 40/100 loss 1.234 loss_cls 0.800 ... lr 0.0100 2.3 it/s eta 0:01:10``.

A JSONL train line holds the window averages of the iteration's floats (``loss``, ``loss_*``, statistics such as
``num_pos``, ``grad_norm``, ``lvl*``), ``lr``, ``it_per_s`` (iterations per second over the window),
``memory_mb`` (peak memory of the window: CUDA memory allocated by tensors, as MMEngine's ``memory``; on CPU the
process's peak resident set size) and whatever the trainer's ``extras`` add (``skipped_steps`` under AMP).
Listeners of :class:`JsonlLogger` (the experiment trackers of :mod:`densedet.engine.trackers`) receive every line
exactly as it is written.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

__all__ = ["JsonlLogger", "TrainProgress", "format_seconds", "peak_memory_mb", "setup_logger"]

LOGGER_NAME = "densedet"


class _TqdmStreamHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` so log lines do not break an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise into training
            self.handleError(record)


def setup_logger(work_dir: str | Path | None = None, rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Configure the ``densedet`` logger: stdout and ``work_dir/train.log`` on rank 0, errors only elsewhere.

    Calling it again replaces the handlers it added before (several trainers in one process do not duplicate
    lines or keep old files open).
    """
    log = logging.getLogger(LOGGER_NAME)
    for h in list(log.handlers):
        if getattr(h, "_densedet", False):
            log.removeHandler(h)
            h.close()
    # propagate stays on: pytest's caplog and applications' root handlers still see the records.
    if rank != 0:
        log.setLevel(logging.ERROR)
        return log
    log.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    console = _TqdmStreamHandler(sys.stdout)
    console.setFormatter(fmt)
    console._densedet = True  # type: ignore[attr-defined]
    log.addHandler(console)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(work_dir) / "train.log", mode="a")
        fh.setFormatter(fmt)
        fh._densedet = True  # type: ignore[attr-defined]
        log.addHandler(fh)
    return log


def _json_value(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):  # torch / numpy scalar
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class JsonlLogger:
    """Append one JSON object per line to ``path`` (flushed per line, so a crash loses at most the last line).

    Non-finite floats become ``null`` / ``"inf"`` so every line is strict JSON. Each callable in ``listeners`` is
    called with the record as written (after that conversion), once the line is on disk.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: _json_value(v) for k, v in record.items()}
        line = json.dumps(clean, allow_nan=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        for listener in self.listeners:
            listener(clean)


def peak_memory_mb() -> float | None:
    """Peak memory since the last call, in MiB: CUDA memory allocated by tensors (its peak counter is reset, as
    MMEngine's ``get_max_cuda_memory`` does), or without CUDA the process's peak resident set size (never
    reset by the OS); ``None`` where neither can be read."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        mb = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return mb
    try:
        import resource  # Unix only
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def format_seconds(seconds: float) -> str:
    """``3725.2 -> '1:02:05'``; days as ``'2 days, 3:00:00'``."""
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}" if abs(v) < 10 else f"{v:.4g}"


class TrainProgress:
    """Per-iteration progress, windowed averages every ``log_interval`` iterations, JSONL train lines.

    Args:
        total_iters: iterations of the whole run (``epochs * iters_per_epoch``).
        iters_per_epoch: iterations per epoch.
        epochs: number of epochs.
        start_iter: global iterations already done (when resuming).
        log_interval: iterations per logged line.
        jsonl: where to append ``{"type": "train", ...}`` lines (rank 0), or ``None``.
        enabled: False on ranks other than 0 (nothing is displayed or written).
        tty: force bar (True) / plain lines (False); default: whether ``stream`` is a terminal.
        stream: where the bar or plain lines go (stderr by default).
        extras: called when a line is logged (rank 0); its floats join the JSONL line as they are (counters such
            as the trainer's ``skipped_steps``, not averaged over the window).
    """

    def __init__(self, total_iters: int, iters_per_epoch: int, epochs: int, start_iter: int = 0,
                 log_interval: int = 20, jsonl: JsonlLogger | None = None, enabled: bool = True,
                 tty: bool | None = None, stream: TextIO | None = None,
                 extras: Callable[[], dict[str, float]] | None = None) -> None:
        self.total_iters = int(total_iters)
        self.iters_per_epoch = int(iters_per_epoch)
        self.epochs = int(epochs)
        self.log_interval = max(1, int(log_interval))
        self.jsonl = jsonl
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(tty if tty is not None else getattr(self.stream, "isatty", lambda: False)())
        self.start_iter = int(start_iter)
        self.t0 = time.perf_counter()
        self.extras = extras
        self._window_start = (self.t0, self.start_iter)  # (time, iterations done) at the last logged line
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # per key: statistics such as lvl* appear only on some iterations
        self.count = 0
        self.last: dict[str, float] = {}
        self.bar: tqdm | None = None
        if enabled and self.tty:
            self.bar = tqdm(total=self.total_iters, initial=self.start_iter, file=self.stream, dynamic_ncols=True,
                            unit="it", smoothing=0.05)

    def rate(self, global_iter: int) -> float:
        """Iterations per second since this process started (resumed iterations excluded)."""
        done = global_iter + 1 - self.start_iter
        elapsed = time.perf_counter() - self.t0
        return done / elapsed if elapsed > 0 and done > 0 else float("nan")

    def update(self, epoch: int, global_iter: int, lr: float, stats: dict[str, float],
               reduce: Any | None = None) -> dict[str, float] | None:
        """Record iteration ``global_iter`` (0-based) of ``epoch`` (0-based).

        ``stats`` are this iteration's floats (``loss``, ``loss_*``, other statistics). ``reduce``, if given, maps
        the window averages to their values averaged across processes; it is called on every rank at the same
        iterations, so all ranks must call :meth:`update` identically. Returns the window averages when a line is
        logged (every ``log_interval`` iterations, at an epoch's last iteration and at the run's last), else ``None``.
        """
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1
        iter_in_epoch = global_iter - epoch * self.iters_per_epoch + 1
        if self.bar is not None:
            self.bar.update(1)
            avg = {k: s / self.counts[k] for k, s in self.sums.items() if k.startswith("loss")}
            self.bar.set_postfix({"ep": f"{epoch + 1}/{self.epochs}", **{k: _fmt(v) for k, v in avg.items()},
                                  "lr": f"{lr:.3g}"}, refresh=False)
        boundary = iter_in_epoch == self.iters_per_epoch or global_iter + 1 == self.total_iters
        if (global_iter + 1) % self.log_interval != 0 and not boundary:
            return None
        avg = {k: s / self.counts[k] for k, s in self.sums.items()}
        if reduce is not None:
            avg = reduce(avg)
        self.sums, self.counts, self.count = {}, {}, 0
        self.last = avg
        if not self.enabled:
            return avg
        rate = self.rate(global_iter)
        now = time.perf_counter()
        t_prev, done_prev = self._window_start
        window_rate = (global_iter + 1 - done_prev) / (now - t_prev) if now > t_prev else float("nan")
        self._window_start = (now, global_iter + 1)
        if self.jsonl is not None:
            extra: dict[str, Any] = {"it_per_s": window_rate}
            memory = peak_memory_mb()
            if memory is not None:
                extra["memory_mb"] = memory
            if self.extras is not None:
                extra.update(self.extras())
            self.jsonl.log({"type": "train", "epoch": epoch + 1, "iter": global_iter + 1, "lr": lr, **avg,
                            **extra, "time": time.time()})
        if self.bar is None:
            eta = (self.total_iters - global_iter - 1) / rate if rate == rate and rate > 0 else float("nan")
            parts = [f"epoch {epoch + 1}/{self.epochs}", f"iter {iter_in_epoch}/{self.iters_per_epoch}"]
            # per-level statistics go to log.jsonl only (`densedet levels` shows them); the line stays readable
            shown = {k: v for k, v in avg.items() if not k.startswith("lvl")}
            parts += [f"{k} {_fmt(v)}" for k, v in sorted(shown.items(), key=lambda kv: (kv[0] != "loss", kv[0]))]
            parts += [f"lr {lr:.4g}", f"{rate:.2f} it/s", f"eta {format_seconds(eta)}"]
            print(" ".join(parts), file=self.stream, flush=True)
        return avg

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
