"""Component registries: one plain dict per component kind.

A config entry such as ``{"type": "FocalLoss", "gamma": 2.0}`` is built by looking the
``type`` up in the registry of its kind and calling the class with the remaining keys.
Keys are checked against the constructor signature first, so a mistyped key is an error
that names the key, the component and where in the config it came from.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

from densedet.errors import ConfigError, DenseDetError


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
        check_types(cls, cfg, where)
        try:
            return cls(**kwargs)
        except DenseDetError:
            raise
        except (TypeError, ValueError, AssertionError) as e:
            # A value of the right type that the component still rejects (a wrong length, an impossible
            # combination): name the config section instead of leaking a traceback (kept as __cause__ for --debug).
            raise ConfigError(f"{where}: {cls.__name__} rejected its config ({type(e).__name__}: {e})",
                              path=where) from e


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


def _type_words(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_words(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if origin is not None:
        inner = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(inner) == 1 or (inner and all(a == inner[0] for a in inner)):
            plural = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}.get(inner[0])
            if plural:
                return f"a list of {plural}" if len(inner) == 1 else f"a list of {len(inner)} {plural}"
        return "a list"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(hint, str(hint))


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` (as read from YAML) fits the type ``hint``; ``None`` when the hint is not one checked here
    (classes, callables, ``Any``), so only plain config types are judged."""
    if hint is Any:
        return None
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_matches(value, a) for a in args]
        return True if any(v for v in verdicts) else (None if None in verdicts else False)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and len(inner) > 1:  # fixed-length tuple[int, int]
            if len(value) != len(inner):
                return False
            verdicts = [_matches(v, a) for v, a in zip(value, inner)]
        else:
            verdicts = [_matches(v, inner[0]) for v in value] if inner else []
        return False if False in verdicts else True
    return None


def check_types(fn: Callable[..., Any], cfg: dict[str, Any], where: str) -> None:
    """Raise :class:`ConfigError` naming ``where.key=value`` when a config value does not fit the type annotation of
    ``fn``'s parameter of that name (ints, numbers, booleans, strings, lists and mappings of them; other
    annotations are not judged). Catches ``num_classes=x`` when the config is loaded, not deep in a constructor."""
    target = fn.__init__ if isinstance(fn, type) else fn
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve at run time: nothing to check against
        return
    for key, value in cfg.items():
        hint = hints.get(key)
        if hint is not None and _matches(value, hint) is False:
            raise ConfigError(f"{where}.{key}={value!r}: must be {_type_words(hint)} "
                              f"({getattr(fn, '__name__', fn)})", path=f"{where}.{key}")


BACKBONES = Registry("backbone")
NECKS = Registry("neck")
HEADS = Registry("head")
DETECTORS = Registry("detector")
LOSSES = Registry("loss")
TRANSFORMS = Registry("transform")
