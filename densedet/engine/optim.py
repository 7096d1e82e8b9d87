"""Optimizer construction with MMDetection's parameter-wise multipliers.

Semantics follow mmcv's ``DefaultOptimizerConstructor`` (mmcv/runner/optimizer/default_constructor.py, used by
MMDetection 2.x): ``custom_keys`` win over every other rule (longest matching key first); otherwise bias
parameters get ``bias_lr_mult`` / ``bias_decay_mult`` unless they belong to a norm layer or a deformable
convolution's offset conv, and both weight and bias of norm layers get ``norm_decay_mult``. Unlike mmcv, frozen
parameters are left out of the optimizer entirely, and parameters with the same (lr, weight_decay) share one group.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from densedet.config.schema import OptimizerConfig
from densedet.registry import ConfigError

__all__ = ["NORM_TYPES", "build_optimizer", "param_multipliers", "scaled_lr"]

# Layers whose weight and bias are "norm" parameters (mmcv: _BatchNorm, _InstanceNorm, GroupNorm, LayerNorm;
# SyncBatchNorm is a _BatchNorm).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
)

logger = logging.getLogger("densedet")


def scaled_lr(cfg: OptimizerConfig, total_batch_size: int) -> float:
    """``cfg.lr`` scaled linearly by ``total_batch_size / cfg.base_batch_size`` when ``cfg.auto_scale_lr``.

    Linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD"), as MMDetection's ``auto_scale_lr``.
    """
    if total_batch_size < 1:
        raise ValueError(f"build_optimizer: total_batch_size must be >= 1, got {total_batch_size}")
    if not cfg.auto_scale_lr:
        return float(cfg.lr)
    if cfg.base_batch_size < 1:
        raise ConfigError(f"optimizer.base_batch_size must be >= 1, got {cfg.base_batch_size}",
                          path="optimizer.base_batch_size")
    return float(cfg.lr) * total_batch_size / cfg.base_batch_size


def param_multipliers(model: nn.Module, cfg: OptimizerConfig) -> list[tuple[str, nn.Parameter, float, float]]:
    """``(name, param, lr_mult, decay_mult)`` for every trainable parameter, in ``named_parameters`` order.

    A parameter shared by several modules is listed once (its first occurrence), like mmcv's ``bypass_duplicate``.
    """
    pw = cfg.paramwise
    custom = dict(pw.custom_keys or {})
    for key, mults in custom.items():
        if not isinstance(mults, dict) or set(mults) - {"lr_mult", "decay_mult"}:
            raise ConfigError(f"optimizer.paramwise.custom_keys.{key}: expected a mapping with lr_mult and/or "
                              f"decay_mult, got {mults!r}", path=f"optimizer.paramwise.custom_keys.{key}")
    # mmcv sorts alphabetically, then by length (stable), longest first: the most specific key wins.
    sorted_keys = sorted(sorted(custom), key=len, reverse=True)

    out: list[tuple[str, nn.Parameter, float, float]] = []
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_TYPES)
        # mmcv keeps the lr of a DCN's offset conv bias (is_dcn_module); our DCN wrapper names it conv_offset.
        is_offset = "conv_offset" in mod_name
        for p_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            lr_mult, decay_mult = 1.0, 1.0
            key = next((k for k in sorted_keys if k in full), None)
            if key is not None:
                lr_mult = float(custom[key].get("lr_mult", 1.0))
                decay_mult = float(custom[key].get("decay_mult", 1.0))
            else:
                if p_name == "bias" and not (is_norm or is_offset):
                    lr_mult = pw.bias_lr_mult
                if is_norm:
                    decay_mult = pw.norm_decay_mult
                elif p_name == "bias" and not is_offset:
                    decay_mult = pw.bias_decay_mult
            out.append((full, param, float(lr_mult), float(decay_mult)))
    return out


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, total_batch_size: int) -> torch.optim.Optimizer:
    """Build SGD or AdamW over the trainable parameters of ``model`` (unwrap DDP first or pass it; both work).

    Args:
        model: the detector.
        cfg: optimizer section of the config.
        total_batch_size: images per optimizer step over all processes (samples_per_gpu * world_size).

    Returns:
        The optimizer. Each param group has ``lr`` and ``initial_lr`` (= scaled base lr * lr_mult, what
        :class:`densedet.engine.lr_schedule.LrScheduler` multiplies by its factor), ``weight_decay``, and
        ``lr_mult`` / ``decay_mult``. ``optimizer.defaults["lr"]`` is the scaled base lr.
    """
    base_lr = scaled_lr(cfg, total_batch_size)
    base_wd = float(cfg.weight_decay)
    entries = param_multipliers(model, cfg)
    if not entries:
        raise ConfigError("the model has no trainable parameters (every parameter is frozen: check "
                          "model.backbone.frozen_stages / requires_grad settings)")

    # One group per distinct (lr_mult, decay_mult), in order of first appearance (deterministic across ranks).
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for _name, param, lr_mult, decay_mult in entries:
        key = (lr_mult, decay_mult)
        if key not in groups:
            lr = base_lr * lr_mult
            groups[key] = {"params": [], "lr": lr, "initial_lr": lr, "weight_decay": base_wd * decay_mult,
                           "lr_mult": lr_mult, "decay_mult": decay_mult}
        groups[key]["params"].append(param)
    param_groups = list(groups.values())

    if cfg.type == "SGD":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            param_groups, lr=base_lr, momentum=cfg.momentum, weight_decay=base_wd, nesterov=cfg.nesterov)
    elif cfg.type == "AdamW":
        betas = tuple(float(b) for b in cfg.betas)
        if len(betas) != 2:
            raise ConfigError(f"optimizer.betas must have two values, got {cfg.betas!r}", path="optimizer.betas")
        optimizer = torch.optim.AdamW(param_groups, lr=base_lr, betas=betas, eps=cfg.eps, weight_decay=base_wd)
    else:
        raise ConfigError(f"optimizer.type must be SGD or AdamW, got '{cfg.type}'", path="optimizer.type")

    how = (f"{cfg.lr} x {total_batch_size} / {cfg.base_batch_size} (auto_scale_lr)" if cfg.auto_scale_lr
           else "auto_scale_lr off")
    logger.info("optimizer %s: lr %.6g = %s, weight_decay %g, %d params in %d groups", cfg.type, base_lr, how,
                base_wd, len(entries), len(param_groups))
    return optimizer
