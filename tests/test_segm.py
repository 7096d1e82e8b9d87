"""Mask inference outputs: box-only paste and crop RLE equal the full-resolution computation; segm evaluation on
constructed cases; mask drawing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from faster_coco_eval.core import mask as coco_mask

from densedet.evaluation import evaluate_coco
from densedet.evaluation.segm import detections_to_segm_results, encode_crop_rle, encode_instance_masks
from densedet.inference.visualize import class_color, draw_detections
from densedet.models.roi_heads import paste_masks_in_boxes
from densedet.structures.masks import BitmapCrop, InstanceMasks


def _full_paste(prob: torch.Tensor, box: torch.Tensor, h: int, w: int, thr: float = 0.5) -> np.ndarray:
    """mmdet ``_do_paste_mask`` on the whole image (the reference the box-only paste must reproduce)."""
    x1, y1, x2, y2 = box.tolist()
    gx = (torch.arange(w, dtype=torch.float32) + 0.5 - x1) / (x2 - x1) * 2 - 1
    gy = (torch.arange(h, dtype=torch.float32) + 0.5 - y1) / (y2 - y1) * 2 - 1
    grid = torch.stack([gx[None, :].expand(h, -1), gy[:, None].expand(-1, w)], -1)
    full = F.grid_sample(prob[None, None], grid[None], align_corners=False)[0, 0]
    return (full >= thr).numpy().astype(np.uint8)


def test_crop_rle_equals_full_image_encoding() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        hh, ww = (int(v) for v in rng.integers(1, 25, 2))
        h, w = int(rng.integers(0, hh + 1)), int(rng.integers(0, ww + 1))
        x0, y0 = int(rng.integers(0, ww - w + 1)), int(rng.integers(0, hh - h + 1))
        bits = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        full = np.zeros((hh, ww), np.uint8)
        full[y0:y0 + h, x0:x0 + w] = bits
        ref = coco_mask.encode(np.asfortranarray(full))["counts"].decode()
        assert encode_crop_rle(BitmapCrop(x0, y0, bits), hh, ww)["counts"] == ref


def test_paste_and_rle_round_trip_equals_full_resolution() -> None:
    torch.manual_seed(0)
    h, w = 90, 120
    probs = torch.rand(12, 28, 28)
    probs[:4] = 1.0  # saturated masks: the box border itself is the edge case
    xy = torch.rand(12, 2) * torch.tensor([w, h]) - 10
    wh = torch.rand(12, 2) * 60 + 0.7
    boxes = torch.cat([xy, xy + wh], 1)
    crops = paste_masks_in_boxes(probs, boxes, h, w)
    masks = InstanceMasks(crops, h, w)
    rles = encode_instance_masks(masks)
    for i in range(12):
        full = _full_paste(probs[i], boxes[i], h, w)
        np.testing.assert_array_equal(masks.to_full(i), full)
        assert rles[i]["counts"] == coco_mask.encode(np.asfortranarray(full))["counts"].decode()
        np.testing.assert_array_equal(coco_mask.decode(rles[i]), full)
        c = crops[i]
        hh, ww = c.bits.shape
        assert hh * ww <= (wh[i, 0].item() + 2) * (wh[i, 1].item() + 2)  # memory: the box, not the image


def _gt_json(masks: list[np.ndarray]) -> dict:
    h, w = masks[0].shape
    anns = []
    for k, m in enumerate(masks):
        rle = coco_mask.encode(np.asfortranarray(m))
        ys, xs = np.nonzero(m)
        anns.append({"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": float(m.sum()),
                     "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                              float(ys.max() - ys.min() + 1)],
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    return {"images": [{"id": 1, "width": w, "height": h, "file_name": "a.png"}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}]}


def _det(masks: list[np.ndarray], scores: list[float]) -> dict:
    h, w = masks[0].shape
    crops = [BitmapCrop(0, 0, m) for m in masks]
    return {"segms": encode_instance_masks(InstanceMasks(crops, h, w)), "scores": np.array(scores),
            "labels": np.zeros(len(masks), np.int64)}


def test_segm_ap_is_one_for_perfect_masks() -> None:
    rng = np.random.default_rng(0)
    gts = []
    for _ in range(3):
        m = np.zeros((64, 64), np.uint8)
        x, y = rng.integers(0, 40, 2)
        m[y:y + 20, x:x + 15] = rng.integers(0, 2, size=(20, 15)) | 1 - np.eye(20, 15, dtype=np.uint8)
        gts.append(m)
    res = detections_to_segm_results([_det(gts, [0.9, 0.8, 0.7])], [1], {0: 1})
    out = evaluate_coco(_gt_json(gts), res, iou_type="segm")
    assert out.metrics["segm_mAP"] == pytest.approx(1.0)
    assert out.metrics["segm_mAP_50"] == pytest.approx(1.0)


def test_segm_ap_of_a_constructed_case() -> None:
    """One 10x10 gt; a detection covering 62 of its pixels (IoU 0.62) matches at IoU thresholds 0.50, 0.55, 0.60
    only: AP = 3/10, AP50 = 1, AP75 = 0."""
    gt = np.zeros((32, 32), np.uint8)
    gt[5:15, 5:15] = 1
    det = np.zeros_like(gt)
    det[5:15, 5:11] = 1  # 60 px
    det[5, 11:13] = 1  # + 2 px = 62
    res = detections_to_segm_results([_det([det], [0.9])], [1], {0: 1})
    m = evaluate_coco(_gt_json([gt]), res, iou_type="segm").metrics
    assert m["segm_mAP"] == pytest.approx(0.3)
    assert m["segm_mAP_50"] == pytest.approx(1.0) and m["segm_mAP_75"] == pytest.approx(0.0)


def test_draw_detections_fills_and_outlines_masks() -> None:
    img = np.full((40, 50, 3), 100, np.uint8)
    bits = np.zeros((10, 12), np.uint8)
    bits[2:8, 3:9] = 1
    masks = InstanceMasks([BitmapCrop(20, 15, bits)], 40, 50)
    out = np.asarray(draw_detections(img, [[18, 12, 35, 30]], [0.9], [1], ["a", "b"], score_thr=0.3, masks=masks))
    color = np.array(class_color(1))
    np.testing.assert_array_equal(out[17, 23], color)  # top-left mask pixel: on the outline
    np.testing.assert_array_equal(out[19, 25], (100 * 0.5 + 0.5 * color).astype(np.uint8))  # inside: blended
    np.testing.assert_array_equal(out[16, 23], [100, 100, 100])  # just outside the mask, inside the box
    with pytest.raises(ValueError, match="masks"):
        draw_detections(img, [[18, 12, 35, 30]], [0.9], [1], ["a", "b"], masks=InstanceMasks([], 40, 50))
