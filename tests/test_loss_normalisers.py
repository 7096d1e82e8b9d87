"""Loss normalisers of the ATSS-family heads as their reference mmdet versions compute them.

- Every image counts at least one positive (mmdet ``get_targets``: ``sum(max(inds.numel(), 1))``), so a batch with an
  image without positives is normalised by ``positives + 1`` (ATSS, UMOP's LRPHead).
- The centerness-weighted box loss divides by the centerness-target sum with the floor of the seed's mmdet version:
  ``'eps'`` (mmdet 2.10, VarifocalNet: only sums < 1e-12 become 1) or ``'clamp1'`` (mmdet 2.14, UMOP: ``max(sum, 1)``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

import densedet
from densedet.models.heads import ATSSHead, LRPHead
from densedet.models.heads.anchor_heads import centerness_normaliser
from densedet.models.heads.dense_head import flatten_levels
from densedet.registry import ConfigError

KW = {"num_classes": 3, "in_channels": 8, "feat_channels": 8, "stacked_convs": 1,
      "norm_cfg": {"type": "GN", "num_groups": 4},
      "anchor_generator": {"octave_base_scale": 4, "scales_per_octave": 1, "ratios": [1.0], "strides": [8, 16]}}
METAS = [{"img_shape": (64, 64), "pad_shape": (64, 64)}] * 2


def _t(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long), "ignore_boxes": torch.zeros(0, 4)}


def _outs(head, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 8, 4, 4, generator=g)]
    with torch.no_grad():
        return head(feats)


def _direct(head, outs, targets):
    """Per-image sums written from the definitions on the head's assignment (tested in test_assigners.py):
    focal loss over valid priors, centerness BCE and centerness-weighted GIoU x 2 over the positives."""
    cls_scores, bbox_preds, ctrs = outs
    t = head.assign_anchors(cls_scores, targets, METAS)
    x = flatten_levels(cls_scores, 3)
    onehot = F.one_hot(t.labels, 4)[..., :3].float()
    focal = (sigmoid_focal_loss(x, onehot, alpha=0.25, gamma=2.0, reduction="none")
             * t.label_weights[..., None]).sum()
    pos = t.pos
    anchors = t.priors.expand(2, -1, -1)[pos]
    gts = t.gt_boxes[pos]
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    lr = torch.stack([cx - gts[:, 0], gts[:, 2] - cx], 1)
    tb = torch.stack([cy - gts[:, 1], gts[:, 3] - cy], 1)
    ctr_t = torch.sqrt(lr.min(1).values / lr.max(1).values * tb.min(1).values / tb.max(1).values)
    ctr_pred = flatten_levels(ctrs, 1)[..., 0][pos]
    bce = F.binary_cross_entropy_with_logits(ctr_pred, ctr_t, reduction="sum")
    boxes = head.bbox_coder.decode(anchors, flatten_levels(bbox_preds, 4)[pos])
    giou = 2.0 * (generalized_box_iou_loss(boxes, gts, reduction="none") * ctr_t).sum()
    return pos, focal, bce, giou, ctr_t.sum()


@pytest.mark.parametrize("cls", [ATSSHead, LRPHead])
def test_an_image_without_positives_counts_one_in_the_normaliser(cls) -> None:
    torch.manual_seed(0)
    head = cls(**KW)
    outs = _outs(head)
    targets = [_t([[6.0, 8.0, 40.0, 44.0], [30.0, 20.0, 60.0, 58.0]], [0, 2]), _t([], [])]
    losses = head.loss(outs, targets, METAS)
    pos, focal, bce, _, _ = _direct(head, outs, targets)
    p = int(pos.sum())
    assert p > 0 and int(pos[1].sum()) == 0
    torch.testing.assert_close(losses["loss_centerness"], bce / (p + 1), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(losses["loss_centerness"], bce / p, rtol=1e-3)
    if cls is ATSSHead:  # (LRPHead's progressive focal loss has its own test in test_umop.py, same normaliser)
        torch.testing.assert_close(losses["loss_cls"], focal / (p + 1), rtol=1e-5, atol=1e-7)
    else:
        lvl_sum = sum(losses[f"lvl{i}_loss_cls"] for i in range(2))
        torch.testing.assert_close(losses["loss_cls"].detach(), lvl_sum)
    # both images with positives: the plain count (max(#pos, 1) changes nothing)
    both = [targets[0], _t([[10.0, 4.0, 50.0, 40.0]], [1])]
    losses = head.loss(outs, both, METAS)
    pos, _, bce, _, _ = _direct(head, outs, both)
    assert int(pos[0].sum()) > 0 and int(pos[1].sum()) > 0
    torch.testing.assert_close(losses["loss_centerness"], bce / int(pos.sum()), rtol=1e-5, atol=1e-7)


def test_centerness_normaliser_rules() -> None:
    assert centerness_normaliser(0.0, "eps") == 1.0 and centerness_normaliser(5e-13, "eps") == 1.0
    assert centerness_normaliser(0.3, "eps") == 0.3 and centerness_normaliser(0.3, "clamp1") == 1.0
    assert centerness_normaliser(0.0, "clamp1") == 1.0
    assert centerness_normaliser(2.5, "eps") == centerness_normaliser(2.5, "clamp1") == 2.5
    with pytest.raises(ConfigError, match="centerness_norm"):
        ATSSHead(**KW, centerness_norm="one")


@pytest.mark.parametrize("cls", [ATSSHead, LRPHead])
@pytest.mark.parametrize("rule", ["eps", "clamp1"])
def test_centerness_weighted_box_loss_with_a_sum_below_one(cls, rule: str) -> None:
    """One small off-centre object per image: the centerness targets sum to less than 1, where the rules differ."""
    torch.manual_seed(0)
    head = cls(**KW, centerness_norm=rule)
    outs = _outs(head, seed=1)
    targets = [_t([[3.0, 3.0, 9.0, 9.0]], [0]), _t([[53.0, 53.0, 61.0, 61.0]], [1])]
    losses = head.loss(outs, targets, METAS)
    pos, _, _, giou, ctr_sum = _direct(head, outs, targets)
    assert int(pos.sum()) > 0 and 0 < ctr_sum < 1
    expected = giou / (ctr_sum if rule == "eps" else 1.0)
    torch.testing.assert_close(losses["loss_bbox"], expected, rtol=1e-5, atol=1e-7)


FAMILIES = {
    # plain mmdet ATSS configs (the VarifocalNet seed's FL baseline; mmdet 2.10) and VarifocalNet's vfl_atss: eps
    "atss_r50_fpn_1x_coco": "eps", "atss_r101_fpn_1x_coco": "eps", "atss_r18_fpn_synth": "eps",
    "vfl_atss_r50_fpn_1x_coco": "eps",
    # UMOP (mmdet 2.14): clamp at 1
    "umop_r50_fpn_1x_coco": "clamp1", "umop_r101_fpn_1.5x_coco": "clamp1",
    "umop_swin-S_fpn_2x_coco_mstrain": "clamp1",
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_config_family_gets_its_seeds_rule(name: str) -> None:
    cfg = densedet.load_config(name)
    head_cfg = {k: v for k, v in cfg.model["bbox_head"].items() if k not in ("type",)}
    head_cfg.update(in_channels=8, feat_channels=8, stacked_convs=1, norm_cfg=KW["norm_cfg"])
    cls = {"ATSSHead": ATSSHead, "ATSSVGFLHead": ATSSHead, "LRPHead": LRPHead}[cfg.model["bbox_head"]["type"]]
    assert cls(**head_cfg).centerness_norm == FAMILIES[name]
