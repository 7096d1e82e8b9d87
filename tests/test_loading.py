"""load_detector with weights trained on other classes than the config's (``densedet train --data``)."""
from __future__ import annotations

import logging

import pytest
import torch

from densedet.config import load_config
from densedet.engine.checkpoint import save_checkpoint
from densedet.errors import CheckpointError
from densedet.inference import load_detector
from densedet.models.build import build_detector

CFG = "atss_r18_fpn_synth"  # 3 classes


def _one_class_checkpoint(path, classes):
    cfg = load_config(CFG, ["model.bbox_head.num_classes=1", "model.backbone.pretrained=null"])
    torch.manual_seed(0)
    model = build_detector(cfg.model)
    save_checkpoint(path, model, meta={"classes": classes})
    return model


def test_checkpoint_classes_size_the_head(tmp_path, caplog):
    trained = _one_class_checkpoint(tmp_path / "raccoon.pth", ["raccoon"])
    with caplog.at_level(logging.INFO, logger="densedet"):
        model = load_detector(load_config(CFG), tmp_path / "raccoon.pth", device="cpu", fuse=False)
    assert model.num_classes == 1 and model.classes == ["raccoon"]
    assert any("holds 1 class(es) (raccoon)" in r.getMessage() for r in caplog.records)
    # every weight is the checkpoint's, the classifier included
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randint(0, 256, (1, 3, 96, 128), dtype=torch.uint8)
    model.set_score_thr(0.0)
    with torch.no_grad():
        dets = model(x, mode="predict")[0]
    assert dets["labels"].numel() > 0 and int(dets["labels"].max()) == 0


def test_classes_that_do_not_match_the_weights_still_fail_strictly(tmp_path):
    _one_class_checkpoint(tmp_path / "bad.pth", ["a", "b"])  # meta says 2, weights hold 1
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_detector(load_config(CFG), tmp_path / "bad.pth", device="cpu", fuse=False)


def test_cli_test_refuses_a_dataset_with_another_class_count(tmp_path, capsys):
    # a model trained with --data, tested without it: scored against another dataset's categories otherwise
    from densedet.cli import main
    from densedet.data import make_synthetic_coco

    _one_class_checkpoint(tmp_path / "raccoon.pth", ["raccoon"])
    data = make_synthetic_coco(tmp_path / "synth", num_train=1, num_val=2, size=64, seed=0)["root"]
    rc = main(["test", CFG, str(tmp_path / "raccoon.pth"), "--out", str(tmp_path / "out"), f"data.root={data}",
               "data.workers_per_gpu=0"])
    err = capsys.readouterr().err
    assert rc == 3 and "hold 1 class (raccoon)" in err and "has 3" in err and "--data" in err
