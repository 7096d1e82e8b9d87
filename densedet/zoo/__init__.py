"""Released weights by name: the table (:mod:`densedet.zoo.table`), downloads into ``$DENSEDET_HOME``
(:mod:`densedet.zoo.download`), conversion and loading (:mod:`densedet.zoo.registry`)."""

from densedet.zoo.download import ZooError, cached_download, download
from densedet.zoo.registry import fetch_zoo_weights, format_zoo_table, get_entry, resolve_weights
from densedet.zoo.table import ZOO, ZooEntry

__all__ = ["ZOO", "ZooEntry", "ZooError", "cached_download", "download", "fetch_zoo_weights", "format_zoo_table",
           "get_entry", "resolve_weights"]
