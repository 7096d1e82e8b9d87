"""The synthetic set is never written over a user's data: `data.auto_create` and `densedet data synth` write only
into a missing or empty folder or over a previous synthetic set (issue 13, item 1)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tiny_models import TINY_ATSS, val_resize

from densedet.cli import main
from densedet.data import DataError, make_synthetic_coco
from densedet.data.synth import SYNTH_MARKER, check_auto_create, synthetic_target_problem

TINY = [
    *TINY_ATSS, "data.samples_per_gpu=2", "data.workers_per_gpu=0", val_resize(64),
    "data.train.pipeline=[{type: Resize, img_scale: [64, 64]}]",
    "data.synth={num_train: 4, num_val: 2, size: 64, seed: 0}", "schedule.epochs=1", "schedule.max_iters=1",
    "runtime.val_interval=0", "runtime.device=cpu",
]


def snapshot(root: Path) -> dict[str, str | None]:
    """Every entry below ``root``: files by SHA-256, folders as None (so new folders are noticed too)."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def user_dataset(root: Path) -> Path:
    """A user's dataset whose training json is misnamed: images + a val json + a train json under another name."""
    (root / "images").mkdir(parents=True)
    for i in range(3):
        (root / "images" / f"photo_{i}.jpg").write_bytes(bytes(range(i, 200 + i)))
    (root / "annotations").mkdir()
    user_json = {"images": [{"id": 1, "file_name": "photo_0.jpg", "width": 10, "height": 10}], "annotations": [],
                 "categories": [{"id": 1, "name": "cat"}]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(user_json))
    (root / "annotations" / "train.json").write_text(json.dumps(user_json))
    return root


def test_train_leaves_a_user_root_byte_identical_and_names_the_missing_file(tmp_path, capsys) -> None:
    root = user_dataset(tmp_path / "mydata")
    before = snapshot(root)
    work = tmp_path / "work"
    assert main(["train", "atss_r18_fpn_synth", "--work-dir", str(work), f"data.root={root}", *TINY]) == 3
    err = capsys.readouterr().err
    assert str(root / "annotations" / "instances_train.json") in err and "nothing was written" in err
    assert snapshot(root) == before


def test_misnamed_ann_file_in_an_empty_root_is_an_error_not_a_synthetic_set(tmp_path, capsys) -> None:
    root = tmp_path / "fresh"
    work = tmp_path / "work"
    assert main(["train", "atss_r18_fpn_synth", "--work-dir", str(work), f"data.root={root}",
                 "data.train.ann_file=annotations/my_train.json", *TINY]) == 3
    assert str(root / "annotations" / "my_train.json") in capsys.readouterr().err
    assert not root.exists()


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_train_creates_the_synthetic_set_in_a_missing_or_empty_root(tmp_path, state) -> None:
    root = tmp_path / "synth"
    if state == "empty":
        root.mkdir()
    assert main(["train", "atss_r18_fpn_synth", "--work-dir", str(tmp_path / "work"), f"data.root={root}",
                 *TINY]) == 0
    expected = make_synthetic_coco(tmp_path / "reference", num_train=4, num_val=2, size=64, seed=0)["root"]
    assert snapshot(root) == snapshot(expected)  # the configured set, whole, and nothing else


def test_make_synthetic_coco_refuses_a_folder_with_other_files(tmp_path) -> None:
    root = user_dataset(tmp_path / "mydata")
    before = snapshot(root)
    with pytest.raises(DataError, match="refusing to write the synthetic dataset into .*mydata"):
        make_synthetic_coco(root, num_train=2, num_val=1, size=32)
    assert snapshot(root) == before
    with pytest.raises(DataError, match="instances_train.json"):
        check_auto_create(root, root / "annotations" / "instances_train.json")
    # force writes the set beside the user's files, which stay as they were
    make_synthetic_coco(root, num_train=2, num_val=1, size=32, force=True)
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before and k != "annotations/instances_val.json"} == \
        {k: v for k, v in before.items() if k != "annotations/instances_val.json"}
    assert "train/000001.png" in after


def test_cli_synth_refuses_then_force(tmp_path, capsys) -> None:
    root = user_dataset(tmp_path / "mydata")
    before = snapshot(root)
    args = ["data", "synth", "--out", str(root), "--num-images", "2", "--num-val", "1", "--size", "32"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert str(root) in err and "--force" in err and "train.json" in err
    assert snapshot(root) == before
    assert main([*args, "--force"]) == 0
    assert (root / "annotations" / "instances_train.json").is_file()


def test_rewriting_a_previous_synthetic_set_is_allowed_and_exact(tmp_path) -> None:
    root = tmp_path / "synth"
    make_synthetic_coco(root, num_train=5, num_val=3, size=32, seed=1)
    assert synthetic_target_problem(root) is None
    make_synthetic_coco(root, num_train=2, num_val=1, size=32, seed=2)  # smaller: the old extra images go
    fresh = make_synthetic_coco(tmp_path / "fresh", num_train=2, num_val=1, size=32, seed=2)["root"]
    assert snapshot(root) == snapshot(fresh)


def test_a_synthetic_set_edited_or_extended_by_hand_is_no_longer_overwritten(tmp_path) -> None:
    root = tmp_path / "synth"
    make_synthetic_coco(root, num_train=2, num_val=1, size=32)
    (root / "train" / "000001.png").write_bytes(b"my own image now")
    assert "000001.png was changed" in synthetic_target_problem(root)
    with pytest.raises(DataError):
        make_synthetic_coco(root, num_train=2, num_val=1, size=32)
    assert (root / "train" / "000001.png").read_bytes() == b"my own image now"

    other = tmp_path / "synth2"
    make_synthetic_coco(other, num_train=2, num_val=1, size=32)
    (other / "train" / "extra.jpg").write_bytes(b"x")
    assert "train/extra.jpg" in synthetic_target_problem(other)


def test_interrupted_and_pre_marker_synthetic_sets_are_recognised(tmp_path) -> None:
    # Interrupted: the marker (written first, incomplete) lists the planned files; a partial set may be redone.
    root = tmp_path / "partial"
    make_synthetic_coco(root, num_train=3, num_val=2, size=32)
    marker = json.loads((root / SYNTH_MARKER).read_text())
    marker["complete"] = False
    (root / SYNTH_MARKER).write_text(json.dumps(marker))
    (root / "annotations" / "instances_val.json").unlink()
    (root / "train" / "000003.png").write_bytes(b"half-written")
    assert synthetic_target_problem(root) is None
    make_synthetic_coco(root, num_train=3, num_val=2, size=32)
    assert snapshot(root) == snapshot(make_synthetic_coco(tmp_path / "fresh", num_train=3, num_val=2,
                                                          size=32)["root"])

    # Written before the marker existed (DenseDet 0.1.0, e.g. an earlier `make demo`): recognised by its jsons.
    legacy = tmp_path / "legacy"
    make_synthetic_coco(legacy, num_train=2, num_val=1, size=32)
    (legacy / SYNTH_MARKER).unlink()
    assert synthetic_target_problem(legacy) is None
    (legacy / "notes.txt").write_text("mine")
    assert "notes.txt" in synthetic_target_problem(legacy)


def test_target_states(tmp_path) -> None:
    assert synthetic_target_problem(tmp_path / "missing") is None
    assert synthetic_target_problem(tmp_path) is None  # empty
    (tmp_path / "f").write_text("x")
    assert synthetic_target_problem(tmp_path / "f") == "is not a folder"
    assert synthetic_target_problem(tmp_path) == ("holds files (f) and no DenseDet synthetic "
                                                  "annotations/instances_train.json, so they are not a synthetic set")
