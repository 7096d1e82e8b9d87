"""LrScheduler: mmcv warm-up formulas, step decays of the 1x/1.5x/2x schedules, cosine endpoints, resume."""

from __future__ import annotations

import math

import pytest
import torch

from densedet.config.schema import ScheduleConfig
from densedet.engine.lr_schedule import LrScheduler, lr_factor


def _opt(lr: float = 0.01) -> torch.optim.Optimizer:
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [p1], "lr": lr}, {"params": [p2], "lr": 2 * lr}], lr=lr)


def test_linear_warmup_values() -> None:
    cfg = ScheduleConfig(policy="step", steps=[8, 11], warmup="linear", warmup_iters=500, warmup_ratio=0.001)
    sched = LrScheduler(_opt(0.01), cfg, iters_per_epoch=1000)
    # Hand-computed: lr = 0.01 * (1 - (1 - it/500) * (1 - 0.001)).
    cases = [(0, 0.01 * 0.001), (250, 0.01 * (1 - 0.5 * 0.999)), (500, 0.01), (499, 0.01 * (1 - 0.999 / 500))]
    for it, expected in cases:
        sched.step(it)
        assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        assert sched.optimizer.param_groups[1]["lr"] == pytest.approx(2 * expected, rel=1e-12)
    assert sched.current_lr() == pytest.approx(0.01 * (1 - 0.999 / 500))


def test_constant_warmup_and_no_warmup() -> None:
    cfg = ScheduleConfig(policy="constant", warmup="constant", warmup_iters=10, warmup_ratio=0.25)
    assert lr_factor(0, cfg, 5) == 0.25 and lr_factor(9, cfg, 5) == 0.25 and lr_factor(10, cfg, 5) == 1.0
    cfg = ScheduleConfig(policy="constant", warmup=None)
    assert lr_factor(0, cfg, 5) == 1.0


@pytest.mark.parametrize("steps", [[8, 11], [12, 16], [16, 22]])  # 1x, 1.5x, 2x
def test_step_decays_at_epochs(steps: list[int]) -> None:
    ipe = 7
    cfg = ScheduleConfig(policy="step", steps=steps, gamma=0.1, warmup="linear", warmup_iters=3)
    a, b = steps
    # Last iteration before the first step, its first iteration, and around the second step.
    assert lr_factor(a * ipe - 1, cfg, ipe) == pytest.approx(1.0)
    assert lr_factor(a * ipe, cfg, ipe) == pytest.approx(0.1)
    assert lr_factor(b * ipe - 1, cfg, ipe) == pytest.approx(0.1)
    assert lr_factor(b * ipe, cfg, ipe) == pytest.approx(0.01)
    assert lr_factor((b + 5) * ipe, cfg, ipe) == pytest.approx(0.01)


def test_warmup_multiplies_decayed_lr() -> None:
    # mmcv applies the warm-up factor to the regular (possibly already decayed) lr.
    cfg = ScheduleConfig(policy="step", steps=[0], gamma=0.5, warmup="linear", warmup_iters=4, warmup_ratio=0.0)
    assert lr_factor(2, cfg, 10) == pytest.approx(0.5 * 0.5)


def test_cosine_endpoints_and_midpoint() -> None:
    ipe, epochs = 10, 12
    cfg = ScheduleConfig(epochs=epochs, policy="cosine", min_lr_ratio=0.05, warmup=None)
    total = ipe * epochs
    assert lr_factor(0, cfg, ipe) == pytest.approx(1.0)
    assert lr_factor(total // 2, cfg, ipe) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(total, cfg, ipe) == pytest.approx(0.05)
    assert lr_factor(total // 4, cfg, ipe) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi / 4)))
    # Monotone non-increasing over the run.
    vals = [lr_factor(i, cfg, ipe) for i in range(total + 1)]
    assert all(x >= y for x, y in zip(vals, vals[1:]))


def test_state_dict_round_trip_and_ipe_mismatch() -> None:
    cfg = ScheduleConfig(policy="step", steps=[1], warmup="linear", warmup_iters=5)
    s1 = LrScheduler(_opt(0.04), cfg, iters_per_epoch=10)
    s1.step(13)
    state = s1.state_dict()
    s2 = LrScheduler(_opt(1.0), cfg, iters_per_epoch=10)  # different lr: initial_lrs come from the state
    s2.load_state_dict(state)
    assert s2.last_iter == 13
    assert [g["lr"] for g in s2.optimizer.param_groups] == pytest.approx([0.004, 0.008])
    s3 = LrScheduler(_opt(0.04), cfg, iters_per_epoch=11)
    with pytest.raises(ValueError, match="iterations per epoch"):
        s3.load_state_dict(state)
