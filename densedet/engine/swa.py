"""Stochastic Weights Averaging for detectors, run after the regular schedule.

Reference: Zhang et al., "SWA Object Detection" (arXiv:2012.12645), code hyz-xmaster/swa_object_detection and its
copy in hyz-xmaster/VarifocalNet (``configs/_base_/swa.py``, ``mmdet/core/utils/swa_hook.py``,
``mmdet/apis/train.py``). After the regular epochs, training goes on for ``swa_total_epochs`` more epochs with a
fresh ``swa_optimizer`` and the cyclic lr of ``swa_lr_config``; after every ``swa_interval``-th of those epochs the
weights enter an equal-weight running average, which is saved as ``swa_model_{epoch}.pth`` (and evaluated when
validation is configured). The last average is also saved as ``swa_final.pth``.

Semantics kept from the reference:

- the average is over parameters only: ``avg <- avg + (p - avg) / (n + 1)`` (SWAHook's ``AveragedModel``); buffers
  (BN running statistics) are those of the model when SWA starts. The reference does not recompute BN statistics
  because its backbones freeze BN (``norm_eval``); the heads and necks use GN, which has no buffers.
- SWA epochs are numbered from 1 in file names; the lr schedule counts SWA iterations from 0.

Differences (deliberate):

- the SWA state (averaged weights and their count) is stored in the SWA-phase training checkpoints
  (``swa_epoch_{N}.pth``), so resuming continues the average exactly; the reference restarts it from zero.
- ``swa_load_from: null`` starts SWA from the weights at the end of regular training. The reference's default,
  ``best_bbox_mAP.pth`` (the best epoch by validation mAP), works here only as a path to an existing file:
  DenseDet does not write best-epoch checkpoints.
- only the averaged model is evaluated during SWA (the reference also evaluates the live model every epoch).
- the data stream of SWA epoch ``e`` is seeded as global epoch ``schedule.epochs + e`` (the reference's new runner
  reuses epoch numbers from 0), and the global iteration counter continues from ``schedule.epochs *
  iters_per_epoch``, so logs and plots run on.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from densedet.config.schema import SWAConfig, SWALrConfig
from densedet.dist import all_reduce_dict, barrier
from densedet.engine.checkpoint import CheckpointError, load_model_weights, save_checkpoint, unwrap_model
from densedet.engine.evaluator import evaluate
from densedet.engine.logging import TrainProgress, format_seconds
from densedet.engine.lr_schedule import FactorLrScheduler
from densedet.engine.optim import build_optimizer
from densedet.evaluation.coco_eval import format_metrics_table
from densedet.registry import ConfigError
from densedet.weights.workdir import SWA_FINAL

if TYPE_CHECKING:
    from densedet.engine.trainer import Trainer

__all__ = [
    "CyclicLrScheduler",
    "SWAAverager",
    "SWARunner",
    "cyclic_lr_factor",
    "read_swa_resume",
    "resolve_work_path",
    "train_swa",
]

logger = logging.getLogger("densedet")

SWA_MODEL_TMPL = "swa_model_{}.pth"
SWA_VAL_RESULTS = "swa_val_results.bbox.json"


# ---------------------------------------------------------------------------------------------------- lr schedule
def cyclic_lr_factor(it: int, total_iters: int, cfg: SWALrConfig) -> float:
    """Multiplier of the initial lr at SWA iteration ``it`` (0-based): mmcv 1.x ``CyclicLrUpdaterHook``.

    A cycle lasts ``P = total_iters // cyclic_times`` iterations; with ``c = it % P`` and ``U = int(step_ratio_up
    * P)``, the factor anneals by cosine from 1 to ``target_ratio[0]`` over ``c < U``, then from
    ``target_ratio[0]`` to ``target_ratio[1]`` over ``U <= c < P``: ``end + (start - end) * (1 + cos(pi * t)) / 2``
    with ``t`` the fraction of the phase done. VarifocalNet's ``(1, 0.01)`` with ``step_ratio_up=0`` and one cycle
    per epoch restarts every epoch at the base lr and anneals to 1% of it.
    """
    period = total_iters // cfg.cyclic_times
    if period < 1:
        raise ConfigError(f"swa.swa_lr_config.cyclic_times ({cfg.cyclic_times}) exceeds the {total_iters} SWA "
                          f"iterations", "swa.swa_lr_config.cyclic_times")
    up = int(cfg.step_ratio_up * period)
    c = int(it) % period
    if c < up:
        start, end, progress = 1.0, cfg.target_ratio[0], c / up
    else:
        start, end, progress = cfg.target_ratio[0], cfg.target_ratio[1], (c - up) / (period - up)
    return end + 0.5 * (start - end) * (math.cos(math.pi * progress) + 1.0)


class CyclicLrScheduler(FactorLrScheduler):
    """``group["lr"] = group["initial_lr"] * cyclic_lr_factor(it)``, ``it`` counted from the first SWA iteration;
    ``step(it)`` before each optimizer step, as :class:`densedet.engine.lr_schedule.LrScheduler`."""

    period_key = "total_iters"
    period_help = "SWA iterations (swa_total_epochs x iterations per epoch)"

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SWALrConfig, total_iters: int) -> None:
        self.cfg = cfg
        self.total_iters = int(total_iters)
        cyclic_lr_factor(0, self.total_iters, cfg)  # validates the period
        super().__init__(optimizer)

    def lr_factor(self, it: int) -> float:
        return cyclic_lr_factor(it, self.total_iters, self.cfg)


# -------------------------------------------------------------------------------------------------------- averager
class SWAAverager:
    """Equal-weight running average of a model's parameters, kept in a frozen copy of the model.

    ``module`` is a deep copy of ``model`` (DDP unwrapped) taken at construction; :meth:`update` folds the current
    parameters of ``model`` in, ``avg <- avg + (p - avg) / (n + 1)`` (the first update copies), so after ``n``
    updates every parameter is the mean of the ``n`` snapshots. Buffers keep the values of the copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.module = copy.deepcopy(unwrap_model(model))
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.n_averaged = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = dict(unwrap_model(model).named_parameters())
        for name, avg in self.module.named_parameters():
            p = src[name].detach().to(avg.device, avg.dtype)
            if self.n_averaged == 0:
                avg.copy_(p)
            else:
                avg.add_((p - avg) / (self.n_averaged + 1))
        self.n_averaged += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"n_averaged": int, "state_dict": averaged model state}`` (checkpoint form)."""
        return {"n_averaged": self.n_averaged, "state_dict": self.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "checkpoint") -> None:
        load_model_weights(self.module, {"state_dict": state["state_dict"]}, strict=True,
                           source=f"{source} (SWA averaged weights)")
        self.n_averaged = int(state["n_averaged"])


# ---------------------------------------------------------------------------------------------------------- runner
def resolve_work_path(path: str, work_dir: Path) -> Path:
    """``path`` as given when absolute or an existing file, else relative to ``work_dir`` (where SWA files go)."""
    p = Path(path)
    if p.is_absolute() or p.is_file():
        return p
    return work_dir / p


class SWARunner:
    """The SWA phase of a :class:`~densedet.engine.trainer.Trainer`: optimizer, lr schedule, averager, counters.

    While it runs, the trainer's ``optimizer`` / ``scheduler`` / ``grad_clip`` are the SWA ones (so
    ``Trainer.train_step`` and ``Trainer.save`` work unchanged) and ``trainer.swa`` is this runner (``save`` adds
    :meth:`state_dict` to the checkpoint's ``meta["swa"]``).
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.cfg: SWAConfig = trainer.cfg.swa
        ipe = trainer.iters_per_epoch
        self.total_iters = self.cfg.swa_total_epochs * ipe
        self.base_iter = trainer.cfg.schedule.epochs * ipe  # global iteration of the first SWA iteration
        self.iter = 0  # SWA iterations done
        resume = trainer._swa_resume
        if resume is None:
            self._load_start_weights()
        net = unwrap_model(trainer.model)
        total_batch = trainer.cfg.data.samples_per_gpu * trainer.world_size
        self.optimizer = build_optimizer(net, self.cfg.swa_optimizer, total_batch)
        self.scheduler = CyclicLrScheduler(self.optimizer, self.cfg.swa_lr_config, self.total_iters)
        self.grad_clip = trainer._check_grad_clip(self.cfg.swa_optimizer.grad_clip)
        self.averager = SWAAverager(trainer.model)
        if resume is not None:
            self._restore(resume)

    def _load_start_weights(self) -> None:
        t = self.trainer
        if self.cfg.swa_load_from:
            path = resolve_work_path(self.cfg.swa_load_from, t.work_dir)
            if not path.is_file():
                raise ConfigError(f"swa.swa_load_from: {path} does not exist (DenseDet writes no best_bbox_mAP.pth; "
                                  f"name a checkpoint file, or null for the weights at the end of regular training)",
                                  "swa.swa_load_from")
            load_model_weights(t.model, path, strict=True)
            logger.info("SWA starts from the weights of %s", path)
        elif self.cfg.only_swa_training:
            raise ConfigError("swa.only_swa_training skips regular training, so it needs swa.swa_load_from or "
                              "swa.swa_resume_from (or a resume checkpoint of the SWA phase)",
                              "swa.only_swa_training")

    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        meta = ckpt["meta"]
        src = str(meta.get("_path", "checkpoint"))
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.trainer.scaler is not None and ckpt.get("scaler"):
                self.trainer.scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{src}: cannot restore the SWA training state: {e}") from e
        self.averager.load_state_dict(meta["swa"], source=src)
        self.iter = int(meta["swa"]["iter"])
        if self.trainer.iter != self.base_iter + self.iter:
            raise CheckpointError(f"{src}: SWA iteration {self.iter} does not match global iteration "
                                  f"{self.trainer.iter} (schedule.epochs or the data changed since it was written?)")

    def state_dict(self) -> dict[str, Any]:
        return {"iter": self.iter, "total_iters": self.total_iters, **self.averager.state_dict()}

    # -------------------------------------------------------------------------------------------------- running
    def run(self) -> dict[str, float]:
        t = self.trainer
        ipe, cfg = t.iters_per_epoch, self.cfg
        if self.iter >= self.total_iters:
            logger.info("SWA: nothing to train: %d SWA iterations already done", self.iter)
            return {**t.last_metrics, "epoch": t.iter / ipe, "iter": t.iter, "swa_epoch": self.iter / ipe}
        saved = (t.optimizer, t.scheduler, t.grad_clip)
        t.optimizer, t.scheduler, t.grad_clip, t.swa = self.optimizer, self.scheduler, self.grad_clip, self
        t.iter = self.base_iter + self.iter
        epochs = t.cfg.schedule.epochs + cfg.swa_total_epochs
        logger.info("SWA training: %d epochs x %d iterations from SWA iteration %d (averaging every %d epoch(s))",
                    cfg.swa_total_epochs, ipe, self.iter, cfg.swa_interval)
        progress = TrainProgress(self.base_iter + self.total_iters, ipe, epochs, start_iter=t.iter,
                                 log_interval=t.cfg.runtime.log_interval, jsonl=t.jsonl, enabled=t.is_main)
        reduce = (lambda d: {k: float(v) for k, v in all_reduce_dict(d).items()}) if t.distributed else None
        t0 = time.perf_counter()
        try:
            for swa_epoch in range(self.iter // ipe, cfg.swa_total_epochs):
                epoch = t.cfg.schedule.epochs + swa_epoch  # global epoch: seeds the data stream
                t._seed_epoch(epoch)
                t.model.train()
                for batch in t.train_loader:
                    self.scheduler.step(self.iter)
                    record = t.train_step(batch, epoch)
                    logged = progress.update(epoch, t.iter, self.scheduler.current_lr(), record, reduce)
                    t.iter += 1
                    self.iter += 1
                    if logged is not None:
                        t.last_train = logged
                self._after_swa_epoch(swa_epoch + 1)
        finally:
            progress.close()
            t.optimizer, t.scheduler, t.grad_clip = saved
            t.swa = None
        logger.info("SWA done: %d iterations in %s", self.iter, format_seconds(time.perf_counter() - t0))
        out = {**t.last_metrics, "epoch": t.iter / ipe, "iter": t.iter, "swa_epoch": self.iter / ipe}
        if "loss" in t.last_train:
            out["train_loss"] = t.last_train["loss"]
        return out

    def _after_swa_epoch(self, swa_epochs_done: int) -> None:
        t, cfg = self.trainer, self.cfg
        final = swa_epochs_done == cfg.swa_total_epochs
        averaged = swa_epochs_done % cfg.swa_interval == 0
        if averaged:
            self.averager.update(t.model)
            self.save_model(t.work_dir / SWA_MODEL_TMPL.format(swa_epochs_done))
        if final or swa_epochs_done % cfg.swa_checkpoint_config.interval == 0:
            t.save(t.work_dir / cfg.swa_checkpoint_config.filename_tmpl.format(swa_epochs_done))
        if final:
            if self.averager.n_averaged == 0:
                logger.warning("SWA: no epoch was averaged (swa_interval %d > swa_total_epochs %d); no %s",
                               cfg.swa_interval, cfg.swa_total_epochs, SWA_FINAL)
            else:
                self.save_model(t.work_dir / SWA_FINAL)
        if averaged and t.val_loader is not None and t.cfg.runtime.val_interval > 0:
            self.validate(swa_epochs_done)

    def save_model(self, path: Path) -> None:
        """Write the averaged model as a weights checkpoint (``densedet test`` / ``predict`` load it); rank 0."""
        t = self.trainer
        if t.is_main:
            meta = {"epoch": t.iter // t.iters_per_epoch, "iter": t.iter, "config": t.cfg.to_dict(),
                    "classes": list(getattr(t.train_dataset, "classes", []) or []),
                    "swa_n_averaged": self.averager.n_averaged, "swa_epoch": self.iter // t.iters_per_epoch}
            save_checkpoint(path, self.averager.module, meta=meta)
            logger.info("saved the SWA model (%d averaged epochs) to %s", self.averager.n_averaged, path)
        barrier()

    def validate(self, swa_epochs_done: int) -> dict[str, float]:
        """COCO-evaluate the averaged model; JSONL line ``{"type": "swa_val", ...}``."""
        t = self.trainer
        result = evaluate(self.averager.module, t.val_loader, t.val_dataset, t.device,
                          out_json=t.work_dir / SWA_VAL_RESULTS)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        if t.is_main:
            logger.info("validation of the SWA model after %d SWA epochs:\n%s", swa_epochs_done,
                        format_metrics_table(result))
            if t.jsonl is not None:
                t.jsonl.log({"type": "swa_val", "epoch": t.iter // t.iters_per_epoch, "swa_epoch": swa_epochs_done,
                             "iter": t.iter, **metrics})
        t.last_metrics = {f"swa_{k}": v for k, v in metrics.items()}
        return metrics


def train_swa(trainer: Trainer) -> dict[str, float]:
    """Run the SWA phase for ``trainer`` (after its regular training); returns the final metrics."""
    return SWARunner(trainer).run()


def read_swa_resume(ckpt: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Check that ``ckpt`` is a SWA-phase checkpoint and remember its path for messages."""
    meta = ckpt.get("meta") or {}
    swa = meta.get("swa")
    if not isinstance(swa, Mapping) or not {"iter", "n_averaged", "state_dict"} <= set(swa):
        raise CheckpointError(f"{path}: not a checkpoint of the SWA phase (no meta.swa with iter, n_averaged and "
                              f"state_dict)")
    meta["_path"] = str(path)
    return ckpt
