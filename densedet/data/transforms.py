"""Box-aware image transforms with MMDetection 2.x semantics (``mmdet/datasets/pipelines/transforms.py``).

Every transform is a callable on a *sample* dict and returns it (modified in place):

- ``img``: ``(H, W, 3)`` uint8 numpy array, RGB (``Normalize`` turns it into a float32 ``(3, H, W)`` torch tensor,
  so it comes last);
- ``boxes``: ``(n, 4)`` float32 numpy array, ``xyxy`` absolute pixels of the current image;
- ``labels``: ``(n,)`` int64 numpy array; ``ignore_boxes``: ``(k, 4)`` float32 numpy array, ``xyxy``;
- ``masks`` (only when the dataset loads masks): :class:`~densedet.structures.masks.InstanceMasks`, one per box; Resize,
  RandomFlip and RandomCrop move them with the boxes;
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
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from densedet.errors import DataWarning
from densedet.registry import TRANSFORMS, ConfigError

__all__ = [
    "Compose",
    "CutOut",
    "Normalize",
    "RandomCrop",
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
        if "masks" in sample and (new_w, new_h) != (w, h):
            sample["masks"] = sample["masks"].resize(new_h, new_w)
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
            if "masks" in sample:
                sample["masks"] = sample["masks"].flip(self.direction)
        return sample

    def __repr__(self) -> str:
        return f"RandomFlip(flip_ratio={self.flip_ratio}, direction={self.direction!r})"


@TRANSFORMS.register()
class Normalize:
    """``(img - mean) / std`` per channel, then a float32 ``(3, H, W)`` torch tensor (mmcv ``imnormalize``).

    Deprecated in DenseDet pipelines: the model normalises (``model.data_preprocessor``,
    :class:`densedet.models.preprocess.DetPreprocessor`, same arithmetic); :func:`densedet.config.load_config` moves
    a pipeline's ``Normalize`` into the model. Kept for pipelines used outside a DenseDet model.

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
        warnings.warn("Normalize in a data pipeline: DenseDet models normalise their input themselves "
                      "(model.data_preprocessor), so a pipeline that normalises too feeds them twice-normalised "
                      "images. Configs read by load_config have this step moved into the model.", DataWarning,
                      stacklevel=2)
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


_CROP_TYPES = ("absolute", "absolute_range", "relative", "relative_range")


def _check_prob(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{where} must be a number in [0, 1], got {value!r}")
    return float(value)


@TRANSFORMS.register()
class RandomCrop:
    """Crop a random window of the image; boxes are shifted, clipped and dropped when empty.

    MMDetection 2.x ``RandomCrop`` with the ``crop_p`` of VarifocalNet's fork (``mmdet/datasets/pipelines/
    transforms.py`` of hyz-xmaster/VarifocalNet; the VFNet-X config uses ``crop_type='relative_range',
    crop_size=(0.75, 0.75), crop_p=0.5``).

    Args:
        crop_size: ``(h, w)``. Absolute pixels (ints) for ``'absolute'`` / ``'absolute_range'``, fractions in
            ``(0, 1]`` for ``'relative'`` / ``'relative_range'``.
        crop_type: ``'absolute'``: ``(min(h, crop_h), min(w, crop_w))``; ``'absolute_range'``: each side uniform
            (integers, inclusive) in ``[min(side, crop_size[0]), min(side, crop_size[1])]``; ``'relative'``:
            ``int(h * crop_h + 0.5), int(w * crop_w + 0.5)``; ``'relative_range'``: fractions uniform in
            ``[crop_size[i], 1]`` per side, then as ``'relative'``.
        crop_p: probability of cropping at all (the fork's addition; 1.0 is mmdet's RandomCrop).
        allow_negative_crop: keep a crop that contains no ground-truth box.
        bbox_clip_border: clip boxes to the window before the emptiness test (else only shifted, as mmdet).

    The window's top-left corner is uniform over the integer offsets that keep it inside the image. Boxes
    (``xyxy`` absolute pixels) are shifted by the offset, clipped to ``[0, crop_w] x [0, crop_h]``, and boxes with
    ``x2 <= x1`` or ``y2 <= y1`` are dropped with their labels; ``ignore_boxes`` likewise.

    Deviation: mmdet returns ``None`` for a crop without any ground-truth box (``allow_negative_crop=False``)
    and its dataset then trains on another, random image. Here the transform draws a new window (from the same
    ``rng``) up to ``max_retries`` times and leaves the sample uncropped if all of them are empty, so the sample
    keeps its index and augmentation stays a pure function of ``(seed, epoch, index)``. An image that has no box
    to begin with is cropped as drawn.
    """

    max_retries = 10

    def __init__(
        self,
        crop_size: Sequence[float],
        crop_type: str = "absolute",
        crop_p: float = 1.0,
        allow_negative_crop: bool = False,
        bbox_clip_border: bool = True,
    ) -> None:
        where = "RandomCrop"
        if crop_type not in _CROP_TYPES:
            raise ConfigError(f"{where}: crop_type must be one of {_CROP_TYPES}, got {crop_type!r}")
        if not (isinstance(crop_size, (list, tuple)) and len(crop_size) == 2):
            raise ConfigError(f"{where}: crop_size must be a pair (h, w), got {crop_size!r}")
        if crop_type.startswith("absolute"):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in crop_size):
                raise ConfigError(f"{where}: crop_size must be positive ints with crop_type={crop_type!r}, "
                                  f"got {crop_size!r}")
            if crop_type == "absolute_range" and crop_size[0] > crop_size[1]:
                raise ConfigError(f"{where}: crop_type='absolute_range' needs crop_size[0] <= crop_size[1], "
                                  f"got {crop_size!r}")
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in crop_size):
            raise ConfigError(f"{where}: crop_size must be fractions in (0, 1] with crop_type={crop_type!r}, "
                              f"got {crop_size!r}")
        self.crop_size = tuple(crop_size)
        self.crop_type = crop_type
        self.crop_p = _check_prob(crop_p, f"{where}: crop_p")
        self.allow_negative_crop = bool(allow_negative_crop)
        self.bbox_clip_border = bool(bbox_clip_border)

    def crop_hw(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        """The window size ``(crop_h, crop_w)`` for an ``h x w`` image (mmdet ``_get_crop_size``)."""
        ch, cw = self.crop_size
        if self.crop_type == "absolute":
            return min(int(ch), h), min(int(cw), w)
        if self.crop_type == "absolute_range":
            lo, hi = int(ch), int(cw)
            crop_h = int(rng.integers(min(h, lo), min(h, hi) + 1))
            crop_w = int(rng.integers(min(w, lo), min(w, hi) + 1))
            return crop_h, crop_w
        if self.crop_type == "relative_range":
            base = np.asarray(self.crop_size, dtype=np.float32)
            ch, cw = base + rng.random(2) * (1 - base)
        return int(h * ch + 0.5), int(w * cw + 0.5)

    @staticmethod
    def crop_boxes(boxes: np.ndarray, x1: int, y1: int, crop_w: int, crop_h: int,
                   clip: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Shift ``(n, 4)`` xyxy boxes into the window at ``(x1, y1)``; returns ``(boxes, keep)``, ``keep`` the
        ``(n,)`` mask of boxes with positive width and height after clipping."""
        out = boxes - np.array([x1, y1, x1, y1], dtype=np.float32)
        if clip:
            out[:, 0::2] = out[:, 0::2].clip(0, crop_w)
            out[:, 1::2] = out[:, 1::2].clip(0, crop_h)
        keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
        return out.astype(np.float32), keep

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        img = _check_numpy_img(sample, "RandomCrop")
        rng = rng if rng is not None else transform_rng()
        if not rng.random() < self.crop_p:
            return sample
        h, w = img.shape[:2]
        has_boxes = len(sample["boxes"]) > 0
        for _ in range(self.max_retries):
            crop_h, crop_w = self.crop_hw(h, w, rng)
            y1 = int(rng.integers(0, max(h - crop_h, 0) + 1))
            x1 = int(rng.integers(0, max(w - crop_w, 0) + 1))
            boxes, keep = self.crop_boxes(sample["boxes"], x1, y1, crop_w, crop_h, self.bbox_clip_border)
            if keep.any() or self.allow_negative_crop or not has_boxes:
                break
        else:
            return sample  # every window missed all boxes: keep the image whole (see the class docstring)
        sample["img"] = np.ascontiguousarray(img[y1:y1 + crop_h, x1:x1 + crop_w])
        sample["boxes"] = boxes[keep]
        sample["labels"] = sample["labels"][keep]
        if "masks" in sample:
            sample["masks"] = sample["masks"].crop(x1, y1, crop_w, crop_h).subset(keep)
        ignore, keep_ignore = self.crop_boxes(sample["ignore_boxes"], x1, y1, crop_w, crop_h, self.bbox_clip_border)
        sample["ignore_boxes"] = ignore[keep_ignore]
        sample["meta"]["img_shape"] = tuple(sample["img"].shape[:2])
        return sample

    def __repr__(self) -> str:
        return (f"RandomCrop(crop_size={self.crop_size}, crop_type={self.crop_type!r}, crop_p={self.crop_p}, "
                f"allow_negative_crop={self.allow_negative_crop}, bbox_clip_border={self.bbox_clip_border})")


@TRANSFORMS.register()
class CutOut:
    """Fill random rectangles of the image with a constant (Cutout, DeVries & Taylor 2017, arXiv:1708.04552).

    MMDetection 2.x ``CutOut`` with the ``cutout_p`` of VarifocalNet's fork. Boxes (and masks, as mmdet) are left
    as they are.

    Args:
        n_holes: number of holes, or ``(min, max)`` drawn uniformly (inclusive) per image.
        cutout_shape: one ``(w, h)`` in pixels or a list to pick from uniformly per hole.
        cutout_ratio: one ``(w_ratio, h_ratio)`` of the image size or a list (exactly one of shape/ratio).
        fill_in: value(s) written into the holes, in the image's channel order (RGB here; mmcv images are BGR,
            so a non-grey mmdet ``fill_in`` is reversed).
        cutout_p: probability of applying CutOut at all (the fork's addition; 1.0 is mmdet's CutOut).

    Each hole's top-left corner ``(x1, y1)`` is uniform over the pixels; it covers ``[y1, min(y1 + h, H))`` x
    ``[x1, min(x1 + w, W))`` (clipped at the border, as mmdet).
    """

    def __init__(
        self,
        n_holes: int | Sequence[int],
        cutout_shape: Sequence[Any] | None = None,
        cutout_ratio: Sequence[Any] | None = None,
        fill_in: float | Sequence[float] = (0, 0, 0),
        cutout_p: float = 1.0,
    ) -> None:
        where = "CutOut"
        if (cutout_shape is None) == (cutout_ratio is None):
            raise ConfigError(f"{where}: give exactly one of cutout_shape and cutout_ratio")
        if isinstance(n_holes, int) and not isinstance(n_holes, bool):
            n_holes = (n_holes, n_holes)
        if not (isinstance(n_holes, (list, tuple)) and len(n_holes) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in n_holes)
                and 0 <= n_holes[0] <= n_holes[1]):
            raise ConfigError(f"{where}: n_holes must be an int or (min, max) with 0 <= min <= max, got {n_holes!r}")
        self.with_ratio = cutout_ratio is not None
        raw = cutout_ratio if self.with_ratio else cutout_shape
        key = "cutout_ratio" if self.with_ratio else "cutout_shape"
        if isinstance(raw, (list, tuple)) and len(raw) == 2 and all(isinstance(v, (int, float)) for v in raw):
            raw = [raw]  # a single (w, h)
        if not (isinstance(raw, (list, tuple)) and raw and all(
                isinstance(c, (list, tuple)) and len(c) == 2 and all(isinstance(v, (int, float)) and v >= 0 for v in c)
                for c in raw)):
            raise ConfigError(f"{where}: {key} must be a (w, h) pair or a non-empty list of them, got {raw!r}")
        if not self.with_ratio and not all(isinstance(v, int) for c in raw for v in c):
            raise ConfigError(f"{where}: cutout_shape sizes must be ints (pixels), got {raw!r}")
        self.n_holes = (int(n_holes[0]), int(n_holes[1]))
        self.candidates = [tuple(c) for c in raw]
        self.fill_in = np.asarray(fill_in, dtype=np.float64)
        if self.fill_in.ndim > 1 or self.fill_in.size not in (1, 3):
            raise ConfigError(f"{where}: fill_in must be a number or 3 numbers, got {fill_in!r}")
        self.cutout_p = _check_prob(cutout_p, f"{where}: cutout_p")

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        img = _check_numpy_img(sample, "CutOut")
        rng = rng if rng is not None else transform_rng()
        if not rng.random() < self.cutout_p:
            return sample
        h, w = img.shape[:2]
        img = np.array(img)  # decoded / resized images can be read-only views
        fill = self.fill_in.astype(img.dtype) if img.dtype.kind == "f" else np.clip(self.fill_in, 0, 255).astype(
            img.dtype)
        for _ in range(int(rng.integers(self.n_holes[0], self.n_holes[1] + 1))):
            x1 = int(rng.integers(0, w))
            y1 = int(rng.integers(0, h))
            cw, ch = self.candidates[int(rng.integers(0, len(self.candidates)))]
            if self.with_ratio:
                cw, ch = int(cw * w), int(ch * h)
            img[y1:min(y1 + int(ch), h), x1:min(x1 + int(cw), w)] = fill
        sample["img"] = img
        return sample

    def __repr__(self) -> str:
        key = "cutout_ratio" if self.with_ratio else "cutout_shape"
        return (f"CutOut(n_holes={self.n_holes}, {key}={self.candidates}, fill_in={self.fill_in.tolist()}, "
                f"cutout_p={self.cutout_p})")


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
        if name == "MultiScaleFlipAug" and i != len(cfgs) - 1:
            # its output is a list of views, which no later transform understands (mmdet: the last step too)
            raise ConfigError(f"{item}: MultiScaleFlipAug must be the last step of a pipeline; move "
                              f"{[c.get('type') for c in cfgs[i + 1:] if isinstance(c, dict)]} into its transforms",
                              path=item)
        transforms.append(TRANSFORMS.build(cfg, where=item))
    return Compose(transforms)
