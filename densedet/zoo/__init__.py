"""Deprecated: the released-weights table and downloads moved to :mod:`densedet.weights` (``densedet.weights.zoo``,
``densedet.weights.zoo_table``, ``densedet.weights.download``). The old names keep working with a
``DeprecationWarning``."""

import densedet.weights as _weights
from densedet.moved import moved_names

__getattr__ = moved_names("densedet.zoo", _weights, ("ZOO", "ZooEntry", "ZooError", "cached_download", "download",
                                                     "fetch_zoo_weights", "format_zoo_table", "get_entry",
                                                     "resolve_weights"))
