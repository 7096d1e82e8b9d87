"""End to end with real detectors: tiny RetinaNet / FCOS / ATSS train on the synthetic set and their loss falls;
an interrupted ATSS run resumed from its checkpoint continues with the same losses as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densedet.config import load_config
from densedet.data import make_synthetic_coco
from densedet.engine import train

TINY = [
    "model.backbone.base_channels=8", "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
    "model.bbox_head.in_channels=16", "model.bbox_head.feat_channels=16", "model.bbox_head.stacked_convs=1",
    "data.samples_per_gpu=4", "data.val_samples_per_gpu=4", "data.workers_per_gpu=0",
    "data.train.pipeline=[{type: Resize, img_scale: [96, 96]}, {type: RandomFlip, flip_ratio: 0.5}]",
    "data.val.pipeline=[{type: Resize, img_scale: [96, 96]}]",
    "optimizer.lr=0.004", "schedule.warmup_iters=4", "runtime.log_interval=1", "runtime.val_interval=0",
    "runtime.device=cpu",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("synth")
    make_synthetic_coco(r, num_train=8, num_val=4, size=96, seed=3)
    return r


def _losses(work: Path) -> list[dict]:
    recs = [json.loads(s) for s in (work / "log.jsonl").read_text().splitlines()]
    return [r for r in recs if r["type"] == "train"]


def _cfg(name: str, root: Path, *extra: str):
    gn = [] if name.startswith("retinanet") else ["model.bbox_head.norm_cfg={type: GN, num_groups: 4}"]
    return load_config(name, TINY + gn + [f"data.root={root}", *extra])


@pytest.mark.parametrize("name", ["atss_r18_fpn_synth", "fcos_r18_fpn_synth", "retinanet_r18_fpn_synth"])
def test_tiny_detector_loss_falls(name: str, root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    train(_cfg(name, root, "schedule.epochs=20"), tmp_path)
    losses = [r["loss"] for r in _losses(tmp_path)]
    assert len(losses) == 40
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)


def test_resume_continues_exactly(root: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    part = tmp_path / "part"
    train(_cfg("atss_r18_fpn_synth", root, "schedule.epochs=3"), full)
    # "interrupted" after 2 of 3 epochs, then resumed from its own latest checkpoint
    train(_cfg("atss_r18_fpn_synth", root, "schedule.epochs=3", "schedule.max_iters=4"), part)
    train(_cfg("atss_r18_fpn_synth", root, "schedule.epochs=3"), part, resume=True)
    a = {r["iter"]: r for r in _losses(full)}
    b = {r["iter"]: r for r in _losses(part)}
    for it in (5, 6):
        for key in ("loss", "loss_cls", "loss_bbox", "loss_centerness", "lr"):
            assert a[it][key] == b[it][key], (it, key)
    sa = torch.load(full / "epoch_3.pth", weights_only=True)["state_dict"]
    sb = torch.load(part / "epoch_3.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
