"""FCOSHead's torchvision-recipe options (issue 13): ``bbox_loss_weighting`` and ``scale_per_level``.

Expectations: a hand-computed GIoU example, and torchvision's own ``FCOS.compute_loss`` on the same raw outputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from densedet.config import ConfigError
from densedet.models.heads.fcos_head import FCOSHead

GIOU = {"type": "GIoULoss", "loss_weight": 1.0}


def make_head(**kw) -> FCOSHead:
    args = {"num_classes": 2, "in_channels": 8, "feat_channels": 8, "stacked_convs": 1, "strides": (8, 16),
            "regress_ranges": ((-1, 64), (64, 1e8)), "norm_cfg": {"type": "GN", "num_groups": 4},
            "loss_bbox": GIOU}
    args.update(kw)
    head = FCOSHead(**args)
    head.init_weights()
    return head


def giou_loss_by_hand(p: tuple[float, ...], g: tuple[float, ...]) -> float:
    """1 - GIoU of two xyxy boxes (Rezatofighi et al. 2019, eq. in Alg. 1)."""
    iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
    ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
    inter = iw * ih
    union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
    hull = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
    return 1.0 - (inter / union - (hull - union) / hull)


def one_box_case() -> tuple[tuple, list, list, float, float]:
    """Level 0 (stride 8): 6x6 points at 4, 12, ..., 44; level 1 (stride 16): 3x3. One gt [2, 2, 30, 14], every
    predicted distance 6 px. Returns (outs, targets, metas, centerness-weighted loss, uniform loss) by hand."""
    gt = (2.0, 2.0, 30.0, 14.0)
    cls = [torch.zeros(1, 2, 6, 6), torch.zeros(1, 2, 3, 3)]
    bbox = [torch.full((1, 4, 6, 6), 6.0), torch.full((1, 4, 3, 3), 6.0)]
    ctr = [torch.zeros(1, 1, 6, 6), torch.zeros(1, 1, 3, 3)]
    # positives: stride-8 points strictly inside the gt (x in 4..28, y in 4, 12); max distance <= 64 -> level 0
    losses, weights = [], []
    for y in (4.0, 12.0):
        for x in (4.0, 12.0, 20.0, 28.0):
            left, t, r, b = x - gt[0], y - gt[1], gt[2] - x, gt[3] - y
            weights.append(math.sqrt(min(left, r) / max(left, r) * min(t, b) / max(t, b)))
            losses.append(giou_loss_by_hand((x - 6, y - 6, x + 6, y + 6), gt))
    weighted = sum(w * v for w, v in zip(weights, losses)) / sum(weights)
    uniform = sum(losses) / len(losses)
    targets = [{"boxes": torch.tensor([gt]), "labels": torch.tensor([1]), "ignore_boxes": torch.zeros(0, 4)}]
    metas = [{"img_shape": (48, 48), "scale_factor": (1.0, 1.0)}]
    return (cls, bbox, ctr), targets, metas, weighted, uniform


def test_bbox_loss_weighting_centerness_and_uniform_by_hand():
    outs, targets, metas, weighted, uniform = one_box_case()
    assert abs(weighted - uniform) > 1e-3  # the example tells the two rules apart
    default = make_head().loss(outs, targets, metas)
    assert default["num_pos"].item() == 8
    assert default["loss_bbox"].item() == pytest.approx(weighted, rel=1e-5)
    uni = make_head(bbox_loss_weighting="uniform").loss(outs, targets, metas)
    assert uni["loss_bbox"].item() == pytest.approx(uniform, rel=1e-5)
    # the other losses do not depend on the option
    for key in ("loss_cls", "loss_centerness"):
        assert uni[key].item() == pytest.approx(default[key].item(), rel=1e-6)


def test_bbox_loss_weighting_rejects_unknown_value():
    with pytest.raises(ConfigError, match="bbox_loss_weighting"):
        make_head(bbox_loss_weighting="iou")


@pytest.mark.parametrize("norm_on_bbox", [True, False])
def test_scale_per_level_off_has_no_scale(norm_on_bbox):
    bias = torch.tensor([1.0, 2.0, 3.0, 0.5])
    with_scale = make_head(norm_on_bbox=norm_on_bbox)
    without = make_head(norm_on_bbox=norm_on_bbox, scale_per_level=False)
    assert not any("scales" in k for k in without.state_dict())
    assert {f"scales.{i}.scale" for i in range(2)} <= set(with_scale.state_dict())
    feats = [torch.randn(1, 8, 4, 4), torch.randn(1, 8, 2, 2)]
    for head in (with_scale, without):
        torch.nn.init.zeros_(head.conv_reg.weight)
        head.conv_reg.bias.data.copy_(bias)
    with torch.no_grad():
        with_scale.scales[1].scale.fill_(3.0)
        for train in (True, False):
            with_scale.train(train)
            without.train(train)
            got = [without(feats)[1][lvl][0, :, 0, 0] for lvl in range(2)]
            scaled = with_scale(feats)[1][1][0, :, 0, 0]
            for lvl, stride in enumerate((8, 16)):
                if norm_on_bbox:  # relu(conv) in stride units, times the stride at test time
                    expect = bias * (1 if train else stride)
                else:  # exp(conv) in pixels
                    expect = bias.exp()
                torch.testing.assert_close(got[lvl], expect)
            # with the Scale the level-1 output uses 3 * conv
            expect = (3 * bias) * (1 if train else 16) if norm_on_bbox else (3 * bias).exp()
            torch.testing.assert_close(scaled, expect)


def test_torchvision_recipe_matches_torchvision_fcos_losses():
    """With center sampling, norm_on_bbox, uniform GIoU and focal/BCE defaults, DenseDet's FCOS loss equals
    torchvision's ``FCOS.compute_loss`` on the same raw head outputs, points and gt boxes."""
    tv_fcos = pytest.importorskip("torchvision.models.detection.fcos")
    torch.manual_seed(0)
    strides = (8, 16, 32, 64, 128)
    sizes = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]  # a 128 x 160 input
    nc = 3
    head = FCOSHead(num_classes=nc, in_channels=8, feat_channels=8, stacked_convs=1, strides=strides,
                    center_sampling=True, norm_on_bbox=True, centerness_on_reg=True, loss_bbox=GIOU,
                    bbox_loss_weighting="uniform", scale_per_level=False, norm_cfg={"type": "GN", "num_groups": 4})
    b = 2
    cls = [torch.randn(b, nc, h, w) for h, w in sizes]
    bbox = [torch.rand(b, 4, h, w) * 3 for h, w in sizes]  # >= 0: relu-ed, stride units
    ctr = [torch.randn(b, 1, h, w) for h, w in sizes]
    boxes = [torch.tensor([[10.3, 12.1, 50.7, 40.2], [60.5, 20.2, 150.1, 120.9], [30.2, 70.4, 44.9, 90.6]]),
             torch.tensor([[5.1, 5.3, 120.2, 110.7], [70.3, 80.6, 100.2, 101.1]])]
    labels = [torch.tensor([0, 2, 1]), torch.tensor([1, 0])]
    targets = [{"boxes": bx, "labels": lb, "ignore_boxes": torch.zeros(0, 4)} for bx, lb in zip(boxes, labels)]
    metas = [{"img_shape": (128, 160), "scale_factor": (1.0, 1.0)}] * b
    ours = head.loss((cls, bbox, ctr), targets, metas)

    # torchvision: anchors of side = stride centred on DenseDet's points (torchvision's own AnchorGenerator puts
    # them at j * stride, half a stride off; the assignment and the losses are what is compared here)
    points, per_level = head.points(sizes, torch.device("cpu"), torch.float32)
    s = torch.repeat_interleave(torch.tensor(strides, dtype=torch.float32), torch.tensor(per_level))[:, None]
    anchors = torch.cat([points - s / 2, points + s / 2], 1)

    def flat(maps, c):
        return torch.cat([m.permute(0, 2, 3, 1).reshape(b, -1, c) for m in maps], 1)

    outs = {"cls_logits": flat(cls, nc), "bbox_regression": flat(bbox, 4), "bbox_ctrness": flat(ctr, 1)}
    tv_head = tv_fcos.FCOSHead(32, 1, nc, num_convs=1)  # only its compute_loss is used

    class Stub:  # FCOS.compute_loss only needs these attributes
        center_sampling_radius = 1.5
        head = tv_head

    ref = tv_fcos.FCOS.compute_loss(Stub(), [{"boxes": bx, "labels": lb} for bx, lb in zip(boxes, labels)], outs,
                                    [anchors] * b, per_level)
    assert ours["num_pos"].item() > 10
    torch.testing.assert_close(ours["loss_cls"], ref["classification"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["loss_bbox"], ref["bbox_regression"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["loss_centerness"], ref["bbox_ctrness"], rtol=1e-5, atol=1e-6)
