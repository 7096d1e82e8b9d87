"""Deprecated alias of :mod:`densedet.structures.masks` (moved in the detector-contract redesign): the old names keep
working, with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings
from typing import Any

import densedet.structures.masks as _new


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    value = getattr(_new, name)  # AttributeError for names the new module does not have either
    warnings.warn(f"densedet.data.masks.{name} moved to densedet.structures.masks.{name}",
                  DeprecationWarning, stacklevel=2)
    return value
