"""Deprecated alias of :mod:`densedet.structures.masks` (moved in the detector-contract redesign): the old names keep
working, with a ``DeprecationWarning``."""

import densedet.structures.masks as _new
from densedet.moved import moved_names

__getattr__ = moved_names("densedet.data.masks", _new)
