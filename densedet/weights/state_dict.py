"""Loading a state dict into a model, with a report of what did not fit.

:func:`load_model_weights` is the strict loader of whole-detector checkpoints (DenseDet's own, converted MMDetection
releases): any missing / unexpected / mis-shaped key is an error listing them, or with ``strict=False`` a warning
(and still an error when nothing fits). :func:`load_matching` is the partial loader of pretrained backbones (mmcv's
``Pretrained`` init): it loads what fits and warns once about the rest.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densedet.errors import CheckpointError
from densedet.weights.files import extract_state_dict, load_checkpoint

__all__ = ["load_matching", "load_model_weights", "select_prefix", "unwrap_model"]

logger = logging.getLogger("densedet")

_MAX_LISTED = 10


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or ``model`` itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"\n  {len(items)} {title}: {shown}{more}"


def load_model_weights(
    model: nn.Module,
    ckpt_or_state_dict: Mapping[str, Any] | str | Path,
    strict: bool = True,
    source: str | None = None,
) -> dict[str, list]:
    """Load weights into ``model`` (unwrapped from DDP) and explain any mismatch.

    Args:
        model: the target module.
        ckpt_or_state_dict: a path, a checkpoint dict with ``state_dict``, or a bare state dict.
        strict: raise :class:`CheckpointError` on any missing / unexpected key or shape mismatch, listing up to 10
            of each. With ``strict=False`` the matching tensors are loaded, the rest is logged as a warning, and
            it is still an error when *no* tensor matches (a checkpoint of a different model).
        source: file name for messages (defaults to the path when one is given).

    Returns:
        ``{"missing": [...], "unexpected": [...], "mismatched": [(key, ckpt_shape, model_shape), ...]}``.
    """
    if isinstance(ckpt_or_state_dict, (str, os.PathLike)):
        source = source or os.fspath(ckpt_or_state_dict)
        ckpt_or_state_dict = load_checkpoint(ckpt_or_state_dict)
    source = source or "checkpoint"
    state = extract_state_dict(ckpt_or_state_dict, source)
    target = unwrap_model(model)
    own = target.state_dict()

    # State a module may do without (a module lists it in ``optional_state_keys``), e.g. GHM's running bin
    # densities, which MMDetection 1.x checkpoints do not hold; the module's _load_from_state_dict keeps its own.
    optional = {f"{name}.{key}" if name else key for name, mod in target.named_modules()
                for key in getattr(mod, "optional_state_keys", ())}
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    report: dict[str, list] = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    problems = ""
    if missing:
        problems += _listing("missing keys (in the model, not in the checkpoint)", missing)
    if unexpected:
        problems += _listing("unexpected keys (in the checkpoint, not in the model)", unexpected)
    if mismatched:
        problems += _listing("shape mismatches (checkpoint vs model)",
                             [f"{k} {list(a)} vs {list(b)}" for k, a, b in mismatched])

    if strict and problems:
        raise CheckpointError(f"{source}: the checkpoint does not fit the model {type(target).__name__} "
                              f"(a checkpoint of a different model or config?):{problems}")
    bad = {k for k, _, _ in mismatched}
    loadable = {k: v for k, v in state.items() if k in own and k not in bad}
    if not loadable:
        raise CheckpointError(f"{source}: none of the {len(state)} checkpoint tensors fit the model "
                              f"{type(target).__name__} (a checkpoint of a different model?):{problems}")
    target.load_state_dict(loadable, strict=False)
    if problems:
        logger.warning("%s: loaded %d of %d model tensors; the rest keep their initialisation:%s", source,
                       len(loadable), len(own), problems)
    return report


def select_prefix(state: dict[str, torch.Tensor], source: str, prefix: str | None) -> dict[str, torch.Tensor]:
    """Keep the keys under ``prefix`` (stripped); without one, a whole detector's ``backbone.*`` keys."""
    if prefix is None and any(k.startswith("backbone.") for k in state):
        prefix = "backbone."
    if prefix:
        prefix = prefix if prefix.endswith(".") else prefix + "."
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"pretrained checkpoint '{source}' has no keys under prefix '{prefix}'")
    return state


def load_matching(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                  ignore_unexpected: Sequence[str] = (), ignore_missing: Sequence[str] = ()) -> dict[str, list[str]]:
    """Load the tensors of ``state`` whose names and shapes match; warn once about the rest.

    Unexpected keys starting with an entry of ``ignore_unexpected`` and missing keys containing an entry of
    ``ignore_missing`` are not reported. Returns ``{'missing', 'unexpected', 'mismatched'}`` (the reported lists).
    """
    own = module.state_dict()
    loadable: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for k, v in state.items():
        if k not in own or not isinstance(v, torch.Tensor):
            if not any(k.startswith(p) for p in ignore_unexpected):
                unexpected.append(k)
        elif v.shape != own[k].shape:
            mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            loadable[k] = v
    missing = [k for k in own if k not in loadable and not any(m in k for m in ignore_missing)]
    module.load_state_dict(loadable, strict=False)

    problems = []
    if missing:
        problems.append(f"missing keys in checkpoint: {missing}")
    if unexpected:
        problems.append(f"unexpected keys in checkpoint: {unexpected}")
    if mismatched:
        problems.append(f"size mismatch (skipped): {mismatched}")
    if problems:
        warnings.warn(f"{type(module).__name__}: loading '{source}': " + "; ".join(problems), UserWarning, stacklevel=3)
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
