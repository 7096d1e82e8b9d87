"""Deprecated alias of :mod:`densedet.analysis.levels` (moved in the detector-contract redesign): the old names keep
working, with a ``DeprecationWarning``."""

import densedet.analysis.levels as _new
from densedet.moved import moved_names

__getattr__ = moved_names("densedet.diagnostics", _new)
