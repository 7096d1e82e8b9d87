"""The one detector contract: :class:`Detector`, the base of every DenseDet model, and the single-stage detector.

A detector is ``data_preprocessor`` (pixels -> normalised, padded input) -> ``backbone`` -> ``neck`` -> its
head(s). :class:`Detector` owns everything a feature needs from a model, written once for one- and two-stage
models alike:

* ``forward(images, targets, metas, mode)``: ``"loss"`` (dict of named losses), ``"predict"`` (per image
  ``boxes`` (K, 4) xyxy original-image pixels, ``scores``, ``labels``; ``masks`` for Mask R-CNN), ``"predict_aug"``
  (test-time augmentation: ``images`` and ``metas`` are lists over views) and ``"tensor"`` (the network's raw
  outputs);
* inference options: :meth:`use_channels_last`, :meth:`fuse` (BatchNorm folding), :meth:`set_precision` (bf16
  autocast of the network; decoding, NMS and mask pasting stay float32), :meth:`set_compile` (``torch.compile`` of
  the network);
* ``num_classes``, :meth:`reset_classifier`, :meth:`init_weights`, ``dense_head`` (the head whose priors are
  assigned densely: the single-stage head, or the RPN), :meth:`classifier_prefixes`.

A subclass says what its network is (:meth:`network`: the tensors-in, tensors-out part that is autocast and
compiled) and how its outputs become losses (:meth:`loss`), detections (:meth:`predict`) and merged test-time
augmentation views (:meth:`aug_predict`).

Images: ``(B, 3, H, W)`` uint8 (or float 0..255) pixels, each image at the top-left of the batch, zero-padded
bottom/right (as :func:`densedet.data.collate.collate` makes them); metas per image: ``img_shape`` (h, w) after
resizing, ``scale_factor`` (w, h) from the original, ``ori_shape``, ``pad_shape``, ``flip``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from densedet.models.compile import compile_network
from densedet.models.fuse import fuse_conv_bn
from densedet.models.heads.postprocess import Candidates, TestConfig
from densedet.models.precision import warn_if_bf16_emulated
from densedet.models.preprocess import build_preprocessor
from densedet.models.tta import aug_predict_dense
from densedet.registry import BACKBONES, DETECTORS, HEADS, NECKS, ConfigError

__all__ = ["Detector", "InferenceModel", "SingleStageDetector", "default_metas", "to_float32"]


def default_metas(images: Tensor) -> list[dict[str, Any]]:
    """Metas of unresized, unpadded images: ``img_shape`` = the batch's ``(H, W)``, scale factor 1."""
    h, w = images.shape[-2:]
    return [{"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)} for _ in range(images.shape[0])]


def to_float32(obj: Any) -> Any:
    """Floating tensors inside nested tuples / lists / dicts -> float32."""
    if isinstance(obj, Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple
        return type(obj)(*(to_float32(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(v) for v in obj)
    if isinstance(obj, dict):
        return {k: to_float32(v) for k, v in obj.items()}
    return obj


@runtime_checkable
class InferenceModel(Protocol):
    """What :class:`~densedet.inference.Predictor` and :func:`~densedet.engine.evaluate` need from a model: a
    :class:`Detector`, or an exported graph behind :class:`~densedet.deploy.runtime.OnnxRuntimeModel`.

    ``model(images, None, metas, mode="predict")`` -> per image ``{"boxes", "scores", "labels"[, "masks"]}``;
    ``mode="predict_aug"`` when ``supports_tta``.
    """

    num_classes: int
    supports_tta: bool
    classes: list[str] | None

    def __call__(self, images: Any, targets: Any = None, metas: Any = None, mode: str = "predict") -> Any: ...

    def set_score_thr(self, score_thr: float) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...


class Detector(nn.Module):
    """Base of every detector: preprocessing, backbone and neck, the inference options and the ``forward`` modes
    (see the module docstring). Parameter names follow MMDetection: ``backbone.*``, ``neck.*`` and the heads'."""

    supports_tta = True
    #: class names of the weights' file (set by :func:`densedet.inference.load_detector`), None when unknown
    classes: list[str] | None = None

    def __init__(self, backbone: dict, neck: dict | None = None, data_preprocessor: dict | None = None,
                 pretrained: str | None = None, init_cfg: dict | None = None) -> None:
        super().__init__()
        backbone = dict(backbone)
        if pretrained is not None:
            backbone.setdefault("pretrained", pretrained)
        self.data_preprocessor = build_preprocessor(data_preprocessor)
        self.backbone = BACKBONES.build(backbone, "model.backbone")
        self.neck = NECKS.build(neck, "model.neck") if neck is not None else None
        self.channels_last = False
        self.precision = "fp32"  # inference precision of the network (set_precision)
        self.fused = False
        self._compiled: Any = None  # torch.compile'd network (set_compile)

    # ------------------------------------------------------------------------------------ what subclasses define
    def network(self, x: Tensor) -> Any:
        """The network part, tensors in and out: ``x`` (B, 3, Hp, Wp) preprocessed input -> head outputs."""
        raise NotImplementedError(f"{type(self).__name__} must define network()")

    def loss(self, outs: Any, targets: list[dict[str, Any]], metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must define loss()")

    def predict(self, outs: Any, metas: list[dict[str, Any]], rescale: bool = True) -> list[dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} must define predict()")

    def aug_predict(self, images: list[Tensor], metas: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} does not implement test-time augmentation")

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def dense_head(self) -> nn.Module:
        """The head that assigns its priors densely (per-level statistics, ``data check``)."""
        raise NotImplementedError

    @property
    def detection_cfg(self) -> TestConfig:
        """The test config of the stage that outputs the detections (``score_thr``, ``nms``, ``max_per_img``): the
        dense head's ``test_cfg``, or a two-stage detector's R-CNN stage. Changing it changes what ``predict``
        keeps."""
        raise NotImplementedError

    @property
    def mask_thr_binary(self) -> float | None:
        """The probability threshold of predicted masks (None: the detector predicts no masks)."""
        return None

    def classifier_prefixes(self) -> list[str]:
        """Parameter-name prefixes of the layers whose shape depends on ``num_classes``."""
        raise NotImplementedError

    def reset_classifier(self, num_classes: int | None = None) -> None:
        """Re-create the class-dependent layers for ``num_classes`` (None: same count), freshly initialised."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ shared machinery
    def init_weights(self) -> None:
        """Neck and head initialisation, then the backbone's (which loads ``pretrained`` weights when given)."""
        for m in self.children():
            if m is not self.backbone and hasattr(m, "init_weights"):
                m.init_weights()
        if hasattr(self.backbone, "init_weights"):
            self.backbone.init_weights()

    def extract_feat(self, x: Tensor) -> tuple[Tensor, ...]:
        """(B, 3, H, W) preprocessed input -> multi-level features."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(x)
        return tuple(self.neck(feats)) if self.neck is not None else tuple(feats)

    def run_network(self, x: Tensor) -> Any:
        """:meth:`network` (compiled when :meth:`set_compile` was called), under bf16 autocast when
        ``precision == 'bf16'`` with its outputs cast back to float32; training always runs the plain network."""
        if self.training:
            return self.network(x)
        network = self._compiled if self._compiled is not None else self.network
        if self.precision != "bf16":
            return network(x)
        warn_if_bf16_emulated(x.device)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            outs = network(x)
        return to_float32(outs)

    @contextlib.contextmanager
    def inference_autocast(self, device: torch.device) -> Iterator[None]:
        """bf16 autocast for inference work outside :meth:`network` (a second stage's heads) when
        ``precision == 'bf16'``; a no-op otherwise."""
        if self.precision == "bf16" and not self.training:
            warn_if_bf16_emulated(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def use_channels_last(self, enable: bool = True) -> Detector:
        """Store weights and run convolutions in NHWC (``torch.channels_last``); inputs are converted in
        :meth:`extract_feat`. Same results; on CPU about 1.3x faster inference and 1.05-1.15x faster training
        (docs/benchmarks.md). Call before wrapping in DDP."""
        self.channels_last = enable
        return self.to(memory_format=torch.channels_last if enable else torch.contiguous_format)

    def fuse(self) -> Detector:
        """Fold eval-mode and frozen BatchNorm layers into their preceding convs for inference, in place
        (:func:`densedet.models.fuse.fuse_conv_bn`); puts the model in eval mode. Same detections to float rounding.
        A fused model cannot train again (``train()`` raises): fuse after loading weights, never before saving."""
        self.eval()
        fuse_conv_bn(self)
        self.fused = True
        return self

    def train(self, mode: bool = True) -> Detector:
        if mode and self.fused:
            raise RuntimeError("this detector was fused for inference (BatchNorm folded into convs); build a new one "
                               "from the checkpoint to train")
        return super().train(mode)

    def set_precision(self, precision: str) -> Detector:
        """``'fp32'`` or ``'bf16'``: with bf16 the network (and a second stage's heads) run under
        ``torch.autocast`` (bfloat16) in ``predict`` / ``tensor`` modes; their outputs are cast to float32 before
        decoding, NMS and mask pasting, so boxes, scores and all box arithmetic are float32. Training is not
        affected (see ``runtime.amp``)."""
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision must be 'fp32' or 'bf16', got {precision!r}", path="runtime.precision")
        self.precision = precision
        return self

    def set_score_thr(self, score_thr: float) -> Detector:
        """Keep detections scored above ``score_thr`` (the ``score_thr`` of :attr:`detection_cfg`)."""
        self.detection_cfg.score_thr = float(score_thr)
        return self

    def set_compile(self, enable: bool = True) -> Detector:
        """Run :meth:`network` through ``torch.compile`` (Inductor, weights frozen) in ``predict`` / ``tensor``
        modes of an eval-mode model; decoding, NMS and any second stage stay eager (:mod:`densedet.models.compile`).
        Call after loading weights, :meth:`fuse` and :meth:`use_channels_last`: the compiled graph keeps the
        weights it first saw. Training never uses the compiled graph."""
        self._compiled = compile_network(self.network) if enable else None
        return self

    def forward(self, images: Tensor | list[Tensor], targets: list[dict[str, Any]] | None = None,
                metas: list[dict[str, Any]] | list[list[dict[str, Any]]] | None = None, mode: str = "loss") -> Any:
        """See the module docstring for the modes; ``metas`` default to :func:`default_metas`."""
        if mode == "predict_aug":
            if not isinstance(images, (list, tuple)) or metas is None:
                raise ValueError("mode='predict_aug' takes a list of view batches and a list of their metas")
            return self.aug_predict(list(images), list(metas))  # type: ignore[arg-type]
        if mode not in ("loss", "predict", "tensor"):
            raise ValueError(f"unknown mode '{mode}' (loss | predict | predict_aug | tensor)")
        given = metas is not None
        metas = metas if given else default_metas(images)  # type: ignore[arg-type]
        outs = self.run_network(self.data_preprocessor(images, metas if given else None))
        if mode == "tensor":
            return outs
        if mode == "loss":
            if targets is None:
                raise ValueError("mode='loss' needs targets")
            return self.loss(outs, targets, metas)  # type: ignore[arg-type]
        return self.predict(outs, metas)  # type: ignore[arg-type]


@DETECTORS.register()
class SingleStageDetector(Detector):
    """A one-stage detector: backbone + neck + one dense head. ``train_cfg`` / ``test_cfg`` are handed to the head,
    as in MMDetection. Parameter names: ``backbone.*``, ``neck.*``, ``bbox_head.*``."""

    def __init__(self, backbone: dict, bbox_head: dict, neck: dict | None = None, train_cfg: dict | None = None,
                 test_cfg: dict | None = None, data_preprocessor: dict | None = None, pretrained: str | None = None,
                 init_cfg: dict | None = None) -> None:
        super().__init__(backbone, neck, data_preprocessor, pretrained, init_cfg)
        self.bbox_head = HEADS.build(bbox_head, "model.bbox_head", train_cfg=train_cfg, test_cfg=test_cfg)

    @property
    def num_classes(self) -> int:
        return self.bbox_head.num_classes

    @property
    def dense_head(self) -> nn.Module:
        return self.bbox_head

    @property
    def detection_cfg(self) -> TestConfig:
        return self.bbox_head.test_cfg

    def classifier_prefixes(self) -> list[str]:
        name = next(n for n, m in self.bbox_head.named_modules() if m is self.bbox_head.classifier())
        return [f"bbox_head.{name}."]

    def reset_classifier(self, num_classes: int | None = None) -> None:
        self.bbox_head.reset_classifier(num_classes)

    def network(self, x: Tensor) -> tuple[list[Tensor], ...]:
        return self.bbox_head(self.extract_feat(x))

    def loss(self, outs: Any, targets: list[dict[str, Any]], metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        return self.bbox_head.loss(outs, targets, metas)

    def predict(self, outs: Any, metas: list[dict[str, Any]], rescale: bool = True) -> list[dict[str, Any]]:
        return self.bbox_head.predict(outs, metas, rescale=rescale)

    def candidates(self, outs: Any, metas: list[dict[str, Any]]) -> Candidates:
        """The pre-NMS detections of :meth:`predict` (boxes in the input frame), shared by TTA and export."""
        return self.bbox_head.candidates(outs, metas)

    @torch.no_grad()
    def aug_predict(self, images: list[Tensor], metas: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Test-time augmentation (:func:`densedet.models.tta.aug_predict_dense`)."""
        return aug_predict_dense(self, images, metas)


# MMDetection config names of the detectors (all are single-stage detectors differing only by head; UMOP's
# ``UMOP`` detector is mmdet's ``SingleStageDetector`` too).
for _name in ("RetinaNet", "FCOS", "ATSS", "VFNet", "FOVEA", "RepPointsDetector", "UMOP"):
    DETECTORS[_name] = type(_name, (SingleStageDetector,), {"__doc__": f"{_name}: a single-stage detector."})
