"""Deprecated alias of :mod:`densedet.weights.mmdet` (``convert_mmdet_checkpoint``)."""

from densedet.moved import moved_names
from densedet.weights import mmdet as _mmdet

__getattr__ = moved_names("densedet.compat.mmdet", _mmdet, ("convert_mmdet_checkpoint",))
