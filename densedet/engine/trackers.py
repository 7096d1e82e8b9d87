"""Experiment trackers beside ``log.jsonl``: TensorBoard and MLflow (``runtime.loggers``, ``densedet train --logger``).

The trainer holds one :class:`Trackers` (empty when no logger is configured, and on every rank but 0). It receives:

- every line written to ``log.jsonl`` (:meth:`Trackers.log_record`, a :class:`~densedet.engine.logging.JsonlLogger`
  listener), so the tracked scalars are exactly the logged ones, at ``step`` = the line's global iteration:
  ``train/<key>`` for a train line (each loss term, ``lr``, ``it_per_s``, ``memory_mb``, ``grad_norm``,
  ``num_pos``, ``skipped_steps`` under AMP, ``epoch``), ``levels/lvl<i>_<quantity>`` for the heads' per-level
  statistics, ``val/<metric>`` for a validation line (``bbox_mAP``, ``bbox_mAP_50`` ... and ``segm_*`` beside them)
  and ``<type>/<key>`` for other lines (``swa_val``);
- every validation's :class:`~densedet.evaluation.EvalResult` (:meth:`Trackers.log_evaluation`): per-class AP and
  AP50 (``val_per_class/bbox_AP/<class>``, ``val_per_class/segm_AP50/<class>`` ...) and the first
  ``runtime.log_val_images`` validation images with the detections of that validation drawn on them (dashed: the
  ground truth), as images.

A run's identity survives a resume: TensorBoard writes into the same ``work_dir/tensorboard`` folder with
``purge_step`` at the resumed iteration (TensorBoard hides what the interrupted run logged past its checkpoint), and
the MLflow run id is kept in the checkpoint's ``meta["trackers"]``, so ``--resume`` logs into the same run.

Both packages are optional extras (``pip install 'densedet[tensorboard]'`` / ``'densedet[mlflow]'``); a logger whose
package is missing is a :class:`~densedet.errors.ConfigError` naming the extra. A tracker that fails while training
(a tracking server gone) warns once and training goes on: the run's record is ``log.jsonl``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from densedet.config.schema import Config, check_logger_names
from densedet.engine.drawing import draw_detections
from densedet.errors import ConfigError
from densedet.version import __version__

__all__ = ["MLFLOW_DIR", "TENSORBOARD_DIR", "Trackers", "default_mlflow_uri", "draw_validation_images",
           "git_commit", "open_trackers", "require_tracker_packages", "scalar_tags"]

logger = logging.getLogger("densedet")

TENSORBOARD_DIR = "tensorboard"  # under the work dir
MLFLOW_DIR = "mlruns"  # the default MLflow file store, under the work dir
DRAW_SCORE_THR = 0.3  # as `densedet predict`'s default --score-thr
DRAW_SIDES = (320, 640)  # validation images are drawn at a longer side in this range: small ones enlarged so
#                          their labels stay readable (as predict's grid.png), large ones reduced (event file size)
_PARAM_VALUE_CHARS = 500  # MLflow's limit before 2.x; the whole config is the config.yaml artifact anyway
_PACKAGES = {  # logger -> (module to import, extra, what the extra installs)
    "tensorboard": ("torch.utils.tensorboard", "tensorboard", "the tensorboard package"),
    "mlflow": ("mlflow", "mlflow", "mlflow-skinny"),
}
_SKIP_KEYS = {"type", "iter", "time"}


def require_tracker_packages(names: Iterable[str], where: str = "runtime.loggers") -> None:
    """Raise :class:`ConfigError` with the install command when a package a logger needs is not importable."""
    for name in check_logger_names(list(names), where):
        module, extra, what = _PACKAGES[name]
        try:
            __import__(module)
        except ImportError as e:
            raise ConfigError(f"{where}: the {name} logger needs {what}, which is not installed ({e}); install it "
                              f"with: pip install 'densedet[{extra}]'", where) from e


def scalar_tags(record: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """``(step, {tag: value})`` of a ``log.jsonl`` line: its finite numbers under the tags the module docstring
    lists; ``None`` for a line without an ``iter``."""
    if "iter" not in record:
        return None
    kind = str(record.get("type", "train"))
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _SKIP_KEYS or (key == "epoch" and kind != "train"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue  # null (NaN in the log), "inf" strings and non-numbers are not plotted
        group = "levels" if kind == "train" and key.startswith("lvl") else kind
        out[f"{group}/{key}"] = float(value)
    return int(record["iter"]), out


def _per_class_tags(result: Any) -> dict[str, float]:
    """``val_per_class/<iou_type>_AP/<class>`` and ``..._AP50/<class>`` of a result (and of its ``segm``)."""
    out: dict[str, float] = {}
    for res in (result, getattr(result, "segm", None)):
        if res is None:
            continue
        for row in res.per_class or []:
            for key in ("AP", "AP50"):
                value = row.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    out[f"val_per_class/{res.iou_type}_{key}/{row['class']}"] = float(value)
    return out


def draw_validation_images(dataset: Any, results_json: str | Path, count: int, score_thr: float = DRAW_SCORE_THR,
                           sides: tuple[int, int] = DRAW_SIDES) -> list[tuple[str, Image.Image]]:
    """The first ``count`` images of ``dataset`` with the detections of ``results_json`` (COCO results: ``bbox``
    ``[x, y, w, h]``, ``category_id``) above ``score_thr`` drawn on them and their ground truth dashed, each drawn
    with its longer side clamped into ``sides`` (``draw_detections(display_side=...)``). ``dataset`` needs
    ``load_image``, ``get_ann_info``, ``img_infos``, ``label2cat`` and ``classes`` (a
    :class:`~densedet.data.CocoDataset`); other datasets, or no results file, give ``[]``.

    Returns:
        ``[(name, image)]``, name = ``<index>_<file stem>``.
    """
    needed = ("load_image", "get_ann_info", "img_infos", "label2cat", "classes")
    path = Path(results_json)
    if count <= 0 or not path.is_file() or not all(hasattr(dataset, a) for a in needed):
        return []
    indices = list(range(min(count, len(dataset))))
    ids = {int(dataset.img_infos[i]["id"]): i for i in indices}
    cat2label = {int(c): int(label) for label, c in dataset.label2cat.items()}
    per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in indices}
    for r in json.loads(path.read_text()):
        i = ids.get(int(r["image_id"]))
        if i is not None and int(r["category_id"]) in cat2label:
            per_image[i].append(r)
    out = []
    for i in indices:
        dets = per_image[i]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)], np.float64).reshape(-1, 4)
        scores = np.array([d["score"] for d in dets], np.float64)
        labels = np.array([cat2label[int(d["category_id"])] for d in dets], np.int64)
        image = dataset.load_image(i)
        side = max(image.shape[:2])
        display = min(max(side, sides[0]), sides[1])
        drawn = draw_detections(image, boxes, scores, labels, list(dataset.classes), score_thr=score_thr,
                                gt_boxes=dataset.get_ann_info(i)["boxes"], display_side=None if display == side
                                else display)
        out.append((f"{i}_{Path(dataset.img_infos[i]['file_name']).stem}", drawn))
    return out


def git_commit(path: str | Path | None = None) -> str:
    """The git commit of the DenseDet source (``path``: default this package's checkout) with ``-dirty`` when
    tracked files differ from it; ``"unknown"`` outside a git checkout (an installed wheel) or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def default_mlflow_uri(work_dir: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a file store in ``<work_dir>/mlruns`` (an absolute ``file:`` URI)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(work_dir).resolve() / MLFLOW_DIR).as_uri()


def _flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> ``{"optimizer.lr": "0.01", "data.train.pipeline": "[...]", ...}`` (MLflow params)."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    text = data if isinstance(data, str) else json.dumps(data, default=str)
    if len(text) > _PARAM_VALUE_CHARS:
        text = text[: _PARAM_VALUE_CHARS - 3] + "..."
    return {prefix: text}


def _safe_mlflow_key(key: str) -> str:
    # MLflow accepts alphanumerics, '_', '-', '.', ' ', ':' and '/' in metric names; class names may hold others
    return re.sub(r"[^\w\-. :/]", "_", key)


# -------------------------------------------------------------------------------------------------------- backends
class _TensorBoard:
    name = "tensorboard"

    def __init__(self, work_dir: Path, start_iter: int, config_text: str, commit: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional extra

        self.log_dir = work_dir / TENSORBOARD_DIR
        # purge_step: TensorBoard hides the events an interrupted run wrote at or after the resumed iteration
        self.writer = SummaryWriter(str(self.log_dir), purge_step=start_iter + 1 if start_iter > 0 else None,
                                    flush_secs=30)
        if start_iter == 0:
            self.writer.add_text("config", "```yaml\n" + config_text + "\n```", 0)
            self.writer.add_text("git_commit", commit, 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def images(self, images: list[tuple[str, Image.Image]], step: int) -> None:
        for name, img in images:
            self.writer.add_image(f"val_images/{name}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def state(self) -> dict[str, Any]:
        return {}

    def close(self, status: str) -> None:
        self.writer.flush()
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, cfg: Config, work_dir: Path, run_id: str | None, start_iter: int, config_file: Path,
                 commit: str) -> None:
        rt = cfg.runtime
        self.uri = rt.mlflow_tracking_uri or default_mlflow_uri(work_dir)
        if self.uri.startswith("file:") or "://" not in self.uri:
            # MLflow >= 3.7 keeps the file store only on request; it is what the default asks for (a
            # folder beside the checkpoints, readable without a server)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param, RunTag  # optional extra
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._Metric = Metric
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            run = None
            if run_id:
                try:
                    run = self.client.get_run(run_id)
                    self.client.update_run(run_id, status="RUNNING")
                    logger.info("mlflow: continuing run %s in %s", run_id, self.uri)
                except MlflowException as e:
                    logger.warning("mlflow: the checkpoint's run %s is not in %s (%s); starting a new run", run_id,
                                   self.uri, str(e).splitlines()[0])
                    run = None
            if run is None:
                experiment = rt.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.name or "densedet"
                found = self.client.get_experiment_by_name(experiment)
                exp_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
                tags = {"mlflow.source.git.commit": commit, "densedet.version": __version__,
                        "densedet.work_dir": str(work_dir.resolve()), "densedet.config": cfg.source or cfg.name}
                run = self.client.create_run(exp_id, run_name=work_dir.name, tags=tags)
                params = [Param(k, v) for k, v in _flatten(cfg.to_dict()).items()
                          if k.split(".")[0] in ("model", "data", "optimizer", "schedule", "runtime", "swa", "name")]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                    self.client.log_batch(run.info.run_id, params=params[i:i + 100])
                self.client.log_batch(run.info.run_id, tags=[RunTag("densedet.git_commit", commit)])
                logger.info("mlflow: run %s (experiment %r) in %s", run.info.run_id, experiment, self.uri)
            self.run_id = run.info.run_id
            if config_file.is_file():  # the merged config as the trainer wrote it (again on resume: it may differ)
                name = "config.yaml" if start_iter == 0 else f"config_resume_iter_{start_iter}.yaml"
                self.client.log_text(self.run_id, config_file.read_text(), name)
        except MlflowException as e:
            raise ConfigError(f"runtime.mlflow_tracking_uri: cannot open an MLflow run in {self.uri}: "
                              f"{str(e).splitlines()[0]}", "runtime.mlflow_tracking_uri") from e

    def scalars(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._Metric(_safe_mlflow_key(k), v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def images(self, images: list[tuple[str, Image.Image]], step: int) -> None:
        for name, img in images:
            self.client.log_image(self.run_id, img, artifact_file=f"val_images/iter_{step:07d}/{name}.png")

    def state(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id, "mlflow_tracking_uri": self.uri}

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


# ------------------------------------------------------------------------------------------------------------ set
class Trackers:
    """The trackers of one run (possibly none: every method is then a no-op and the object is falsy).

    Args:
        backends: opened trackers (see :func:`open_trackers`).
        val_images: validation images to draw per validation (``runtime.log_val_images``).
    """

    def __init__(self, backends: list[Any] | None = None, val_images: int = 0) -> None:
        self.backends = list(backends or [])
        self.val_images = int(val_images)
        self.failures: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _each(self, what: str, fn: Any) -> None:
        for b in self.backends:
            try:
                fn(b)
            except Exception as e:  # tracking must not stop a training: log.jsonl keeps the record
                n = self.failures[b.name] = self.failures.get(b.name, 0) + 1
                if n == 1:
                    logger.warning("%s: could not log %s (%s: %s); training goes on, further failures are counted",
                                   b.name, what, type(e).__name__, e)

    def log_record(self, record: dict[str, Any]) -> None:
        """Log the numbers of one ``log.jsonl`` line (see :func:`scalar_tags`)."""
        if not self.backends:
            return
        tagged = scalar_tags(record)
        if tagged is not None and tagged[1]:
            step, values = tagged
            self._each(f"a {record.get('type', 'train')} line", lambda b: b.scalars(values, step))

    def log_evaluation(self, result: Any, dataset: Any, results_json: str | Path, step: int) -> None:
        """Per-class AP of a validation and its first ``val_images`` images with their detections drawn."""
        if not self.backends:
            return
        per_class = _per_class_tags(result)
        if per_class:
            self._each("per-class AP", lambda b: b.scalars(per_class, step))
        try:
            images = draw_validation_images(dataset, results_json, self.val_images)
        except Exception as e:  # a drawing problem must not stop training
            logger.warning("could not draw validation images for the trackers: %s: %s", type(e).__name__, e)
            images = []
        if images:
            self._each("validation images", lambda b: b.images(images, step))

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs (the MLflow run id), for the checkpoint's ``meta["trackers"]``."""
        out: dict[str, Any] = {}
        for b in self.backends:
            out.update(b.state())
        return out

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close (``status``: MLflow's ``FINISHED`` / ``FAILED`` / ``KILLED``); logging again later reopens
        the TensorBoard writer and logs into the same MLflow run."""
        self._each("the end of the run", lambda b: b.close(status))
        for name, n in self.failures.items():
            logger.warning("%s: %d logging call(s) failed during this run", name, n)


def open_trackers(cfg: Config, work_dir: str | Path, *, start_iter: int = 0, state: dict[str, Any] | None = None,
                  enabled: bool = True, jsonl: Any | None = None) -> Trackers:
    """Open the trackers ``cfg.runtime.loggers`` names (on every rank the packages are checked; only where
    ``enabled`` (rank 0) anything is opened or written).

    Args:
        work_dir: the run's work dir (``tensorboard/``, default ``mlruns/``, ``config.yaml``).
        start_iter: iterations already done (a resume: TensorBoard's purge step).
        state: the checkpoint's ``meta["trackers"]`` when resuming (the MLflow run id to continue).
        jsonl: a :class:`~densedet.engine.logging.JsonlLogger` whose lines the trackers follow.
    """
    names = cfg.runtime.loggers
    require_tracker_packages(names)
    if not names or not enabled:
        return Trackers()
    work_dir = Path(work_dir)
    config_file = work_dir / "config.yaml"
    config_text = config_file.read_text() if config_file.is_file() else ""
    commit = git_commit()
    backends: list[Any] = []
    for name in names:
        if name == "tensorboard":
            backends.append(_TensorBoard(work_dir, start_iter, config_text, commit))
        else:
            backends.append(_MLflow(cfg, work_dir, (state or {}).get("mlflow_run_id"), start_iter, config_file,
                                    commit))
    trackers = Trackers(backends, cfg.runtime.log_val_images)
    if jsonl is not None:
        jsonl.listeners.append(trackers.log_record)
    logger.info("experiment trackers: %s", ", ".join(
        f"tensorboard ({b.log_dir})" if b.name == "tensorboard" else f"mlflow (run {b.run_id})" for b in backends))
    return trackers
