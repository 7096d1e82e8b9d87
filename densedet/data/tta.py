"""Test-time augmentation views: MMDetection 2.x ``MultiScaleFlipAug`` (mmdet/datasets/pipelines/test_time_aug.py).

``{type: MultiScaleFlipAug, img_scale: [[1333, 800], ...] or one scale, flip: true, flip_direction: horizontal,
transforms: [{type: Resize, keep_ratio: true}, {type: RandomFlip}, {type: Normalize, ...}]}`` turns one decoded
image into one sample per (scale, flip) pair, in mmdet's order: for every scale, the unflipped view, then one
flipped view per direction. The sample it returns is ``{"views": [view, ...], "meta": ...}``; ``CocoDataset`` and
``collate`` keep the views apart and the model merges their detections (:mod:`densedet.models.tta`).

Where mmdet passes the view's scale and flip through the results dict (``results['scale']``, ``results['flip']``),
here each view gets its own copy of ``transforms`` with every ``Resize.img_scale`` set to the view's scale and
every ``RandomFlip`` set to ``flip_ratio`` 1 (flipped view, with the view's direction) or 0. As in mmdet, an
``img_scale`` written on the inner ``Resize`` is ignored. Stricter than mmdet: ``flip: true`` without a
``RandomFlip``, a missing ``Resize`` and ``Resize.ratio_range`` are errors rather than silently ignored.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from densedet.data.transforms import Compose, build_pipeline
from densedet.registry import TRANSFORMS, ConfigError

__all__ = ["MultiScaleFlipAug", "find_tta", "tta_pipeline"]

FLIP_DIRECTIONS = ("horizontal", "vertical")  # mmdet's 'diagonal' has no RandomFlip here


def _is_scale(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _parse_scales(img_scale: Any, where: str) -> list[tuple[int, int]]:
    scales = [img_scale] if _is_scale(img_scale) else img_scale
    if not isinstance(scales, (list, tuple)) or not scales or not all(_is_scale(s) for s in scales):
        raise ConfigError(f"{where}: one scale [long, short] or a list of them, got {img_scale!r}", path=where)
    if any(min(s) <= 0 for s in scales):
        raise ConfigError(f"{where}: scale sides must be positive, got {img_scale!r}", path=where)
    return [(int(s[0]), int(s[1])) for s in scales]


@TRANSFORMS.register()
class MultiScaleFlipAug:
    """One sample per (scale, flip) view of the image (mmdet 2.x ``MultiScaleFlipAug``).

    Args:
        transforms: the per-view pipeline; must contain a ``Resize`` (and a ``RandomFlip`` when ``flip``).
        img_scale: one scale ``[long, short]`` (``[w, h]`` with ``keep_ratio: false``) or a list of them.
        scale_factor: mmdet's alternative to ``img_scale``; not available (Resize takes scales only).
        flip: add flipped views.
        flip_direction: 'horizontal' / 'vertical' or a list of them (one flipped view per direction and scale).
    """

    def __init__(self, transforms: Sequence[dict], img_scale: Any = None, scale_factor: Any = None,
                 flip: bool = False, flip_direction: str | Sequence[str] = "horizontal") -> None:
        where = "MultiScaleFlipAug"
        if scale_factor is not None:
            raise ConfigError(f"{where}.scale_factor: not available, give img_scale (the test scales) instead",
                              path=f"{where}.scale_factor")
        if img_scale is None:
            raise ConfigError(f"{where}.img_scale is required (one scale [long, short] or a list of them)",
                              path=f"{where}.img_scale")
        self.img_scale = _parse_scales(img_scale, f"{where}.img_scale")
        directions = [flip_direction] if isinstance(flip_direction, str) else list(flip_direction)
        bad = [d for d in directions if d not in FLIP_DIRECTIONS]
        if bad or not directions:
            raise ConfigError(f"{where}.flip_direction: each must be one of {FLIP_DIRECTIONS}, got {flip_direction!r}",
                              path=f"{where}.flip_direction")
        self.flip = bool(flip)
        self.flip_direction = directions
        if not isinstance(transforms, (list, tuple)):
            raise ConfigError(f"{where}.transforms: a list of transform mappings, got {transforms!r}",
                              path=f"{where}.transforms")
        types = [t.get("type") if isinstance(t, dict) else None for t in transforms]
        if "Resize" not in types:
            raise ConfigError(f"{where}.transforms: needs a Resize (it applies each img_scale)",
                              path=f"{where}.transforms")
        if self.flip and "RandomFlip" not in types:
            raise ConfigError(f"{where}.flip: true needs a RandomFlip in transforms", path=f"{where}.flip")
        for i, t in enumerate(transforms):
            if types[i] == "Resize" and t.get("ratio_range") is not None:
                raise ConfigError(f"{where}.transforms[{i}].ratio_range: a test view has one fixed scale; remove it",
                                  path=f"{where}.transforms[{i}].ratio_range")
        flips: list[tuple[bool, str | None]] = [(False, None)]
        if self.flip:
            flips += [(True, d) for d in directions]
        self.views: list[tuple[tuple[int, int], bool, str | None]] = [
            (s, f, d) for s in self.img_scale for f, d in flips]
        self.pipelines: list[Compose] = [
            build_pipeline(self._view_cfgs(transforms, s, f, d), where=f"{where}.transforms")
            for s, f, d in self.views]

    @staticmethod
    def _view_cfgs(transforms: Sequence[dict], scale: tuple[int, int], flip: bool,
                   direction: str | None) -> list[dict]:
        cfgs = copy.deepcopy(list(transforms))
        for cfg in cfgs:
            if cfg.get("type") == "Resize":
                cfg["img_scale"] = list(scale)
            elif cfg.get("type") == "RandomFlip":
                cfg["flip_ratio"] = 1.0 if flip else 0.0
                if flip:
                    cfg["direction"] = direction
        return cfgs

    @property
    def num_views(self) -> int:
        return len(self.views)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        views = []
        for pipe in self.pipelines:
            view = {k: (v.copy() if isinstance(v, (np.ndarray, dict)) else v) for k, v in sample.items()}
            views.append(pipe(view, rng=rng))
        return {"views": views, "meta": dict(sample["meta"])}

    def __repr__(self) -> str:
        return (f"MultiScaleFlipAug(img_scale={self.img_scale}, flip={self.flip}, "
                f"flip_direction={self.flip_direction}, transforms={self.pipelines[0]!r})")


def find_tta(pipeline: Sequence[dict] | None) -> int | None:
    """Index of the ``MultiScaleFlipAug`` step of a pipeline config, or None."""
    for i, t in enumerate(pipeline or []):
        if isinstance(t, dict) and t.get("type") == "MultiScaleFlipAug":
            return i
    return None


def tta_pipeline(pipeline: Sequence[dict] | None, tta: bool | None, where: str = "data.val.pipeline") -> list[dict]:
    """A test pipeline config with test-time augmentation switched on or off.

    ``tta=None``: unchanged. ``tta=False``: a ``MultiScaleFlipAug`` keeps only its first view (first scale, no
    flip), i.e. plain single-scale testing. ``tta=True``: unchanged when the pipeline has a ``MultiScaleFlipAug``;
    otherwise horizontal-flip TTA at the pipeline's own test scale (its ``Resize.img_scale``, which must be one
    scale): the whole pipeline goes inside ``MultiScaleFlipAug(flip=True)`` with a ``RandomFlip`` after the Resize.
    """
    cfgs = copy.deepcopy(list(pipeline or []))
    idx = find_tta(cfgs)
    if tta is None or (tta and idx is not None):
        return cfgs
    if not tta:
        if idx is not None:
            msfa = cfgs[idx]
            scales = _parse_scales(msfa.get("img_scale"), f"{where}[{idx}].img_scale")
            cfgs[idx] = {**msfa, "img_scale": list(scales[0]), "flip": False}
        return cfgs
    resize = [i for i, t in enumerate(cfgs) if isinstance(t, dict) and t.get("type") == "Resize"]
    if not resize:
        raise ConfigError(f"{where}: flip test-time augmentation needs a Resize with the test scale", path=where)
    scale = cfgs[resize[-1]].get("img_scale", (1333, 800))  # Resize's own default
    if not _is_scale(scale):
        raise ConfigError(f"{where}[{resize[-1]}].img_scale: flip test-time augmentation needs one test scale, got "
                          f"{scale!r}; write a MultiScaleFlipAug instead", path=f"{where}[{resize[-1]}].img_scale")
    inner = [t for t in cfgs if not (isinstance(t, dict) and t.get("type") == "RandomFlip")]
    at = max(i for i, t in enumerate(inner) if isinstance(t, dict) and t.get("type") == "Resize")
    inner.insert(at + 1, {"type": "RandomFlip"})
    return [{"type": "MultiScaleFlipAug", "img_scale": list(scale), "flip": True, "transforms": inner}]
