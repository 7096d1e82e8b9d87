"""Checkpoints: atomic save, ``weights_only`` load, strict weight loading with a readable diff, RNG state.

A checkpoint is ``{"state_dict", "optimizer", "scheduler", "scaler", "meta"}`` where ``meta`` holds ``epoch``
(completed epochs), ``iter`` (completed iterations), ``config`` (plain dict), ``rng``, ``densedet_version`` and
``classes``. Everything in it is a tensor or a plain Python container/scalar, so ``torch.load(weights_only=True)``
reads it and loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import random
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from densedet.errors import CheckpointError, CheckpointNotFoundError

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
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

LAST_CHECKPOINT_FILE = "last_checkpoint"
_MAX_LISTED = 10


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or ``model`` itself)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _densedet_version() -> str:
    try:
        import densedet

        version = getattr(densedet, "__version__", None)
        if version:
            return str(version)
    except ImportError:  # pragma: no cover - we are inside densedet
        pass
    try:
        from importlib.metadata import version as dist_version

        return dist_version("densedet")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


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
            from densedet.engine.dist import get_rank

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
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    """``.NAME.PID.HEX8.tmp`` next to ``path``: hidden, and tells :func:`remove_stale_temp_files` who wrote it."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else (PermissionError), or no signals on this platform
        return True
    return True


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files (``.epoch_N.pth.PID.HEX8.tmp``) that an atomic write killed mid-way left behind.

    Only files in :func:`_temp_name`'s pattern whose writing process no longer runs are removed (a live
    process may still be writing its own). Returns the removed paths.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        m = _TEMP_RE.match(p.name)
        if m and p.is_file() and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same directory, fsync, then ``os.replace`` onto ``path``.

    A crash at any point leaves either the old file or the new one at ``path``, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = _temp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (see :func:`atomic_torch_save`); DDP wrappers are unwrapped.

    ``meta`` is stored after :func:`to_plain`; ``rng`` (this process's state) and ``densedet_version`` are filled
    in when absent. Tensors of the state dicts are saved as they are (on their device; load maps them).

    Raises :class:`CheckpointError` (and writes nothing, so the previous checkpoints stay the last good ones) when
    a floating-point tensor anywhere in it (weights, buffers, optimizer state, an averaged model in ``meta``)
    holds NaN or inf: a non-finite checkpoint is never written.
    """
    meta = dict(meta or {})
    meta.setdefault("rng", collect_rng_state())
    meta.setdefault("densedet_version", _densedet_version())
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


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``; errors name the file and the likely cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: cannot load with weights_only=True ({e}). The file is corrupt, or it holds pickled Python "
            f"objects beyond tensors and plain data; DenseDet never unpickles arbitrary objects.") from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read checkpoint, the file is truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found a {type(obj).__name__}")
    return obj


def extract_state_dict(ckpt: Mapping[str, Any], source: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: its ``state_dict`` (or timm/official ``model``) entry, or the dict itself."""
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        state = dict(ckpt["state_dict"])
    elif "model" in ckpt and isinstance(ckpt["model"], Mapping):
        state = dict(ckpt["model"])
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = dict(ckpt)
    else:
        raise CheckpointError(f"{source}: no 'state_dict' in the checkpoint (keys: {sorted(ckpt)[:_MAX_LISTED]})")
    # Weights saved from a DDP-wrapped model by other tools carry a 'module.' prefix on every key.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


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


# ------------------------------------------------------------------------------------------------- work_dir files
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pth$")


def mark_last_checkpoint(work_dir: str | Path, ckpt_path: str | Path) -> None:
    """Record ``ckpt_path`` in ``work_dir/last_checkpoint`` (atomically; relative to work_dir when inside it)."""
    work_dir, ckpt_path = Path(work_dir), Path(ckpt_path)
    try:
        name = str(ckpt_path.resolve().relative_to(work_dir.resolve()))
    except ValueError:
        name = str(ckpt_path.resolve())
    _atomic_write_text(work_dir / LAST_CHECKPOINT_FILE, name + "\n")


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The checkpoint named by ``work_dir/last_checkpoint``, else the newest ``*.pth`` there, else ``None``."""
    work_dir = Path(work_dir)
    marker = work_dir / LAST_CHECKPOINT_FILE
    if marker.is_file():
        name = marker.read_text().strip()
        if name:
            cand = Path(name) if Path(name).is_absolute() else work_dir / name
            if cand.is_file():
                return cand
            logger.warning("%s names %s, which does not exist; looking for other checkpoints", marker, cand)
    ckpts = [p for p in work_dir.glob("*.pth") if not p.name.startswith(".")]
    if not ckpts:
        return None
    return max(ckpts, key=lambda p: (p.stat().st_mtime_ns, p.name))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint to test or predict with: ``path`` itself when it is a file, and for a training work dir its
    ``swa_final.pth`` (a finished SWA run: the averaged weights are the model) or else :func:`latest_checkpoint`.

    ``densedet test/predict`` and :class:`densedet.Predictor` all resolve through this function. Raises
    :class:`CheckpointNotFoundError` naming ``path`` when it is neither a file nor a work dir with a checkpoint.
    """
    from densedet.engine.swa import SWA_FINAL  # swa imports this module

    p = Path(path)
    if p.is_dir():
        swa = p / SWA_FINAL
        if swa.is_file():
            return swa
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointNotFoundError(f"{p}: no checkpoint in this work dir (no {LAST_CHECKPOINT_FILE}, no *.pth)")
        return found
    if not p.is_file():
        raise CheckpointNotFoundError(f"{p}: no such checkpoint file or work dir")
    return p


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
def load_for_finetune(model: nn.Module, source: str | Path, config_name: str | None = None,
                      prior_prob: float = 0.01) -> dict[str, list]:
    """``runtime.load_from``: load ``source`` (a path, ``zoo`` or ``zoo:NAME``) into ``model`` for fine-tuning.

    Every tensor whose name and shape match is loaded. The head's classification layer (``bbox_head.classifier()``)
    that does not fit (a checkpoint trained with another ``num_classes``) is re-initialised as a fresh head's:
    weight ~ Normal(0, 0.01), bias at the focal prior ``-log((1 - p) / p)`` (Lin et al. 2017, sec. 4.1), and the
    re-initialised parameters are logged and returned under ``"reinitialised"``. Any other mismatch keeps the
    model's own initialisation and is listed in the warning of :func:`load_model_weights`.
    """
    import math

    if isinstance(source, str) and (source == "zoo" or source.startswith("zoo:")):
        from densedet.zoo import resolve_weights

        source = resolve_weights(source, config_name)
    report = load_model_weights(model, source, strict=False)
    target = unwrap_model(model)
    head = getattr(target, "bbox_head", None)
    classifier = head.classifier() if head is not None and hasattr(head, "classifier") else None
    prefix = next((f"{n}." for n, m in target.named_modules() if m is classifier), None)
    mismatched = {k for k, _, _ in report["mismatched"]}
    reinit = []
    if classifier is not None and prefix is not None and any(k.startswith(prefix) for k in mismatched):
        with torch.no_grad():
            nn.init.normal_(classifier.weight, 0.0, 0.01)
            if classifier.bias is not None:
                nn.init.constant_(classifier.bias, float(-math.log((1 - prior_prob) / prior_prob)))
        reinit = [f"{prefix}{k}" for k, _ in classifier.named_parameters()]
        logger.info("%s: re-initialised %s for %s outputs (the checkpoint's class count differs; bias at the "
                    "focal prior %.2f)", source, ", ".join(reinit), classifier.weight.shape[0], prior_prob)
    report["reinitialised"] = reinit
    return report
