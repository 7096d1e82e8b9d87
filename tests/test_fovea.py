"""FoveaBox (+ VFL): targets on hand-made boxes, FL / VFL losses in closed form, decode and predict, a tiny
training run, and the released FoveaBox R-50 key layout (hyz-xmaster/VarifocalNet vfl_fovea_r50_fpn_4x4_1x_coco).

Hand values follow the reference's target rule (fovea_head.py ``_get_target_single``): for a gt ``(x1, y1, x2, y2)``
on a level of stride ``s`` the positive columns are ``ceil(x1/s + 0.6 * w/(2s) - 0.5) .. floor(x1/s + 1.4 * w/(2s)
- 0.5)`` (sigma 0.4), and targets are ``log(d / base_edge)`` from the location centre ``(j + 0.5) * s``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torchvision.ops import box_iou

import densedet
from densedet.assigners import fovea_assign
from densedet.losses import varifocal_loss
from densedet.models.heads import FoveaHead
from densedet.registry import ConfigError
from densedet.structures import pad_targets

LN = math.log


def _gt(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.zeros(len(boxes), dtype=torch.long) if labels is None else torch.tensor(labels)
    return {"boxes": boxes, "labels": labels}


def _assign_one_level(boxes, size=(8, 8), stride=8, edge=16.0, rng=(1.0, 64.0)):
    assign, t = fovea_assign([size], [stride], [edge], [rng], pad_targets([_gt(boxes)]))
    return assign.gt_inds[0].view(*size), t[0].view(*size, 4)


# ---------------------------------------------------------------------------------------------- targets
def test_fovea_region_and_log_targets_by_hand() -> None:
    # gt 32x32 at (8, 8): in feature units [1, 5], half 2 -> cols/rows ceil(1.7)=2 .. floor(3.3)=3
    inds, t = _assign_one_level([[8.0, 8.0, 40.0, 40.0]])
    expected = torch.full((8, 8), -1)
    expected[2:4, 2:4] = 0
    assert torch.equal(inds, expected)
    # location (2, 2): centre (20, 20): distances 12, 12, 20, 20 over base edge 16
    torch.testing.assert_close(t[2, 2], torch.tensor([LN(0.75), LN(0.75), LN(1.25), LN(1.25)]))
    # location (row 2, col 3): centre (28, 20)
    torch.testing.assert_close(t[2, 3], torch.tensor([LN(1.25), LN(0.75), LN(0.75), LN(1.25)]))
    # negatives carry log(1) = 0, as the reference's filler
    assert t[0, 0].abs().sum() == 0 and t[inds < 0].abs().sum() == 0


def test_scale_ranges_pick_levels_and_smallest_gt_wins() -> None:
    # two levels: stride 8 (8x8, edge 16, range 1-40) and stride 16 (4x4, edge 32, range 30-80)
    small = [8.0, 8.0, 40.0, 40.0]  # scale 32: both levels (ranges inclusive and overlapping)
    big = [0.0, 0.0, 64.0, 48.0]  # scale sqrt(64 * 48) = 55.4: level 1 only
    for boxes, i_small, i_big in (([big, small], 1, 0), ([small, big], 0, 1)):
        assign, t = fovea_assign([(8, 8), (4, 4)], [8, 16], [16.0, 32.0], [(1.0, 40.0), (30.0, 80.0)],
                                 pad_targets([_gt(boxes)]))
        lvl0 = assign.gt_inds[0, :64].view(8, 8)
        lvl1 = assign.gt_inds[0, 64:].view(4, 4)
        exp0 = torch.full((8, 8), -1)
        exp0[2:4, 2:4] = i_small
        assert torch.equal(lvl0, exp0)
        # level 1: small -> [0.5, 2.5] units, half 1: cols ceil(0.6)=1..floor(1.4)=1 -> (1, 1);
        # big -> cols ceil(0.7)=1..floor(2.3)=2, rows ceil(0.4)=1..floor(1.6)=1 -> (1, 1), (1, 2).
        # Both cover (1, 1): the reference paints larger gts first, so the smaller one wins whatever the order.
        exp1 = torch.full((4, 4), -1)
        exp1[1, 1] = i_small
        exp1[1, 2] = i_big
        assert torch.equal(lvl1, exp1)
        t1 = t[0, 64:].view(4, 4, 4)
        # (1, 1) centre (24, 24) to the small gt: 16 on every side, base edge 32
        torch.testing.assert_close(t1[1, 1], torch.full((4,), LN(0.5)))
        # (1, 2) centre (40, 24) to the big gt: 40, 24, 24, 24 over 32
        torch.testing.assert_close(t1[1, 2], torch.tensor([LN(1.25), LN(0.75), LN(0.75), LN(0.75)]))


def test_equal_scale_tie_goes_to_the_later_gt() -> None:
    a = [8.0, 8.0, 40.0, 40.0]
    b = [16.0, 8.0, 48.0, 40.0]  # same size, shifted one cell: fovea cols 3..4 vs a's 2..3
    inds, _ = _assign_one_level([a, b])
    assert inds[2, 2] == 0 and inds[2, 3] == 1 and inds[2, 4] == 1


def test_targets_clamped_to_1_16_and_16_before_log() -> None:
    _, t = _assign_one_level([[8.0, 8.0, 40.0, 40.0]], edge=1.0)  # distances 12, 12, 20, 20 -> 20 > 16
    torch.testing.assert_close(t[2, 2], torch.tensor([LN(12.0), LN(12.0), LN(16.0), LN(16.0)]))
    _, t = _assign_one_level([[8.0, 8.0, 40.0, 40.0]], edge=256.0)  # 12/256 < 1/16 < 20/256
    torch.testing.assert_close(t[2, 2], torch.tensor([LN(1 / 16)] * 2 + [LN(20 / 256)] * 2))


def test_fovea_bounds_clamp_to_the_feature_map() -> None:
    # a gt beyond the map: cols ceil(7.3)=8 .. floor(9.7)=9, both clamped to 7 -> the corner cell (reference quirk)
    inds, _ = _assign_one_level([[48.0, 48.0, 96.0, 96.0]], rng=(1.0, 64.0))
    assert (inds >= 0).nonzero().tolist() == [[7, 7]]


def test_out_of_range_gt_and_padding_assign_nothing_and_batch_matches_single() -> None:
    boxes = [[8.0, 8.0, 40.0, 40.0], [0.0, 0.0, 62.0, 62.0]]  # the second (scale 62) is outside 1-40
    args = ([(8, 8)], [8], [16.0], [(1.0, 40.0)])
    single, t_single = fovea_assign(*args, pad_targets([_gt(boxes)]))
    batch, t_batch = fovea_assign(*args, pad_targets([_gt(boxes), _gt([]), _gt(boxes[:1])]))
    assert set(single.gt_inds[0].unique().tolist()) == {-1, 0}
    assert torch.equal(batch.gt_inds[0], single.gt_inds[0]) and torch.equal(batch.gt_inds[2], single.gt_inds[0])
    assert (batch.gt_inds[1] == -1).all()  # no gt: every location negative, none ignored
    torch.testing.assert_close(t_batch[0], t_single[0])


def _loop_reference(boxes, sizes, strides, edges, ranges, sigma=0.4):
    """The reference's per-level painting loop, transcribed for one image: gts in order of decreasing scale
    paint their fovea (later ones overwrite), targets clamped to [1/16, 16] then log."""
    inds, targets = [], []
    for (h, w), s, e, (lo, hi) in zip(sizes, strides, edges, ranges):
        lab = torch.full((h, w), -1)
        t = torch.ones(h, w, 4)
        scales = [math.sqrt((b[2] - b[0]) * (b[3] - b[1])) for b in boxes]
        hits = sorted((k for k in range(len(boxes)) if lo <= scales[k] <= hi), key=lambda k: -scales[k])
        for k in hits:
            x1, y1, x2, y2 = boxes[k]
            fx1, fy1, fx2, fy2 = (torch.tensor(boxes[k]) / s).tolist()
            hw, hh = 0.5 * (fx2 - fx1), 0.5 * (fy2 - fy1)
            c0 = min(max(math.ceil(fx1 + (1 - sigma) * hw - 0.5), 0), w - 1)
            c1 = min(max(math.floor(fx1 + (1 + sigma) * hw - 0.5), 0), w - 1)
            r0 = min(max(math.ceil(fy1 + (1 - sigma) * hh - 0.5), 0), h - 1)
            r1 = min(max(math.floor(fy1 + (1 + sigma) * hh - 0.5), 0), h - 1)
            for i in range(r0, r1 + 1):
                for j in range(c0, c1 + 1):
                    px, py = s * (j + 0.5), s * (i + 0.5)
                    lab[i, j] = k
                    t[i, j] = torch.tensor([(px - x1) / e, (py - y1) / e, (x2 - px) / e, (y2 - py) / e])
        inds.append(lab.flatten())
        targets.append(torch.log(t.clamp(1 / 16, 16)).reshape(-1, 4))
    return torch.cat(inds), torch.cat(targets)


def test_batched_assign_matches_the_reference_loop_on_random_boxes() -> None:
    g = torch.Generator().manual_seed(3)
    sizes, strides = [(40, 32), (20, 16), (10, 8), (5, 4), (3, 2)], [8, 16, 32, 64, 128]
    edges, ranges = [16, 32, 64, 128, 256], [(1, 64), (32, 128), (64, 256), (128, 512), (256, 2048)]
    batch = []
    for n in (12, 0, 5):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([256.0, 320.0])
        wh = torch.rand(n, 2, generator=g) * 250 + 4
        batch.append((torch.cat([xy, (xy + wh).minimum(torch.tensor([256.0, 320.0]))], 1)).tolist())
    assign, t = fovea_assign(sizes, strides, edges, ranges, pad_targets([_gt(b) for b in batch]))
    for i, boxes in enumerate(batch):
        ref_inds, ref_t = _loop_reference(boxes, sizes, strides, edges, ranges)
        assert torch.equal(assign.gt_inds[i], ref_inds)
        pos = ref_inds >= 0
        torch.testing.assert_close(t[i][pos], ref_t[pos])
    assert (assign.gt_inds[0] >= 0).sum() > 20  # the case is not vacuous


# ---------------------------------------------------------------------------------------------- losses
def _head(use_vfl: bool, **kw) -> FoveaHead:
    cfg = dict(num_classes=3, in_channels=8, feat_channels=8, stacked_convs=1, strides=[8], base_edge_list=[16],
               scale_ranges=[(1, 64)], use_vfl=use_vfl,
               loss_cls={"type": "FocalLoss", "use_sigmoid": True, "gamma": 1.5, "alpha": 0.4, "loss_weight": 1.0},
               loss_bbox={"type": "SmoothL1Loss", "beta": 0.11, "loss_weight": 1.0})
    cfg.update(kw)
    return FoveaHead(**cfg)


def _zero_outs(b: int = 1):
    return [torch.zeros(b, 3, 8, 8, requires_grad=True)], [torch.zeros(b, 4, 8, 8, requires_grad=True)]


GT = [8.0, 8.0, 40.0, 40.0]  # fovea (2..3, 2..3) on the 8x8 stride-8 map, label 1 below
SMOOTH = 2 * (LN(4 / 3) - 0.055) + 2 * (LN(1.25) - 0.055)  # per positive: two 0.75s and two 1.25s, |d| > beta


def test_focal_path_closed_form() -> None:
    head = _head(use_vfl=False)
    cls, reg = _zero_outs()
    losses = head.loss((cls, reg), [_gt([GT], [1])], [{"img_shape": (64, 64)}])
    # logits 0 -> p = 0.5; FL(gamma 1.5, alpha 0.4): positive 0.4 * 0.5^1.5 * ln 2, negative 0.6 * 0.5^1.5 * ln 2
    pos_el, neg_el = 0.4 * 0.5**1.5 * LN(2), 0.6 * 0.5**1.5 * LN(2)
    num_pos, num_el = 4, 64 * 3
    expected_cls = (num_pos * pos_el + (num_el - num_pos) * neg_el) / (num_pos + 1)  # avg_factor num_pos + images
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(SMOOTH, rel=1e-5)  # smooth L1 sum / num_pos
    assert losses["num_pos"].item() == 4
    (losses["loss_cls"] + losses["loss_bbox"]).backward()
    assert reg[0].grad[0, :, 2:4, 2:4].abs().sum() > 0 and reg[0].grad[0, :, 0, 0].abs().sum() == 0


def test_vfl_target_is_iou_of_decoded_prediction_with_its_gt() -> None:
    head = _head(use_vfl=True)
    cls, reg = _zero_outs(2)
    # zero log-distances decode to centre +- base edge 16: (2, 2) -> [4, 4, 36, 36]; gt [8, 8, 40, 40]:
    # intersection 28^2 = 784, union 1024 + 1024 - 784 -> every one of the 4 positives (by symmetry)
    iou_full = 784 / 1264
    # image 1 is 32x32 before padding: boxes clamp to 31 -> [4, 4, 31, 31] at (2, 2): 23^2 / (27^2 + 32^2 - 23^2)
    iou_clip_22 = 529 / (729 + 1024 - 529)
    metas = [{"img_shape": (64, 64)}, {"img_shape": (32, 32)}]
    targets = [_gt([GT], [1]), _gt([GT], [2])]
    sizes = [(8, 8)]
    gt = pad_targets(targets)
    assign, _ = fovea_assign(sizes, [8], [16.0], [(1.0, 64.0)], gt)
    labels, gt_boxes = assign.gather(gt.gt_labels, gt.gt_boxes, 3)
    q = head.iou_targets(reg[0].detach().permute(0, 2, 3, 1).reshape(2, 64, 4), assign.pos_mask, labels, gt_boxes,
                         sizes, metas).view(2, 8, 8, 3)
    expected = torch.zeros(2, 8, 8, 3)
    expected[0, 2:4, 2:4, 1] = iou_full
    expected[1, 2, 2, 2] = iou_clip_22
    # (row 2, col 3) of image 1: centre (28, 20) -> [12, 4, 44, 36] clamped to [12, 4, 31, 31]; gt [8, 8, 40, 40]
    expected[1, 2, 3, 2] = (19 * 23) / (19 * 27 + 1024 - 19 * 23)
    expected[1, 3, 2, 2] = (23 * 19) / (27 * 19 + 1024 - 23 * 19)
    expected[1, 3, 3, 2] = (19 * 19) / (19 * 19 + 1024 - 19 * 19)
    torch.testing.assert_close(q, expected)

    losses = head.loss((cls, reg), targets, metas)
    flat = cls[0].detach().permute(0, 2, 3, 1).reshape(-1, 3)
    want = varifocal_loss(flat, expected.reshape(-1, 3), alpha=0.75, gamma=2.0, reduction="sum") / (8 + 2)
    assert losses["loss_cls"].item() == pytest.approx(want.item(), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(SMOOTH, rel=1e-5)  # the box loss does not change with VFL
    losses["loss_cls"].backward()
    assert reg[0].grad is None or reg[0].grad.abs().sum() == 0  # q is detached: no gradient into the boxes


def test_vfl_q_is_exactly_zero_without_positives_and_losses_keep_graph() -> None:
    head = _head(use_vfl=True)
    cls, reg = _zero_outs()
    losses = head.loss((cls, reg), [_gt([])], [{"img_shape": (64, 64)}])
    # all targets 0: VFL = 0.75 * 0.5^2 * ln 2 per element, over 0 positives + 1 image
    assert losses["loss_cls"].item() == pytest.approx(64 * 3 * 0.75 * 0.25 * LN(2), rel=1e-5)
    assert losses["loss_bbox"].item() == 0 and losses["loss_bbox"].requires_grad


def test_level_stats_for_both_losses() -> None:
    for use_vfl in (False, True):
        head = _head(use_vfl)
        head.collect_level_stats = True
        cls, reg = _zero_outs()
        losses = head.loss((cls, reg), [_gt([GT], [1])], [{"img_shape": (64, 64)}])
        assert losses["lvl0_pos"].item() == 4 and losses["lvl0_neg"].item() == 60
        assert losses["lvl0_pos_cls_loss"].item() > 0


# ---------------------------------------------------------------------------------------------- inference
def test_predict_decodes_clamps_and_rescales_to_original_pixels() -> None:
    head = _head(use_vfl=True).eval()
    cls = torch.full((1, 3, 8, 8), -10.0)
    cls[0, 2, 2, 3] = 5.0  # class 2 at row 2, col 3 -> centre (28, 20)
    reg = torch.zeros(1, 4, 8, 8)
    reg[0, :, 2, 3] = torch.tensor([LN(0.5), LN(0.25), LN(1.0), LN(2.0)])  # distances 8, 4, 16, 32 (edge 16)
    metas = [{"img_shape": (48, 64), "scale_factor": (2.0, 2.0)}]
    (res,) = head.predict(([cls], [reg]), metas, rescale=True)
    assert res["labels"].tolist() == [2]
    # [20, 16, 44, 52] clamped to y <= 47, then / 2
    torch.testing.assert_close(res["boxes"], torch.tensor([[10.0, 8.0, 22.0, 23.5]]))
    assert res["scores"].item() == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())


# ---------------------------------------------------------------------------------------------- config / layout
def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="loss_bbox"):
        _head(False, loss_bbox={"type": "GIoULoss"})
    with pytest.raises(ConfigError, match="loss_cls_vfl"):
        _head(True, loss_cls_vfl={"type": "FocalLoss"})
    with pytest.raises(ConfigError, match="scale_ranges"):
        _head(False, scale_ranges=[(1, 64), (32, 128)])
    with pytest.raises(ConfigError, match="dcn_on_last_conv"):
        _head(False, dcn_on_last_conv=True)


def test_with_deform_layout_and_zero_offsets_equal_a_plain_conv() -> None:
    head = FoveaHead(3, 8, feat_channels=8, stacked_convs=1, strides=[8], base_edge_list=[16],
                     scale_ranges=[(1, 64)], with_deform=True, deform_groups=2,
                     norm_cfg={"type": "GN", "num_groups": 4, "requires_grad": True})
    head.init_weights()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    # reference FeatureAlign / deformable cls branch (mmdet fovea_head.py), GN -> no conv bias
    assert shapes["feature_adaption.conv_offset.weight"] == (2 * 18, 4, 1, 1)
    assert shapes["feature_adaption.conv_adaption.weight"] == (8, 8, 3, 3)
    assert "feature_adaption.conv_adaption.bias" not in shapes and "cls_convs.0.conv.bias" not in shapes
    assert shapes["cls_convs.0.conv.weight"] == (32, 8, 3, 3) and shapes["cls_convs.0.gn.weight"] == (32,)
    assert shapes["cls_convs.1.conv.weight"] == (32, 32, 1, 1) and shapes["conv_cls.weight"] == (3, 32, 3, 3)
    assert len(head.cls_convs) == 2
    fa = head.feature_adaption
    with torch.no_grad():
        fa.conv_offset.weight.zero_()
    x = torch.randn(1, 8, 6, 6)
    ref = torch.relu(torch.nn.functional.conv2d(x, fa.conv_adaption.weight, padding=1))
    torch.testing.assert_close(fa(x, torch.rand(1, 4, 6, 6)), ref, atol=1e-5, rtol=1e-5)
    cls, reg = head([x])
    assert cls[0].shape == (1, 3, 6, 6) and reg[0].shape == (1, 4, 6, 6)


def _vfl_fovea_r50_keys() -> dict[str, tuple]:
    """Key/shape list of the released FoveaBox + VFL R-50 model, written from the reference modules: torchvision
    ResNet-50 keys, FPN (start_level 1, extra convs on the C5 input), FoveaHead towers without norm (conv bias),
    ``conv_cls`` (80) and ``conv_reg`` (4), no scales."""
    sd = torchvision.models.resnet50(weights=None).state_dict()
    keys = {f"backbone.{k}": tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.")}
    for i, cin in enumerate([512, 1024, 2048]):
        keys[f"neck.lateral_convs.{i}.conv.weight"] = (256, cin, 1, 1)
        keys[f"neck.lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(5):
        keys[f"neck.fpn_convs.{i}.conv.weight"] = (256, 2048 if i == 3 else 256, 3, 3)
        keys[f"neck.fpn_convs.{i}.conv.bias"] = (256,)
    for branch in ("cls_convs", "reg_convs"):
        for i in range(4):
            keys[f"bbox_head.{branch}.{i}.conv.weight"] = (256, 256, 3, 3)
            keys[f"bbox_head.{branch}.{i}.conv.bias"] = (256,)
    keys.update({"bbox_head.conv_cls.weight": (80, 256, 3, 3), "bbox_head.conv_cls.bias": (80,),
                 "bbox_head.conv_reg.weight": (4, 256, 3, 3), "bbox_head.conv_reg.bias": (4,)})
    return keys


@pytest.mark.parametrize("name", ["vfl_fovea_r50_fpn_4x4_1x_coco", "fovea_r50_fpn_4x4_1x_coco"])
def test_released_layout_loads_strict(name: str) -> None:
    model = densedet.build_model(name)
    keys = _vfl_fovea_r50_keys()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randint(0, 5, s, generator=g) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
          for k, s in keys.items()}
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("use_vfl", [True, False])
def test_tiny_training_loss_falls_and_predict_is_in_original_pixels(use_vfl: bool) -> None:
    torch.manual_seed(0)
    model = densedet.build_model("fovea_r18_fpn_synth", **{"bbox_head.use_vfl": use_vfl,
                                                           "bbox_head.feat_channels": 32,
                                                           "bbox_head.stacked_convs": 1})
    images = torch.randn(2, 3, 128, 128) * 0.1
    targets = [_gt([[16.0, 20.0, 64.0, 72.0], [70.0, 30.0, 120.0, 110.0]], [0, 2]), _gt([[30.0, 40.0, 90.0, 100.0]],
                                                                                       [1])]
    for t, img in zip(targets, images):  # paint the objects so they can be learnt
        for (x1, y1, x2, y2), lab in zip(t["boxes"].long().tolist(), t["labels"].tolist()):
            img[lab, y1:y2, x1:x2] += 1.5
    images = images * 58.0 + 120.0  # as pixels: the detector normalises them (model.data_preprocessor)
    metas = [{"img_shape": (128, 128), "pad_shape": (128, 128), "scale_factor": (0.5, 0.5)} for _ in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(30):
        losses = model(images, targets, metas, mode="loss")
        total = losses["loss_cls"] + losses["loss_bbox"]
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert all(math.isfinite(v) for v in history)
    assert sum(history[-3:]) / 3 < 0.6 * sum(history[:3]) / 3, history
    model.eval()
    with torch.no_grad():
        results = model(images, metas=metas, mode="predict")
    assert len(results) == 2
    for res, t in zip(results, targets):
        boxes = res["boxes"]
        # scale_factor 0.5: original images are 256 px, the input frame is clamped to 127 then / 0.5
        assert boxes.numel() > 0 and boxes.min() >= 0 and boxes.max() <= 254.0 + 1e-4
        # the best detection sits on a gt (in original pixels: twice the input frame) with that gt's class
        iou = box_iou(boxes[:1] * 0.5, t["boxes"])[0]
        assert iou.max() > 0.5 and res["labels"][0] == t["labels"][iou.argmax()]
