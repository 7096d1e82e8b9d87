"""Box-aware image transforms with MMDetection 2.x semantics (``mmdet/datasets/pipelines/transforms.py``).

Every transform is a callable on a *sample* dict and returns it (modified in place):

- ``img``: ``(H, W, 3)`` uint8 numpy array, RGB (``Normalize`` turns it into a float32 ``(3, H, W)`` torch tensor,
  so it comes last);
- ``boxes``: ``(n, 4)`` float32 numpy array, ``xyxy`` absolute pixels of the current image;
- ``labels``: ``(n,)`` int64 numpy array; ``ignore_boxes``: ``(k, 4)`` float32 numpy array, ``xyxy``;
- ``meta``: dict with ``ori_shape`` (h, w), ``img_shape`` (h, w), ``scale_factor`` (w_scale, h_scale), ``flip``.

Randomness. A transform draws from the ``rng`` argument (a ``numpy.random.Generator``) when given, else from a
process-wide generator (:func:`transform_rng`). ``CocoDataset`` passes a generator seeded from
``(seed, epoch, image index)`` when its loader's :class:`~densedet.data.samplers.SeededSampler` supplies one, so
augmentation is a pure function of the seed and the epoch, whatever the number of workers or processes. Without
one, the process-wide generator is seeded from ``torch.initial_seed()`` on first use (a DataLoader worker's seed
is derived from the loader's ``generator``), or explicitly with :func:`seed_transforms`.

Loading, padding and tensor formatting are not transforms here: ``CocoDataset`` decodes images and ``collate``
pads the batch, so MMDetection's ``LoadImageFromFile``, ``LoadAnnotations``, ``Pad``, ``DefaultFormatBundle`` and
``Collect`` are not listed in a pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from densedet.registry import TRANSFORMS, ConfigError

__all__ = [
    "Compose",
    "Normalize",
    "RandomFlip",
    "Resize",
    "build_pipeline",
    "seed_transforms",
    "transform_rng",
]

_RNG: dict[str, Any] = {"rng": None, "pid": None}

# MMDetection pipeline steps whose work DenseDet does elsewhere; named in the error for a friendlier message.
_IMPLICIT_STEPS = {
    "LoadImageFromFile": "CocoDataset decodes the images",
    "LoadAnnotations": "CocoDataset loads the boxes and labels",
    "Pad": "collate(size_divisor=...) pads each batch",
    "DefaultFormatBundle": "CocoDataset returns tensors",
    "ImageToTensor": "Normalize returns a tensor",
    "Collect": "CocoDataset returns every key",
}


def seed_transforms(seed: int) -> None:
    """Re-seed the process-wide transform generator (used when no per-sample generator is given)."""
    _RNG["rng"] = np.random.default_rng(seed)
    _RNG["pid"] = os.getpid()


def transform_rng() -> np.random.Generator:
    """The process-wide transform generator; lazily seeded from ``torch.initial_seed()`` in each new process."""
    if _RNG["rng"] is None or _RNG["pid"] != os.getpid():
        seed_transforms(torch.initial_seed())
    return _RNG["rng"]


def _check_numpy_img(sample: dict, name: str) -> np.ndarray:
    img = sample["img"]
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name} needs an (H, W, 3) numpy image; put it before Normalize in the pipeline")
    return img


def _as_scale(value: Any, where: str) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
        raise ConfigError(f"{where}: a scale must be a pair of numbers (long, short) or (w, h), got {value!r}")
    if min(value) <= 0:
        raise ConfigError(f"{where}: scale sides must be positive, got {value!r}")
    return int(value[0]), int(value[1])


@TRANSFORMS.register()
class Resize:
    """Resize the image and its boxes (MMDetection 2.x ``Resize``).

    Args:
        img_scale: one scale ``(long, short)`` (``(w, h)`` when ``keep_ratio=False``) or a list of them.
        multiscale_mode: with several scales, ``'range'`` samples the long edge and the short edge uniformly
            (integers, inclusive) between the smallest and largest given; ``'value'`` picks one listed scale.
        ratio_range: ``(min, max)``; when set, a single ``img_scale`` is multiplied by a ratio drawn uniformly.
        keep_ratio: rescale by ``s = min(long / max(h, w), short / min(h, w))`` to ``(int(w*s+0.5), int(h*s+0.5))``
            (mmcv ``rescale_size``); otherwise resize to exactly ``(w, h) = img_scale``.
        bbox_clip_border: clip boxes to the resized image.

    Images are resized with Pillow's bilinear filter (MMDetection uses cv2, which does not antialias when
    shrinking; pixel values can differ slightly, sizes and box maths are identical).
    """

    def __init__(
        self,
        img_scale: Sequence[Any] = (1333, 800),
        multiscale_mode: str = "range",
        ratio_range: Sequence[float] | None = None,
        keep_ratio: bool = True,
        bbox_clip_border: bool = True,
    ) -> None:
        where = "Resize"
        if img_scale is None:
            raise ConfigError(f"{where}: img_scale is required")
        if len(img_scale) == 2 and all(isinstance(v, (int, float)) for v in img_scale):
            scales = [_as_scale(img_scale, where)]
        else:
            scales = [_as_scale(s, where) for s in img_scale]
        if not scales:
            raise ConfigError(f"{where}: img_scale is empty")
        if multiscale_mode not in ("range", "value"):
            raise ConfigError(f"{where}: multiscale_mode must be 'range' or 'value', got {multiscale_mode!r}")
        if ratio_range is not None:
            if len(scales) != 1:
                raise ConfigError(f"{where}: ratio_range needs exactly one img_scale, got {len(scales)}")
            if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
                raise ConfigError(f"{where}: ratio_range must be (min, max) with 0 < min <= max, got {ratio_range}")
        elif multiscale_mode == "range" and len(scales) not in (1, 2):
            raise ConfigError(f"{where}: multiscale_mode='range' takes two scales (min, max), got {len(scales)}")
        self.img_scale = scales
        self.multiscale_mode = multiscale_mode
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None
        self.keep_ratio = keep_ratio
        self.bbox_clip_border = bbox_clip_border

    def _sample_scale(self, rng: np.random.Generator) -> tuple[int, int]:
        # mmdet Resize._random_scale: ratio_range > single scale > 'range' (random_sample) > 'value' (random_select).
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            ratio = rng.random() * (hi - lo) + lo
            base = self.img_scale[0]
            return int(base[0] * ratio), int(base[1] * ratio)
        if len(self.img_scale) == 1:
            return self.img_scale[0]
        if self.multiscale_mode == "range":
            longs = [max(s) for s in self.img_scale]
            shorts = [min(s) for s in self.img_scale]
            long_edge = int(rng.integers(min(longs), max(longs) + 1))
            short_edge = int(rng.integers(min(shorts), max(shorts) + 1))
            return long_edge, short_edge
        return self.img_scale[int(rng.integers(len(self.img_scale)))]

    @staticmethod
    def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
        """Keep-ratio target ``(new_w, new_h)`` for an image of ``w x h`` (mmcv ``rescale_size``)."""
        max_long, max_short = max(scale), min(scale)
        factor = min(max_long / max(h, w), max_short / min(h, w))
        return int(w * factor + 0.5), int(h * factor + 0.5)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        img = _check_numpy_img(sample, "Resize")
        h, w = img.shape[:2]
        scale = self._sample_scale(rng if rng is not None else transform_rng())
        new_w, new_h = self.rescale_size(w, h, scale) if self.keep_ratio else scale
        if (new_w, new_h) != (w, h):
            img = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.Resampling.BILINEAR))
        sample["img"] = img
        w_scale, h_scale = new_w / w, new_h / h
        factors = np.array([w_scale, h_scale, w_scale, h_scale], dtype=np.float32)
        for key in ("boxes", "ignore_boxes"):
            boxes = sample[key] * factors
            if self.bbox_clip_border:
                boxes[:, 0::2] = boxes[:, 0::2].clip(0, new_w)
                boxes[:, 1::2] = boxes[:, 1::2].clip(0, new_h)
            sample[key] = boxes.astype(np.float32)
        meta = sample["meta"]
        ori_h, ori_w = meta["ori_shape"]
        meta["img_shape"] = (new_h, new_w)
        # Relative to the decoded image, so chained resizes compose (a single Resize gives new_w / w as in mmdet).
        meta["scale_factor"] = (new_w / ori_w, new_h / ori_h)
        return sample

    def __repr__(self) -> str:
        return (
            f"Resize(img_scale={self.img_scale}, multiscale_mode={self.multiscale_mode!r}, "
            f"ratio_range={self.ratio_range}, keep_ratio={self.keep_ratio})"
        )


def flip_boxes(boxes: np.ndarray, img_shape: tuple[int, int], direction: str = "horizontal") -> np.ndarray:
    """Flip ``(n, 4)`` xyxy boxes in an image of ``img_shape = (h, w)``: ``x1' = w - x2``, ``x2' = w - x1``.

    MMDetection 2.x ``RandomFlip.bbox_flip`` convention (no ``- 1``), so flipping twice is the identity.
    """
    h, w = img_shape
    out = boxes.copy()
    if direction == "horizontal":
        out[:, 0] = w - boxes[:, 2]
        out[:, 2] = w - boxes[:, 0]
    elif direction == "vertical":
        out[:, 1] = h - boxes[:, 3]
        out[:, 3] = h - boxes[:, 1]
    else:
        raise ValueError(f"unknown flip direction {direction!r}")
    return out


@TRANSFORMS.register()
class RandomFlip:
    """Flip the image and boxes with probability ``flip_ratio`` (MMDetection 2.x ``RandomFlip``)."""

    def __init__(self, flip_ratio: float | None = 0.5, direction: str = "horizontal") -> None:
        ratio = 0.0 if flip_ratio is None else float(flip_ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"RandomFlip: flip_ratio must be in [0, 1], got {flip_ratio!r}")
        if direction not in ("horizontal", "vertical"):
            raise ConfigError(f"RandomFlip: direction must be 'horizontal' or 'vertical', got {direction!r}")
        self.flip_ratio = ratio
        self.direction = direction

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        img = _check_numpy_img(sample, "RandomFlip")
        rng = rng if rng is not None else transform_rng()
        # Always draw, so the random stream does not depend on flip_ratio being 0 or 1.
        flip = bool(rng.random() < self.flip_ratio)
        meta = sample["meta"]
        meta["flip"] = flip
        meta["flip_direction"] = self.direction if flip else None
        if flip:
            axis = 1 if self.direction == "horizontal" else 0
            sample["img"] = np.ascontiguousarray(np.flip(img, axis=axis))
            shape = img.shape[:2]
            sample["boxes"] = flip_boxes(sample["boxes"], shape, self.direction)
            sample["ignore_boxes"] = flip_boxes(sample["ignore_boxes"], shape, self.direction)
        return sample

    def __repr__(self) -> str:
        return f"RandomFlip(flip_ratio={self.flip_ratio}, direction={self.direction!r})"


@TRANSFORMS.register()
class Normalize:
    """``(img - mean) / std`` per channel, then a float32 ``(3, H, W)`` torch tensor (mmcv ``imnormalize``).

    ``mean``/``std`` are in 0-255 units and in the channel order of the output: ``to_rgb=True`` keeps the RGB
    image (torchvision/ImageNet style); ``to_rgb=False`` swaps it to BGR first (Caffe style, with
    ``mean=(103.53, 116.28, 123.675), std=(1, 1, 1)``). Images here are decoded as RGB, where mmcv decodes BGR.
    """

    def __init__(
        self,
        mean: Sequence[float] = (123.675, 116.28, 103.53),
        std: Sequence[float] = (58.395, 57.12, 57.375),
        to_rgb: bool = True,
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"Normalize: mean and std need 3 values each, got {mean!r}, {std!r}")
        if min(std) <= 0:
            raise ConfigError(f"Normalize: std must be positive, got {std!r}")
        self.mean = np.asarray(mean, dtype=np.float32)
        self.inv_std = 1.0 / np.asarray(std, dtype=np.float32)
        self.to_rgb = to_rgb

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        img = _check_numpy_img(sample, "Normalize")
        if not self.to_rgb:
            img = img[..., ::-1]
        out = (img.astype(np.float32) - self.mean) * self.inv_std
        sample["img"] = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
        sample["meta"]["img_norm_cfg"] = {
            "mean": self.mean.tolist(),
            "std": (1.0 / self.inv_std).tolist(),
            "to_rgb": self.to_rgb,
        }
        return sample

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={(1.0 / self.inv_std).tolist()}, to_rgb={self.to_rgb})"


class Compose:
    """Apply transforms in order, passing one generator to all of them."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        for t in self.transforms:
            sample = t(sample, rng=rng)
        return sample

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(t) for t in self.transforms)
        return f"Compose([\n  {inner}\n])" if self.transforms else "Compose([])"


def build_pipeline(cfgs: Sequence[dict] | None, where: str = "pipeline") -> Compose:
    """Build a :class:`Compose` from ``[{'type': 'Resize', ...}, ...]``; ``where`` prefixes error messages."""
    if cfgs is None:
        return Compose([])
    if not isinstance(cfgs, (list, tuple)):
        raise ConfigError(f"{where}: a pipeline must be a list of transform mappings, got {type(cfgs).__name__}")
    transforms = []
    for i, cfg in enumerate(cfgs):
        item = f"{where}[{i}]"
        name = cfg.get("type") if isinstance(cfg, dict) else None
        if name in _IMPLICIT_STEPS and name not in TRANSFORMS:
            raise ConfigError(f"{item}: '{name}' is not needed in DenseDet ({_IMPLICIT_STEPS[name]}); remove it")
        transforms.append(TRANSFORMS.build(cfg, where=item))
    return Compose(transforms)
