"""SWA (densedet/engine/swa.py): cyclic lr against mmcv's closed form, the running average against a hand mean,
the SWA phase end to end on a toy detector (files, lr, averaged weights, loadable checkpoints, validation), and
resuming mid-SWA against an uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from densedet.config import config_from_dict
from densedet.config.schema import Config, SWALrConfig
from densedet.engine import Trainer, load_checkpoint
from densedet.engine.checkpoint import load_model_weights
from densedet.engine.swa import CyclicLrScheduler, SWAAverager, cyclic_lr_factor
from densedet.registry import ConfigError


def _toy_module():
    spec = importlib.util.spec_from_file_location("_densedet_toy_trainer_swa",
                                                  Path(__file__).resolve().parent / "test_trainer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


toy = _toy_module()
ToyDetector = toy.ToyDetector


def make_cfg(root: Path, swa: dict | None = None, **sections: dict) -> Config:
    """The toy config of tests/test_trainer.py (8 images, 4 per batch: 2 iterations per epoch), 1 regular epoch,
    then 3 SWA epochs with SGD and one lr cycle per epoch."""
    base = toy.make_cfg(root).to_dict()
    raw: dict[str, Any] = {k: base[k] for k in ("model", "data", "optimizer", "schedule", "runtime")}
    raw["schedule"] = {**raw["schedule"], "epochs": 1}
    raw["swa"] = {"swa_training": True, "swa_total_epochs": 3,
                  "swa_optimizer": {"type": "SGD", "lr": 0.02, "momentum": 0.9, "auto_scale_lr": False,
                                    "paramwise": {"bias_lr_mult": 2.0, "bias_decay_mult": 0.0}},
                  "swa_lr_config": {"policy": "cyclic", "target_ratio": [1.0, 0.01], "cyclic_times": 3,
                                    "step_ratio_up": 0.0},
                  **(swa or {})}
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return config_from_dict(raw, name="toy-swa")


def _lines(work: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (work / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from densedet.data import make_synthetic_coco

    root = tmp_path_factory.mktemp("synth_swa")
    make_synthetic_coco(root, num_train=8, num_val=4, size=64, seed=0)
    return root


# ------------------------------------------------------------------------------------------------------- lr
def test_cyclic_lr_matches_mmcv_closed_form() -> None:
    # VarifocalNet's setting: (1, 0.01), no up phase; 12 iterations in 3 cycles of 4:
    # factor = 0.01 + 0.99 * (1 + cos(pi * (it % 4) / 4)) / 2
    cfg = SWALrConfig(target_ratio=[1.0, 0.01], cyclic_times=3, step_ratio_up=0.0)
    expected = [1.0, 0.01 + 0.495 * (1 + math.sqrt(0.5)), 0.505, 0.01 + 0.495 * (1 - math.sqrt(0.5))] * 3
    assert [cyclic_lr_factor(it, 12, cfg) for it in range(12)] == pytest.approx(expected, abs=1e-12)
    # mmcv defaults (10, 1e-4), step_ratio_up 0.5, one cycle of 8: up 1 -> 10 over 4 its, then 10 -> 1e-4
    up = SWALrConfig(target_ratio=[10.0, 1e-4], cyclic_times=1, step_ratio_up=0.5)
    got = [cyclic_lr_factor(it, 8, up) for it in (0, 2, 4, 6)]
    assert got == pytest.approx([1.0, 5.5, 10.0, 1e-4 + 0.5 * (10 - 1e-4)], abs=1e-12)
    # remainder iterations (total not divisible by cyclic_times) start a new cycle, as mmcv's modulo does
    assert cyclic_lr_factor(8, 9, SWALrConfig(cyclic_times=2)) == 1.0
    with pytest.raises(ConfigError, match="cyclic_times"):
        cyclic_lr_factor(0, 2, SWALrConfig(cyclic_times=3))


def test_cyclic_scheduler_scales_every_group() -> None:
    w, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.02}, {"params": [b], "lr": 0.04}], lr=0.02)
    sched = CyclicLrScheduler(opt, SWALrConfig(cyclic_times=2), total_iters=8)
    sched.step(2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * 0.505, 0.04 * 0.505])
    state = sched.state_dict()
    opt2 = torch.optim.SGD([{"params": [w], "lr": 1.0}, {"params": [b], "lr": 1.0}], lr=1.0)
    other = CyclicLrScheduler(opt2, SWALrConfig(cyclic_times=2), total_iters=8)
    other.load_state_dict(state)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([0.02 * 0.505, 0.04 * 0.505])
    with pytest.raises(ValueError, match="iterations"):
        CyclicLrScheduler(opt2, SWALrConfig(cyclic_times=2), total_iters=10).load_state_dict(state)


# ------------------------------------------------------------------------------------------------- averager
def test_running_average_is_the_mean_of_the_snapshots() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    model[1].running_mean.fill_(0.25)
    avg = SWAAverager(model)
    snapshots = []
    for k in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * (k + 1))
            model[1].running_mean.fill_(float(k))  # buffers moving in the live model do not enter the average
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        avg.update(model)
    assert avg.n_averaged == 4
    for name, p in avg.module.named_parameters():
        torch.testing.assert_close(p, sum(s[name] for s in snapshots) / 4, atol=1e-6, rtol=1e-5)
        assert not p.requires_grad
    assert torch.equal(avg.module[1].running_mean, torch.full((4,), 0.25))  # buffers of the SWA start


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def swa_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer, dict]:
    """1 regular epoch + 3 SWA epochs, uninterrupted, with dropout (the RNG stream matters) and validation."""
    work = tmp_path_factory.mktemp("swa_ref")
    torch.manual_seed(123)
    trainer = Trainer(make_cfg(synth_root, runtime={"val_interval": 1}), work, model=ToyDetector(dropout=0.2))
    metrics = trainer.train()
    return work, trainer, metrics


def test_swa_phase_files_lr_and_average(swa_run) -> None:
    work, trainer, metrics = swa_run
    names = {p.name for p in work.glob("*.pth")}
    assert {"epoch_1.pth", "swa_epoch_1.pth", "swa_epoch_2.pth", "swa_epoch_3.pth", "swa_model_1.pth",
            "swa_model_2.pth", "swa_model_3.pth", "swa_final.pth"} == names
    assert (work / "last_checkpoint").read_text().strip() == "swa_epoch_3.pth"

    lines = _lines(work)
    assert [r["iter"] for r in lines] == list(range(1, 9))  # 2 regular + 6 SWA iterations, one counter
    # SWA lr: SGD 0.02 with one cosine cycle per epoch of 2 iterations: factors 1, 0.505, 1, 0.505, ...
    assert [r["lr"] for r in lines[2:]] == pytest.approx([0.02, 0.02 * 0.505] * 3)

    # the averaged model is the hand mean of the live weights after each SWA epoch (saved in swa_epoch_N.pth)
    live = [load_checkpoint(work / f"swa_epoch_{n}.pth")["state_dict"] for n in (1, 2, 3)]
    final = load_checkpoint(work / "swa_final.pth")
    for key, value in final["state_dict"].items():
        torch.testing.assert_close(value, (live[0][key] + live[1][key] + live[2][key]) / 3, atol=1e-6, rtol=1e-5)
    two = load_checkpoint(work / "swa_model_2.pth")["state_dict"]
    torch.testing.assert_close(two["cls.weight"], (live[0]["cls.weight"] + live[1]["cls.weight"]) / 2)
    assert final["meta"]["swa_n_averaged"] == 3 and final["meta"]["classes"] == ["circle", "square", "triangle"]
    assert not torch.equal(final["state_dict"]["cls.weight"], live[2]["cls.weight"])

    # loadable as `densedet test` loads a checkpoint: strict, into a fresh model
    fresh = ToyDetector()
    load_model_weights(fresh, load_checkpoint(work / "swa_final.pth"), strict=True)
    assert torch.equal(fresh.cls.weight, final["state_dict"]["cls.weight"])

    # the averaged model is evaluated after each averaging; regular validation still ran for the regular epoch
    swa_vals = _lines(work, "swa_val")
    assert [v["swa_epoch"] for v in swa_vals] == [1, 2, 3] and all("bbox_mAP" in v for v in swa_vals)
    assert [v["epoch"] for v in _lines(work, "val")] == [1]
    assert metrics["swa_bbox_mAP"] == swa_vals[-1]["bbox_mAP"] and metrics["iter"] == 8
    assert (work / "swa_val_results.bbox.json").is_file()
    # the trainer got its regular optimizer back; the dumped config keeps the SWA section
    assert trainer.swa is None and isinstance(trainer.optimizer, torch.optim.AdamW)
    assert "swa" in (work / "config.yaml").read_text()


def test_resume_mid_swa_reproduces_the_uninterrupted_run(synth_root: Path, tmp_path: Path, swa_run) -> None:
    ref_work, ref_trainer, _ = swa_run
    torch.manual_seed(999)  # a different init: everything must come from the checkpoint
    cfg = make_cfg(synth_root, swa={"swa_resume_from": str(ref_work / "swa_epoch_1.pth")},
                   runtime={"val_interval": 0})
    resumed = Trainer(cfg, tmp_path, model=ToyDetector(dropout=0.2))
    assert resumed.iter == 4 and resumed._swa_resume is not None
    resumed.train()
    ref = {r["iter"]: r for r in _lines(ref_work)}
    got = _lines(tmp_path)
    assert [r["iter"] for r in got] == [5, 6, 7, 8]
    for r in got:
        for key in ("loss", "loss_cls", "loss_bbox", "lr"):
            assert r[key] == ref[r["iter"]][key], (r["iter"], key)  # bit-identical
    for name in ("swa_final.pth", "swa_epoch_3.pth"):
        a, b = load_checkpoint(ref_work / name), load_checkpoint(tmp_path / name)
        for k, v in a["state_dict"].items():
            assert torch.equal(v, b["state_dict"][k]), (name, k)
    assert load_checkpoint(tmp_path / "swa_epoch_3.pth")["meta"]["swa"]["n_averaged"] == 3
    # resume=True in the same work dir finds the last SWA checkpoint and has nothing left to do
    again = Trainer(cfg, tmp_path, model=ToyDetector(dropout=0.2), resume=True)
    assert again.iter == 8
    assert again.train()["iter"] == 8


def test_only_swa_training_and_errors(synth_root: Path, tmp_path: Path, swa_run) -> None:
    ref_work = swa_run[0]
    start = ref_work / "epoch_1.pth"
    cfg = make_cfg(synth_root, swa={"only_swa_training": True, "swa_load_from": str(start), "swa_total_epochs": 1,
                                    "swa_lr_config": {"cyclic_times": 1}})
    t = Trainer(cfg, tmp_path / "only", model=ToyDetector(dropout=0.2))
    t.train()
    lines = _lines(tmp_path / "only")
    assert [r["iter"] for r in lines] == [3, 4]  # no regular iterations; SWA counts on from epochs * ipe
    assert not (tmp_path / "only" / "epoch_1.pth").exists()
    # SWA started from epoch_1.pth, the weights the reference's SWA phase started from, with the same data stream
    # (global epoch 1), fresh SGD and the same lr cycle of 2 iterations: the same first SWA epoch, bit for bit
    ref = _lines(ref_work)
    assert [r["loss"] for r in lines] == [ref[2]["loss"], ref[3]["loss"]]

    with pytest.raises(ConfigError, match="swa_load_from"):
        Trainer(make_cfg(synth_root, swa={"only_swa_training": True}), tmp_path / "x", model=ToyDetector()).train()
    with pytest.raises(ConfigError, match="does not exist"):
        Trainer(make_cfg(synth_root, swa={"swa_load_from": "best_bbox_mAP.pth"}, schedule={"epochs": 0}),
                tmp_path / "y", model=ToyDetector()).train()
    with pytest.raises(Exception, match="not a checkpoint of the SWA phase"):
        Trainer(make_cfg(synth_root, swa={"swa_resume_from": str(start)}), tmp_path / "z", model=ToyDetector())


def test_config_errors_name_the_key(synth_root: Path) -> None:
    with pytest.raises(ConfigError, match=r"swa\.swa_lr_config\.policy"):
        make_cfg(synth_root, swa={"swa_lr_config": {"policy": "step"}})
    with pytest.raises(ConfigError, match=r"swa\.swa_total_epochs"):
        make_cfg(synth_root, swa={"swa_total_epochs": 0})
    with pytest.raises(ConfigError, match=r"unknown key 'swa\.swa_runner'"):
        make_cfg(synth_root, swa={"swa_runner": {"max_epochs": 3}})
    with pytest.raises(ConfigError, match=r"swa\.only_swa_training"):
        make_cfg(synth_root, swa={"swa_training": False, "only_swa_training": True})
    cfg = make_cfg(synth_root, swa={"swa_lr_config": {"target_ratio": 5.0}})
    assert cfg.swa.swa_lr_config.target_ratio == [5.0, 5e-5]  # mmcv: a number r means (r, r / 1e5)


def test_max_iters_smoke_run_does_not_start_swa(synth_root: Path, tmp_path: Path) -> None:
    t = Trainer(make_cfg(synth_root, schedule={"max_iters": 1}), tmp_path, model=ToyDetector())
    assert t.train()["iter"] == 1
    assert not list(tmp_path.glob("swa_*.pth")) and (tmp_path / "iter_1.pth").is_file()
