"""Load YAML configs with ``_base_`` inheritance and ``key=value`` overrides.

Merging follows MMDetection: mappings merge key by key, anything else (lists included) is replaced, and a
mapping with ``_delete_: true`` replaces its base instead of merging. Every leaf remembers the file that set
it, so a validation error names the file the offending key came from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import yaml

from densedet.config.legacy import BUILTIN_CONFIG_DIR, OVERRIDE_ORIGIN
from densedet.config.own_data import apply_dataset, apply_img_size
from densedet.config.schema import Config, config_from_dict
from densedet.models.build import build_detector
from densedet.registry import ConfigError

CONFIG_DIR = BUILTIN_CONFIG_DIR


def list_configs() -> list[str]:
    """Names of the built-in configs (``densedet/configs/*.yaml``, bases excluded)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path that exists, else a built-in config name (with or without ``.yaml``/``.py``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p.resolve()
    stem = p.name.removesuffix(".yaml").removesuffix(".py")
    cand = CONFIG_DIR / f"{stem}.yaml"
    if cand.is_file():
        return cand
    import difflib

    close = difflib.get_close_matches(stem, list_configs(), n=3)
    hint = f" Did you mean {close}?" if close else " Run `densedet configs` to list the built-in ones."
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a built-in config name.{hint}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level")
    return data


def _merge(base: dict, new: dict, origins: dict[str, str], src: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in new.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not value.get("_delete_", False) and isinstance(out.get(key), dict):
            origins.setdefault(path, src)
            out[key] = _merge(out[key], value, origins, src, path + ".")
        else:
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "_delete_"}
            out[key] = copy.deepcopy(value)
            _mark(value, origins, src, path)
    return out


def _mark(value: Any, origins: dict[str, str], src: str, path: str) -> None:
    origins[path] = src
    if isinstance(value, dict):
        for k, v in value.items():
            _mark(v, origins, src, f"{path}.{k}")


def load_raw(path: Path, origins: dict[str, str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and its ``_base_`` chain into one merged dict, recording each key's file in ``origins``."""
    if path in _seen:
        raise ConfigError(f"{path}: circular _base_ chain {[str(p) for p in _seen]}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for b in bases:
        bpath = _resolve_base(path, b)
        merged = _merge(merged, load_raw(bpath, origins, _seen + (path,)), {}, str(bpath))
    return _merge(merged, data, origins, str(path))


def _resolve_base(path: Path, base: str) -> Path:
    """A ``_base_`` entry: a file relative to ``path``'s folder, else a built-in config by name
    (``vfnet_r50_fpn_1x_coco``, with or without ``.yaml``) or by its path inside the built-in config folder
    (``_base_/models/atss_r50_fpn.yaml``)."""
    local = (path.parent / base).resolve()
    if local.is_file():
        return local
    for cand in (CONFIG_DIR / base, CONFIG_DIR / f"{Path(base).name.removesuffix('.yaml').removesuffix('.py')}.yaml"):
        if cand.is_file():
            return cand.resolve()
    raise ConfigError(f"{path}: _base_ '{base}' is neither a file (looked at {local}) nor a built-in config name "
                      f"(see `densedet configs`)")


def parse_overrides(items: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["optimizer.lr=0.02", "data.samples_per_gpu=4"]`` -> nested dict (values parsed as YAML)."""
    if not items:
        return {}
    flat = items if isinstance(items, dict) else {}
    if not isinstance(items, dict):
        for item in items:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like key.path=value")
            key, value = item.split("=", 1)
            try:
                flat[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"override '{item}': value is not valid YAML ({e})") from e
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(name_or_path: str | Path, overrides: list[str] | dict[str, Any] | None = None,
                validate_model: bool = True, data: str | Path | None = None,
                img_size: str | int | tuple[int, int] | None = None) -> Config:
    """Load, merge, override and validate a config.

    ``data``: a COCO / Pascal VOC / YOLO dataset root that every split then reads, the head sized from its
    classes; ``img_size``: ``N`` or ``"WxH"``, every pipeline scale rescaled to it (:mod:`densedet.config.own_data`).

    Raises :class:`ConfigError` naming the file and key for an unknown or mistyped key anywhere, model
    components included (their keys are checked against the constructors of the registered classes).
    """
    path = resolve_config_path(name_or_path)
    origins: dict[str, str] = {}
    raw = load_raw(path, origins)
    if overrides:
        raw = _merge(raw, parse_overrides(overrides), origins, OVERRIDE_ORIGIN)
    if data is not None:
        raw = apply_dataset(raw, origins, data)
    if img_size is not None:
        raw = apply_img_size(raw, img_size)
    cfg = config_from_dict(raw, origins, name=path.stem, source=str(path))
    if validate_model:
        validate_model_config(cfg.model, origins, str(path))
    return cfg


def validate_model_config(model: dict[str, Any], origins: dict[str, str] | None = None, source: str = "") -> None:
    """Construct the model on the ``meta`` device (no memory, no weight loading) to check every key."""
    origins = origins or {}
    try:
        with torch.device("meta"):
            build_detector(model, init=False)
    except ConfigError as e:
        file = _origin_of(e.path, origins) or source or "config"
        raise ConfigError(f"{file}: {e}", e.path) from None


def _origin_of(path: str | None, origins: dict[str, str]) -> str | None:
    while path:
        if path in origins:
            return origins[path]
        path = path.rpartition(".")[0]
    return None
