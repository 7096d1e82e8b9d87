"""OS errors the `densedet` command meets (issue 18 item 4) are one line naming the path, with the kind's exit code
(4 weights / .onnx, 3 data, 2 config and paths), never a traceback: read-only or missing output folders found
*before* the long work, a file where a folder should be, a full disk, a truncated or foreign .onnx, and a
$DENSEDET_HOME that is a file or read-only. Read-only folders are real (chmod) for a normal user and a simulated
read-only mount when the tests run as root (tests/readonly_fs.py)."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from own_data_helpers import synth_as_voc
from PIL import Image
from readonly_fs import make_read_only

import densedet.api
from densedet.cli import _user_error_exit, main
from densedet.config import load_config
from densedet.deploy.runtime import OnnxDetector
from densedet.engine.checkpoint import save_checkpoint
from densedet.errors import CheckpointError, PathError
from densedet.io import atomic_torch_save, atomic_write, ensure_writable_dir
from densedet.models.build import build_detector

TINY = ["model.backbone.base_channels=8", "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
        "model.bbox_head.in_channels=16", "model.bbox_head.feat_channels=16", "model.bbox_head.stacked_convs=1",
        "model.bbox_head.norm_cfg={type: GN, num_groups: 4}", "model.backbone.pretrained=null"]
NOT_WRITABLE = ("read-only file system", "permission denied")


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEDET_HOME", str(tmp_path / "home"))


def _one_line(capsys, kind: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("densedet:")]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"densedet: {kind} error: "), err
    return lines[0]


@pytest.fixture
def no_export(monkeypatch):
    """Fail the test if the export's real work (loading the model) starts."""
    def boom(*args, **kwargs):
        raise AssertionError("the export ran before its --out was checked")
    monkeypatch.setattr(densedet.api, "load_detector", boom)


def test_export_into_read_only_folder_fails_before_exporting(tmp_path, monkeypatch, request, capsys,
                                                             no_export) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    make_read_only(ro, monkeypatch, request)
    assert main(["export", "atss_r18_fpn_synth", "--out", str(ro / "m.onnx"), *TINY]) == 2
    line = _one_line(capsys, "path")
    assert f"the folder of --out {ro} cannot be written" in line and any(r in line for r in NOT_WRITABLE)
    assert not list(ro.iterdir())


def test_export_out_under_a_file_or_onto_a_folder_is_a_path_error(tmp_path, capsys, no_export) -> None:
    (tmp_path / "afile").write_text("x")
    assert main(["export", "atss_r18_fpn_synth", "--out", str(tmp_path / "afile" / "m.onnx"), *TINY]) == 2
    line = _one_line(capsys, "path")
    assert f"{tmp_path / 'afile'} cannot be written: already exists and is not a folder" in line
    assert main(["export", "atss_r18_fpn_synth", "--out", str(tmp_path / "afile" / "sub" / "m.onnx"), *TINY]) == 2
    assert "a part of the path is a file, not a folder" in _one_line(capsys, "path")
    (tmp_path / "dir.onnx").mkdir()
    assert main(["export", "atss_r18_fpn_synth", "--out", str(tmp_path / "dir.onnx"), *TINY]) == 2
    assert "is a folder; give the .onnx file to write" in _one_line(capsys, "path")
    with pytest.raises(PathError, match="cannot be written"):  # the Python API checks first too
        densedet.api.export("atss_r18_fpn_synth", None, tmp_path / "afile" / "m.onnx", overrides=TINY)


def _onnx_bytes() -> bytes:
    """A small valid ONNX model (an Add with a 4000-float initializer), so truncating it cuts a field."""
    w = numpy_helper.from_array(np.arange(4000, dtype=np.float32).reshape(1, 4000), "w")
    graph = helper.make_graph([helper.make_node("Add", ["images", "w"], ["boxes"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 4000])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 4000])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.mark.parametrize("kind", ["truncated", "foreign"])
def test_truncated_or_foreign_onnx_is_a_checkpoint_error(kind, tmp_path, capsys) -> None:
    data = _onnx_bytes()
    good = tmp_path / "ok.onnx"
    good.write_bytes(data)
    assert OnnxDetector(good).output_names == ["boxes"]  # the untruncated file loads
    bad = tmp_path / "model.onnx"
    bad.write_bytes(data[: len(data) // 2] if kind == "truncated" else b"PK\x03\x04" + bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=r"model\.onnx: not a readable ONNX model"):
        OnnxDetector(bad)
    assert main(["test", "atss_r18_fpn_synth", str(bad), *TINY]) == 4
    assert str(bad) in _one_line(capsys, "checkpoint")
    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    assert main(["predict", "atss_r18_fpn_synth", str(bad), str(tmp_path / "img.png"), "--out",
                 str(tmp_path / "pred"), *TINY]) == 4
    assert str(bad) in _one_line(capsys, "checkpoint")


def test_work_dir_and_results_folder_are_checked_before_the_work(tmp_path, monkeypatch, request, capsys) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    make_read_only(ro, monkeypatch, request)
    assert main(["train", "atss_r18_fpn_synth", "--work-dir", str(ro / "wd"), *TINY]) == 2
    line = _one_line(capsys, "path")
    assert f"the work dir {ro / 'wd'} cannot be written" in line and "Choose another --work-dir" in line
    ckpt = tmp_path / "nope.pth"  # checked after --out: the out error comes first
    assert main(["test", "atss_r18_fpn_synth", str(ckpt), "--out", str(ro / "res"), *TINY]) == 2
    assert f"the results folder (--out) {ro / 'res'} cannot be written" in _one_line(capsys, "path")


def test_densedet_home_a_file_or_read_only_is_a_clear_error(tmp_path, monkeypatch, request, capsys) -> None:
    voc = synth_as_voc(tmp_path / "voc", 2, 1, 64)
    home_file = tmp_path / "homefile"
    home_file.write_text("not a folder")
    monkeypatch.setenv("DENSEDET_HOME", str(home_file))
    assert main(["data", "check", str(voc), "--out", str(tmp_path / "c.png")]) == 2
    line = _one_line(capsys, "path")
    assert str(home_file) in line and "a part of the path is a file, not a folder" in line
    assert "set DENSEDET_HOME to a writable folder" in line.lower() or "Set DENSEDET_HOME" in line
    ro_home = tmp_path / "ro_home"
    ro_home.mkdir()
    make_read_only(ro_home, monkeypatch, request)
    monkeypatch.setenv("DENSEDET_HOME", str(ro_home))
    assert main(["data", "check", str(voc), "--out", str(tmp_path / "c.png")]) == 2
    line = _one_line(capsys, "path")
    assert str(ro_home) in line and any(r in line for r in NOT_WRITABLE)


def test_read_only_home_with_a_converted_dataset_still_works(tmp_path, monkeypatch, request) -> None:
    from densedet.data.formats import prepare_dataset

    voc = synth_as_voc(tmp_path / "voc", 2, 1, 64)
    first = prepare_dataset(voc)
    make_read_only(tmp_path / "home", monkeypatch, request)
    again = prepare_dataset(voc)  # the cached conversion is only read
    assert again.splits["train"].ann_file == first.splits["train"].ann_file


def test_disk_full_names_the_file(tmp_path) -> None:
    """A real ENOSPC (/dev/full) inside an atomic write: a path error naming the target, the old file kept."""
    target = tmp_path / "epoch_1.pth"
    target.write_bytes(b"previous")

    def write(tmp: Path) -> None:
        with open("/dev/full", "wb") as f:
            f.write(b"x" * 65536)
            f.flush()

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with pytest.raises(PathError, match=r"cannot write .*epoch_1\.pth: no space left on the device"):
        atomic_write(target, write)
    assert target.read_bytes() == b"previous" and not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "afile").write_text("")
    with pytest.raises(PathError, match=r"cannot write .*sub\.pth: its folder .*afile cannot be created"):
        atomic_torch_save({"x": 1}, tmp_path / "afile" / "sub.pth")  # checkpoints take the same path


@pytest.mark.parametrize("err, code, kind, shown", [
    (OSError(errno.ENOSPC, "No space left on device", "/w/epoch_3.pth"), 2, "path", "/w/epoch_3.pth: no space left"),
    (PermissionError(errno.EACCES, "Permission denied", "/w/model.onnx"), 4, "checkpoint", "/w/model.onnx: permission"),
    (PermissionError(errno.EACCES, "Permission denied", "/d/ann.json"), 3, "data", "/d/ann.json: permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/c/cfg.yaml"), 2, "config", "/c/cfg.yaml: is a folder"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/x/file/out"), 2, "path", "a part of the path is a file"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/photo"), 3, "input", "/in/photo: no such"),
    (OSError(errno.EIO, "Input/output error", "/w/last.pth"), 4, "checkpoint", "input/output error"),
])
def test_any_os_error_reaching_the_cli_is_one_line(err, code, kind, shown, capsys) -> None:
    assert _user_error_exit(err, debug=False) == code
    line = _one_line(capsys, kind)
    assert shown in line
    assert _user_error_exit(err, debug=True) is None  # --debug: re-raised with its traceback


def test_ensure_writable_dir_creates_and_names(tmp_path) -> None:
    assert ensure_writable_dir(tmp_path / "a" / "b", "the thing") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())  # the probe is gone
    (tmp_path / "f").write_text("")
    with pytest.raises(PathError, match=r"the thing .*f cannot be written: already exists and is not a folder"):
        ensure_writable_dir(tmp_path / "f", "the thing")


def test_unlistable_image_folder_is_a_data_error(tmp_path, monkeypatch, capsys) -> None:
    """A folder given to predict that cannot be listed (no read permission: simulated, root lists anything) is a
    data error naming it."""
    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(ckpt, build_detector(load_config("atss_r18_fpn_synth", TINY).model))
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert main(["predict", "atss_r18_fpn_synth", str(ckpt), str(folder), "--out", str(tmp_path / "p"), *TINY]) == 3
    assert f"{folder}: cannot list the image folder: permission denied" in _one_line(capsys, "data")
