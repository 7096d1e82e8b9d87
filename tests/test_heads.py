"""Dense heads: losses against an independent per-prior computation, padding invariance, empty ground truth."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou, sigmoid_focal_loss

from densedet.models.heads import ATSSHead, FCOSHead, RetinaHead
from densedet.structures import AnchorGenerator

G = torch.Generator().manual_seed(0)


def _targets(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long), "ignore_boxes": torch.zeros(0, 4)}


def _retina(num_classes=2):
    return RetinaHead(num_classes, in_channels=8, feat_channels=8, stacked_convs=1,
                      anchor_generator={"octave_base_scale": 4, "scales_per_octave": 3, "ratios": [0.5, 1.0, 2.0],
                                        "strides": [8]})


def test_retina_loss_equals_per_prior_reference() -> None:
    head = _retina()
    h = w = 8
    a, c = 9, 2
    cls = torch.randn(1, a * c, h, w, generator=G)
    reg = torch.randn(1, a * 4, h, w, generator=G) * 0.1
    gt = _targets([[5.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 62.0]], [1, 0])
    metas = [{"img_shape": (64, 64), "pad_shape": (64, 64)}]
    losses = head.loss(([cls], [reg]), [gt], metas)

    # Reference, written from the definitions: anchors, IoU, thresholds 0.5 / 0.4, each gt's best anchors
    # positive (min_pos_iou 0), focal loss (alpha .25, gamma 2), L1 on (dx, dy, log dw, log dh) deltas.
    anchors = AnchorGenerator([8], [0.5, 1.0, 2.0], 4, 3).grid_priors([(h, w)], torch.float32, "cpu")[0]
    iou = box_iou(anchors, gt["boxes"])  # (N, 2)
    best, arg = iou.max(1)
    assigned = torch.full((len(anchors),), -1)
    assigned[best < 0.4] = 0
    assigned[best >= 0.5] = arg[best >= 0.5] + 1
    for j in range(2):
        col = iou[:, j]
        assigned[col == col.max()] = j + 1
    pos = assigned > 0
    onehot = torch.zeros(len(anchors), c)
    onehot[pos, gt["labels"][assigned[pos] - 1]] = 1
    cls_flat = cls.permute(0, 2, 3, 1).reshape(-1, c)
    weight = (assigned >= 0).float()[:, None]
    num = max(int(pos.sum()), 1)
    exp_cls = (sigmoid_focal_loss(cls_flat, onehot, 0.25, 2.0, reduction="none") * weight).sum() / num
    g = gt["boxes"][assigned[pos] - 1]
    an = anchors[pos]
    aw, ah = an[:, 2] - an[:, 0], an[:, 3] - an[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    deltas = torch.stack([((g[:, 0] + g[:, 2]) - (an[:, 0] + an[:, 2])) / 2 / aw,
                          ((g[:, 1] + g[:, 3]) - (an[:, 1] + an[:, 3])) / 2 / ah,
                          torch.log(gw / aw), torch.log(gh / ah)], 1)
    reg_flat = reg.permute(0, 2, 3, 1).reshape(-1, 4)
    exp_box = (reg_flat[pos] - deltas).abs().sum() / num
    assert losses["num_pos"] == pos.sum()
    assert torch.allclose(losses["loss_cls"], exp_cls, rtol=1e-5)
    assert torch.allclose(losses["loss_bbox"], exp_box, rtol=1e-5)


@pytest.mark.parametrize("kind", ["retina", "atss"])
def test_anchor_head_loss_ignores_batch_padding(kind) -> None:
    """The same image in a bigger padded batch gives the same loss: padded priors take no part."""
    if kind == "retina":
        head = _retina()
    else:
        head = ATSSHead(2, in_channels=8, feat_channels=8, stacked_convs=1,
                        norm_cfg={"type": "GN", "num_groups": 4},
                        anchor_generator={"ratios": [1.0], "octave_base_scale": 8, "scales_per_octave": 1,
                                          "strides": [8, 16]})
    strides = head.strides
    gt = [_targets([[3.0, 4.0, 50.0, 41.0], [30.0, 2.0, 62.0, 20.0]], [0, 1])]
    meta = [{"img_shape": (64, 64), "pad_shape": (64, 64)}]

    def outs(size):
        levels = []
        for s in strides:
            n = size // s
            levels.append([torch.randn(1, ch, n, n, generator=G) for ch in head_channels(head)])
        return [list(x) for x in zip(*levels)]

    small = outs(64)
    big = outs(128)
    for i, maps in enumerate(small):  # copy the small maps into the top-left of the big ones
        for lvl, m in enumerate(maps):
            big[i][lvl][..., : m.shape[-2], : m.shape[-1]] = m
    a = head.loss(tuple(small), gt, meta)
    b = head.loss(tuple(big), gt, meta)
    for k in a:
        if k.startswith("loss"):
            assert torch.allclose(a[k], b[k], rtol=1e-5), k


def head_channels(head):
    if isinstance(head, RetinaHead):
        return [9 * 2, 9 * 4]
    return [2, 4, 1]


def test_empty_ground_truth_gives_finite_losses_with_graph() -> None:
    for head in (_retina(), ATSSHead(2, 8, 8, 1, norm_cfg={"type": "GN", "num_groups": 4}),
                 FCOSHead(2, 8, 8, 1, norm_cfg={"type": "GN", "num_groups": 4})):
        feats = [torch.randn(2, 8, 128 // s, 128 // s, requires_grad=True) for s in head.strides]
        out = head(feats)
        empty = [_targets([], []), _targets([], [])]
        metas = [{"img_shape": (128, 128), "pad_shape": (128, 128)}] * 2
        losses = head.loss(out, empty, metas)
        total = sum(v for k, v in losses.items() if k.startswith("loss"))
        assert torch.isfinite(total)
        total.backward()  # box branches still take part in the graph (DDP needs every parameter used)
        assert losses["loss_bbox"].item() == 0.0


def test_fcos_centerness_target_closed_form() -> None:
    ltrb = torch.tensor([[10.0, 20.0, 30.0, 5.0], [4.0, 4.0, 4.0, 4.0]])
    expected = torch.tensor([math.sqrt((10 / 30) * (5 / 20)), 1.0])
    assert torch.allclose(FCOSHead.centerness_target(ltrb), expected)


def test_atss_centerness_target_closed_form() -> None:
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0]])  # centre (10, 10)
    gts = torch.tensor([[0.0, 5.0, 40.0, 25.0]])  # l=10 r=30 t=5 b=15
    expected = torch.tensor([math.sqrt((10 / 30) * (5 / 15))])
    assert torch.allclose(ATSSHead.centerness_target(anchors, gts), expected)


def test_fcos_norm_on_bbox_scales_distances_by_stride_at_inference() -> None:
    head = FCOSHead(2, 8, 8, 1, strides=[8, 16], regress_ranges=[(-1, 64), (64, 1e8)], norm_on_bbox=True,
                    norm_cfg={"type": "GN", "num_groups": 4})
    feats = [torch.randn(1, 8, 4, 4, generator=G), torch.randn(1, 8, 2, 2, generator=G)]
    head.train()
    _, train_box, _ = head(feats)
    head.eval()
    _, eval_box, _ = head(feats)
    for lvl, s in enumerate([8, 16]):
        assert (train_box[lvl] >= 0).all()
        assert torch.allclose(eval_box[lvl], train_box[lvl] * s)
