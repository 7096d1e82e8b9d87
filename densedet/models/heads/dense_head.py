"""The one base class of DenseDet's dense heads.

A head turns FPN levels into per-level maps, flattens them once into ``(B, N, ·)`` tensors over all priors of
all levels (``level_ids`` keeps each prior's level), assigns targets for the whole batch at once and computes
losses on the flattened tensors. Subclasses say how to build their layers, how to run one level, how to compute
losses from flattened predictions, and how to decode boxes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from densedet.losses.focal import FocalLoss, labels_to_binary, sigmoid_focal_loss
from densedet.models.dcn import ModulatedDeformConv2dPack  # noqa: F401  (registers DCNv2 in CONV_LAYERS)
from densedet.models.heads.postprocess import (
    Candidates,
    TestConfig,
    multiclass_nms_batched,
    parse_test_cfg,
    rescale_results,
    select_candidates,
)
from densedet.models.layers import ConvModule
from densedet.registry import ConfigError, check_kwargs, check_types

# Default loss configs of the reference heads (mmdet 2.x RetinaHead / FCOSHead / ATSSHead).
FOCAL_LOSS = {"type": "FocalLoss", "use_sigmoid": True, "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0}
CENTERNESS_LOSS = {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0}
# VarifocalNet's default ``loss_cls_vfl`` (hyz-xmaster/VarifocalNet anchor_head.py / atss_vgfl_head.py)
VFL_LOSS = {"type": "VarifocalLoss", "use_sigmoid": True, "alpha": 0.75, "gamma": 2.0, "iou_weighted": True,
            "loss_weight": 1.0}
GN_32 = {"type": "GN", "num_groups": 32, "requires_grad": True}


def bias_init_with_prob(prior_prob: float) -> float:
    """Bias that makes sigmoid output ``prior_prob`` (Focal Loss paper, Lin et al. 2017, sec. 4.1)."""
    return float(-math.log((1 - prior_prob) / prior_prob))


def iou_class_targets(pos: Tensor, labels: Tensor, ious: Tensor, num_classes: int) -> Tensor:
    """Varifocal Loss targets (VarifocalNet eq. 2): (B, N, C) float32 zeros with ``ious`` (P,) -- the IoU of each
    positive's predicted box with its gt, in ``pos`` (B, N) row-major order -- written, detached, at each positive's
    gt class ``labels`` (B, N)."""
    q = torch.zeros((*pos.shape, num_classes), dtype=torch.float32, device=pos.device)
    b_idx, n_idx = pos.nonzero(as_tuple=True)
    q[b_idx, n_idx, labels[b_idx, n_idx]] = ious.detach().float()
    return q


def flatten_levels(maps: list[Tensor], channels: int) -> Tensor:
    """(B, A*channels, H, W) per level -> (B, sum H*W*A, channels), locations row-major, priors fastest."""
    b = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(b, -1, channels) for m in maps], dim=1)


@dataclass
class TrainConfig:
    """MMDetection's ``train_cfg`` for dense heads (``sampler`` and ``debug`` accepted for compatibility)."""

    assigner: dict[str, Any] | None = None
    allowed_border: int = -1
    pos_weight: float = -1
    debug: bool = False
    sampler: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.sampler is not None and self.sampler.get("type") != "PseudoSampler":
            raise ConfigError("model.train_cfg.sampler: only PseudoSampler (no sampling) is available",
                              path="model.train_cfg.sampler")
        if self.allowed_border != -1:
            raise ConfigError("model.train_cfg.allowed_border: only -1 (every valid prior is used) is available",
                              path="model.train_cfg.allowed_border")


def parse_train_cfg(cfg: dict[str, Any] | None) -> TrainConfig:
    cfg = dict(cfg or {})
    check_kwargs(TrainConfig, cfg, "model.train_cfg")
    check_types(TrainConfig, cfg, "model.train_cfg")
    return TrainConfig(**cfg)


def split_assigner_cfg(cfg: TrainConfig, expected: str, fn: Any) -> dict[str, Any]:
    """Check ``train_cfg.assigner`` names ``expected`` and return its keyword arguments for ``fn``."""
    a = dict(cfg.assigner or {"type": expected})
    kind = a.pop("type", expected)
    if kind != expected:
        raise ConfigError(f"model.train_cfg.assigner.type: this head uses '{expected}', got '{kind}'",
                          path="model.train_cfg.assigner.type")
    check_kwargs(fn, a, "model.train_cfg.assigner")
    check_types(fn, a, "model.train_cfg.assigner")
    if "topk" in a and a["topk"] < 1:  # checked here, when the config loads, not at the first assignment
        raise ConfigError(f"model.train_cfg.assigner.topk={a['topk']!r}: must be >= 1",
                          path="model.train_cfg.assigner.topk")
    return a


@contextlib.contextmanager
def _stateless_call(loss_fn: nn.Module) -> Iterator[None]:
    """Call a loss a second time for statistics without changing its state (e.g. GHM-C's running bin densities).

    A loss with ``replay_last_call`` (GHM) is called from the state its training call of this step started from,
    so the statistics see exactly the weights of this step; every buffer is restored afterwards.
    """
    saved = [(buf, buf.detach().clone()) for buf in loss_fn.buffers()]
    replay = getattr(loss_fn, "replay_last_call", None)
    try:
        with replay() if replay is not None else contextlib.nullcontext():
            yield
    finally:
        for buf, value in saved:
            buf.copy_(value)


def level_kwargs(loss_fn: nn.Module, level_ids: Tensor, num_levels: int) -> dict[str, Any]:
    """The keyword arguments that make ``loss_fn`` compute one loss per pyramid level, as the references' per-level
    ``loss_single`` calls do, for a loss whose value depends on that grouping (``per_level``: GHM-C / GHM-R, whose
    histograms and normalisers are per call); ``{}`` for the others, whose per-level sum equals one call.

    ``level_ids``: the level of every row the loss is given (e.g. ``(B*N,)`` for flattened ``(B, N, C)`` logits).
    """
    if getattr(loss_fn, "per_level", False):
        return {"level_ids": level_ids, "num_levels": num_levels}
    return {}


@dataclass
class LevelPredictions:
    """A head's per-level outputs as the shared inference template needs them (:meth:`DenseHead.decode_levels`).

    ``scores``: per level (B, N_l, C) class probabilities; ``factors``: per level (B, N_l) score factors applied
    after the ``score_thr`` / ``nms_pre`` selection (sigmoid centerness), or None; ``decode(level, prior_idx)``:
    ``prior_idx`` (B, k) indices into that level's priors -> (B, k, 4) boxes xyxy in the input frame, clipped to
    each image's ``img_shape``.
    """

    scores: list[Tensor]
    factors: list[Tensor] | None
    decode: Callable[[int, Tensor], Tensor]


class DenseHead(nn.Module):
    """Shared machinery: conv towers, flattening, level bookkeeping and batched post-processing.

    Subclasses implement ``classifier``, ``forward_level``, ``loss`` and, for inference, only
    :meth:`decode_levels`: :meth:`candidates` and :meth:`predict` are the same for every head.

    ``collect_level_stats``: when True (the trainer sets it on the iterations it logs), ``loss`` also returns the
    per-level imbalance statistics of :meth:`level_stats` (docs/diagnostics.md).
    """

    collect_level_stats: bool = False

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 strides: tuple[int, ...] | list[int] = (8, 16, 32, 64, 128), conv_cfg: dict | None = None,
                 norm_cfg: dict | None = None, conv_bias: bool | str = "auto",
                 train_cfg: dict | None = None, test_cfg: dict | None = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"model.bbox_head.num_classes must be >= 1, got {num_classes}",
                              path="model.bbox_head.num_classes")
        self.num_classes = num_classes
        self.cls_out_channels = num_classes  # sigmoid classifiers: no background channel
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.stacked_convs = stacked_convs
        # anchor generators keep (w, h) stride pairs; heads here use square strides
        self.strides = [int(s[0]) if isinstance(s, (tuple, list)) else int(s) for s in strides]
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.conv_bias = conv_bias
        self.train_cfg = parse_train_cfg(train_cfg)
        self.test_cfg: TestConfig = parse_test_cfg(test_cfg)
        self.collect_level_stats = False

    def _build_tower(self, dcn_on_last_conv: bool = False) -> nn.ModuleList:
        """``stacked_convs`` 3x3 ConvModules; with ``dcn_on_last_conv`` the last is a DCNv2 (mmdet's switch)."""
        convs = nn.ModuleList()
        for i in range(self.stacked_convs):
            last_dcn = dcn_on_last_conv and i == self.stacked_convs - 1
            convs.append(ConvModule(self.in_channels if i == 0 else self.feat_channels, self.feat_channels, 3,
                                    stride=1, padding=1, conv_cfg={"type": "DCNv2"} if last_dcn else self.conv_cfg,
                                    norm_cfg=self.norm_cfg, bias=self.conv_bias))
        return convs

    def towers(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run ``cls_convs`` and ``reg_convs`` on one level: ``(cls_feat, reg_feat)``, each (B, feat_channels, H, W)."""
        c = r = x
        for conv in self.cls_convs:
            c = conv(c)
        for conv in self.reg_convs:
            r = conv(r)
        return c, r

    def init_weights(self) -> None:
        """Normal(0, 0.01) convs, zero bias, classifier bias at prior 0.01 (mmdet ``init_cfg`` of these heads)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        cls = self.classifier()
        nn.init.constant_(cls.bias, bias_init_with_prob(0.01))

    def reset_classifier(self, num_classes: int | None = None) -> None:
        """Re-initialise the classification conv (:meth:`classifier`) as :meth:`init_weights` does (weight ~ N(0,
        0.01), bias at the 0.01 prior), in place; for another ``num_classes`` the conv is re-created first (build the
        optimizer after that)."""
        conv = self.classifier()
        n = self.num_classes if num_classes is None else int(num_classes)
        if n < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}", path="model.bbox_head.num_classes")
        if n != self.num_classes:
            per_class = conv.out_channels // self.num_classes  # priors per location
            new = nn.Conv2d(conv.in_channels, per_class * n, conv.kernel_size, conv.stride, conv.padding,
                            bias=conv.bias is not None).to(device=conv.weight.device, dtype=conv.weight.dtype)
            parent_name, _, attr = next(name for name, m in self.named_modules() if m is conv).rpartition(".")
            setattr(self.get_submodule(parent_name) if parent_name else self, attr, new)
            self.num_classes = n
            self.cls_out_channels = n
            conv = new
        with torch.no_grad():
            nn.init.normal_(conv.weight, 0.0, 0.01)
            if conv.bias is not None:
                nn.init.constant_(conv.bias, bias_init_with_prob(0.01))

    def classifier(self) -> nn.Conv2d:
        """The classification conv whose bias starts at the 0.01 prior (each head names its own)."""
        raise NotImplementedError(f"{type(self).__name__} must define classifier() (abstract in DenseHead)")

    def forward(self, feats: tuple[Tensor, ...] | list[Tensor]) -> tuple[list[Tensor], ...]:
        """Run every level; returns a tuple of per-level lists (e.g. ``(cls_scores, bbox_preds, centernesses)``)."""
        if len(feats) != len(self.strides):
            raise ValueError(f"{type(self).__name__}: got {len(feats)} feature levels for {len(self.strides)} strides")
        outs = [self.forward_level(x, lvl) for lvl, x in enumerate(feats)]
        return tuple(list(o) for o in zip(*outs))

    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, ...]:
        """Per-level outputs for one FPN level ``x`` (B, C, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_level() (abstract in DenseHead)")

    @staticmethod
    def level_ids(num_per_level: list[int], device: torch.device) -> Tensor:
        """(N,) pyramid level of every flattened prior."""
        return torch.repeat_interleave(torch.arange(len(num_per_level), device=device),
                                       torch.tensor(num_per_level, device=device))

    @torch.no_grad()
    def level_stats(self, level_ids: Tensor, pos: Tensor, neg: Tensor,
                    cls_loss: Tensor | None = None) -> dict[str, Tensor]:
        """Per-pyramid-level positive/negative counts (and classification loss) of this batch on this process.

        Args:
            level_ids: (N,) long, the level of every flattened prior (:meth:`level_ids`).
            pos, neg: (B, N) bool, the assigner's positives and negatives (ignored / padded priors in neither).
            cls_loss: (B, N) float, optional per-prior classification loss (summed over classes).

        Returns:
            ``{}`` unless ``self.collect_level_stats``; else for every level ``i`` detached 0-d float tensors
            ``lvl{i}_pos``, ``lvl{i}_neg`` (exact counts over the batch), ``lvl{i}_pos_neg_ratio``
            (``pos / max(neg, 1)``) and, with ``cls_loss``, ``lvl{i}_pos_cls_loss`` / ``lvl{i}_neg_cls_loss``
            (mean over that level's positives / negatives; 0 when there are none).
        """
        if not self.collect_level_stats:
            return {}
        num_levels = len(self.strides)
        level_ids = level_ids.to(pos.device)

        def per_level(values: Tensor) -> Tensor:  # (N,) summed over the batch already -> (L,)
            return values.new_zeros(num_levels).index_add_(0, level_ids, values)

        # integer sums: the counts stay exact however many priors there are
        num_pos = per_level(pos.sum(0)).float()
        num_neg = per_level(neg.sum(0)).float()
        table = {"pos": num_pos, "neg": num_neg, "pos_neg_ratio": num_pos / num_neg.clamp(min=1)}
        if cls_loss is not None:
            loss = cls_loss.detach().float()
            zero = loss.new_zeros(())
            # torch.where, not a product: a non-finite loss on an unused prior must not leak in as nan
            table["pos_cls_loss"] = per_level(torch.where(pos, loss, zero).sum(0)) / num_pos.clamp(min=1)
            table["neg_cls_loss"] = per_level(torch.where(neg, loss, zero).sum(0)) / num_neg.clamp(min=1)
        return {f"lvl{i}_{name}": values[i] for i in range(num_levels) for name, values in table.items()}

    @torch.no_grad()
    def per_prior_cls_loss(self, cls_flat: Tensor, labels: Tensor, label_weights: Tensor | None = None,
                           soft_targets: Tensor | None = None, level_ids: Tensor | None = None) -> Tensor:
        """The element-wise loss of ``self.loss_cls`` (loss_weight and label weights applied, before the
        ``avg_factor`` normalisation), summed over classes.

        Args:
            cls_flat: (B, N, C) logits; labels: (B, N) long, ``num_classes`` = background;
            label_weights: (B, N) or None; soft_targets: (B, N, C) float targets the loss is given instead of
            ``labels`` (Varifocal Loss's IoU-aware scores), or None; level_ids: (N,) level of every prior, which
            a per-level loss (GHM) needs to give the training call's weights.

        Returns:
            (B, N) float32.
        """
        b, n, c = cls_flat.shape
        pred = cls_flat.detach().reshape(-1, c).float()
        lab = labels.reshape(-1) if soft_targets is None else soft_targets.detach().reshape(-1, c).float()
        weight = None if label_weights is None else label_weights.reshape(-1).float()
        loss_fn = self.loss_cls
        if isinstance(loss_fn, FocalLoss) and soft_targets is None:
            # the fused focal loss only returns a sum; the generic form on one-hot targets gives each element
            elem = sigmoid_focal_loss(pred, labels_to_binary(lab, c, pred.dtype), weight, gamma=loss_fn.gamma,
                                      alpha=loss_fn.alpha, reduction="none") * loss_fn.loss_weight
        else:
            extra = {} if level_ids is None else level_kwargs(loss_fn, level_ids.repeat(b), len(self.strides))
            with _stateless_call(loss_fn):
                elem = loss_fn(pred, lab, weight, reduction_override="none", **extra)
        if elem.dim() == 2:
            elem = elem.sum(-1)
        return elem.float().reshape(b, n)

    def loss_level_stats(self, num_per_level: list[int], pos: Tensor, neg: Tensor, cls_flat: Tensor,
                         labels: Tensor, label_weights: Tensor | None = None,
                         soft_targets: Tensor | None = None) -> dict[str, Tensor]:
        """:meth:`level_stats` with the per-prior loss of :meth:`per_prior_cls_loss`; ``{}`` (no work at all)
        unless ``collect_level_stats``. The one call a head's ``loss`` makes; shapes as those two methods
        (heads trained with Varifocal Loss pass its ``soft_targets``)."""
        if not self.collect_level_stats:
            return {}
        level_ids = self.level_ids(num_per_level, pos.device)
        return self.level_stats(level_ids, pos, neg,
                                self.per_prior_cls_loss(cls_flat, labels, label_weights, soft_targets, level_ids))

    @staticmethod
    def valid_prior_mask(featmap_sizes: list[tuple[int, int]], strides: list[int], num_base: int,
                         metas: list[dict[str, Any]], device: torch.device, size_divisor: int = 32) -> Tensor:
        """(B, N) True where a prior's location lies on the image's own padded area, not on batch padding.

        Same rule as MMDetection 2.x ``AnchorGenerator.valid_flags`` called with each image's ``pad_shape``
        (the image padded alone to a multiple of ``size_divisor``): a level's valid size is
        ``min(ceil(pad_size / stride), feat_size)``.
        """
        masks = []
        shapes = torch.tensor([m.get("pad_shape", m["img_shape"])[:2] for m in metas], device=device,
                              dtype=torch.float64)
        shapes = torch.ceil(shapes / size_divisor) * size_divisor  # no-op when collate gave pad_shape
        for (h, w), s in zip(featmap_sizes, strides):
            vh = torch.clamp(torch.ceil(shapes[:, 0] / s), max=h)
            vw = torch.clamp(torch.ceil(shapes[:, 1] / s), max=w)
            ys = torch.arange(h, device=device).repeat_interleave(w * num_base)
            xs = torch.arange(w, device=device).repeat_interleave(num_base).repeat(h)
            masks.append((ys[None] < vh[:, None]) & (xs[None] < vw[:, None]))
        return torch.cat(masks, 1)

    # ------------------------------------------------------------------------------------------------ analysis
    @torch.no_grad()
    def assign_priors(self, featmap_sizes: list[tuple[int, int]], gt: Any,
                      metas: list[dict[str, Any]]) -> tuple[Tensor, list[int]]:
        """The head's own training assignment without the losses (``densedet data check``): ``gt_inds`` (B, N) over
        its priors of all levels (``>= 0``: positive for that gt of the image; negative: background or ignored) and
        the number of priors per level. ``gt``: :class:`~densedet.structures.PaddedTargets`."""
        raise NotImplementedError(f"{type(self).__name__} does not define assign_priors()")

    def prior_size_range(self) -> tuple[float, float]:
        """Smallest and largest object size (``sqrt(w h)``, input pixels) the head's priors are made for (default:
        one stride of the finest level, unbounded above)."""
        return float(min(self.strides)), math.inf

    # ------------------------------------------------------------------------------------------------ inference
    def decode_levels(self, outs: tuple[list[Tensor], ...], metas: list[dict[str, Any]]) -> LevelPredictions:
        """What inference needs from this head's per-level outputs ``outs``: per level class probabilities, score
        factors and a box decoder (:class:`LevelPredictions`). The one method a head writes for inference."""
        raise NotImplementedError(f"{type(self).__name__} must define decode_levels() (abstract in DenseHead)")

    def candidates(self, outs: tuple[list[Tensor], ...], metas: list[dict[str, Any]],
                   cfg: TestConfig | None = None) -> Candidates:
        """Everything :meth:`predict` does before NMS (MMDetection 2.25 ``_get_bboxes_single`` on a batch): per
        level the (prior, class) pairs above ``score_thr``, the ``nms_pre`` best of them, score factors applied,
        only those boxes decoded and clipped. :class:`Candidates` (B, K), boxes xyxy in the input frame (resized,
        possibly flipped: test-time augmentation maps them back, the exported graph keeps them). ``cfg`` defaults
        to the head's ``test_cfg``."""
        lp = self.decode_levels(outs, metas)
        return select_candidates(lp.scores, lp.factors, lp.decode, cfg or self.test_cfg)

    def predict_candidates(self, outs: tuple[list[Tensor], ...], metas: list[dict[str, Any]]) -> Candidates:
        """Deprecated name of :meth:`candidates`."""
        warnings.warn("DenseHead.predict_candidates is deprecated: use candidates()", DeprecationWarning, stacklevel=2)
        return self.candidates(outs, metas)

    def predict(self, outs: tuple[list[Tensor], ...], metas: list[dict[str, Any]],
                rescale: bool = True) -> list[dict[str, Tensor]]:
        """Detections of a batch: :meth:`candidates`, then one class-wise NMS (or soft-NMS) for the whole batch and
        ``max_per_img``. Per image ``{"boxes" (D, 4) xyxy, "scores" (D,), "labels" (D,)}``, by decreasing score;
        boxes in original-image pixels (divided by ``scale_factor``) when ``rescale``."""
        results = multiclass_nms_batched(*self.candidates(outs, metas), self.num_classes, self.test_cfg)
        return rescale_results(results, metas) if rescale else results

    @staticmethod
    def level_sizes(maps: list[Tensor]) -> list[tuple[int, int]]:
        """``(H_l, W_l)`` of every level's map."""
        return [tuple(m.shape[-2:]) for m in maps]  # type: ignore[misc]

    @staticmethod
    def flat_levels(maps: list[Tensor], channels: int, sigmoid: bool = False) -> list[Tensor]:
        """Per level ``(B, A*channels, H, W)`` -> ``(B, H*W*A, channels)`` (:func:`flatten_levels` of one level),
        optionally through a sigmoid."""
        out = [flatten_levels([m], channels) for m in maps]
        return [o.sigmoid() for o in out] if sigmoid else out

    @staticmethod
    def level_slices(num_per_level: list[int]) -> list[slice]:
        """The slice of each level in the priors of all levels concatenated."""
        out, start = [], 0
        for n in num_per_level:
            out.append(slice(start, start + n))
            start += n
        return out

    @staticmethod
    def img_shapes(metas: list[dict[str, Any]], device: torch.device, size_divisor: int = 32) -> Tensor:
        """(B, 2) (h, w) of each image before padding, for clipping decoded boxes."""
        return torch.tensor([m["img_shape"][:2] for m in metas], device=device, dtype=torch.float32)
