"""Deformable convolution v1 / v2 over ``torchvision.ops.deform_conv2d`` (no compiled code of ours).

References: Dai et al., "Deformable Convolutional Networks" (ICCV 2017, v1); Zhu et al., "Deformable ConvNets v2:
More Deformable, Better Results" (CVPR 2019, v2: modulation masks). Parameter names and semantics follow mmcv 1.x
``mmcv/ops/deform_conv.py`` (``DeformConv2d``, ``DeformConv2dPack``) and ``mmcv/ops/modulated_deform_conv.py``
(``ModulatedDeformConv2d``, ``ModulatedDeformConv2dPack``), read, not copied: ``weight`` / ``bias`` and, for the
``Pack`` variants, a zero-initialised ``conv_offset`` predicting offsets (and mask logits) from the input, so a fresh
``Pack`` layer starts as a plain conv (v2: scaled by ``sigmoid(0) = 0.5``).

Offset layout (shared by mmcv and torchvision): ``(B, 2 * deform_groups * kh * kw, H_out, W_out)`` with the
``(dy, dx)`` pair of kernel point ``k`` of group ``g`` at channels ``2 * (g * kh * kw + k) + (0, 1)``; the mask is
``(B, deform_groups * kh * kw, H_out, W_out)``.

Two implementations of the same operator: on CUDA, ``torchvision.ops.deform_conv2d``'s kernel; on CPU,
:func:`deform_conv2d_sampled` (bilinear sampling of the ``kh * kw`` points with ``grid_sample``, then one matmul),
which equals torchvision's result to float rounding and is several times faster there, forward and backward
(torchvision's CPU kernel is a serial im2col loop). ``DCN_IMPL`` picks: ``'auto'`` (the default), ``'torchvision'``
or ``'sampled'``.

Importing this module registers the ``Pack`` layers in :data:`densedet.models.layers.CONV_LAYERS` as ``'DCN'`` (v1)
and ``'DCNv2'`` (v2), the names mmdet configs use in ``dcn=dict(type='DCNv2', deform_groups=1, ...)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torchvision.ops import deform_conv2d

from densedet.models.layers import CONV_LAYERS
from densedet.registry import ConfigError

__all__ = ["DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2d", "ModulatedDeformConv2dPack",
           "deform_conv2d_sampled"]

#: which implementation runs the deformable convolutions: 'auto' (torchvision on CUDA, sampled elsewhere),
#: 'torchvision' or 'sampled'.
DCN_IMPL = "auto"


def deform_conv2d_sampled(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None, stride: tuple[int, int] = (1, 1),
                          padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1),
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Deformable convolution (v1, or v2 with ``mask``) with ``torchvision.ops.deform_conv2d``'s semantics.

    Kernel point ``k = ky * kw + kx`` of output location ``(i, j)`` reads the input at
    ``(i * stride_h - pad_h + ky * dil_h + dy, j * stride_w - pad_w + kx * dil_w + dx)`` by bilinear interpolation,
    corners outside the image counting as zero; with ``mask`` the sample is multiplied by its mask value; the
    samples of all points are then contracted with ``weight`` (grouped by ``groups``).

    Args:
        x: ``(B, C, H, W)``; offset: ``(B, 2 * dg * kh * kw, Ho, Wo)``, ``(dy, dx)`` of point ``k`` of deform group
            ``g`` at channels ``2 * (g * kh * kw + k) + (0, 1)``; weight: ``(Cout, C / groups, kh, kw)``;
            bias: ``(Cout,)``; mask: ``(B, dg * kh * kw, Ho, Wo)``.

    Returns:
        ``(B, Cout, Ho, Wo)``.
    """
    b, c, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    groups, k = c // cin_g, kh * kw
    dg = offset.shape[1] // (2 * k)
    ho, wo = offset.shape[-2:]
    dev = x.device
    # Sampling positions in at least float32: under bf16 autocast the offsets arrive in bf16, whose 8-bit mantissa
    # cannot even hold a pixel row index above 256 exactly, let alone its fraction.
    dt = offset.dtype if offset.dtype in (torch.float32, torch.float64) else torch.float32
    ky = (torch.arange(kh, device=dev, dtype=dt) * dilation[0]).repeat_interleave(kw)
    kx = (torch.arange(kw, device=dev, dtype=dt) * dilation[1]).repeat(kh)
    ys = torch.arange(ho, device=dev, dtype=dt) * stride[0] - padding[0]
    xs = torch.arange(wo, device=dev, dtype=dt) * stride[1] - padding[1]
    off = offset.to(dt).reshape(b, dg, k, 2, ho, wo)
    py = ky.view(1, 1, k, 1, 1) + ys.view(1, 1, 1, ho, 1) + off[:, :, :, 0]
    px = kx.view(1, 1, k, 1, 1) + xs.view(1, 1, 1, 1, wo) + off[:, :, :, 1]
    # pixel p <-> normalised (2p + 1) / size - 1 with align_corners=False; zeros padding = zero outside corners
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], -1).reshape(b * dg, k, ho * wo, 2)
    # grid_sample runs in the positions' precision (autocast would cast a bf16 input up anyway; doing it here
    # keeps the cast out of the expanded view below)
    xs_in = x.reshape(b * dg, c // dg, h, w).to(dt)
    chunks = _sampling_chunks(x, b * dg)
    if chunks > 1:
        return _deform_conv2d_chunked(xs_in, grid, weight, bias, mask, chunks, (ho, wo))
    cols = F.grid_sample(xs_in, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).reshape(b, dg, c // dg, k, ho * wo)
    if mask is not None:
        cols = cols * mask.reshape(b, dg, 1, k, ho * wo).to(cols.dtype)
    cols = cols.reshape(b, groups, cin_g * k, ho * wo)  # channel order (group, channel, point): weight's order
    out = torch.matmul(weight.reshape(groups, cout // groups, cin_g * k), cols).reshape(b, cout, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _sampling_chunks(x: torch.Tensor, batches: int) -> int:
    """How many pieces to cut the sampled points into: PyTorch's CPU ``grid_sample`` parallelises over the batch
    only, so a single image (batch 1, one deform group: inference) samples on one thread; as ``threads`` batches of
    an expanded (not copied) input it uses them all. 1 (no chunking) on CUDA, with several batches, or one thread."""
    if x.device.type != "cpu" or batches != 1 or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return 1
    return max(1, torch.get_num_threads())


def _deform_conv2d_chunked(xs: torch.Tensor, grid: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           mask: torch.Tensor | None, chunks: int, out_hw: tuple[int, int]) -> torch.Tensor:
    """:func:`deform_conv2d_sampled` for one image and one deform group with the output locations cut into
    ``chunks`` batches of ``grid_sample`` over an expanded (stride-0) input: the same per-point arithmetic, so the
    same values, on all threads. ``xs (1, C, H, W)``, ``grid (1, K, P, 2)``, ``mask (1, K, Ho, Wo)`` or None."""
    _, c, _, _ = xs.shape
    cout, cin_g, _, _ = weight.shape
    groups, k = c // cin_g, grid.shape[1]
    p = grid.shape[2]
    per = -(-p // chunks)
    pad = per * chunks - p
    # padded points sample far outside the image (zeros) and are cut off the output
    g = F.pad(grid, (0, 0, 0, pad), value=-4.0) if pad else grid
    g = g.reshape(k, chunks, per, 2).transpose(0, 1)  # (chunks, K, per, 2)
    cols = F.grid_sample(xs.expand(chunks, -1, -1, -1), g, mode="bilinear", padding_mode="zeros",
                         align_corners=False)  # (chunks, C, K, per)
    if mask is not None:
        m = mask.reshape(k, p).to(cols.dtype)
        m = F.pad(m, (0, pad)) if pad else m
        cols = cols * m.reshape(k, chunks, per).transpose(0, 1).unsqueeze(1)
    cols = cols.reshape(chunks, groups, cin_g * k, per)
    out = torch.matmul(weight.reshape(groups, cout // groups, cin_g * k), cols)  # (chunks, G, Cout / G, per)
    out = out.reshape(chunks, cout, per).transpose(0, 1).reshape(cout, chunks * per)[:, :p]
    out = out.reshape(1, cout, *out_hw)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


class _DeformConvBase(nn.Module):
    """Holds ``weight (out, in / groups, kh, kw)`` and optional ``bias (out,)`` plus the conv geometry."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        deformable_groups: int | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if deformable_groups is not None:  # mmcv's deprecated spelling, still found in older configs
            deform_groups = deformable_groups
        if not isinstance(bias, bool):
            raise ConfigError(f"{name}: bias must be a bool, got {bias!r}")
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ConfigError(f"{name}: in_channels {in_channels} and out_channels {out_channels} must be divisible "
                              f"by groups {groups}")
        if deform_groups < 1 or in_channels % deform_groups:
            raise ConfigError(f"{name}: in_channels {in_channels} must be divisible by deform_groups {deform_groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)

    @property
    def num_kernel_points(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def _deform(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if DCN_IMPL == "sampled" or (DCN_IMPL == "auto" and x.device.type != "cuda"):
            return deform_conv2d_sampled(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                                         dilation=self.dilation, mask=mask)
        return deform_conv2d(
            x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, bias={self.bias is not None}")


class DeformConv2d(_DeformConvBase):
    """Deformable conv v1 with externally given offsets (e.g. VFNet's star-shaped sampling points).

    ``forward(x, offset)``: ``x (B, in, H, W)``, ``offset (B, 2 * deform_groups * kh * kw, H_out, W_out)`` ->
    ``(B, out, H_out, W_out)``. mmcv's v1 layer has no bias; ``bias=True`` is accepted here (torchvision supports
    it) but no mmdet checkpoint has one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming-uniform weight (relu gain), zero bias (mmcv 1.x ``DeformConv2d.reset_parameters``)."""
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return self._deform(x, offset, None)


class ModulatedDeformConv2d(_DeformConvBase):
    """Deformable conv v2 with externally given offsets and masks.

    ``forward(x, offset, mask)``: ``offset (B, 2 * dg * kh * kw, H_out, W_out)``, ``mask (B, dg * kh * kw, H_out,
    W_out)`` (already in [0, 1]) -> ``(B, out, H_out, W_out)``.
    """

    def __init__(self, *args: Any, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, bias=bias, **kwargs)  # mmcv's v2 default is bias=True
        self.init_weights()

    def init_weights(self) -> None:
        """Uniform(-1/sqrt(n), 1/sqrt(n)) weight with ``n = in * kh * kw``, zero bias (mmcv ``init_weights``)."""
        stdv = 1.0 / math.sqrt(self.in_channels * self.num_kernel_points)
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._deform(x, offset, mask)


def _offset_conv(layer: _DeformConvBase, per_point: int) -> nn.Conv2d:
    """``conv_offset``: same geometry as the deformable conv, so its output has the output's spatial size."""
    return nn.Conv2d(
        layer.in_channels,
        layer.deform_groups * per_point * layer.num_kernel_points,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        bias=True,
    )


class _ZeroOffsetInit:
    """``init_weights`` of the ``Pack`` layers: the deformable conv's own init, then a zero ``conv_offset`` so a
    fresh layer starts as a plain conv (v2: scaled by the mask ``sigmoid(0) = 0.5``), as mmcv."""

    def init_weights(self) -> None:
        super().init_weights()  # type: ignore[misc]
        if hasattr(self, "conv_offset"):  # the parent's __init__ calls this before conv_offset exists
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)


class DeformConv2dPack(_ZeroOffsetInit, DeformConv2d):
    """DCN v1 that predicts its own offsets: ``conv_offset`` (``2 * deform_groups * kh * kw`` channels).

    Drop-in for ``nn.Conv2d`` (``forward(x)``); registered as ``CONV_LAYERS['DCN']``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = _offset_conv(self, 2)
        self.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self._deform(x, self.conv_offset(x), None)


class ModulatedDeformConv2dPack(_ZeroOffsetInit, ModulatedDeformConv2d):
    """DCN v2 that predicts offsets and masks: ``conv_offset`` (``3 * deform_groups * kh * kw`` channels).

    The first two thirds of ``conv_offset``'s output are the offsets (mmcv splits them into two chunks and
    concatenates them back, which is the identity), the last third goes through a sigmoid to give the mask.
    Drop-in for ``nn.Conv2d`` (``forward(x)``); registered as ``CONV_LAYERS['DCNv2']``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = _offset_conv(self, 3)
        self.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = self.conv_offset(x)
        split = 2 * self.deform_groups * self.num_kernel_points
        return self._deform(x, out[:, :split], out[:, split:].sigmoid())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # mmcv < 1.0 (state-dict version 1) called the offset/mask conv ``conv_offset_mask``; mmcv renames it too.
        for suffix in ("weight", "bias"):
            old, new = f"{prefix}conv_offset_mask.{suffix}", f"{prefix}conv_offset.{suffix}"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# Registration: the names mmcv registers in its CONV_LAYERS table.
CONV_LAYERS["DCN"] = DeformConv2dPack
CONV_LAYERS["DCNv2"] = ModulatedDeformConv2dPack
