"""Backbone + neck + RPN + RoI head: two-stage detectors (Faster R-CNN, Mask R-CNN), beside
:mod:`densedet.models.detector`'s single-stage one and sharing its backbone/neck code and interface.

Data flow: images -> ``backbone`` -> ``neck`` (FPN levels) -> ``rpn_head`` (objectness + deltas per anchor) ->
proposals (per-level top-k, NMS) -> ``roi_head``: RoIAlign features -> ``bbox_head`` (classes + class-specific
boxes) -> NMS -> ``mask_head`` on the kept boxes -> masks pasted into their boxes. Training samples RoIs from the
(detached) proposals plus the gt boxes. MMDetection 2.x ``TwoStageDetector`` semantics and parameter names
(``rpn_head.*``, ``roi_head.bbox_head.*``, ``roi_head.mask_head.*``); ``train_cfg`` / ``test_cfg`` hold the
``rpn``, ``rpn_proposal`` and ``rcnn`` sections as in mmdet configs.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from densedet.errors import NotImplementedConfigError
from densedet.models.detector import SingleStageDetector, default_metas
from densedet.models.roi_heads import StandardRoIHead
from densedet.registry import BACKBONES, DETECTORS, HEADS, NECKS, ConfigError, check_kwargs

__all__ = ["TwoStageDetector"]

_TRAIN_KEYS = ("rpn", "rpn_proposal", "rcnn")
_TEST_KEYS = ("rpn", "rcnn")
# mmdet configs/_base_/models/mask_rcnn_r50_fpn.py train_cfg.rpn_proposal
RPN_PROPOSAL = {"nms_pre": 2000, "max_per_img": 1000, "nms": {"type": "nms", "iou_threshold": 0.7}, "min_bbox_size": 0}


def _sections(cfg: dict | None, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(keys)
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)} for a two-stage detector (expected "
                          f"{list(keys)})", path=where)
    return cfg


@DETECTORS.register()
class TwoStageDetector(nn.Module):
    """A two-stage detector; ``roi_head`` must be a ``StandardRoIHead`` config (with or without a mask branch)."""

    def __init__(self, backbone: dict, rpn_head: dict, roi_head: dict, neck: dict | None = None,
                 train_cfg: dict | None = None, test_cfg: dict | None = None, pretrained: str | None = None,
                 init_cfg: dict | None = None) -> None:
        super().__init__()
        train = _sections(train_cfg, _TRAIN_KEYS, "model.train_cfg")
        test = _sections(test_cfg, _TEST_KEYS, "model.test_cfg")
        backbone = dict(backbone)
        if pretrained is not None:
            backbone.setdefault("pretrained", pretrained)
        self.backbone = BACKBONES.build(backbone, "model.backbone")
        self.neck = NECKS.build(neck, "model.neck") if neck is not None else None
        self.rpn_head = HEADS.build(rpn_head, "model.rpn_head", train_cfg=train.get("rpn"), test_cfg=test.get("rpn"))
        roi = dict(roi_head)
        if roi.pop("type", "StandardRoIHead") != "StandardRoIHead":
            raise ConfigError("model.roi_head.type: only StandardRoIHead is available", path="model.roi_head.type")
        check_kwargs(StandardRoIHead, roi, "model.roi_head")
        self.roi_head = StandardRoIHead(**roi, train_cfg=train.get("rcnn"), test_cfg=test.get("rcnn"))
        self.proposal_cfg = dict(train.get("rpn_proposal") or RPN_PROPOSAL)
        self.channels_last = False
        self.fused = False

    # the backbone/neck plumbing is the single-stage detector's (plain functions of backbone, neck, channels_last)
    use_channels_last = SingleStageDetector.use_channels_last
    extract_feat = SingleStageDetector.extract_feat
    fuse = SingleStageDetector.fuse  # BatchNorm folding is model-agnostic (densedet.models.fuse)

    def train(self, mode: bool = True) -> TwoStageDetector:
        if mode and self.fused:
            raise RuntimeError("this detector was fused for inference (BatchNorm folded into convs); build a new one "
                               "from the checkpoint to train")
        return super().train(mode)

    def set_precision(self, precision: str) -> TwoStageDetector:
        """Only ``'fp32'``: bf16 inference (``runtime.precision``) is implemented for single-stage detectors only."""
        if precision != "fp32":
            raise ConfigError(f"precision {precision!r}: bf16 inference is not implemented for two-stage detectors "
                              "(Mask R-CNN) yet; use fp32", path="runtime.precision")
        return self

    def set_compile(self, enable: bool = True) -> TwoStageDetector:
        """Only ``False``: ``--compile`` (runtime.compile) is implemented for single-stage detectors only."""
        if enable:
            raise NotImplementedConfigError("--compile (runtime.compile) is not implemented for two-stage detectors "
                                            "(Mask R-CNN); run without it", path="runtime.compile")
        return self

    def init_weights(self) -> None:
        for m in (self.neck, self.rpn_head, self.roi_head, self.backbone):
            if m is not None and hasattr(m, "init_weights"):
                m.init_weights()

    @property
    def num_classes(self) -> int:
        return self.roi_head.num_classes

    @property
    def with_mask(self) -> bool:
        return self.roi_head.with_mask

    def forward(self, images: Tensor, targets: list[dict[str, Any]] | None = None,
                metas: list[dict[str, Any]] | None = None, mode: str = "loss") -> Any:
        """``mode="loss"``: ``loss_rpn_cls``, ``loss_rpn_bbox``, ``loss_cls``, ``loss_bbox`` (+ ``loss_mask``) and
        ``acc``. ``mode="predict"``: per image ``boxes`` (K, 4) xyxy original-image pixels, ``scores``, ``labels``
        and, for Mask R-CNN, ``masks`` (:class:`~densedet.data.masks.InstanceMasks` in the original image).
        ``mode="tensor"``: the RPN's per-level outputs."""
        if mode == "predict_aug":
            raise NotImplementedConfigError("test-time augmentation (MultiScaleFlipAug) is not implemented for "
                                            "two-stage detectors; use a single-scale test pipeline")
        feats = self.extract_feat(images)
        rpn_outs = self.rpn_head(feats)
        if mode == "tensor":
            return rpn_outs
        metas = metas if metas is not None else default_metas(images)
        if mode == "loss":
            if targets is None:
                raise ValueError("mode='loss' needs targets")
            losses = self.rpn_head.loss(rpn_outs, targets, metas)
            proposals = self.rpn_head.proposals(rpn_outs, metas, self.proposal_cfg)
            losses.update(self.roi_head.loss(feats, proposals, targets, metas))
            return losses
        if mode == "predict":
            proposals = self.rpn_head.proposals(rpn_outs, metas)
            return self.roi_head.predict(feats, proposals, metas, rescale=True)
        raise ValueError(f"unknown mode '{mode}' (loss | predict | tensor)")


for _name in ("FasterRCNN", "MaskRCNN"):
    DETECTORS[_name] = type(_name, (TwoStageDetector,), {"__doc__": f"{_name}: a two-stage detector."})
