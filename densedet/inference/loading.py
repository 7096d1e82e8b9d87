"""``load_detector``: the one way a detector ready for inference is assembled from a config and its weights.

``Predictor``, ``densedet test`` / ``predict`` / ``export`` / ``bench`` / ``data check`` and the Python API all call
:func:`load_detector`, so every one of them accepts the same checkpoint forms (a file, a training work dir, ``zoo`` /
``zoo:NAME``, an exported ``.onnx``) and the same inference options (device, bf16, BatchNorm folding,
``torch.compile``, onnxruntime), for one- and two-stage detectors alike.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densedet.config import Config
from densedet.deploy.onnx_export import export_detector
from densedet.deploy.runtime import OnnxRuntimeModel, is_onnx_path
from densedet.errors import ConfigError
from densedet.models.build import build_detector
from densedet.weights import load_checkpoint, load_model_weights, resolve_checkpoint
from densedet.weights.zoo import fetch_zoo_weights

__all__ = ["BACKENDS", "choose_inference_device", "load_detector", "model_device", "resolve_weights_path"]

logger = logging.getLogger("densedet")

BACKENDS = ("auto", "eager", "onnxruntime")


def resolve_weights_path(checkpoint: str | Path, config_name: str | None = None) -> Path:
    """The file a checkpoint argument names: a file; a training work dir (its SWA average, else its latest
    checkpoint: :func:`densedet.weights.resolve_checkpoint`); ``zoo`` (the released weights of ``config_name``) or
    ``zoo:NAME`` (downloaded once into ``$DENSEDET_HOME``)."""
    text = str(checkpoint)
    if text == "zoo" or text.startswith("zoo:"):
        name = text.removeprefix("zoo").removeprefix(":") or config_name
        if not name:
            raise ConfigError("'zoo' needs a config name to look the weights up by (or use zoo:NAME)",
                              path="checkpoint")
        return fetch_zoo_weights(name)
    return resolve_checkpoint(checkpoint)


def choose_inference_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' requested but CUDA is not available", path="device")
    return torch.device(device)


def model_device(model: nn.Module) -> torch.device:
    """Where a loaded model runs: its parameters' device (an onnxruntime model has none: the CPU)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _model_cfg(cfg: Config) -> dict[str, Any]:
    # the checkpoint (or a random init) provides every weight: never fetch the backbone's ImageNet weights
    backbone = {**cfg.model["backbone"], "pretrained": None}
    if "init_cfg" in backbone:
        backbone["init_cfg"] = None
    return {**cfg.model, "backbone": backbone}


def load_detector(cfg: Config, checkpoint: str | Path | None = None, *, device: str | torch.device = "auto",
                  precision: str | None = None, fuse: bool = True, compile: bool | None = None,
                  backend: str = "auto", channels_last: bool | None = None) -> nn.Module:
    """The config's detector with ``checkpoint`` loaded (``strict=True``), in eval mode on ``device``, with the
    inference options applied; or, with the onnxruntime backend, an exported graph behind the same interface.

    Args:
        cfg: a loaded :class:`~densedet.config.Config`.
        checkpoint: a file, a training work dir, ``zoo`` / ``zoo:NAME`` (:func:`resolve_weights_path`), an
            ``.onnx`` file, or None (random initialisation: for timing, export tests, assignment analysis).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda[:N]``; the onnxruntime backend runs on the CPU.
        precision: ``fp32`` / ``bf16`` (default ``runtime.precision``): bf16 autocast of the network (and a second
            stage's heads); decoding, NMS and mask pasting stay float32.
        fuse: fold BatchNorm into convs (same detections to float rounding).
        compile: ``torch.compile`` the network (default ``runtime.compile``; decode and NMS stay eager).
        backend: ``eager``; ``onnxruntime`` (an ``.onnx`` file, or a PyTorch checkpoint exported now with dynamic
            shapes into a temporary folder); ``auto``: onnxruntime for ``.onnx`` files, else eager.
        channels_last: NHWC weights and activations (default ``runtime.channels_last``).

    Returns:
        a :class:`~densedet.models.detector.Detector`, or a :class:`~densedet.deploy.runtime.OnnxRuntimeModel`;
        both satisfy :class:`~densedet.models.detector.InferenceModel`, and both carry ``classes`` (the class
        names the weights' file stores, or None).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}", path="backend")
    path = resolve_weights_path(checkpoint, cfg.name) if checkpoint is not None else None
    precision = precision or cfg.runtime.precision
    compile = cfg.runtime.compile if compile is None else compile
    if backend == "onnxruntime" or (backend == "auto" and is_onnx_path(path)):
        return _load_onnx(cfg, path, precision, compile)
    model = build_detector(_model_cfg(cfg), init=path is None)
    classes = None
    if path is not None:
        if is_onnx_path(path):
            raise ConfigError(f"{path} is an exported ONNX file: run it with the onnxruntime backend",
                              path="backend")
        ckpt = load_checkpoint(path)
        names = (ckpt.get("meta") or {}).get("classes")
        classes = [str(c) for c in names] if names else None
        if classes and len(classes) != model.num_classes:
            # weights trained on other classes (`densedet train --data`, a fine-tune) run with their own class
            # count, as their file names them; the strict load below still checks every shape
            logger.info("%s holds %d class(es) (%s); the config's head has %d: sized from the checkpoint",
                        path.name, len(classes), ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else ""),
                        model.num_classes)
            model.reset_classifier(len(classes))
        load_model_weights(model, ckpt, strict=True, source=str(path))
    model.classes = classes
    model.to(choose_inference_device(device)).eval()
    model.use_channels_last(cfg.runtime.channels_last if channels_last is None else channels_last)
    model.set_precision(precision)
    if fuse:
        model.fuse()
    model.set_compile(compile)  # after fuse: the compiled graph freezes the weights it sees
    return model


def _load_onnx(cfg: Config, path: Path | None, precision: str, compile: bool) -> OnnxRuntimeModel:
    if precision != "fp32":
        raise ConfigError("the ONNX model runs as exported (fp32); drop --precision bf16", path="runtime.precision")
    if compile:
        raise ConfigError("the ONNX model runs in onnxruntime, which optimises it itself; drop --compile",
                          path="runtime.compile")
    with torch.device("meta"):  # class count and mask threshold from the config, no weights needed
        shape = build_detector(_model_cfg(cfg), init=False)
    if not is_onnx_path(path):  # a PyTorch checkpoint (or random weights): export it now, dynamic H and W
        eager = load_detector(cfg, path, device="cpu", backend="eager", precision="fp32", compile=False)
        tmp = Path(tempfile.mkdtemp(prefix="densedet_onnx_"))
        logger.info("exporting %s to %s for onnxruntime", path or "random weights", tmp / "model.onnx")
        result, _ = export_detector(eager, tmp / "model.onnx", (320, 448), dynamic=True, classes=eager.classes)
        path = result.path
    model = OnnxRuntimeModel(path, num_classes=shape.num_classes, mask_thr=shape.mask_thr_binary or 0.5)
    return model
