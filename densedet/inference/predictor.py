"""Run a trained detector on images: paths, PIL images or (H, W, 3) uint8 RGB arrays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from densedet.config import Config, load_config
from densedet.data.collate import collate
from densedet.data.image_io import decode_image, to_rgb8
from densedet.data.transforms import build_pipeline
from densedet.data.tta import tta_pipeline
from densedet.models.build import build_detector

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: str | Path) -> list[Path]:
    """An image file, or every image in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image or folder")
    return [path]


def read_image(image: str | Path | Image.Image | np.ndarray) -> np.ndarray:
    """Any supported input -> (H, W, 3) uint8 RGB array in the frame the user sees.

    A path and a PIL image are turned upright by their EXIF orientation tag (``ImageOps.exif_transpose``, as image
    viewers and :class:`~densedet.data.CocoDataset` do), so the same photo gives the same array either way; the
    caller's PIL image is not modified. A numpy array (or anything ``np.asarray`` takes, e.g. a CPU tensor) carries
    no EXIF and is taken as-is: it must already be upright, ``(H, W, 3)`` uint8 RGB.
    """
    if isinstance(image, (str, Path)):
        return decode_image(image)  # the dataset's decoder: same pixels (16-bit scaled, EXIF applied)
    if isinstance(image, Image.Image):
        return to_rgb8(ImageOps.exif_transpose(image))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"an image array must be (H, W, 3) uint8 RGB, got {arr.shape} {arr.dtype}")
    return arr


class Predictor:
    """Detector + test pipeline + class names.

    ``Predictor("atss_r18_fpn_synth", "work_dirs/demo")(images)`` returns, per image, a dict with ``boxes`` (K, 4)
    xyxy in that image's pixels, ``scores`` (K,), ``labels`` (K,) and ``class_names`` (K names); a Mask R-CNN
    adds ``masks`` (:class:`~densedet.structures.masks.InstanceMasks`, box-cropped, in that image's pixels).

    ``checkpoint`` is a checkpoint file or a training work dir, resolved as ``densedet test/predict`` do
    (:func:`densedet.engine.checkpoint.resolve_checkpoint`: the SWA average of a finished SWA run, else the latest
    checkpoint); ``None`` keeps the freshly initialised weights. Images are paths, PIL images or ``(H, W, 3)``
    uint8 RGB arrays; paths and PIL images are turned upright by their EXIF orientation first, arrays are taken
    as-is (:func:`read_image`), and boxes are in the pixels of that upright image, the frame the user sees.

    Test-time augmentation follows the config's ``data.val.pipeline`` (a ``MultiScaleFlipAug`` there merges its
    views' detections); ``tta=False`` tests at its first scale only, ``tta=True`` adds horizontal-flip TTA to a
    plain pipeline (:func:`densedet.data.tta.tta_pipeline`).

    ``fuse`` folds BatchNorm into convs (same detections to float rounding); ``precision`` ``'bf16'`` runs
    backbone/neck/head under bfloat16 autocast with decoding and NMS in float32 (default ``runtime.precision``).
    ``backend``: ``'onnxruntime'`` runs an exported file (``checkpoint`` ending in ``.onnx``, or a ``.pth`` exported
    on the fly); ``'auto'`` picks it for ``.onnx`` paths (:class:`densedet.deploy.runtime.OnnxRuntimeModel`).
    ``compile`` runs backbone/neck/head through ``torch.compile`` (default ``runtime.compile``; single-stage
    detectors; the first image of each new padded size compiles: see :mod:`densedet.models.compile`).
    """

    def __init__(self, config: str | Path | Config, checkpoint: str | Path | None = None, device: str = "auto",
                 score_thr: float | None = None, classes: Sequence[str] | None = None,
                 overrides: list[str] | None = None, tta: bool | None = None, precision: str | None = None,
                 fuse: bool = True, backend: str = "auto", compile: bool | None = None) -> None:
        from densedet.engine.checkpoint import load_checkpoint, load_model_weights, resolve_checkpoint

        self.cfg = config if isinstance(config, Config) else load_config(config, overrides)
        self.checkpoint: Path | None = resolve_checkpoint(checkpoint) if checkpoint is not None else None
        model_cfg = dict(self.cfg.model)
        model_cfg["backbone"] = {**model_cfg["backbone"], "pretrained": None}  # the checkpoint has all weights
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        from densedet.deploy.runtime import is_onnx_path

        if backend not in ("auto", "eager", "onnxruntime"):
            raise ValueError(f"backend must be auto, eager or onnxruntime, got {backend!r}")
        meta: dict[str, Any] = {}
        if backend == "onnxruntime" or (backend == "auto" and is_onnx_path(self.checkpoint)):
            from densedet.deploy.runtime import load_onnx_model

            # an exported graph (a .pth file is exported first)
            self.model = load_onnx_model(self.cfg, self.checkpoint)
            self.device, tta, fuse = torch.device("cpu"), False, False
            meta = {"classes": self.model.classes} if self.model.classes else {}
        else:
            self.model = build_detector(model_cfg, init=self.checkpoint is None)
        if self.checkpoint is not None and not hasattr(self.model, "session"):
            ckpt = load_checkpoint(self.checkpoint)
            load_model_weights(self.model, ckpt, strict=True, source=str(self.checkpoint))
            meta = ckpt.get("meta", {}) or {}
        self.model.to(self.device).eval()
        self.model.use_channels_last(self.cfg.runtime.channels_last)
        # inference speed-ups that keep the detections: BN folding, and bf16 autocast if asked (runtime.precision)
        self.model.set_precision(precision or self.cfg.runtime.precision)
        if fuse:
            self.model.fuse()
        self.model.set_compile(self.cfg.runtime.compile if compile is None else compile)  # after fuse: frozen weights
        if score_thr is not None and hasattr(self.model, "session"):
            raise ValueError("score_thr is part of an exported graph: export with model.test_cfg.score_thr=...")
        if score_thr is not None:
            head = getattr(self.model, "roi_head", None) or self.model.bbox_head  # two-stage: the R-CNN stage
            head.test_cfg.score_thr = score_thr
        n = int(self.model.num_classes)
        names = list(classes or meta.get("classes") or [f"class_{i}" for i in range(n)])
        if len(names) != n:
            raise ValueError(f"{len(names)} class names for a model with {n} classes")
        self.classes = names
        self.pipeline = build_pipeline(tta_pipeline(self.cfg.data.val.pipeline, tta), "data.val.pipeline")
        self.size_divisor = self.cfg.data.size_divisor

    def preprocess(self, images: Sequence[Any]) -> dict[str, Any]:
        samples = []
        for img in images:
            arr = read_image(img)
            h, w = arr.shape[:2]
            sample = {"img": arr, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int64),
                      "ignore_boxes": np.zeros((0, 4), np.float32),
                      "meta": {"image_id": -1, "ori_shape": (h, w), "img_shape": (h, w), "scale_factor": (1.0, 1.0),
                               "flip": False}}
            sample = self.pipeline(sample)
            views = [self._to_tensors(v) for v in sample["views"]] if "views" in sample else None
            samples.append({"views": views} if views is not None else self._to_tensors(sample))
        return collate(samples, self.size_divisor)

    @staticmethod
    def _to_tensors(sample: dict[str, Any]) -> dict[str, Any]:
        img_t = sample["img"]
        if isinstance(img_t, np.ndarray):
            img_t = torch.from_numpy(np.ascontiguousarray(img_t.transpose(2, 0, 1))).float()
        return {"img": img_t, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "ignore_boxes": torch.zeros(0, 4), "meta": sample["meta"]}

    @torch.no_grad()
    def __call__(self, images: Any, batch_size: int = 4) -> list[dict[str, Any]]:
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        out: list[dict[str, Any]] = []
        for i in range(0, len(items), batch_size):
            batch = self.preprocess(items[i:i + batch_size])
            if "views" in batch:  # test-time augmentation
                dets = self.model([v["images"].to(self.device) for v in batch["views"]],
                                  metas=[v["metas"] for v in batch["views"]], mode="predict_aug")
            else:
                dets = self.model(batch["images"].to(self.device), metas=batch["metas"], mode="predict")
            for d in dets:
                d = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in d.items()}
                d["class_names"] = [self.classes[int(c)] for c in d["labels"]]
                out.append(d)
        return out[0] if single else out
