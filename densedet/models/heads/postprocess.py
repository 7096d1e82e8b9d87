"""Batched inference post-processing shared by every dense head.

Semantics follow MMDetection 2.x ``BaseDenseHead._get_bboxes_single`` / ``_bbox_post_process``
(mmdet/models/dense_heads/base_dense_head.py, v2.25): per level, keep (prior, class) pairs whose score is above
``score_thr`` and take the ``nms_pre`` best of them; multiply by the score factor (centerness) *after* that
threshold; decode only the kept boxes; class-wise NMS over all levels; keep ``max_per_img``. Here all of that
runs on the whole batch at once: top-k on ``(B, N*C)`` scores and one ``batched_nms`` call whose groups are
``image * num_classes + class``.

``test_cfg.nms`` is ``{type: nms, iou_threshold}`` or ``{type: soft_nms, iou_threshold, sigma, min_score, method}``
(mmcv ``soft_nms`` keys and defaults; see :mod:`densedet.models.heads.soft_nms`). Test-time augmentation
(:mod:`densedet.models.tta`) takes each view's pre-NMS :class:`Candidates` from :func:`select_candidates`, maps
them to the original image and runs :func:`multiclass_nms_batched` once over all views.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from densedet.models.heads.soft_nms import SOFT_NMS_METHODS, batched_soft_nms
from densedet.registry import ConfigError, check_kwargs, check_types

# Keyword arguments (and defaults) of each ``test_cfg.nms.type``: torchvision/mmcv ``nms`` and mmcv ``soft_nms``.
NMS_KWARGS: dict[str, Callable[..., None]] = {
    "nms": lambda type="nms", iou_threshold=0.5: None,
    "soft_nms": lambda type="soft_nms", iou_threshold=0.3, sigma=0.5, min_score=1e-3, method="linear": None,
}


@dataclass
class TestConfig:
    """MMDetection's ``test_cfg`` for dense heads."""

    nms_pre: int = 1000  # <= 0: every pair above score_thr (mmdet 2.10/2.14 ``if nms_pre > 0``)
    min_bbox_size: float = 0.0
    score_thr: float = 0.05
    nms: dict[str, Any] | None = None  # {"type": "nms", "iou_threshold": 0.5}
    max_per_img: int = 100  # <= 0: every detection NMS keeps (mmdet bbox_nms ``if max_num > 0``)

    def __post_init__(self) -> None:
        if self.nms is None:
            self.nms = {"type": "nms", "iou_threshold": 0.5}
        kind = self.nms.get("type", "nms")
        if kind not in NMS_KWARGS:
            raise ConfigError(f"model.test_cfg.nms.type: '{kind}' is not available (one of {sorted(NMS_KWARGS)})",
                              path="model.test_cfg.nms.type")
        check_kwargs(NMS_KWARGS[kind], self.nms, "model.test_cfg.nms")
        for key in ("iou_threshold", "sigma", "min_score"):  # numbers, checked at load rather than at validation
            value = self.nms.get(key, 0.5)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"model.test_cfg.nms.{key}={value!r}: must be a number",
                                  path=f"model.test_cfg.nms.{key}")
        if kind == "soft_nms":
            method = self.nms.get("method", "linear")
            if method not in SOFT_NMS_METHODS:
                raise ConfigError(f"model.test_cfg.nms.method: soft-NMS method must be one of {SOFT_NMS_METHODS}, "
                                  f"got {method!r}", path="model.test_cfg.nms.method")
            if float(self.nms.get("sigma", 0.5)) <= 0:
                raise ConfigError(f"model.test_cfg.nms.sigma must be > 0, got {self.nms['sigma']!r}",
                                  path="model.test_cfg.nms.sigma")

    @property
    def max_per_img_limit(self) -> int | None:
        """``max_per_img`` as a slice bound: None (keep all) when ``max_per_img <= 0``, as mmdet's
        ``multiclass_nms(max_num)``; a plain ``[:max_per_img]`` would drop the last detection for -1."""
        return self.max_per_img if self.max_per_img > 0 else None

    def nms_kwargs(self) -> dict[str, Any]:
        """``test_cfg.nms`` with its defaults filled in, without ``type``."""
        assert self.nms is not None
        params = inspect.signature(NMS_KWARGS[self.nms.get("type", "nms")]).parameters
        out = {name: p.default for name, p in params.items()}
        out.update(self.nms)
        out.pop("type")
        return out


def parse_test_cfg(cfg: dict[str, Any] | None) -> TestConfig:
    cfg = dict(cfg or {})
    check_kwargs(TestConfig, cfg, "model.test_cfg")
    check_types(TestConfig, cfg, "model.test_cfg")
    return TestConfig(**cfg)


def candidates_per_level(num_priors: list[int], num_classes: int, nms_pre: int) -> list[int]:
    """How many (prior, class) candidates :func:`select_candidates` keeps of each level (its ``K_l``)."""
    return [min(nms_pre, n * num_classes) if nms_pre > 0 else n * num_classes for n in num_priors]


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
    k = candidates_per_level([n], c, nms_pre)[0]  # nms_pre <= 0 keeps all, as the references
    # Scores below the threshold are pushed below every valid score so top-k never prefers them.
    masked = torch.where(flat > score_thr, flat, flat.new_full((), -1.0))
    top, idx = masked.topk(k, dim=1)
    valid = top > score_thr
    return top, idx // c, idx % c, valid


class Candidates(NamedTuple):
    """Pre-NMS detections of a batch, padded to K per image.

    ``boxes`` (B, K, 4) xyxy; ``scores`` (B, K) (score factors already applied); ``labels`` (B, K) long;
    ``valid`` (B, K) bool, False on padding (pairs that did not pass ``score_thr``).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    valid: Tensor

    @staticmethod
    def cat(parts: list[Candidates]) -> Candidates:
        """Concatenate along K (e.g. the views of test-time augmentation)."""
        return Candidates(*(torch.cat([getattr(p, f) for p in parts], 1) for f in Candidates._fields))


def nms_best_survivors(boxes: Tensor, scores: Tensor, groups: Tensor, image: Tensor, num_images: int,
                       iou_threshold: float, limit: int) -> Tensor:
    """``batched_nms(boxes, scores, groups, iou_threshold)`` when only each image's ``limit`` best survivors are
    wanted: the same survivors, found by NMS over a prefix of the candidates.

    Greedy NMS decides a box only from the boxes of its group scored above it (torchvision's kernel sorts stably, so
    equal scores meet in candidate order, which the prefix keeps), so NMS over each image's ``k`` best candidates
    (plus all tied with the k-th) keeps exactly the boxes the full run keeps among them, and every candidate outside
    scores lower. Once a prefix keeps ``limit`` boxes of an image (or holds all its candidates) its ``limit`` best
    survivors are final; ``k`` starts at ``4 * limit`` and grows 4x until every image is done. With Mask R-CNN's
    ``score_thr`` 0.05 on weak scores, or 0, the R-CNN stage hands up to 1000 x 80 candidates to NMS for 100
    detections. Survivors with exactly equal scores may be listed in another order than ``batched_nms``'s (whose
    final sort is unstable).

    Args:
        boxes (N, 4), scores (N,), groups (N,) NMS groups (image * classes + class), image (N,) image index.
    Returns:
        kept indices into the N candidates, by decreasing score; at least each image's ``limit`` best survivors (all
        of its survivors when it has fewer).
    """
    order = scores.sort(descending=True, stable=True)[1]
    order = order[image[order].sort(stable=True)[1]]  # by image, then by decreasing score
    counts = torch.bincount(image, minlength=num_images)
    starts = counts.cumsum(0) - counts
    img_sorted = image[order]
    sorted_scores = scores[order]
    k = 4 * limit
    while True:
        cut_pos = starts + torch.clamp(counts - 1, max=k - 1).clamp(min=0)
        cut = sorted_scores[cut_pos.clamp(max=max(order.numel() - 1, 0))]  # the k-th best score of each image
        take = sorted_scores >= cut[img_sorted]
        sel = order[take].sort()[0]  # candidates in their original order: NMS meets equal scores as the full run
        keep = sel[batched_nms(boxes[sel], scores[sel], groups[sel], iou_threshold)]
        kept = torch.bincount(image[keep], minlength=num_images)
        taken = torch.bincount(img_sorted[take], minlength=num_images)
        if bool(((kept >= limit) | (taken >= counts)).all()):
            return keep
        k *= 4


def multiclass_nms_batched(boxes: Tensor, scores: Tensor, labels: Tensor, valid: Tensor, num_classes: int,
                           cfg: TestConfig, best_only: bool = False) -> list[dict[str, Tensor]]:
    """Class-wise NMS (or soft-NMS, per ``cfg.nms.type``) for every image of a batch in one call.

    Args:
        boxes: (B, K, 4) xyxy; scores, labels, valid: (B, K).
        best_only: with hard NMS and ``max_per_img > 0``, run NMS over a score prefix (:func:`nms_best_survivors`):
            the same detections, much faster when the candidates far outnumber ``max_per_img`` (the R-CNN stage's
            proposals x classes); survivors with exactly equal scores may come in another order (torchvision's
            final sort is unstable), so paths whose output order feeds a seeded sampler (the RPN) keep the default.
    Returns:
        one dict per image: ``boxes`` (D, 4), ``scores`` (D,) (decayed scores with soft-NMS), ``labels`` (D,),
        D <= ``max_per_img`` (all survivors when ``max_per_img <= 0``), sorted by decreasing score.
    """
    b = boxes.shape[0]
    if cfg.min_bbox_size > 0:
        wh = boxes[..., 2:] - boxes[..., :2]
        valid = valid & (wh > cfg.min_bbox_size).all(-1)
    img_idx = torch.arange(b, device=boxes.device)[:, None].expand_as(labels)
    sel = valid.nonzero(as_tuple=True)
    fb, fs, fl, fi = boxes[sel], scores[sel], labels[sel], img_idx[sel]
    groups = fi * num_classes + fl
    kwargs = cfg.nms_kwargs()
    if cfg.nms["type"] == "soft_nms":
        keep, kept_scores = batched_soft_nms(fb, fs, groups, max_per_group=cfg.max_per_img_limit, **kwargs)
    elif (best_only and cfg.max_per_img_limit is not None and fs.numel() > 4 * cfg.max_per_img * b
          and not torch.jit.is_tracing() and not torch.compiler.is_compiling()):  # its loop is data-dependent
        keep = nms_best_survivors(fb.float(), fs.float(), groups, fi, b, float(kwargs["iou_threshold"]),
                                  cfg.max_per_img)
        kept_scores = fs[keep]
    else:
        keep = batched_nms(fb.float(), fs.float(), groups, float(kwargs["iou_threshold"]))
        kept_scores = fs[keep]
    out = []
    kept_img = fi[keep]
    for i in range(b):  # only splits the (already sorted) survivors per image
        mine = (kept_img == i).nonzero(as_tuple=True)[0][: cfg.max_per_img_limit]
        k = keep[mine]
        out.append({"boxes": fb[k], "scores": kept_scores[mine], "labels": fl[k]})
    return out


def select_candidates(cls_scores: list[Tensor], score_factors: list[Tensor] | None,
                      decode: Callable[[int, Tensor], Tensor], cfg: TestConfig) -> Candidates:
    """Per-level top-k above ``score_thr``, score factors, decoding: everything before NMS, for a batch.

    Args: as :func:`postprocess_levels`.
    Returns:
        :class:`Candidates` with K = sum over levels of ``min(nms_pre, N_l * C)``; boxes in the padded input frame.
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
    return Candidates(torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1),
                      torch.cat(all_valid, 1))


def rescale_results(results: list[dict[str, Tensor]], metas: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
    """Divide each image's boxes by its ``scale_factor`` (w_scale, h_scale), in place; returns ``results``."""
    for res, meta in zip(results, metas):
        sw, sh = meta["scale_factor"][:2]
        res["boxes"] = res["boxes"] / res["boxes"].new_tensor([sw, sh, sw, sh])
    return results


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
    cand = select_candidates(cls_scores, score_factors, decode, cfg)
    results = multiclass_nms_batched(*cand, num_classes, cfg)
    return rescale_results(results, metas) if rescale else results
