"""`densedet test` writes the confusion matrix and TIDE files from the results it evaluated (`--no-analysis` skips
them); `densedet analyze` does the same from files (issue 19, item 4)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_ATSS, val_resize

from densedet.cli import main
from densedet.config import load_config
from densedet.data import SYNTH_CLASSES, make_synthetic_coco
from densedet.engine.checkpoint import save_checkpoint
from densedet.evaluation import confusion_matrix, tide_errors
from densedet.models.build import build_detector

CFG = "atss_r18_fpn_synth"
TINY = [*TINY_ATSS, "model.test_cfg.score_thr=0.0", val_resize(64), "data.workers_per_gpu=0"]
FILES = ("confusion_matrix.png", "confusion_matrix.csv", "tide_errors.json", "tide_errors.png", "tide_errors.txt")


@pytest.fixture(scope="module")
def tested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("analysis")
    torch.manual_seed(0)
    ckpt = root / "model.pth"
    save_checkpoint(ckpt, build_detector(load_config(CFG, TINY).model), meta={"classes": list(SYNTH_CLASSES)})
    paths = make_synthetic_coco(root / "data", num_train=1, num_val=3, size=96, seed=0)
    out = root / "test"
    assert main(["test", CFG, str(ckpt), "--out", str(out), "--cm-score-thr", "0.0", f"data.root={paths['root']}",
                 *TINY]) == 0
    return ckpt, Path(paths["root"]), out


def test_test_writes_the_analysis_of_its_own_results(tested, capsys) -> None:
    _, data, out = tested
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    gt = json.loads((data / "annotations" / "instances_val.json").read_text())
    results = json.loads((out / "results.bbox.json").read_text())
    rows = list(csv.reader((out / "confusion_matrix.csv").open()))
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == confusion_matrix(gt, results, score_thr=0.0).matrix.tolist()
    saved = json.loads((out / "tide_errors.json").read_text())["bbox"]
    tide = tide_errors(gt, results)
    assert saved["ap"] == pytest.approx(tide.ap)
    # over the classes with ground truth TIDE's AP is COCO's AP50 (a class with detections only counts 0 in TIDE)
    with_gt = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd")}
    coco_ap50 = json.loads((out / "metrics.json").read_text())["bbox_mAP_50"]
    assert sum(tide.per_class_ap[c] for c in with_gt) / len(with_gt) == pytest.approx(coco_ap50)


def test_no_analysis_and_analyze_command(tested, tmp_path: Path, capsys) -> None:
    ckpt, data, out = tested
    plain = tmp_path / "plain"
    assert main(["test", CFG, str(ckpt), "--out", str(plain), "--no-analysis", f"data.root={data}", *TINY]) == 0
    assert (plain / "metrics.json").is_file() and not any((plain / n).exists() for n in FILES)
    capsys.readouterr()
    ann = data / "annotations" / "instances_val.json"
    assert main(["analyze", str(ann), str(out / "results.bbox.json"), "--out", str(tmp_path / "a")]) == 0
    assert "TIDE errors (bbox" in capsys.readouterr().out
    assert all((tmp_path / "a" / n).is_file() for n in FILES)
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    assert main(["analyze", str(ann), str(bad), "--out", str(tmp_path / "b")]) == 3  # a data error
    assert "JSON list" in capsys.readouterr().err
