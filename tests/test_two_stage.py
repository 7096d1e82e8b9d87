"""Two-stage pieces on constructed cases: the batched random sampler, RPN and R-CNN assignment + sampling (images
without gt, with only crowd regions), RoI level mapping, RoIAlign against hand-computed values, the R-CNN box loss
and a tiny Mask R-CNN's loss / predict round."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densedet.models.build import build_detector
from densedet.models.heads.rpn_head import RPNHead
from densedet.models.roi_heads import (
    Shared2FCBBoxHead,
    SingleRoIExtractor,
    StandardRoIHead,
    map_roi_levels,
    random_sample,
)
from densedet.structures import bbox_overlaps
from densedet.structures.masks import InstanceMasks, PolygonMask

ROI_HEAD = {
    "bbox_roi_extractor": {"type": "SingleRoIExtractor", "roi_layer": {"type": "RoIAlign", "output_size": 7,
                                                                       "sampling_ratio": 0},
                           "out_channels": 8, "featmap_strides": [4, 8, 16, 32]},
    "bbox_head": {"type": "Shared2FCBBoxHead", "in_channels": 8, "fc_out_channels": 16, "num_classes": 3},
    "mask_roi_extractor": {"type": "SingleRoIExtractor", "roi_layer": {"type": "RoIAlign", "output_size": 14,
                                                                       "sampling_ratio": 0},
                           "out_channels": 8, "featmap_strides": [4, 8, 16, 32]},
    "mask_head": {"type": "FCNMaskHead", "in_channels": 8, "conv_out_channels": 8, "num_classes": 3},
}


def _target(boxes, labels, ignore=()) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels).long(),
            "ignore_boxes": torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4)}


def test_random_sample_counts_and_membership() -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.zeros(3, 1000, dtype=torch.bool)
    pos[0, :10] = True  # fewer positives than wanted: all kept, negatives fill up to num
    pos[1, :400] = True  # more than wanted: exactly num * fraction
    neg = ~pos
    neg[2, 50:] = False  # image 2: no positive, only 50 negatives
    ps, ns = random_sample(pos, neg, num=256, pos_fraction=0.5, generator=g)
    assert ps.sum(1).tolist() == [10, 128, 0]
    assert ns.sum(1).tolist() == [246, 128, 50]
    assert not (ps & ~pos).any() and not (ns & ~neg).any()
    # neg_pos_ub caps negatives at ub * max(#pos, 1)
    _, ns2 = random_sample(pos, neg, num=256, pos_fraction=0.5, neg_pos_ub=3, generator=g)
    assert ns2.sum(1).tolist() == [30, 128, 3]
    # seeded: the same generator state gives the same draw; a different one (almost surely) another
    a = random_sample(pos, neg, 256, 0.5, generator=torch.Generator().manual_seed(5))
    b = random_sample(pos, neg, 256, 0.5, generator=torch.Generator().manual_seed(5))
    c = random_sample(pos, neg, 256, 0.5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_random_sample_is_uniform_over_candidates() -> None:
    pos = torch.zeros(1, 20, dtype=torch.bool)
    pos[0, :8] = True
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(20)
    for _ in range(2000):
        ps, _ = random_sample(pos, ~pos, num=8, pos_fraction=0.25, generator=g)
        counts += ps[0].float()
    freq = counts[:8] / 2000  # 2 of 8 positives per draw: 0.25 each
    assert torch.allclose(freq, torch.full((8,), 0.25), atol=0.04)


def _rpn() -> RPNHead:
    return RPNHead(in_channels=8, feat_channels=8)


def _rpn_outs(head: RPNHead, h: int, w: int, b: int = 2) -> tuple[list, list]:
    feats = [torch.randn(b, 8, math.ceil(h / s), math.ceil(w / s)) for s in head.strides]
    return head(feats)


def test_rpn_loss_no_gt_and_only_crowd_images_are_all_negative() -> None:
    torch.manual_seed(0)
    head = _rpn()
    outs = _rpn_outs(head, 128, 128)
    metas = [{"img_shape": (128, 128), "pad_shape": (128, 128)}] * 2
    targets = [_target([], []), _target([], [], ignore=[[0, 0, 64, 64]])]
    losses = head.loss(outs, targets, metas)
    # 256 sampled negatives per image, target 0: the loss is the mean BCE of those anchors, zero box loss
    assert losses["loss_rpn_bbox"].item() == 0.0
    logits = torch.cat([o.permute(0, 2, 3, 1).reshape(2, -1) for o in outs[0]], 1)
    upper = F.softplus(logits).max().item()
    lower = F.softplus(logits).min().item()
    # the sum over 2 * 256 negatives divided by (max(0,1) + 256) * 2 = 514
    assert lower * 512 / 514 - 1e-6 <= losses["loss_rpn_cls"].item() <= upper * 512 / 514 + 1e-6


def test_rpn_assignment_and_loss_in_closed_form() -> None:
    """RPN targets: positives are anchors with IoU >= 0.7 plus each gt's best anchors when that IoU is >= 0.3
    (low-quality matches), negatives IoU < 0.3. With a sampler that takes every candidate the losses have a closed
    form: sigmoid CE over positives (target 1) and negatives (target 0), L1 on the positives' encoded deltas, both
    divided by #pos + #neg."""
    torch.manual_seed(0)
    head = RPNHead(in_channels=8, feat_channels=8, train_cfg={
        "sampler": {"type": "RandomSampler", "num": 10**7, "pos_fraction": 0.5, "neg_pos_ub": -1,
                    "add_gt_as_proposals": False}})
    outs = _rpn_outs(head, 128, 128, b=1)
    # gt 0 is an anchor exactly (stride 4, scale 8 -> 32 px); gt 1 (20 x 90) matches no anchor at 0.7
    gt = torch.tensor([[16.0, 16.0, 48.0, 48.0], [70.0, 20.0, 90.0, 110.0]])
    priors, _, _ = head._priors(outs[0])
    ious = bbox_overlaps(priors, gt)  # (N, 2)
    best = ious.max(1).values
    low = (ious == ious.max(0).values) & (ious.max(0).values >= 0.3)  # each gt's best anchors
    assert ious[:, 1].max().item() < 0.7 and low[:, 1].any()
    pos = (best >= 0.7) | low.any(1)
    neg = (best < 0.3) & ~pos
    gt_idx = torch.where(low[:, 1], 1, torch.where(low[:, 0], 0, ious.argmax(1)))
    logits = torch.cat([o.permute(0, 2, 3, 1).reshape(-1) for o in outs[0]])
    deltas = torch.cat([o.permute(0, 2, 3, 1).reshape(-1, 4) for o in outs[1]])
    norm = float(pos.sum() + neg.sum())
    exp_cls = (F.softplus(-logits[pos]).sum() + F.softplus(logits[neg]).sum()) / norm
    target = head.bbox_coder.encode(priors[pos], gt[gt_idx[pos]])
    exp_box = (deltas[pos] - target).abs().sum() / norm
    losses = head.loss(outs, [_target(gt.tolist(), [0, 1])], [{"img_shape": (128, 128), "pad_shape": (128, 128)}])
    assert losses["loss_rpn_cls"].item() == pytest.approx(exp_cls.item(), rel=1e-5)
    assert losses["loss_rpn_bbox"].item() == pytest.approx(exp_box.item(), rel=1e-5)


def _roi_head() -> StandardRoIHead:
    return StandardRoIHead(**ROI_HEAD)


def test_rcnn_sampling_no_gt_and_only_crowd() -> None:
    torch.manual_seed(0)
    head = _roi_head()
    props = [torch.rand(600, 4).sort(1).values * 100, torch.rand(300, 4).sort(1).values * 100]
    props = [torch.stack([p[:, 0], p[:, 1], p[:, 2] + 1, p[:, 3] + 1], 1) for p in props]
    s = head.sample(props, [_target([], []), _target([], [], ignore=[[0, 0, 100, 100]])])
    img = s["rois"][:, 0].long()
    assert (img == 0).sum() == 512 and (img == 1).sum() == 300  # all negatives, as many as exist up to 512
    assert (s["labels"] == 3).all() and (s["gt_inds"] == -1).all()


def test_rcnn_sampling_adds_gt_as_positive_proposals() -> None:
    torch.manual_seed(0)
    head = _roi_head()
    gt = [[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 80.0]]
    far = torch.tensor([[200.0, 200.0, 220.0, 220.0]]).repeat(40, 1)  # IoU 0 with both gts
    near = torch.tensor([[12.0, 10.0, 50.0, 52.0]])  # IoU > 0.5 with gt 0
    s = head.sample([torch.cat([far, near])], [_target(gt, [1, 2])])
    pos = s["gt_inds"] >= 0
    assert pos.sum() == 3 and (~pos).sum() == 40
    # the two gts are proposals of themselves with zero regression targets
    gt_t = torch.tensor(gt)
    own = (s["rois"][:, 1:][:, None] == gt_t[None]).all(-1)
    assert own.any(0).all()
    assert torch.allclose(s["bbox_targets"][own.any(1)], torch.zeros(2, 4), atol=1e-6)
    assert sorted(s["labels"][pos].tolist()) == [1, 1, 2]


def test_map_roi_levels_hand_values() -> None:
    sides = torch.tensor([10.0, 55.0, 56.0, 111.0, 112.0, 224.0, 447.0, 448.0, 2000.0])
    rois = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    # floor(log2(side / 56 + 1e-6)) clamped to [0, 3]
    assert map_roi_levels(rois, 4).tolist() == [0, 0, 0, 0, 1, 2, 2, 3, 3]


def test_roi_extractor_matches_hand_computed_bilinear_values() -> None:
    """On a linear ramp f(x, y) = base + x + 10 y (x, y feature-cell indices), bilinear RoIAlign returns the ramp
    at each bin centre: aligned=True maps an image point p to p / stride - 0.5."""
    strides = [4, 8, 16, 32]
    ext = SingleRoIExtractor({"type": "RoIAlign", "output_size": 2, "sampling_ratio": 0}, 1, strides)
    feats = []
    for lvl, s in enumerate(strides):
        h, w = 512 // s, 512 // s
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        feats.append((1000.0 * lvl + xs + 10 * ys)[None, None])
    rois = torch.tensor([[0, 40.0, 48.0, 80.0, 88.0],  # 40 px -> level 0 (stride 4)
                         [0, 100.0, 120.0, 300.0, 320.0]])  # 200 px -> level 1 (floor(log2(3.57)) = 1)
    out = ext(feats, rois)
    for r, lvl in ((0, 0), (1, 1)):
        s = strides[lvl]
        x1, y1, x2, y2 = (rois[r, 1:] / s - 0.5).tolist()
        for i in range(2):
            for j in range(2):
                cx = x1 + (j + 0.5) * (x2 - x1) / 2
                cy = y1 + (i + 0.5) * (y2 - y1) / 2
                assert out[r, 0, i, j].item() == pytest.approx(1000.0 * lvl + cx + 10 * cy, abs=1e-3)


def test_bbox_head_loss_normalisation() -> None:
    torch.manual_seed(0)
    head = Shared2FCBBoxHead(num_classes=3, in_channels=2, fc_out_channels=8, roi_feat_size=2)
    cls = torch.randn(5, 4)
    reg = torch.randn(5, 12)
    labels = torch.tensor([0, 2, 3, 3, 1])
    targets = torch.randn(5, 4)
    out = head.loss(cls, reg, labels, targets)
    assert out["loss_cls"].item() == pytest.approx(F.cross_entropy(cls, labels).item(), rel=1e-6)
    pos = [0, 1, 4]
    picked = torch.stack([reg[i].view(3, 4)[labels[i]] for i in pos])
    # L1 summed over the positives, divided by all 5 sampled RoIs (mmdet avg_factor=bbox_targets.size(0))
    assert out["loss_bbox"].item() == pytest.approx((picked - targets[pos]).abs().sum().item() / 5, rel=1e-6)


def tiny_mask_rcnn(num_classes: int = 3) -> torch.nn.Module:
    from densedet.config import load_config

    cfg = load_config("mask_rcnn_r18_fpn_synth")
    cfg.model["roi_head"]["bbox_head"]["num_classes"] = num_classes
    cfg.model["roi_head"]["mask_head"]["num_classes"] = num_classes
    return build_detector(cfg.model)


def test_tiny_mask_rcnn_loss_and_predict() -> None:
    torch.manual_seed(0)
    model = tiny_mask_rcnn()
    imgs = torch.randn(2, 3, 96, 128)
    square = PolygonMask([np.array([[10, 20], [60, 20], [60, 70], [10, 70]], float)])
    targets = [dict(_target([[10, 20, 60, 70]], [1]), masks=InstanceMasks([square], 96, 128)),
               dict(_target([], []), masks=InstanceMasks([], 96, 128))]
    metas = [{"img_shape": (96, 128), "pad_shape": (96, 128), "scale_factor": (1.0, 1.0), "ori_shape": (96, 128)},
             {"img_shape": (80, 100), "pad_shape": (96, 128), "scale_factor": (0.5, 0.5), "ori_shape": (160, 200)}]
    losses = model(imgs, targets, metas, mode="loss")
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask", "acc"}
    total = sum(v for k, v in losses.items() if k.startswith("loss"))
    total.backward()
    assert model.roi_head.mask_head.conv_logits.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        dets = model(imgs, None, metas, mode="predict")
    for det, meta in zip(dets, metas):
        n = len(det["boxes"])
        assert det["scores"].shape == (n,) and det["labels"].shape == (n,) and len(det["masks"]) == n
        assert (det["masks"].height, det["masks"].width) == meta["ori_shape"]
        h, w = meta["ori_shape"]
        assert (det["boxes"][:, 2] <= w + 1e-3).all() and (det["boxes"][:, 3] <= h + 1e-3).all()
    with torch.no_grad():  # one view of test-time augmentation is plain predict (tests/test_two_stage_tta.py)
        single = model([imgs], None, [metas], mode="predict_aug")
    for a, b in zip(single, dets):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_build_model_num_classes_and_predictor_returns_masks() -> None:
    import densedet

    model = densedet.build_model("mask_rcnn_r18_fpn_synth", num_classes=5)
    assert model.num_classes == 5 and model.roi_head.mask_head.conv_logits.out_channels == 5
    torch.manual_seed(0)
    predictor = densedet.Predictor("mask_rcnn_r18_fpn_synth", score_thr=0.0)
    img = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    det = predictor(img)
    assert len(det["masks"]) == len(det["boxes"]) > 0
    assert (det["masks"].height, det["masks"].width) == (70, 90)
    drawn = densedet.draw_detections(img, det["boxes"], det["scores"], det["labels"], predictor.classes,
                                     score_thr=0.0, masks=det["masks"])
    assert drawn.size == (90, 70)


def test_proposal_size_rules_by_hand() -> None:
    """mmdet < 2.13 (``'ge'``): filter only when min_bbox_size > 0 and keep w, h >= it; mmdet >= 2.13 (``'gt'``):
    always keep w, h > min_bbox_size."""
    from densedet.models.heads.rpn_head import proposal_size_valid

    boxes = torch.tensor([[5.0, 0, 5, 9],     # zero width
                          [0, 3, 8, 3],       # zero height
                          [0, 0, 2, 6],       # w == 2
                          [0, 0, 2.5, 3],     # w, h > 2
                          [0, 0, 1, 1]])      # 1 x 1
    assert proposal_size_valid(boxes, 0, "ge").tolist() == [True, True, True, True, True]
    assert proposal_size_valid(boxes, 0, "gt").tolist() == [False, False, True, True, True]
    assert proposal_size_valid(boxes, 2, "ge").tolist() == [False, False, True, True, False]
    assert proposal_size_valid(boxes, 2, "gt").tolist() == [False, False, False, True, False]


@pytest.mark.parametrize("rule", ["ge", "gt"])
def test_rpn_zero_width_proposals_from_padding_anchors_follow_the_rule(rule: str) -> None:
    """A 96x128 batch holding a 64x80 image: anchors on its padding (x1 >= 80 or y1 >= 64) clip to zero-size boxes.
    With zero deltas every proposal is its clipped anchor, so the expected proposals are written from mmdet's steps
    directly: clip, size filter of the version's rule (min_bbox_size 0), NMS 0.7 per level, max_per_img."""
    from torchvision.ops import batched_nms

    torch.manual_seed(0)
    head = RPNHead(in_channels=8, feat_channels=8, min_bbox_rule=rule,
                   test_cfg={"nms_pre": 100000, "max_per_img": 100000, "nms": {"type": "nms", "iou_threshold": 0.7},
                             "min_bbox_size": 0})
    sizes = [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]  # 96x128 at strides 4..64
    cls = [torch.randn(2, 3, h, w) for h, w in sizes]
    reg = [torch.zeros(2, 12, h, w) for h, w in sizes]
    shapes = [(96, 128), (64, 80)]
    metas = [{"img_shape": s, "pad_shape": (96, 128), "batch_input_shape": (96, 128)} for s in shapes]
    got = head.proposals((cls, reg), metas)
    anchors = head.anchor_generator.grid_priors(sizes, dtype=torch.float32, device="cpu")
    for i, (h, w) in enumerate(shapes):
        boxes = torch.cat(anchors)
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                             boxes[:, 3].clamp(0, h)], 1)
        scores = torch.cat([c[i].permute(1, 2, 0).reshape(-1) for c in cls]).sigmoid()  # mmdet's (H, W, A) order
        levels = torch.cat([torch.full((len(a),), k) for k, a in enumerate(anchors)])
        wh = boxes[:, 2:] - boxes[:, :2]
        keep = torch.ones(len(boxes), dtype=torch.bool) if rule == "ge" else (wh > 0).all(1)  # min_bbox_size 0
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        kept = batched_nms(boxes, scores, levels, 0.7)
        want = torch.cat([boxes[kept], scores[kept, None]], 1)
        zero = ((got[i][:, 2] - got[i][:, 0]) * (got[i][:, 3] - got[i][:, 1]) == 0).sum().item()
        assert got[i].shape == want.shape, (rule, i, got[i].shape, want.shape)
        order = lambda t: t[torch.argsort(t[:, 4], descending=True)]  # noqa: E731 - scores are distinct
        torch.testing.assert_close(order(got[i]), order(want))
        if rule == "ge" and i == 1:
            assert zero > 0  # the padding anchors' zero-size boxes are proposals under mmdet < 2.13
        else:
            assert zero == 0
