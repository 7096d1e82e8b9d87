"""Synthetic shapes dataset: determinism, content coverage, COCO validity."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densedet.data import CocoDataset, make_synthetic_coco
from densedet.data.synth import _render


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.*"))}


@pytest.fixture(scope="module")
def default_synth(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth_default"))  # 200 + 50 images of 320 px


def test_paths_and_layout(default_synth):
    paths = default_synth
    root = paths["root"]
    assert paths["train_ann_file"] == root / "annotations" / "instances_train.json"
    assert paths["val_ann_file"] == root / "annotations" / "instances_val.json"
    assert len(list(paths["train_img_dir"].glob("*.png"))) == 200
    assert len(list(paths["val_img_dir"].glob("*.png"))) == 50
    with Image.open(next(paths["val_img_dir"].glob("*.png"))) as im:
        assert im.size == (320, 320) and im.mode == "RGB"


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", num_train=12, num_val=6, size=160, seed=3)
    b = make_synthetic_coco(tmp_path / "b", num_train=12, num_val=6, size=160, seed=3)
    c = make_synthetic_coco(tmp_path / "c", num_train=12, num_val=6, size=160, seed=4)
    assert _digest(a["root"]) == _digest(b["root"])
    assert a["train_ann_file"].read_bytes() == b["train_ann_file"].read_bytes()
    assert a["train_ann_file"].read_bytes() != c["train_ann_file"].read_bytes()
    assert (a["train_img_dir"] / "000001.png").read_bytes() != (c["train_img_dir"] / "000001.png").read_bytes()


def test_content_coverage(default_synth):
    paths = default_synth
    train = json.loads(paths["train_ann_file"].read_text())
    boxes = np.array([a["bbox"] for a in train["annotations"]])
    sides = np.minimum(boxes[:, 2], boxes[:, 3])
    assert sides.min() < 12 and np.maximum(boxes[:, 2], boxes[:, 3]).max() > 320 / 3
    # log-uniform sizes: every FPN level's range (strides 8..128, ~4-8 x stride) gets objects
    for lo, hi in [(8, 32), (32, 64), (64, 128), (128, 161)]:
        assert ((sides >= lo) & (sides < hi)).sum() >= 10, (lo, hi)
    assert {a["category_id"] for a in train["annotations"]} == {1, 2, 3}
    assert [c["name"] for c in train["categories"]] == ["circle", "square", "triangle"]
    per_image = np.bincount([a["image_id"] for a in train["annotations"]], minlength=201)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 8
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 320).all()
    assert (boxes[:, 1] + boxes[:, 3] <= 320).all()
    assert all(a["iscrowd"] == 0 and 0 < a["area"] <= a["bbox"][2] * a["bbox"][3] for a in train["annotations"])
    assert len({a["id"] for a in train["annotations"]}) == len(train["annotations"])

    val = json.loads(paths["val_ann_file"].read_text())
    with_objects = {a["image_id"] for a in val["annotations"]}
    n_empty = sum(img["id"] not in with_objects for img in val["images"])
    assert 1 <= n_empty <= 5  # about 5% of 50


def test_loads_cleanly_as_coco_dataset(default_synth):
    paths = default_synth
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train = CocoDataset(paths["train_ann_file"], paths["train_img_dir"])
        val = CocoDataset(paths["val_ann_file"], paths["val_img_dir"], test_mode=True)
    assert len(train) == 200 and len(val) == 50
    assert train.classes == ["circle", "square", "triangle"]
    assert train[0]["img"].shape == (3, 320, 320)


def test_boxes_match_drawn_pixels():
    """Render one shape without noise and the same background alone: the changed pixels span exactly the box."""
    rng = np.random.default_rng(11)
    for _ in range(40):
        state = rng.bit_generator.state
        img, objects = _render(rng, 96, 1, noise=False)
        rng_bg = np.random.default_rng()
        rng_bg.bit_generator.state = state  # same draws for the background, then no shape
        background, none = _render(rng_bg, 96, 0, noise=False)
        assert none == [] and len(objects) == 1
        ys, xs = np.nonzero((img != background).any(axis=2))
        x, y, w, h = objects[0]["bbox"]
        assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (x, y, w, h)
        assert objects[0]["area"] == len(xs)  # nothing occludes it: all drawn pixels visible


def test_heavily_occluded_annotations_are_dropped():
    rng = np.random.default_rng(0)
    drawn = kept = 0
    for _ in range(60):
        n = int(rng.integers(6, 9))
        _, objects = _render(rng, 64, n)  # crowded small images: many overlaps
        drawn += n
        kept += len(objects)
        for obj in objects:
            w, h = obj["bbox"][2], obj["bbox"][3]
            assert obj["area"] >= 0.3 * 0.5 * w * h * 0.8  # >= 30% of the smallest shape (triangle ~ w*h/2)
    assert kept < drawn  # some were hidden more than 70%
