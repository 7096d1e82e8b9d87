"""Anchor and point generators: base anchors, grid ordering, validity flags."""

import math

import pytest
import torch

from densedet.structures import AnchorGenerator, PointGenerator


def test_retina_base_anchors_stride8():
    gen = AnchorGenerator(strides=[8], ratios=(0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3)
    base = gen.base_anchors[0]
    assert gen.num_base_priors == [9]
    assert base.shape == (9, 4)
    # Ratio-major, scale-minor: row r*3 + s has size 32 * 2**(s/3), height/width ratio r, centred at 0.
    for r_i, ratio in enumerate((0.5, 1.0, 2.0)):
        for s_i in range(3):
            size = 32 * 2 ** (s_i / 3)
            w, h = size / math.sqrt(ratio), size * math.sqrt(ratio)
            expected = torch.tensor([-w / 2, -h / 2, w / 2, h / 2])
            torch.testing.assert_close(base[r_i * 3 + s_i], expected)
    torch.testing.assert_close(base[3], torch.tensor([-16.0, -16.0, 16.0, 16.0]))


def test_explicit_scales_and_base_sizes_and_offset():
    gen = AnchorGenerator(strides=[16], ratios=[1.0], scales=[2.0], base_sizes=[10], center_offset=0.5)
    # Size 10 * 2 = 20 centred at 0.5 * base_size = 5.
    torch.testing.assert_close(gen.base_anchors[0], torch.tensor([[-5.0, -5.0, 15.0, 15.0]]))
    with pytest.raises(ValueError, match="either scales"):
        AnchorGenerator(strides=[8], octave_base_scale=None, scales_per_octave=None)
    with pytest.raises(ValueError, match="center_offset"):
        AnchorGenerator(strides=[8], center_offset=2.0)


def test_grid_priors_ordering_2x2():
    gen = AnchorGenerator(strides=[8, 16])
    lvl0, lvl1 = gen.grid_priors([(2, 2), (1, 1)], dtype=torch.float32, device="cpu")
    assert lvl0.shape == (2 * 2 * 9, 4) and lvl1.shape == (9, 4)
    base = gen.base_anchors[0]
    # Locations row-major (y then x), the 9 anchors of a location contiguous.
    torch.testing.assert_close(lvl0[:9], base)
    torch.testing.assert_close(lvl0[9:18], base + torch.tensor([8.0, 0.0, 8.0, 0.0]))
    torch.testing.assert_close(lvl0[18:27], base + torch.tensor([0.0, 8.0, 0.0, 8.0]))
    torch.testing.assert_close(lvl0[27:], base + 8.0)
    torch.testing.assert_close(lvl1, gen.base_anchors[1])
    # Level 1 anchors are twice the size of level 0's.
    torch.testing.assert_close(gen.base_anchors[1], 2 * base)


def test_rectangular_stride_and_dtype():
    gen = AnchorGenerator(strides=[(4, 8)], ratios=[1.0], scales=[1.0])
    anchors = gen.grid_priors([(2, 3)], dtype=torch.float64)[0]
    assert anchors.dtype == torch.float64
    # Base size = min stride = 4; x advances by 4, y by 8.
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert centres.tolist() == [[0, 0], [4, 0], [8, 0], [0, 8], [4, 8], [8, 8]]


def test_valid_flags_per_image():
    gen = AnchorGenerator(strides=[8], ratios=[1.0], scales=[4.0])
    # Feature map 3x4 (batch padded to 24x32); image 0 padded to 16x17 -> 2 rows, ceil(17/8)=3 columns valid.
    flags = gen.valid_flags([(3, 4)], torch.tensor([[16, 17], [24, 32]]))[0]
    assert flags.shape == (2, 12)
    expected0 = [[y < 2 and x < 3 for x in range(4)] for y in range(3)]
    assert flags[0].view(3, 4).tolist() == expected0
    assert flags[1].all()
    multi = AnchorGenerator(strides=[8]).valid_flags([(1, 2)], [[8, 8]])[0]
    assert multi.tolist() == [[True] * 9 + [False] * 9]


def test_points_grid_2x3():
    gen = PointGenerator(strides=[8, 16])
    pts = gen.grid_priors([(2, 3), (1, 1)])
    expected = [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert pts[0].tolist() == expected
    assert pts[1].tolist() == [[8, 8]]
    with_stride = gen.grid_priors([(2, 3), (1, 1)], with_stride=True)
    assert with_stride[0].shape == (6, 4)
    assert with_stride[0][:, 2:].unique().tolist() == [8.0]
    assert with_stride[1].tolist() == [[8, 8, 16, 16]]
    assert PointGenerator([8], offset=0.0).grid_priors([(1, 2)])[0].tolist() == [[0, 0], [8, 0]]
    assert gen.num_base_priors == [1, 1]


def test_level_count_checked():
    with pytest.raises(ValueError, match="feature maps"):
        PointGenerator([8, 16]).grid_priors([(1, 1)])
    with pytest.raises(ValueError, match="feature maps"):
        AnchorGenerator([8, 16]).grid_priors([(1, 1)])
