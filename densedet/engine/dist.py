"""Deprecated alias of :mod:`densedet.dist` (moved in the detector-contract redesign): the old names keep
working, with a ``DeprecationWarning``."""

import densedet.dist as _new
from densedet.moved import moved_names

__getattr__ = moved_names("densedet.engine.dist", _new)
