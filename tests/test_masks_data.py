"""Instance masks in the data pipeline: decoding against hand-made masks, transforms keep masks aligned with boxes,
box-cropped RoI targets equal the full-image RoIAlign, bad segmentations are named."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from faster_coco_eval.core import mask as coco_mask
from PIL import Image
from rle_reference import uncompressed_rle
from torchvision.ops import roi_align

from densedet.data import CocoDataset, collate
from densedet.data.coco import DataError, DataWarning
from densedet.data.transforms import RandomCrop, RandomFlip, Resize
from densedet.structures.masks import (
    BitmapCrop,
    InstanceMasks,
    MaskFormatError,
    PolygonMask,
    decode_segmentation,
    nearest_source_index,
    rasterize_polygons,
)


def test_polygon_decodes_to_hand_made_mask() -> None:
    # a 3x2 rectangle with pixel corners (1, 1)-(4, 3): columns 1..3, rows 1..2
    m = decode_segmentation([[1, 1, 4, 1, 4, 3, 1, 3]], 6, 6)
    assert isinstance(m, PolygonMask)
    full = InstanceMasks([m], 6, 6).to_full(0)
    expected = np.zeros((6, 6), np.uint8)
    expected[1:3, 1:4] = 1
    np.testing.assert_array_equal(full, expected)


def test_uncompressed_and_compressed_rle_decode_to_hand_made_mask() -> None:
    expected = np.zeros((5, 7), np.uint8)
    expected[1:4, 2] = 1
    expected[2, 3:6] = 1
    rle = uncompressed_rle(expected)
    m = decode_segmentation(rle, 5, 7)
    assert isinstance(m, BitmapCrop) and (m.x0, m.y0) == (2, 1) and m.bits.shape == (3, 4)  # cropped to extent
    np.testing.assert_array_equal(InstanceMasks([m], 5, 7).to_full(0), expected)
    compressed = coco_mask.encode(np.asfortranarray(expected))
    compressed = {"size": compressed["size"], "counts": compressed["counts"].decode()}
    np.testing.assert_array_equal(InstanceMasks([decode_segmentation(compressed, 5, 7)], 5, 7).to_full(0), expected)


@pytest.mark.parametrize("segm, kind", [
    ([], "empty polygon"),
    ([[1, 2, 3]], "bad polygon"),
    ([[1, 2, 3, 4, 5, 6, 7]], "bad polygon"),
    ([[0, 0, float("nan"), 0, 1, 1]], "bad polygon"),
    ({"size": [4, 4], "counts": [16]}, "RLE of the wrong size"),
    ({"size": [5, 7], "counts": [30]}, "RLE of the wrong size"),
    ({"size": [5, 7], "counts": "not-an-rle"}, "bad RLE"),
    ("polygon", "unknown format"),
])
def test_bad_segmentations_are_classified(segm, kind) -> None:
    with pytest.raises(MaskFormatError) as e:
        decode_segmentation(segm, 5, 7)
    assert e.value.kind == kind


def test_box_rasterisation_equals_full_image_rasterisation() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        pts = rng.uniform(-5, 45, size=(int(rng.integers(3, 8)), 2))
        poly = [pts.reshape(-1).tolist()]
        full = coco_mask.decode(coco_mask.frPyObjects(poly, 40, 30)[0])
        crop = rasterize_polygons([pts], 40, 30)
        got = np.zeros((40, 30), np.uint8)
        h, w = crop.bits.shape
        got[crop.y0:crop.y0 + h, crop.x0:crop.x0 + w] = crop.bits
        np.testing.assert_array_equal(got, full)


def _random_masks(rng: np.random.Generator, h: int, w: int, n: int) -> tuple[InstanceMasks, np.ndarray]:
    """n instances (half polygons, half RLE bitmaps) and their tight boxes."""
    items, boxes = [], []
    for k in range(n):
        x0, y0 = rng.integers(0, w - 12), rng.integers(0, h - 12)
        bw, bh = rng.integers(6, min(40, w - x0)), rng.integers(6, min(40, h - y0))
        if k % 2 == 0:
            item = PolygonMask([np.array([[x0, y0 + bh], [x0 + bw, y0 + bh], [x0 + bw / 2, y0]], np.float64)])
        else:
            full = np.zeros((h, w), np.uint8)
            yy, xx = np.mgrid[:h, :w]
            full[((xx - x0 - bw / 2) / (bw / 2)) ** 2 + ((yy - y0 - bh / 2) / (bh / 2)) ** 2 <= 1] = 1
            item = decode_segmentation(uncompressed_rle(full), h, w)
        items.append(item)
    masks = InstanceMasks(items, h, w)
    for k, item in enumerate(items):
        if isinstance(item, PolygonMask):  # a COCO bbox is the polygon's extent
            pts = item.polys[0]
            boxes.append([*pts.min(0), *pts.max(0)])
        else:
            boxes.append(_tight_box(masks.to_full(k)))
    return masks, np.asarray(boxes, np.float32)


def _tight_box(full: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(full)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.mark.parametrize("seed", range(8))
def test_masks_stay_aligned_with_boxes_under_resize_flip_crop(seed: int) -> None:
    """Property: after any chain of transforms every mask lies inside its transformed box, and without a crop its
    tight box equals the box (a crop clips the box to the window, which can leave the shape's box larger than
    what remains of the shape, as in mmdet). Tolerance: one pixel per resize, scaled by later resizes; for the
    equality two more, since a shape's thin tip can rasterise to nothing or vanish under nearest downsampling."""
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(60, 120)), int(rng.integers(60, 120))
    masks, boxes = _random_masks(rng, h, w, 6)
    sample = {"img": np.zeros((h, w, 3), np.uint8), "boxes": boxes.copy(), "labels": np.arange(6),
              "ignore_boxes": np.zeros((0, 4), np.float32), "masks": masks,
              "meta": {"ori_shape": (h, w), "img_shape": (h, w), "scale_factor": (1.0, 1.0), "flip": False}}
    transforms = [Resize(img_scale=[(40, 40), (200, 200)], multiscale_mode="range"), RandomFlip(1.0),
                  RandomFlip(1.0, "vertical")]
    if seed % 2:
        transforms.append(RandomCrop((0.6, 0.6), crop_type="relative_range"))
    tol = 0.0
    for t in [transforms[i] for i in rng.permutation(len(transforms))]:
        before = sample["img"].shape[:2]
        sample = t(sample, rng=rng)
        if isinstance(t, Resize):
            # a nearest resize / re-rasterisation moves an edge by < 1 new pixel; earlier errors scale along
            tol = tol * max(sample["img"].shape[0] / before[0], sample["img"].shape[1] / before[1]) + 1.0
        assert len(sample["masks"]) == len(sample["boxes"]) == len(sample["labels"])
        assert (sample["masks"].height, sample["masks"].width) == sample["img"].shape[:2]
    assert len(sample["boxes"]) > 0
    for k, box in enumerate(sample["boxes"]):
        tight = _tight_box(sample["masks"].to_full(k))
        assert tight is not None
        assert (tight[:2] >= box[:2] - tol - 1e-4).all() and (tight[2:] <= box[2:] + tol + 1e-4).all()
        if seed % 2 == 0:
            np.testing.assert_allclose(tight, box, atol=tol + 2.0)


def test_crop_of_a_crossing_polygon_is_exact() -> None:
    poly = PolygonMask([np.array([[2, 2], [30, 5], [12, 28]], np.float64)])
    masks = InstanceMasks([poly], 32, 32)
    got = masks.crop(10, 4, 15, 20)
    np.testing.assert_array_equal(got.to_full(0), masks.to_full(0)[4:24, 10:25])


def test_resize_of_bitmap_equals_full_image_nearest_resize() -> None:
    rng = np.random.default_rng(3)
    full = np.zeros((50, 70), np.uint8)
    full[10:30, 20:45] = rng.integers(0, 2, size=(20, 25))
    masks = InstanceMasks([decode_segmentation(uncompressed_rle(full), 50, 70)], 50, 70)
    for new_h, new_w in ((23, 31), (101, 143), (50, 70)):
        ys = nearest_source_index(0, new_h, new_h / 50, 50)
        xs = nearest_source_index(0, new_w, new_w / 70, 70)
        np.testing.assert_array_equal(masks.resize(new_h, new_w).to_full(0), full[ys][:, xs])


def test_roi_targets_equal_full_image_roi_align_and_box_gt_is_all_ones() -> None:
    h, w = 64, 80
    box_mask = np.zeros((h, w), np.uint8)
    box_mask[10:40, 20:62] = 1
    rng = np.random.default_rng(1)
    blob = np.zeros((h, w), np.uint8)
    blob[0:25, 50:80] = rng.integers(0, 2, size=(25, 30))  # touches the top and right image borders
    masks = InstanceMasks([decode_segmentation(uncompressed_rle(m), h, w) for m in (box_mask, blob)], h, w)
    rois = torch.tensor([[20, 10, 62, 40], [18.3, 7.7, 70.2, 45.1], [45, -3, 83, 20], [52.5, 1.5, 79.5, 24.5]])
    inds = torch.tensor([0, 0, 1, 1])
    got = masks.roi_targets(rois, inds, 28, binarize=False)
    fulls = torch.from_numpy(np.stack([box_mask, blob])).float()[:, None]
    ref = roi_align(fulls[inds], torch.cat([torch.arange(4.0)[:, None], rois], 1), (28, 28), 1.0, 0, True)[:, 0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # mmdet: a box-shaped gt seen through its own box is all ones after the 0.5 threshold
    assert bool((masks.roi_targets(rois[:1], inds[:1], 28) == 1).all())


def _write_mask_coco(root: Path, anns: list[dict]) -> tuple[Path, Path]:
    img_dir = root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(img_dir / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}], "annotations": anns,
            "categories": [{"id": 1, "name": "x"}]}
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, img_dir


def test_dataset_with_masks_counts_bad_ones_and_collates(tmp_path) -> None:
    good = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10],
            "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]}
    odd = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 15]]}
    wrong = {"id": 8, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10],
             "segmentation": {"size": [10, 10], "counts": [100]}}
    crowd = {"id": 9, "image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "iscrowd": 1,
             "segmentation": {"size": [40, 50], "counts": [2000]}}
    ann_file, img_dir = _write_mask_coco(tmp_path, [good, odd, wrong, crowd])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDataset(ann_file, img_dir, [], with_mask=True)
    texts = [str(c.message) for c in caught if issubclass(c.category, DataWarning)]
    assert any("bad polygon" in t and "7" in t for t in texts)
    assert any("RLE of the wrong size" in t and "8" in t for t in texts)
    assert ds.skipped_counts["mask: bad polygon"] == 1
    item = ds[0]
    assert len(item["masks"]) == 1 and item["boxes"].shape == (1, 4) and item["ignore_boxes"].shape == (1, 4)
    assert item["masks"].to_full(0)[5:15, 5:15].all() and item["masks"].to_full(0).sum() == 100
    batch = collate([item, item])
    assert batch["targets"][1]["masks"] is item["masks"]
    # without with_mask: the old item, no masks key, and no warnings about masks
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        plain = CocoDataset(ann_file, img_dir, [])[0]
    assert "masks" not in plain and plain["boxes"].shape == (3, 4)


def test_corrupt_compressed_rle_is_skipped_at_load_and_named(tmp_path) -> None:
    """A corrupt compressed RLE is found at load time (its runs are decoded, not its pixels), skipped with its box
    and named; the evaluator's ground truth never holds it."""
    bad = {"id": 42, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10],
           "segmentation": {"size": [40, 50], "counts": "zzz"}}
    good = {"id": 43, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10],
            "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]}
    ann_file, img_dir = _write_mask_coco(tmp_path, [bad, good])
    with pytest.warns(DataWarning, match=r"skipped 1 annotation with bad RLE .*ids 42; first: annotation id 42"):
        ds = CocoDataset(ann_file, img_dir, [], with_mask=True)
    assert ds.skipped_counts["mask: bad RLE"] == 1
    assert ds.get_ann_info(0)["ann_ids"].tolist() == [43]
    assert [a["id"] for a in ds.coco_gt_dict["annotations"]] == [43]


def test_rle_of_an_image_whose_real_size_differs_names_the_annotation(tmp_path) -> None:
    """The json says 50x40 and the RLE fits it; the image file is 60x40: decoding it for that image is a DataError
    naming the annotation (a mask cannot be stretched to a stale size)."""
    full = np.zeros((40, 50), np.uint8)
    full[5:15, 5:15] = 1
    rle = uncompressed_rle(full)
    ann_file, img_dir = _write_mask_coco(tmp_path, [{"id": 42, "image_id": 1, "category_id": 1,
                                                      "bbox": [5, 5, 10, 10], "segmentation": rle}])
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(img_dir / "a.png")
    ds = CocoDataset(ann_file, img_dir, [], with_mask=True)
    with pytest.warns(DataWarning, match="stale size"), pytest.raises(DataError, match="annotation id 42"):
        ds[0]
