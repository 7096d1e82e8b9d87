"""Typed sections of a DenseDet config.

A config file is YAML with the MMDetection vocabulary (``model``, ``data``, ``optimizer``, ``lr_config`` ...
are grouped here into ``model``, ``data``, ``optimizer``, ``schedule``, ``runtime``). The non-model sections
become the dataclasses below; the ``model`` section stays a nested dict whose keys are checked against the
constructors of the registered components (see :mod:`densedet.config.loader`).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from densedet.config.legacy import move_normalize_into_model
from densedet.data.mask_loading import DEFAULT_MASK_BBOX_CHECK, DEFAULT_MASK_BBOX_IOU_THR, MASK_BBOX_CHECKS
from densedet.registry import ConfigError


def _from_dict(cls: type, data: dict[str, Any] | None, where: str, origins: dict[str, str]) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and out-of-range values raise naming the
    key path, the value as typed and the file that set it."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{origins.get(where, 'config')}: {where}={_as_typed(data)}: '{where}' must be a mapping "
                          f"of its keys ({', '.join(f.name for f in dataclasses.fields(cls))})", where)
    data = dict(data or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
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
            value = _from_dict(sub, value, path, origins)
        else:
            typed = value
            value = check_value(value, hints[key], path, origins)
            _check_range(cls.__name__, key, value, typed, path, origins)
        kwargs[key] = value
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where, origins)
    return obj


def _as_typed(value: Any) -> str:
    """``value`` written back the way it is typed in YAML or on the command line (``two``, ``-0.01``, ``[1, 2]``)."""
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               tuple: "a list", dict: "a mapping"}


def _type_text(hint: Any) -> str:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        words = [_type_text(a) for a in args if a is not type(None)]
        return " or ".join(dict.fromkeys(words)) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):  # "a list of integers", "a list of mappings"
        inner = {_type_text(a) for a in args if a is not Ellipsis}
        if len(inner) != 1 or Any in args:
            return "a list"
        return f"a list of {inner.pop().removeprefix('an ').removeprefix('a ')}s"
    return _TYPE_WORDS.get(origin or hint, str(hint))


def check_value(value: Any, hint: Any, path: str, origins: dict[str, str]) -> Any:
    """``value`` if it has the type ``hint`` names (ints also count as floats; a float written ``1e-4``, which
    YAML reads as a string, becomes a float), else :class:`ConfigError` showing ``path=value`` as typed."""
    ok, out = _conform(value, hint)
    if not ok:
        src = origins.get(path, _parent_origin(path, origins))
        raise ConfigError(f"{src}: {path}={_as_typed(value)}: must be {_type_text(hint)}", path)
    return out


def _parent_origin(path: str, origins: dict[str, str]) -> str:
    while path:
        path = path.rpartition(".")[0]
        if path in origins:
            return origins[path]
    return "config"


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is Any:
        return True, value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, value
        for a in args:
            if a is not type(None):
                ok, out = _conform(value, a)
                if ok:
                    return True, out
        return False, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        elem = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False, value
            results = [_conform(v, a) for v, a in zip(value, args)]
        else:
            results = [_conform(v, elem) for v in value]
        if not all(ok for ok, _ in results):
            return False, value
        return True, [out for _, out in results]
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    return True, value  # a type the schema does not spell out: the section's own check() sees it


# Value ranges checked at load time (before anything derived, such as the auto-scaled lr, is computed):
# (section class, key) -> list of (comparison, bound); every list element of a list value is checked.
_RANGES: dict[tuple[str, str], list[tuple[str, float]]] = {
    ("DataConfig", "samples_per_gpu"): [(">=", 1)],
    ("DataConfig", "val_samples_per_gpu"): [(">=", 1)],
    ("DataConfig", "workers_per_gpu"): [(">=", 0)],
    ("DataConfig", "size_divisor"): [(">=", 0)],
    ("OptimizerConfig", "lr"): [(">", 0)],
    ("OptimizerConfig", "momentum"): [(">=", 0), ("<", 1)],
    ("OptimizerConfig", "weight_decay"): [(">=", 0)],
    ("OptimizerConfig", "betas"): [(">=", 0), ("<", 1)],
    ("OptimizerConfig", "eps"): [(">", 0)],
    ("OptimizerConfig", "base_batch_size"): [(">=", 1)],
    ("ParamwiseConfig", "bias_lr_mult"): [(">=", 0)],
    ("ParamwiseConfig", "bias_decay_mult"): [(">=", 0)],
    ("ParamwiseConfig", "norm_decay_mult"): [(">=", 0)],
    ("ScheduleConfig", "epochs"): [(">=", 0)],  # 0 only before a SWA phase (config_from_dict checks)
    ("ScheduleConfig", "steps"): [(">=", 0)],
    ("ScheduleConfig", "gamma"): [(">", 0)],
    ("ScheduleConfig", "min_lr_ratio"): [(">=", 0)],
    ("ScheduleConfig", "warmup_iters"): [(">=", 0)],
    ("ScheduleConfig", "warmup_ratio"): [(">", 0), ("<=", 1)],
    ("ScheduleConfig", "max_iters"): [(">=", 1)],
    ("RuntimeConfig", "val_interval"): [(">=", 0)],
    ("RuntimeConfig", "checkpoint_interval"): [(">=", 0)],
    ("RuntimeConfig", "log_interval"): [(">=", 1)],
    ("RuntimeConfig", "max_consecutive_skips"): [(">=", 1)],
    ("RuntimeConfig", "log_val_images"): [(">=", 0)],
}
_COMPARE = {">=": operator.ge, ">": operator.gt, "<": operator.lt, "<=": operator.le}


def _check_range(section: str, key: str, value: Any, typed: Any, path: str, origins: dict[str, str]) -> None:
    rules = _RANGES.get((section, key))
    if not rules or value is None:
        return
    for v in value if isinstance(value, (list, tuple)) else [value]:
        for op, bound in rules:
            if not _COMPARE[op](v, bound):
                text = " and ".join(f"{o} {b:g}" for o, b in rules)
                each = "each value " if isinstance(value, (list, tuple)) else ""
                raise ConfigError(f"{origins.get(path, _parent_origin(path, origins))}: {path}={_as_typed(typed)}: "
                                  f"{each}must be {text}", path)


@dataclass
class DatasetSplit:
    """One split: COCO instances json + image folder + transform list (each a ``{'type': ...}`` dict).
    ``with_mask``: load instance masks too (Mask R-CNN training; the val split is then loaded with masks too).
    ``mask_bbox_check``: with masks, what to do with an annotation whose mask is empty inside the image or whose
    extent has an IoU below ``mask_bbox_iou_thr`` with its box: ``warn`` (keep, counted warning), ``skip`` (drop)
    or ``use_mask`` (take the box from the mask); ``null`` in val/test: as ``data.train`` (default ``warn``,
    ``0.1``)."""

    ann_file: str = ""
    img_dir: str = ""
    pipeline: list[dict[str, Any]] = field(default_factory=list)
    filter_empty_gt: bool = True
    with_mask: bool = False
    mask_bbox_check: str | None = None
    mask_bbox_iou_thr: float | None = None

    def check(self, where: str, origins: dict[str, str]) -> None:
        if self.mask_bbox_check is not None and self.mask_bbox_check not in MASK_BBOX_CHECKS:
            key = f"{where}.mask_bbox_check"
            raise ConfigError(f"{origins.get(key, _parent_origin(key, origins))}: {key}={self.mask_bbox_check}: "
                              f"must be one of {', '.join(MASK_BBOX_CHECKS)}", key)
        if self.mask_bbox_iou_thr is not None and not 0.0 <= self.mask_bbox_iou_thr <= 1.0:
            key = f"{where}.mask_bbox_iou_thr"
            raise ConfigError(f"{origins.get(key, _parent_origin(key, origins))}: {key}={self.mask_bbox_iou_thr:g}: "
                              f"must be >= 0 and <= 1", key)

    def mask_options(self, train: DatasetSplit) -> dict[str, Any]:
        """``mask_bbox_check`` / ``mask_bbox_iou_thr`` keyword arguments of a CocoDataset for this split (unset:
        ``train``'s, then the defaults)."""
        check = self.mask_bbox_check or train.mask_bbox_check or DEFAULT_MASK_BBOX_CHECK
        thr = next((v for v in (self.mask_bbox_iou_thr, train.mask_bbox_iou_thr) if v is not None),
                   DEFAULT_MASK_BBOX_IOU_THR)
        return {"mask_bbox_check": check, "mask_bbox_iou_thr": float(thr)}


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


#: experiment trackers ``runtime.loggers`` / ``densedet train --logger`` accept (densedet.engine.trackers)
LOGGER_NAMES = ("tensorboard", "mlflow")


def check_logger_names(names: list[str], where: str = "runtime.loggers", source: str = "config") -> list[str]:
    """``names`` without repeats (first occurrence kept) if each is one of :data:`LOGGER_NAMES`, else a
    :class:`ConfigError` naming ``where`` and the accepted names."""
    for name in names:
        if name not in LOGGER_NAMES:
            raise ConfigError(f"{source}: {where}: unknown logger {name!r}; accepted: {', '.join(LOGGER_NAMES)} "
                              f"(log.jsonl, train.log and curves.png are always written)", where)
    return list(dict.fromkeys(names))


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
    # Mixed precision: an optimizer step whose gradients hold NaN/inf is skipped (counted in the log); after this
    # many consecutive skipped steps training stops with an error instead.
    max_consecutive_skips: int = 20
    precision: str = "fp32"  # inference: fp32 | bf16 (autocast backbone/neck/head; decode + NMS in fp32)
    compile: bool = False  # inference: torch.compile backbone/neck/head (Inductor, frozen weights); decode + NMS eager
    # Experiment trackers beside log.jsonl (docs/tracking.md): any of LOGGER_NAMES; rank 0 writes.
    loggers: list[str] = field(default_factory=list)
    mlflow_tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else file:<work_dir>/mlruns
    mlflow_experiment: str | None = None  # default: $MLFLOW_EXPERIMENT_NAME, else the config's name
    log_val_images: int = 4  # validation images drawn with their detections into the trackers (0 = none)

    def check(self, where: str, origins: dict[str, str]) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"{origins.get(where + '.precision', 'config')}: {where}.precision must be fp32 or "
                              f"bf16, got {self.precision!r}", f"{where}.precision")
        self.loggers = check_logger_names(self.loggers, f"{where}.loggers",
                                          origins.get(f"{where}.loggers", origins.get(where, "config")))


@dataclass
class SWALrConfig:
    """Learning rate of the SWA phase: mmcv's ``CyclicLrUpdaterHook`` (``swa_lr_config`` of VarifocalNet's
    ``configs/_base_/swa.py``; see :mod:`densedet.engine.swa`). Defaults are that file's values."""

    policy: str = "cyclic"
    target_ratio: float | list[float] = field(default_factory=lambda: [1.0, 0.01])  # r alone: (r, r / 1e5)
    cyclic_times: int = 12
    step_ratio_up: float = 0.0

    def check(self, where: str, origins: dict[str, str]) -> None:
        src = origins.get(where, "config")
        if self.policy != "cyclic":
            raise ConfigError(f"{src}: {where}.policy must be 'cyclic' (the only SWA lr policy), got "
                              f"'{self.policy}'", f"{where}.policy")
        ratio = self.target_ratio
        if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
            ratio = [float(ratio), float(ratio) / 1e5]  # mmcv: a single number r means (r, r / 1e5)
        if not (isinstance(ratio, (list, tuple)) and len(ratio) in (1, 2)
                and all(isinstance(v, (int, float)) and v >= 0 for v in ratio)):
            raise ConfigError(f"{src}: {where}.target_ratio must be one or two non-negative numbers, got "
                              f"{self.target_ratio!r}", f"{where}.target_ratio")
        self.target_ratio = [float(ratio[0]), float(ratio[1]) if len(ratio) == 2 else float(ratio[0]) / 1e5]
        if not isinstance(self.cyclic_times, int) or self.cyclic_times < 1:
            raise ConfigError(f"{src}: {where}.cyclic_times must be an int >= 1, got {self.cyclic_times!r}",
                              f"{where}.cyclic_times")
        if not 0.0 <= float(self.step_ratio_up) < 1.0:
            raise ConfigError(f"{src}: {where}.step_ratio_up must be in [0, 1), got {self.step_ratio_up!r}",
                              f"{where}.step_ratio_up")


@dataclass
class SWACheckpointConfig:
    """Training-state checkpoints of the SWA phase (resumable; the averaged model goes to ``swa_model_N.pth``)."""

    interval: int = 1
    filename_tmpl: str = "swa_epoch_{}.pth"

    def check(self, where: str, origins: dict[str, str]) -> None:
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ConfigError(f"{origins.get(where, 'config')}: {where}.interval must be an int >= 1, got "
                              f"{self.interval!r}", f"{where}.interval")
        if "{}" not in self.filename_tmpl or not self.filename_tmpl.endswith(".pth") or "/" in self.filename_tmpl:
            raise ConfigError(f"{origins.get(where, 'config')}: {where}.filename_tmpl must be a file name with "
                              f"'{{}}' for the epoch, ending in .pth, got '{self.filename_tmpl}'",
                              f"{where}.filename_tmpl")


@dataclass
class SWAConfig:
    """Stochastic Weights Averaging after the regular schedule (Zhang et al., "SWA Object Detection",
    arXiv:2012.12645; keys as VarifocalNet's ``configs/_base_/swa.py``, run by :mod:`densedet.engine.swa`).

    ``swa_optimizer`` is an optimizer section (its ``grad_clip`` is mmdet's ``swa_optimizer_config``);
    ``swa_load_from``: weights to start SWA from (``null``: the weights at the end of regular training);
    ``swa_resume_from``: a SWA-phase checkpoint to resume from; ``swa_interval``: epochs between averagings.
    """

    swa_training: bool = False
    only_swa_training: bool = False
    swa_load_from: str | None = None
    swa_resume_from: str | None = None
    swa_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    swa_lr_config: SWALrConfig = field(default_factory=SWALrConfig)
    swa_total_epochs: int = 12
    swa_interval: int = 1
    swa_checkpoint_config: SWACheckpointConfig = field(default_factory=SWACheckpointConfig)

    def check(self, where: str, origins: dict[str, str]) -> None:
        for key in ("swa_total_epochs", "swa_interval"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{origins.get(f'{where}.{key}', 'config')}: {where}.{key} must be an int >= 1, "
                                  f"got {value!r}", f"{where}.{key}")
        if self.only_swa_training and not self.swa_training:
            raise ConfigError(f"{origins.get(f'{where}.only_swa_training', 'config')}: {where}.only_swa_training "
                              f"needs {where}.swa_training: true", f"{where}.only_swa_training")


@dataclass
class Config:
    """A validated config: ``model`` is a nested dict checked against the registries."""

    model: dict[str, Any]
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    name: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NESTED: dict[tuple[str, str], type] = {
    ("DataConfig", "train"): DatasetSplit,
    ("DataConfig", "val"): DatasetSplit,
    ("DataConfig", "test"): DatasetSplit,
    ("OptimizerConfig", "paramwise"): ParamwiseConfig,
    ("SWAConfig", "swa_optimizer"): OptimizerConfig,
    ("SWAConfig", "swa_lr_config"): SWALrConfig,
    ("SWAConfig", "swa_checkpoint_config"): SWACheckpointConfig,
}

SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "runtime": RuntimeConfig,
    "swa": SWAConfig,
}


def config_from_dict(raw: dict[str, Any], origins: dict[str, str] | None = None, name: str = "",
                     source: str = "") -> Config:
    """Validate a merged raw dict into a :class:`Config` (see :func:`densedet.config.load_config`)."""
    origins = origins or {}
    raw = move_normalize_into_model(raw, origins, source)
    unknown = set(raw) - set(SECTIONS) - {"model"}
    for key in sorted(unknown):
        raise ConfigError(f"{origins.get(key, source or 'config')}: unknown top-level key '{key}'; "
                          f"expected one of {sorted(set(SECTIONS) | {'model'})}")
    if "model" not in raw or not isinstance(raw["model"], dict):
        raise ConfigError(f"{source or 'config'}: a config needs a 'model' mapping")
    sections = {k: _from_dict(cls, raw.get(k), k, origins) for k, cls in SECTIONS.items()}
    if sections["schedule"].epochs == 0 and not sections["swa"].swa_training:
        raise ConfigError(f"{origins.get('schedule.epochs', source or 'config')}: schedule.epochs=0: must be >= 1 "
                          f"(0 only when a SWA phase follows: swa.swa_training: true)", "schedule.epochs")
    return Config(model=raw["model"], name=name, source=source, **sections)
