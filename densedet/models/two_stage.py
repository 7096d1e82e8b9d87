"""Two-stage detectors (Faster R-CNN, Mask R-CNN): a :class:`~densedet.models.detector.Detector` with an RPN and a
RoI head.

Data flow: images -> ``data_preprocessor`` -> ``backbone`` -> ``neck`` (FPN levels) -> ``rpn_head`` (objectness +
deltas per anchor) -> proposals (per-level top-k, NMS) -> ``roi_head``: RoIAlign features -> ``bbox_head`` (classes
+ class-specific boxes) -> NMS -> ``mask_head`` on the kept boxes -> masks pasted into their boxes. Training samples
RoIs from the (detached) proposals plus the gt boxes. MMDetection 2.x ``TwoStageDetector`` semantics and parameter
names (``rpn_head.*``, ``roi_head.bbox_head.*``, ``roi_head.mask_head.*``); ``train_cfg`` / ``test_cfg`` hold the
``rpn``, ``rpn_proposal`` and ``rcnn`` sections as in mmdet configs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from densedet.models.detector import Detector
from densedet.models.heads.postprocess import TestConfig
from densedet.models.roi_heads import StandardRoIHead
from densedet.models.tta import aug_predict_two_stage
from densedet.registry import DETECTORS, HEADS, ConfigError, check_kwargs

__all__ = ["TwoStageDetector", "TwoStageOutputs"]

_TRAIN_KEYS = ("rpn", "rpn_proposal", "rcnn")
_TEST_KEYS = ("rpn", "rcnn")
# mmdet configs/_base_/models/mask_rcnn_r50_fpn.py train_cfg.rpn_proposal
RPN_PROPOSAL = {"nms_pre": 2000, "max_per_img": 1000, "nms": {"type": "nms", "iou_threshold": 0.7}, "min_bbox_size": 0}


class TwoStageOutputs(NamedTuple):
    """What a two-stage detector's network gives: the FPN levels (the RoI head pools from them) and the RPN's
    per-level ``(objectness, deltas)`` maps."""

    feats: tuple[Tensor, ...]
    rpn_outs: tuple[list[Tensor], list[Tensor]]


def _sections(cfg: dict | None, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(keys)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)} for a two-stage detector (expected "
                          f"{list(keys)})", path=where)
    return cfg


@DETECTORS.register()
class TwoStageDetector(Detector):
    """A two-stage detector; ``roi_head`` must be a ``StandardRoIHead`` config (with or without a mask branch)."""

    def __init__(self, backbone: dict, rpn_head: dict, roi_head: dict, neck: dict | None = None,
                 train_cfg: dict | None = None, test_cfg: dict | None = None, data_preprocessor: dict | None = None,
                 pretrained: str | None = None, init_cfg: dict | None = None) -> None:
        train = _sections(train_cfg, _TRAIN_KEYS, "model.train_cfg")
        test = _sections(test_cfg, _TEST_KEYS, "model.test_cfg")
        super().__init__(backbone, neck, data_preprocessor, pretrained, init_cfg)
        self.rpn_head = HEADS.build(rpn_head, "model.rpn_head", train_cfg=train.get("rpn"), test_cfg=test.get("rpn"))
        roi = dict(roi_head)
        if roi.pop("type", "StandardRoIHead") != "StandardRoIHead":
            raise ConfigError("model.roi_head.type: only StandardRoIHead is available", path="model.roi_head.type")
        check_kwargs(StandardRoIHead, roi, "model.roi_head")
        self.roi_head = StandardRoIHead(**roi, train_cfg=train.get("rcnn"), test_cfg=test.get("rcnn"))
        self.proposal_cfg = dict(train.get("rpn_proposal") or RPN_PROPOSAL)

    @property
    def num_classes(self) -> int:
        return self.roi_head.num_classes

    @property
    def with_mask(self) -> bool:
        return self.roi_head.with_mask

    @property
    def dense_head(self) -> nn.Module:
        return self.rpn_head

    @property
    def detection_cfg(self) -> TestConfig:
        return self.roi_head.nms_cfg

    @property
    def mask_thr_binary(self) -> float | None:
        return float(self.roi_head.test_cfg.mask_thr_binary) if self.with_mask else None

    def classifier_prefixes(self) -> list[str]:
        out = ["roi_head.bbox_head.fc_cls.", "roi_head.bbox_head.fc_reg."]
        return out + (["roi_head.mask_head.conv_logits."] if self.with_mask else [])

    def reset_classifier(self, num_classes: int | None = None) -> None:
        self.roi_head.reset_classifier(num_classes)

    def set_precision(self, precision: str) -> TwoStageDetector:
        """As :meth:`Detector.set_precision`; with bf16 the RoI head's box and mask heads also run under autocast
        (RoIAlign, decoding, NMS and mask pasting stay float32)."""
        super().set_precision(precision)
        self.roi_head.precision = precision
        return self

    def network(self, x: Tensor) -> TwoStageOutputs:
        feats = self.extract_feat(x)
        return TwoStageOutputs(feats, self.rpn_head(feats))

    def loss(self, outs: TwoStageOutputs, targets: list[dict[str, Any]],
             metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        """``loss_rpn_cls``, ``loss_rpn_bbox``, ``loss_cls``, ``loss_bbox`` (+ ``loss_mask``) and ``acc``."""
        losses = self.rpn_head.loss(outs.rpn_outs, targets, metas)
        proposals = self.rpn_head.proposals(outs.rpn_outs, metas, self.proposal_cfg)
        losses.update(self.roi_head.loss(outs.feats, proposals, targets, metas))
        return losses

    def predict(self, outs: TwoStageOutputs, metas: list[dict[str, Any]], rescale: bool = True) -> list[dict[str, Any]]:
        """Per image ``boxes`` (K, 4) xyxy original-image pixels, ``scores``, ``labels`` and, for Mask R-CNN,
        ``masks`` (:class:`~densedet.structures.masks.InstanceMasks` in the original image)."""
        proposals = self.rpn_head.proposals(outs.rpn_outs, metas)
        return self.roi_head.predict(outs.feats, proposals, metas, rescale=rescale)

    @torch.no_grad()
    def aug_predict(self, images: list[Tensor], metas: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Test-time augmentation with MMDetection 2.x ``aug_test`` semantics
        (:func:`densedet.models.tta.aug_predict_two_stage`)."""
        return aug_predict_two_stage(self, images, metas)


for _name in ("FasterRCNN", "MaskRCNN"):
    DETECTORS[_name] = type(_name, (TwoStageDetector,), {"__doc__": f"{_name}: a two-stage detector."})
