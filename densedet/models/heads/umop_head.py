"""UMOP's level-wise resampling head ``LRPHead`` (Wu et al., "Unified Multi-level Optimization Paradigm",
arXiv:2109.07217; reference: zimoqingfeng/UMOP ``mmdet/models/dense_heads/level_resampling_head.py``).

The ATSS head (same layers, so the same checkpoint layout: the reference adds no parameter), whose classification
loss is computed level by level with the progressive focal loss (:mod:`densedet.losses.pfocal`): every pyramid level
``l`` gets its own ``gamma_l`` / ``alpha_l`` from the cross-entropy of its own positives at this step. Box (GIoU,
centerness-weighted) and centerness losses are ATSS's.

Normalisation, as the reference does it (``LRPHead.loss_single`` called by mmdet 2.14 ``ATSSHead.loss``): every
level's focal-loss sum is divided by the *same* ``num_total_samples = max(reduce_mean(sum over images of
max(#positives, 1)), 1)`` and the per-level losses are summed (mmdet sums a loss list); the box loss by
``max(reduce_mean(centerness-target sum), 1)`` (``centerness_norm='clamp1'``, this head's default). Independence
between levels is in the resampling (gamma_l, alpha_l depend only on level l), not in the normaliser.
``cls_norm='level'`` (not in the reference, opt-in) divides each level by ``max(reduce_mean(positives of that level),
1)`` instead, so one level's loss no longer depends on the other levels at all.

Logged statistics (detached 0-d tensors, not ``loss*`` keys): ``lvl{i}_gamma`` / ``lvl{i}_alpha``, the values used at
this step (the same on every process), ``lvl{i}_loss_cls``, level i's normalised share of ``loss_cls``, and on the
iterations the trainer logs the per-level counts and losses of :meth:`DenseHead.level_stats`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from densedet.dist import reduce_mean
from densedet.losses.focal import labels_to_binary, sigmoid_focal_loss
from densedet.losses.pfocal import ProgressiveFocalLoss, positive_ce_condition
from densedet.models.heads.anchor_heads import ATSSHead, centerness_normaliser, images_at_least_one_positive
from densedet.models.heads.dense_head import flatten_levels
from densedet.registry import HEADS, ConfigError

# The reference config's loss_cls (configs/umop/umop_r50_fpn_1x_coco.py; gamma keeps the loss's default 2.0).
PROGRESSIVE_FOCAL_LOSS = {"type": "ProgressiveFocalLoss", "use_sigmoid": True, "gamma": 2.0, "delta": 0.5, "w": 0.5,
                          "loss_weight": 1.0}


@HEADS.register()
class LRPHead(ATSSHead):
    """ATSS head with UMOP's level-wise progressive focal loss (see the module docstring).

    Args: those of :class:`ATSSHead` (``loss_cls`` must be a ``ProgressiveFocalLoss``, the default), plus
    ``cls_norm``: ``'global'`` (reference: every level over all positives) or ``'level'`` (each level over its own);
    ``centerness_norm``: the box-loss normaliser's floor, ``'clamp1'`` by default (UMOP's mmdet 2.14).
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, stacked_convs: int = 4,
                 conv_cfg: dict | None = None, norm_cfg: dict | None = None,
                 anchor_generator: dict | None = None, bbox_coder: dict | None = None,
                 reg_decoded_bbox: bool = True, loss_cls: dict | None = None, loss_bbox: dict | None = None,
                 loss_centerness: dict | None = None, cls_norm: str = "global", centerness_norm: str = "clamp1",
                 train_cfg: dict | None = None, test_cfg: dict | None = None, init_cfg: dict | None = None) -> None:
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                         anchor_generator=anchor_generator, bbox_coder=bbox_coder, reg_decoded_bbox=reg_decoded_bbox,
                         loss_cls=loss_cls or PROGRESSIVE_FOCAL_LOSS, loss_bbox=loss_bbox,
                         loss_centerness=loss_centerness, centerness_norm=centerness_norm, train_cfg=train_cfg,
                         test_cfg=test_cfg, init_cfg=init_cfg)
        if not isinstance(self.loss_cls, ProgressiveFocalLoss):
            raise ConfigError(f"model.bbox_head.loss_cls.type: LRPHead sets a focusing parameter per level and needs "
                              f"ProgressiveFocalLoss, got {type(self.loss_cls).__name__}",
                              path="model.bbox_head.loss_cls.type")
        if cls_norm not in ("global", "level"):
            raise ConfigError(f"model.bbox_head.cls_norm: 'global' (reference) or 'level', got {cls_norm!r}",
                              path="model.bbox_head.cls_norm")
        self.cls_norm = cls_norm

    def loss(self, outs: tuple[list[Tensor], ...], targets: list[dict[str, Tensor]],
             metas: list[dict[str, Any]]) -> dict[str, Tensor]:
        """Losses of a batch: ``loss_cls`` (sum over levels), ``loss_bbox``, ``loss_centerness``, plus statistics.

        ``outs`` = ``(cls_scores, bbox_preds, centernesses)``, per level ``(B, A*C, H, W)``, ``(B, A*4, H, W)``,
        ``(B, A, H, W)``; ``targets`` boxes xyxy in input-image pixels.
        """
        cls_scores, bbox_preds, centernesses = outs
        device = cls_scores[0].device
        c = self.num_classes
        t = self.assign_anchors(cls_scores, targets, metas)
        priors, per_level, labels, gt_boxes, label_weights, pos = (
            t.priors, t.num_per_level, t.labels, t.gt_boxes, t.label_weights, t.pos)
        num_levels = len(per_level)
        level_ids = self.level_ids(per_level, device)

        # Per level (B, n_l, C) logits, labels and weights: the loss is a sum of one focal loss per level.
        starts = [0]
        for n in per_level:
            starts.append(starts[-1] + n)
        cls_levels = [flatten_levels([s], c) for s in cls_scores]
        lab_levels = [labels[:, starts[i]:starts[i + 1]] for i in range(num_levels)]
        lw_levels = [label_weights[:, starts[i]:starts[i + 1]] for i in range(num_levels)]

        bbox_flat = flatten_levels(bbox_preds, 4)
        ctr_flat = flatten_levels(centernesses, 1)[..., 0]
        pos_priors = priors.expand(pos.shape[0], -1, -1)[pos]
        pos_gt = gt_boxes[pos]
        ctr_targets = self.centerness_target(pos_priors, pos_gt)

        # One collective for everything averaged over processes: per-level conditions, per-level positives, the
        # total positives (each image counting at least one, as mmdet get_targets), the centerness-target sum
        # (ATSS's box-loss normaliser); then one host sync.
        cond = torch.stack([positive_ce_condition(x, y, w) for x, y, w in zip(cls_levels, lab_levels, lw_levels)])
        pos_per_level = torch.zeros(num_levels, device=device).index_add_(0, level_ids, pos.sum(0).float())
        packed = torch.cat([cond.to(device), pos_per_level, images_at_least_one_positive(pos)[None],
                            ctr_targets.sum().detach().float()[None]])
        host = reduce_mean(packed).tolist()
        conds = host[:num_levels]
        num_total = max(host[2 * num_levels], 1.0)
        norms = [max(n, 1.0) for n in host[num_levels:2 * num_levels]] if self.cls_norm == "level" else \
            [num_total] * num_levels

        level_losses = [self.loss_cls(x.reshape(-1, c), y.reshape(-1), w.reshape(-1), avg_factor=norm, lvl_gamma=cond_l)
                        for x, y, w, cond_l, norm in zip(cls_levels, lab_levels, lw_levels, conds, norms)]
        loss_cls = torch.stack(level_losses).sum()  # mmdet sums the reference's per-level loss list

        if pos_gt.numel():
            decoded = self.bbox_coder.decode(pos_priors, bbox_flat[pos])
            loss_bbox = self.loss_bbox(decoded, pos_gt, weight=ctr_targets, avg_factor=1.0)
            loss_ctr = self.loss_centerness(ctr_flat[pos], ctr_targets, avg_factor=num_total)
        else:
            loss_bbox = bbox_flat.sum() * 0
            loss_ctr = ctr_flat.sum() * 0
        bbox_avg = centerness_normaliser(host[2 * num_levels + 1], self.centerness_norm)

        gammas, alphas = self.loss_cls.gamma_alpha(torch.tensor(conds, device=device))
        out = {"loss_cls": loss_cls, "loss_bbox": loss_bbox / bbox_avg, "loss_centerness": loss_ctr,
               "num_pos": pos.sum().float().detach()}
        for i in range(num_levels):
            out[f"lvl{i}_gamma"] = gammas[i]
            out[f"lvl{i}_alpha"] = alphas[i]
            out[f"lvl{i}_loss_cls"] = level_losses[i].detach().float()
        if getattr(self, "collect_level_stats", False):  # DenseHead.level_stats (docs/diagnostics.md)
            per_prior = self.per_level_cls_loss(cls_levels, lab_levels, lw_levels, gammas.tolist(), alphas.tolist())
            out.update(self.level_stats(level_ids, pos, t.neg, per_prior))
        return out

    @torch.no_grad()
    def per_level_cls_loss(self, cls_levels: list[Tensor], lab_levels: list[Tensor], lw_levels: list[Tensor],
                           gammas: list[float], alphas: list[float]) -> Tensor:
        """(B, N) per-prior progressive focal loss (each level with its own gamma / alpha, loss_weight and label
        weights applied, before normalisation, summed over classes), for the level statistics.

        ``cls_levels[l]`` (B, n_l, C) logits, ``lab_levels[l]`` / ``lw_levels[l]`` (B, n_l).
        """
        parts = []
        for x, y, w, g, a in zip(cls_levels, lab_levels, lw_levels, gammas, alphas):
            pred = x.detach().float()
            elem = sigmoid_focal_loss(pred, labels_to_binary(y, pred.shape[-1], pred.dtype), w.float(), gamma=g,
                                      alpha=a, reduction="none")
            parts.append(elem.sum(-1) * self.loss_cls.loss_weight)
        return torch.cat(parts, 1)
