"""`densedet predict`: the grid shows the documented number of tiles, enlarged; `--ann` / `--split` draw exactly
the annotation file's images with their boxes (issue 13, item 5)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import TINY_ATSS, val_resize

from densedet.cli import build_parser, main
from densedet.config import load_config
from densedet.data import SYNTH_CLASSES, make_synthetic_coco
from densedet.engine.checkpoint import save_checkpoint
from densedet.inference.draw_predictions import GRID_TILE_SIDE, GRID_TILES
from densedet.models.build import build_detector

REPO = Path(__file__).resolve().parent.parent
TINY = [*TINY_ATSS, "model.test_cfg.score_thr=0.0", val_resize(64)]
CFG = "atss_r18_fpn_synth"
GAP = 4  # save_detection_grid's gap between cells


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    ckpt = root / "model.pth"
    save_checkpoint(ckpt, build_detector(load_config(CFG, TINY).model), meta={"classes": list(SYNTH_CLASSES)})
    data = make_synthetic_coco(root / "data", num_train=1, num_val=3, size=96, seed=0)["root"]
    return ckpt, data


def _predict(ckpt: Path, *args: str) -> int:
    return main(["predict", CFG, str(ckpt), *args, *TINY])


def test_grid_default_matches_the_readme() -> None:
    stated = re.search(r"`grid\.png` shows (\d+)", (REPO / "README.md").read_text())
    assert stated and int(stated.group(1)) == GRID_TILES
    assert build_parser().parse_args(["predict", CFG, "ckpt", "imgs", "--out", "o"]).grid == GRID_TILES


def test_grid_shows_min_of_images_and_limit_tiles_enlarged(setup, tmp_path: Path) -> None:
    ckpt, _ = setup
    folder = tmp_path / "imgs"
    folder.mkdir()
    colours = [(20 * i, 255 - 15 * i, (60 * i) % 256) for i in range(14)]
    for i, c in enumerate(colours):
        Image.new("RGB", (64, 48), c).save(folder / f"img_{i:02d}.png")
    out = tmp_path / "out"
    assert _predict(ckpt, str(folder), "--out", str(out), "--score-thr", "1.0") == 0  # no box drawn: pure pixels
    assert len(json.loads((out / "predictions.json").read_text())) == 14
    assert Image.open(out / "img_13.png").size == (64, 48)  # per-image drawings keep the image's size
    side, tile_h = GRID_TILE_SIDE, GRID_TILE_SIDE * 48 // 64  # 64x48 enlarged to 480x360
    with Image.open(out / "grid.png") as grid:
        grid = grid.convert("RGB")
        assert grid.size == (4 * side + 3 * GAP, 3 * tile_h + 2 * GAP)  # 12 tiles, 4 per row
        for i in range(12):
            r, c = divmod(i, 4)
            for dx, dy in [(5, 5), (side - 6, tile_h - 6), (side // 2, tile_h // 2)]:  # the tile fills its cell
                assert grid.getpixel((c * (side + GAP) + dx, r * (tile_h + GAP) + dy)) == colours[i], (i, dx, dy)

    assert _predict(ckpt, str(folder), "--out", str(tmp_path / "two"), "--grid", "2", "--limit", "5") == 0
    assert Image.open(tmp_path / "two" / "grid.png").size == (2 * side + GAP, tile_h)
    assert _predict(ckpt, str(folder), "--out", str(tmp_path / "none"), "--grid", "0", "--limit", "1") == 0
    assert not (tmp_path / "none" / "grid.png").exists()


def test_ann_draws_exactly_its_images_with_their_boxes(setup, tmp_path: Path) -> None:
    ckpt, data = setup
    full = json.loads((data / "annotations" / "instances_val.json").read_text())
    chosen = [full["images"][2], full["images"][0]]  # a subset, in another order
    sub = {**full, "images": chosen,
           "annotations": [a for a in full["annotations"] if a["image_id"] in {im["id"] for im in chosen}]}
    ann = tmp_path / "sub.json"
    ann.write_text(json.dumps(sub))
    out = tmp_path / "out"
    assert _predict(ckpt, str(data / "val"), "--ann", str(ann), "--out", str(out), "--score-thr", "1.0") == 0
    records = json.loads((out / "predictions.json").read_text())
    assert [(Path(r["file"]).name, r["image_id"]) for r in records] == [(im["file_name"], im["id"]) for im in chosen]
    assert sorted(p.name for p in out.iterdir()) == sorted([im["file_name"] for im in chosen] +
                                                           ["grid.png", "predictions.json"])
    # Ground truth is drawn dashed white/black on each image's box edges, nothing else changes (no detections).
    im0 = chosen[0]
    drawn = np.asarray(Image.open(out / im0["file_name"]).convert("RGB")).astype(int)
    orig = np.asarray(Image.open(data / "val" / im0["file_name"]).convert("RGB")).astype(int)
    boxes = [a["bbox"] for a in sub["annotations"] if a["image_id"] == im0["id"]]
    assert boxes
    changed = (drawn != orig).any(axis=2)
    on_edge = np.zeros_like(changed)
    for x, y, w, h in boxes:
        x1, y1, x2, y2 = (round(v) for v in (x, y, x + w, y + h))
        on_edge[max(y1 - 1, 0):y2 + 2, max(x1 - 1, 0):x1 + 2] = on_edge[max(y1 - 1, 0):y2 + 2, x2 - 1:x2 + 2] = True
        on_edge[max(y1 - 1, 0):y1 + 2, max(x1 - 1, 0):x2 + 2] = on_edge[y2 - 1:y2 + 2, max(x1 - 1, 0):x2 + 2] = True
    assert changed.any() and not (changed & ~on_edge).any()
    colours = {tuple(v) for v in drawn[changed]}
    assert colours <= {(255, 255, 255), (0, 0, 0)} and len(colours) == 2


def test_split_draws_the_configs_split(setup, tmp_path: Path, capsys) -> None:
    ckpt, data = setup
    out = tmp_path / "out"
    assert _predict(ckpt, "--split", "val", f"data.root={data}", "--out", str(out)) == 0
    records = json.loads((out / "predictions.json").read_text())
    val = json.loads((data / "annotations" / "instances_val.json").read_text())
    assert [r["image_id"] for r in records] == [im["id"] for im in val["images"]] == [1, 2, 3]
    assert "drew 3 images" in capsys.readouterr().out

    assert _predict(ckpt, str(data / "val"), "--split", "val", f"data.root={data}", "--out", str(out)) == 2
    assert "not both" in capsys.readouterr().err
    assert _predict(ckpt, "--out", str(out)) == 2
    assert "not neither" in capsys.readouterr().err


def test_ann_with_a_missing_image_names_it(setup, tmp_path: Path, capsys) -> None:
    ckpt, data = setup
    full = json.loads((data / "annotations" / "instances_val.json").read_text())
    full["images"][1]["file_name"] = "gone.png"
    ann = tmp_path / "bad.json"
    ann.write_text(json.dumps(full))
    assert _predict(ckpt, str(data / "val"), "--ann", str(ann), "--out", str(tmp_path / "o")) == 3
    assert "gone.png" in capsys.readouterr().err
