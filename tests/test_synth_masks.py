"""Synthetic set masks: each shape's segmentation reproduces its drawn (visible) pixels, and a with_mask dataset
loads them aligned with the boxes."""

from __future__ import annotations

import warnings

import numpy as np

from densedet.data import CocoDataset, make_synthetic_coco
from densedet.data.coco import DataWarning
from densedet.data.mask_loading import POLYGON, RLE, RLE_UNCOMPRESSED
from densedet.data.synth import _render
from densedet.structures.masks import InstanceMasks, PolygonMask, decode_segmentation


def test_segmentations_match_drawn_pixels():
    """One shape, no noise: squares and circles are exact, triangles' polygons cover the drawn pixels to IoU >= 0.85
    (the slanted edges rasterise differently in Pillow and in COCO's polygon filler)."""
    rng = np.random.default_rng(3)
    kinds = {0: 0, 1: 0, 2: 0}
    for _ in range(40):
        state = rng.bit_generator.state
        img, objects = _render(rng, 96, 1, noise=False)
        rng_bg = np.random.default_rng()
        rng_bg.bit_generator.state = state
        background, _ = _render(rng_bg, 96, 0, noise=False)
        drawn = (img != background).any(axis=2)
        obj = objects[0]
        cls = obj["category_id"] - 1
        kinds[cls] += 1
        item = decode_segmentation(obj["segmentation"], 96, 96)
        assert isinstance(item, PolygonMask) == (cls != 0)
        got = InstanceMasks([item], 96, 96).to_full(0).astype(bool)
        if cls in (0, 1):
            np.testing.assert_array_equal(got, drawn)
        else:
            assert (got & drawn).sum() / (got | drawn).sum() >= 0.85
    assert min(kinds.values()) > 0


def test_occluded_shapes_get_exact_visible_rle(tmp_path):
    paths = make_synthetic_coco(tmp_path / "s", num_train=12, num_val=0, size=96, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        ds = CocoDataset(paths["train_ann_file"], paths["train_img_dir"], [], with_mask=True)
    kinds = set()
    for i in range(len(ds)):
        item = ds[i]
        masks = item["masks"]
        assert len(masks) == len(item["boxes"])
        for k, box in enumerate(item["boxes"].numpy()):
            full = masks.to_full(k)
            ys, xs = np.nonzero(full)
            assert xs.min() >= box[0] - 1 and xs.max() + 1 <= box[2] + 1  # inside its box
            assert ys.min() >= box[1] - 1 and ys.max() + 1 <= box[3] + 1
    names = {POLYGON: "polygon", RLE: "compressed RLE", RLE_UNCOMPRESSED: "uncompressed RLE"}
    kinds = {names[int(k)] for k in ds.store.masks.kinds}
    assert kinds == {"polygon", "compressed RLE", "uncompressed RLE"}  # squares/triangles, circles, occluded
