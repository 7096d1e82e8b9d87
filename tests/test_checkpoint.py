"""Checkpoints: atomic writes survive crashes, weights_only loading, clear errors, RNG state, work_dir helpers."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from densedet.config.schema import ScheduleConfig
from densedet.engine import checkpoint as ckpt_mod
from densedet.engine.checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    collect_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    mark_last_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from densedet.engine.lr_schedule import LrScheduler


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), fc=nn.Linear(4, 2)))


def _trained_state() -> tuple[nn.Module, torch.optim.Optimizer, LrScheduler]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = LrScheduler(opt, ScheduleConfig(warmup=None), iters_per_epoch=5)
    sched.step(3)
    x = torch.randn(2, 3, 5, 5)
    model[2](model[1](model[0](x)).mean((2, 3))).sum().backward()
    opt.step()
    return model, opt, sched


def test_round_trip_is_weights_only_loadable(tmp_path: Path) -> None:
    model, opt, sched = _trained_state()
    meta = {"epoch": 3, "iter": 15, "config": {"optimizer": {"betas": (0.9, 0.999)}, "work": tmp_path},
            "classes": ("a", "b"), "score": np.float32(0.5)}
    path = save_checkpoint(tmp_path / "epoch_3.pth", model, opt, sched, meta=meta)
    # Our files need no pickled Python objects: plain torch.load(weights_only=True) reads them.
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "optimizer", "scheduler", "scaler", "meta"}
    ck = load_checkpoint(path)
    assert ck["meta"]["epoch"] == 3 and ck["meta"]["iter"] == 15
    assert ck["meta"]["classes"] == ["a", "b"] and ck["meta"]["config"]["work"] == str(tmp_path)
    assert ck["meta"]["densedet_version"]
    assert {"python", "numpy", "torch"} <= set(ck["meta"]["rng"])

    model2, opt2, sched2 = _model(seed=1), None, None
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)
    sched2 = LrScheduler(opt2, ScheduleConfig(warmup=None), iters_per_epoch=5)
    report = load_model_weights(model2, ck, strict=True)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    opt2.load_state_dict(ck["optimizer"])
    sched2.load_state_dict(ck["scheduler"])
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_ddp_wrapped_model_is_unwrapped(tmp_path: Path) -> None:
    model = _model()
    wrapped = nn.DataParallel(model)
    path = save_checkpoint(tmp_path / "a.pth", wrapped)
    keys = list(load_checkpoint(path)["state_dict"])
    assert keys and not any(k.startswith("module.") for k in keys)
    # A state dict saved by someone else with 'module.' prefixes loads too.
    prefixed = {f"module.{k}": v for k, v in model.state_dict().items()}
    load_model_weights(_model(seed=3), prefixed)


def test_crash_mid_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    path = save_checkpoint(tmp_path / "epoch_1.pth", model, meta={"iter": 1})
    before = path.read_bytes()

    def exploding_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ckpt_mod.torch, "save", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _model(seed=5), meta={"iter": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["meta"]["iter"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pth"]  # temp file cleaned up


def test_process_killed_mid_write_keeps_old_file(tmp_path: Path) -> None:
    """A hard kill (no exception handlers run) during the write leaves the previous checkpoint readable."""
    model = _model()
    path = save_checkpoint(tmp_path / "epoch_1.pth", model, meta={"iter": 1})
    mark_last_checkpoint(tmp_path, path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, torch
        from densedet.engine import checkpoint as c
        def dying_save(obj, f, *a, **k):
            f.write(b"PK partial")
            f.flush()
            os._exit(3)
        c.torch.save = dying_save
        c.save_checkpoint({str(path)!r}, torch.nn.Linear(2, 2), meta={{"iter": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert path.read_bytes() == before
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers  # the killed writer's temp file is there, but never mistaken for a checkpoint
    assert latest_checkpoint(tmp_path) == path
    assert load_checkpoint(latest_checkpoint(tmp_path))["meta"]["iter"] == 1


def test_truncated_and_missing_files_name_the_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "good.pth", _model())
    data = path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for callers that expect one
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_model_weights(_model(), bad)


class _Arbitrary:
    def __init__(self) -> None:
        self.x = 1


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": _Arbitrary()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth.*weights_only"):
        load_checkpoint(path)


def test_wrong_model_lists_keys(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "retina.pth", _model())
    other = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 8, 3), head=nn.Linear(4, 2)))
    with pytest.raises(CheckpointError) as info:
        load_model_weights(other, path)
    msg = str(info.value)
    assert "retina.pth" in msg
    assert "2 missing keys" in msg and "head.weight" in msg and "head.bias" in msg
    assert "unexpected keys" in msg and "fc.weight" in msg and "bn.running_mean" in msg
    assert "2 shape mismatches" in msg and "conv.weight [4, 3, 3, 3] vs [8, 3, 3, 3]" in msg


def test_long_key_lists_are_cut(tmp_path: Path) -> None:
    big = nn.Sequential(*[nn.Linear(2, 2) for _ in range(8)])  # 16 keys
    with pytest.raises(CheckpointError, match=r"16 unexpected keys.*and 6 more"):
        load_model_weights(nn.Linear(3, 3), {"state_dict": big.state_dict()}, strict=True, source="big.pth")


def test_non_strict_loads_matching_and_rejects_unrelated() -> None:
    src = _model(seed=0)
    dst = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), fc=nn.Linear(4, 7)))
    report = load_model_weights(dst, src.state_dict(), strict=False)
    assert [m[0] for m in report["mismatched"]] == ["fc.weight", "fc.bias"]
    assert torch.equal(dst.conv.weight, src.conv.weight)
    assert not torch.equal(dst.fc.weight[:2], src.fc.weight)
    with pytest.raises(CheckpointError, match="none of the"):
        load_model_weights(nn.Linear(5, 5), src.state_dict(), strict=False, source="x.pth")


def test_rng_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = collect_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = save_checkpoint(tmp_path / "r.pth", _model(), meta={"rng": [state]})
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(load_checkpoint(path)["meta"], rank=0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_latest_and_prune(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for n in (1, 2, 3, 10):
        p = save_checkpoint(tmp_path / f"epoch_{n}.pth", nn.Linear(1, 1))
        mark_last_checkpoint(tmp_path, p)
    assert (tmp_path / "last_checkpoint").read_text().strip() == "epoch_10.pth"
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch_10.pth"
    removed = prune_checkpoints(tmp_path, max_keep=2)
    assert sorted(p.name for p in removed) == ["epoch_1.pth", "epoch_2.pth"]  # numeric, not lexical order
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["epoch_10.pth", "epoch_3.pth"]
    assert prune_checkpoints(tmp_path, max_keep=-1) == []
    os.remove(tmp_path / "epoch_10.pth")  # marker points at a deleted file: fall back to the newest file
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch_3.pth"
