"""Run a trained detector on images: paths, PIL images or (H, W, 3) uint8 RGB arrays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densedet.config import Config, load_config
from densedet.data.collate import collate
from densedet.data.image_io import read_image
from densedet.data.transforms import build_pipeline
from densedet.data.tta import tta_pipeline
from densedet.errors import ConfigError, DataError, os_error_reason
from densedet.inference.loading import load_detector, model_device, resolve_weights_path

__all__ = ["IMAGE_SUFFIXES", "Predictor", "list_images", "read_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(path: str | Path) -> list[Path]:
    """An image file, or every image in a folder (sorted)."""
    path = Path(path)
    if path.is_dir():
        try:
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as e:  # e.g. a folder without read permission: a data error naming it
            raise DataError(f"{path}: cannot list the image folder: {os_error_reason(e)}") from e
        if not files:
            raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image or folder")
    return [path]


class Predictor:
    """Detector + test pipeline + class names.

    ``Predictor("atss_r18_fpn_synth", "work_dirs/demo")(images)`` returns, per image, a dict with ``boxes`` (K, 4)
    xyxy in that image's pixels, ``scores`` (K,), ``labels`` (K,) and ``class_names`` (K names); a Mask R-CNN
    adds ``masks`` (:class:`~densedet.structures.masks.InstanceMasks`, box-cropped, in that image's pixels).

    The detector comes from :func:`densedet.inference.load_detector` (``checkpoint``: a file, a training work dir,
    ``zoo`` / ``zoo:NAME`` or an exported ``.onnx``; ``None`` keeps random weights), with its inference options:
    ``fuse`` folds BatchNorm into convs, ``precision`` ``'bf16'`` runs the network under bfloat16 autocast with
    decoding, NMS and mask pasting in float32 (default ``runtime.precision``), ``compile`` runs it through
    ``torch.compile`` (default ``runtime.compile``), ``backend`` ``'onnxruntime'`` runs an exported file. Every
    option works for one- and two-stage detectors.

    Images are paths, PIL images or ``(H, W, 3)`` uint8 RGB arrays; paths and PIL images are turned upright by their
    EXIF orientation first, arrays are taken as-is (:func:`~densedet.data.image_io.read_image`), and boxes are in the
    pixels of that upright image, the frame the user sees.

    Test-time augmentation follows the config's ``data.val.pipeline`` (a ``MultiScaleFlipAug`` there merges its
    views' detections); ``tta=False`` tests at its first scale only, ``tta=True`` adds horizontal-flip TTA to a
    plain pipeline (:func:`densedet.data.tta.tta_pipeline`).
    """

    def __init__(self, config: str | Path | Config, checkpoint: str | Path | None = None, device: str = "auto",
                 score_thr: float | None = None, classes: Sequence[str] | None = None,
                 overrides: list[str] | None = None, tta: bool | None = None, precision: str | None = None,
                 fuse: bool = True, backend: str = "auto", compile: bool | None = None) -> None:
        self.cfg = config if isinstance(config, Config) else load_config(config, overrides)
        self.checkpoint: Path | None = resolve_weights_path(checkpoint, self.cfg.name) if checkpoint is not None \
            else None
        self.model = load_detector(self.cfg, self.checkpoint, device=device, precision=precision, fuse=fuse,
                                   compile=compile, backend=backend)
        self.device = model_device(self.model)
        if not self.model.supports_tta:
            tta = False  # an exported graph runs one view
        if score_thr is not None:
            self.model.set_score_thr(score_thr)
        n = int(self.model.num_classes)
        names = list(classes or self.model.classes or [f"class_{i}" for i in range(n)])
        if len(names) != n:
            raise ConfigError(f"{len(names)} class names for a model with {n} classes", path="classes")
        self.classes = names
        self.pipeline = build_pipeline(tta_pipeline(self.cfg.data.val.pipeline, tta), "data.val.pipeline")
        self.size_divisor = self.cfg.data.size_divisor

    def preprocess(self, images: Sequence[Any]) -> dict[str, Any]:
        """Images -> a collated batch of uint8 pixels (resized by the test pipeline) and metas."""
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
            img_t = torch.from_numpy(np.ascontiguousarray(img_t.transpose(2, 0, 1)))
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
