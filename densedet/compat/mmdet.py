"""Deprecated alias of :mod:`densedet.weights.mmdet` (``convert_mmdet_checkpoint``)."""

from __future__ import annotations

import warnings
from typing import Any

from densedet.weights import mmdet as _mmdet


def __getattr__(name: str) -> Any:
    if name == "convert_mmdet_checkpoint":
        warnings.warn("densedet.compat.mmdet.convert_mmdet_checkpoint moved to densedet.weights.mmdet",
                      DeprecationWarning, stacklevel=2)
        return _mmdet.convert_mmdet_checkpoint
    raise AttributeError(f"module 'densedet.compat.mmdet' has no attribute '{name}'")
