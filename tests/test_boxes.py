"""Box geometry and padded targets, against hand-computed values."""

import pytest
import torch

from densedet.structures import (
    PaddedTargets,
    bbox_overlaps,
    box_area,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    pad_targets,
)

A = [0.0, 0.0, 10.0, 10.0]
B_ = [5.0, 5.0, 15.0, 15.0]  # overlaps A in a 5x5 square
C = [20.0, 0.0, 30.0, 10.0]  # disjoint from A
D = [2.0, 2.0, 4.0, 4.0]  # inside A
Z = [3.0, 3.0, 3.0, 3.0]  # zero area, inside A


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_iou_hand_computed():
    ious = bbox_overlaps(t(A), t(A, B_, C, D, Z))
    # A vs B: 25 / (100 + 100 - 25); A vs D: 4 / 100.
    expected = torch.tensor([[1.0, 25 / 175, 0.0, 0.04, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ious, expected)


def test_iof_is_intersection_over_first_area():
    torch.testing.assert_close(bbox_overlaps(t(A), t(B_, D), mode="iof"), t([0.25, 0.04]))
    torch.testing.assert_close(bbox_overlaps(t(D), t(A), mode="iof"), t([1.0]))


def test_giou_hand_computed():
    g = bbox_overlaps(t(A), t(B_, C, D), mode="giou")
    # A,B: enclosing 15x15=225, union 175 -> 1/7 - 50/225; A,C: enclosing 30x10, union 200 -> -1/3;
    # D inside A: enclosing box is A itself = union -> giou == iou.
    expected = t([1 / 7 - 50 / 225, -1 / 3, 0.04])
    torch.testing.assert_close(g, expected)


def test_zero_area_boxes_give_zero_not_nan():
    for mode in ("iou", "iof", "giou"):
        out = bbox_overlaps(t(Z, Z), t(Z, A), mode=mode)
        assert torch.isfinite(out).all(), mode
    assert bbox_overlaps(t(Z), t(Z)).item() == 0.0


def test_eps_clamps_union():
    # Two identical tiny boxes: area 1e-8 < eps, so IoU = 1e-8 / 1e-6 (mmdet's union clamp), not 1.
    tiny = t([0.0, 0.0, 1e-4, 1e-4])
    assert bbox_overlaps(tiny, tiny).item() == pytest.approx(1e-2)


def test_aligned_and_batched_shapes():
    a = t(A, B_, C)
    b = t(B_, B_, A)
    aligned = bbox_overlaps(a, b, is_aligned=True)
    torch.testing.assert_close(aligned, t(25 / 175, 1.0, 0.0))
    full = bbox_overlaps(a, b)
    torch.testing.assert_close(aligned, full.diagonal())
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 5, 2, generator=gen) * 50
    boxes1 = torch.cat([xy, xy + 1 + torch.rand(2, 5, 2, generator=gen) * 30], -1)
    boxes2 = boxes1.flip(1)[:, :3]
    batched = bbox_overlaps(boxes1, boxes2, mode="giou")
    assert batched.shape == (2, 5, 3)
    for i in range(2):
        torch.testing.assert_close(batched[i], bbox_overlaps(boxes1[i], boxes2[i], mode="giou"))
    # (N, 4) priors broadcast against (B, M, 4) gts.
    shared = bbox_overlaps(boxes1[0], boxes2)
    torch.testing.assert_close(shared[1], bbox_overlaps(boxes1[0], boxes2[1]))


def test_empty_inputs():
    assert bbox_overlaps(torch.zeros(0, 4), torch.zeros(3, 4)).shape == (0, 3)
    assert bbox_overlaps(torch.zeros(2, 4), torch.zeros(0, 4)).shape == (2, 0)
    assert bbox_overlaps(torch.zeros(0, 4), torch.zeros(0, 4), is_aligned=True).shape == (0,)


def test_bad_mode_and_shape():
    with pytest.raises(ValueError, match="mode"):
        bbox_overlaps(t(A), t(A), mode="diou")
    with pytest.raises(ValueError, match="aligned"):
        bbox_overlaps(t(A, B_), t(A), is_aligned=True)


def test_cxcywh_round_trip_and_area():
    boxes = t(A, B_, [1.0, 2.0, 4.0, 8.0])
    c = box_xyxy_to_cxcywh(boxes)
    torch.testing.assert_close(c[2], t(2.5, 5.0, 3.0, 6.0))
    torch.testing.assert_close(box_cxcywh_to_xyxy(c), boxes)
    torch.testing.assert_close(box_area(boxes), t(100.0, 100.0, 18.0))


def test_pad_targets():
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0], [1.0, 1.0, 2.0, 2.0]]), "labels": torch.tensor([3, 7])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "ignore_boxes": [[0, 0, 9, 9]]},
    ]
    p = pad_targets(targets)
    assert isinstance(p, PaddedTargets)
    assert p.gt_boxes.shape == (2, 2, 4) and p.ignore_boxes.shape == (2, 1, 4)
    assert p.gt_valid.tolist() == [[True, True], [False, False]]
    assert p.gt_labels.tolist() == [[3, 7], [-1, -1]]
    assert p.ignore_valid.tolist() == [[False], [True]]
    torch.testing.assert_close(p.ignore_boxes[1, 0], torch.tensor([0.0, 0.0, 9.0, 9.0]))
    assert p.num_gts.tolist() == [2, 0]


def test_pad_targets_all_empty_keeps_one_slot():
    p = pad_targets([{"boxes": [], "labels": []}] * 3)
    assert p.gt_boxes.shape == (3, 1, 4) and p.ignore_boxes.shape == (3, 1, 4)
    assert not p.gt_valid.any() and not p.ignore_valid.any()


def test_pad_targets_rejects_mismatch():
    with pytest.raises(ValueError, match="image 0 has 1 boxes but 2 labels"):
        pad_targets([{"boxes": [[0, 0, 1, 1]], "labels": [1, 2]}])
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        pad_targets([{"boxes": [[0, 0, 1]], "labels": [1]}])
