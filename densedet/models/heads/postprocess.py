"""Batched inference post-processing shared by every dense head.

Semantics follow MMDetection 2.x ``BaseDenseHead._get_bboxes_single`` / ``_bbox_post_process``
(mmdet/models/dense_heads/base_dense_head.py, v2.25): per level, keep (prior, class) pairs whose score is above
``score_thr`` and take the ``nms_pre`` best of them; multiply by the score factor (centerness) *after* that
threshold; decode only the kept boxes; class-wise NMS over all levels; keep ``max_per_img``. Here all of that
runs on the whole batch at once: top-k on ``(B, N*C)`` scores and one ``batched_nms`` call whose groups are
``image * num_classes + class``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from densedet.registry import ConfigError, check_kwargs


@dataclass
class TestConfig:
    """MMDetection's ``test_cfg`` for dense heads."""

    nms_pre: int = 1000
    min_bbox_size: float = 0.0
    score_thr: float = 0.05
    nms: dict[str, Any] | None = None  # {"type": "nms", "iou_threshold": 0.5}
    max_per_img: int = 100

    def __post_init__(self) -> None:
        if self.nms is None:
            self.nms = {"type": "nms", "iou_threshold": 0.5}
        if self.nms.get("type", "nms") != "nms":
            raise ConfigError(f"model.test_cfg.nms.type: '{self.nms.get('type')}' is not available yet "
                              f"(only 'nms')", path="model.test_cfg.nms.type")
        check_kwargs(lambda type="nms", iou_threshold=0.5: None, self.nms, "model.test_cfg.nms")


def parse_test_cfg(cfg: dict[str, Any] | None) -> TestConfig:
    cfg = dict(cfg or {})
    check_kwargs(TestConfig, cfg, "model.test_cfg")
    return TestConfig(**cfg)


def select_topk_candidates(scores: Tensor, score_thr: float, nms_pre: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-level candidate selection on a batch.

    Args:
        scores: (B, N, C) class probabilities of one level.
    Returns:
        ``(top_scores (B,k), prior_idx (B,k), labels (B,k), valid (B,k))`` where ``valid`` marks pairs above
        ``score_thr`` (the rest are padding, since images keep different numbers of candidates).
    """
    b, n, c = scores.shape
    flat = scores.reshape(b, n * c)
    k = min(nms_pre, n * c) if nms_pre > 0 else n * c
    # Scores below the threshold are pushed below every valid score so top-k never prefers them.
    masked = torch.where(flat > score_thr, flat, flat.new_full((), -1.0))
    top, idx = masked.topk(k, dim=1)
    valid = top > score_thr
    return top, idx // c, idx % c, valid


def multiclass_nms_batched(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, num_classes: int,
                           cfg: TestConfig) -> list[dict[str, Tensor]]:
    """Class-wise NMS for every image of a batch in one call.

    Args:
        boxes: (B, K, 4) xyxy; scores, labels, valid: (B, K).
    Returns:
        one dict per image: ``boxes`` (D, 4), ``scores`` (D,), ``labels`` (D,), D <= ``max_per_img``,
        sorted by decreasing score.
    """
    b = boxes.shape[0]
    if cfg.min_bbox_size > 0:
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = valid & (wh > cfg.min_bbox_size).all(-1)
    img_idx = torch.arange(b, device=boxes.device)[:, None].expand_as(labels)
    sel = valid.nonzero(as_tuple=True)
    fb, fs, fl, fi = boxes[sel], scores[sel], labels[sel], img_idx[sel]
    keep = batched_nms(fb.float(), fs.float(), fi * num_classes + fl, float(cfg.nms["iou_threshold"]))
    out = []
    kept_img = fi[keep]
    for i in range(b):  # only splits the (already sorted) survivors per image
        k = keep[kept_img == i][: cfg.max_per_img]
        out.append({"boxes": fb[k], "scores": fs[k], "labels": fl[k]})
    return out


def postprocess_levels(cls_scores: list[Tensor], score_factors: list[Tensor] | None,
                       decode: Callable[[int, Tensor], Tensor], num_classes: int, cfg: TestConfig,
                       metas: list[dict[str, Any]], rescale: bool = True) -> list[dict[str, Tensor]]:
    """Run the whole post-processing for a batch.

    Args:
        cls_scores: per level (B, N_l, C) probabilities.
        score_factors: per level (B, N_l) factors (e.g. sigmoid centerness) or None.
        decode: ``decode(level, prior_idx (B,k)) -> boxes (B,k,4)`` xyxy in the padded input frame,
            already clipped to each image's ``img_shape``.
        metas: per image, with ``scale_factor`` (w_scale, h_scale) when ``rescale``.
    Returns:
        per image ``{"boxes": (D,4) xyxy, "scores": (D,), "labels": (D,)}``; boxes in original-image pixels
        when ``rescale``.
    """
    all_boxes, all_scores, all_labels, all_valid = [], [], [], []
    for lvl, scores in enumerate(cls_scores):
        top, prior_idx, labels, valid = select_topk_candidates(scores, cfg.score_thr, cfg.nms_pre)
        if score_factors is not None:
            top = top * score_factors[lvl].gather(1, prior_idx)
        all_boxes.append(decode(lvl, prior_idx))
        all_scores.append(top)
        all_labels.append(labels)
        all_valid.append(valid)
    boxes = torch.cat(all_boxes, 1)
    results = multiclass_nms_batched(boxes, torch.cat(all_scores, 1), torch.cat(all_labels, 1),
                                     torch.cat(all_valid, 1), num_classes, cfg)
    if rescale:
        for res, meta in zip(results, metas):
            sw, sh = meta["scale_factor"][:2]
            res["boxes"] = res["boxes"] / res["boxes"].new_tensor([sw, sh, sw, sh])
    return results
