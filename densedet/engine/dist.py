"""Deprecated alias of :mod:`densedet.dist` (moved in the detector-contract redesign): the old names keep
working, with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings
from typing import Any

import densedet.dist as _new


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(_new, name)  # AttributeError for names the new module does not have either
    warnings.warn(f"densedet.engine.dist.{name} moved to densedet.dist.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
