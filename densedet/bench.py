"""Deprecated alias of :mod:`densedet.analysis.bench` (moved in the detector-contract redesign): the old names keep
working, with a ``DeprecationWarning``."""

import densedet.analysis.bench as _new
from densedet.moved import moved_names

__getattr__ = moved_names("densedet.bench", _new)
