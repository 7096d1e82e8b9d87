"""Model-owned preprocessing (``model.data_preprocessor``): hand-computed values, padding, channel order, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densedet.data.collate import collate
from densedet.data.transforms import Normalize
from densedet.models.preprocess import DetPreprocessor, build_preprocessor
from densedet.registry import ConfigError


def test_values_padding_and_channel_order_by_hand() -> None:
    pre = DetPreprocessor(mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 5.0), pad_size_divisor=8)
    x = torch.zeros(2, 3, 5, 6, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 30, 40, 50
    metas = [{"img_shape": (5, 6)}, {"img_shape": (3, 4)}]  # the second image was padded by collate
    y = pre(x, metas)
    assert y.shape == (2, 3, 8, 8) and y.dtype == torch.float32  # padded to multiples of 8
    assert y[0, :, 0, 0].tolist() == [(30 - 10) / 2, (40 - 20) / 4, (50 - 30) / 5]
    assert (y[0, :, 5:] == 0).all() and (y[0, :, :, 6:] == 0).all()  # the divisor's padding is 0
    assert y[1, :, 2, 3].tolist() == [10.0, 5.0, 4.0] and (y[1, :, 3:] == 0).all() and (y[1, :, :, 4:] == 0).all()
    bgr = DetPreprocessor(mean=(1.0, 2.0, 3.0), std=(1.0, 1.0, 1.0), to_rgb=False)(x[:1])
    assert bgr[0, :, 0, 0].tolist() == [50 - 1, 40 - 2, 30 - 3]  # RGB swapped to BGR before the mean


def test_equals_the_normalize_step_and_collate_bit_for_bit() -> None:
    """The old pipeline (Normalize, then collate's zero padding) and the new one (collate uint8, then the model's
    preprocessor) give identical tensors."""
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 50), (30, 64))]
    with pytest.warns(Warning):
        norm = Normalize()
    old = collate([{"img": norm({"img": im.copy(), "meta": {}})["img"], "boxes": torch.zeros(0, 4),
                    "labels": torch.zeros(0, dtype=torch.long), "ignore_boxes": torch.zeros(0, 4),
                    "meta": {"img_shape": im.shape[:2]}} for im in imgs], 32)
    new = collate([{"img": torch.from_numpy(im.transpose(2, 0, 1).copy()), "boxes": torch.zeros(0, 4),
                    "labels": torch.zeros(0, dtype=torch.long), "ignore_boxes": torch.zeros(0, 4),
                    "meta": {"img_shape": im.shape[:2]}} for im in imgs], 32)
    assert new["images"].dtype == torch.uint8
    pre = build_preprocessor({"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
                              "pad_size_divisor": 32})
    assert torch.equal(pre(new["images"], new["metas"]), old["images"])


def test_identity_default_and_mmdet3_keys() -> None:
    x = torch.rand(1, 3, 7, 9) * 3 - 1  # already-normalised floats: a bare model dict takes them as they are
    assert torch.equal(build_preprocessor(None)(x), x)
    pre = build_preprocessor({"type": "DetDataPreprocessor", "mean": [1, 2, 3], "std": [1, 1, 1],
                              "bgr_to_rgb": False, "pad_size_divisor": 1, "pad_value": 0})
    assert pre.to_rgb is False and pre.config()["mean"] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(("cfg", "key"), [
    ({"mean": [1, 2]}, "mean"), ({"std": [1, 0, 1]}, "std"), ({"pad_size_divisor": 0}, "pad_size_divisor"),
    ({"mean": "imagenet"}, "mean"), ({"meen": [0, 0, 0]}, "meen"), ({"pad_value": 114}, "pad_value"),
    ({"type": "Normalize"}, "type"),
])
def test_bad_config_names_the_key(cfg: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"data_preprocessor.*{key}"):
        build_preprocessor(cfg)
