"""Batch samples: pad images to a common size and keep targets and metas as per-image lists."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["collate", "collate_views"]


def _round_up(v: int, divisor: int) -> int:
    return int(math.ceil(v / divisor) * divisor) if divisor > 0 else v


def collate(samples: list[dict[str, Any]], size_divisor: int = 32) -> dict[str, Any]:
    """Collate dataset items into a batch.

    Args:
        samples: items of :class:`~densedet.data.coco.CocoDataset` (``img`` ``(3, H, W)`` pixels, uint8 as the
            pipeline leaves them; the model normalises them), ``boxes``, ``labels``, ``ignore_boxes``, ``meta``).
        size_divisor: the padded height and width are multiples of it (0: no rounding).

    Returns:
        ``images``: ``(B, 3, Hp, Wp)`` tensor of the images' dtype (uint8 pixels; float when the dtypes differ),
        each image at the top-left, zero-padded bottom/right, where
        ``Hp, Wp`` are the largest height/width in the batch rounded up to ``size_divisor``;
        ``targets``: list of ``{"boxes", "labels", "ignore_boxes"}`` (boxes ``xyxy`` pixels, unchanged by padding),
        plus ``masks`` (:class:`~densedet.structures.masks.InstanceMasks`) when the dataset loads masks;
        ``metas``: list of meta dicts (copies) with ``pad_shape`` = the image's own ``(h, w)`` rounded up to
        ``size_divisor`` (as MMDetection's ``Pad``, used for anchor valid flags) and ``batch_input_shape`` =
        ``(Hp, Wp)``.
    """
    if not samples:
        raise ValueError("collate: empty list of samples")
    if "views" in samples[0]:
        return collate_views(samples, size_divisor)
    imgs = [s["img"] for s in samples]
    if not all(isinstance(im, torch.Tensor) and im.dim() == 3 for im in imgs):
        raise TypeError("collate: every sample's 'img' must be a (C, H, W) tensor")
    channels = {int(im.shape[0]) for im in imgs}
    if len(channels) != 1:
        raise ValueError(f"collate: images have different channel counts {sorted(channels)}")
    if len({im.dtype for im in imgs}) > 1:  # e.g. uint8 pixels beside a float image: one batch dtype
        imgs = [im.float() for im in imgs]
    hp = _round_up(max(int(im.shape[1]) for im in imgs), size_divisor)
    wp = _round_up(max(int(im.shape[2]) for im in imgs), size_divisor)
    images = imgs[0].new_zeros((len(imgs), channels.pop(), hp, wp))
    targets, metas = [], []
    for i, s in enumerate(samples):
        h, w = s["img"].shape[1:]
        images[i, :, :h, :w] = imgs[i]  # one copy per image: sizes differ, nothing to vectorise
        targets.append({"boxes": s["boxes"], "labels": s["labels"], "ignore_boxes": s["ignore_boxes"]})
        if "masks" in s:  # InstanceMasks in image pixels: bottom/right padding leaves them as they are
            targets[-1]["masks"] = s["masks"]
        meta = dict(s["meta"])
        meta["pad_shape"] = (_round_up(int(h), size_divisor), _round_up(int(w), size_divisor))
        meta["batch_input_shape"] = (hp, wp)
        metas.append(meta)
    return {"images": images, "targets": targets, "metas": metas}


def collate_views(samples: list[dict[str, Any]], size_divisor: int = 32) -> dict[str, Any]:
    """Collate test-time augmentation items ``{"views": [sample, ...]}`` (``MultiScaleFlipAug``) view by view.

    Returns:
        ``views``: per view, a :func:`collate` batch of that view of every image; ``metas``: the first view's
        metas (``image_id`` etc.).
    """
    n = len(samples[0]["views"])
    if any("views" not in s or len(s["views"]) != n for s in samples):
        raise ValueError(f"collate: every item of a test-time augmentation batch needs the same {n} views")
    views = [collate([s["views"][v] for s in samples], size_divisor) for v in range(n)]
    return {"views": views, "metas": views[0]["metas"]}
