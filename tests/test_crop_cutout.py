"""RandomCrop and CutOut (mmdet 2.x semantics with VarifocalNet's crop_p / cutout_p): hand examples with a scripted
generator (window -> boxes shifted, clipped, dropped; holes at the right pixels), then properties with real ones."""

from __future__ import annotations

import numpy as np
import pytest

from densedet.data.transforms import CutOut, RandomCrop, build_pipeline
from densedet.registry import ConfigError

H, W = 100, 120


class ScriptedRng:
    """Stands in for ``numpy.random.Generator``: returns scripted values and records the requested bounds."""

    def __init__(self, randoms: list, integers: list[int]) -> None:
        self.randoms, self.ints, self.calls = list(randoms), list(integers), []

    def random(self, size=None):
        value = self.randoms.pop(0)
        return np.asarray(value, dtype=np.float64) if size is not None else value

    def integers(self, low, high=None):
        self.calls.append((low, high))
        value = self.ints.pop(0)
        assert low <= value < high, (value, low, high)
        return value


def _sample(boxes, labels=None, ignore=None) -> dict:
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.uint8)  # pixel (y, x) holds (y, x, 0)
    img.setflags(write=False)  # decoded / resized images may be read-only
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return {"img": img, "boxes": boxes,
            "labels": np.asarray(labels if labels is not None else np.arange(1, len(boxes) + 1), dtype=np.int64),
            "ignore_boxes": np.asarray(ignore if ignore is not None else [], dtype=np.float32).reshape(-1, 4),
            "meta": {"ori_shape": (H, W), "img_shape": (H, W), "scale_factor": (1.0, 1.0), "flip": False}}


BOXES = [[35, 15, 50, 30],    # inside the window: shifted only
         [0, 0, 40, 20],      # overlaps the top-left corner: clipped
         [100, 60, 110, 90],  # right of the window: zero width after clipping -> dropped
         [80, 45, 95, 55]]    # crosses the bottom-right corner: clipped


def test_absolute_crop_shifts_clips_and_drops_boxes() -> None:
    crop = RandomCrop(crop_size=(40, 60), crop_type="absolute")  # (h, w)
    rng = ScriptedRng([0.0], [10, 30])  # proceed; y1 = 10, x1 = 30
    out = crop(_sample(BOXES, ignore=[[0, 90, 10, 99], [40, 20, 45, 25]]), rng)
    assert rng.calls == [(0, H - 40 + 1), (0, W - 60 + 1)]  # offsets uniform over every window inside the image
    assert out["img"].shape == (40, 60, 3) and out["meta"]["img_shape"] == (40, 60)
    assert tuple(out["img"][0, 0, :2]) == (10, 30) and tuple(out["img"][39, 59, :2]) == (49, 89)
    np.testing.assert_array_equal(out["boxes"], [[5, 5, 20, 20], [0, 0, 10, 10], [50, 35, 60, 40]])
    np.testing.assert_array_equal(out["labels"], [1, 2, 4])
    np.testing.assert_array_equal(out["ignore_boxes"], [[10, 10, 15, 15]])  # the first one fell below the window
    assert out["meta"]["ori_shape"] == (H, W)


def test_without_border_clipping_boxes_are_only_shifted() -> None:
    crop = RandomCrop(crop_size=(40, 60), crop_type="absolute", bbox_clip_border=False)
    out = crop(_sample(BOXES), ScriptedRng([0.0], [10, 30]))
    # mmdet keeps every box with positive size, even one lying outside the window
    np.testing.assert_array_equal(out["boxes"], [[5, 5, 20, 20], [-30, -10, 10, 10], [70, 50, 80, 80],
                                                 [50, 35, 65, 45]])


def test_negative_crop_is_redrawn_then_skipped() -> None:
    crop = RandomCrop(crop_size=(20, 20), crop_type="absolute")
    # first window (y1=0, x1=0) misses the box; the second (y1=50, x1=60) holds it
    out = crop(_sample([[65, 55, 75, 65]]), ScriptedRng([0.0], [0, 0, 50, 60]))
    np.testing.assert_array_equal(out["boxes"], [[5, 5, 15, 15]])
    # every window misses: the sample stays whole
    misses = [0, 0] * RandomCrop.max_retries
    out = crop(_sample([[65, 55, 75, 65]]), ScriptedRng([0.0], misses))
    assert out["img"].shape == (H, W, 3)
    np.testing.assert_array_equal(out["boxes"], [[65, 55, 75, 65]])
    # allow_negative_crop keeps the first window, with no boxes left
    allow = RandomCrop(crop_size=(20, 20), allow_negative_crop=True)
    out = allow(_sample([[65, 55, 75, 65]]), ScriptedRng([0.0], [0, 0]))
    assert out["img"].shape == (20, 20, 3) and out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)


def test_crop_sizes_of_each_crop_type() -> None:
    # relative_range: fractions crop_size + u * (1 - crop_size), then int(side * f + 0.5)
    crop = RandomCrop(crop_size=(0.75, 0.75), crop_type="relative_range", crop_p=0.5)
    assert crop.crop_hw(H, W, ScriptedRng([[0.5, 1.0]], [])) == (88, 120)  # 0.875 * 100 and 1.0 * 120
    assert crop.crop_hw(H, W, ScriptedRng([[0.0, 0.0]], [])) == (75, 90)
    assert RandomCrop(crop_size=(0.5, 0.3), crop_type="relative").crop_hw(H, W, None) == (50, 36)
    assert RandomCrop(crop_size=(200, 50), crop_type="absolute").crop_hw(H, W, None) == (100, 50)
    rng = ScriptedRng([], [70, 110])
    assert RandomCrop(crop_size=(60, 110), crop_type="absolute_range").crop_hw(H, W, rng) == (70, 110)
    assert rng.calls == [(60, 101), (60, 111)]  # each side uniform in [min(side, lo), min(side, hi)]


def test_crop_probability_and_determinism() -> None:
    crop = RandomCrop(crop_size=(0.5, 0.5), crop_type="relative_range", crop_p=0.5)
    shapes = []
    for seed in range(40):
        a = crop(_sample(BOXES), np.random.default_rng(seed))
        b = crop(_sample(BOXES), np.random.default_rng(seed))
        np.testing.assert_array_equal(a["img"], b["img"])  # a pure function of the generator's seed
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        shapes.append(a["img"].shape[:2])
        h, w = a["img"].shape[:2]
        assert 50 <= h <= H and 60 <= w <= W
        assert (a["boxes"][:, 0::2] <= w).all() and (a["boxes"][:, 1::2] <= h).all() and (a["boxes"] >= 0).all()
    uncropped = sum(s == (H, W) for s in shapes)
    assert 5 <= uncropped <= 35 and len(set(shapes)) > 10
    never = RandomCrop(crop_size=(0.5, 0.5), crop_type="relative", crop_p=0.0)
    assert all(never(_sample(BOXES), np.random.default_rng(s))["img"].shape == (H, W, 3) for s in range(10))


def test_cutout_fills_the_scripted_holes() -> None:
    cut = CutOut(n_holes=(1, 3), cutout_shape=[(4, 2), (8, 8)], fill_in=(7, 8, 9))
    # proceed; 2 holes; hole 1 at (x1=5, y1=3) shape #0 (w=4, h=2); hole 2 at (118, 98) shape #1, clipped
    rng = ScriptedRng([0.0], [2, 5, 3, 0, 118, 98, 1])
    sample = _sample(BOXES)
    before = sample["img"].copy()
    out = cut(sample, rng)
    assert rng.calls[0] == (1, 4)  # n_holes inclusive range
    mask = np.zeros((H, W), dtype=bool)
    mask[3:5, 5:9] = True
    mask[98:100, 118:120] = True
    assert (out["img"][mask] == [7, 8, 9]).all()
    np.testing.assert_array_equal(out["img"][~mask], before[~mask])
    np.testing.assert_array_equal(out["boxes"], np.asarray(BOXES, dtype=np.float32))  # boxes untouched


def test_cutout_ratio_probability_and_determinism() -> None:
    cut = CutOut(n_holes=1, cutout_ratio=(0.1, 0.2))
    out = cut(_sample(BOXES), ScriptedRng([0.0], [1, 50, 40, 0]))
    filled = np.argwhere((out["img"] == 0).all(-1))
    # w = int(0.1 * 120) = 12, h = int(0.2 * 100) = 20 at (50, 40); pixel (0, 0) is (0, 0, 0) already
    assert {tuple(p) for p in filled} == {(y, x) for y in range(40, 60) for x in range(50, 62)} | {(0, 0)}
    off = CutOut(n_holes=3, cutout_shape=(4, 4), cutout_p=0.0)
    s = _sample(BOXES)
    np.testing.assert_array_equal(off(s, np.random.default_rng(0))["img"], _sample(BOXES)["img"])
    on = CutOut(n_holes=(5, 10), cutout_shape=[(4, 4), (16, 32)], cutout_p=0.5)
    for seed in range(5):
        a = on(_sample(BOXES), np.random.default_rng(seed))["img"]
        b = on(_sample(BOXES), np.random.default_rng(seed))["img"]
        np.testing.assert_array_equal(a, b)


def test_pipeline_from_the_vfnetx_config_and_errors() -> None:
    pipe = build_pipeline([
        {"type": "RandomCrop", "crop_type": "relative_range", "crop_size": [0.75, 0.75], "crop_p": 0.5},
        {"type": "Resize", "img_scale": [[75, 50], [210, 140]], "multiscale_mode": "range", "keep_ratio": True},
        {"type": "CutOut", "n_holes": [5, 10], "cutout_shape": [[4, 4], [8, 16]], "cutout_p": 0.5},
        {"type": "RandomFlip", "flip_ratio": 0.5}])
    out = pipe(_sample(BOXES), rng=np.random.default_rng(3))
    h, w = out["img"].shape[:2]
    assert out["meta"]["img_shape"] == (h, w) and len(out["boxes"]) == len(out["labels"]) >= 1
    with pytest.raises(ConfigError, match="crop_type"):
        RandomCrop(crop_size=(10, 10), crop_type="absolut")
    with pytest.raises(ConfigError, match="fractions"):
        RandomCrop(crop_size=(0.5, 1.5), crop_type="relative_range")
    with pytest.raises(ConfigError, match="exactly one"):
        CutOut(n_holes=2, cutout_shape=(4, 4), cutout_ratio=(0.1, 0.1))
    with pytest.raises(ConfigError, match="n_holes"):
        CutOut(n_holes=(5, 2), cutout_shape=(4, 4))
