"""Backbone + neck + dense head -> losses (training) or detections (inference)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from densedet.registry import BACKBONES, DETECTORS, HEADS, NECKS


def default_metas(images: Tensor) -> list[dict[str, Any]]:
    """Metas of unresized, unpadded images: ``img_shape`` = the batch's ``(H, W)``, scale factor 1."""
    h, w = images.shape[-2:]
    return [{"img_shape": (h, w), "scale_factor": (1.0, 1.0)} for _ in range(images.shape[0])]


@DETECTORS.register()
class SingleStageDetector(nn.Module):
    """A one-stage detector. ``train_cfg`` / ``test_cfg`` are handed to the head, as in MMDetection.

    Parameter names: ``backbone.*``, ``neck.*``, ``bbox_head.*`` (the layout of MMDetection checkpoints).
    """

    def __init__(self, backbone: dict, bbox_head: dict, neck: dict | None = None, train_cfg: dict | None = None,
                 test_cfg: dict | None = None, pretrained: str | None = None, init_cfg: dict | None = None) -> None:
        super().__init__()
        backbone = dict(backbone)
        if pretrained is not None:
            backbone.setdefault("pretrained", pretrained)
        self.backbone = BACKBONES.build(backbone, "model.backbone")
        self.neck = NECKS.build(neck, "model.neck") if neck is not None else None
        self.bbox_head = HEADS.build(bbox_head, "model.bbox_head", train_cfg=train_cfg, test_cfg=test_cfg)
        self.channels_last = False
        self.precision = "fp32"  # inference precision of backbone/neck/head (set_precision)
        self.fused = False
        self._compiled: Any = None  # torch.compile'd _network (set_compile)

    def use_channels_last(self, enable: bool = True) -> SingleStageDetector:
        """Store weights and run convolutions in NHWC (``torch.channels_last``); inputs are converted in
        :meth:`extract_feat`. Same results; on CPU about 1.3x faster inference and 1.05-1.15x faster training
        (docs/benchmarks.md). Call before wrapping in DDP."""
        self.channels_last = enable
        return self.to(memory_format=torch.channels_last if enable else torch.contiguous_format)

    def fuse(self) -> SingleStageDetector:
        """Fold eval-mode and frozen BatchNorm layers into their preceding convs for inference, in place
        (:func:`densedet.models.fuse.fuse_conv_bn`); puts the model in eval mode. Same detections to float rounding.
        A fused model cannot train again (``train()`` raises): fuse after loading weights, never before saving."""
        from densedet.models.fuse import fuse_conv_bn

        self.eval()
        fuse_conv_bn(self)
        self.fused = True
        return self

    def train(self, mode: bool = True) -> SingleStageDetector:
        if mode and getattr(self, "fused", False):
            raise RuntimeError("this detector was fused for inference (BatchNorm folded into convs); build a new one "
                               "from the checkpoint to train")
        return super().train(mode)

    def set_precision(self, precision: str) -> SingleStageDetector:
        """``'fp32'`` or ``'bf16'``: with bf16, backbone, neck and head run under ``torch.autocast`` (bfloat16) in
        ``predict`` / ``tensor`` modes, and their outputs are cast back to float32 before decoding and NMS, so
        boxes, scores and all box arithmetic are float32. Training is not affected (see ``runtime.amp``)."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        self.precision = precision
        return self

    def set_compile(self, enable: bool = True) -> SingleStageDetector:
        """Run backbone, neck and head through ``torch.compile`` (Inductor, weights frozen) in ``predict`` /
        ``tensor`` modes of an eval-mode model; decoding and NMS stay eager float32
        (:mod:`densedet.models.compile`). Call after loading weights, :meth:`fuse` and :meth:`use_channels_last`:
        the compiled graph keeps the weights it first saw. Training never uses the compiled graph."""
        if enable:
            from densedet.models.compile import compile_network

            self._compiled = compile_network(self._network)
        else:
            self._compiled = None
        return self

    def _network(self, images: Tensor) -> Any:
        return self.bbox_head(self.extract_feat(images))

    def _head_outputs(self, images: Tensor) -> Any:
        """Backbone, neck and head; under bf16 autocast when ``precision == 'bf16'`` (outputs cast to float32)."""
        network = self._compiled if self._compiled is not None and not self.training else self._network
        if self.precision != "bf16" or self.training:
            return network(images)
        with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16):
            outs = network(images)
        return _to_float32(outs)

    def init_weights(self) -> None:
        """Head/neck initialisation, then the backbone's (which loads ``pretrained`` weights when given)."""
        for m in (self.neck, self.bbox_head, self.backbone):
            if m is not None and hasattr(m, "init_weights"):
                m.init_weights()

    @property
    def num_classes(self) -> int:
        return self.bbox_head.num_classes

    def extract_feat(self, images: Tensor) -> tuple[Tensor, ...]:
        """(B, 3, H, W) normalised, padded images -> multi-level features."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(images)
        return tuple(self.neck(feats)) if self.neck is not None else tuple(feats)

    def forward(self, images: Tensor | list[Tensor], targets: list[dict[str, Tensor]] | None = None,
                metas: list[dict[str, Any]] | list[list[dict[str, Any]]] | None = None, mode: str = "loss") -> Any:
        """``mode="loss"``: dict of named losses (keys ``loss*``) and statistics.

        ``mode="predict"``: per image ``{"boxes": (K,4) xyxy original-image pixels, "scores": (K,),
        "labels": (K,) contiguous class index}``. ``mode="tensor"``: the raw per-level head outputs.
        ``mode="predict_aug"``: test-time augmentation, ``images`` and ``metas`` are lists over views
        (:func:`densedet.models.tta.aug_predict`); same output as ``"predict"``.
        """
        if mode == "predict_aug":
            from densedet.models.tta import aug_predict

            return aug_predict(self, images, metas)
        outs = self._head_outputs(images)
        if mode == "tensor":
            return outs
        metas = metas if metas is not None else default_metas(images)
        if mode == "loss":
            if targets is None:
                raise ValueError("mode='loss' needs targets")
            return self.bbox_head.loss(outs, targets, metas)
        if mode == "predict":
            return self.bbox_head.predict(outs, metas, rescale=True)
        raise ValueError(f"unknown mode '{mode}' (loss | predict | predict_aug | tensor)")


def _to_float32(obj: Any) -> Any:
    """Floating tensors inside nested tuples / lists / dicts -> float32."""
    if isinstance(obj, Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float32(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    return obj


# MMDetection config names of the detectors (all are single-stage detectors differing only by head).
for _name in ("RetinaNet", "FCOS", "ATSS", "VFNet", "FOVEA", "RepPointsDetector"):
    DETECTORS[_name] = type(_name, (SingleStageDetector,), {"__doc__": f"{_name}: a single-stage detector."})
