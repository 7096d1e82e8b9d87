"""Training checkpoints: model + optimizer + scheduler + scaler + RNG state, saved atomically and never with NaN/inf;
pruning of old epoch files; ``runtime.load_from`` fine-tuning. Reading weight files and loading state dicts is
:mod:`densedet.weights`' job (re-exported here under their old names).

A checkpoint is ``{"state_dict", "optimizer", "scheduler", "scaler", "meta"}`` where ``meta`` holds ``epoch``
(completed epochs), ``iter`` (completed iterations), ``config`` (plain dict), ``rng``, ``densedet_version`` and
``classes``. Everything in it is a tensor or a plain Python container/scalar, so ``torch.load(weights_only=True)``
reads it and loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from densedet.dist import get_rank
from densedet.errors import CheckpointError, CheckpointNotFoundError
from densedet.io import atomic_torch_save, remove_stale_temp_files
from densedet.version import __version__
from densedet.weights.files import extract_state_dict, load_checkpoint
from densedet.weights.state_dict import load_model_weights, unwrap_model
from densedet.weights.workdir import LAST_CHECKPOINT_FILE, latest_checkpoint, mark_last_checkpoint, resolve_checkpoint
from densedet.weights.zoo import resolve_weights

__all__ = [
    "LAST_CHECKPOINT_FILE",
    "CheckpointError",
    "CheckpointNotFoundError",
    "atomic_torch_save",
    "collect_rng_state",
    "extract_state_dict",
    "find_nonfinite",
    "grads_finite",
    "latest_checkpoint",
    "load_checkpoint",
    "load_for_finetune",
    "load_model_weights",
    "mark_last_checkpoint",
    "prune_checkpoints",
    "remove_stale_temp_files",
    "resolve_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "to_plain",
    "unwrap_model",
]

logger = logging.getLogger("densedet")

_MAX_LISTED = 10


def to_plain(obj: Any) -> Any:
    """Convert ``obj`` to what ``torch.load(weights_only=True)`` and YAML/JSON accept.

    Dataclasses and mappings -> dict (string keys kept as they are), tuples/lists -> list, paths -> str, numpy
    scalars -> Python scalars, numpy arrays -> tensors; tensors, str, int, float, bool and None stay.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (only tensors and plain Python data)")


# ---------------------------------------------------------------------------------------------------------- RNG
def collect_rng_state() -> dict[str, Any]:
    """This process's Python, numpy, torch CPU (and initialised CUDA) RNG states as tensors and plain data."""
    py_version, py_state, py_gauss = random.getstate()
    np_key, np_state, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"key": str(np_key), "state": torch.from_numpy(np_state.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(meta_or_state: Mapping[str, Any], rank: int | None = None) -> None:
    """Restore RNG states saved by :func:`collect_rng_state`.

    Accepts a checkpoint ``meta`` (uses ``meta["rng"]``) or the state itself; when the saved value is a list (one
    state per rank, as the trainer stores them) the entry of ``rank`` (default: this process's rank) is used,
    falling back to entry 0 when the run has more processes than were saved.
    """
    state: Any = meta_or_state.get("rng", meta_or_state) if isinstance(meta_or_state, Mapping) else meta_or_state
    if isinstance(state, (list, tuple)):
        if not state:
            return
        if rank is None:
            rank = get_rank()
        state = state[rank] if rank < len(state) else state[0]
    if not isinstance(state, Mapping) or "torch" not in state:
        raise ValueError("restore_rng: no RNG state found (expected keys python, numpy, torch)")
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state((npst["key"], npst["state"].numpy().astype(np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].cpu(), device=i)


# --------------------------------------------------------------------------------------------------- save / load
def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (:func:`densedet.io.atomic_torch_save`); DDP wrappers are unwrapped.

    ``meta`` is stored after :func:`to_plain`; ``rng`` (this process's state) and ``densedet_version`` are filled
    in when absent. Tensors of the state dicts are saved as they are (on their device; load maps them).

    Raises :class:`CheckpointError` (and writes nothing, so the previous checkpoints stay the last good ones) when
    a floating-point tensor anywhere in it (weights, buffers, optimizer state, an averaged model in ``meta``)
    holds NaN or inf: a non-finite checkpoint is never written.
    """
    meta = dict(meta or {})
    meta.setdefault("rng", collect_rng_state())
    meta.setdefault("densedet_version", __version__)
    ckpt = {
        "state_dict": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "meta": to_plain(meta),
    }
    bad = find_nonfinite(ckpt)
    if bad:
        listed = ", ".join(bad[:_MAX_LISTED]) + (" ..." if len(bad) > _MAX_LISTED else "")
        raise CheckpointError(f"{path}: not written: {len(bad)} tensor{'s' if len(bad) > 1 else ''} hold NaN or "
                              f"inf ({listed}); the training diverged and the earlier checkpoints are the last "
                              f"good ones")
    return atomic_torch_save(ckpt, path)


def find_nonfinite(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the floating-point tensors in ``obj`` (nested dicts / lists) holding NaN or inf."""
    if isinstance(obj, torch.Tensor):
        ok = not (obj.is_floating_point() or obj.is_complex()) or bool(torch.isfinite(obj).all())
        return [] if ok else [prefix or "<tensor>"]
    if isinstance(obj, Mapping):
        return [p for k, v in obj.items() for p in find_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in find_nonfinite(v, f"{prefix}.{i}" if prefix else str(i))]
    return []


def grads_finite(params: list[torch.Tensor]) -> bool:
    """Whether every gradient of ``params`` is finite: one fused norm per tensor, one host sync in all.

    A norm is NaN/inf exactly when its tensor holds a NaN/inf (or its fp32 norm overflows, which no usable
    gradient does), which is the test GradScaler makes before an optimizer step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack([n.float().to(grads[0].device) for n in norms]).sum()))


# ------------------------------------------------------------------------------------------------- work_dir files
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pth$")


def prune_checkpoints(work_dir: str | Path, max_keep: int, keep: str | Path | None = None) -> list[Path]:
    """Delete all but the ``max_keep`` highest-numbered ``epoch_N.pth`` files (``max_keep <= 0``: keep all).

    ``keep`` is never deleted. Returns the deleted paths.
    """
    if max_keep <= 0:
        return []
    work_dir = Path(work_dir)
    numbered = sorted(((int(m.group(1)), p) for p in work_dir.iterdir() if (m := _EPOCH_RE.match(p.name))),
                      reverse=True)
    keep_path = Path(keep).resolve() if keep is not None else None
    removed = []
    for _, p in numbered[max_keep:]:
        if keep_path is not None and p.resolve() == keep_path:
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------- fine-tuning
def load_for_finetune(model: nn.Module, source: str | Path, config_name: str | None = None) -> dict[str, list]:
    """``runtime.load_from``: load ``source`` (a path, ``zoo`` or ``zoo:NAME``) into ``model`` for fine-tuning.

    Every tensor whose name and shape match is loaded. When the class-dependent layers do not fit (a checkpoint
    trained with another ``num_classes``: ``model.classifier_prefixes()``, e.g. a dense head's classification conv,
    or a two-stage detector's ``fc_cls`` / ``fc_reg`` / ``conv_logits``), they are re-created by
    ``model.reset_classifier()`` as a fresh model's are (a dense head's bias at the focal prior
    ``-log((1 - p) / p)``, p = 0.01, Lin et al. 2017, sec. 4.1), and listed under ``"reinitialised"``. Any other
    mismatch keeps the model's own initialisation and is listed in the warning of :func:`load_model_weights`.
    """
    if isinstance(source, str) and (source == "zoo" or source.startswith("zoo:")):
        source = resolve_weights(source, config_name)
    report = load_model_weights(model, source, strict=False)
    target = unwrap_model(model)
    prefixes = target.classifier_prefixes() if hasattr(target, "classifier_prefixes") else []
    mismatched = {k for k, _, _ in report["mismatched"]}
    reinit: list[str] = []
    if any(k.startswith(p) for k in mismatched for p in prefixes):
        with torch.no_grad():
            target.reset_classifier()
        reinit = [n for n, _ in target.named_parameters() if any(n.startswith(p) for p in prefixes)]
        logger.info("%s: re-initialised %s for %d classes (the checkpoint's class count differs)", source,
                    ", ".join(reinit), target.num_classes)
    report["reinitialised"] = reinit
    return report
