"""Typed sections of a DenseDet config.

A config file is YAML with the MMDetection vocabulary (``model``, ``data``, ``optimizer``, ``lr_config`` ...
are grouped here into ``model``, ``data``, ``optimizer``, ``schedule``, ``runtime``). The non-model sections
become the dataclasses below; the ``model`` section stays a nested dict whose keys are checked against the
constructors of the registered components (see :mod:`densedet.config.loader`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from densedet.registry import ConfigError


def _from_dict(cls: type, data: dict[str, Any] | None, where: str, origins: dict[str, str]) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise naming the key and its file."""
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}"
        if key not in names:
            import difflib

            close = difflib.get_close_matches(key, list(names), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; accepted: {sorted(names)}"
            raise ConfigError(f"{origins.get(path, origins.get(where, 'config'))}: unknown key '{path}'{hint}", path)
        sub = _NESTED.get((cls.__name__, key))
        if sub is not None and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{origins.get(path, 'config')}: '{path}' must be a mapping, got {value!r}")
            value = _from_dict(sub, value, path, origins)
        kwargs[key] = value
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where, origins)
    return obj


@dataclass
class DatasetSplit:
    """One split: COCO instances json + image folder + transform list (each a ``{'type': ...}`` dict)."""

    ann_file: str = ""
    img_dir: str = ""
    pipeline: list[dict[str, Any]] = field(default_factory=list)
    filter_empty_gt: bool = True


@dataclass
class DataConfig:
    """``samples_per_gpu`` images per process; ``workers_per_gpu`` data-loader workers per process."""

    root: str = ""
    train: DatasetSplit = field(default_factory=DatasetSplit)
    val: DatasetSplit = field(default_factory=DatasetSplit)
    test: DatasetSplit | None = None
    samples_per_gpu: int = 2
    workers_per_gpu: int = 2
    val_samples_per_gpu: int = 1
    size_divisor: int = 32
    group_by_aspect_ratio: bool = True
    # Name of a built-in dataset to create in `root` when it is missing (only "synthetic" exists).
    auto_create: str | None = None
    synth: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParamwiseConfig:
    """Per-parameter multipliers, as MMDetection's ``paramwise_cfg`` (bias_lr_mult=2, bias_decay_mult=0 ...)."""

    bias_lr_mult: float = 1.0
    bias_decay_mult: float = 1.0
    norm_decay_mult: float = 1.0
    custom_keys: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """``lr`` is for ``base_batch_size`` images; with ``auto_scale_lr`` it scales linearly with the total batch."""

    type: str = "SGD"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] | list[float] = (0.9, 0.999)
    eps: float = 1e-8
    nesterov: bool = False
    paramwise: ParamwiseConfig = field(default_factory=ParamwiseConfig)
    grad_clip: dict[str, float] | None = None  # {"max_norm": 35, "norm_type": 2}
    auto_scale_lr: bool = True
    base_batch_size: int = 16

    def check(self, where: str, origins: dict[str, str]) -> None:
        if self.type not in ("SGD", "AdamW"):
            raise ConfigError(f"{origins.get(where + '.type', 'config')}: {where}.type must be SGD or AdamW, "
                              f"got '{self.type}'")


@dataclass
class ScheduleConfig:
    """Epoch-based schedule with linear warm-up, as MMDetection's ``lr_config`` + ``runner.max_epochs``."""

    epochs: int = 12
    policy: str = "step"  # step | cosine | constant
    steps: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    min_lr_ratio: float = 0.0  # cosine: final lr = lr * min_lr_ratio
    warmup: str | None = "linear"  # linear | constant | None
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    max_iters: int | None = None  # stop early after this many iterations (smoke runs)

    def check(self, where: str, origins: dict[str, str]) -> None:
        if self.policy not in ("step", "cosine", "constant"):
            raise ConfigError(f"{origins.get(where + '.policy', 'config')}: {where}.policy must be step, cosine "
                              f"or constant, got '{self.policy}'")
        if self.warmup not in (None, "linear", "constant"):
            raise ConfigError(f"{origins.get(where + '.warmup', 'config')}: {where}.warmup must be linear, "
                              f"constant or null, got '{self.warmup}'")


@dataclass
class RuntimeConfig:
    """Everything about a run that is not model, data or optimisation."""

    seed: int = 0
    deterministic: bool = False
    amp: bool = False
    sync_bn: bool = False
    val_interval: int = 1  # epochs between validations (0 = never)
    checkpoint_interval: int = 1
    log_interval: int = 20
    max_keep_ckpts: int = -1
    work_dir: str | None = None
    load_from: str | None = None
    find_unused_parameters: bool = False
    device: str = "auto"  # auto | cpu | cuda
    channels_last: bool = True  # NHWC weights/activations: same results, faster convolutions on CPU and GPU


@dataclass
class Config:
    """A validated config: ``model`` is a nested dict checked against the registries."""

    model: dict[str, Any]
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    name: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NESTED: dict[tuple[str, str], type] = {
    ("DataConfig", "train"): DatasetSplit,
    ("DataConfig", "val"): DatasetSplit,
    ("DataConfig", "test"): DatasetSplit,
    ("OptimizerConfig", "paramwise"): ParamwiseConfig,
}

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "runtime": RuntimeConfig,
}


def config_from_dict(raw: dict[str, Any], origins: dict[str, str] | None = None, name: str = "",
                     source: str = "") -> Config:
    """Validate a merged raw dict into a :class:`Config` (see :func:`densedet.config.load_config`)."""
    origins = origins or {}
    unknown = set(raw) - set(SECTIONS) - {"model"}
    for key in sorted(unknown):
        raise ConfigError(f"{origins.get(key, source or 'config')}: unknown top-level key '{key}'; "
                          f"expected one of {sorted(set(SECTIONS) | {'model'})}")
    if "model" not in raw or not isinstance(raw["model"], dict):
        raise ConfigError(f"{source or 'config'}: a config needs a 'model' mapping")
    sections = {k: _from_dict(cls, raw.get(k), k, origins) for k, cls in SECTIONS.items()}
    return Config(model=raw["model"], name=name, source=source, **sections)
