"""Module-level ``__getattr__`` for the deprecated aliases of modules that moved (``densedet.bench``,
``densedet.zoo``, ...): each old name keeps working, with a ``DeprecationWarning`` naming its new place."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

__all__ = ["moved_names"]


def moved_names(old: str, new: ModuleType, names: Iterable[str] | None = None) -> Callable[[str], Any]:
    """A ``__getattr__`` for module ``old`` that returns ``new``'s attribute of the same name, warning that it
    moved. ``names``: the only names that moved (default: every public name of ``new``); any other is an
    ``AttributeError`` as for a plain module."""
    allowed = None if names is None else frozenset(names)

    def __getattr__(name: str) -> Any:
        if name.startswith("__") or (allowed is not None and name not in allowed) or not hasattr(new, name):
            raise AttributeError(f"module '{old}' has no attribute '{name}'")
        warnings.warn(f"{old}.{name} moved to {new.__name__}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(new, name)

    return __getattr__
