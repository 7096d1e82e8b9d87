"""Soft-NMS: hand-computed decays (linear, gaussian), min_score, class separation, the batched version against a
plain sequential loop written from the mmcv kernel, and the ``test_cfg.nms`` config path."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import nms

from densedet.models.heads.postprocess import TestConfig as HeadTestConfig
from densedet.models.heads.postprocess import parse_test_cfg, postprocess_levels
from densedet.models.heads.soft_nms import batched_soft_nms
from densedet.registry import ConfigError

# A, B, C overlap; D is far away. IoU(A,B) = 50/100 = 0.5, IoU(A,C) = 50/150 = 1/3, IoU(B,C) = 25/125 = 0.2.
BOXES = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=torch.float32)
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.3])
ONE_GROUP = torch.zeros(4, dtype=torch.long)


def test_linear_decay_hand_computed() -> None:
    keep, scores = batched_soft_nms(BOXES, SCORES, ONE_GROUP, iou_threshold=0.3, method="linear")
    # pick A; B: .8 * (1 - .5) = .4; C: .7 * (1 - 1/3) = .4667; D untouched. Pick C; IoU(C,B) = .2 < .3: B stays .4.
    assert keep.tolist() == [0, 2, 1, 3]
    assert torch.allclose(scores, torch.tensor([0.9, 0.7 * 2 / 3, 0.4, 0.3]))


def test_linear_threshold_is_inclusive_as_in_mmcv() -> None:
    # IoU(A,B) = 0.5 exactly: the kernel decays when iou >= iou_threshold
    keep, scores = batched_soft_nms(BOXES[:2], SCORES[:2], ONE_GROUP[:2], iou_threshold=0.5, method="linear")
    assert torch.allclose(scores, torch.tensor([0.9, 0.4]))


def test_gaussian_decay_hand_computed() -> None:
    keep, scores = batched_soft_nms(BOXES, SCORES, ONE_GROUP, sigma=0.5, method="gaussian")
    b1 = 0.8 * math.exp(-0.25 / 0.5)  # 0.4852, decayed by A
    c1 = 0.7 * math.exp(-(1 / 9) / 0.5)  # 0.5605, decayed by A, then picked
    b2 = b1 * math.exp(-0.04 / 0.5)  # decayed by C as well (gaussian has no threshold)
    assert keep.tolist() == [0, 2, 1, 3]
    assert torch.allclose(scores, torch.tensor([0.9, c1, b2, 0.3]), atol=1e-6)


def test_min_score_drops_decayed_boxes() -> None:
    # linear: B decays to .4 < .45 and goes; C decays to .4667 and stays; D starts below .45 and goes
    keep, scores = batched_soft_nms(BOXES, SCORES, ONE_GROUP, iou_threshold=0.3, min_score=0.45, method="linear")
    assert keep.tolist() == [0, 2]
    assert torch.allclose(scores, torch.tensor([0.9, 0.7 * 2 / 3]))


def test_groups_do_not_decay_each_other() -> None:
    # the same four boxes again as class 1: each class gets exactly the single-class result
    boxes = torch.cat([BOXES, BOXES])
    scores = torch.cat([SCORES, SCORES * 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    keep, out = batched_soft_nms(boxes, scores, groups, iou_threshold=0.3, method="linear")
    expected = torch.tensor([0.9, 0.7 * 2 / 3, 0.4, 0.3])
    for g, factor in ((0, 1.0), (1, 0.5)):
        mine = groups[keep] == g
        assert torch.allclose(out[mine], expected * factor)
    assert (out[:-1] >= out[1:]).all()  # sorted by decayed score across groups


def test_naive_method_equals_hard_nms() -> None:
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(60, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(60, 2, generator=g) * 30 + 1], 1)
    scores = torch.rand(60, generator=g) * 0.9 + 0.05
    keep, out = batched_soft_nms(boxes, scores, torch.zeros(60, dtype=torch.long), iou_threshold=0.5,
                                 min_score=1e-3, method="naive")
    # hard NMS suppresses IoU > thr, naive soft-NMS IoU >= thr: equal unless an IoU is exactly 0.5
    assert keep.tolist() == nms(boxes, scores, 0.5).tolist() and 10 < len(keep) < 60
    assert torch.equal(out, scores[keep])


def _reference_soft_nms(boxes, scores, iou_threshold, sigma, min_score, method):
    """One group, sequential, written from mmcv's ``softnms_cpu``: pick the max, decay the rest, drop those below
    ``min_score`` (the first pick is exempt there; the batched version drops sub-``min_score`` inputs up front,
    so the test inputs start above ``min_score``)."""
    rest = [(float(s), i) for i, s in enumerate(scores.tolist())]
    out = []
    while rest:
        j = max(range(len(rest)), key=lambda k: rest[k][0])
        s, i = rest.pop(j)
        out.append((i, s))
        b = boxes[i].tolist()
        nxt = []
        for s2, i2 in rest:
            c = boxes[i2].tolist()
            iw = max(0.0, min(b[2], c[2]) - max(b[0], c[0]))
            ih = max(0.0, min(b[3], c[3]) - max(b[1], c[1]))
            inter = iw * ih
            iou = inter / ((b[2] - b[0]) * (b[3] - b[1]) + (c[2] - c[0]) * (c[3] - c[1]) - inter)
            if method == "linear":
                w = 1 - iou if iou >= iou_threshold else 1.0
            elif method == "gaussian":
                w = math.exp(-iou * iou / sigma)
            else:
                w = 0.0 if iou >= iou_threshold else 1.0
            if s2 * w >= min_score:
                nxt.append((s2 * w, i2))
        rest = nxt
    return out


@pytest.mark.parametrize("method", ["linear", "gaussian", "naive"])
def test_batched_equals_sequential_per_group_loop(method) -> None:
    g = torch.Generator().manual_seed(0)
    n = 300
    xy = torch.rand(n, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 40 + 2], 1)
    scores = torch.rand(n, generator=g) * 0.9 + 0.05
    groups = torch.randint(0, 7, (n,), generator=g)  # e.g. 7 (image, class) pairs of different sizes
    keep, out = batched_soft_nms(boxes, scores, groups, iou_threshold=0.4, sigma=0.5, min_score=0.02, method=method)
    got = {int(k): float(s) for k, s in zip(keep, out)}
    expected = {}
    for grp in range(7):
        idx = (groups == grp).nonzero(as_tuple=True)[0]
        for i, s in _reference_soft_nms(boxes[idx], scores[idx], 0.4, 0.5, 0.02, method):
            expected[int(idx[i])] = s
    assert set(got) == set(expected)
    assert all(abs(got[k] - expected[k]) < 1e-5 for k in got)
    assert (out[:-1] >= out[1:]).all()


def test_max_per_group_keeps_the_first_picks() -> None:
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(100, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + 20], 1)
    scores = torch.rand(100, generator=g) * 0.9 + 0.05
    groups = torch.randint(0, 3, (100,), generator=g)
    full_keep, full = batched_soft_nms(boxes, scores, groups, method="gaussian")
    keep, out = batched_soft_nms(boxes, scores, groups, method="gaussian", max_per_group=5)
    for grp in range(3):
        top = full[groups[full_keep] == grp][:5]
        assert torch.allclose(out[groups[keep] == grp], top)


def test_empty_input() -> None:
    keep, out = batched_soft_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert keep.numel() == 0 and out.numel() == 0


def test_test_cfg_soft_nms_keys_and_errors() -> None:
    cfg = parse_test_cfg({"nms": {"type": "soft_nms", "iou_threshold": 0.65}})  # the VFNet-X spelling
    assert cfg.nms_kwargs() == {"iou_threshold": 0.65, "sigma": 0.5, "min_score": 1e-3, "method": "linear"}
    with pytest.raises(ConfigError, match="model.test_cfg.nms.method"):
        parse_test_cfg({"nms": {"type": "soft_nms", "method": "gauss"}})
    with pytest.raises(ConfigError, match="model.test_cfg.nms.sigmaa"):
        parse_test_cfg({"nms": {"type": "soft_nms", "sigmaa": 0.5}})
    with pytest.raises(ConfigError, match="model.test_cfg.nms.type"):
        parse_test_cfg({"nms": {"type": "softnms"}})
    with pytest.raises(ConfigError, match="model.test_cfg.nms.sigma"):
        parse_test_cfg({"nms": {"type": "nms", "sigma": 0.5}})  # hard NMS takes no sigma


def test_postprocess_with_soft_nms_per_image_and_class() -> None:
    # two images; image 0 holds the A-D example as class 0 plus A as class 1; image 1 only D
    boxes = torch.stack([torch.cat([BOXES, BOXES[:1]]), torch.cat([BOXES, BOXES[:1]])])  # (2, 5, 4)
    scores = torch.zeros(2, 5, 2)
    scores[0, :4, 0] = SCORES
    scores[0, 4, 1] = 0.6
    scores[1, 3, 0] = 0.3

    def decode(lvl, idx):
        return boxes.gather(1, idx[..., None].expand(-1, -1, 4))

    cfg = HeadTestConfig(score_thr=0.05, nms={"type": "soft_nms", "iou_threshold": 0.3, "method": "linear"},
                     max_per_img=4)
    metas = [{"scale_factor": (1.0, 1.0)}] * 2
    out = postprocess_levels([scores], None, decode, 2, cfg, metas)
    assert torch.allclose(out[0]["scores"], torch.tensor([0.9, 0.6, 0.7 * 2 / 3, 0.4]))  # max_per_img = 4
    assert out[0]["labels"].tolist() == [0, 1, 0, 0]
    assert torch.equal(out[0]["boxes"][1], BOXES[0])  # class 1's A is not decayed by class 0's A
    assert torch.allclose(out[1]["scores"], torch.tensor([0.3])) and out[1]["labels"].tolist() == [0]
