"""The one reader of weight files: checkpoints are read without ever executing code from them.

Every file is read with ``torch.load(weights_only=True)``. Released MMDetection checkpoints carry a ``meta``
dict that may pickle objects safe loading refuses (``mmcv.Config``, numpy scalars of old versions ...). Instead
of falling back to unsafe loading, :func:`load_checkpoint_file` registers an inert placeholder class under each
refused name and tries again: the placeholder only stores the pickled arguments and state, so nothing from the
file runs, the tensors load, and the names of the refused objects are reported. :func:`load_checkpoint` returns a
checkpoint dict with those placeholders replaced by their names; :func:`extract_state_dict` finds its tensors.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from densedet.errors import CheckpointError, CheckpointNotFoundError

__all__ = ["RefusedObject", "extract_state_dict", "load_checkpoint", "load_checkpoint_file", "strip_refused"]

_MAX_LISTED = 10


class RefusedObject:
    """Stands in for an object whose class safe loading refused. Holds the raw pickled arguments/state only."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<refused {self.qualname}>"


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def load_checkpoint_file(path: str | Path, map_location: str | torch.device = "cpu",
                         max_refused: int = 64) -> tuple[Any, list[str]]:
    """``torch.load(path, weights_only=True)``, tolerating refused globals as inert placeholders.

    Returns:
        ``(obj, refused)``: the loaded object and the dotted names of the globals that were replaced.
    Raises:
        CheckpointError naming the file when it is missing, truncated or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: checkpoint file not found")
    refused: list[str] = []
    stubs: list[tuple[type, str]] = []
    while True:
        try:
            with torch.serialization.safe_globals(stubs):
                return torch.load(path, map_location=map_location, weights_only=True), refused
        except pickle.UnpicklingError as e:
            match = _GLOBAL_RE.search(str(e))
            if match is None or len(refused) >= max_refused or match.group(1) in refused:
                raise CheckpointError(f"{path}: cannot be read safely: {str(e).splitlines()[0]}") from None
            name = match.group(1)
            refused.append(name)
            stubs.append((type(name.rsplit(".", 1)[-1], (RefusedObject,), {"qualname": name}), name))
        except OSError as e:  # permission denied, a folder, an I/O error: say so, not "corrupt"
            raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from None
        except Exception as e:  # a corrupt pickle stream raises anything (KeyError, IndexError, ...)
            raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def strip_refused(obj: Any) -> Any:
    """Copy of ``obj`` with every :class:`RefusedObject` replaced by its name (so the result saves safely)."""
    if isinstance(obj, RefusedObject):
        return f"<refused {obj.qualname}>"
    if isinstance(obj, dict):
        return {k: strip_refused(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(strip_refused(v) for v in obj) if isinstance(obj, list) else tuple(strip_refused(v)
                                                                                             for v in obj)
    return obj


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu",
                    allow_refused: bool = False) -> dict[str, Any]:
    """A checkpoint dict read safely (:func:`load_checkpoint_file`). Errors name the file and the likely cause.

    ``allow_refused``: accept objects safe loading refuses (replaced by their names, ``"<refused mmcv.Config>"``),
    as released MMDetection files need; by default such a file is an error, since DenseDet's own checkpoints hold
    only tensors and plain data.
    """
    obj, refused = load_checkpoint_file(path, map_location=map_location or "cpu")
    if refused and not allow_refused:
        raise CheckpointError(
            f"{path}: cannot load with weights_only=True: it holds pickled Python objects ({', '.join(refused)}) "
            f"beyond tensors and plain data. DenseDet never unpickles arbitrary objects; a released MMDetection "
            f"checkpoint is read with `densedet convert`.")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found a {type(obj).__name__}")
    return strip_refused(obj) if refused else obj


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
