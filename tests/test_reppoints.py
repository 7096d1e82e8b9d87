"""RepPoints head (moment, GN) with focal / varifocal loss: point assigner, points -> box, targets, losses,
a tiny training run, the released checkpoint layout and inference.

Expected values are worked out by hand from the reference (hyz-xmaster/VarifocalNet reppoints_head.py and
MMDetection 2.x point_assigner.py), written next to each case.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F
import torchvision

import densedet
from densedet.assigners import point_assign
from densedet.config import load_config
from densedet.models.heads import RepPointsHead
from densedet.registry import ConfigError
from densedet.structures import pad_targets

LN2 = math.log(2.0)


def gts(*images):
    """images: lists of xyxy boxes; label of box i is i."""
    return pad_targets([{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
                         "labels": torch.arange(len(b))} for b in images])


def grid(stride: int, n: int) -> torch.Tensor:
    """(n*n, 2) points (x, y) at (j * stride, i * stride), row-major."""
    v = torch.arange(n, dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(v, v, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)


def three_levels():
    """Levels of stride 8 (4x4), 16 (2x2), 32 (1x1): points (21, 2), strides (21,)."""
    pts = torch.cat([grid(8, 4), grid(16, 2), grid(32, 1)])
    strides = torch.tensor([8.0] * 16 + [16.0] * 4 + [32.0])
    return pts, strides


def index(pts, strides, x, y, s):
    hit = ((pts[:, 0] == x) & (pts[:, 1] == y) & (strides == s)).nonzero()
    assert hit.numel() == 1
    return int(hit)


def head(**kw) -> RepPointsHead:
    args = dict(num_classes=2, in_channels=8, feat_channels=8, point_feat_channels=8, stacked_convs=1,
                point_strides=[8, 16], norm_cfg={"type": "GN", "num_groups": 4, "requires_grad": True})
    args.update(kw)
    h = RepPointsHead(**args)
    h.init_weights()
    return h


# ------------------------------------------------------------------------------------------ point assigner


def test_point_assigner_level_rule_and_nearest_point():
    pts, strides = three_levels()
    # gt 0: 12x12 -> (log2 3 + log2 3) / 2 = 1.58 -> level 1, clamped up to level 3 (stride 8); centre (8, 8)
    #   sits on the stride-8 point (8, 8).
    # gt 1: 256x16 -> (log2 64 + log2 4) / 2 = 4 -> stride 16 (the log of the mean side, log2(136 / 4) = 5.1,
    #   would pick stride 32); centre (12, 20): (16, 16) at |(4/256, 4/16)| = 0.2505 beats (0, 16) at 0.2544.
    # gt 2: 512x512 -> level 7, clamped down to stride 32, whose only point is (0, 0).
    res = point_assign(pts, strides, gts([[2, 2, 14, 14], [-116, 12, 140, 28], [0, 0, 512, 512]]), scale=4,
                       pos_num=1)
    expect = torch.full((1, 21), -1)
    expect[0, index(pts, strides, 8, 8, 8)] = 0
    expect[0, index(pts, strides, 16, 16, 16)] = 1
    expect[0, index(pts, strides, 0, 0, 32)] = 2
    assert res.gt_inds.tolist() == expect.tolist()
    assert res.max_overlaps.shape == (1, 21)


def test_point_assigner_pos_num_and_ties():
    pts, strides = three_levels()
    # 16x8 box -> (log2 4 + log2 2) / 2 = 1.5 -> stride 8; centre (12, 0), distances in (16, 8) units:
    # (8, 0) and (16, 0) both 0.25 (a tie: the lower point index wins), then (0, 0) and (24, 0) both 0.75
    # (tie again), then (8, 8) at |(0.25, 1)| = 1.03.
    one = point_assign(pts, strides, gts([[4, -4, 20, 4]]), pos_num=1)
    assert (one.gt_inds[0] == 0).nonzero().flatten().tolist() == [index(pts, strides, 8, 0, 8)]
    three = point_assign(pts, strides, gts([[4, -4, 20, 4]]), pos_num=3)
    chosen = sorted((three.gt_inds[0] == 0).nonzero().flatten().tolist())
    assert chosen == sorted([index(pts, strides, 8, 0, 8), index(pts, strides, 16, 0, 8),
                             index(pts, strides, 0, 0, 8)])
    assert int((three.gt_inds == -1).sum()) == 21 - 3


def test_point_assigner_competing_gts_nearest_wins_then_lower_index():
    pts, strides = three_levels()
    p = index(pts, strides, 8, 8, 8)
    # both 16x16 (stride 8). gt 0 centre (10, 8): distance to (8, 8) = 2/16; gt 1 centre (8, 9): 1/16 -> gt 1.
    res = point_assign(pts, strides, gts([[2, 0, 18, 16], [0, 1, 16, 17]]), pos_num=1)
    assert res.gt_inds[0, p] == 1
    # equal distances (2/16 each, mirrored centres): mmdet keeps the earlier gt (overwrites only on '<').
    res = point_assign(pts, strides, gts([[2, 0, 18, 16], [-2, 0, 14, 16]]), pos_num=1)
    assert res.gt_inds[0, p] == 0
    assert int((res.gt_inds[0] >= 0).sum()) == 1


def test_point_assigner_batch_padding_invalid_points_and_empty_images():
    pts, strides = three_levels()
    best = index(pts, strides, 8, 8, 8)
    valid = torch.ones(3, 21, dtype=torch.bool)
    valid[1, best] = False
    # image 0: the nearest point; image 1: that point is on batch padding -> the next nearest of (8, 8)'s ring:
    # centre (9, 8) -> (16, 8) at 7/16 vs (0, 8) at 9/16; image 2: no gt -> all negative.
    g = pad_targets([{"boxes": torch.tensor([[1.0, 0, 17, 16]]), "labels": torch.tensor([1])},
                     {"boxes": torch.tensor([[1.0, 0, 17, 16]]), "labels": torch.tensor([1])},
                     {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}])
    res = point_assign(pts, strides, g, pos_num=1, prior_valid=valid)
    assert res.gt_inds[0].tolist().count(0) == 1 and res.gt_inds[0, best] == 0
    assert res.gt_inds[1, best] == -2
    assert (res.gt_inds[1] == 0).nonzero().flatten().tolist() == [index(pts, strides, 16, 8, 8)]
    assert res.gt_inds[2].tolist() == [-1] * 21


# ------------------------------------------------------------------------------------------ points -> box


def test_moment_transform_closed_form_and_moment_mul_gradient():
    h = head()
    xs = [0.0, 1.0, 3.0, 4.0, 7.0, 2.0, 5.0, 9.0, 6.0]
    ys = [2.0, 2.0, 5.0, 1.0, 0.0, 8.0, 3.0, 4.0, 6.0]
    with torch.no_grad():
        h.moment_transfer.copy_(torch.tensor([0.3, -0.2]))
    box = h.points2bbox(torch.tensor([xs, ys]).t())
    # mean +- unbiased std * exp(moment_transfer) (width: index 0, height: index 1)
    hw, hh = statistics.stdev(xs) * math.exp(0.3), statistics.stdev(ys) * math.exp(-0.2)
    mx, my = statistics.mean(xs), statistics.mean(ys)
    torch.testing.assert_close(box, torch.tensor([mx - hw, my - hh, mx + hw, my + hh]))
    # the parameter's gradient is scaled by moment_mul: d(x2 - x1)/d(mt0) = 2 * hw * moment_mul
    (box[2] - box[0]).backward()
    torch.testing.assert_close(h.moment_transfer.grad, torch.tensor([2 * hw * 0.01, 0.0]))


def test_minmax_transforms():
    pts = torch.tensor([[1.0, 5], [4, 2], [0, 9], [3, 3], [-2, 1], [8, 0], [1, 1], [1, 1], [1, 1]])
    torch.testing.assert_close(head(transform_method="minmax").points2bbox(pts), torch.tensor([-2.0, 0, 8, 9]))
    torch.testing.assert_close(head(transform_method="partial_minmax").points2bbox(pts),
                               torch.tensor([0.0, 2, 4, 9]))


def test_bad_options_raise_config_errors():
    with pytest.raises(ConfigError, match="num_points"):
        head(num_points=4)
    with pytest.raises(ConfigError, match="use_grid_points"):
        head(use_grid_points=True)
    with pytest.raises(ConfigError, match="transform_method"):
        head(transform_method="mean")
    with pytest.raises(ConfigError, match="refine.assigner.type"):
        head(train_cfg={"init": {"assigner": {"type": "PointAssigner"}}, "refine": {"assigner": {"type": "ATSS"}}})
    with pytest.raises(ConfigError, match="pos_nm"):
        head(train_cfg={"init": {"assigner": {"type": "PointAssigner", "pos_nm": 1}}})
    with pytest.raises(ConfigError, match="use_sigmoid"):
        head(loss_cls={"type": "CrossEntropyLoss", "use_sigmoid": False})
    with pytest.raises(ConfigError, match="sampler"):
        head(train_cfg={"init": {"assigner": {"type": "PointAssigner"}}, "sampler": {}})


# ------------------------------------------------------------------------------------------ forward / DCN


def test_deformable_convs_sample_at_the_initial_points():
    """Initial points on the regular 3x3 grid -> zero DCN offsets -> the deformable convs are plain 3x3 convs."""
    h = head().eval()
    with torch.no_grad():
        h.reppoints_pts_init_out.weight.zero_()
        # kernel point k = (i, j) row-major: channels 2k, 2k+1 = (dy, dx) = (i - 1, j - 1)
        h.reppoints_pts_init_out.bias.copy_(torch.tensor([[i - 1.0, j - 1.0] for i in range(3) for j in range(3)])
                                            .flatten())
    x = torch.randn(1, 8, 6, 7)
    cls, pts_init, pts_refine = h.forward_level(x, 0)
    c, r = h.towers(x)
    expect_cls = h.reppoints_cls_out(F.relu(F.conv2d(c, h.reppoints_cls_conv.weight, padding=1)))
    torch.testing.assert_close(cls, expect_cls, atol=1e-5, rtol=1e-4)
    expect_refine = h.reppoints_pts_refine_out(F.relu(F.conv2d(r, h.reppoints_pts_refine_conv.weight, padding=1)))
    torch.testing.assert_close(pts_refine, expect_refine + pts_init, atol=1e-5, rtol=1e-4)
    # one point moved one pixel right: the cls conv now reads the right neighbour for that kernel tap
    with torch.no_grad():
        h.reppoints_pts_init_out.bias[1] += 1.0  # dx of kernel point 0
    cls2, _, _ = h.forward_level(x, 0)
    assert not torch.allclose(cls2, cls)


def test_gradient_mul_scales_the_gradient_reaching_the_initial_points():
    """cls / refine read the initial points through (1 - g) * detach + g * points: same forward, g times the grad."""
    grads = []
    x = torch.randn(1, 8, 5, 5)
    for g in (1.0, 0.1):
        torch.manual_seed(0)
        h = head(gradient_mul=g)
        with torch.no_grad():
            h.reppoints_pts_init_out.weight.mul_(50)  # spread the points so the bilinear sampling has slopes
        cls, _, _ = h.forward_level(x, 0)
        cls.square().sum().backward()
        grads.append(h.reppoints_pts_init_out.bias.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], 0.1 * grads[0])


# ------------------------------------------------------------------------------------------ targets and losses

A = 1.0 / math.sqrt(0.75)  # 3x3 grid of spacing A: unbiased std of (-A, 0, A) x3 = 1 -> box = centre +- stride


def grid_offsets(b: int, h: int, w: int) -> torch.Tensor:
    off = torch.tensor([[(i - 1) * A, (j - 1) * A] for i in range(3) for j in range(3)]).flatten()
    return off.view(1, 18, 1, 1).expand(b, 18, h, w).clone()


def example_outs(batch: int = 1):
    """64x64 image, strides 8 (8x8) and 16 (4x4); every location's points give the box centre +- stride."""
    cls = [torch.zeros(batch, 2, 8, 8, requires_grad=True), torch.zeros(batch, 2, 4, 4, requires_grad=True)]
    pts = [grid_offsets(batch, 8, 8), grid_offsets(batch, 4, 4)]
    return cls, pts, [p.clone() for p in pts]


META = {"img_shape": (64, 64), "pad_shape": (64, 64), "scale_factor": (1.0, 1.0)}
# 18x16 box, label 1: level (log2 4.5 + log2 4) / 2 = 2.1 -> stride 8; centre (17, 16) -> location (16, 16).
GT = [{"boxes": torch.tensor([[8.0, 8, 26, 24]]), "labels": torch.tensor([1])}]


def test_init_and_refine_targets_on_a_constructed_example():
    h = head()
    cls, pts_init, _ = example_outs()
    points, strides, counts = h.points([(8, 8), (4, 4)], torch.device("cpu"))
    assert counts == [64, 16]
    valid = torch.ones(1, 80, dtype=torch.bool)
    g = pad_targets(GT)
    a_init = h.init_targets(points, strides, g, valid)
    loc = 2 * 8 + 2  # (x, y) = (16, 16) on the stride-8 level
    assert (a_init.gt_inds[0] >= 0).nonzero().flatten().tolist() == [loc]
    # proposals = boxes of the initial points = location +- stride
    offsets = torch.cat([p.flatten(2).transpose(1, 2) for p in pts_init], 1)  # (1, 80, 18)
    boxes = h.points2bbox(h.offsets_to_xy(offsets) * strides[None, :, None, None] + points[:, None])
    torch.testing.assert_close(boxes[0, loc], torch.tensor([8.0, 8, 24, 24]))
    a_ref = h.refine_targets(boxes, g, valid)
    # IoU with [8, 8, 26, 24]: (16, 16) box 256/288 = 0.89 -> positive; (24, 16) box [16, 8, 32, 24]:
    # 160/384 = 0.417 -> ignored (0.4 <= IoU < 0.5); every other box < 0.4 -> negative.
    right = 2 * 8 + 3
    expect = [-1] * 80
    expect[loc], expect[right] = 0, -2
    assert a_ref.gt_inds[0].tolist() == expect
    # an invalid proposal is ignored and leaves the gt to the valid ones (mmdet drops it before assigning)
    valid[0, loc] = False
    a_ref = h.refine_targets(boxes, g, valid)
    assert a_ref.gt_inds[0, loc] == -2 and a_ref.gt_inds[0, right] == 0  # 0.417 is now the gt's best: low-quality


def test_losses_focal_closed_form():
    h = head()
    out = h.loss(example_outs(), GT, [META])
    # init box at (16, 16) = [8, 8, 24, 24] vs gt [8, 8, 26, 24]: only x2 differs by 2 px -> 2 / (4 * 8) = 0.0625
    # < beta (the head's default 1/9) -> 0.5 * 0.0625^2 * 9; weights 0.5 (init) and 1.0 (refine); one positive
    # per stage.
    sl1 = 0.5 * 0.0625 ** 2 * 9
    torch.testing.assert_close(out["loss_pts_init"], torch.tensor(0.5 * sl1))
    torch.testing.assert_close(out["loss_pts_refine"], torch.tensor(sl1))
    # logits 0 (p = 0.5): negative element 0.75 * 0.25 * ln2, positive 0.25 * 0.25 * ln2; 80 locations x 2
    # classes, one location ignored (2 elements), the positive has one negative element.
    expect = ((78 * 2 + 1) * 0.75 * 0.25 + 0.25 * 0.25) * LN2
    torch.testing.assert_close(out["loss_cls"], torch.tensor(expect))
    assert out["num_pos"] == 1


def test_ghmc_is_computed_per_level_as_the_reference_loss_single():
    """The reference calls loss_cls once per level (multi_apply over levels). With every logit 0 every valid element
    has g = 0.5 (one bin), so each level's GHM-C is its mean BCE, ln 2, and the head's loss is 2 ln 2 for the two
    levels (one call over all levels would give ln 2)."""
    h = head(loss_cls={"type": "GHMC", "bins": 10, "momentum": 0.0, "use_sigmoid": True, "loss_weight": 1.0})
    out = h.loss(example_outs(), GT, [META])
    torch.testing.assert_close(out["loss_cls"], torch.tensor(2 * LN2))


def test_losses_varifocal_target_is_iou_of_refined_box():
    h = head(use_vfl=True)
    q = 256 / 288  # IoU([8, 8, 24, 24], [8, 8, 26, 24])
    boxes = torch.zeros(1, 3, 4)
    boxes[0, 1] = torch.tensor([8.0, 8, 24, 24])
    gt_boxes = torch.zeros(1, 3, 4)
    gt_boxes[0, 1] = torch.tensor([8.0, 8, 26, 24])
    t = h.vfl_targets(boxes, torch.tensor([[2, 1, 2]]), gt_boxes, torch.tensor([[False, True, False]]))
    torch.testing.assert_close(t, torch.tensor([[[0.0, 0.0], [0.0, q], [0.0, 0.0]]]))
    out = h.loss(example_outs(), GT, [META])
    # negatives: 0.75 * p^2 * ln2 with p = 0.5; positive element: q * BCE(0.5, q) = q * ln2
    expect = ((78 * 2 + 1) * 0.75 * 0.25 + q) * LN2
    torch.testing.assert_close(out["loss_cls"], torch.tensor(expect))
    # the target is detached: the classification loss sends no gradient into the refined points
    cls, pts_init, pts_refine = example_outs()
    pts_refine = [p.requires_grad_() for p in pts_refine]
    h.loss((cls, pts_init, pts_refine), GT, [META])["loss_cls"].backward()
    assert all(p.grad is None for p in pts_refine)


def test_loss_without_gt_and_level_stats():
    h = head(use_vfl=True)
    h.collect_level_stats = True
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    out = h.loss(example_outs(), empty, [META])
    assert out["loss_pts_init"] == 0 and out["loss_pts_refine"] == 0 and out["num_pos"] == 0
    torch.testing.assert_close(out["loss_cls"], torch.tensor(160 * 0.75 * 0.25 * LN2))
    assert out["lvl0_neg"] == 64 and out["lvl1_neg"] == 16 and out["lvl0_pos"] == 0
    torch.testing.assert_close(out["lvl1_neg_cls_loss"], torch.tensor(2 * 0.75 * 0.25 * LN2))


# ------------------------------------------------------------------------------------------ inference


def test_predict_boxes_in_original_image_pixels():
    h = head(test_cfg={"score_thr": 0.3, "nms_pre": 100, "max_per_img": 10})
    cls, _, pts = example_outs()
    cls = [torch.full_like(c, -10.0) for c in cls]
    cls[0][0, 1, 2, 3] = 3.0  # stride 8, row 2, column 3: location (24, 16), class 1
    cls[1][0, 0, 0, 3] = 2.0  # stride 16, row 0, column 3: location (48, 0), box [32, -16, 64, 16] -> clipped
    meta = {"img_shape": (60, 56), "pad_shape": (64, 64), "scale_factor": (2.0, 4.0)}
    res = h.predict((cls, None, pts), [meta])[0]
    # (24, 16) +- 8 = [16, 8, 32, 24] -> / (2, 4, 2, 4); [32, -16, 64, 16] clipped to w 56 -> [32, 0, 56, 16]
    torch.testing.assert_close(res["boxes"], torch.tensor([[8.0, 2, 16, 6], [16.0, 0, 28, 4]]))
    torch.testing.assert_close(res["scores"], torch.sigmoid(torch.tensor([3.0, 2.0])))
    assert res["labels"].tolist() == [1, 0]


# ------------------------------------------------------------------------------------------ model level


def test_tiny_training_loss_falls():
    torch.manual_seed(0)
    model = densedet.build_model("reppoints_r18_fpn_synth")
    images = torch.randn(2, 3, 64, 64)
    images[0, :, 8:40, 16:48] += 2.0
    images[1, :, 24:56, 4:28] -= 2.0
    images = images * 58.0 + 120.0  # as pixels: the detector normalises them (model.data_preprocessor)
    targets = [{"boxes": torch.tensor([[16.0, 8, 48, 40]]), "labels": torch.tensor([0])},
               {"boxes": torch.tensor([[4.0, 24, 28, 56]]), "labels": torch.tensor([2])}]
    metas = [dict(META), dict(META)]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        out = model(images, targets, metas)
        loss = sum(v for k, v in out.items() if k.startswith("loss"))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]


def _rep_points_r50_gn_keys() -> dict[str, tuple]:
    """mmdet state-dict of RepPointsDetector R-50, FPN + head with GN (written from the mmdet/mmcv modules)."""
    sd = torchvision.models.resnet50(weights=None).state_dict()
    keys = {f"backbone.{k}": tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.")}
    for i, cin in enumerate([512, 1024, 2048]):  # ConvModule with GN: conv without bias + gn
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (256, cin, 1, 1)
        keys[f"neck.lateral_convs.{i}.gn.weight"] = keys[f"neck.lateral_convs.{i}.gn.bias"] = (256,)
    for i in range(5):
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (256, 2048 if i == 3 else 256, 3, 3)  # extra conv on_input
        keys[f"neck.fpn_convs.{i}.gn.weight"] = keys[f"neck.fpn_convs.{i}.gn.bias"] = (256,)
    for branch in ("cls_convs", "reg_convs"):
        for i in range(3):
            keys[f"bbox_head.{branch}.{i}.conv.weight"] = (256, 256, 3, 3)
            keys[f"bbox_head.{branch}.{i}.gn.weight"] = keys[f"bbox_head.{branch}.{i}.gn.bias"] = (256,)
    keys["bbox_head.reppoints_cls_conv.weight"] = (256, 256, 3, 3)  # mmcv DeformConv2d: weight only
    keys["bbox_head.reppoints_pts_refine_conv.weight"] = (256, 256, 3, 3)
    keys["bbox_head.reppoints_pts_init_conv.weight"] = (256, 256, 3, 3)
    keys["bbox_head.reppoints_pts_init_conv.bias"] = (256,)
    for name, cout in (("reppoints_cls_out", 80), ("reppoints_pts_init_out", 18), ("reppoints_pts_refine_out", 18)):
        keys[f"bbox_head.{name}.weight"] = (cout, 256, 1, 1)
        keys[f"bbox_head.{name}.bias"] = (cout,)
    keys["bbox_head.moment_transfer"] = (2,)
    return keys


@pytest.mark.parametrize("name", ["reppoints_moment_r50_fpn_gn-neck+head_4x4_1x_coco",
                                  "vfl_reppoints_moment_r50_fpn_gn-neck+head_4x4_1x_coco"])
def test_released_layout_loads_strict(name):
    keys = _rep_points_r50_gn_keys()
    with torch.device("meta"):
        model = densedet.build_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == keys
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randint(0, 5, s, generator=g) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
          for k, s in keys.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    assert model.bbox_head.use_vfl == name.startswith("vfl")
    torch.testing.assert_close(model.bbox_head.moment_transfer, sd["bbox_head.moment_transfer"])


def test_configs_match_the_reference():
    cfg = load_config("vfl_reppoints_moment_r50_fpn_gn-neck+head_4x4_1x_coco")
    head_cfg = cfg.model["bbox_head"]
    assert head_cfg["stacked_convs"] == 3 and head_cfg["gradient_mul"] == 0.1 and head_cfg["point_base_scale"] == 4
    assert head_cfg["loss_bbox_init"] == {"type": "SmoothL1Loss", "beta": 0.11, "loss_weight": 0.5}
    assert cfg.model["train_cfg"]["init"]["assigner"] == {"type": "PointAssigner", "scale": 4, "pos_num": 1}
    assert cfg.model["train_cfg"]["refine"]["assigner"]["pos_iou_thr"] == 0.5
    assert cfg.data.samples_per_gpu == 4 and cfg.schedule.warmup_ratio == 0.1 and cfg.optimizer.lr == 0.01
