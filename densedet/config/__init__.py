"""Config files: YAML with ``_base_`` inheritance, validated into typed sections."""

from densedet.config.loader import list_configs, load_config, parse_overrides, resolve_config_path
from densedet.config.schema import (
    Config,
    DataConfig,
    DatasetSplit,
    OptimizerConfig,
    ParamwiseConfig,
    RuntimeConfig,
    ScheduleConfig,
    config_from_dict,
)
from densedet.registry import ConfigError

__all__ = [
    "Config", "ConfigError", "DataConfig", "DatasetSplit", "OptimizerConfig", "ParamwiseConfig", "RuntimeConfig",
    "ScheduleConfig", "config_from_dict", "list_configs", "load_config", "parse_overrides", "resolve_config_path",
]
