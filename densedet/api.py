"""Python entry points: ``build_model`` by config name (timm-style) and the predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from densedet.config import load_config


def build_model(name_or_path: str | Path, checkpoint: str | Path | None = None, pretrained_backbone: bool = False,
                **overrides: Any) -> nn.Module:
    """Build the detector of a built-in config name or a YAML path.

    Args:
        checkpoint: a DenseDet (or converted MMDetection) checkpoint to load with ``strict=True``, or a training
            work dir (its checkpoint as :func:`densedet.engine.checkpoint.resolve_checkpoint` picks it).
        pretrained_backbone: load the backbone's ``pretrained`` weights named in the config (off by default, as
            timm's ``pretrained=False``; a checkpoint holds every weight anyway).
        overrides: model keys, ``num_classes=3`` as a shorthand for ``bbox_head.num_classes`` (two-stage models:
            ``roi_head.bbox_head.num_classes`` and ``roi_head.mask_head.num_classes``), other keys as paths
            below ``model`` with ``__`` for ``.`` (``backbone__depth=18``), or dotted keys passed with ``**{...}``.
    Returns:
        the detector in train mode (call ``.eval()`` for inference).
    """
    from densedet.models.build import build_detector

    ov: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "num_classes":
            for path in _num_classes_keys(name_or_path):
                ov[f"model.{path}"] = value
            continue
        key = key.replace("__", ".")
        ov[key if key.startswith("model.") else f"model.{key}"] = value
    if not pretrained_backbone:
        ov["model.backbone.pretrained"] = None
    cfg = load_config(name_or_path, ov)
    model = build_detector(cfg.model, init=checkpoint is None)
    if checkpoint is not None:
        from densedet.engine.checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint

        checkpoint = resolve_checkpoint(checkpoint)
        load_model_weights(model, load_checkpoint(checkpoint), strict=True, source=str(checkpoint))
    return model


def _num_classes_keys(name_or_path: str | Path) -> list[str]:
    """Where a config keeps its class count: the dense head's, or the RoI head's box and mask heads'."""
    model = load_config(name_or_path, validate_model=False).model
    roi = model.get("roi_head")
    if not isinstance(roi, dict):
        return ["bbox_head.num_classes"]
    return ["roi_head.bbox_head.num_classes"] + (["roi_head.mask_head.num_classes"] if roi.get("mask_head") else [])
