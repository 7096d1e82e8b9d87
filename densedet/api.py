"""Python entry points that take a config: ``build_model`` by config name (timm-style) and ``export`` to ONNX.

Both are thin: ``build_model`` builds (and optionally loads) a trainable model; ``export`` loads the detector with
:func:`densedet.inference.load_detector`, exports it with :func:`densedet.deploy.export_detector` and checks the file
in onnxruntime.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densedet.config import Config, load_config
from densedet.config.own_data import class_count_keys
from densedet.data.image_io import read_image
from densedet.data.synth import make_synthetic_coco
from densedet.data.transforms import build_pipeline
from densedet.data.tta import find_tta, tta_pipeline
from densedet.deploy.onnx_export import ExportResult, check_onnx, export_detector
from densedet.errors import PathError
from densedet.inference.loading import load_detector, resolve_weights_path
from densedet.io import ensure_writable_dir
from densedet.models.build import build_detector
from densedet.weights import load_checkpoint, load_model_weights

__all__ = ["build_model", "check_export_target", "default_check_image", "default_size", "export"]


def build_model(name_or_path: str | Path, checkpoint: str | Path | None = None, pretrained_backbone: bool = False,
                **overrides: Any) -> nn.Module:
    """Build the detector of a built-in config name or a YAML path.

    Args:
        checkpoint: a DenseDet (or converted MMDetection) checkpoint to load with ``strict=True``, a training work
            dir (its checkpoint as :func:`densedet.weights.resolve_checkpoint` picks it) or ``zoo:NAME``.
        pretrained_backbone: load the backbone's ``pretrained`` weights named in the config (off by default, as
            timm's ``pretrained=False``; a checkpoint holds every weight anyway).
        overrides: model keys, ``num_classes=3`` as a shorthand for the classes of every class-dependent head (a
            two-stage model's box and mask heads too), other keys as paths below ``model`` with ``__`` for ``.``
            (``backbone__depth=18``), or dotted keys passed with ``**{...}``.
    Returns:
        the detector in train mode (call ``.eval()`` for inference; :func:`densedet.inference.load_detector` gives
        one ready for it). It takes ``(B, 3, H, W)`` uint8 pixels and normalises them itself.
    """
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
        path = resolve_weights_path(checkpoint, cfg.name)
        load_model_weights(model, load_checkpoint(path), strict=True, source=str(path))
    return model


def _num_classes_keys(name_or_path: str | Path) -> list[str]:
    """Where a config keeps its class count: the dense head's, or the RoI head's box and mask heads'."""
    return class_count_keys(load_config(name_or_path, validate_model=False).model)


def default_size(cfg: Config) -> tuple[int, int]:
    """(H, W) for a static export: the test Resize scale, short side x long side, rounded up to size_divisor."""
    d = max(1, int(cfg.data.size_divisor or 1))
    for step in tta_pipeline(cfg.data.val.pipeline, False):
        if step.get("type") == "Resize" and step.get("img_scale") is not None:
            scale = step["img_scale"]
            scale = scale[0] if isinstance(scale[0], (list, tuple)) else scale
            h, w = min(scale), max(scale)
            return (-(-int(h) // d) * d, -(-int(w) // d) * d)
    return (800, 1344)


def default_check_image(cfg: Config) -> np.ndarray:
    """The first image of the config's val set if it is on disk, else a rendered synthetic-shapes image."""
    folder = Path(cfg.data.root) / (cfg.data.val.img_dir or "")
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if files:
            return read_image(files[0])
    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_coco(tmp, num_train=0, num_val=1, size=320, seed=0)
        return read_image(next(iter(sorted((Path(tmp) / "val").iterdir()))))


def _graph_input(image: np.ndarray, size: tuple[int, int] | None, cfg: Config) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, h, w) uint8 graph input: to ``size`` (static graphs) or by the test pipeline's
    Resize (dynamic graphs)."""
    if size is None:
        steps = [s for s in tta_pipeline(cfg.data.val.pipeline, False) if s.get("type") == "Resize"]
        h, w = image.shape[:2]
        sample = {"img": image, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int64),
                  "ignore_boxes": np.zeros((0, 4), np.float32),
                  "meta": {"image_id": -1, "ori_shape": (h, w), "img_shape": (h, w), "scale_factor": (1.0, 1.0),
                           "flip": False}}
        out = build_pipeline(steps, "data.val.pipeline")(sample)["img"]
        return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1)[None]).astype(np.uint8)
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


def check_export_target(out: Path) -> None:
    """A :class:`~densedet.errors.PathError` (exit 2) when ``out`` cannot be written: its folder is not writable
    (created if missing), or ``out`` is a folder."""
    if out.is_dir():
        raise PathError(f"--out {out} is a folder; give the .onnx file to write (e.g. {out / 'model.onnx'})")
    ensure_writable_dir(out.parent, "the folder of --out", "Choose another --out")


def export(config: str | Path | Config, checkpoint: str | Path | None = None, out: str | Path = "model.onnx", *,
           nms: bool = True, dynamic: bool = False, size: tuple[int, int] | None = None, batch: int = 1,
           max_det: int | None = None, overrides: list[str] | None = None, check: bool = True,
           check_image: str | Path | np.ndarray | None = None) -> ExportResult:
    """Export a detector (one- or two-stage) to ONNX (opset 19) and check it in onnxruntime.

    Args:
        config: built-in config name, YAML path or :class:`Config`; checkpoint: weights (strict; a file, a work
            dir or ``zoo:NAME``), None = random.
        out: the .onnx file to write; its folder must be writable, which is checked (a
            :class:`~densedet.errors.PathError`) before anything is loaded or exported.
        nms: graph with NMS and fixed-shape outputs ``boxes (B, max_det, 4)``, ``scores (B, max_det)``, ``labels
            (B, max_det)`` (-1 padding), ``num_dets (B,)`` (and ``masks`` for Mask R-CNN); False: pre-NMS
            candidates ``boxes, scores, labels`` (dense heads).
        dynamic: dynamic batch, height and width (the graph is traced at ``size`` and a batch of
            ``max(batch, 2)``).
        size: (H, W) input size (default: the config's test scale, rounded up to ``data.size_divisor``; dynamic
            graphs are traced at 320x448 - pick a non-square size whose levels stay > 1 if you give one).
        max_det: detections per image (default ``test_cfg.max_per_img``).
        check / check_image: run the file in onnxruntime on an image (default: the first val image, or a
            synthetic one) and compare with eager PyTorch (boxes within 1e-3 relative, same labels; pasted masks of
            matched detections with IoU >= 0.99).

    Returns:
        :class:`~densedet.deploy.onnx_export.ExportResult` (``summary()`` prints what was written and the check).
    """
    out = Path(out)
    check_export_target(out)  # before the export's minutes of work, not after
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    model = load_detector(cfg, checkpoint, device="cpu", precision="fp32", compile=False, backend="eager")
    h, w = size or ((320, 448) if dynamic else default_size(cfg))
    result, deploy = export_detector(model, out, (h, w), nms=nms, dynamic=dynamic, batch=batch, max_det=max_det,
                                     classes=model.classes)
    if find_tta(cfg.data.val.pipeline) is not None:
        result.notes.append("the config tests with MultiScaleFlipAug (TTA); the graph runs one view at the input size")
    if check and nms:
        image = check_image if isinstance(check_image, np.ndarray) else (
            read_image(check_image) if check_image is not None else default_check_image(cfg))
        result.check = check_onnx(result.path, deploy, _graph_input(image, None if dynamic else (h, w), cfg))
        result.check["image"] = str(check_image) if isinstance(check_image, (str, Path)) else "the check image"
    return result
