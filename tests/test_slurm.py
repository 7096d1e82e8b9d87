"""SLURM (issue 19, item 2): ``srun densedet train`` works as torchrun does.

The node-list parser is checked on hand-built cases (the expansions ``scontrol show hostnames`` prints for them),
the variable mapping on hand-built environments, and two local gloo processes that get only simulated SLURM
variables (``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID`` / ``SLURM_JOB_NODELIST`` / ``SLURM_JOB_ID``,
no ``MASTER_*``) train to the same losses, weights and mAP as two processes started with torchrun's variables.
The workers are this file run as a script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from worker_procs import wait_workers

from densedet.dist import expand_nodelist, slurm_environment, slurm_master_port
from densedet.errors import ConfigError

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize(("nodelist", "hosts"), [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5", ["gpu5"]),
    ("a1,b2,c3", ["a1", "b2", "c3"]),
    ("n[8-10]", ["n8", "n9", "n10"]),  # no padding: the width of the first bound
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),  # the last group varies fastest
    ("cn[7],login-a.b", ["cn7", "login-a.b"]),
    ("", []),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[1-3", "node1-3]", "node[]", "node[a-b]", "node[5-2]", "n[[1]]", "n[1-]"])
def test_expand_nodelist_rejects_malformed_lists(bad: str) -> None:
    with pytest.raises(ConfigError, match="SLURM node list"):
        expand_nodelist(bad)


def _slurm(rank: int, **extra: str) -> dict[str, str]:
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "8", "SLURM_LOCALID": str(rank % 4),
            "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "4123456", **extra}


def test_slurm_variables_become_torchruns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")  # no scontrol: the node list is expanded here
    assert slurm_environment(_slurm(5)) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                            "MASTER_ADDR": "gpu12", "MASTER_PORT": str(15000 + 3456)}
    # the step's own node list first; MASTER_ADDR / MASTER_PORT already set are kept (mmcv's rule)
    assert slurm_environment(_slurm(0, SLURM_STEP_NODELIST="gpu[13]"))["MASTER_ADDR"] == "gpu13"
    kept = slurm_environment(_slurm(0, MASTER_ADDR="10.0.0.1", MASTER_PORT="23456"))
    assert "MASTER_ADDR" not in kept and "MASTER_PORT" not in kept
    # torchrun's environment wins; one task, an interactive allocation or no SLURM at all: nothing to do
    assert slurm_environment(_slurm(0, RANK="0", WORLD_SIZE="2")) is None
    assert slurm_environment(_slurm(0, SLURM_NTASKS="1")) is None
    assert slurm_environment(_slurm(0, SLURM_JOB_NAME="interactive")) is None
    assert slurm_environment({}) is None
    assert slurm_master_port("4123456") == 18456 and slurm_master_port("7") == 15007
    assert slurm_master_port(None) == 29500
    with pytest.raises(ConfigError, match="SLURM_PROCID"):
        slurm_environment(_slurm(0, SLURM_PROCID="x"))


def test_scontrol_is_asked_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "first-of-%s\\nsecond\\n" "$3"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm_environment(_slurm(0))["MASTER_ADDR"] == "first-of-gpu[12-13]"


# ------------------------------------------------------------------------------------------------- two processes
def _toy_module():
    spec = importlib.util.spec_from_file_location("_densedet_toy_trainer", _HERE / "test_trainer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _loggers() -> list[str]:
    return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []


def _worker(root: Path, work: Path) -> None:
    """Train the toy detector 2 iterations (1 image per process) and save what this rank saw."""
    from densedet.dist import cleanup, init_distributed
    from densedet.engine import Trainer

    toy = _toy_module()
    torch.manual_seed(0)
    cfg = toy.make_cfg(root, data={"samples_per_gpu": 1, "val_samples_per_gpu": 1},
                       schedule={"epochs": 2, "warmup": None},
                       runtime={"val_interval": 2, "log_interval": 1, "device": "cpu", "loggers": _loggers()})
    model = toy.ToyDetector()
    trainer = Trainer(cfg, work, model=model)
    launch = init_distributed("gloo")  # the group exists: the values the trainer got
    metrics = trainer.train()
    torch.save({"state_dict": model.state_dict(), "metrics": metrics, "launch": list(launch)},
               work / f"result_rank{launch[0]}.pt")
    cleanup()


def _free_port(lo: int = 15000, hi: int = 24999) -> int:
    for port in random.sample(range(lo, hi + 1), 200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _launch(root: Path, work: Path, envs: list[dict[str, str]]) -> list[subprocess.Popen]:
    """Start one worker per environment (only the variables given: the test's own launch variables removed)."""
    base = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("SLURM_")}
    base.update({"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                 "PYTHONPATH": os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")])})
    return [subprocess.Popen([sys.executable, __file__, str(root), str(work)], env={**base, **env}, cwd=_REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for env in envs]


def _train_lines(work: Path) -> list[dict]:
    keys = ("epoch", "iter", "lr", "loss", "loss_cls", "loss_bbox", "num_pos")  # not the timing / memory ones
    lines = [json.loads(s) for s in (work / "log.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in keys} for r in lines if r["type"] == "train"]


def test_two_srun_tasks_train_as_two_torchrun_processes(tmp_path: Path) -> None:
    from densedet.data import make_synthetic_coco

    root = tmp_path / "data"
    make_synthetic_coco(root, num_train=2, num_val=3, size=64, seed=1)
    torchrun_port = _free_port(30000, 39999)
    procs = _launch(root, tmp_path / "torchrun", [
        {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(torchrun_port)} for r in range(2)])
    # SLURM only: the rendezvous host is the first of the node list, the port comes from the job id
    slurm_port = _free_port()
    job_id = f"93{slurm_port - 15000:04d}"
    procs += _launch(root, tmp_path / "slurm", [
        {"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r), "SLURM_JOB_ID": job_id,
         "SLURM_JOB_NODELIST": "localhost,gpu[02-03]", "SLURM_JOB_NAME": "densedet", "PATH": ""} for r in range(2)])
    wait_workers(procs, 240)  # both pairs run side by side

    ref = _train_lines(tmp_path / "torchrun")
    assert [r["iter"] for r in ref] == [1, 2]
    assert _train_lines(tmp_path / "slurm") == ref
    for rank in range(2):
        a = torch.load(tmp_path / "torchrun" / f"result_rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "slurm" / f"result_rank{rank}.pt", weights_only=True)
        assert b["launch"] == a["launch"] == [rank, 2, rank]
        assert b["metrics"]["bbox_mAP"] == a["metrics"]["bbox_mAP"]
        for k, v in a["state_dict"].items():
            assert torch.equal(b["state_dict"][k], v), k
    assert (tmp_path / "slurm" / "epoch_2.pth").is_file()
    if _loggers():  # only rank 0 writes the tracker's files
        assert len(list((tmp_path / "slurm" / "tensorboard").glob("events.out.tfevents.*"))) == 1


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
