"""The `densedet` command end to end on a tiny model, and the Python predictor on every input type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densedet.cli import main
from densedet.inference.predictor import Predictor

TINY = [
    "model.backbone.base_channels=8", "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
    "model.bbox_head.in_channels=16", "model.bbox_head.feat_channels=16", "model.bbox_head.stacked_convs=1",
    "model.bbox_head.norm_cfg={type: GN, num_groups: 4}", "model.test_cfg.score_thr=0.0",
    "data.samples_per_gpu=4", "data.val_samples_per_gpu=2", "data.workers_per_gpu=0",
    "data.train.pipeline=[{type: Resize, img_scale: [96, 96]}, {type: RandomFlip, flip_ratio: 0.5}]",
    "data.val.pipeline=[{type: Resize, img_scale: [96, 96]}]",
    "schedule.epochs=1", "runtime.val_interval=1", "runtime.device=cpu",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    assert main(["data", "synth", "--out", str(data), "--num-images", "8", "--num-val", "3", "--size", "96"]) == 0
    overrides = TINY + [f"data.root={data}"]
    work = root / "work"
    assert main(["train", "atss_r18_fpn_synth", "--work-dir", str(work), *overrides]) == 0
    return data, work, overrides


@pytest.mark.parametrize("cmd", [[], ["train"], ["test"], ["predict"], ["data", "synth"], ["convert"], ["configs"]])
def test_help(cmd, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: densedet" in capsys.readouterr().out


def test_train_writes_artefacts(trained) -> None:
    _, work, _ = trained
    for name in ("epoch_1.pth", "last_checkpoint", "log.jsonl", "curves.png", "config.yaml"):
        assert (work / name).is_file(), name


def test_test_command_prints_and_writes_metrics(trained, capsys) -> None:
    _, work, overrides = trained
    assert main(["test", "atss_r18_fpn_synth", str(work), "--out", str(work / "t"), *overrides]) == 0
    out = capsys.readouterr().out
    assert "Average Precision" in out and "triangle" in out
    metrics = json.loads((work / "t" / "metrics.json").read_text())
    assert 0.0 <= metrics["bbox_mAP_50"] <= 1.0
    results = json.loads((work / "t" / "results.bbox.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    assert (work / "t" / "pr_curves.png").stat().st_size > 0


def test_predict_draws_and_writes_json(trained) -> None:
    data, work, overrides = trained
    out = work / "pred"
    assert main(["predict", "atss_r18_fpn_synth", str(work / "epoch_1.pth"), str(data / "val"), "--out", str(out),
                 "--score-thr", "0.0", *overrides]) == 0
    records = json.loads((out / "predictions.json").read_text())
    assert len(records) == 3 and all(r["detections"] for r in records)
    assert records[0]["detections"][0]["class"] in ("circle", "square", "triangle")
    for r in records:
        drawn = Image.open(out / f"{Path(r['file']).stem}.png")
        assert drawn.size == Image.open(r["file"]).size
    assert (out / "grid.png").is_file()


def test_predictor_accepts_paths_pil_and_arrays(trained) -> None:
    data, work, overrides = trained
    from densedet.cli import _resolve_checkpoint

    pred = Predictor("atss_r18_fpn_synth", _resolve_checkpoint(str(work)), device="cpu", overrides=overrides)
    path = sorted((data / "val").iterdir())[0]
    img = Image.open(path).convert("RGB")
    a = pred(path)
    b = pred(img)
    c = pred(np.asarray(img))
    batch = pred([path, img])
    for other in (b, c):
        assert torch.equal(a["boxes"], other["boxes"]) and torch.equal(a["scores"], other["scores"])
    for other in batch:  # batched convolutions may round differently in the last bits
        assert torch.allclose(a["boxes"], other["boxes"], atol=1e-3) and torch.allclose(a["scores"], other["scores"],
                                                                                           atol=1e-5)
    assert a["class_names"] and set(a["class_names"]) <= {"circle", "square", "triangle"}
    w, h = img.size
    assert (a["boxes"][:, 0::2] <= w + 1e-3).all() and (a["boxes"][:, 1::2] <= h + 1e-3).all()
    with pytest.raises(ValueError, match="uint8"):
        pred(np.zeros((10, 10, 3), dtype=np.float32))


def test_convert_then_load_with_config(trained, tmp_path, capsys) -> None:
    _, work, overrides = trained
    ckpt = torch.load(work / "epoch_1.pth", weights_only=True)
    release = tmp_path / "release.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ckpt["state_dict"].items()}, "meta": {}}, release)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("_base_: " + str(Path(__file__).resolve().parent.parent / "densedet/configs/atss_r18_fpn_synth.yaml")
                   + "\nmodel:\n  backbone: {base_channels: 8}\n  neck: {in_channels: [16, 32, 64], out_channels: 16}\n"
                   "  bbox_head: {in_channels: 16, feat_channels: 16, stacked_convs: 1, "
                   "norm_cfg: {type: GN, num_groups: 4}}\n")
    assert main(["convert", str(release), str(tmp_path / "out.pth"), "--config", str(cfg)]) == 0
    assert "strict=True" in capsys.readouterr().out


def test_errors_exit_with_their_code_and_the_reason(tmp_path, capsys) -> None:
    assert main(["train", "atss_r18_fpn_synth", "optimizer.momentun=0.9"]) == 2  # config error
    assert "momentun" in capsys.readouterr().err
    missing = tmp_path / "nope.pth"
    assert main(["test", "atss_r18_fpn_synth", str(missing)]) == 4  # checkpoint error
    assert "nope.pth" in capsys.readouterr().err


def test_work_dir_resolves_to_swa_average_when_present(tmp_path) -> None:
    from densedet.cli import _resolve_checkpoint
    from densedet.engine.checkpoint import mark_last_checkpoint

    (tmp_path / "epoch_2.pth").write_bytes(b"x")
    mark_last_checkpoint(tmp_path, tmp_path / "epoch_2.pth")
    assert _resolve_checkpoint(str(tmp_path)) == tmp_path / "epoch_2.pth"
    (tmp_path / "swa_final.pth").write_bytes(b"x")
    assert _resolve_checkpoint(str(tmp_path)) == tmp_path / "swa_final.pth"
