"""The epoch-based training loop: data, model, optimisation, checkpoints, validation and logs in one place.

One :class:`Trainer` per run. Per iteration: set the lr for the global iteration, forward in ``loss`` mode, sum
the ``loss*`` entries, stop with a clear error on a non-finite loss, backward (AMP-aware), clip, step. Under AMP a
step whose gradients hold NaN/inf is skipped and counted, and ``runtime.max_consecutive_skips`` such steps in a row
stop the run (:class:`~densedet.errors.NonFiniteError`). Per epoch: checkpoint (never one holding NaN/inf),
validate, refresh the JSONL log and ``curves.png``. A start removes temp files of a save killed mid-write.

Reproducibility: at every epoch start the Python / numpy / torch RNGs (and the loader's generator) are reseeded
from ``(seed, epoch, rank)`` and the sampler gets ``set_epoch(epoch)``; the data pipeline seeds each sample's
augmentation from ``(seed, epoch, index)``. The stream of an epoch is therefore a function of the seed and the
epoch only, and resuming from a checkpoint reproduces the losses of an uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from densedet.config.schema import Config
from densedet.data import CocoDataset, build_dataloader
from densedet.data.synth import check_auto_create, make_synthetic_coco
from densedet.dist import (
    all_gather_object,
    all_reduce_dict,
    barrier,
    init_distributed,
)
from densedet.engine.checkpoint import (
    CheckpointError,
    collect_rng_state,
    grads_finite,
    latest_checkpoint,
    load_checkpoint,
    load_for_finetune,
    load_model_weights,
    mark_last_checkpoint,
    prune_checkpoints,
    remove_stale_temp_files,
    restore_rng,
    save_checkpoint,
    to_plain,
    unwrap_model,
)
from densedet.engine.evaluator import evaluate, to_device
from densedet.engine.logging import JsonlLogger, TrainProgress, format_seconds, setup_logger
from densedet.engine.lr_schedule import LrScheduler
from densedet.engine.optim import build_optimizer
from densedet.engine.swa import read_swa_resume, resolve_work_path, train_swa
from densedet.engine.trackers import Trackers, open_trackers, require_tracker_packages
from densedet.errors import ConfigError, DataError, NonFiniteError
from densedet.evaluation.coco_eval import format_metrics_table, format_per_class_table
from densedet.evaluation.plots import plot_training_curves
from densedet.models.build import build_detector
from densedet.models.precision import bf16_emulation_note

__all__ = ["Trainer", "choose_device", "epoch_seed", "parse_losses", "set_random_seed", "train"]

logger = logging.getLogger("densedet")

LOG_JSONL = "log.jsonl"
VAL_RESULTS = "val_results.bbox.json"


# ------------------------------------------------------------------------------------------------ free functions
def set_random_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch (all devices); ``deterministic`` also asks cuDNN/torch for determinism."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # warn_only: ops without a deterministic kernel warn instead of stopping training.
        torch.use_deterministic_algorithms(True, warn_only=True)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 32-bit seed that is a pure function of ``(seed, epoch, rank)`` (numpy SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def choose_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``; ``cuda`` / ``cuda:N`` / ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device: '{name}' requested but CUDA is not available", path="runtime.device")
        return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
    raise ConfigError(f"runtime.device must be auto, cpu or cuda, got '{name}'", path="runtime.device")


def parse_losses(outputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum the ``loss*`` entries of a detector's loss dict (MMDetection's ``_parse_losses``).

    A value may be a tensor (its mean is used) or a list of tensors (sum of means); other keys are statistics.

    Returns:
        ``(total_loss, parts)`` where ``parts`` maps every key to a detached scalar tensor.
    """
    if not isinstance(outputs, dict):
        raise TypeError(f"the detector's loss mode must return a dict, got {type(outputs).__name__}")
    total: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = {}
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor):
            value = value.float().mean()
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            value = sum(v.float().mean() for v in value)
        elif isinstance(value, (int, float)):
            if key.startswith("loss"):
                raise TypeError(f"loss entry '{key}' is a Python number; losses must be tensors with gradients")
            value = torch.tensor(float(value))
        else:
            raise TypeError(f"entry '{key}' of the loss dict is a {type(value).__name__}; expected a tensor, a list "
                            f"of tensors or a number")
        if key.startswith("loss"):
            total = value if total is None else total + value
        parts[key] = value.detach()
    if total is None:
        raise ValueError(f"the detector's loss dict has no 'loss*' entry (keys: {sorted(outputs)})")
    return total, parts


def _resolve(root: str, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or not root else Path(root) / p


def _load_fixes(dataset: Any) -> str:
    """`` (at load: 3 clipped, 1 mask: bad polygon)``: what the dataset's loader skipped or fixed, for the log."""
    counts = {k: v for k, v in (getattr(dataset, "skipped_counts", None) or {}).items()
              if v and k != "unselected_category"}
    return f" (at load: {', '.join(f'{v} {k}' for k, v in counts.items())})" if counts else ""


# --------------------------------------------------------------------------------------------------------- Trainer
class Trainer:
    """Runs training for one config.

    Args:
        cfg: validated config.
        work_dir: where checkpoints (``epoch_N.pth``, ``last_checkpoint``), ``train.log``, ``log.jsonl``,
            ``curves.png``, ``config.yaml`` and validation results go.
        model: a detector to train instead of ``build_detector(cfg.model)``.
        resume: ``True`` resumes from the latest checkpoint in ``work_dir`` (a new run when there is none); a
            path resumes from that file; ``None``/``False`` starts a new run. A new run starts from
            ``runtime.load_from`` weights when set (non-strict: e.g. another number of classes).
        train_dataset, val_dataset: datasets to use instead of the ones ``cfg.data`` describes (they need what
            ``build_dataloader`` and :func:`densedet.engine.evaluator.evaluate` need).
    """

    def __init__(self, cfg: Config, work_dir: str | Path, model: nn.Module | None = None,
                 resume: str | Path | bool | None = None, *, train_dataset: Any | None = None,
                 val_dataset: Any | None = None) -> None:
        self.cfg = cfg
        self.work_dir = Path(work_dir)
        rt = cfg.runtime
        backend = "gloo" if rt.device == "cpu" or not torch.cuda.is_available() else "nccl"
        self.rank, self.world_size, self.local_rank = init_distributed(backend)
        self.distributed = self.world_size > 1
        self.is_main = self.rank == 0
        if self.is_main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        setup_logger(self.work_dir, self.rank)
        if self.is_main:  # temp files of an atomic save interrupted by a kill (their writer is gone)
            for tmp in remove_stale_temp_files(self.work_dir):
                logger.info("removed %s, left by an interrupted checkpoint write", tmp.name)
        self.device = choose_device(rt.device, self.local_rank)
        set_random_seed(rt.seed, rt.deterministic)
        if self.is_main:
            self._dump_config()
        require_tracker_packages(rt.loggers)  # experiment trackers: a missing package fails before any work
        logger.info("DenseDet training %s: device %s, %d process(es), work_dir %s", cfg.name or cfg.source or "",
                    self.device, self.world_size, self.work_dir)

        self.train_dataset, self.val_dataset = self._build_datasets(train_dataset, val_dataset)
        self.train_loader, self.val_loader = self._build_loaders()
        self.iters_per_epoch = len(self.train_loader)
        if self.iters_per_epoch == 0:
            raise DataError(f"the training loader is empty: {len(self.train_dataset)} training images for "
                            f"data.samples_per_gpu={cfg.data.samples_per_gpu} per process")

        net = model if model is not None else self._build_model()
        self._check_classes(net)
        net.to(self.device)
        if cfg.runtime.channels_last and hasattr(net, "use_channels_last"):
            net.use_channels_last(True)
        if rt.sync_bn and self.distributed:
            if self.device.type == "cuda":
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            else:
                logger.warning("runtime.sync_bn ignored: SyncBatchNorm needs CUDA")
        self.model: nn.Module = net
        if self.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # as MMDetection: every rank keeps its own buffers (BN statistics, GHM bin densities)
                broadcast_buffers=False, find_unused_parameters=rt.find_unused_parameters)

        total_batch = cfg.data.samples_per_gpu * self.world_size
        self.optimizer = build_optimizer(net, cfg.optimizer, total_batch)
        self.scheduler = LrScheduler(self.optimizer, cfg.schedule, self.iters_per_epoch)
        self.grad_clip = self._check_grad_clip(cfg.optimizer.grad_clip)
        self.use_amp = bool(rt.amp)
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and self.device.type == "cuda" else None
        if self.use_amp and self.device.type == "cpu" and (note := bf16_emulation_note(self.device)):
            logger.warning("runtime.amp trains under bf16 autocast on CPU: %s", note)
        self.skipped_steps = 0  # AMP: optimizer steps skipped for non-finite gradients (this run)
        self.consecutive_skips = 0

        self.iter = 0  # completed iterations
        self.jsonl = JsonlLogger(self.work_dir / LOG_JSONL) if self.is_main else None
        self.last_metrics: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self._resume_rng: Any = None
        self._tracker_state: dict[str, Any] | None = None  # the checkpoint's meta["trackers"] when resuming
        self.swa: Any = None  # the running densedet.engine.swa.SWARunner during the SWA phase
        self._swa_resume: dict[str, Any] | None = None  # a SWA-phase checkpoint to continue from
        from_swa_key = bool(not resume and cfg.swa.swa_training and cfg.swa.swa_resume_from)
        if from_swa_key:
            resume = resolve_work_path(cfg.swa.swa_resume_from, self.work_dir)
        resumed = self.resume(resume) if resume else False
        if from_swa_key and self._swa_resume is None:
            raise CheckpointError(f"swa.swa_resume_from: {resume} is not a checkpoint of the SWA phase")
        if rt.load_from and not resumed:  # as mmdet: resume wins; load_from only initialises the weights
            load_for_finetune(self.model, rt.load_from, cfg.name)  # zoo names; new classes: classifier re-init
            logger.info("loaded initial weights from %s", rt.load_from)
        # TensorBoard / MLflow (runtime.loggers): rank 0 follows log.jsonl; a resume continues the same run
        self.trackers: Trackers = open_trackers(cfg, self.work_dir, start_iter=self.iter, state=self._tracker_state,
                                                enabled=self.is_main, jsonl=self.jsonl)

    # ------------------------------------------------------------------------------------------------ building
    def _dump_config(self) -> None:
        data = to_plain(self.cfg.to_dict())
        header = f"# DenseDet config {self.cfg.name} (from {self.cfg.source or 'an in-memory config'})\n"
        body = {k: data[k] for k in ("model", "data", "optimizer", "schedule", "runtime")}
        if self.cfg.swa.swa_training:
            body["swa"] = data["swa"]
        (self.work_dir / "config.yaml").write_text(header + yaml.safe_dump(body, sort_keys=False))

    def _build_model(self) -> nn.Module:
        model_cfg = self.cfg.model
        if self.cfg.runtime.load_from:  # the load_from weights replace the backbone's ImageNet ones anyway
            backbone = dict(model_cfg["backbone"])
            if backbone.get("pretrained") or backbone.get("init_cfg"):
                logger.info("runtime.load_from is set: not fetching the backbone's pretrained weights (%s)",
                            backbone.get("pretrained") or backbone.get("init_cfg"))
                backbone["pretrained"] = None
                if "init_cfg" in backbone:
                    backbone["init_cfg"] = None
            model_cfg = {**model_cfg, "backbone": backbone}
        return build_detector(model_cfg)

    def _build_datasets(self, train_dataset: Any, val_dataset: Any) -> tuple[Any, Any]:
        data = self.cfg.data
        if train_dataset is None or (val_dataset is None and self.cfg.runtime.val_interval > 0 and data.val.ann_file):
            train_ann = _resolve(data.root, data.train.ann_file)
            if data.auto_create is not None:
                if data.auto_create != "synthetic":
                    raise ConfigError(f"data.auto_create must be 'synthetic' or null, got '{data.auto_create}'",
                                      path="data.auto_create")
                if not train_ann.is_file():
                    check_auto_create(data.root, train_ann)  # never into a user's data: raises naming the file
                    barrier()  # every process checked before one writes
                    if self.is_main:
                        logger.info("creating the synthetic dataset in %s", data.root)
                        make_synthetic_coco(data.root, **data.synth)
                    barrier()
            if train_dataset is None:
                if not data.train.ann_file:
                    raise ConfigError("data.train.ann_file is empty", path="data.train.ann_file")
                train_dataset = CocoDataset(train_ann, _resolve(data.root, data.train.img_dir), data.train.pipeline,
                                            filter_empty_gt=data.train.filter_empty_gt, test_mode=False,
                                            with_mask=data.train.with_mask, **data.train.mask_options(data.train))
            if val_dataset is None and self.cfg.runtime.val_interval > 0 and data.val.ann_file:
                # Built (and so validated: its counted warnings, its errors) before the first iteration, with the
                # masks a mask model is evaluated on: the evaluator scores against this dataset's checked store.
                val_dataset = CocoDataset(_resolve(data.root, data.val.ann_file),
                                          _resolve(data.root, data.val.img_dir), data.val.pipeline,
                                          filter_empty_gt=False, test_mode=True,
                                          with_mask=data.val.with_mask or data.train.with_mask,
                                          **data.val.mask_options(data.train))
        logger.info("train set: %d images%s; val set: %s", len(train_dataset), _load_fixes(train_dataset),
                    f"{len(val_dataset)} images{_load_fixes(val_dataset)}" if val_dataset is not None else "none")
        return train_dataset, val_dataset

    def _build_loaders(self) -> tuple[Any, Any]:
        data, seed = self.cfg.data, self.cfg.runtime.seed
        common = {"seed": seed, "distributed": self.distributed, "rank": self.rank, "world_size": self.world_size,
                  "size_divisor": data.size_divisor, "pin_memory": self.device.type == "cuda"}
        train_loader = build_dataloader(self.train_dataset, data.samples_per_gpu, data.workers_per_gpu, shuffle=True,
                                        group_by_aspect_ratio=data.group_by_aspect_ratio, **common)
        val_loader = None
        if self.val_dataset is not None:
            val_loader = build_dataloader(self.val_dataset, data.val_samples_per_gpu, data.workers_per_gpu,
                                          shuffle=False, **common)
        return train_loader, val_loader

    def _check_classes(self, net: nn.Module) -> None:
        classes = getattr(self.train_dataset, "classes", None)
        num_classes = getattr(net, "num_classes", None)
        if classes is not None and isinstance(num_classes, int) and len(classes) != num_classes:
            raise ConfigError(f"the model has {num_classes} classes but the training set has {len(classes)} classes "
                              f"{list(classes)[:10]} (set the heads' num_classes, or train with --data, which "
                              f"sizes them from the data)", path="model.num_classes")

    @staticmethod
    def _check_grad_clip(grad_clip: dict[str, float] | None) -> dict[str, float] | None:
        if not grad_clip:
            return None
        unknown = set(grad_clip) - {"max_norm", "norm_type"}
        if unknown or "max_norm" not in grad_clip:
            raise ConfigError(f"optimizer.grad_clip takes max_norm (required) and norm_type, got {dict(grad_clip)}",
                              path="optimizer.grad_clip")
        return {"max_norm": float(grad_clip["max_norm"]), "norm_type": float(grad_clip.get("norm_type", 2.0))}

    # ------------------------------------------------------------------------------------------------ resume
    def resume(self, resume: str | Path | bool) -> bool:
        """Restore model, optimizer, scheduler, scaler, iteration counter and RNG from a checkpoint.

        ``True``: the latest checkpoint of ``work_dir``; returns False (nothing restored) when there is none.
        """
        if resume is True:
            path = latest_checkpoint(self.work_dir)
            if path is None:
                logger.info("resume: no checkpoint in %s, starting a new run", self.work_dir)
                return False
        else:
            path = Path(resume)
        ckpt = load_checkpoint(path, map_location="cpu")
        load_model_weights(self.model, ckpt, strict=True, source=str(path))
        if (ckpt.get("meta") or {}).get("swa") is not None:  # SWA phase: its optimizer/lr state is the SWA one
            return self._resume_swa(ckpt, path)
        try:
            if ckpt.get("optimizer") is not None:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scheduler") is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot restore the training state: {e}") from e
        meta = ckpt.get("meta") or {}
        self._tracker_state = meta.get("trackers")
        if "iter" not in meta:
            raise CheckpointError(f"{path}: no meta.iter in the checkpoint; it cannot be resumed (use load_from)")
        self.iter = int(meta["iter"])
        if meta.get("rng") is not None:
            restore_rng(meta, self.rank)
            self._resume_rng = meta["rng"]
        logger.info("resumed from %s at epoch %d, iteration %d", path, self.iter // self.iters_per_epoch,
                    self.iter)
        return True

    def _resume_swa(self, ckpt: dict[str, Any], path: Path) -> bool:
        """Resume inside the SWA phase: counters and RNG now, optimizer / lr / average when it starts."""
        if not self.cfg.swa.swa_training:
            raise ConfigError(f"{path} is a checkpoint of the SWA phase, but swa.swa_training is false",
                              path="swa.swa_training")
        self._swa_resume = read_swa_resume(ckpt, path)
        self._tracker_state = ckpt["meta"].get("trackers")
        self.iter = int(ckpt["meta"]["iter"])
        if ckpt["meta"].get("rng") is not None:
            restore_rng(ckpt["meta"], self.rank)
        logger.info("resumed the SWA phase from %s at SWA iteration %d", path, int(ckpt["meta"]["swa"]["iter"]))
        return True

    # ------------------------------------------------------------------------------------------------ training
    def _seed_epoch(self, epoch: int) -> None:
        s = epoch_seed(self.cfg.runtime.seed, epoch, self.rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        gen = getattr(self.train_loader, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(s)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batch_sampler = getattr(self.train_loader, "batch_sampler", None)
        if hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(epoch)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.use_amp:
            return contextlib.nullcontext()
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def train_step(self, batch: dict[str, Any], epoch: int) -> dict[str, float]:
        """One optimisation step on ``batch``; returns this iteration's floats (``loss``, ``loss_*``, stats)."""
        images = batch["images"].to(self.device, non_blocking=True)
        targets = to_device(batch["targets"], self.device)
        with self._autocast():
            outputs = self.model(images, targets, batch.get("metas"), mode="loss")
        total, parts = parse_losses(outputs)
        stats = {"loss": total.detach(), **parts}
        keys = list(stats)
        values = torch.stack([stats[k].to(self.device, torch.float32).reshape(()) for k in keys]).tolist()
        record = dict(zip(keys, values))
        self._check_finite(record, epoch)

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(total).backward()
        else:
            total.backward()
        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if self.scaler is not None:  # true gradients for the finiteness check and for clipping
            self.scaler.unscale_(self.optimizer)
        # Mixed precision: never step on NaN/inf gradients (GradScaler's rule, also for bf16 without a scaler);
        # DDP has already averaged the gradients, so every process takes the same decision.
        finite = grads_finite(params) if self.use_amp else True
        if finite and self.grad_clip is not None:
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, **self.grad_clip))
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skips the step itself when it found inf/NaN
            self.scaler.update()
            finite = finite and self.scaler.get_scale() >= scale
        elif finite:
            self.optimizer.step()
        if self.use_amp:
            self._count_skip(not finite, epoch)
        return record

    def _count_skip(self, skipped: bool, epoch: int) -> None:
        """Count a skipped step (warning each time); too many in a row is an error, not a silent stall."""
        if not skipped:
            self.consecutive_skips = 0
            return
        self.skipped_steps += 1
        self.consecutive_skips += 1
        limit = self.cfg.runtime.max_consecutive_skips
        where = (f"epoch {epoch + 1}, iteration {self.iter - epoch * self.iters_per_epoch + 1} "
                 f"(global iteration {self.iter + 1})")
        if self.consecutive_skips >= limit:
            raise NonFiniteError(f"non-finite gradients in {self.consecutive_skips} consecutive steps (the last at "
                                 f"{where}); stopping (runtime.max_consecutive_skips={limit}). Lower the lr, enable "
                                 f"optimizer.grad_clip or train without runtime.amp.")
        logger.warning("non-finite gradients at %s: optimizer step skipped (%d skipped in this run, %d in a row; "
                       "training stops at %d in a row)", where, self.skipped_steps, self.consecutive_skips, limit)

    def _check_finite(self, record: dict[str, float], epoch: int) -> None:
        ok = math.isfinite(record["loss"])
        if self.distributed:  # every rank stops together instead of hanging in the next collective
            flag = torch.tensor([1.0 if ok else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            any_bad = flag.item() < 1.0
        else:
            any_bad = not ok
        if any_bad:
            where = (f"epoch {epoch + 1}, iteration {self.iter - epoch * self.iters_per_epoch + 1} "
                     f"(global iteration {self.iter + 1})")
            if ok:
                raise NonFiniteError(f"non-finite loss on another process at {where}; stopping")
            comps = ", ".join(f"{k}={v:.6g}" for k, v in record.items())
            raise NonFiniteError(f"non-finite total loss at {where}: {comps}. Lower the lr, enable "
                                     f"optimizer.grad_clip or check the annotations of this batch.")

    def train(self) -> dict[str, float]:
        """Train to ``schedule.epochs`` (or ``schedule.max_iters``), then the SWA phase when ``swa.swa_training``
        (:mod:`densedet.engine.swa`); returns the final metrics. The experiment trackers are closed at the end
        (an MLflow run ends ``FINISHED``, ``FAILED`` on an error, ``KILLED`` on Ctrl-C)."""
        try:
            out = self._train_phases()
        except KeyboardInterrupt:
            self.trackers.close("KILLED")
            raise
        except BaseException:
            self.trackers.close("FAILED")
            raise
        self.trackers.close("FINISHED")
        return out

    def _train_phases(self) -> dict[str, float]:
        swa = self.cfg.swa
        out: dict[str, float] = {}
        if not (swa.swa_training and (swa.only_swa_training or self._swa_resume is not None)):
            out = self._train_regular()
            if swa.swa_training and self.iter < self.cfg.schedule.epochs * self.iters_per_epoch:
                logger.info("SWA not started: schedule.max_iters stopped regular training at iteration %d", self.iter)
                return out
        if swa.swa_training:
            out = train_swa(self)
            self._swa_resume = None
        return out

    def _train_regular(self) -> dict[str, float]:
        """The regular schedule: ``schedule.epochs`` (or ``schedule.max_iters``) with the main optimizer."""
        cfg, ipe = self.cfg, self.iters_per_epoch
        epochs, max_iters = cfg.schedule.epochs, cfg.schedule.max_iters
        total = epochs * ipe if max_iters is None else min(epochs * ipe, max_iters)
        if self.iter >= total:
            logger.info("nothing to train: %d iterations already done (of %d)", self.iter, total)
            return {**self.last_metrics, "epoch": self.iter / ipe, "iter": self.iter}
        logger.info("training %d epochs x %d iterations (%d images per step) from iteration %d", epochs, ipe,
                    cfg.data.samples_per_gpu * self.world_size, self.iter)
        progress = TrainProgress(total, ipe, epochs, start_iter=self.iter, log_interval=cfg.runtime.log_interval,
                                 jsonl=self.jsonl, enabled=self.is_main,
                                 extras=(lambda: {"skipped_steps": self.skipped_steps}) if self.use_amp else None)
        reduce = (lambda d: {k: float(v) for k, v in all_reduce_dict(d).items()}) if self.distributed else None
        t0 = time.perf_counter()
        start_epoch = self.iter // ipe
        try:
            for epoch in range(start_epoch, epochs):
                self._seed_epoch(epoch)
                self.model.train()
                batches = iter(self.train_loader)
                skip = self.iter - epoch * ipe
                if skip:  # mid-epoch resume: replay the epoch's data stream up to where the checkpoint was taken
                    logger.info("skipping %d batches of epoch %d already trained", skip, epoch + 1)
                    for _ in range(skip):
                        next(batches)
                    if self._resume_rng is not None:
                        restore_rng({"rng": self._resume_rng}, self.rank)
                self._resume_rng = None
                for batch in batches:
                    self.scheduler.step(self.iter)
                    self._collect_level_stats(self._logs_at(epoch, self.iter, total))
                    record = self.train_step(batch, epoch)
                    logged = progress.update(epoch, self.iter, self.scheduler.current_lr(), record, reduce)
                    self.iter += 1
                    if logged is not None:
                        self.last_train = logged
                    if self.iter >= total:
                        break
                finished = self.iter >= total
                if self.iter % ipe == 0:
                    self._after_epoch(self.iter // ipe, final=finished)
                elif finished:  # max_iters stopped mid-epoch
                    self._after_epoch(None, final=True)
                if finished:
                    break
        finally:
            progress.close()
            self._collect_level_stats(False)
        logger.info("training done: %d iterations in %s%s", self.iter, format_seconds(time.perf_counter() - t0),
                    f" ({self.skipped_steps} optimizer steps skipped for non-finite gradients)"
                    if self.skipped_steps else "")
        out = {**self.last_metrics, "epoch": self.iter / ipe, "iter": self.iter}
        if self.use_amp:
            out["skipped_steps"] = self.skipped_steps
        if "loss" in self.last_train:
            out["train_loss"] = self.last_train["loss"]
        return out

    def _logs_at(self, epoch: int, global_iter: int, total: int) -> bool:
        """Whether iteration ``global_iter`` (0-based) writes a log line: TrainProgress.update's rule."""
        interval = max(1, int(self.cfg.runtime.log_interval))
        return ((global_iter + 1) % interval == 0 or global_iter + 1 == total
                or global_iter + 1 - epoch * self.iters_per_epoch == self.iters_per_epoch)

    def _collect_level_stats(self, on: bool) -> None:
        """Ask the dense head for per-level statistics on logged iterations only (they cost a second, no-grad
        classification loss). A model that is not a :class:`~densedet.models.detector.Detector` (no ``dense_head``)
        is left alone."""
        head = getattr(unwrap_model(self.model), "dense_head", None)
        if head is not None and hasattr(head, "collect_level_stats"):
            head.collect_level_stats = on

    # ------------------------------------------------------------------------------------------------ per epoch
    def _after_epoch(self, epochs_done: int | None, final: bool) -> None:
        """Checkpoint / validate / plot after a completed epoch (``epochs_done``) or a mid-epoch stop (None)."""
        rt = self.cfg.runtime
        if epochs_done is None:
            self.save(self.work_dir / f"iter_{self.iter}.pth")
        elif final or (rt.checkpoint_interval > 0 and epochs_done % rt.checkpoint_interval == 0):
            self.save(self.work_dir / f"epoch_{epochs_done}.pth")
        if self.val_loader is not None and rt.val_interval > 0 and (
                final or (epochs_done is not None and epochs_done % rt.val_interval == 0)):
            self.validate()
        if self.is_main and self.jsonl is not None:
            try:
                plot_training_curves(self.jsonl.path, self.work_dir / "curves.png")
            except Exception as e:  # a plotting problem must not stop training
                logger.warning("could not plot training curves: %s: %s", type(e).__name__, e)

    def save(self, path: str | Path) -> Path:
        """Checkpoint the current state (collective: call on every rank; rank 0 writes)."""
        path = Path(path)
        rng = all_gather_object(collect_rng_state())  # one state per rank
        if self.is_main:
            meta = {"epoch": self.iter // self.iters_per_epoch, "iter": self.iter, "config": self.cfg.to_dict(),
                    "rng": rng, "classes": list(getattr(self.train_dataset, "classes", []) or []),
                    "iters_per_epoch": self.iters_per_epoch, "world_size": self.world_size}
            if self.swa is not None:  # SWA phase: averaged weights + count, so a resume continues the average
                meta["swa"] = self.swa.state_dict()
            if self.trackers:  # the MLflow run id: a resume logs into the same run
                meta["trackers"] = self.trackers.state_dict()
            save_checkpoint(path, self.model, self.optimizer, self.scheduler, self.scaler, meta=meta)
            mark_last_checkpoint(self.work_dir, path)
            removed = prune_checkpoints(self.work_dir, self.cfg.runtime.max_keep_ckpts, keep=path)
            logger.info("saved checkpoint %s%s", path,
                        f" (removed {', '.join(p.name for p in removed)})" if removed else "")
        barrier()
        return path

    def validate(self) -> dict[str, float]:
        """COCO-evaluate on the validation set; logs tables and a JSONL ``val`` line; returns the metrics."""
        if self.val_loader is None:
            raise RuntimeError("validate: this trainer has no validation set (data.val.ann_file is empty or "
                               "runtime.val_interval is 0)")
        t0 = time.perf_counter()
        result = evaluate(self.model, self.val_loader, self.val_dataset, self.device,
                          out_json=self.work_dir / VAL_RESULTS)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        epoch = self.iter / self.iters_per_epoch
        if self.is_main:
            logger.info("validation after %s epochs (%s):\n%s", f"{epoch:g}", format_seconds(time.perf_counter() - t0),
                        format_metrics_table(result))
            if result.per_class:
                logger.info("per-class AP:\n%s", format_per_class_table(result))
            if result.segm is not None:
                logger.info("mask (segm) evaluation:\n%s", format_metrics_table(result.segm))
            if self.jsonl is not None:
                ep = int(epoch) if epoch == int(epoch) else epoch
                self.jsonl.log({"type": "val", "epoch": ep, "iter": self.iter, **metrics})
            self.trackers.log_evaluation(result, self.val_dataset, self.work_dir / VAL_RESULTS, self.iter)
        self.last_metrics = metrics
        return metrics


def train(cfg: Config, work_dir: str | Path, resume: str | Path | bool | None = None) -> dict[str, float]:
    """Build a :class:`Trainer` for ``cfg`` and train; returns the final metrics (last validation + counters)."""
    return Trainer(cfg, work_dir, resume=resume).train()
