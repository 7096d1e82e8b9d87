"""A tiny Mask R-CNN trained end to end on the synthetic set: losses fall, validation reports bbox and segm
metrics, and a resumed run continues bit-identically (the RoI samplers draw from the checkpointed RNG)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import train_lines

from densedet.config import config_from_dict, load_config
from densedet.config.schema import Config
from densedet.data import make_synthetic_coco
from densedet.engine import Trainer

_PIPE = [{"type": "Resize", "img_scale": [96, 96], "keep_ratio": True},
         {"type": "RandomFlip", "flip_ratio": 0.5}]


def _tiny_model() -> dict[str, Any]:
    m = copy.deepcopy(load_config("mask_rcnn_r18_fpn_synth").model)
    m["backbone"]["base_channels"] = 8
    m["neck"].update(in_channels=[8, 16, 32, 64], out_channels=16)
    m["rpn_head"].update(in_channels=16, feat_channels=16)
    roi = m["roi_head"]
    roi["bbox_roi_extractor"]["out_channels"] = roi["mask_roi_extractor"]["out_channels"] = 16
    roi["bbox_head"].update(in_channels=16, fc_out_channels=32)
    roi["mask_head"].update(in_channels=16, conv_out_channels=16, num_convs=1)
    m["train_cfg"]["rcnn"]["sampler"]["num"] = 64
    return m


def make_cfg(root: Path, **sections: dict) -> Config:
    raw: dict[str, Any] = {
        "model": _tiny_model(),
        "data": {"root": str(root), "samples_per_gpu": 4, "workers_per_gpu": 0, "val_samples_per_gpu": 4,
                 "train": {"ann_file": "annotations/instances_train.json", "img_dir": "train", "pipeline": _PIPE,
                           "with_mask": True},
                 "val": {"ann_file": "annotations/instances_val.json", "img_dir": "val",
                         "pipeline": [_PIPE[0]]}},
        "optimizer": {"type": "AdamW", "lr": 0.003, "weight_decay": 1e-4, "auto_scale_lr": False},
        "schedule": {"epochs": 2, "policy": "step", "steps": [100], "warmup": "linear", "warmup_iters": 2},
        "runtime": {"seed": 0, "val_interval": 0, "log_interval": 1, "device": "cpu", "channels_last": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return config_from_dict(raw, name="tiny_mask_rcnn")


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth_masks")
    make_synthetic_coco(root, num_train=8, num_val=4, size=96, seed=0)
    return root


def test_tiny_mask_rcnn_losses_fall_and_segm_is_evaluated(synth_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = make_cfg(synth_root, schedule={"epochs": 10, "policy": "cosine", "min_lr_ratio": 0.1},
                   runtime={"val_interval": 10, "checkpoint_interval": 10})
    metrics = Trainer(cfg, tmp_path).train()
    lines = train_lines(tmp_path)
    assert len(lines) == 20
    keys = ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask")
    for r in lines:
        assert r["loss"] == pytest.approx(sum(r[k] for k in keys), rel=1e-5)
    first = sum(r["loss"] for r in lines[:3]) / 3
    last = sum(r["loss"] for r in lines[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    for k in ("loss_rpn_cls", "loss_mask"):
        assert sum(r[k] for r in lines[-3:]) < sum(r[k] for r in lines[:3]), k
    assert "bbox_mAP" in metrics and "segm_mAP" in metrics
    assert (tmp_path / "val_results.segm.json").is_file()


def test_resume_mid_run_is_exact(synth_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(123)
    three = {"epochs": 3}
    ref = Trainer(make_cfg(synth_root, schedule=three), tmp_path / "ref")
    ref.train()
    ref_lines = train_lines(tmp_path / "ref")
    torch.manual_seed(123)
    Trainer(make_cfg(synth_root, schedule={**three, "max_iters": 3}), tmp_path / "a").train()
    torch.manual_seed(7)  # another init and RNG state: everything must come from the checkpoint
    resumed = Trainer(make_cfg(synth_root, schedule=three), tmp_path / "b", resume=tmp_path / "a" / "iter_3.pth")
    resumed.train()
    got = {r["iter"]: r for r in train_lines(tmp_path / "b")}
    assert sorted(got) == [4, 5, 6]
    for r in ref_lines[3:]:
        for key in ("loss", "loss_rpn_cls", "loss_cls", "loss_mask", "acc"):
            assert got[r["iter"]][key] == r[key], (r["iter"], key)
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, ref.model.state_dict()[k]), k


def test_cli_test_and_predict_report_masks(synth_root: Path, tmp_path: Path) -> None:
    from densedet.cli import main

    torch.manual_seed(0)
    Trainer(make_cfg(synth_root, schedule={"epochs": 1}), tmp_path / "w").train()
    cfg_file = tmp_path / "w" / "config.yaml"
    assert main(["test", str(cfg_file), str(tmp_path / "w"), "--out", str(tmp_path / "t")]) == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert "bbox_mAP" in metrics and "segm_mAP" in metrics
    segm = json.loads((tmp_path / "t" / "results.segm.json").read_text())
    assert segm and all(set(r["segmentation"]) == {"size", "counts"} for r in segm)
    assert main(["predict", str(cfg_file), str(tmp_path / "w"), str(synth_root / "val"), "--out",
                 str(tmp_path / "p"), "--score-thr", "0.0", "--limit", "2"]) == 0
    records = json.loads((tmp_path / "p" / "predictions.json").read_text())
    dets = [d for r in records for d in r["detections"]]
    assert dets and all("segmentation" in d for d in dets)
