"""DDP: two gloo CPU processes with one image each train exactly like one process with both images.

The workers are this file run as a script with torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so the test exercises ``init_distributed`` the way torchrun does. The toy detector
normalises its loss by the positive count averaged over processes (``reduce_mean``), so equality needs the
head-side reduction, DDP's gradient averaging and the trainer's loss logging (all_reduce_dict) to be right.
Validation runs too: uneven, unpadded shards (2 + 1 images) gathered on every rank give the single-process mAP.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from worker_procs import wait_workers

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent


def _toy_module():
    """tests/test_trainer.py (ToyDetector, make_cfg), imported by path: works in the workers and any import mode."""
    spec = importlib.util.spec_from_file_location("_densedet_toy_trainer", _HERE / "test_trainer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# A real (tiny) ATSS detector: its losses normalise by reduce_mean(num_pos) and by the cross-process mean of the
# centerness sum, as the reference does. BN is frozen (norm_eval) since per-process batches differ in size.
ATSS_TINY = {
    "type": "ATSS",
    "backbone": {"type": "ResNet", "depth": 18, "base_channels": 8, "out_indices": [1, 2, 3], "frozen_stages": -1,
                 "norm_eval": True, "pretrained": None},
    "neck": {"type": "FPN", "in_channels": [16, 32, 64], "out_channels": 16, "num_outs": 5,
             "add_extra_convs": "on_output"},
    "bbox_head": {"type": "ATSSHead", "num_classes": 3, "in_channels": 16, "feat_channels": 16, "stacked_convs": 1,
                  "norm_cfg": {"type": "GN", "num_groups": 4}},
}


def _cfg(toy, root: Path, per_gpu: int, kind: str):
    extra = {}
    if kind == "atss":
        # SGD, not AdamW: Adam's g/sqrt(v) turns float summation-order noise in tiny gradients into full steps.
        extra = {"model": ATSS_TINY, "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9}}
    return toy.make_cfg(root, data={"samples_per_gpu": per_gpu, "val_samples_per_gpu": 1},
                        schedule={"epochs": 2, "warmup": None},
                        runtime={"val_interval": 2, "log_interval": 1, "device": "cpu"}, **extra)


def _run(root: Path, work: Path, per_gpu: int, kind: str = "toy") -> None:
    """Train 2 iterations (1 per epoch) and save this rank's weights and the final metrics."""
    from densedet.dist import cleanup, get_rank
    from densedet.engine import Trainer
    from densedet.models.build import build_detector

    toy = _toy_module()
    torch.manual_seed(0)
    model = toy.ToyDetector() if kind == "toy" else build_detector(ATSS_TINY)
    trainer = Trainer(_cfg(toy, root, per_gpu, kind), work, model=model)
    assert trainer.iters_per_epoch == 1
    metrics = trainer.train()
    torch.save({"state_dict": model.state_dict(), "metrics": metrics}, work / f"result_rank{get_rank()}.pt")
    cleanup()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(work: Path) -> list[dict]:
    recs = [json.loads(s) for s in (work / "log.jsonl").read_text().splitlines()]
    return [r for r in recs if r["type"] == "train"]


@pytest.mark.parametrize("kind", ["toy", "atss"])
def test_two_process_ddp_equals_single_process_batch(tmp_path: Path, kind: str) -> None:
    from densedet.data import make_synthetic_coco

    root = tmp_path / "data"
    # 128 px for the real detector: enough positives that no rank hits the reference's clamps
    # (max(mean #pos, 1), max(mean centerness sum, 1)), where per-rank and whole-batch normalisation part ways.
    make_synthetic_coco(root, num_train=2, num_val=3, size=64 if kind == "toy" else 128, seed=1)

    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs.append(subprocess.Popen([sys.executable, __file__, str(root), str(tmp_path / "ddp"), kind], env=env,
                                      cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    # Meanwhile: the single-process reference with both images in one batch.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(root, tmp_path / "single", per_gpu=2, kind=kind)
    finally:
        torch.set_num_threads(n)

    wait_workers(procs, 150, "DDP worker")

    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert [r["iter"] for r in single] == [r["iter"] for r in ddp] == [1, 2]
    for s, d in zip(single, ddp):
        for key in ("loss", "loss_cls", "loss_bbox", "lr"):
            assert abs(s[key] - d[key]) <= 1e-5 * max(1.0, abs(s[key])), (s["iter"], key, s[key], d[key])
        # Per-rank statistics are averaged for the log: mean positives per image == single batch / 2.
        assert abs(d["num_pos"] - s["num_pos"] / 2) < 1e-4
        if kind == "atss":
            assert s["num_pos"] >= 8 and s["loss_bbox"] > 0  # the box/centerness normalisation is exercised

    ref = torch.load(tmp_path / "single" / "result_rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "ddp" / "result_rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "result_rank1.pt", weights_only=True)
    for k, v in ref["state_dict"].items():
        assert torch.equal(r0["state_dict"][k], r1["state_dict"][k]), k  # ranks stay in sync
        assert torch.allclose(r0["state_dict"][k], v, rtol=1e-5, atol=1e-6), k
    assert r0["metrics"]["bbox_mAP"] == r1["metrics"]["bbox_mAP"]  # rank 0's result is broadcast
    assert abs(r0["metrics"]["bbox_mAP"] - ref["metrics"]["bbox_mAP"]) < 1e-6
    assert (tmp_path / "ddp" / "epoch_2.pth").is_file()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _run(Path(sys.argv[1]), Path(sys.argv[2]), per_gpu=1, kind=sys.argv[3])
