"""Weights I/O: everything between a file (or a URL, or a zoo name) and a model's parameters.

* :mod:`~densedet.weights.files`: the one safe reader (``torch.load(weights_only=True)``, refused pickled objects
  kept as inert placeholders), :func:`load_checkpoint`, :func:`extract_state_dict`;
* :mod:`~densedet.weights.state_dict`: :func:`load_model_weights` (strict, with a report of missing / unexpected /
  mis-shaped keys) and :func:`load_matching` (partial, for pretrained backbones);
* :mod:`~densedet.weights.sources`: ``torchvision://``, ``open-mmlab://``, ``timm:``, URLs, ``zoo:NAME`` and paths ->
  a state dict (:func:`read_state_dict`), :func:`load_pretrained` into a backbone;
* :mod:`~densedet.weights.download`: cached, resumable, checksum-verified downloads into ``$DENSEDET_HOME``;
* :mod:`~densedet.weights.mmdet`: converting a released MMDetection checkpoint;
* :mod:`~densedet.weights.zoo_table` / :mod:`~densedet.weights.zoo`: the released-weights table and fetching by name;
* :mod:`~densedet.weights.workdir`: which file of a training work dir holds the weights.

Saving is :func:`densedet.io.atomic_torch_save` (training checkpoints: :mod:`densedet.engine.checkpoint`).
"""

from densedet.io import atomic_torch_save
from densedet.weights.download import ZooError, cached_download, checkpoint_dir, download
from densedet.weights.files import extract_state_dict, load_checkpoint, load_checkpoint_file
from densedet.weights.mmdet import convert_mmdet_checkpoint
from densedet.weights.sources import OPEN_MMLAB_URLS, load_pretrained, pretrained_source, read_state_dict
from densedet.weights.state_dict import load_matching, load_model_weights, select_prefix, unwrap_model
from densedet.weights.workdir import (
    LAST_CHECKPOINT_FILE,
    SWA_FINAL,
    latest_checkpoint,
    mark_last_checkpoint,
    resolve_checkpoint,
)
from densedet.weights.zoo import fetch_zoo_weights, format_zoo_table, get_entry, resolve_weights
from densedet.weights.zoo_table import ZOO, ZooEntry

__all__ = [
    "LAST_CHECKPOINT_FILE", "OPEN_MMLAB_URLS", "SWA_FINAL", "ZOO", "ZooEntry", "ZooError", "atomic_torch_save",
    "cached_download", "checkpoint_dir", "convert_mmdet_checkpoint", "download", "extract_state_dict",
    "fetch_zoo_weights", "format_zoo_table", "get_entry", "latest_checkpoint", "load_checkpoint",
    "load_checkpoint_file", "load_matching", "load_model_weights", "load_pretrained", "mark_last_checkpoint",
    "pretrained_source", "read_state_dict", "resolve_checkpoint", "resolve_weights", "select_prefix",
    "unwrap_model",
]
