"""`densedet data check`: statistics and the head's assignment on constructed sets whose outcome is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densedet.analysis.data_check import data_check
from densedet.cli import main
from densedet.data.synth import make_synthetic_coco


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEDET_HOME", str(tmp_path / "home"))


def _coco_root(root: Path, images: list[list[tuple[list[float], int]]], size: int = 320) -> Path:
    """A COCO root whose train and val splits both hold ``images`` (boxes xyxy, category index)."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
        for i, boxes in enumerate(images):
            Image.new("RGB", (size, size)).save(root / split / f"{i}.png")
            coco["images"].append({"id": i + 1, "file_name": f"{i}.png", "width": size, "height": size})
            for b, c in boxes:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                            "category_id": c + 1, "iscrowd": 0,
                                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return root


def _fcos_expected(boxes: list[list[float]], strides=(8, 16, 32, 64, 128),
                   ranges=((-1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8)), size: int = 320) -> list[int]:
    """Positives per level by FCOS's rule without centre sampling, counted directly: locations
    ((i + 0.5) s, (j + 0.5) s) strictly inside a box whose largest side distance lies in the level's range
    (the boxes below are disjoint, so no location is contested)."""
    out = []
    for s, (lo, hi) in zip(strides, ranges):
        c = (np.arange(int(np.ceil(size / s))) + 0.5) * s
        xs, ys = np.meshgrid(c, c)
        n = 0
        for x1, y1, x2, y2 in boxes:
            d = np.stack([xs - x1, ys - y1, x2 - xs, y2 - ys])
            n += int(((d.min(0) > 0) & (d.max(0) >= lo) & (d.max(0) <= hi)).sum())
        out.append(n)
    return out


def test_fcos_assignment_counts_and_lost_objects(tmp_path) -> None:
    boxes = [[[5, 5, 11, 11], [100, 100, 300, 300]], [[2, 2, 6, 6], [20, 150, 60, 170], [200, 10, 201, 11]]]
    root = _coco_root(tmp_path / "d", [[(b, 0) for b in im] for im in boxes])
    text, png, res = data_check(root, "fcos_r18_fpn_synth", out_png=tmp_path / "c.png",
                                overrides=["model.bbox_head.center_sampling=false"])
    rep = res["assignment"]
    assert rep.pos_per_level == _fcos_expected([b for im in boxes for b in im])
    # [5,5,11,11] and [200,10,201,11] contain no location centre (4, 12, ...) and are smaller than a P3 cell
    assert rep.num_objects == 5 and dict(rep.lost) == {"too small": 2}
    assert rep.pos_per_image.tolist() == [sum(_fcos_expected(boxes[0])), sum(_fcos_expected(boxes[1]))]
    assert "objects without any positive: 2 of 5 (2 too small)" in text
    assert png.is_file() and png.stat().st_size > 1000


def test_stats_count_classes_duplicates_and_empty_images(tmp_path) -> None:
    images = [[([10, 10, 50, 50], 0), ([11, 10, 50, 50], 0), ([10, 10, 50, 50], 1)], [], [([0, 0, 300, 20], 1)]]
    root = _coco_root(tmp_path / "d", images)
    _, _, res = data_check(root, out_png=tmp_path / "s.png")
    st = res["stats"][0]
    assert st.num_images == 3 and st.images_without_boxes == 1
    assert st.boxes_per_class == [2, 2] and st.images_per_class == [1, 2]
    assert st.duplicate_boxes == 1  # same class IoU 0.975; the class-1 box at the same place is no duplicate
    assert st.duplicate_images == 2  # three identical black PNGs
    assert np.allclose(np.sort(st.sizes), np.sort([40.0, np.sqrt(39 * 40), 40.0, np.sqrt(300 * 20)]))
    assert np.allclose(st.relative_sizes, st.sizes / 320)  # 320x320 images
    assert res["assignment"] is None


def test_synthetic_set_at_320_leaves_p5_to_p7_empty(tmp_path, capsys) -> None:
    """The issue's observation: COCO anchor scales (ATSS octave_base_scale 8 -> anchors 64-1024 px) on the 320 px
    synthetic shapes (8-160 px) give P5-P7 no positives; the check says so and suggests a smaller scale."""
    root = make_synthetic_coco(tmp_path / "synth", num_train=24, num_val=4, size=320, seed=0)["root"]
    assert main(["data", "check", str(root), "--config", "atss_r18_fpn_synth", "--out",
                 str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "levels without any positive: P5, P6, P7" in out
    assert "octave_base_scale=" in out and (tmp_path / "a.png").is_file()
    _, _, res = data_check(root, "atss_r18_fpn_synth", out_png=tmp_path / "b.png")
    rep = res["assignment"]
    assert rep.pos_per_level[2:] == [0, 0, 0] and rep.pos_per_level[0] > 0
    # with the suggested smaller anchors the upper levels get positives
    base = int(rep.suggestions[1].split("octave_base_scale=")[1].split()[0])
    _, _, res2 = data_check(root, "atss_r18_fpn_synth", out_png=tmp_path / "c.png",
                            overrides=[f"model.bbox_head.anchor_generator.octave_base_scale={base}"])
    assert sum(res2["assignment"].pos_per_level[2:]) > 0
