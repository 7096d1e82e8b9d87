"""Deprecated alias of :mod:`densedet.analysis.bench` (moved in the detector-contract redesign): the old names keep
working, with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings
from typing import Any

import densedet.analysis.bench as _new


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(_new, name)  # AttributeError for names the new module does not have either
    warnings.warn(f"densedet.bench.{name} moved to densedet.analysis.bench.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
