"""Component registries: one plain dict per component kind.

A config entry such as ``{"type": "FocalLoss", "gamma": 2.0}`` is built by looking the
``type`` up in the registry of its kind and calling the class with the remaining keys.
Keys are checked against the constructor signature first, so a mistyped key is an error
that names the key, the component and where in the config it came from.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from densedet.errors import ConfigError


class Registry(dict):
    """A ``name -> class`` dict with a ``register`` decorator and a validating ``build``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str | None = None) -> Callable[[type], type]:
        def deco(cls: type) -> type:
            key = name or cls.__name__
            if key in self:
                raise KeyError(f"{self.kind} '{key}' is registered twice")
            self[key] = cls
            return cls

        return deco

    def get_class(self, type_name: str, where: str = "config") -> type:
        if type_name not in self:
            close = difflib.get_close_matches(type_name, list(self), n=3)
            hint = f"; did you mean {close}?" if close else f"; known: {sorted(self)}"
            raise ConfigError(f"{where}.type: unknown {self.kind} type '{type_name}'{hint}", path=f"{where}.type")
        return self[type_name]

    def build(self, cfg: dict[str, Any], where: str = "config", **extra: Any) -> Any:
        """Build ``cfg['type']`` with the other keys (plus ``extra``) as keyword arguments."""
        if not isinstance(cfg, dict) or "type" not in cfg:
            raise ConfigError(f"{where}: a {self.kind} entry must be a mapping with a 'type' key, got {cfg!r}",
                              path=where)
        cfg = dict(cfg)
        cls = self.get_class(cfg.pop("type"), where)
        kwargs = {**cfg, **extra}
        check_kwargs(cls, kwargs, where)
        return cls(**kwargs)


def check_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], where: str) -> None:
    """Raise :class:`ConfigError` if ``kwargs`` holds a key ``fn`` does not accept."""
    sig = inspect.signature(fn)
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in kwargs:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; accepted keys: {allowed}"
            raise ConfigError(f"{where}.{key}: unknown key for {getattr(fn, '__name__', fn)}{hint}",
                              path=f"{where}.{key}")


BACKBONES = Registry("backbone")
NECKS = Registry("neck")
HEADS = Registry("head")
DETECTORS = Registry("detector")
LOSSES = Registry("loss")
TRANSFORMS = Registry("transform")
