"""Deprecated: the released-weights table and downloads moved to :mod:`densedet.weights` (``densedet.weights.zoo``,
``densedet.weights.zoo_table``, ``densedet.weights.download``). The old names keep working with a
``DeprecationWarning``."""

from __future__ import annotations

import warnings
from typing import Any

import densedet.weights as _weights

_NAMES = ("ZOO", "ZooEntry", "ZooError", "cached_download", "download", "fetch_zoo_weights", "format_zoo_table",
          "get_entry", "resolve_weights")


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        warnings.warn(f"densedet.zoo.{name} moved to densedet.weights.{name}", DeprecationWarning, stacklevel=2)
        return getattr(_weights, name)
    raise AttributeError(f"module 'densedet.zoo' has no attribute '{name}'")
