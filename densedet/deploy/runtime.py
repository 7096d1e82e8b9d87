"""Run an exported DenseDet ONNX file in onnxruntime (the optional ``densedet[export]`` dependencies)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from densedet.errors import CheckpointError, CheckpointNotFoundError, ConfigError, os_error_reason
from densedet.models.roi_heads import paste_masks_in_boxes
from densedet.structures.masks import InstanceMasks

EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
EXPORT_INSTALL_HINT = "pip install 'densedet[export]'   (that is: pip install onnx onnxscript onnxruntime)"


class ExportDependencyError(ConfigError, ImportError):
    """An optional export dependency is missing; the message says what to install (a config error: exit 2)."""


def require_export_deps(packages: tuple[str, ...] = EXPORT_PACKAGES) -> None:
    """Raise :class:`ExportDependencyError` naming the missing packages and the install command."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportDependencyError(f"ONNX export needs {', '.join(missing)}, not installed. Install with:\n  "
                                    f"{EXPORT_INSTALL_HINT}")

__all__ = ["EXPORT_INSTALL_HINT", "ExportDependencyError", "OnnxDetector", "OnnxRuntimeModel", "is_onnx_path",
           "paste_onnx_masks", "require_export_deps"]


class OnnxDetector:
    """An onnxruntime session of a file written by :func:`densedet.deploy.export`.

    ``run(images)``: ``images`` (B, 3, H, W) uint8 (or float 0..255) RGB at network resolution -> dict of numpy
    arrays named as the graph's outputs (``boxes``, ``scores``, ``labels``, ``num_dets`` with NMS). A static graph
    needs exactly its traced input shape (:attr:`input_shape`, ints) ; a dynamic one has strings there.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        require_export_deps(("onnxruntime",))
        import onnxruntime as ort  # optional dependency (densedet[export])

        if not Path(path).is_file():
            raise CheckpointNotFoundError(f"{path}: no such ONNX file")
        opts = ort.SessionOptions()
        n = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if n > 0:
            opts.intra_op_num_threads = n
        try:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...) for a truncated or foreign file
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            inp = self.session.get_inputs()[0]
            names = self.session.get_modelmeta().custom_metadata_map.get("densedet.classes")
            classes = json.loads(names) if names else None  # written by export()
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            why = os_error_reason(e) if isinstance(e, OSError) else f"{type(e).__name__}: {first}"
            raise CheckpointError(f"{path}: not a readable ONNX model (truncated, or not a file written by `densedet "
                                  f"export`?): {why}") from e
        self.input_name = inp.name
        self.input_shape: list[Any] = list(inp.shape)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.classes: list[str] | None = classes

    @property
    def dynamic(self) -> bool:
        return not all(isinstance(s, int) for s in self.input_shape[2:])

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8:
            images = images.astype(np.uint8)
        outs = self.session.run(None, {self.input_name: images})
        return dict(zip(self.output_names, outs))


def paste_onnx_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float = 0.5) -> Any:
    """The graph's ``(D, 28, 28)`` mask probabilities of ``(D, 4)`` boxes (pixels of a ``height x width`` image)
    pasted into their boxes with DenseDet's own box-only paste (:func:`densedet.models.roi_heads.
    paste_masks_in_boxes`, as the eager model) -> :class:`~densedet.structures.masks.InstanceMasks`."""
    crops = paste_masks_in_boxes(torch.from_numpy(np.ascontiguousarray(masks)), torch.from_numpy(boxes), height, width,
                                 threshold) if len(boxes) else []
    return InstanceMasks(crops, height, width)


class OnnxRuntimeModel(nn.Module):
    """An exported file behind the inference interface of a detector (:class:`~densedet.models.detector.
    InferenceModel`), for :class:`~densedet.inference.Predictor`, ``densedet test`` and
    :func:`densedet.engine.evaluate`.

    ``forward(images, targets=None, metas, mode="predict")``: ``images`` (B, 3, Hp, Wp) uint8 pixels, padded as
    collate makes them; each image is cropped to its ``img_shape``, run through the graph (which normalises it
    itself), and its boxes are clipped to ``img_shape`` and divided by ``scale_factor`` -> per image ``{"boxes" (D,
    4) xyxy original pixels, "scores" (D,), "labels" (D,)}``, as the eager ``mode="predict"``.

    A graph with a ``masks`` output (Mask R-CNN) adds ``"masks"``: its 28x28 probabilities pasted into the rescaled
    boxes of the original image (``ori_shape``) with the eager model's box-only paste at ``mask_thr``
    (:func:`paste_onnx_masks`) -> :class:`~densedet.structures.masks.InstanceMasks`.

    A static graph gets each image zero-padded (in pixels) to its input size: detections then can differ from eager
    near the padding (the eager model pads after normalising); export with ``--dynamic`` for exact results.
    Test-time augmentation is not in an exported graph (``supports_tta`` is False).
    """

    supports_tta = False

    def __init__(self, path: str | Path, num_classes: int, threads: int | None = None,
                 mask_thr: float = 0.5) -> None:
        super().__init__()
        self.session = OnnxDetector(path, threads)
        if "num_dets" not in self.session.output_names:
            raise ConfigError(f"{path}: exported with --no-nms; predict/test need the graph with NMS",
                              path="checkpoint")
        self.num_classes = int(num_classes)
        self.classes = self.session.classes
        self.path = Path(path)
        self.mask_thr = float(mask_thr)
        self.score_thr = 0.0

    def set_score_thr(self, score_thr: float) -> OnnxRuntimeModel:
        """Keep the graph's detections scored above ``score_thr``; the graph's own ``score_thr`` (fixed at export)
        still applies below it."""
        self.score_thr = float(score_thr)
        return self

    def forward(self, images: Any, targets: Any = None, metas: list[dict[str, Any]] | None = None,
                mode: str = "predict") -> list[dict[str, Any]]:
        if mode != "predict":
            raise ConfigError(f"an ONNX model only predicts (mode='predict'), got mode={mode!r}; test-time "
                              "augmentation is not in the exported graph (use --no-tta)", path="mode")
        pixels = images.cpu()
        if pixels.dtype != torch.uint8:
            pixels = pixels.round().clamp(0, 255).to(torch.uint8)
        metas = metas or [{"img_shape": tuple(images.shape[-2:]), "scale_factor": (1.0, 1.0)}] * len(images)
        shape = self.session.input_shape
        out = []
        for img, meta in zip(pixels, metas):
            h, w = (int(v) for v in meta["img_shape"][:2])
            x = img[:, :h, :w]
            if not self.session.dynamic:
                gh, gw = int(shape[2]), int(shape[3])
                if h > gh or w > gw:
                    raise ConfigError(f"{self.path}: an image resized to {h}x{w} does not fit the static graph's "
                                      f"{gh}x{gw} input; export with --dynamic (or a larger --size)",
                                      path="checkpoint")
                x = torch.nn.functional.pad(x, (0, gw - w, 0, gh - h))
            res = self.session.run(x[None].numpy())
            n = int(res["num_dets"][0])
            n = int((res["scores"][0, :n] > self.score_thr).sum())  # sorted by score: a prefix
            boxes = torch.from_numpy(res["boxes"][0, :n].copy())
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            sw, sh = meta.get("scale_factor", (1.0, 1.0))[:2]
            det = {"boxes": boxes / boxes.new_tensor([sw, sh, sw, sh]),
                   "scores": torch.from_numpy(res["scores"][0, :n].copy()),
                   "labels": torch.from_numpy(res["labels"][0, :n].copy())}
            if "masks" in res:  # Mask R-CNN: paste into the original image, as the eager predict(rescale=True)
                oh, ow = (int(v) for v in meta.get("ori_shape", meta["img_shape"])[:2])
                det["masks"] = paste_onnx_masks(res["masks"][0, :n], det["boxes"].numpy(), oh, ow, self.mask_thr)
            out.append(det)
        return out


def is_onnx_path(path: str | Path | None) -> bool:
    return path is not None and str(path).lower().endswith(".onnx")
