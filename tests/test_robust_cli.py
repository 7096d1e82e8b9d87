"""Every user error of the `densedet` command is one line on stderr with its kind's exit code, never a traceback
(issue 9, items 8, 9 and 11); ``--debug`` / ``DENSEDET_DEBUG=1`` show the traceback instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from densedet.cli import main
from densedet.config import load_config
from densedet.data import make_synthetic_coco
from densedet.engine.checkpoint import save_checkpoint
from densedet.errors import EXIT_CODES, CheckpointError, ConfigError, DataError, NonFiniteError
from densedet.models.build import build_detector

TINY = [
    "model.backbone.base_channels=8", "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
    "model.bbox_head.in_channels=16", "model.bbox_head.feat_channels=16", "model.bbox_head.stacked_convs=1",
    "model.bbox_head.norm_cfg={type: GN, num_groups: 4}", "data.samples_per_gpu=4", "data.workers_per_gpu=0",
    "data.train.pipeline=[{type: Resize, img_scale: [64, 64]}]",
    "data.val.pipeline=[{type: Resize, img_scale: [64, 64]}]",
    "schedule.epochs=1", "runtime.val_interval=0", "runtime.device=cpu",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust_cli")
    make_synthetic_coco(root, num_train=4, num_val=2, size=64, seed=0)
    return root


def _one_line_error(capsys, code: int, kind: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("densedet:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"densedet: {kind} error: "), err
    assert code in EXIT_CODES
    return lines[0]


@pytest.mark.parametrize("override, shown", [
    ("data.samples_per_gpu=two", "data.samples_per_gpu=two: must be an integer"),
    ("schedule.epochs=ten", "schedule.epochs=ten: must be an integer"),
    ("optimizer.lr=fast", "optimizer.lr=fast: must be a number"),
    ("runtime.log_interval=often", "runtime.log_interval=often: must be an integer"),
    ("optimizer.lr=-0.01", "optimizer.lr=-0.01: must be > 0"),  # as typed, not the auto-scaled -0.00125
    ("data.samples_per_gpu=0", "data.samples_per_gpu=0: must be >= 1"),
    ("optimizer=5", "optimizer=5: 'optimizer' must be a mapping"),
    ("schedule.epochs=-1", "schedule.epochs=-1: must be >= 0"),
    ("schedule.epochs=0", "schedule.epochs=0: must be >= 1 (0 only when a SWA phase follows"),
    ("optimizer.momentum=1.5", "optimizer.momentum=1.5: must be >= 0 and < 1"),
    ("runtime.amp=maybe", "runtime.amp=maybe: must be true or false"),
    ("schedule.steps=[8, eleven]", "schedule.steps=[8, eleven]: must be a list of integers"),
])
def test_bad_config_value_exits_2_naming_key_and_value(override, shown, capsys) -> None:
    assert main(["train", "atss_r18_fpn_synth", override]) == ConfigError.exit_code == 2
    line = _one_line_error(capsys, 2, "config")
    assert f"command-line override: {shown}" in line


@pytest.mark.parametrize("override, shown", [
    # model sections are plain mappings: their values are checked against the component's annotations
    ("model.bbox_head.num_classes=x", "model.bbox_head.num_classes='x': must be an integer (ATSSHead)"),
    ("model.neck.out_channels=abc", "model.neck.out_channels='abc': must be an integer (FPN)"),
    ("model.backbone.out_indices=[0,x]", "model.backbone.out_indices=[0, 'x']: must be a list of integers (ResNet)"),
    ("model.bbox_head.loss_cls.gamma=[2]", "model.bbox_head.loss_cls.gamma=[2]: must be a number (FocalLoss)"),
    # train_cfg / test_cfg: checked at load, not at the first assignment or the first validation an epoch later
    ("model.train_cfg.assigner.topk=0", "model.train_cfg.assigner.topk=0: must be >= 1"),
    ("model.train_cfg.assigner.topk=x", "model.train_cfg.assigner.topk='x': must be an integer (atss_assign)"),
    ("model.test_cfg.score_thr=high", "model.test_cfg.score_thr='high': must be a number (TestConfig)"),
    ("model.test_cfg.max_per_img=1.5", "model.test_cfg.max_per_img=1.5: must be an integer (TestConfig)"),
    ("model.test_cfg.nms.iou_threshold=abc", "model.test_cfg.nms.iou_threshold='abc': must be a number"),
])
def test_bad_model_value_exits_2_naming_key_and_value(override, shown, capsys) -> None:
    assert main(["train", "atss_r18_fpn_synth", override]) == 2
    assert f"command-line override: {shown}" in _one_line_error(capsys, 2, "config")


def test_value_a_component_rejects_names_its_section(capsys) -> None:
    # Right type, impossible value (a string where the anchor generator needs numbers): the constructor's own
    # error, attributed to the section, as one line.
    assert main(["train", "atss_r18_fpn_synth", "model.bbox_head.anchor_generator.ratios=fast"]) == 2
    assert "model.bbox_head: ATSSHead rejected its config" in _one_line_error(capsys, 2, "config")


def test_bad_value_in_a_config_file_names_the_file(tmp_path) -> None:
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("_base_: " + str(Path(load_config("atss_r18_fpn_synth", validate_model=False).source))
                   + "\nschedule: {epochs: ten}\n")
    with pytest.raises(ConfigError, match=rf"{cfg}: schedule\.epochs=ten: must be an integer"):
        load_config(cfg)


def test_float_written_without_a_dot_is_still_a_number() -> None:
    # PyYAML reads 1e-4 as a string; the typed check converts it instead of refusing a valid lr.
    assert load_config("atss_r18_fpn_synth", ["optimizer.lr=1e-4"], validate_model=False).optimizer.lr == 1e-4


def test_debug_flag_and_env_show_the_traceback(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="schedule.epochs=ten"):
        main(["--debug", "train", "atss_r18_fpn_synth", "schedule.epochs=ten"])
    with pytest.raises(ConfigError):
        main(["train", "atss_r18_fpn_synth", "schedule.epochs=ten", "--debug"])
    monkeypatch.setenv("DENSEDET_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(["train", "atss_r18_fpn_synth", "schedule.epochs=ten"])


def test_empty_training_set_exits_3_saying_why(tmp_path, capsys) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "train" / "a.png")
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 64}], "annotations": [],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]}))
    assert main(["train", "atss_r18_fpn_synth", "--work-dir", str(tmp_path / "w"), *TINY,
                 f"data.root={tmp_path}"]) == DataError.exit_code == 3
    line = _one_line_error(capsys, 3, "data")
    assert "training set is empty after filtering: all 1 images were dropped (1 without annotations" in line


class _Boom:
    """Unpickling this runs ``Path.touch(marker)``: what a malicious .pth file would do."""

    marker = Path("/nonexistent")

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_or_unsafe_pretrained_file_exits_4(data_root, tmp_path, capsys) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    unsafe = tmp_path / "unsafe.pth"
    marker = tmp_path / "ran"
    boom = _Boom()
    boom.marker = marker
    torch.save({"state_dict": {"w": boom}}, unsafe)
    for bad in (garbage, unsafe, tmp_path / "missing.pth"):
        code = main(["train", "atss_r18_fpn_synth", "--work-dir", str(tmp_path / "w"), *TINY,
                     f"data.root={data_root}", f"model.backbone.pretrained={bad}"])
        assert code == CheckpointError.exit_code == 4
        line = _one_line_error(capsys, 4, "checkpoint")
        assert f"pretrained checkpoint '{bad}'" in line
    assert not marker.exists()  # the unsafe file's code never ran


def test_non_finite_loss_exits_5_with_the_iteration(data_root, tmp_path, capsys) -> None:
    code = main(["train", "atss_r18_fpn_synth", "--work-dir", str(tmp_path), *TINY, f"data.root={data_root}",
                 "data.samples_per_gpu=1", "optimizer.lr=1e30", "optimizer.auto_scale_lr=false",
                 "schedule.warmup=null"])
    assert code == NonFiniteError.exit_code == 5
    line = _one_line_error(capsys, 5, "training")
    assert "non-finite total loss at epoch 1, iteration 2 (global iteration 2)" in line
    assert not list(tmp_path.glob("*.pth"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    cfg = load_config("atss_r18_fpn_synth", TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, build_detector({**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}}))
    return path


def test_predict_undecodable_file_error_or_counted_skip(tiny_ckpt, tmp_path, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (64, 48), (30, 60, 90)).save(folder / "good.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    args = ["atss_r18_fpn_synth", str(tiny_ckpt)]
    assert main(["predict", *args, str(folder / "broken.jpg"), "--out", str(tmp_path / "o1"), *TINY]) == 3
    assert "cannot decode image" in _one_line_error(capsys, 3, "data")
    assert main(["predict", *args, str(folder), "--out", str(tmp_path / "o2"), *TINY]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 of 3 files that could not be decoded: broken.jpg, empty.png" in captured.err
    assert "drew 1 images" in captured.out
    records = json.loads((tmp_path / "o2" / "predictions.json").read_text())
    assert [Path(r["file"]).name for r in records] == ["good.png"]


@pytest.mark.parametrize("content", [b"junk\n", b"PK\x03\x04" + bytes(range(256)) * 4, b""])
@pytest.mark.parametrize("command", ["convert", "test"])
def test_corrupt_checkpoint_file_is_one_line_exit_4(command, content, tmp_path, capsys) -> None:
    # Garbage that is not a zip/pickle torch file makes torch.load raise KeyError/IndexError/EOFError depending on
    # the bytes: every one is a checkpoint error naming the file, and convert writes nothing.
    bad = tmp_path / "bad.pth"
    bad.write_bytes(content)
    args = (["convert", str(bad), str(tmp_path / "out.pth")] if command == "convert"
            else ["test", "atss_r18_fpn_synth", str(bad)])
    assert main(args) == 4
    assert str(bad) in _one_line_error(capsys, 4, "checkpoint")
    assert not (tmp_path / "out.pth").exists()


def test_convert_checks_the_fit_before_writing(tiny_ckpt, tmp_path, capsys) -> None:
    state = torch.load(tiny_ckpt, weights_only=True)["state_dict"]
    release = tmp_path / "release.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if "atss_cls" not in k}}, release)
    dst = tmp_path / "out.pth"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("_base_: " + load_config("atss_r18_fpn_synth", validate_model=False).source + "\nmodel:\n"
                   "  backbone: {base_channels: 8}\n  neck: {in_channels: [16, 32, 64], out_channels: 16}\n"
                   "  bbox_head: {in_channels: 16, feat_channels: 16, stacked_convs: 1, "
                   "norm_cfg: {type: GN, num_groups: 4}}\n")
    assert main(["convert", str(release), str(dst), "--config", str(cfg)]) == 4
    line = _one_line_error(capsys, 4, "checkpoint")
    assert f"{release} (converted): the checkpoint does not fit" in line and "bbox_head.atss_cls.weight" in line
    assert not dst.exists() and not list(tmp_path.glob(".*.tmp"))
    torch.save({"state_dict": state}, release)
    assert main(["convert", str(release), str(dst), "--config", str(cfg)]) == 0 and dst.is_file()


def test_missing_checkpoint_exits_4(tmp_path, capsys) -> None:
    assert main(["test", "atss_r18_fpn_synth", str(tmp_path / "nope.pth")]) == 4
    assert "nope.pth" in _one_line_error(capsys, 4, "checkpoint")
    assert main(["test", "atss_r18_fpn_synth", str(tmp_path)]) == 4  # a work dir without checkpoints
    assert "no checkpoint in this work dir" in _one_line_error(capsys, 4, "checkpoint")
