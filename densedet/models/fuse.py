"""Fold eval-mode / frozen BatchNorm into the preceding convolution for inference.

A BN in inference computes ``y = x * s + t`` per channel with ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean * s``; after a convolution ``x = W * z + b`` this is the convolution with ``W' = W * s`` (scaled
per output channel) and ``b' = b * s + t`` (Ioffe & Szegedy 2015, "Batch Normalization", section 3.2: the
inference-time BN is a linear transform that can be merged into the preceding layer). The deformable convolutions
of :mod:`densedet.models.dcn` are linear in ``weight`` with the bias added last, so they fold the same way (their
``conv_offset`` reads the input, not the output, and is untouched).

Only pairs whose conv output feeds the BN and nothing else are folded. They are found by structure, the layouts
DenseDet's modules use:

* :class:`~densedet.models.layers.ConvModule`: ``conv`` -> its norm;
* ResNet / ResNeXt / Res2Net stems and blocks: ``conv{i}`` -> the module named by ``norm{i}_name``; Res2Net's
  ``convs[i]`` -> ``bns[i]``;
* ``nn.Sequential``: a conv child directly followed by a BN child (ResNet shortcuts, deep stems).

The folded BN is replaced by ``nn.Identity`` (attribute names stay, so forward code is unchanged). The fold is
computed in float64 and cast back, so the fused model equals the unfused one to float rounding (tested within
1e-5 relative in tests/test_fuse.py).
"""

from __future__ import annotations

import torch
from torch import nn

from densedet.models.dcn import _DeformConvBase
from densedet.models.layers import ConvModule

__all__ = ["fold_bn_into_conv", "fuse_conv_bn"]

_FOLDABLE_CONVS = (nn.Conv2d, _DeformConvBase)


def _is_foldable_bn(m: nn.Module) -> bool:
    # SyncBatchNorm is a _BatchNorm, not a BatchNorm2d; FrozenBatchNorm2d is a BatchNorm2d that is always "eval".
    return (isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and not m.training and m.track_running_stats
            and m.running_mean is not None)


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval mode) into ``conv`` in place: ``conv`` then computes ``bn(conv(x))``.

    ``conv``: ``nn.Conv2d`` or a DenseDet deformable conv with ``weight (Cout, Cin / g, kh, kw)`` and optional
    ``bias (Cout,)`` (created if absent). ``bn``: ``Cout`` channels.
    """
    w = conv.weight.double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    if w.shape[0] != mean.numel():
        raise ValueError(f"fold_bn_into_conv: conv has {w.shape[0]} output channels, BN {mean.numel()}")
    scale = gamma / torch.sqrt(var + bn.eps)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter((w * scale.view(-1, 1, 1, 1)).to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(((b - mean) * scale + beta).to(dtype), requires_grad=False)


def _pairs(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """``(conv_parent, conv_attr, bn_parent, bn_attr)`` candidates directly under ``module``."""
    found: list[tuple[nn.Module, str, nn.Module, str]] = []
    if isinstance(module, ConvModule) and module.norm_name:
        found.append((module, "conv", module, module.norm_name))
    elif isinstance(module, nn.Sequential):
        names = [n for n, _ in module.named_children()]
        for a, b in zip(names, names[1:]):
            found.append((module, a, module, b))
    else:
        for i in range(1, 5):
            norm_name = getattr(module, f"norm{i}_name", None)
            if isinstance(norm_name, str) and hasattr(module, f"conv{i}"):
                found.append((module, f"conv{i}", module, norm_name))
        convs, bns = getattr(module, "convs", None), getattr(module, "bns", None)
        if isinstance(convs, nn.ModuleList) and isinstance(bns, nn.ModuleList) and len(convs) == len(bns):
            found.extend((convs, str(i), bns, str(i)) for i in range(len(convs)))
    return found


def fuse_conv_bn(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a conv (see the module doc) into it, in place.

    ``model`` must be in eval mode where it matters (a BN in training mode is left alone: it normalises with batch
    statistics). Returns the number of folded BN layers. The model's state dict loses the folded BN keys, so fuse
    after loading a checkpoint, never before saving one.
    """
    count = 0
    for module in list(model.modules()):
        for conv_parent, conv_name, bn_parent, bn_name in _pairs(module):
            conv, bn = getattr(conv_parent, conv_name, None), getattr(bn_parent, bn_name, None)
            if not (isinstance(conv, _FOLDABLE_CONVS) and _is_foldable_bn(bn)):
                continue
            if conv.weight.shape[0] != bn.num_features:
                continue
            fold_bn_into_conv(conv, bn)
            setattr(bn_parent, bn_name, nn.Identity())  # Sequential / ModuleList children are attributes too
            count += 1
    return count
