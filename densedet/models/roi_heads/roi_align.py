"""RoIAlign on CPU as sparse matrix products: the same values and input gradients as
``torchvision.ops.roi_align`` (and mmcv's ``RoIAlign``), several times faster on CPU, training included.

Why: with MMDetection's ``sampling_ratio=0`` every bin averages ``ceil(roi_h / out_h) x ceil(roi_w / out_w)``
bilinear samples, and torchvision's CPU kernels loop over RoIs, channels and samples one at a time; its backward
recomputes the bilinear weights for every channel and was ~17% of a Mask R-CNN training step on CPU.

How: RoIAlign is linear in the features. Each output bin is a fixed weighted sum of feature pixels, and the
bilinear weights are separable (torchvision ``roi_align_kernel.cpp``, ``bilinear_interpolate``): a sample at
``(y, x)`` weighs pixel ``(i, j)`` by ``wy_i(y) * wx_j(x)``, and it is dropped when ``y < -1 or y > H`` *or*
``x < -1 or x > W`` (a product of two indicators). So the bin's weight on pixel ``(i, j)`` is
``ay[i] * ax[j]`` with ``ay[i] = sum_iy wy_i(y_iy) / grid_h`` (the same for ``x``): ``grid_h + 1`` rows times
``grid_w + 1`` columns per bin instead of torchvision's ``4 * grid_h * grid_w`` taps. The bins of a chunk of RoIs
on one level form a sparse ``(n * out_h * out_w, B * H * W)`` matrix ``M``; the level's features, in NHWC order, a
dense ``(B * H * W, C)`` one. Forward is ``M @ F``, backward ``dF += M^T @ dOut``, each a ``torch.sparse.mm`` /
``addmm_`` (a vectorised axpy of ``C`` channels per non-zero); chunks bound the temporary memory. Sums run in a
different order than torchvision's, so results agree to float rounding (tests: ``tests/test_roi_align.py``).

Used by :class:`~densedet.models.roi_heads.SingleRoIExtractor` on CPU outside tracing/export; CUDA keeps
torchvision's kernel (parallel there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["multilevel_roi_align", "roi_align", "sparse_roi_align_supported"]

# Per sparse product: output rows (RoI bins; the temporary (rows, C) result is ~8 MiB at C = 256) and padded
# (bin, window pixel) entries while building M (~40 bytes each).
_ROWS_PER_CHUNK = 8192
_ENTRIES_PER_CHUNK = 1 << 20


def sparse_roi_align_supported(feats: Sequence[Tensor]) -> bool:
    """Whether :func:`multilevel_roi_align` handles these features: float32/float64 on CPU, eager mode (ONNX export,
    tracing and ``torch.compile`` see torchvision's op instead)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    return all(f.device.type == "cpu" and f.dtype in (torch.float32, torch.float64) for f in feats)


def _axis_weights(start: Tensor, length: Tensor, grid: Tensor, size: Tensor, pooled: int) -> tuple[Tensor, Tensor]:
    """Per-bin pixel weights along one axis, the samples' bilinear weights summed and divided by the grid.

    Args:
        start, length: ``(R,)`` the RoI's start and extent on this axis in feature pixels (torchvision's
            ``roi_start_w`` / ``roi_width``); grid: ``(R,)`` samples per bin (int64, may be 0);
        size: ``(R,)`` the feature map's extent on this axis (int64); pooled: output bins on this axis.

    Returns:
        ``first (R, pooled)`` int64 first pixel of each bin's window and ``weights (R, pooled, K)``: the bin's weight
        on pixel ``first + k`` (0 outside the map or for dropped samples).
    """
    dtype = start.dtype
    g = max(int(grid.max()), 1)
    bin_size = length / pooled
    p = torch.arange(pooled, dtype=dtype)[None, :, None]
    i = torch.arange(g, dtype=dtype)[None, None, :]
    # torchvision: yy = roi_start_h + ph * bin_size_h + (iy + .5f) * bin_size_h / roi_bin_grid_h, in this order
    b = bin_size[:, None, None]
    y = (start[:, None, None] + p * b) + (i + 0.5) * b / grid[:, None, None].clamp(min=1).to(dtype)
    size_f = size[:, None, None].to(dtype)
    used = (i < grid[:, None, None]) & (y >= -1.0) & (y <= size_f)
    y = y.clamp(min=0)
    low = y.long()  # y >= 0: truncation is floor
    top = low >= size[:, None, None] - 1
    low = torch.where(top, size[:, None, None] - 1, low)
    y = torch.where(top, low.to(dtype), y)
    frac = y - low.to(dtype)
    w_low = torch.where(used, 1.0 - frac, 0.0)
    w_high = torch.where(used, frac, 0.0)
    high = torch.where(top, low, low + 1)
    big = torch.iinfo(torch.int64).max
    first = torch.where(used, low, big).amin(-1)
    first = torch.where(first == big, 0, first)  # a bin without samples: weights are all 0
    off_low = torch.where(used, low - first[..., None], 0)
    off_high = torch.where(used, high - first[..., None], 0)
    k = int(off_high.max()) + 1
    weights = torch.zeros((*first.shape, k), dtype=dtype)
    weights.scatter_add_(2, off_low, w_low).scatter_add_(2, off_high, w_high)
    return first, weights / grid.clamp(min=1).to(dtype)[:, None, None]


def _geometry(rois: Tensor, scale: float, output_size: tuple[int, int], sampling_ratio: int,
              aligned: bool) -> tuple[Tensor, ...]:
    """``(y1, x1, h, w, grid_h, grid_w)`` of ``(R, 5)`` RoIs in feature pixels, computed in torchvision's order
    (roi_align_kernel.cpp: ``roi_start = x1 * spatial_scale - offset``, ``roi_width = roi_end - roi_start``)."""
    oh, ow = output_size
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    rw, rh = rois[:, 3] * scale - offset - x1, rois[:, 4] * scale - offset - y1
    if not aligned:  # legacy (Detectron) mode: RoIs at least one pixel
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    if sampling_ratio > 0:
        gh = gw = torch.full(x1.shape, sampling_ratio, dtype=torch.long)
    else:
        gh, gw = torch.ceil(rh / oh).long(), torch.ceil(rw / ow).long()
    return y1, x1, rh, rw, gh, gw


def _chunks(geometry: tuple[Tensor, ...], output_size: tuple[int, int]) -> list[Tensor]:
    """Split RoIs (indices into ``geometry``) into chunks of at most ``_ROWS_PER_CHUNK`` output rows and
    ``_ENTRIES_PER_CHUNK`` padded window entries, RoIs of similar window size together (less padding; a few huge
    RoIs do not inflate the windows of all the others)."""
    oh, ow = output_size
    _, _, rh, rw, _, _ = geometry
    # window pixels per bin and axis: at most ceil(bin) + 1 (bin = extent / bins, clamped to >= 0)
    ky = torch.ceil(rh.clamp(min=0) / oh).long() + 2
    kx = torch.ceil(rw.clamp(min=0) / ow).long() + 2
    cost = ky * kx * (oh * ow)
    order = cost.argsort(stable=True)
    costs = cost[order].tolist()
    max_rois = max(1, _ROWS_PER_CHUNK // (oh * ow))
    out, start = [], 0
    while start < len(costs):
        end = start + 1
        while end < len(costs) and end - start < max_rois and (end + 1 - start) * costs[end] <= _ENTRIES_PER_CHUNK:
            end += 1
        out.append(order[start:end])
        start = end
    return out


def _level_entries(geometry: tuple[Tensor, ...], rows: Tensor, col_base: Tensor, h: int, w: int,
                   output_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Non-zeros of ``M`` for RoIs on one level: (row, column, value) with rows ``rows[r] * oh * ow + bin`` and
    columns ``col_base[r] + y * w + x`` (``col_base``: the first row of the RoI's image in the level's NHWC rows)."""
    oh, ow = output_size
    y1, x1, rh, rw, gh, gw = geometry
    n = y1.shape[0]
    fy, wy = _axis_weights(y1, rh, gh, torch.full((n,), h), oh)
    fx, wx = _axis_weights(x1, rw, gw, torch.full((n,), w), ow)
    ky, kx = wy.shape[-1], wx.shape[-1]
    # (R, oh, ow, ky, kx) weights and pixel indices
    vals = wy[:, :, None, :, None] * wx[:, None, :, None, :]
    ys = fy[:, :, None] + torch.arange(ky)  # (R, oh, ky)
    xs = fx[:, :, None] + torch.arange(kx)  # (R, ow, kx)
    cols = col_base[:, None, None, None, None] + ys[:, :, None, :, None] * w + xs[:, None, :, None, :]
    # keep the non-zeros only: pixels past the map's edge and padding of the windows have weight 0
    keep = vals.reshape(-1).nonzero().squeeze(1)
    bin_idx = keep // (ky * kx)  # local RoI * oh * ow + bin
    rows_out = rows[bin_idx // (oh * ow)] * (oh * ow) + bin_idx % (oh * ow)
    return rows_out, cols.reshape(-1)[keep], vals.reshape(-1)[keep]




class _SparseRoIAlignFn(torch.autograd.Function):
    """Per chunk of RoIs on one level: ``out[idx] = M @ F_level`` with ``F_level`` the level's features as NHWC
    rows; gradient ``dF_level += M^T @ dOut[idx]``."""

    @staticmethod
    def forward(ctx, plan: list[tuple[int, Tensor, Tensor]], out_shape: tuple[int, ...],  # type: ignore[override]
                *feats: Tensor) -> Tensor:
        r, c, oh, ow = out_shape
        out = feats[0].new_empty(out_shape)
        flat: dict[int, Tensor] = {}
        for lvl, idx, matrix in plan:
            if lvl not in flat:  # a view for channels_last features, else one NHWC copy of the level
                flat[lvl] = feats[lvl].permute(0, 2, 3, 1).reshape(-1, c)
            part = torch.sparse.mm(matrix, flat[lvl]).view(-1, oh * ow, c).transpose(1, 2).contiguous()
            out.index_copy_(0, idx, part.view(-1, c, oh, ow))
        ctx.plan = plan
        ctx.shapes = [tuple(f.shape) for f in feats]
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grads: list[Tensor | None] = [None] * len(ctx.shapes)
        for lvl, idx, matrix in ctx.plan:
            b, c, h, w = ctx.shapes[lvl]
            if grads[lvl] is None:
                grads[lvl] = grad.new_zeros((b * h * w, c))
            g = grad[idx].permute(0, 2, 3, 1).reshape(-1, c)
            grads[lvl].addmm_(matrix.t(), g)  # type: ignore[union-attr]
        out: list[Tensor | None] = [None, None]
        for lvl, (b, c, h, w) in enumerate(ctx.shapes):
            gl = grads[lvl]
            out.append(None if gl is None else gl.view(b, h, w, c).permute(0, 3, 1, 2))
        return tuple(out)


def multilevel_roi_align(feats: Sequence[Tensor], rois: Tensor, levels: Tensor, output_size: tuple[int, int],
                         spatial_scales: Sequence[float], sampling_ratio: int = 0, aligned: bool = True) -> Tensor:
    """RoIAlign of each RoI on its own feature level by sparse products (CPU; see the module docstring).

    Args:
        feats: levels ``(B, C, H_l, W_l)`` (any memory format; NHWC / channels_last avoids a copy).
        rois: ``(R, 5)`` ``(batch_index, x1, y1, x2, y2)`` in input pixels.
        levels: ``(R,)`` int level of each RoI (index into ``feats``).
        output_size: ``(out_h, out_w)``; spatial_scales: ``1 / stride`` per level;
        sampling_ratio: samples per bin and axis, ``<= 0``: adaptive ``ceil(roi_size / out_size)``;
        aligned: half-pixel shift (mmcv / torchvision ``aligned=True``).

    Returns:
        ``(R, C, out_h, out_w)`` contiguous, in ``feats[0].dtype``, equal to
        ``torchvision.ops.roi_align(feats[levels[r]], rois[r:r+1], ...)`` per RoI within float rounding.
    """
    oh, ow = output_size
    c = feats[0].shape[1]
    r = rois.shape[0]
    if r == 0:
        return feats[0].new_zeros((0, c, oh, ow))
    rois = rois.detach().to(feats[0].dtype)
    img = rois[:, 0].long()
    plan = []
    for lvl, f in enumerate(feats):
        b, _, h, w = f.shape
        on_level = (levels == lvl).nonzero(as_tuple=True)[0]
        if on_level.numel() == 0:
            continue
        geometry = _geometry(rois[on_level], float(spatial_scales[lvl]), (oh, ow), sampling_ratio, aligned)
        for sub in _chunks(geometry, (oh, ow)):
            n, idx = sub.numel(), on_level[sub]
            rows, cols, vals = _level_entries(tuple(g[sub] for g in geometry), torch.arange(n), img[idx] * (h * w),
                                              h, w, (oh, ow))
            matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n * oh * ow, b * h * w),
                                             check_invariants=False)
            plan.append((lvl, idx, matrix))
    return _SparseRoIAlignFn.apply(plan, (r, c, oh, ow), *feats)


def roi_align(input: Tensor, rois: Tensor, output_size: int | tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """Drop-in for ``torchvision.ops.roi_align`` with a ``(R, 5)`` RoI tensor, computed by
    :func:`multilevel_roi_align` on one level (CPU float only)."""
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    levels = torch.zeros(rois.shape[0], dtype=torch.long)
    return multilevel_roi_align([input], rois, levels, size, [spatial_scale], sampling_ratio, aligned)

