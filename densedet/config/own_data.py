"""Config rewriting for ``--data PATH`` (a COCO / VOC / YOLO dataset root) and ``--img-size``.

``--data`` points every split of ``data`` at the dataset's COCO json (VOC / YOLO are converted into the DenseDet
cache, see :mod:`densedet.data.formats.layout`) and sizes every class-dependent head from the dataset's classes (a
dense head's ``num_classes``; a two-stage model's box and mask heads'). A class count the *user* wrote (in their own
YAML or as a ``key=value`` override) that disagrees with the data is an error; the value of a built-in config (80
for COCO) is simply replaced.

``--img-size N`` (or ``WxH``) rescales every scale of every pipeline (``Resize.img_scale``, ``MultiScaleFlipAug``
scales, absolute ``RandomCrop.crop_size``) by the factors that take the config's reference scale (its single test
scale, else its single training scale) to ``(N, N)`` / ``(W, H)``. A multi-scale range keeps its proportions:
``1333x[480:960]`` with test scale ``1333x800`` and ``--img-size 640`` becomes ``640x[384:768]``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from densedet.config.legacy import OVERRIDE_ORIGIN, is_builtin_origin
from densedet.data.formats import prepare_dataset
from densedet.registry import ConfigError

__all__ = ["OVERRIDE_ORIGIN", "apply_dataset", "apply_img_size", "class_count_keys", "parse_img_size",
           "pipeline_scales"]



def parse_img_size(value: str | int | tuple[int, int]) -> tuple[int, int]:
    """``640`` / ``"640"`` -> ``(640, 640)``; ``"800x600"`` -> ``(800, 600)`` (width x height)."""
    if isinstance(value, tuple):
        w, h = value
    elif isinstance(value, int) and not isinstance(value, bool):
        w = h = value
    else:
        text = str(value).lower().strip()
        try:
            w, h = (int(v) for v in text.split("x")) if "x" in text else (int(text), int(text))
        except ValueError:
            raise ConfigError(f"--img-size must be N or WxH (positive integers), got {value!r}") from None
    if w <= 0 or h <= 0:
        raise ConfigError(f"--img-size must be positive, got {value!r}")
    return int(w), int(h)


def _is_scale(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _scales_of(img_scale: Any) -> list[list[float]]:
    if _is_scale(img_scale):
        return [list(img_scale)]
    if isinstance(img_scale, (list, tuple)) and all(_is_scale(s) for s in img_scale):
        return [list(s) for s in img_scale]
    return []


def _pipelines(raw: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    data = raw.get("data") or {}
    out = []
    for split in ("val", "test", "train"):
        spec = data.get(split)
        if isinstance(spec, dict) and isinstance(spec.get("pipeline"), list):
            out.append((split, spec["pipeline"]))
    return out


def _steps(pipeline: list[dict[str, Any]]):
    for step in pipeline:
        if isinstance(step, dict):
            yield step
            if isinstance(step.get("transforms"), list):
                yield from _steps(step["transforms"])


def pipeline_scales(raw: dict[str, Any], split: str) -> list[list[list[float]]]:
    """Every ``img_scale`` of ``data.<split>.pipeline`` (each a list of ``[long, short]`` / ``[w, h]`` scales)."""
    spec = (raw.get("data") or {}).get(split) or {}
    return [_scales_of(s["img_scale"]) for s in _steps(spec.get("pipeline") or []) if "img_scale" in s
            and _scales_of(s["img_scale"])]


def _reference_scale(raw: dict[str, Any]) -> list[float]:
    for split in ("val", "test", "train"):
        for scales in pipeline_scales(raw, split):
            if len(scales) == 1:
                return scales[0]
    for split in ("val", "test", "train"):
        for scales in pipeline_scales(raw, split):
            return [max(s[0] for s in scales), max(s[1] for s in scales)]
    raise ConfigError("--img-size: the config's pipelines have no Resize / MultiScaleFlipAug img_scale to rescale")


def apply_img_size(raw: dict[str, Any], size: str | int | tuple[int, int]) -> dict[str, Any]:
    """A copy of the merged raw config with every pipeline scale rescaled (see the module docstring)."""
    w, h = parse_img_size(size)
    raw = copy.deepcopy(raw)
    ref = _reference_scale(raw)
    fx, fy = w / ref[0], h / ref[1]

    def scale(s: list[float]) -> list[int]:
        return [max(1, round(s[0] * fx)), max(1, round(s[1] * fy))]

    for _, pipeline in _pipelines(raw):
        for step in _steps(pipeline):
            if "img_scale" in step and _scales_of(step["img_scale"]):
                scales = [scale(s) for s in _scales_of(step["img_scale"])]
                step["img_scale"] = scales[0] if _is_scale(step["img_scale"]) else scales
            if step.get("type") == "RandomCrop" and str(step.get("crop_type", "absolute")).startswith("absolute") \
                    and _is_scale(step.get("crop_size")):
                ch, cw = step["crop_size"]  # (h, w)
                step["crop_size"] = [max(1, round(ch * fy)), max(1, round(cw * fx))]
    return raw


def class_count_keys(model: dict[str, Any]) -> list[str]:
    """Where a model config keeps its class count: the dense head's, or a two-stage model's box and mask heads'
    (dotted paths below ``model``)."""
    roi = model.get("roi_head")
    if isinstance(roi, dict):
        return ["roi_head.bbox_head.num_classes"] + (["roi_head.mask_head.num_classes"]
                                                      if isinstance(roi.get("mask_head"), dict) else [])
    if isinstance(model.get("bbox_head"), dict):
        return ["bbox_head.num_classes"]
    return []


def apply_dataset(raw: dict[str, Any], origins: dict[str, str], root: str | Path) -> dict[str, Any]:
    """A copy of the merged raw config reading the dataset at ``root`` (COCO / VOC / YOLO) for every split, with
    every class-dependent head sized from its classes (:func:`class_count_keys`: a dense head, or a two-stage
    model's box and mask heads; an explicit disagreeing value in the user's own YAML or an override is a
    :class:`ConfigError`). A model with a mask head trains on the dataset's masks (``data.train.with_mask``)."""
    ds = prepare_dataset(root)
    raw = copy.deepcopy(raw)
    n = len(ds.classes)
    model = raw.get("model") or {}
    keys = class_count_keys(model)
    if not keys:
        raise ConfigError("--data: the config's model has no head to size from the dataset's classes (bbox_head, or "
                          "roi_head.bbox_head)", path="model")
    for path in keys:
        *parents, leaf = path.split(".")
        node = model
        for part in parents:
            node = node[part]
        key = f"model.{path}"
        origin = origins.get(key)
        if leaf in node and node[leaf] != n and origin is not None and not is_builtin_origin(origin):
            shown = ds.classes if n <= 20 else ds.classes[:20] + ["..."]
            raise ConfigError(
                f"{origin}: {key} is {node[leaf]} but the dataset {ds.root} ({ds.kind}) has {n} classes "
                f"{shown}. With --data the heads are sized from the data: remove that key, or use a dataset with "
                f"{node[leaf]} classes.", key)
        node[leaf] = n
        origins[key] = f"--data {ds.root}"
    data = raw.setdefault("data", {})
    data["root"] = ""
    data["auto_create"] = None
    for split, files in (("train", ds.splits["train"]), ("val", ds.splits["val"]), ("test", ds.splits["val"])):
        spec = data.get(split)
        if not isinstance(spec, dict):
            spec = copy.deepcopy(data.get("val") or {})
            data[split] = spec
        spec["ann_file"], spec["img_dir"] = str(files.ann_file), str(files.img_dir)
    if any(k.endswith("mask_head.num_classes") for k in keys):
        data["train"]["with_mask"] = True
    return raw
