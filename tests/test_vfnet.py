"""VFNetHead: star-shaped DCN offsets, box refinement and decoding, IoU-aware targets and losses against direct
per-prior computations written from the paper / reference definitions, and a tiny VFNet that learns."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou, deform_conv2d, generalized_box_iou, sigmoid_focal_loss

import densedet
from densedet.assigners import atss_assign, expand_regress_ranges, fcos_assign
from densedet.config import list_configs, load_config
from densedet.models.heads import VFNetHead, star_dcn_offset
from densedet.registry import ConfigError
from densedet.structures import AnchorGenerator, pad_targets

STRIDES = [8, 16]
KW = dict(num_classes=3, in_channels=16, feat_channels=16, stacked_convs=1, strides=STRIDES,
          regress_ranges=[(-1, 64), (64, 1e8)], norm_cfg={"type": "GN", "num_groups": 4},
          anchor_generator={"ratios": [1.0], "octave_base_scale": 8, "scales_per_octave": 1, "strides": STRIDES})


def _t(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long)}


def _head(**extra) -> VFNetHead:
    torch.manual_seed(0)
    head = VFNetHead(**{**KW, **extra})
    head.init_weights()
    return head


# ------------------------------------------------------------------------------------------------ star offsets
def test_star_offsets_of_a_known_box() -> None:
    # (l, t, r, b) = (8, 16, 24, 32) px at stride 8 -> (1, 2, 3, 4) cells. Star points (dy, dx), kernel row-major:
    # (-t,-l) (-t,0) (-t,r) (0,-l) (0,0) (0,r) (b,-l) (b,0) (b,r); minus the regular grid (ky, kx).
    bbox = torch.tensor([8.0, 16.0, 24.0, 32.0]).view(1, 4, 1, 1)
    off = star_dcn_offset(bbox, 0.1, 8)
    expected = [-1, 0, -1, 0, -1, 2, 0, 0, 0, 0, 0, 2, 3, 0, 3, 0, 3, 2]
    assert off.shape == (1, 18, 1, 1)
    assert off.flatten().tolist() == pytest.approx(expected)


def test_star_offsets_make_the_dconv_sample_the_box_points() -> None:
    # Input value 100*y + x; a one-hot kernel on point k returns the input at the k-th star point.
    h = w = 16
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    x = (100 * ys + xs).view(1, 1, h, w)
    bbox = torch.tensor([2.0, 3.0, 4.0, 1.0]).view(1, 4, 1, 1).expand(1, 4, h, w) * 8  # stride 8 -> cells
    off = star_dcn_offset(bbox, 0.1, 8)
    y0, x0 = 6, 7
    points = [(-3, -2), (-3, 0), (-3, 4), (0, -2), (0, 0), (0, 4), (1, -2), (1, 0), (1, 4)]
    for k, (dy, dx) in enumerate(points):
        weight = torch.zeros(1, 1, 3, 3)
        weight.view(-1)[k] = 1.0
        out = deform_conv2d(x, off, weight, padding=1)
        assert out[0, 0, y0, x0].item() == pytest.approx(100 * (y0 + dy) + (x0 + dx)), k


def test_star_offsets_pass_gradient_mul_of_the_gradient() -> None:
    bbox = torch.full((1, 4, 2, 2), 16.0, requires_grad=True)
    star_dcn_offset(bbox, 0.1, 8).sum().backward()
    # each of l, t enters three times negated, r, b three times; scaled by 0.1 / stride
    per_side = torch.tensor([-3.0, -3.0, 3.0, 3.0]) * 0.1 / 8
    assert torch.allclose(bbox.grad, per_side.view(1, 4, 1, 1).expand(1, 4, 2, 2))


# ---------------------------------------------------------------------------------------- forward and decoding
def test_forward_exp_denominators_and_refinement() -> None:
    head = _head()
    head.eval()
    d = torch.tensor([10.0, 20.0, 30.0, 40.0])
    with torch.no_grad():
        for conv, bias in ((head.vfnet_reg, torch.log(d / 64)), (head.vfnet_reg_refine, torch.log(torch.tensor(
                [0.5, 1.0, 2.0, 1.5])))):
            conv.weight.zero_()
            conv.bias.copy_(bias)
        head.scales_refine[1].scale.fill_(1.0)
    feats = [torch.randn(1, 16, 6, 6), torch.randn(1, 16, 3, 3)]
    cls, init, refine = head(feats)
    assert cls[0].shape == (1, 3, 6, 6) and init[1].shape == (1, 4, 3, 3)
    # reg_denom: level 0 bound 64 -> exactly d; level 1 (last) bound = 2 * 64 -> 2 d
    assert torch.allclose(init[0], d.view(1, 4, 1, 1).expand(1, 4, 6, 6))
    assert torch.allclose(init[1], 2 * d.view(1, 4, 1, 1).expand(1, 4, 3, 3))
    assert torch.allclose(refine[0], (d * torch.tensor([0.5, 1.0, 2.0, 1.5])).view(1, 4, 1, 1).expand(1, 4, 6, 6))
    stride_head = _head(bbox_norm_type="stride")
    stride_head.load_state_dict(head.state_dict())
    _, init_s, _ = stride_head(feats)
    assert torch.allclose(init_s[1], d.view(1, 4, 1, 1) * 16 / 64)


@pytest.mark.parametrize("use_atss, offset", [(True, 0.0), (False, 0.5)])
def test_predict_decodes_the_refined_box_from_its_point(use_atss: bool, offset: float) -> None:
    head = _head(use_atss=use_atss)
    cls = [torch.full((1, 3, 8, 8), -10.0), torch.full((1, 3, 4, 4), -10.0)]
    cls[0][0, 2, 3, 5] = 5.0  # class 2 at level 0, row 3, column 5
    init = [torch.ones(1, 4, 8, 8), torch.ones(1, 4, 4, 4)]
    refine = [torch.ones(1, 4, 8, 8), torch.ones(1, 4, 4, 4)]
    refine[0][0, :, 3, 5] = torch.tensor([10.0, 20.0, 30.0, 40.0])
    metas = [{"img_shape": (60, 64), "pad_shape": (64, 64), "scale_factor": (0.5, 0.25)}]
    res = head.predict((cls, init, refine), metas, rescale=True)[0]
    px, py = (5 + offset) * 8, (3 + offset) * 8
    box = [px - 10, py - 20, min(px + 30, 64), min(py + 40, 60)]  # clipped to img_shape (h 60, w 64)
    expected = torch.tensor(box) / torch.tensor([0.5, 0.25, 0.5, 0.25])
    assert res["labels"].tolist() == [2]
    assert res["scores"].item() == pytest.approx(1 / (1 + math.exp(-5.0)), rel=1e-6)
    assert torch.allclose(res["boxes"][0], expected)


# ---------------------------------------------------------------------------------------------- targets, loss
def _vfl_direct(x: torch.Tensor, q: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Varifocal loss of the paper, eq. 2, element-wise: -q(q log p + (1-q) log(1-p)) if q > 0, else
    -alpha p^gamma log(1-p)."""
    p = torch.sigmoid(x.double())
    q = q.double()
    pos = -q * (q * torch.log(p) + (1 - q) * torch.log(1 - p))
    neg = -alpha * p.pow(gamma) * torch.log(1 - p)
    return torch.where(q > 0, pos, neg)


def _outs(head: VFNetHead, b: int = 2, size: int = 96, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(b, 16, size // s, size // s, generator=g) for s in STRIDES]
    return head(feats)


TARGETS = [_t([[10.0, 12.0, 70.0, 80.0], [40.0, 30.0, 90.0, 95.0]], [1, 2]), _t([[8.0, 4.0, 60.0, 58.0]], [0])]
# image 1 is 64x64 inside the 96x96 batch: its priors beyond 64 px are batch padding
METAS = [{"img_shape": (96, 96), "pad_shape": (96, 96), "scale_factor": (1.0, 1.0)},
         {"img_shape": (64, 64), "pad_shape": (64, 64), "scale_factor": (1.0, 1.0)}]


def _assignment(head: VFNetHead, sizes, use_atss: bool):
    """Positives / labels / gt boxes from the assigners (tested in test_assigners) and the valid mask by hand."""
    gt = pad_targets(TARGETS)
    if use_atss:
        anchors = AnchorGenerator(STRIDES, [1.0], 8, 1).grid_priors(sizes)
        per_level = [a.shape[0] for a in anchors]
        valid = []
        for img in (96, 64):  # a prior is valid when its location lies inside ceil(pad / stride)
            valid.append(torch.cat([((torch.arange(h).view(-1, 1) < math.ceil(img / s)) &
                                     (torch.arange(w).view(1, -1) < math.ceil(img / s))).flatten()
                                    for (h, w), s in zip(sizes, STRIDES)]))
        valid = torch.stack(valid)
        assign = atss_assign(torch.cat(anchors), per_level, gt, topk=9, prior_valid=valid)
        pos = assign.pos_mask & valid
        weight = valid.float()
        offset = 0.0
    else:
        offset = 0.5
        pts = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + offset) * s, (torch.arange(h) + offset) * s,
                                                    indexing="xy"), -1).reshape(-1, 2).float()
                         for (h, w), s in zip(sizes, STRIDES)])
        per_level = [h * w for h, w in sizes]
        strides = torch.cat([torch.full((n,), float(s)) for n, s in zip(per_level, STRIDES)])
        assign, _ = fcos_assign(pts, strides, expand_regress_ranges([(-1, 64), (64, 1e8)], per_level), gt)
        pos = assign.pos_mask
        weight = torch.ones(pos.shape)
    labels, boxes = assign.gather(gt.gt_labels, gt.gt_boxes, 3)
    points = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + offset) * s, (torch.arange(h) + offset) * s,
                                                   indexing="xy"), -1).reshape(-1, 2).float()
                        for (h, w), s in zip(sizes, STRIDES)])
    return pos, labels, boxes, weight, points


def _flat(maps, c):
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, c) for m in maps], 1)


@pytest.mark.parametrize("use_atss", [True, False])
def test_loss_equals_direct_computation(use_atss: bool) -> None:
    head = _head(use_atss=use_atss)
    head.collect_level_stats = True
    outs = _outs(head)
    losses = head.loss(outs, TARGETS, METAS)
    sizes = [tuple(m.shape[-2:]) for m in outs[0]]
    pos, labels, gt_boxes, weight, points = _assignment(head, sizes, use_atss)
    assert pos.sum() > 0 and losses["num_pos"].item() == pos.sum().item()

    cls = _flat(outs[0], 3).detach()
    init, refine = _flat(outs[1], 4).detach(), _flat(outs[2], 4).detach()
    q = torch.zeros_like(cls)
    box_terms = {"init": [0.0, 0.0], "refine": [0.0, 0.0]}
    for b, n in pos.nonzero().tolist():
        px, py = points[n].tolist()
        gt = gt_boxes[b, n].view(1, 4)
        for name, dist in (("init", init), ("refine", refine)):
            dl, dt, dr, db = dist[b, n].tolist()
            box = torch.tensor([[px - dl, py - dt, px + dr, py + db]])
            iou = max(box_iou(box, gt).item(), 1e-6)
            box_terms[name][0] += iou * (1 - generalized_box_iou(box, gt).item())
            box_terms[name][1] += iou
            if name == "refine":
                q[b, n, labels[b, n]] = iou  # IoU-aware target at the gt class only
    num_pos = pos.sum().item()
    vfl = (_vfl_direct(cls, q) * weight[..., None]).sum().item() / num_pos
    assert losses["loss_cls"].item() == pytest.approx(vfl, rel=1e-4)
    assert losses["loss_bbox"].item() == pytest.approx(1.5 * box_terms["init"][0] / max(box_terms["init"][1], 1),
                                                       rel=1e-4)
    assert losses["loss_bbox_rf"].item() == pytest.approx(
        2.0 * box_terms["refine"][0] / max(box_terms["refine"][1], 1), rel=1e-4)
    # the exposed target builder gives exactly q
    iou_rf = torch.tensor([q[b, n].max().item() for b, n in pos.nonzero().tolist()])
    assert torch.allclose(head.vfl_targets(labels, pos, iou_rf), q)
    # level statistics: exact positive counts per level
    n0 = sizes[0][0] * sizes[0][1]
    assert losses["lvl0_pos"].item() == pos[:, :n0].sum().item()
    assert losses["lvl1_pos"].item() == pos[:, n0:].sum().item()
    if use_atss:  # padded priors of image 1 are neither positive nor negative
        assert losses["lvl0_neg"].item() == weight[:, :n0].sum().item() - pos[:, :n0].sum().item()
    # per-level mean VFL of positives / negatives, times their counts, add up to the un-normalised VFL sum
    total = sum(losses[f"lvl{i}_{kind}_cls_loss"].item() * losses[f"lvl{i}_{kind}"].item()
                for i in range(2) for kind in ("pos", "neg"))
    assert total == pytest.approx(vfl * num_pos, rel=1e-4)


@pytest.mark.parametrize("gradient_mul", [0.0, 0.1])
def test_refined_loss_reaches_the_initial_box_only_through_the_star_offsets(gradient_mul: float) -> None:
    head = _head(gradient_mul=gradient_mul)
    outs = _outs(head)
    losses = head.loss(outs, TARGETS, METAS)
    # the refined box multiplies a detached initial box; only gradient_mul of the offsets' gradient flows back
    g = torch.autograd.grad(losses["loss_bbox_rf"], outs[1], allow_unused=True, retain_graph=True)
    reached = any(x is not None and torch.count_nonzero(x) > 0 for x in g)
    assert reached == (gradient_mul > 0)
    # the classification loss sends no gradient into the refined box through its IoU target
    g = torch.autograd.grad(losses["loss_cls"], outs[2], allow_unused=True)
    assert all(x is None or torch.count_nonzero(x) == 0 for x in g)


def test_focal_loss_ablation_without_vfl() -> None:
    head = _head(use_vfl=False)
    outs = _outs(head)
    losses = head.loss(outs, TARGETS, METAS)
    sizes = [tuple(m.shape[-2:]) for m in outs[0]]
    pos, labels, _, weight, _ = _assignment(head, sizes, True)
    cls = _flat(outs[0], 3).detach()
    onehot = torch.nn.functional.one_hot(labels, 4)[..., :3].float()
    fl = (sigmoid_focal_loss(cls, onehot, alpha=0.25, gamma=2.0, reduction="none") * weight[..., None]).sum()
    assert losses["loss_cls"].item() == pytest.approx(fl.item() / pos.sum().item(), rel=1e-4)
    # same box losses as with VFL (targets do not depend on the classification loss)
    vfl_head = _head()
    vfl_head.load_state_dict(head.state_dict())
    ref = vfl_head.loss(outs, TARGETS, METAS)
    assert torch.allclose(losses["loss_bbox"], ref["loss_bbox"])
    assert torch.allclose(losses["loss_bbox_rf"], ref["loss_bbox_rf"])


def test_no_ground_truth_gives_zero_box_losses_with_gradients() -> None:
    head = _head()
    outs = _outs(head)
    losses = head.loss(outs, [_t([], []), _t([], [])], METAS)
    assert losses["num_pos"].item() == 0 and losses["loss_bbox"].item() == 0 and losses["loss_bbox_rf"].item() == 0
    cls = _flat(outs[0], 3).detach()
    # every valid prior is a negative; normaliser max(num_pos, 1) = 1
    _, _, _, weight, _ = _assignment(head, [tuple(m.shape[-2:]) for m in outs[0]], True)
    expected = (_vfl_direct(cls, torch.zeros_like(cls)) * weight[..., None]).sum().item()
    assert losses["loss_cls"].item() == pytest.approx(expected, rel=1e-4)
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()


@pytest.mark.parametrize("kwargs, key", [
    ({"bbox_norm_type": "log"}, "bbox_norm_type"),
    ({"reg_decoded_bbox": False}, "reg_decoded_bbox"),
    ({"regress_ranges": [(-1, 64)]}, "regress_ranges"),
    ({"anchor_generator": {"ratios": [0.5, 1.0], "octave_base_scale": 8, "scales_per_octave": 1,
                           "strides": STRIDES}}, "anchor_generator"),
    ({"train_cfg": {"assigner": {"type": "MaxIoUAssigner"}}}, "assigner"),
])
def test_bad_config_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        VFNetHead(**{**KW, **kwargs})


def test_init_weights_keep_the_head_dcn_offsets_zero() -> None:
    head = _head(dcn_on_last_conv=True, stacked_convs=2)
    last = head.cls_convs[1].conv
    assert type(last).__name__ == "ModulatedDeformConv2dPack" and last.bias is None
    assert torch.count_nonzero(last.conv_offset.weight) == 0 and torch.count_nonzero(last.conv_offset.bias) == 0
    assert head.vfnet_cls.bias.mean().item() == pytest.approx(-math.log(99), rel=1e-6)
    assert head.vfnet_cls_dconv.weight.std().item() == pytest.approx(0.01, rel=0.2)


# ---------------------------------------------------------------------------------------------------- configs
VFNET_ROWS = ["vfnet_r50_fpn_1x_coco", "vfnet_r50_fpn_mstrain_2x_coco", "vfnet_r50_fpn_mdconv_c3-c5_mstrain_2x_coco",
              "vfnet_r101_fpn_1x_coco", "vfnet_r101_fpn_2x_coco", "vfnet_r101_fpn_mstrain_2x_coco",
              "vfnet_r101_fpn_mdconv_c3-c5_mstrain_2x_coco", "vfnet_x101_32x4d_fpn_mstrain_2x_coco",
              "vfnet_x101_32x4d_fpn_mdconv_c3-c5_mstrain_2x_coco", "vfnet_x101_64x4d_fpn_mstrain_2x_coco",
              "vfnet_x101_64x4d_fpn_mdconv_c3-c5_mstrain_2x_coco", "vfnet_r2_101_fpn_mstrain_2x_coco",
              "vfnet_r2_101_fpn_mdconv_c3-c5_mstrain_2x_coco"]


def test_vfnet_configs_follow_the_reference() -> None:
    assert set(VFNET_ROWS) <= set(list_configs())
    for name in VFNET_ROWS:
        cfg = load_config(name)
        head, bb = cfg.model["bbox_head"], cfg.model["backbone"]
        assert cfg.model["type"] == "VFNet" and head["type"] == "VFNetHead", name
        assert head["stacked_convs"] == 3 and head["use_atss"] and head["use_vfl"], name
        assert head["loss_cls"] == {"type": "VarifocalLoss", "use_sigmoid": True, "alpha": 0.75, "gamma": 2.0,
                                    "iou_weighted": True, "loss_weight": 1.0}, name
        assert head["loss_bbox"]["loss_weight"] == 1.5 and head["loss_bbox_refine"]["loss_weight"] == 2.0, name
        assert cfg.model["neck"]["relu_before_extra_convs"] is True, name
        assert cfg.optimizer.lr == 0.01 and cfg.schedule.warmup_ratio == 0.1, name
        assert (cfg.optimizer.paramwise.bias_lr_mult, cfg.optimizer.paramwise.bias_decay_mult) == (2.0, 0.0), name
        mdconv, ms = "mdconv" in name, "mstrain" in name
        assert head.get("dcn_on_last_conv", False) == mdconv, name
        if mdconv:
            assert bb["dcn"] == {"type": "DCNv2", "deform_groups": 1, "fallback_on_stride": False}, name
            assert bb["stage_with_dcn"] == [False, True, True, True], name
        else:
            assert "dcn" not in bb, name
        resize = cfg.data.train.pipeline[0]
        if ms:
            assert resize == {"type": "Resize", "img_scale": [[1333, 480], [1333, 960]], "multiscale_mode": "range",
                              "keep_ratio": True}, name
        else:
            assert resize["img_scale"] == [1333, 800], name
        assert (cfg.schedule.epochs, cfg.schedule.steps) == ((12, [8, 11]) if "1x" in name else (24, [16, 22])), name
        assert bb["depth"] == (50 if "r50" in name else 101), name
    assert load_config("vfnet_x101_64x4d_fpn_mstrain_2x_coco").model["backbone"]["groups"] == 64
    assert load_config("vfnet_r2_101_fpn_mstrain_2x_coco").model["backbone"]["type"] == "Res2Net"


# --------------------------------------------------------------------------------------------------- training
def _tiny_vfnet():
    return densedet.build_model(
        "vfnet_r18_fpn_synth", backbone__base_channels=8, neck__in_channels=[16, 32, 64], neck__out_channels=16,
        bbox_head__in_channels=16, bbox_head__feat_channels=16, bbox_head__stacked_convs=1,
        bbox_head__norm_cfg={"type": "GN", "num_groups": 4})


def test_tiny_vfnet_learns_two_images_and_predicts_in_original_pixels() -> None:
    torch.manual_seed(0)
    model = _tiny_vfnet()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 96, generator=g) * 0.2
    boxes = [[[12.0, 16.0, 70.0, 76.0]], [[30.0, 8.0, 88.0, 60.0]]]
    for i, ((x1, y1, x2, y2),) in enumerate(boxes):
        images[i, i % 3, int(y1):int(y2), int(x1):int(x2)] += 2.0
    images = images * 58.0 + 120.0  # as pixels: the detector normalises them (model.data_preprocessor)
    targets = [_t(boxes[0], [1]), _t(boxes[1], [2])]
    # the network saw the originals at half size: scale_factor 0.5
    metas = [{"img_shape": (96, 96), "pad_shape": (96, 96), "scale_factor": (0.5, 0.5)} for _ in range(2)]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(images, targets, metas, mode="loss")
        total = sum(v for k, v in out.items() if k.startswith("loss"))
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    model.eval()
    with torch.no_grad():
        dets = model(images, metas=metas, mode="predict")
    for det, box, label in zip(dets, boxes, (1, 2)):
        assert len(det["boxes"]) > 0
        assert (det["boxes"] >= 0).all() and (det["boxes"] <= 192).all()  # original image is 192 x 192
        top = det["boxes"][det["scores"].argmax()].view(1, 4)
        assert det["labels"][det["scores"].argmax()].item() == label
        assert box_iou(top, torch.tensor(box) * 2).item() > 0.5
