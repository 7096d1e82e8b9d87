"""Batched post-processing: top-k, threshold, score factors, class-wise NMS, rescale, max_per_img."""

from __future__ import annotations

import pytest
import torch

from densedet.models.heads.dense_head import DenseHead, flatten_levels
from densedet.models.heads.postprocess import TestConfig as HeadTestConfig
from densedet.models.heads.postprocess import postprocess_levels, select_topk_candidates


def _run(scores, boxes, factors=None, cfg=None, metas=None):
    """One level; ``boxes`` (B, N, 4) per prior."""

    def decode(lvl, idx):
        return boxes.gather(1, idx[..., None].expand(-1, -1, 4))

    b = scores.shape[0]
    metas = metas or [{"scale_factor": (1.0, 1.0)}] * b
    return postprocess_levels([scores], None if factors is None else [factors], decode, scores.shape[-1],
                              cfg or HeadTestConfig(), metas)


def test_classwise_nms_threshold_and_rescale() -> None:
    boxes = torch.tensor([[[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]]], dtype=torch.float)
    # prior 0: class 0 .9 ; prior 1: class 0 .8 (IoU 0.68 with prior 0 -> suppressed);
    # prior 2: class 1 .7 (same box as prior 0 but another class -> kept); prior 3: .04 (below 0.05 -> dropped)
    scores = torch.tensor([[[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.04, 0.0]]])
    out = _run(scores, boxes, metas=[{"scale_factor": (2.0, 0.5)}])[0]
    assert out["labels"].tolist() == [0, 1]
    assert torch.allclose(out["scores"], torch.tensor([0.9, 0.7]))
    assert torch.allclose(out["boxes"][0], torch.tensor([0.0, 0.0, 5.0, 20.0]))  # x / 2, y / 0.5


def test_score_factor_applied_after_threshold() -> None:
    boxes = torch.tensor([[[0, 0, 10, 10], [20, 20, 30, 30]]], dtype=torch.float)
    scores = torch.tensor([[[0.06], [0.5]]])
    factors = torch.tensor([[0.5, 0.5]])
    out = _run(scores, boxes, factors)[0]
    # 0.06 passes the 0.05 threshold before the factor (mmdet 2.x) and is reported as 0.03
    assert torch.allclose(out["scores"].sort().values, torch.tensor([0.03, 0.25]))


def test_nms_pre_and_max_per_img() -> None:
    n = 30
    boxes = torch.stack([torch.tensor([i * 20.0, 0, i * 20.0 + 10, 10]) for i in range(n)])[None]
    scores = torch.linspace(0.1, 0.99, n)[None, :, None]
    out = _run(scores, boxes, cfg=HeadTestConfig(nms_pre=10, max_per_img=4))[0]
    assert out["scores"].shape == (4,)
    assert torch.allclose(out["scores"], scores[0, -4:, 0].flip(0))
    top, idx, labels, valid = select_topk_candidates(scores, 0.05, 10)
    assert idx[0].tolist() == list(range(n - 1, n - 11, -1)) and valid.all()


def test_batched_equals_per_image() -> None:
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 200, 2, generator=g) * 100
    wh = torch.rand(3, 200, 2, generator=g) * 30 + 2
    boxes = torch.cat([xy, xy + wh], -1)
    scores = torch.rand(3, 200, 4, generator=g) ** 3
    batched = _run(scores, boxes, cfg=HeadTestConfig(nms_pre=100, max_per_img=20))
    for i in range(3):
        single = _run(scores[i:i + 1], boxes[i:i + 1], cfg=HeadTestConfig(nms_pre=100, max_per_img=20))[0]
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(batched[i][k], single[k])


def test_flatten_levels_order_matches_prior_order() -> None:
    # (B=1, A*C = 2*3, H=2, W=2): value encodes (anchor a, class c, y, x); flattened row = (y*W + x)*A + a
    a_n, c_n, h, w = 2, 3, 2, 2
    m = torch.zeros(1, a_n * c_n, h, w)
    for a in range(a_n):
        for c in range(c_n):
            for y in range(h):
                for x in range(w):
                    m[0, a * c_n + c, y, x] = a * 1000 + c * 100 + y * 10 + x
    flat = flatten_levels([m], c_n)
    for y in range(h):
        for x in range(w):
            for a in range(a_n):
                row = (y * w + x) * a_n + a
                assert flat[0, row].tolist() == [a * 1000 + c * 100 + y * 10 + x for c in range(c_n)]


def test_valid_prior_mask_hand_computed() -> None:
    # batch padded to 96x96. Image 0 is 40x64 (h, w): alone it pads to 64x64 (mmdet's pad_shape), so at stride 8
    # rows/cols >= 8 lie on batch padding. Image 1 is 64x30 -> pads to 64x32 -> 8 rows, 4 cols valid.
    metas = [{"img_shape": (40, 64)}, {"img_shape": (64, 30)}]
    mask = DenseHead.valid_prior_mask([(12, 12), (6, 6)], [8, 16], 1, metas, torch.device("cpu"))
    lvl0 = mask[:, :144].reshape(2, 12, 12)
    assert lvl0[0, :8, :8].all() and not lvl0[0, 8:].any() and not lvl0[0, :, 8:].any()
    assert lvl0[1, :8, :4].all() and not lvl0[1, 8:].any() and not lvl0[1, :, 4:].any()
    lvl1 = mask[:, 144:].reshape(2, 6, 6)
    assert lvl1[0, :4, :4].all() and lvl1[0].sum() == 16  # ceil(64/16) = 4
    assert lvl1[1, :4, :2].all() and lvl1[1].sum() == 8  # ceil(32/16) = 2


def test_non_positive_nms_pre_and_max_per_img_keep_everything() -> None:
    """mmdet: ``nms_pre <= 0`` skips the per-level top-k (2.10/2.14 ``if nms_pre > 0``) and ``max_per_img <= 0``
    keeps every NMS survivor (``bbox_nms.multiclass_nms``: ``if max_num > 0``), with hard and soft NMS."""
    n = 30
    boxes = torch.stack([torch.tensor([i * 20.0, 0, i * 20.0 + 10, 10]) for i in range(n)])[None]
    scores = torch.linspace(0.1, 0.99, n)[None, :, None]  # 30 disjoint boxes, all above score_thr
    for nms in ({"type": "nms", "iou_threshold": 0.5}, {"type": "soft_nms", "iou_threshold": 0.3}):
        for nms_pre, max_per_img in ((-1, -1), (0, 0), (-1, 1000), (1000, -1)):
            out = _run(scores, boxes, cfg=HeadTestConfig(nms_pre=nms_pre, max_per_img=max_per_img, nms=nms))[0]
            assert out["scores"].shape == (n,), (nms, nms_pre, max_per_img)
            torch.testing.assert_close(out["scores"], scores[0, :, 0].flip(0))
    top, idx, labels, valid = select_topk_candidates(scores, 0.05, -1)
    assert idx.shape == (1, n) and valid.all()


SYNTH_HEADS = ["retinanet_r18_fpn_synth", "atss_r18_fpn_synth", "fcos_r18_fpn_synth", "vfnet_r18_fpn_synth",
               "fovea_r18_fpn_synth", "reppoints_r18_fpn_synth"]


@pytest.mark.parametrize("name", SYNTH_HEADS)
@torch.no_grad()
def test_each_heads_predict_keeps_all_with_non_positive_limits(name: str) -> None:
    """Every head's predict goes through the shared post-processing: -1 for ``nms_pre`` / ``max_per_img`` keeps as
    much as limits larger than any count, and more than the default 100 detections."""
    from densedet.config import load_config
    from densedet.models.build import build_detector

    torch.manual_seed(0)
    cfg = load_config(name, ["model.test_cfg.score_thr=0.0", "model.test_cfg.nms={type: nms, iou_threshold: 1.0}"])
    model = build_detector({**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}}).eval()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    metas = [{"img_shape": (64, 64), "pad_shape": (64, 64), "ori_shape": (64, 64), "scale_factor": (1.0, 1.0),
              "flip": False}]
    head = model.bbox_head
    counts = []
    for limit in (-1, 10**7):
        head.test_cfg.nms_pre = head.test_cfg.max_per_img = limit
        counts.append(len(model(images, None, metas, mode="predict")[0]["scores"]))
    assert counts[0] == counts[1] > 100
