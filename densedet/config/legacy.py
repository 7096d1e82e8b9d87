"""Config-load shims that keep older configs (and the configs stored in older checkpoints) working.

``Normalize`` in a data pipeline: normalisation now belongs to the model (``model.data_preprocessor``,
:class:`densedet.models.preprocess.DetPreprocessor`), and pipelines carry ``uint8`` images. A config written before
that, or one read back from an older checkpoint's ``meta.config``, gets its ``Normalize`` steps removed from every
pipeline (``MultiScaleFlipAug.transforms`` included) and their ``mean`` / ``std`` / ``to_rgb`` moved into
``model.data_preprocessor``, so the model computes exactly what the pipeline computed (same float32 arithmetic, then
zero padding). A ``DeprecationWarning`` names the file. Refused, with a :class:`ConfigError` naming the keys:
splits that normalise differently, a ``Normalize`` that disagrees with a ``model.data_preprocessor`` the user wrote,
and a transform after ``Normalize`` (it would have seen normalised floats).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

from densedet.registry import ConfigError

__all__ = ["BUILTIN_CONFIG_DIR", "OVERRIDE_ORIGIN", "is_builtin_origin", "move_normalize_into_model"]

OVERRIDE_ORIGIN = "command-line override"
BUILTIN_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
NORMALIZE_DEFAULTS = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "to_rgb": True}


def is_builtin_origin(origin: str | None) -> bool:
    """Whether a key's origin is one of DenseDet's built-in config files (not the user's YAML or an override)."""
    if not origin or origin == OVERRIDE_ORIGIN:
        return False
    try:
        return Path(origin).resolve().is_relative_to(BUILTIN_CONFIG_DIR.resolve())
    except OSError:
        return False


def _params(step: dict[str, Any]) -> dict[str, Any]:
    out = {k: step.get(k, v) for k, v in NORMALIZE_DEFAULTS.items()}
    out["mean"] = [float(v) for v in out["mean"]] if isinstance(out["mean"], (list, tuple)) else out["mean"]
    out["std"] = [float(v) for v in out["std"]] if isinstance(out["std"], (list, tuple)) else out["std"]
    extra = sorted(set(step) - {"type", *NORMALIZE_DEFAULTS})
    if extra:
        raise ConfigError(f"Normalize: unknown key(s) {extra} (mean, std, to_rgb)")
    return out


def _strip(pipeline: Any, where: str, found: list[tuple[str, dict[str, Any]]]) -> Any:
    """``pipeline`` without its Normalize steps (recursing into ``transforms``); each removed step's parameters are
    appended to ``found``."""
    if not isinstance(pipeline, list):
        return pipeline
    out = []
    for i, step in enumerate(pipeline):
        if isinstance(step, dict) and step.get("type") == "Normalize":
            later = [s.get("type") for s in pipeline[i + 1:] if isinstance(s, dict)]
            if later:
                raise ConfigError(f"{where}[{i}]: {later} come after Normalize and would see normalised floats; "
                                  f"normalisation now happens in the model (model.data_preprocessor): drop the "
                                  f"Normalize step", path=where)
            found.append((f"{where}[{i}]", _params(step)))
            continue
        if isinstance(step, dict) and isinstance(step.get("transforms"), list):
            step = {**step, "transforms": _strip(step["transforms"], f"{where}[{i}].transforms", found)}
        out.append(step)
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k, NORMALIZE_DEFAULTS[k]) == b.get(k, NORMALIZE_DEFAULTS[k]) for k in NORMALIZE_DEFAULTS)


def move_normalize_into_model(raw: dict[str, Any], origins: dict[str, str] | None = None,
                              source: str = "") -> dict[str, Any]:
    """A copy of the merged raw config with every pipeline ``Normalize`` moved into ``model.data_preprocessor``
    (module docstring), and ``model.data_preprocessor.pad_size_divisor`` defaulting to ``data.size_divisor``."""
    origins = origins or {}
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    raw = copy.deepcopy(raw)
    model = raw["model"]
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    found: list[tuple[str, dict[str, Any]]] = []
    for split in ("train", "val", "test"):
        spec = data.get(split)
        if isinstance(spec, dict) and "pipeline" in spec:
            spec["pipeline"] = _strip(spec["pipeline"], f"data.{split}.pipeline", found)
    dp = model.get("data_preprocessor")
    if dp is not None and not isinstance(dp, dict):
        raise ConfigError(f"model.data_preprocessor must be a mapping, got {dp!r}", path="model.data_preprocessor")
    dp = dict(dp or {})
    if found:
        where, params = found[0]
        for other, p in found[1:]:
            if not _same(p, params):
                raise ConfigError(f"{other} normalises differently from {where} ({p} vs {params}); one "
                                  f"model.data_preprocessor serves training and testing", path=other)
        written = origins.get("model.data_preprocessor") or origins.get("model.data_preprocessor.mean")
        if dp and written and not is_builtin_origin(written) and not _same(dp, params):
            raise ConfigError(f"{written}: model.data_preprocessor {dp} disagrees with the pipeline's Normalize "
                              f"({where}: {params}); drop the Normalize step", path="model.data_preprocessor")
        dp.update(params)
        origin = origins.get(where.split("[")[0]) or origins.get("data") or source or "the config"
        warnings.warn(f"{origin}: Normalize in {where.split('[')[0]} is deprecated: normalisation is done by the model "
                      f"now; moved to model.data_preprocessor {params}", DeprecationWarning, stacklevel=3)
    if dp or found:
        # the model pads as collate does, unless the user's own YAML sets its divisor
        div_origin = origins.get("model.data_preprocessor.pad_size_divisor")
        if "pad_size_divisor" not in dp or not div_origin or is_builtin_origin(div_origin):
            dp["pad_size_divisor"] = int(data.get("size_divisor", 32) or 1)
        model["data_preprocessor"] = dp
    return raw
