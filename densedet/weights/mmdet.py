"""MMDetection checkpoint compatibility.

DenseDet's parameter names are MMDetection's (``backbone.layer1.0.conv1.weight``, ``neck.fpn_convs.0.conv.weight``,
``bbox_head.atss_cls.weight`` ...), so a released checkpoint's ``state_dict`` loads with ``strict=True`` as it is.
:func:`convert_mmdet_checkpoint` only unwraps it (``state_dict`` / ``model`` / ``module.`` prefixes), drops
optimizer state, applies an optional key map, and records where it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from densedet.errors import CheckpointError
from densedet.io import atomic_torch_save
from densedet.weights.files import extract_state_dict, load_checkpoint_file, strip_refused
from densedet.weights.state_dict import load_model_weights


def convert_mmdet_checkpoint(src: str | Path, dst: str | Path, key_map: dict[str, str] | None = None,
                             model: nn.Module | None = None) -> dict[str, Any]:
    """Convert a released MMDetection checkpoint into a DenseDet checkpoint file.

    Args:
        key_map: ``{old_prefix: new_prefix}`` renames applied to every key that starts with ``old_prefix``.
        model: when given, the converted weights must load into it with ``strict=True`` *before* ``dst`` is
            written; otherwise :class:`CheckpointError` names ``src`` and the mismatch, and no file is written.
    Returns:
        a report ``{"num_tensors", "refused_meta", "classes", "dst"}``; refused meta objects are listed, not loaded.
    """
    obj, refused = load_checkpoint_file(src)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{src}: expected a checkpoint dict, found a {type(obj).__name__}")
    state = extract_state_dict(obj, str(src))
    if key_map:
        renamed = {}
        for k, v in state.items():
            for old, new in key_map.items():
                if k.startswith(old):
                    k = new + k[len(old):]
                    break
            renamed[k] = v
        state = renamed
    meta_in = obj.get("meta", {}) if isinstance(obj, dict) else {}
    meta_in = strip_refused(meta_in) if isinstance(meta_in, dict) else {}
    classes = meta_in.get("CLASSES") or meta_in.get("classes")
    meta = {"converted_from": str(src), "refused_meta": refused,
            "classes": list(classes) if isinstance(classes, (list, tuple)) else None,
            "source_meta_keys": sorted(str(k) for k in meta_in)}
    if model is not None:
        load_model_weights(model, {"state_dict": state}, strict=True, source=f"{src} (converted)")
    atomic_torch_save({"state_dict": state, "meta": meta}, dst)
    return {"num_tensors": len(state), "refused_meta": refused, "classes": meta["classes"], "dst": str(dst)}
