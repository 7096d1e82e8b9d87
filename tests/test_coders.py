"""Box coders against hand-computed deltas / distances and encode-decode round trips."""

import math

import pytest
import torch

from densedet.structures import DeltaXYWHBBoxCoder, DistancePointBBoxCoder


def random_boxes(n, gen, scale=100.0):
    xy = torch.rand(n, 2, generator=gen) * scale
    wh = 1 + torch.rand(n, 2, generator=gen) * scale
    return torch.cat([xy, xy + wh], -1)


def test_delta_encode_hand_computed():
    prior = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[5.0, 5.0, 25.0, 15.0]])
    # centres (5, 5) -> (15, 10), sizes 10x10 -> 20x10.
    d = DeltaXYWHBBoxCoder().encode(prior, gt)
    torch.testing.assert_close(d, torch.tensor([[1.0, 0.5, math.log(2.0), 0.0]]))
    d = DeltaXYWHBBoxCoder(target_means=(0.1, 0, 0, 0), target_stds=(0.1, 0.1, 0.2, 0.2)).encode(prior, gt)
    torch.testing.assert_close(d, torch.tensor([[9.0, 5.0, math.log(2.0) / 0.2, 0.0]]))


def test_delta_decode_hand_computed():
    rois = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.7, -1.9, -0.5, 0.3]])
    out = DeltaXYWHBBoxCoder().decode(rois, deltas, max_shape=(32, 32))
    e = math.e / 2  # half of the new size exp(1) * 1
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.5 - e, 1.5 - e, 1.5 + e, 1.5 + e], [5.0, 5.0, 5.0, 5.0]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("stds", [(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)])
def test_delta_round_trip(stds):
    gen = torch.Generator().manual_seed(1)
    priors, gts = random_boxes(50, gen), random_boxes(50, gen)
    coder = DeltaXYWHBBoxCoder(target_means=(0.05, -0.05, 0.0, 0.1), target_stds=stds)
    torch.testing.assert_close(coder.decode(priors, coder.encode(priors, gts)), gts, rtol=1e-5, atol=1e-4)


def test_delta_wh_ratio_clip():
    prior = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    coder = DeltaXYWHBBoxCoder()
    out = coder.decode(prior, torch.tensor([[0.0, 0.0, 10.0, -10.0]]))
    # dw, dh clamped to +-log(1000/16): width 10 * 62.5, height 10 / 62.5, centred at (5, 5).
    w, h = 10 * 62.5, 10 / 62.5
    torch.testing.assert_close(out, torch.tensor([[5 - w / 2, 5 - h / 2, 5 + w / 2, 5 + h / 2]]))


def test_delta_ctr_clamp():
    prior = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    coder = DeltaXYWHBBoxCoder(add_ctr_clamp=True, ctr_clamp=32)
    out = coder.decode(prior, torch.tensor([[100.0, -100.0, -10.0, 0.0]]))
    # Centre shift limited to +-32 px; dw only clamped from above, so -10 shrinks the width by e^-10.
    w = 10 * math.exp(-10)
    torch.testing.assert_close(out, torch.tensor([[37 - w / 2, -27 - 5, 37 + w / 2, -27 + 5]]))


def test_delta_clip_per_image_and_no_clip():
    priors = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    deltas = torch.zeros(2, 1, 4)
    shapes = torch.tensor([[20, 30], [50, 10]])  # (h, w) per image
    out = DeltaXYWHBBoxCoder().decode(priors, deltas, max_shape=shapes)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.0, 30.0, 20.0]], [[0.0, 0.0, 10.0, 40.0]]]))
    free = DeltaXYWHBBoxCoder(clip_border=False).decode(priors, deltas, max_shape=shapes)
    torch.testing.assert_close(free, priors.expand(2, 1, 4))
    with pytest.raises(ValueError, match="per-image"):
        DeltaXYWHBBoxCoder().decode(priors, deltas[0], max_shape=shapes)


def test_delta_batched_decode_matches_per_image():
    gen = torch.Generator().manual_seed(2)
    priors = random_boxes(7, gen)
    deltas = torch.randn(3, 7, 4, generator=gen)
    coder = DeltaXYWHBBoxCoder(target_stds=(0.1, 0.1, 0.2, 0.2))
    shapes = torch.tensor([[60, 80], [100, 100], [30, 200]])
    out = coder.decode(priors, deltas, max_shape=shapes)
    for i in range(3):
        h, w = shapes[i].tolist()
        torch.testing.assert_close(out[i], coder.decode(priors, deltas[i], max_shape=(h, w)))


def test_distance_encode_decode_hand_computed():
    coder = DistancePointBBoxCoder()
    pts = torch.tensor([[5.0, 5.0]])
    gt = torch.tensor([[0.0, 1.0, 10.0, 20.0]])
    torch.testing.assert_close(coder.encode(pts, gt), torch.tensor([[5.0, 4.0, 5.0, 15.0]]))
    torch.testing.assert_close(coder.encode(pts, gt, max_dis=10.0), torch.tensor([[5.0, 4.0, 5.0, 9.9]]))
    torch.testing.assert_close(coder.decode(pts, torch.tensor([[5.0, 4.0, 5.0, 15.0]])), gt)
    clipped = coder.decode(pts, torch.tensor([[10.0, 4.0, 5.0, 15.0]]), max_shape=(12, 8))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 1.0, 8.0, 12.0]]))
    unclipped = DistancePointBBoxCoder(clip_border=False).decode(
        pts, torch.tensor([[10.0, 4.0, 5.0, 15.0]]), max_shape=(12, 8)
    )
    torch.testing.assert_close(unclipped, torch.tensor([[-5.0, 1.0, 10.0, 20.0]]))


def test_distance_round_trip_batched():
    gen = torch.Generator().manual_seed(3)
    gts = random_boxes(20, gen)
    pts = gts[:, :2] + (gts[:, 2:] - gts[:, :2]) * torch.rand(20, 2, generator=gen)
    coder = DistancePointBBoxCoder()
    dist = coder.encode(pts, gts)
    assert (dist >= 0).all()
    torch.testing.assert_close(coder.decode(pts, dist), gts)
    batched = coder.decode(pts, dist.expand(2, 20, 4), max_shape=torch.tensor([[50, 50], [1000, 1000]]))
    torch.testing.assert_close(batched[1], gts)
    torch.testing.assert_close(batched[0], coder.decode(pts, dist, max_shape=(50, 50)))
