"""Learning-rate schedule as a pure function of the global iteration.

Semantics of mmcv's ``LrUpdaterHook`` family (mmcv/runner/hooks/lr_updater.py, MMDetection 2.x):

* ``step``: by epoch, ``factor = gamma ** #{s in steps : s <= epoch}`` with the 0-based epoch
  ``iter // iters_per_epoch`` (so ``steps=[8, 11]`` lowers the lr at the start of the 9th and 12th epochs).
* ``cosine``: by iteration, from 1 to ``min_lr_ratio`` over ``epochs * iters_per_epoch`` iterations (mmcv's
  ``CosineAnnealingLrUpdaterHook`` defaults to ``by_epoch=True``, a staircase; we anneal smoothly per iteration).
* ``constant``: 1.
* warm-up by iteration for ``it < warmup_iters``: linear ``k = (1 - it / warmup_iters) * (1 - warmup_ratio)``,
  ``lr = regular * (1 - k)``; constant ``lr = regular * warmup_ratio``.

Because the lr is a function of the iteration only, resuming needs just the iteration counter.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from densedet.config.schema import ScheduleConfig
from densedet.registry import ConfigError

__all__ = ["LrScheduler", "lr_factor"]


def lr_factor(it: int, cfg: ScheduleConfig, iters_per_epoch: int) -> float:
    """Multiplier of the initial lr at global iteration ``it`` (0-based, the iteration about to run)."""
    if iters_per_epoch < 1:
        raise ValueError(f"lr_factor: iters_per_epoch must be >= 1, got {iters_per_epoch}")
    if it < 0:
        raise ValueError(f"lr_factor: iteration must be >= 0, got {it}")
    if cfg.policy == "step":
        epoch = it // iters_per_epoch
        regular = cfg.gamma ** sum(1 for s in cfg.steps if s <= epoch)
    elif cfg.policy == "cosine":
        total = max(1, cfg.epochs * iters_per_epoch)
        progress = min(it, total) / total
        # mmcv annealing_cos(start=1, end=min_lr_ratio, progress).
        regular = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.policy == "constant":
        regular = 1.0
    else:
        raise ConfigError(f"schedule.policy must be step, cosine or constant, got '{cfg.policy}'",
                          path="schedule.policy")

    if cfg.warmup is None or it >= cfg.warmup_iters:
        return float(regular)
    if cfg.warmup == "linear":
        k = (1.0 - it / cfg.warmup_iters) * (1.0 - cfg.warmup_ratio)
        return float(regular * (1.0 - k))
    if cfg.warmup == "constant":
        return float(regular * cfg.warmup_ratio)
    raise ConfigError(f"schedule.warmup must be linear, constant or null, got '{cfg.warmup}'", path="schedule.warmup")


class FactorLrScheduler:
    """Sets ``group["lr"] = group["initial_lr"] * self.lr_factor(it)`` for every param group of ``optimizer``.

    Call :meth:`step` with the iteration *before* each optimizer step (mmcv's ``before_train_iter``). Groups
    without ``initial_lr`` get their current lr as initial lr. Subclasses define :meth:`lr_factor` and name in
    ``period_key`` the attribute that must be unchanged when a run resumes (else the schedule would silently
    shift).
    """

    period_key = ""
    period_help = ""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.last_iter = -1
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lr = float(optimizer.defaults.get("lr", optimizer.param_groups[0]["initial_lr"]))

    def lr_factor(self, it: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define lr_factor()")

    def step(self, it: int) -> float:
        """Set the lrs for iteration ``it``; returns the factor."""
        factor = self.lr_factor(it)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.last_iter = int(it)
        return factor

    def current_lr(self) -> float:
        """The base lr (the lr of parameters without multipliers) at the last :meth:`step`."""
        return self.base_lr * self.lr_factor(max(self.last_iter, 0))

    def state_dict(self) -> dict[str, Any]:
        return {"last_iter": self.last_iter, self.period_key: getattr(self, self.period_key),
                "base_lr": self.base_lr, "initial_lrs": [float(g["initial_lr"]) for g in self.optimizer.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the iteration counter and initial lrs; a changed ``period_key`` value is an error."""
        name = type(self).__name__
        ours = getattr(self, self.period_key)
        if int(state[self.period_key]) != ours:
            raise ValueError(f"{name}.load_state_dict: the checkpoint was trained with {state[self.period_key]} "
                             f"{self.period_help}, this run has {ours} (did the dataset, batch size or number of "
                             f"processes change?)")
        initial = state.get("initial_lrs")
        if initial is not None:
            if len(initial) != len(self.optimizer.param_groups):
                raise ValueError(f"{name}.load_state_dict: {len(initial)} param groups in the checkpoint, "
                                 f"{len(self.optimizer.param_groups)} in the optimizer")
            for group, lr in zip(self.optimizer.param_groups, initial):
                group["initial_lr"] = float(lr)
        self.base_lr = float(state.get("base_lr", self.base_lr))
        self.last_iter = int(state["last_iter"])
        if self.last_iter >= 0:
            self.step(self.last_iter)


class LrScheduler(FactorLrScheduler):
    """The regular schedule: :func:`lr_factor` of ``cfg`` (warm-up, step / cosine) at global iteration ``it``."""

    period_key = "iters_per_epoch"
    period_help = "iterations per epoch"

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, iters_per_epoch: int) -> None:
        if iters_per_epoch < 1:
            raise ValueError(f"LrScheduler: iters_per_epoch must be >= 1, got {iters_per_epoch}")
        if cfg.warmup is not None and cfg.warmup_iters < 1:
            raise ConfigError(f"schedule.warmup_iters must be >= 1 with warm-up '{cfg.warmup}', "
                              f"got {cfg.warmup_iters}", path="schedule.warmup_iters")
        self.cfg = cfg
        self.iters_per_epoch = int(iters_per_epoch)
        super().__init__(optimizer)

    def lr_factor(self, it: int) -> float:
        return lr_factor(it, self.cfg, self.iters_per_epoch)
