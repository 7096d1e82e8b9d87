"""Run an exported DenseDet ONNX file in onnxruntime."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from densedet.errors import ConfigError

__all__ = ["OnnxDetector", "OnnxRuntimeModel", "is_onnx_path", "load_onnx_model"]


class OnnxDetector:
    """An onnxruntime session of a file written by :func:`densedet.deploy.export`.

    ``run(images)``: ``images`` (B, 3, H, W) uint8 (or float 0..255) RGB at network resolution -> dict of numpy
    arrays named as the graph's outputs (``boxes``, ``scores``, ``labels``, ``num_dets`` with NMS). A static graph
    needs exactly its traced input shape (:attr:`input_shape`, ints) ; a dynamic one has strings there.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from densedet.deploy.onnx_export import require_export_deps

        require_export_deps(("onnxruntime",))
        import onnxruntime as ort

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        opts = ort.SessionOptions()
        n = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if n > 0:
            opts.intra_op_num_threads = n
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape: list[Any] = list(inp.shape)
        self.output_names = [o.name for o in self.session.get_outputs()]
        names = self.session.get_modelmeta().custom_metadata_map.get("densedet.classes")
        self.classes: list[str] | None = json.loads(names) if names else None  # written by export()

    @property
    def dynamic(self) -> bool:
        return not all(isinstance(s, int) for s in self.input_shape[2:])

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8:
            images = images.astype(np.uint8)
        outs = self.session.run(None, {self.input_name: images})
        return dict(zip(self.output_names, outs))


class OnnxRuntimeModel(nn.Module):
    """An exported file behind the eager detector's inference interface, for :class:`~densedet.inference.predictor.
    Predictor`, ``densedet test`` and :func:`densedet.engine.evaluate`.

    ``forward(images, targets=None, metas, mode="predict")``: ``images`` (B, 3, Hp, Wp) *normalised*, padded as the
    data pipeline and collate make them; each image is un-normalised back to its pixels (exact for uint8 sources:
    the round trip is within 1e-4 of the integer), cropped to its ``img_shape``, run through the graph, and its boxes
    are clipped to ``img_shape`` and divided by ``scale_factor`` -> per image ``{"boxes" (D, 4) xyxy original
    pixels, "scores" (D,), "labels" (D,)}``, as the eager ``mode="predict"``.

    A graph with a ``masks`` output (Mask R-CNN) adds ``"masks"``: its 28x28 probabilities pasted into the rescaled
    boxes of the original image (``ori_shape``) with the eager model's box-only paste at ``mask_thr``
    (:func:`~densedet.deploy.onnx_export.paste_onnx_masks`) -> :class:`~densedet.structures.masks.InstanceMasks`.

    A static graph gets each image zero-padded (in pixels) to its input size: detections then can differ from eager
    near the padding (the eager model pads after normalising); export with ``--dynamic`` for exact results.
    """

    def __init__(self, path: str | Path, mean: Sequence[float], std: Sequence[float], to_rgb: bool = True,
                 num_classes: int | None = None, threads: int | None = None, mask_thr: float = 0.5) -> None:
        super().__init__()
        self.session = OnnxDetector(path, threads)
        if "num_dets" not in self.session.output_names:
            raise ValueError(f"{path}: exported with --no-nms; predict/test need the graph with NMS")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.to_rgb = to_rgb
        self.num_classes = num_classes
        self.classes = self.session.classes
        self.path = Path(path)
        self.mask_thr = float(mask_thr)

    def forward(self, images: Any, targets: Any = None, metas: list[dict[str, Any]] | None = None,
                mode: str = "predict") -> list[dict[str, torch.Tensor]]:
        if mode != "predict":
            raise ValueError(f"an ONNX model only predicts (mode='predict'), got mode={mode!r}; test-time "
                             "augmentation is not in the exported graph (use --no-tta)")
        pixels = images.float().cpu() * self.std + self.mean
        if not self.to_rgb:  # the pipeline swapped RGB -> BGR before normalising; the graph takes RGB
            pixels = pixels.flip(1)
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
                    raise ValueError(f"{self.path}: an image resized to {h}x{w} does not fit the static graph's "
                                     f"{gh}x{gw} input; export with --dynamic (or a larger --size)")
                x = torch.nn.functional.pad(x, (0, gw - w, 0, gh - h))
            res = self.session.run(x[None].numpy())
            n = int(res["num_dets"][0])
            boxes = torch.from_numpy(res["boxes"][0, :n].copy())
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            sw, sh = meta.get("scale_factor", (1.0, 1.0))[:2]
            det = {"boxes": boxes / boxes.new_tensor([sw, sh, sw, sh]),
                   "scores": torch.from_numpy(res["scores"][0, :n].copy()),
                   "labels": torch.from_numpy(res["labels"][0, :n].copy())}
            if "masks" in res:  # Mask R-CNN: paste into the original image, as the eager predict(rescale=True)
                from densedet.deploy.onnx_export import paste_onnx_masks

                oh, ow = (int(v) for v in meta.get("ori_shape", meta["img_shape"])[:2])
                det["masks"] = paste_onnx_masks(res["masks"][0, :n], det["boxes"].numpy(), oh, ow, self.mask_thr)
            out.append(det)
        return out

    # The eager detector's inference options do not apply to a compiled graph.
    def use_channels_last(self, enable: bool = True) -> OnnxRuntimeModel:
        return self

    def set_precision(self, precision: str) -> OnnxRuntimeModel:
        if precision != "fp32":
            raise ConfigError("the ONNX model runs as exported (fp32); drop --precision", path="runtime.precision")
        return self

    def fuse(self) -> OnnxRuntimeModel:
        return self

    def set_compile(self, enable: bool = True) -> OnnxRuntimeModel:
        if enable:
            raise ConfigError("the ONNX model runs in onnxruntime, which optimises it itself; drop --compile",
                              path="runtime.compile")
        return self


def is_onnx_path(path: str | Path | None) -> bool:
    return path is not None and str(path).lower().endswith(".onnx")


def load_onnx_model(cfg: Any, checkpoint: str | Path | None) -> OnnxRuntimeModel:
    """An :class:`OnnxRuntimeModel` for ``cfg`` from an ``.onnx`` file, or from a PyTorch checkpoint exported now
    (dynamic height/width, into a temporary folder)."""
    from densedet.deploy.onnx_export import export, normalize_params

    if not is_onnx_path(checkpoint):
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="densedet_onnx_"))
        checkpoint = export(cfg, checkpoint, tmp / "model.onnx", dynamic=True, check=False).path
    mean, std, to_rgb = normalize_params(cfg)
    model = cfg.model
    if "roi_head" in model:  # two-stage: the R-CNN stage holds the classes and the mask threshold
        num_classes = int(model["roi_head"]["bbox_head"].get("num_classes", 80))
        mask_thr = float(((model.get("test_cfg") or {}).get("rcnn") or {}).get("mask_thr_binary", 0.5))
    else:
        num_classes, mask_thr = int(model["bbox_head"]["num_classes"]), 0.5
    return OnnxRuntimeModel(checkpoint, mean, std, to_rgb, num_classes=num_classes, mask_thr=mask_thr)
