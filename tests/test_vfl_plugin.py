"""Varifocal Loss plugged into RetinaNet and ATSS (VarifocalNet, second table): the IoU-aware targets and the loss
against an independent computation from the definitions."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from densedet.assigners import atss_assign
from densedet.losses import FocalLoss, VarifocalLoss, varifocal_loss
from densedet.models.heads import ATSSHead, RetinaHead
from densedet.registry import HEADS, ConfigError
from densedet.structures import AnchorGenerator, pad_targets

G = torch.Generator().manual_seed(3)
GN = {"type": "GN", "num_groups": 4}


def _targets(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long), "ignore_boxes": torch.zeros(0, 4)}


def _decode(anchors: torch.Tensor, deltas: torch.Tensor, stds) -> torch.Tensor:
    """DeltaXYWH decode written out (means 0): centre shift by d*std*size, size scaled by exp(d*std)."""
    d = deltas * torch.tensor(stds)
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2 + d[:, 0] * aw, (anchors[:, 1] + anchors[:, 3]) / 2 + d[:, 1] * ah
    w, h = aw * d[:, 2].exp(), ah * d[:, 3].exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def test_retina_vfl_targets_are_iou_of_decoded_prediction() -> None:
    head = RetinaHead(2, in_channels=8, feat_channels=8, stacked_convs=1, use_vfl=True,
                      anchor_generator={"octave_base_scale": 4, "scales_per_octave": 3, "ratios": [0.5, 1.0, 2.0],
                                        "strides": [8]})
    assert isinstance(head.loss_cls, VarifocalLoss)
    h = w = 8
    cls = torch.randn(1, 9 * 2, h, w, generator=G)
    reg = torch.randn(1, 9 * 4, h, w, generator=G) * 0.2
    gt = _targets([[5.0, 6.0, 40.0, 30.0], [20.0, 20.0, 60.0, 62.0]], [1, 0])
    losses = head.loss(([cls], [reg]), [gt], [{"img_shape": (64, 64), "pad_shape": (64, 64)}])

    # max-IoU assignment from the definition (0.5 / 0.4, each gt's best anchors positive)
    anchors = AnchorGenerator([8], [0.5, 1.0, 2.0], 4, 3).grid_priors([(h, w)], torch.float32, "cpu")[0]
    iou = box_iou(anchors, gt["boxes"])
    best, arg = iou.max(1)
    assigned = torch.full((len(anchors),), -1)
    assigned[best < 0.4] = 0
    assigned[best >= 0.5] = arg[best >= 0.5] + 1
    for j in range(2):
        assigned[iou[:, j] == iou[:, j].max()] = j + 1
    pos = assigned > 0
    reg_flat = reg.permute(0, 2, 3, 1).reshape(-1, 4)
    pred_boxes = _decode(anchors[pos], reg_flat[pos], (1.0, 1.0, 1.0, 1.0))
    gts = gt["boxes"][assigned[pos] - 1]
    q = torch.zeros(len(anchors), 2)
    q[pos, gt["labels"][assigned[pos] - 1]] = box_iou(pred_boxes, gts).diagonal()
    assert (q[pos].sum(1) > 0).all()
    cls_flat = cls.permute(0, 2, 3, 1).reshape(-1, 2)
    weight = (assigned >= 0).float()  # anchors between the thresholds are ignored
    expected = varifocal_loss(cls_flat, q, weight, reduction="sum") / int(pos.sum())
    torch.testing.assert_close(losses["loss_cls"], expected, rtol=1e-4, atol=1e-6)


def test_atss_vfl_targets_and_loss() -> None:
    head = HEADS["ATSSVGFLHead"](2, in_channels=8, feat_channels=8, stacked_convs=1, norm_cfg=GN, use_vfl=True,
                                 anchor_generator={"ratios": [1.0], "octave_base_scale": 8, "scales_per_octave": 1,
                                                   "strides": [8, 16]})
    assert isinstance(head, ATSSHead) and isinstance(head.loss_cls, VarifocalLoss)
    sizes = [(8, 8), (4, 4)]
    cls = [torch.randn(1, 2, *s, generator=G) for s in sizes]
    reg = [torch.randn(1, 4, *s, generator=G) * 0.3 for s in sizes]
    ctr = [torch.randn(1, 1, *s, generator=G) for s in sizes]
    gt = _targets([[3.0, 4.0, 50.0, 41.0], [30.0, 2.0, 62.0, 20.0]], [0, 1])
    losses = head.loss((cls, reg, ctr), [gt], [{"img_shape": (64, 64), "pad_shape": (64, 64)}])

    gen = AnchorGenerator([8, 16], [1.0], 8, 1)
    per_level = gen.grid_priors(sizes, torch.float32, "cpu")
    anchors = torch.cat(per_level)
    res = atss_assign(anchors, [len(p) for p in per_level], pad_targets([gt]), topk=9)
    pos = res.pos_mask[0]
    gt_idx = res.gt_inds[0][pos]  # >= 0: index of the assigned gt (-1 negative, -2 ignored)
    flat = lambda maps, c: torch.cat([m.permute(0, 2, 3, 1).reshape(-1, c) for m in maps])  # noqa: E731
    pred = _decode(anchors[pos], flat(reg, 4)[pos], (0.1, 0.1, 0.2, 0.2))
    q = torch.zeros(len(anchors), 2)
    q[pos, gt["labels"][gt_idx]] = box_iou(pred, gt["boxes"][gt_idx]).diagonal().clamp(min=1e-6)
    num_pos = max(int(pos.sum()), 1)
    expected = varifocal_loss(flat(cls, 2), q, reduction="sum") / num_pos  # one unpadded image: every prior counts
    torch.testing.assert_close(losses["loss_cls"], expected, rtol=1e-4, atol=1e-6)

    # the box / centerness terms are those of plain ATSS
    fl = ATSSHead(2, in_channels=8, feat_channels=8, stacked_convs=1, norm_cfg=GN,
                  anchor_generator={"ratios": [1.0], "octave_base_scale": 8, "scales_per_octave": 1,
                                    "strides": [8, 16]})
    plain = fl.loss((cls, reg, ctr), [gt], [{"img_shape": (64, 64), "pad_shape": (64, 64)}])
    assert isinstance(fl.loss_cls, FocalLoss)
    for k in ("loss_bbox", "loss_centerness"):
        torch.testing.assert_close(losses[k], plain[k])


@pytest.mark.parametrize("make", [
    lambda: RetinaHead(2, 8, 8, 1, use_vfl=True),
    lambda: ATSSHead(2, 8, 8, 1, norm_cfg=GN, use_vfl=True),
])
def test_vfl_heads_log_level_stats_and_backprop(make) -> None:
    head = make()
    head.collect_level_stats = True  # the trainer's logged iterations
    feats = [torch.randn(2, 8, 128 // s, 128 // s, requires_grad=True) for s in head.strides]
    targets = [_targets([[10.0, 12.0, 70.0, 90.0]], [1]), _targets([], [])]
    losses = head.loss(head(feats), targets, [{"img_shape": (128, 128), "pad_shape": (128, 128)}] * 2)
    assert "lvl0_pos_cls_loss" in losses and torch.isfinite(losses["lvl0_neg_cls_loss"])
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    assert feats[0].grad is not None


def test_vfl_switch_errors() -> None:
    with pytest.raises(ConfigError, match="use_gfl"):
        ATSSHead(2, 8, 8, 1, norm_cfg=GN, use_gfl=True)
    with pytest.raises(ConfigError, match="VarifocalLoss"):
        RetinaHead(2, 8, 8, 1, use_vfl=True, loss_cls_vfl={"type": "FocalLoss"})


@pytest.mark.parametrize("kind", ["retina", "atss"])
def test_vfl_loss_ignores_batch_padding(kind) -> None:
    """The same image in a bigger padded batch gives the same VFL loss: padded priors are not negatives."""
    if kind == "retina":
        head = RetinaHead(2, 8, 8, 1, use_vfl=True, anchor_generator={
            "octave_base_scale": 4, "scales_per_octave": 3, "ratios": [0.5, 1.0, 2.0], "strides": [8, 16]})
        channels = [9 * 2, 9 * 4]
    else:
        head = ATSSHead(2, 8, 8, 1, norm_cfg=GN, use_vfl=True, anchor_generator={
            "ratios": [1.0], "octave_base_scale": 8, "scales_per_octave": 1, "strides": [8, 16]})
        channels = [2, 4, 1]
    gt = [_targets([[3.0, 4.0, 50.0, 41.0], [30.0, 2.0, 62.0, 20.0]], [0, 1])]
    meta = [{"img_shape": (64, 64), "pad_shape": (64, 64)}]
    small = [[torch.randn(1, ch, 64 // s, 64 // s, generator=G) for s in head.strides] for ch in channels]
    big = [[torch.randn(1, ch, 128 // s, 128 // s, generator=G) for s in head.strides] for ch in channels]
    for i, maps in enumerate(small):
        for lvl, m in enumerate(maps):
            big[i][lvl][..., : m.shape[-2], : m.shape[-1]] = m
    a, b = head.loss(tuple(small), gt, meta), head.loss(tuple(big), gt, meta)
    for k in ("loss_cls", "loss_bbox"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,keys", [("vfl_retinanet_r50_fpn_4x4_1x_coco", "retinanet"),
                                       ("retinanet_r50_fpn_4x4_1x_coco", "retinanet"),
                                       ("vfl_atss_r50_fpn_1x_coco", "atss")])
def test_vfl_release_layouts_load_strict(name: str, keys: str) -> None:
    """VarifocalNet's RetinaNet/ATSS + FL/VFL checkpoints have the plain heads' layers (VFL changes only the loss):
    the hand-written MMDetection key lists of tests/test_checkpoint_layout.py load with strict=True."""
    from test_checkpoint_layout import _check, atss_r50_keys, retinanet_r50_keys

    _check(name, retinanet_r50_keys() if keys == "retinanet" else atss_r50_keys())
