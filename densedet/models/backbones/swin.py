"""Swin Transformer detection backbone in the layout of the UMOP / Swin-Transformer-Object-Detection checkpoints.

Reference: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (ICCV 2021). Layout
and semantics follow ``SwinTransformer/Swin-Transformer-Object-Detection`` ``mmdet/models/backbones/
swin_transformer.py`` (the code the UMOP seed builds on): parameter names ``patch_embed.proj``/``patch_embed.norm``,
``layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj, attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}``
(+ the persistent buffer ``attn.relative_position_index``), ``layers.{i}.downsample.{reduction, norm}`` at the *end*
of stages 0..2, and one output LayerNorm ``norm{i}`` per ``out_indices`` entry. These are the official ImageNet
checkpoints' names, so they load after dropping the classifier.

Behaviour kept from the detection reference (it differs from the classification model and from timm):
- the input is zero-padded (right/bottom) to a multiple of the patch size;
- every block zero-pads its normalised tokens to a multiple of ``window_size``, *then* rolls (shifted blocks) and
  always shifts, even when the feature map fits in one window (the classification model disables the shift there);
  padded tokens take part in attention as in the reference, so the weights see what they were trained with;
- the shifted-window mask adds -100 between tokens of different regions (not -inf), as the reference does;
- ``PatchMerging`` zero-pads odd heights/widths; stage ``i`` output has ``ceil(H / 2**(i+2))`` rows.

Not MMDetection's own ``SwinTransformer`` (mmdet >= 2.17, ``stages.{i}.blocks.{j}.attn.w_msa.*``, ``ffn.layers.*``,
unfold-ordered patch merging), whose forward computes the same function: checkpoints of that layout need a key map
and a channel permutation of ``downsample.reduction``/``downsample.norm``; :func:`mmdet_swin_to_reference` does both
and ``pretrained`` applies it automatically (see ``densedet/configs/retinanet_swin-t-p4-w7_fpn_1x_coco.yaml``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, trunc_normal_
from torch import nn

from densedet.registry import BACKBONES, ConfigError
from densedet.weights.sources import pretrained_source, read_state_dict
from densedet.weights.state_dict import load_matching, select_prefix

__all__ = [
    "PatchEmbed",
    "PatchMerging",
    "SwinBlock",
    "SwinStage",
    "SwinTransformer",
    "WindowAttention",
    "convert_swin_state_dict",
    "load_swin_checkpoint",
    "mmdet_swin_to_reference",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``(B, H, W, C)`` with ``H, W`` multiples of ``window_size`` -> ``(B * nW, window_size**2, C)``, row-major."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, c)


def window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, window_size**2, C)`` -> ``(B, h, w, C)``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def shifted_window_mask(hp: int, wp: int, window_size: int, shift: int, device: torch.device | None = None
                        ) -> torch.Tensor:
    """Additive attention mask of SW-MSA for a padded ``(hp, wp)`` map: ``(nW, N, N)``, ``N = window_size**2``.

    After the cyclic shift, tokens from different regions of the map (split at ``-window_size`` and ``-shift`` along
    each axis, Swin paper Fig. 4) share a window; they must not attend to each other. The reference adds -100, not
    -inf, which is what trained checkpoints saw.
    """
    def region(n: int) -> torch.Tensor:
        idx = torch.arange(n, device=device)
        return (idx >= n - window_size).long() + (idx >= n - shift).long()

    ids = (region(hp)[:, None] * 3 + region(wp)[None, :]).view(1, hp, wp, 1)
    ids = window_partition(ids, window_size).squeeze(-1)  # (nW, N)
    different = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


def relative_position_index(window_size: int) -> torch.Tensor:
    """``(N, N)`` index into the ``(2*ws-1)**2`` bias table for each (query, key) pair of a window (Swin eq. 4)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N), each in [0, 2*ws-2]
    return rel[0] * (2 * window_size - 1) + rel[1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    Keys: ``qkv``, ``proj``, ``relative_position_bias_table`` (``((2*ws-1)**2, heads)``) and the buffer
    ``relative_position_index`` (persistent, as in the reference, so its detector checkpoints load strictly).
    ``forward``: ``x`` ``(B, nW, N, C)``, ``mask`` ``(nW, N, N)`` or None -> ``(B, nW, N, C)``.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"SwinTransformer: width {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, nw, n, c = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).view(b * nw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, heads)
        bias = bias.permute(2, 0, 1).to(q.dtype)  # (heads, N, N)
        if mask is None:
            bias = bias.expand(b * nw, heads, n, n)  # a stride-0 view, no copy
        else:  # (B * nW, heads, N, N): window w of every image gets mask[w]
            bias = (bias + mask.to(q.dtype)[:, None]).expand(b, nw, heads, n, n).reshape(b * nw, heads, n, n)
        # One fused call for all windows of the batch. A 4-D batch with a mask of the same batch size takes torch's
        # fused CPU/GPU kernels; 5-D inputs or a broadcast (heads, N, N) mask fell back to the slower math path on CPU.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, nw, n, c)))


class Mlp(nn.Module):
    """``fc1 -> GELU -> dropout -> fc2 -> dropout`` (keys ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, each residual with stochastic depth.

    ``forward``: ``x`` ``(B, H, W, C)``, ``mask`` (the stage's :func:`shifted_window_mask`, used when ``shift > 0``)
    -> ``(B, H, W, C)``. Normalised tokens are zero-padded to multiples of the window size, rolled by ``-shift``,
    attended per window, rolled back and cropped (reference order: pad, then roll).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift: int = 0, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if not 0 <= shift < window_size:
            raise ConfigError(f"SwinTransformer: shift {shift} must be in [0, window_size={window_size})")
        self.window_size, self.shift = window_size, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def _attention(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, h, w, c = x.shape
        ws, s = self.window_size, self.shift
        pad_b, pad_r = (-h) % ws, (-w) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        windows = window_partition(x, ws).view(b, -1, ws * ws, c)
        out = self.attn(windows, mask if s else None)
        x = window_reverse(out.view(-1, ws * ws, c), ws, hp, wp)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x[:, :h, :w]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self._attention(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: ``(B, H, W, C)`` -> ``(B, ceil(H/2), ceil(W/2), 2C)``.

    Odd sizes are zero-padded at the bottom/right. The 4C channels are ordered ``[(0,0), (1,0), (0,1), (1,1)]``
    (row offset fastest), as the reference concatenates ``x0..x3``; then ``norm`` (4C) and ``reduction`` (no bias).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        # (B, h2, dh, w2, dw, C) -> (B, h2, w2, dw, dh, C): channel block index = 2 * dw + dh.
        x = x.view(b, h2, 2, w2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, h2, w2, 4 * c)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` conv (``proj``) + optional LayerNorm (``norm``).

    ``(B, C_in, H, W)`` -> ``(B, ceil(H/p), ceil(W/p), embed_dim)``; the image is zero-padded right/bottom first.
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        x = self.proj(x).permute(0, 2, 3, 1)
        return x if self.norm is None else self.norm(x)


class SwinStage(nn.Module):
    """``depth`` blocks alternating W-MSA / SW-MSA (shift ``window_size // 2``), then optional ``downsample``.

    ``forward``: ``(B, H, W, C)`` -> (stage output ``(B, H, W, C)``, input of the next stage). The shift mask depends
    only on the padded size, so it is built once per stage and call.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, drop_path: Sequence[float],
                 downsample: bool, use_checkpoint: bool = False, **block_kwargs: Any) -> None:
        super().__init__()
        self.window_size, self.shift = window_size, window_size // 2
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, shift=0 if i % 2 == 0 else self.shift, drop_path=drop_path[i],
                      **block_kwargs)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ws = self.window_size
        hp, wp = math.ceil(x.shape[1] / ws) * ws, math.ceil(x.shape[2] / ws) * ws
        mask = shifted_window_mask(hp, wp, ws, self.shift, x.device) if len(self.blocks) > 1 else None
        for blk in self.blocks:
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = cp.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


@BACKBONES.register()
class SwinTransformer(nn.Module):
    """Swin Transformer backbone (detection variant of Swin-Transformer-Object-Detection, as UMOP uses it).

    Args: ``arch`` 'tiny' | 'small' | 'base' | 'large' sets ``embed_dim``/``depths``/``num_heads`` (Swin paper
    Table 7: T 96/[2,2,6,2]/[3,6,12,24], S 96/[2,2,18,2]/[3,6,12,24], B 128/[2,2,18,2]/[4,8,16,32],
    L 192/[2,2,18,2]/[6,12,24,48]); without ``arch`` those three default to Swin-T. ``window_size`` (7; 12 for the
    384-px checkpoints), ``mlp_ratio``, ``qkv_bias``, ``qk_scale`` (None: head_dim**-0.5), dropout rates,
    ``drop_path_rate`` (linearly increasing over all blocks, 0.2), ``ape`` (absolute position embedding, bicubically
    resized to the input), ``patch_norm``, ``out_indices`` (0..3 -> strides 4, 8, 16, 32; only those stages get an
    output norm ``norm{i}``), ``frozen_stages``, ``use_checkpoint`` (activation checkpointing per block).

    ``frozen_stages`` counts as the reference does: 0 freezes ``patch_embed``; 1 also ``absolute_pos_embed``;
    k >= 2 also ``layers[0 .. k-2]`` (each with its trailing patch merging). Frozen parts stay in eval mode.

    ``pretrained`` (or mmdet 2.x's ``init_cfg={'type': 'Pretrained', 'checkpoint': ..., 'prefix': ...}``) is a local
    path or URL of an official ImageNet checkpoint (``{'model': ...}``), a timm ``swin_*`` state dict, or a
    detector checkpoint holding ``backbone.*``; :meth:`init_weights` loads it with :func:`load_swin_checkpoint`.

    ``forward``: ``(B, in_chans, H, W)`` -> tuple of ``(B, embed_dim * 2**i, ceil(H / 2**(i+2)), ceil(W / 2**(i+2)))``
    for ``i`` in ``out_indices``.
    """

    arch_settings: ClassVar[dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]]] = {
        "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
        "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
        "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
        "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
    }

    def __init__(
        self,
        arch: str | None = None,
        pretrain_img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int | None = None,
        depths: Sequence[int] | None = None,
        num_heads: Sequence[int] | None = None,
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        ape: bool = False,
        patch_norm: bool = True,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        use_checkpoint: bool = False,
        pretrained: str | None = None,
        init_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        embed_dim, depths, num_heads = self._resolve_arch(arch, embed_dim, depths, num_heads)
        num_layers = len(depths)
        out_indices = tuple(out_indices)
        if not out_indices or any(not 0 <= i < num_layers for i in out_indices):
            raise ConfigError(
                f"SwinTransformer: out_indices {out_indices} must be non-empty, within 0..{num_layers - 1}"
            )
        if not -1 <= frozen_stages <= num_layers + 1:
            raise ConfigError(f"SwinTransformer: frozen_stages must be in -1..{num_layers + 1}, got {frozen_stages}")
        if window_size < 2:
            raise ConfigError(f"SwinTransformer: window_size must be >= 2, got {window_size}")
        self.pretrained = pretrained_source(pretrained, init_cfg, "SwinTransformer")
        self.embed_dim, self.depths, self.num_heads = embed_dim, depths, num_heads
        self.window_size = window_size
        self.num_layers = num_layers
        self.ape = ape
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.num_features = [embed_dim * 2**i for i in range(num_layers)]
        self.out_channels: list[int] = [self.num_features[i] for i in out_indices]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            res = pretrain_img_size // patch_size
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, res, res))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)

        # Stochastic depth rate grows linearly from 0 to drop_path_rate over all blocks (Swin paper Sec. 4.1).
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            start = sum(depths[:i])
            self.layers.append(SwinStage(
                self.num_features[i], depths[i], num_heads[i], window_size, dpr[start:start + depths[i]],
                downsample=i < num_layers - 1, use_checkpoint=use_checkpoint, mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
            ))
        for i in out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))

        self._default_init()
        self._freeze_stages()

    def _resolve_arch(self, arch: str | None, embed_dim: int | None, depths: Sequence[int] | None,
                      num_heads: Sequence[int] | None) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        if arch is not None and arch not in self.arch_settings:
            raise ConfigError(f"SwinTransformer: unknown arch {arch!r}; expected one of {sorted(self.arch_settings)}")
        preset = self.arch_settings[arch or "tiny"]
        given = (embed_dim, None if depths is None else tuple(depths), None if num_heads is None else tuple(num_heads))
        if arch is not None:
            for name, value, want in zip(("embed_dim", "depths", "num_heads"), given, preset):
                if value is not None and value != want:
                    raise ConfigError(f"SwinTransformer: arch={arch!r} has {name}={want}, but {name}={value} was given")
        dim, dep, heads = (v if v is not None else p for v, p in zip(given, preset))
        if len(dep) != len(heads) or not dep:
            raise ConfigError(f"SwinTransformer: depths {dep} and num_heads {heads} need the same non-zero length")
        return int(dim), tuple(int(d) for d in dep), tuple(int(h) for h in heads)

    def _default_init(self) -> None:
        """Reference init: Linear weights trunc-normal(0.02) with zero bias, LayerNorm 1/0; the conv keeps torch's."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        """Default initialisation, then load ``pretrained`` if set (mismatches are reported as a warning)."""
        self._default_init()
        if self.pretrained is not None:
            source, prefix = self.pretrained
            load_swin_checkpoint(self, source, prefix=prefix)

    def _freeze_stages(self) -> None:
        frozen: list[nn.Module] = []
        if self.frozen_stages >= 0:
            frozen.append(self.patch_embed)
        if self.frozen_stages >= 1 and self.ape:
            self.absolute_pos_embed.requires_grad = False
        if self.frozen_stages >= 2:
            frozen.append(self.pos_drop)
            frozen.extend(self.layers[i] for i in range(self.frozen_stages - 1))
        for m in frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True) -> SwinTransformer:
        """Set train/eval mode, keeping frozen stages in eval (no dropout / drop path there)."""
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x``: ``(B, in_chans, H, W)`` -> tuple of the ``out_indices`` stage outputs, NCHW."""
        x = self.patch_embed(x)  # (B, H, W, C)
        if self.ape:
            pos = F.interpolate(self.absolute_pos_embed, size=x.shape[1:3], mode="bicubic")
            x = x + pos.permute(0, 2, 3, 1)
        x = self.pos_drop(x)
        outs = []
        for i, layer in enumerate(self.layers):
            out, x = layer(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(out).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)


# ----------------------------------------------------------------------------------------------------------------
# Pretrained checkpoints


_TIMM_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
# MMDetection's own Swin (mmdet >= 2.17, mmdet/models/backbones/swin.py) -> this layout; the inverse of mmdet's
# ``swin_converter`` (mmdet/models/utils/ckpt_convert.py), which maps official checkpoints to mmdet's names.
_MMDET_RENAMES = (
    (re.compile(r"^patch_embed\.projection\."), "patch_embed.proj."),
    (re.compile(r"^stages\.(\d+)\."), r"layers.\1."),
    (re.compile(r"\.attn\.w_msa\."), ".attn."),
    (re.compile(r"\.ffn\.layers\.0\.0\."), ".mlp.fc1."),
    (re.compile(r"\.ffn\.layers\.1\."), ".mlp.fc2."),
)


def _unfold_to_concat_order(v: torch.Tensor) -> torch.Tensor:
    """Patch-merging channels from ``nn.Unfold`` order (channel-major, kernel positions (0,0), (0,1), (1,0),
    (1,1)) to the reference's concatenation order (position-major, (0,0), (1,0), (0,1), (1,1)); last dim ``4C``."""
    c = v.shape[-1] // 4
    v = v.reshape(*v.shape[:-1], c, 4).transpose(-1, -2)  # (..., 4, C) in unfold kernel order
    return v[..., [0, 2, 1, 3], :].reshape(*v.shape[:-2], 4 * c)


def mmdet_swin_to_reference(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an MMDetection-layout Swin state dict (``stages.*``, ``attn.w_msa.*``, ``ffn.layers.*``,
    ``patch_embed.projection``) to this module's layout, permuting the unfold-ordered ``downsample`` channels."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        new = k
        for pattern, repl in _MMDET_RENAMES:
            new = pattern.sub(repl, new)
        if ".downsample." in new and new.endswith(("reduction.weight", "norm.weight", "norm.bias")):
            v = _unfold_to_concat_order(v)
        out[new] = v
    return out


def convert_swin_state_dict(state: Mapping[str, torch.Tensor], module: SwinTransformer) -> dict[str, torch.Tensor]:
    """Bring an official / timm / MMDetection / Swin-Transformer-Object-Detection state dict to this layout.

    - timm (>= 0.9) puts patch merging at the *start* of stage i+1 and names the classifier ``head.fc``: detected
      by ``layers.0.downsample`` being absent while ``layers.1.downsample`` is present; indices shift back by one.
    - MMDetection's Swin (detected by ``stages.*`` / ``patch_embed.projection.*`` keys):
      :func:`mmdet_swin_to_reference`.
    - ``relative_position_index`` and the official ``attn_mask`` buffers are derived from the window size and are
      dropped (the module's own values stay), so checkpoints without them, or of another window size, load.
    - ``relative_position_bias_table`` of another window size is resized bicubically per head, and the official
      ``absolute_pos_embed`` ``(1, L, C)`` is reshaped to ``(1, C, H, W)`` (both as the reference's loader does).
    """
    state = dict(state)
    if any(k.startswith(("stages.", "patch_embed.projection.")) for k in state):
        state = mmdet_swin_to_reference(state)
    if "layers.0.downsample.reduction.weight" not in state and "layers.1.downsample.reduction.weight" in state:
        state = {_TIMM_DOWNSAMPLE.sub(lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k): v
                 for k, v in state.items()}
        state = {("head." + k.removeprefix("head.fc.") if k.startswith("head.fc.") else k): v for k, v in state.items()}
    own = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        if k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape:
            (l1, h1), (l2, h2) = v.shape, own[k].shape
            if h1 == h2:
                s1, s2 = math.isqrt(l1), math.isqrt(l2)
                v = F.interpolate(v.float().t().reshape(1, h1, s1, s1), size=(s2, s2), mode="bicubic")
                v = v.reshape(h2, l2).t().to(own[k].dtype)
        if k == "absolute_pos_embed" and k in own and v.dim() == 3:
            n, c, h, w = own[k].shape
            if v.shape == (n, h * w, c):
                v = v.view(n, h, w, c).permute(0, 3, 1, 2)
        out[k] = v
    return out


def load_swin_checkpoint(module: SwinTransformer, source: str, prefix: str | None = None) -> dict[str, list[str]]:
    """Load a Swin checkpoint into ``module`` non-strictly and warn about every key that did not match.

    ``source``: local path or URL (read by :func:`densedet.weights.sources.read_state_dict`, which unwraps
    ``model`` / ``state_dict`` and strips ``module.``). ``prefix`` keeps and strips keys under it; without it, a
    detector checkpoint's ``backbone.*`` keys are used. Then :func:`convert_swin_state_dict`. The classifier
    (``head.*``) and the final ``norm.*`` of ImageNet checkpoints are reported as unexpected; the output norms
    ``norm{i}`` they lack are reported as missing (they keep their 1/0 init, as in the reference).

    Returns ``{'missing': [...], 'unexpected': [...], 'mismatched': [...]}``.
    """
    state = convert_swin_state_dict(select_prefix(read_state_dict(source), source, prefix), module)
    # relative_position_index is rebuilt from the window size, never needed from a file
    return load_matching(module, state, source, ignore_missing=("relative_position_index",))
