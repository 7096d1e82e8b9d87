"""Batched assigners against hand-built cases and against straightforward per-image loop references written
from the MMDetection 2.x algorithms (MaxIoUAssigner, ATSSAssigner, FCOSHead._get_target_single)."""

import statistics

import pytest
import torch

from densedet.assigners import (
    DEFAULT_REGRESS_RANGES,
    atss_assign,
    expand_regress_ranges,
    expand_strides,
    fcos_assign,
    max_iou_assign,
)
from densedet.structures import AnchorGenerator, PointGenerator, bbox_overlaps, pad_targets


def targets(*images, ignores=None):
    """images: lists of xyxy boxes (labels = position + 10); ignores: optional list of ignore-box lists."""
    out = []
    for i, boxes in enumerate(images):
        d = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.arange(len(boxes)) + 10}
        if ignores is not None:
            d["ignore_boxes"] = torch.tensor(ignores[i], dtype=torch.float32).reshape(-1, 4)
        out.append(d)
    return pad_targets(out)


def priors(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- max IoU


def test_max_iou_empty_gt_all_negative():
    res = max_iou_assign(priors([0, 0, 10, 10], [5, 5, 9, 9]), targets([]))
    assert res.gt_inds.tolist() == [[-1, -1]]
    assert res.max_overlaps.tolist() == [[0.0, 0.0]]
    assert res.num_pos == 0


def test_max_iou_single_gt_thresholds():
    # IoUs with the gt [0,0,10,10]: 1.0, 0.6, 0.45 (between neg 0.4 and pos 0.5), 0.2, 0.
    p = priors([0, 0, 10, 10], [0, 0, 10, 6], [0, 0, 10, 4.5], [0, 0, 10, 2], [50, 50, 60, 60])
    res = max_iou_assign(p, targets([[0, 0, 10, 10]]), pos_iou_thr=0.5, neg_iou_thr=0.4)
    assert res.gt_inds.tolist() == [[0, 0, -2, -1, -1]]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([[1.0, 0.6, 0.45, 0.2, 0.0]]))
    labels, boxes = res.gather(torch.tensor([[10]]), torch.tensor([[[0.0, 0.0, 10.0, 10.0]]]), num_classes=80)
    assert labels.tolist() == [[10, 10, 80, 80, 80]]
    assert boxes[0, 2].tolist() == [0, 0, 0, 0] and boxes[0, 1].tolist() == [0, 0, 10, 10]
    # neg_iou_thr as (lo, hi): IoU 0 is below lo -> neither negative nor positive.
    res = max_iou_assign(p, targets([[0, 0, 10, 10]]), neg_iou_thr=(0.1, 0.4))
    assert res.gt_inds.tolist() == [[0, 0, -2, -1, -2]]


def test_max_iou_low_quality_match():
    p = priors([0, 0, 10, 3], [0, 0, 10, 1])  # IoU 0.3 and 0.1: both below neg_iou_thr
    gt = targets([[0, 0, 10, 10]])
    assert max_iou_assign(p, gt).gt_inds.tolist() == [[0, -1]]
    assert max_iou_assign(p, gt, match_low_quality=False).gt_inds.tolist() == [[-1, -1]]
    assert max_iou_assign(p, gt, min_pos_iou=0.35).gt_inds.tolist() == [[-1, -1]]


def test_max_iou_gt_max_assign_all():
    p = priors([0, 0, 10, 3], [0, 7, 10, 10], [0, 0, 10, 1])  # two priors tie at IoU 0.3
    gt = targets([[0, 0, 10, 10]])
    assert max_iou_assign(p, gt).gt_inds.tolist() == [[0, 0, -1]]
    assert max_iou_assign(p, gt, gt_max_assign_all=False).gt_inds.tolist() == [[0, -1, -1]]


def test_max_iou_ties_between_gts_later_gt_wins():
    # Identical gts: step 3 picks gt 0 (first max), mmdet's low-quality loop then overwrites with gt 1.
    p = priors([0, 0, 10, 10])
    assert max_iou_assign(p, targets([[0, 0, 10, 10], [0, 0, 10, 10]])).gt_inds.tolist() == [[1]]
    assert max_iou_assign(p, targets([[0, 0, 10, 10], [0, 0, 10, 10]]), match_low_quality=False).gt_inds.tolist() == [
        [0]
    ]
    # Prior A has IoU 0.9 with gt 0 but is also gt 1's best prior (IoU 0.16): low-quality matching reassigns it.
    p = priors([0, 0, 10, 9], [100, 100, 110, 110])
    res = max_iou_assign(p, targets([[0, 0, 10, 10], [0, 5, 10, 25]]))
    assert res.gt_inds.tolist() == [[1, -1]]
    torch.testing.assert_close(res.max_overlaps[0, 0], torch.tensor(0.9))


def test_max_iou_padded_gts_never_match():
    # Image 1 has one gt, so its second slot is padding with box [0,0,0,0]. Unmasked, that padding gt would have
    # best IoU 0 >= min_pos_iou and claim every prior with IoU 0.
    p = priors([0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 1, 1])
    gt = targets([[0, 0, 10, 10], [50, 50, 60, 60]], [[0, 0, 10, 10]])
    res = max_iou_assign(p, gt)
    assert res.gt_inds.tolist() == [[0, 1, -1], [0, -1, -1]]


def test_max_iou_crowd_ignore():
    p = priors([0, 0, 10, 10], [110, 110, 120, 120], [195, 195, 205, 205], [300, 300, 310, 310])
    ign = [[100, 100, 200, 200]]
    gt = targets([[0, 0, 10, 10]], ignores=[ign])
    # IoF of the prior with the ignore box: 1.0 and 0.25.
    res = max_iou_assign(p, gt, ignore_iof_thr=0.5)
    assert res.gt_inds.tolist() == [[0, -2, -1, -1]]
    assert res.max_overlaps[0, 1].item() == -1.0  # mmdet sets the overlaps of ignored priors to -1
    assert max_iou_assign(p, gt).gt_inds.tolist() == [[0, -1, -1, -1]]  # disabled by default
    # Without any gt the image is all negative, ignore boxes or not (mmdet returns early).
    res = max_iou_assign(p, targets([], ignores=[ign]), ignore_iof_thr=0.5)
    assert res.gt_inds.tolist() == [[-1, -1, -1, -1]]


def test_max_iou_prior_valid():
    p = priors([0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 2])
    gt = targets([[0, 0, 10, 10]])
    # With the perfect prior invalid, the best valid prior (IoU 0.9) is the gt's low-quality match.
    res = max_iou_assign(p, gt, pos_iou_thr=0.95, prior_valid=torch.tensor([False, True, True]))
    assert res.gt_inds.tolist() == [[-2, 0, -1]]


def ref_max_iou(pri, gts, ign, pos_thr, neg_thr, min_pos, assign_all, low_quality, iof_thr):
    """Per-image loop, following MaxIoUAssigner.assign_wrt_overlaps; returns our index convention."""
    n = pri.size(0)
    if gts.size(0) == 0:
        return [-1] * n
    ov = bbox_overlaps(gts, pri)  # (M, N)
    if iof_thr > 0 and ign.size(0) > 0:
        ign_max = bbox_overlaps(pri, ign, mode="iof").max(dim=1).values
        ov[:, ign_max > iof_thr] = -1
    out = [-2] * n
    for j in range(n):
        col = ov[:, j].tolist()
        best = max(col)
        if 0 <= best < neg_thr:
            out[j] = -1
        if best >= pos_thr:
            out[j] = col.index(best)
    if low_quality:
        for i in range(gts.size(0)):
            row = ov[i].tolist()
            gmax = max(row)
            if gmax >= min_pos:
                if assign_all:
                    for j in range(n):
                        if row[j] == gmax:
                            out[j] = i
                else:
                    out[row.index(gmax)] = i
    return out


def random_int_boxes(n, gen, lo=0, hi=60, max_wh=40):
    xy = torch.randint(lo, hi, (n, 2), generator=gen)
    wh = torch.randint(1, max_wh, (n, 2), generator=gen)
    return torch.cat([xy, xy + wh], -1).float()


@pytest.mark.parametrize("assign_all", [True, False])
def test_max_iou_batched_equals_reference(assign_all):
    gen = torch.Generator().manual_seed(0)
    anchors = AnchorGenerator(strides=[8, 16], ratios=[0.5, 1.0, 2.0], scales=[2.0, 4.0])
    pri = torch.cat(anchors.grid_priors([(8, 8), (4, 4)]))
    counts = [3, 0, 7, 1]
    gts = [random_int_boxes(c, gen) for c in counts]
    igns = [random_int_boxes(2, gen, max_wh=30) for _ in counts]
    padded = pad_targets([{"boxes": g, "labels": torch.zeros(len(g)), "ignore_boxes": i} for g, i in zip(gts, igns)])
    kw = dict(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0, gt_max_assign_all=assign_all)
    res = max_iou_assign(pri, padded, ignore_iof_thr=0.6, **kw)
    for b, (g, i) in enumerate(zip(gts, igns)):
        expected = ref_max_iou(pri, g, i, 0.5, 0.4, 0.0, assign_all, True, 0.6)
        assert res.gt_inds[b].tolist() == expected
        single = max_iou_assign(
            pri, pad_targets([{"boxes": g, "labels": torch.zeros(len(g)), "ignore_boxes": i}]), ignore_iof_thr=0.6, **kw
        )
        assert torch.equal(single.gt_inds[0], res.gt_inds[b])
        torch.testing.assert_close(single.max_overlaps[0], res.max_overlaps[b])
    assert res.pos_mask.any() and res.neg_mask.any() and res.ignore_mask.any()


# ----------------------------------------------------------------------------------------------- ATSS

ROW = priors([0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10])  # centres x = 5, 15, 25, 35


@pytest.mark.filterwarnings("ignore:std\\(\\)")
def test_atss_mean_plus_std_threshold():
    # gt centre x = 8: the 3 closest priors are 0, 1, 2 with IoUs 80/140, 40/180, 0.
    res = atss_assign(ROW, [4], targets([[2, 0, 14, 10]]), topk=3)
    ious = [80 / 140, 40 / 180, 0.0]
    thr = statistics.mean(ious) + statistics.stdev(ious)  # stdev is the unbiased estimator
    assert ious[0] >= thr > ious[1]
    assert res.gt_inds.tolist() == [[0, -1, -1, -1]]
    torch.testing.assert_close(res.max_overlaps, torch.tensor([[80 / 140, 0.0, 0.0, 0.0]]))
    # With topk=1 only prior 0 is a candidate; the std of one value is NaN, so nothing is positive (as mmdet).
    assert atss_assign(ROW, [4], targets([[2, 0, 14, 10]]), topk=1).gt_inds.tolist() == [[-1, -1, -1, -1]]


def test_atss_centre_inside_rule():
    # topk=2 picks priors 0 and 1 with equal IoUs: the threshold (std 0) passes both; the centre decides.
    # (Coordinates are exact in float32 so the two IoUs are bit-identical.)
    assert atss_assign(ROW, [4], targets([[4.5, 0, 15.5, 10]]), topk=2).gt_inds.tolist() == [[0, 0, -1, -1]]
    assert atss_assign(ROW, [4], targets([[5, 0, 15, 10]]), topk=2).gt_inds.tolist() == [[-1, -1, -1, -1]]
    # Centres 2**-8 (< 0.01) inside the gt: below the margin.
    e = 2.0**-8
    assert atss_assign(ROW, [4], targets([[5 - e, 0, 15 + e, 10]]), topk=2).gt_inds.tolist() == [[-1, -1, -1, -1]]


def test_atss_prior_positive_for_two_gts_takes_highest_iou():
    # Candidates of each gt: prior 1 (IoU 0.5 / 0.6) and priors 0, 2 (IoU 0): threshold 0.911 * IoU(prior 1),
    # so prior 1 is positive for both and takes gt 1.
    gt = targets([[10, 0, 20, 5], [10, 0, 20, 6]])
    res = atss_assign(ROW, [4], gt, topk=3)
    assert res.gt_inds.tolist() == [[-1, 1, -1, -1]]
    assert res.gt_inds[0, 1].item() == 1
    torch.testing.assert_close(res.max_overlaps[0, 1], torch.tensor(0.6))


def test_atss_empty_and_degenerate_gt():
    res = atss_assign(ROW, [2, 2], targets([]), topk=9)
    assert res.gt_inds.tolist() == [[-1] * 4] and res.max_overlaps.abs().sum() == 0
    res = atss_assign(ROW, [2, 2], targets([[12, 3, 12, 8], [3, 3, 3, 3]]), topk=9)
    assert res.gt_inds.tolist() == [[-1] * 4]
    assert torch.isfinite(res.max_overlaps).all()


def test_atss_level_smaller_than_topk_and_crowd_ignore():
    # Level 0 has 1 prior, level 1 has 3: candidates = 1 + min(9, 3) = all 4.
    gt = targets([[2, 0, 14, 10]], ignores=[[[20, 0, 40, 10]]])
    res = atss_assign(ROW, [1, 3], gt, topk=9)
    ious = [80 / 140, 40 / 180, 0.0, 0.0]
    thr = statistics.mean(ious) + statistics.stdev(ious)
    assert ious[1] < thr <= ious[0]
    assert res.gt_inds.tolist() == [[0, -1, -1, -1]]
    # Priors 2 and 3 lie in the crowd box: ignored, though still candidates (at mmdet's INF distance).
    assert atss_assign(ROW, [1, 3], gt, topk=9, ignore_iof_thr=0.5).gt_inds.tolist() == [[0, -1, -2, -2]]


def test_atss_prior_valid_excluded_from_candidates():
    gt = targets([[2, 0, 14, 10]])
    valid = torch.tensor([True, True, True, False])
    # Same as the topk=3 case above: the invalid prior cannot be a candidate, and comes back ignored.
    res = atss_assign(ROW, [4], gt, topk=4, prior_valid=valid)
    assert res.gt_inds.tolist() == [[0, -1, -1, -2]]
    plain = atss_assign(ROW[:3], [3], gt, topk=4)
    assert plain.gt_inds.tolist() == [[0, -1, -1]]


def ref_atss(pri, level_counts, gts, topk):
    """Per-image loop following ATSSAssigner.assign (no ignore boxes); returns our index convention."""
    n, m = pri.size(0), gts.size(0)
    if m == 0:
        return [-1] * n, [0.0] * n
    ious = bbox_overlaps(pri, gts)  # (N, M)
    pc = (pri[:, :2] + pri[:, 2:]) / 2
    best = [(-1.0, -1)] * n
    for i in range(m):
        gc = (gts[i, :2] + gts[i, 2:]) / 2
        dist = (pc - gc).pow(2).sum(-1).sqrt()
        cands, start = [], 0
        for c in level_counts:
            order = sorted(range(start, start + c), key=lambda j: dist[j].item())
            cands += order[: min(topk, c)]
            start += c
        vals = [ious[j, i].item() for j in cands]
        thr = statistics.mean(vals) + statistics.stdev(vals)
        for j in cands:
            cx, cy = pc[j].tolist()
            x1, y1, x2, y2 = gts[i].tolist()
            inside = min(cx - x1, cy - y1, x2 - cx, y2 - cy) > 0.01
            if ious[j, i].item() >= thr - 1e-6 and inside and ious[j, i].item() > best[j][0]:
                best[j] = (ious[j, i].item(), i)
    return [b[1] for b in best], [max(b[0], 0.0) for b in best]


def test_atss_batched_equals_reference():
    gen = torch.Generator().manual_seed(5)
    anchors = AnchorGenerator(strides=[8, 16, 32], ratios=[1.0], octave_base_scale=8, scales_per_octave=1)
    sizes = [(8, 8), (4, 4), (2, 2)]
    pri = torch.cat(anchors.grid_priors(sizes))
    counts = [len(x) for x in anchors.grid_priors(sizes)]
    gts = []
    for c in (4, 0, 2):
        xy = torch.rand(c, 2, generator=gen) * 40
        gts.append(torch.cat([xy, xy + 4 + torch.rand(c, 2, generator=gen) * 40], -1))
    padded = pad_targets([{"boxes": g, "labels": torch.zeros(len(g))} for g in gts])
    res = atss_assign(pri, counts, padded, topk=9)
    for b, g in enumerate(gts):
        inds, ovs = ref_atss(pri, counts, g, 9)
        assert res.gt_inds[b].tolist() == inds
        torch.testing.assert_close(res.max_overlaps[b], torch.tensor(ovs))
        single = atss_assign(pri, counts, pad_targets([{"boxes": g, "labels": torch.zeros(len(g))}]), topk=9)
        assert torch.equal(single.gt_inds[0], res.gt_inds[b])
    assert res.num_pos > 0


def test_atss_level_count_checked():
    with pytest.raises(ValueError, match="sum to"):
        atss_assign(ROW, [3], targets([[0, 0, 5, 5]]))


# ----------------------------------------------------------------------------------------------- FCOS


def fcos_inputs(sizes, strides=(8, 16), ranges=((-1, 64), (64, 1e8))):
    gen = PointGenerator(strides)
    pts = gen.grid_priors(sizes)
    counts = [len(p) for p in pts]
    return torch.cat(pts), expand_strides(strides, counts), expand_regress_ranges(ranges, counts)


def test_fcos_regress_range_gating():
    pts = torch.tensor([[50.0, 50.0], [50.0, 50.0]])
    strides = torch.tensor([8.0, 16.0])
    ranges = torch.tensor([[-1.0, 64.0], [64.0, 128.0]])
    gt = targets([[0, 0, 100, 100]], [[0, 0, 200, 100]])
    res, bbox = fcos_assign(pts, strides, ranges, gt)
    # Image 0: max distance 50 -> only the first level. Image 1: max distance 150 -> neither.
    assert res.gt_inds.tolist() == [[0, -1], [-1, -1]]
    assert bbox[0, 0].tolist() == [50, 50, 50, 50]
    assert bbox[0, 1].tolist() == [0, 0, 0, 0]
    gt = targets([[0, 0, 110, 100]])  # max distance 60 at the point: first level; 60 < 64.
    assert fcos_assign(pts, strides, ranges, gt)[0].gt_inds.tolist() == [[0, -1]]
    gt = targets([[-14, 0, 100, 100]])  # max distance exactly 64: inside both closed ranges
    assert fcos_assign(pts, strides, ranges, gt)[0].gt_inds.tolist() == [[0, 0]]


def test_fcos_min_area_and_ties():
    pts = torch.tensor([[10.0, 10.0]])
    s, r = torch.tensor([8.0]), torch.tensor([[-1.0, 1e8]])
    res, bbox = fcos_assign(pts, s, r, targets([[0, 0, 40, 40], [5, 5, 20, 20], [0, 0, 30, 30]]))
    assert res.gt_inds.tolist() == [[1]]
    assert bbox[0, 0].tolist() == [5, 5, 10, 10]
    # Equal areas: the lowest index wins (torch.min).
    res, _ = fcos_assign(pts, s, r, targets([[0, 0, 40, 40], [0, 0, 20, 20], [5, 5, 25, 25]]))
    assert res.gt_inds.tolist() == [[1]]
    # A point on the border is not inside (strict > 0).
    res, _ = fcos_assign(pts, s, r, targets([[10, 0, 40, 40]]))
    assert res.gt_inds.tolist() == [[-1]]


def test_fcos_centre_sampling_radius():
    pts = torch.tensor([[60.0, 60.0], [30.0, 30.0], [1.0, 50.0]])
    s, r = torch.tensor([8.0, 8.0, 8.0]), torch.tensor([[-1.0, 1e8]] * 3)
    gt = targets([[0, 0, 100, 100]])
    # Centre box: 50 +- 8 * 1.5 = [38, 62].
    assert fcos_assign(pts, s, r, gt)[0].gt_inds.tolist() == [[0, 0, 0]]
    assert fcos_assign(pts, s, r, gt, center_sampling=True)[0].gt_inds.tolist() == [[0, -1, -1]]
    # Radius 2.5 -> [30, 70]: the point at 30 is on the border (strict), so still out.
    assert fcos_assign(pts, s, r, gt, center_sampling=True, center_sample_radius=2.5)[0].gt_inds.tolist() == [
        [0, -1, -1]
    ]
    # Thin gt: centre box x in [10 - 12, 10 + 12] clipped to the gt's [0, 20]; point x=1 is inside.
    res, bbox = fcos_assign(pts, s, r, targets([[0, 0, 20, 100]]), center_sampling=True)
    assert res.gt_inds.tolist() == [[-1, -1, 0]]
    assert bbox[0, 2].tolist() == [1, 50, 19, 50]


def test_fcos_empty_and_padding():
    pts, s, r = fcos_inputs([(4, 4), (2, 2)])
    res, bbox = fcos_assign(pts, s, r, targets([], [[0, 0, 30, 30]]))
    assert (res.gt_inds[0] == -1).all() and (bbox[0] == 0).all()
    assert res.pos_mask[1].any()
    # Padding slot of image 1 (box [0,0,0,0]) contains nothing; gt 0 of image 1 is [0, 0, 30, 30].
    assert set(res.gt_inds[1].tolist()) <= {-1, 0}


def ref_fcos(pts, strides, ranges, gts, center_sampling, radius):
    """Per-point loop following FCOSHead._get_target_single; returns (gt index list, targets)."""
    inds, tgts = [], []
    for p in range(pts.size(0)):
        x, y = pts[p].tolist()
        best, best_area = -1, 1e8
        for i, (x1, y1, x2, y2) in enumerate(gts.tolist()):
            lt = [x - x1, y - y1, x2 - x, y2 - y]
            if center_sampling:
                cx, cy, rad = (x1 + x2) / 2, (y1 + y2) / 2, strides[p].item() * radius
                bx = [max(cx - rad, x1), max(cy - rad, y1), min(cx + rad, x2), min(cy + rad, y2)]
                inside = min(x - bx[0], y - bx[1], bx[2] - x, bx[3] - y) > 0
            else:
                inside = min(lt) > 0
            lo, hi = ranges[p].tolist()
            area = (x2 - x1) * (y2 - y1)
            if inside and lo <= max(lt) <= hi and area < best_area:
                best, best_area = i, area
        inds.append(best)
        tgts.append([0.0] * 4 if best < 0 else [x - gts[best, 0], y - gts[best, 1], gts[best, 2] - x, gts[best, 3] - y])
    return inds, torch.tensor(tgts)


@pytest.mark.parametrize("center_sampling", [False, True])
def test_fcos_batched_equals_reference(center_sampling):
    gen = torch.Generator().manual_seed(7)
    strides = (8, 16, 32)
    pts, s, r = fcos_inputs([(8, 8), (4, 4), (2, 2)], strides, DEFAULT_REGRESS_RANGES[:3])
    gts = [random_int_boxes(c, gen, hi=50, max_wh=60) for c in (5, 0, 3)]
    padded = pad_targets([{"boxes": g, "labels": torch.zeros(len(g))} for g in gts])
    res, bbox = fcos_assign(pts, s, r, padded, center_sampling=center_sampling)
    for b, g in enumerate(gts):
        inds, tgts = ref_fcos(pts, s, r, g, center_sampling, 1.5)
        assert res.gt_inds[b].tolist() == inds
        torch.testing.assert_close(bbox[b], tgts.float().reshape(-1, 4))
    assert res.num_pos > 0


def test_expand_helpers():
    r = expand_regress_ranges([(-1, 64), (64, 128)], [2, 1])
    assert r.tolist() == [[-1, 64], [-1, 64], [64, 128]]
    assert expand_strides([8, 16], [1, 2]).tolist() == [8, 16, 16]
    with pytest.raises(ValueError, match="levels"):
        expand_regress_ranges([(-1, 64)], [2, 1])
