"""Drawing detections and tiling images: pixel-level checks on synthetic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from densedet.inference.visualize import class_color, draw_detections, save_detection_grid

GREY = (128, 128, 128)
NAMES = ["cat", "dog", "bird"]


def grey_image(w: int = 240, h: int = 200) -> Image.Image:
    return Image.new("RGB", (w, h), GREY)


def test_box_outline_drawn_and_far_pixels_untouched():
    img = grey_image()
    before = np.asarray(img).copy()
    out = draw_detections(img, np.array([[60.0, 80.0, 160.0, 180.0]]), np.array([0.87]), np.array([1]), NAMES)
    arr = np.asarray(out)
    color = class_color(1)
    for x, y in [(60, 130), (160, 130), (110, 80), (110, 180)]:  # a point on each edge (row y, column x)
        assert tuple(arr[y, x]) == color
    assert tuple(arr[130, 110]) == GREY  # box interior
    assert tuple(arr[195, 235]) == GREY and tuple(arr[5, 235]) == GREY  # far corners
    # The label sits above the box: filled with the class colour in the band just above the top edge.
    band = arr[60:79, 61:100]
    assert (band == np.array(color)).all(axis=-1).mean() > 0.3
    assert (band != np.array(color)).any()  # ... with text drawn on it
    np.testing.assert_array_equal(np.asarray(img), before)  # input not modified
    assert out.size == img.size and out.mode == "RGB"


def test_score_threshold_filters():
    img = grey_image()
    boxes = torch.tensor([[20.0, 30.0, 100.0, 120.0], [120.0, 30.0, 200.0, 120.0]])
    out = draw_detections(img, boxes, torch.tensor([0.2, 0.5]), torch.tensor([0, 2]), NAMES, score_thr=0.3)
    arr = np.asarray(out)
    assert tuple(arr[75, 20]) == GREY  # left edge of the low-score box: not drawn
    assert tuple(arr[75, 120]) == class_color(2)  # left edge of the kept box
    untouched = draw_detections(img, boxes, torch.tensor([0.2, 0.1]), torch.tensor([0, 2]), NAMES, score_thr=0.3)
    np.testing.assert_array_equal(np.asarray(untouched), np.asarray(img))


def test_numpy_input_and_gt_boxes_dashed():
    arr_in = np.full((200, 240, 3), 128, dtype=np.uint8)
    out = draw_detections(arr_in, np.zeros((0, 4)), np.zeros(0), np.zeros(0), NAMES, gt_boxes=[[40, 40, 200, 160]])
    arr = np.asarray(out)
    top_edge = arr[40, 45:195]
    white = (top_edge == 255).all(axis=-1)
    black = (top_edge == 0).all(axis=-1)
    assert white.any() and black.any() and (white | black).all()  # alternating white/black dashes
    assert tuple(arr[100, 120]) == GREY  # inside
    assert (arr_in == 128).all()


def test_class_colors_distinct_and_fixed():
    colors = [class_color(i) for i in range(80)]
    assert len(set(colors)) == 80
    assert class_color(3) == class_color(3)
    assert all(0 <= c <= 255 for col in colors for c in col)


def test_bad_inputs_raise():
    img = grey_image()
    with pytest.raises(ValueError, match="out of range"):
        draw_detections(img, [[0, 0, 10, 10]], [0.9], [3], NAMES)
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(np.zeros((10, 10, 3), dtype=np.float32), [], [], [], NAMES)
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        draw_detections(img, [[0, 0, 10]], [0.9], [0], NAMES)
    with pytest.raises(ValueError, match="differ in length"):
        draw_detections(img, [[0, 0, 10, 10]], [0.9, 0.8], [0], NAMES)


def test_save_detection_grid(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [Image.new("RGB", (100, 80), c) for c in colors] + [Image.new("RGB", (60, 50), (255, 0, 255))]
    path = save_detection_grid(images, tmp_path / "grid" / "dets.png", ncols=4)
    assert sorted(p.name for p in path.parent.iterdir()) == ["dets.png"]
    with Image.open(path) as grid:
        grid = grid.convert("RGB")
        gap = 4
        assert grid.size == (4 * 100 + 3 * gap, 2 * 80 + gap)
        for i, c in enumerate(colors):  # centre pixel of every full-size cell shows its image
            r, col = divmod(i, 4)
            assert grid.getpixel((col * 104 + 50, r * 84 + 40)) == c
        assert grid.getpixel((104 + 50, 84 + 40)) == (255, 0, 255)  # smaller image centred in cell 6
        assert grid.getpixel((104 + 2, 84 + 2)) != (255, 0, 255)  # cell corner is background
    with pytest.raises(ValueError):
        save_detection_grid([], tmp_path / "empty.png")


def test_display_side_resizes_before_drawing():
    img = grey_image(60, 40)
    out = draw_detections(img, [[10.0, 10.0, 30.0, 30.0]], [0.9], [0], NAMES, gt_boxes=[[40.0, 5.0, 55.0, 35.0]],
                          display_side=480)
    assert out.size == (480, 320) and img.size == (60, 40)  # longer side 480, aspect kept, input untouched
    arr = np.asarray(out)
    color = class_color(0)
    for x, y in [(80, 160), (240, 160), (160, 240)]:  # the box scaled by 8: x 80..240, y 80..240
        assert tuple(arr[y, x]) == color
    assert tuple(arr[160, 160]) == GREY
    gt_edge = {tuple(v) for v in arr[60:260, 320]}  # the dashed ground truth scaled too: x = 40 * 8
    assert {(255, 255, 255), (0, 0, 0)} <= gt_edge
    assert tuple(arr[160, 300]) == GREY
    small = draw_detections(grey_image(600, 400), [[100.0, 100.0, 300.0, 300.0]], [0.9], [0], NAMES, display_side=60)
    assert small.size == (60, 40) and tuple(np.asarray(small)[20, 10]) == color  # large images are reduced
    with pytest.raises(ValueError, match="display_side"):
        draw_detections(img, [], [], [], NAMES, display_side=0)
