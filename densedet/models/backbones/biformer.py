"""BiFormer detection backbone: vision transformer with bi-level routing attention (BRA).

Reference: Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention" (CVPR 2023), code
rayleizhu/BiFormer: ``models/biformer.py`` (``Block``, ``BiFormer``), ``ops/bra_legacy.py``
(``BiLevelRoutingAttention`` with ``auto_pad``), ``models/_common.py`` (``Attention``, ``AttentionLePE``) and the
detection wrapper ``object_detection/models_mm/biformer_mm.py`` (``BiFormer_mm``). Written from the paper and
those semantics; parameter names equal the released checkpoints:

- ``downsample_layers.0.{0,1,3,4}``: stem, conv3x3/s2 -> BN -> GELU -> conv3x3/s2 -> BN;
  ``downsample_layers.{1,2,3}.{0,1}``: conv3x3/s2 -> BN;
- ``stages.{i}.{j}.``: ``pos_embed`` (depthwise 3x3), ``norm1``, ``attn``, ``norm2``, ``mlp.{0,3}`` (``mlp.1.dwconv``
  with ``mlp_dwconv``), ``gamma1``/``gamma2`` with layer scale. ``attn`` is BRA (``qkv.qkv``, ``wo``, ``lepe``,
  ``router.emb`` with ``param_routing``) for ``topk > 0``, plain attention (``qkv``, ``proj``) for ``topk == -1``,
  plain attention + LePE (``qkv``, ``proj``, ``lepe``) for ``topk == -2``, and the "pseudo attention" conv stack
  (``attn.{1,2,3}``) for ``topk == 0``;
- ``extra_norms.{i}``: the detection wrapper's per-output LayerNorm2d (the classifier's ``norm``/``head`` are gone).

The released wrapper normalises each *output* only (``out.append(extra_norms[i](x))``); the version the paper's
numbers came from also fed the normalised map into the next stage, which the authors call a "bug" they fixed.
``legacy_extra_norms=True`` reproduces that older behaviour; the default is the released one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from densedet.registry import BACKBONES, ConfigError
from densedet.weights.sources import load_pretrained, pretrained_source

__all__ = ["BiFormer", "BiFormerBlock", "BiLevelRoutingAttention", "GlobalAttention", "pad_to_multiple"]

# ImageNet-1k checkpoints of the classification models (models/biformer.py ``model_urls``); load one with
# ``pretrained=<url or local path>``: the classifier's ``norm.*``/``head.*`` are skipped, ``extra_norms.*`` start fresh.
BIFORMER_URLS = {
    "biformer_tiny_in1k": "https://matix.li/e36fe9fb086c",
    "biformer_small_in1k": "https://matix.li/5bb436318902",
    "biformer_base_in1k": "https://matix.li/995db75f585d",
}

_KV_DOWN_MODES = ("identity", "ada_avgpool", "ada_maxpool", "avgpool", "maxpool")


def pad_to_multiple(x: Tensor, n: int) -> Tensor:
    """Zero-pad an NHWC map at the bottom/right so H and W divide by ``n`` (bra_legacy ``auto_pad``)."""
    h, w = x.shape[1:3]
    pad_b, pad_r = (-h) % n, (-w) % n
    if pad_b or pad_r:
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    return x


class _QKVLinear(nn.Module):
    """One linear producing ``q`` (qk_dim), ``k`` (qk_dim) and ``v`` (dim); key ``qkv.weight`` as the reference."""

    def __init__(self, dim: int, qk_dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.qkv(x)


class _TopkRouting(nn.Module):
    """Holds the optional routing embedding (``router.emb``) of BRA; the routing itself is in the attention."""

    def __init__(self, qk_dim: int, param_routing: bool) -> None:
        super().__init__()
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.emb(x)


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention on an NHWC map (BiFormer paper, Sec. 3.2; ``ops/bra_legacy.py``).

    The map is split into ``n_win x n_win`` regions. Region-level routing: region queries/keys are the means of the
    token queries/keys in each region, the region affinity is ``(q_r * scale) @ k_r^T`` (computed on detached
    inputs unless ``diff_routing``) and each region keeps its ``topk`` most affine regions. Token-level attention:
    every query token attends to all (optionally pooled, ``kv_down_mode``) keys/values of its routed regions. A
    depthwise ``side_dwconv`` conv over ``v`` (local context enhancement, LCE/"lepe") is added before ``wo``.

    As the reference: ``scale = qk_scale or qk_dim ** -0.5`` with the *full* ``qk_dim`` (not the per-head dim) for
    both levels; with ``auto_pad`` the normalised input is zero-padded at the bottom/right to a multiple of
    ``n_win`` and the padded tokens take part in attention unmasked (their q/k/v are the linear's bias), then the
    output is cropped back.

    ``forward``: ``(N, H, W, dim)`` -> ``(N, H, W, dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        kv_per_win: int = 4,
        kv_downsample_ratio: int = 4,
        kv_downsample_mode: str = "identity",
        topk: int = 4,
        param_attention: str = "qkvo",
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        side_dwconv: int = 3,
        auto_pad: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.n_win = n_win
        self.num_heads = num_heads
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ConfigError(f"BiLevelRoutingAttention: qk_dim {self.qk_dim} and dim {dim} must divide by "
                              f"num_heads {num_heads}")
        if not 1 <= topk <= n_win * n_win:
            raise ConfigError(f"BiLevelRoutingAttention: topk {topk} must be in 1..n_win^2 = {n_win * n_win}")
        if param_routing and not diff_routing:
            raise ConfigError("BiLevelRoutingAttention: param_routing needs diff_routing (as the reference asserts)")
        if diff_routing and not soft_routing:
            raise ConfigError("BiLevelRoutingAttention: differentiable hard routing (diff_routing without "
                              "soft_routing) is not implemented in the reference either")
        if kv_downsample_mode not in _KV_DOWN_MODES:
            raise ConfigError(f"BiLevelRoutingAttention: kv_downsample_mode {kv_downsample_mode!r} not in "
                              f"{_KV_DOWN_MODES}")
        if param_attention not in ("qkvo", "qkv"):
            raise ConfigError(f"BiLevelRoutingAttention: param_attention must be 'qkvo' or 'qkv', got "
                              f"{param_attention!r}")
        self.scale = qk_scale or self.qk_dim**-0.5
        self.topk = topk
        self.diff_routing = diff_routing
        self.soft_routing = soft_routing
        self.auto_pad = auto_pad

        # Module order as the reference, so state_dict keys come out in the same order.
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        )
        self.router = _TopkRouting(self.qk_dim, param_routing)
        self.qkv = _QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        if kv_downsample_mode == "ada_avgpool":
            self.kv_down: nn.Module = nn.AdaptiveAvgPool2d(kv_per_win)
        elif kv_downsample_mode == "ada_maxpool":
            self.kv_down = nn.AdaptiveMaxPool2d(kv_per_win)
        elif kv_downsample_mode == "avgpool" and kv_downsample_ratio > 1:
            self.kv_down = nn.AvgPool2d(kv_downsample_ratio)
        elif kv_downsample_mode == "maxpool" and kv_downsample_ratio > 1:
            self.kv_down = nn.MaxPool2d(kv_downsample_ratio)
        else:
            self.kv_down = nn.Identity()

    def route(self, q_win: Tensor, k_win: Tensor) -> tuple[Tensor, Tensor]:
        """Region-level routing. ``q_win, k_win``: ``(N, P, qk_dim)`` region means ->
        ``(weights, index)``, both ``(N, P, topk)``: softmax over the kept logits and the indices of the kept regions.
        """
        if not self.diff_routing:
            q_win, k_win = q_win.detach(), k_win.detach()
        logits = (self.router(q_win) * self.scale) @ self.router(k_win).transpose(-2, -1)  # (N, P, P)
        top_logits, index = torch.topk(logits, k=self.topk, dim=-1)
        return top_logits.softmax(dim=-1), index

    def forward(self, x: Tensor) -> Tensor:
        n, h_in, w_in, _ = x.shape
        if self.auto_pad:
            x = pad_to_multiple(x, self.n_win)
        elif h_in % self.n_win or w_in % self.n_win:
            raise ValueError(f"BiLevelRoutingAttention: map {h_in}x{w_in} does not divide into {self.n_win}x"
                             f"{self.n_win} regions; set auto_pad=True")
        H, W = x.shape[1:3]
        nw, qk, m = self.n_win, self.qk_dim, self.num_heads
        rh, rw = H // nw, W // nw  # region size
        p = nw * nw

        qkv = self.qkv(x)  # (N, H, W, 2 qk + dim)
        v_map = qkv[..., 2 * qk :]
        # (N, H, W, C) -> (N, P, rh * rw, C), regions in row-major order.
        regions = qkv.reshape(n, nw, rh, nw, rw, -1).permute(0, 1, 3, 2, 4, 5).reshape(n, p, rh * rw, -1)
        q_pix = regions[..., :qk]
        r_weight, r_idx = self.route(q_pix.mean(2), regions[..., qk : 2 * qk].mean(2))

        kv_pix = regions[..., qk:]
        if not isinstance(self.kv_down, nn.Identity):
            c_kv = kv_pix.shape[-1]
            pooled = self.kv_down(kv_pix.reshape(n * p, rh, rw, c_kv).permute(0, 3, 1, 2))
            kv_pix = pooled.flatten(2).transpose(1, 2).reshape(n, p, -1, c_kv)
        # Gather the key/value tokens of each region's routed regions: (N, P, topk, T, qk + dim).
        kv_sel = kv_pix[torch.arange(n, device=x.device).view(n, 1, 1), r_idx]
        if self.soft_routing:
            kv_sel = kv_sel * r_weight[..., None, None]
        t = kv_sel.shape[2] * kv_sel.shape[3]
        k_sel = kv_sel[..., :qk].reshape(n * p, t, m, qk // m).transpose(1, 2)
        v_sel = kv_sel[..., qk:].reshape(n * p, t, m, self.dim // m).transpose(1, 2)
        q = q_pix.reshape(n * p, rh * rw, m, qk // m).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k_sel, v_sel, scale=self.scale)  # (N P, m, rh rw, dim / m)
        # Back to the map, channels ordered head-major as the reference's '(m c)'.
        out = out.reshape(n, nw, nw, m, rh, rw, -1).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, H, W, self.dim)

        if self.lepe is not None:
            out = out + self.lepe(v_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.wo(out)
        if out.shape[1] != h_in or out.shape[2] != w_in:
            out = out[:, :h_in, :w_in, :].contiguous()
        return out


class GlobalAttention(nn.Module):
    """Plain multi-head self-attention over all tokens of an NHWC map (``models/_common.py`` ``Attention`` for
    ``side_dwconv=0``, ``AttentionLePE`` otherwise; BiFormer's last stage uses the latter, ``topk=-2``).

    As the reference: 8 heads, ``qkv`` without bias, ``scale = (dim // num_heads) ** -0.5``, and the LePE depthwise
    conv applied to the attention *input* (not to ``v``), added before ``proj``.
    ``forward``: ``(N, H, W, dim)`` -> ``(N, H, W, dim)``.
    """

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"GlobalAttention: dim {dim} must divide by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim) if side_dwconv > 0 else None
        )

    def forward(self, x: Tensor) -> Tensor:
        n, h, w, c = x.shape
        q, k, v = self.qkv(x).reshape(n, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(n, h, w, c)
        if self.lepe is not None:
            out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.proj(out)


class _Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


class _DWConvNHWC(nn.Module):
    """Depthwise 3x3 conv on an NHWC map (``models/_common.py`` ``DWConv``; key ``dwconv``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class BiFormerBlock(nn.Module):
    """``x + pos_embed(x)`` then pre-norm (or post-norm) attention and MLP residuals (``models/biformer.py`` Block).

    ``topk > 0``: BRA; ``-1``: plain attention; ``-2``: plain attention + LePE; ``0``: a 1x1 / 5x5 depthwise / 1x1
    conv stack in place of attention (an ablation of the paper). ``forward``: ``(N, C, H, W)`` -> same shape.
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float = -1,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        kv_per_win: int = 4,
        kv_downsample_ratio: int = 4,
        kv_downsample_mode: str = "identity",
        topk: int = 4,
        param_attention: str = "qkvo",
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        mlp_ratio: float = 4,
        mlp_dwconv: bool = False,
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        pre_norm: bool = True,
        auto_pad: bool = False,
    ) -> None:
        super().__init__()
        if before_attn_dwconv not in (0, 3):
            # The reference builds this conv with padding=1 whatever the kernel, so only 3 keeps the map size.
            raise ConfigError(f"BiFormerBlock: before_attn_dwconv must be 0 or 3, got {before_attn_dwconv}")
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if before_attn_dwconv > 0 else None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn: nn.Module = BiLevelRoutingAttention(
                dim, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale, kv_per_win=kv_per_win,
                kv_downsample_ratio=kv_downsample_ratio, kv_downsample_mode=kv_downsample_mode, topk=topk,
                param_attention=param_attention, param_routing=param_routing, diff_routing=diff_routing,
                soft_routing=soft_routing, side_dwconv=side_dwconv, auto_pad=auto_pad,
            )
        elif topk == -1:
            self.attn = GlobalAttention(dim)
        elif topk == -2:
            self.attn = GlobalAttention(dim, side_dwconv=side_dwconv)
        elif topk == 0:
            self.attn = nn.Sequential(
                _Permute(0, 3, 1, 2), nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 5, padding=2, groups=dim),
                nn.Conv2d(dim, dim, 1), _Permute(0, 2, 3, 1),
            )
        else:
            raise ConfigError(f"BiFormerBlock: topk must be > 0 (BRA), 0, -1 or -2, got {topk}")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), _DWConvNHWC(hidden) if mlp_dwconv else nn.Identity(), nn.GELU(),
            nn.Linear(hidden, dim),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma1 = self.gamma2 = None
        self.pre_norm = pre_norm

    def forward(self, x: Tensor) -> Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)  # NHWC for the token-wise layers
        g1, g2 = self.gamma1, self.gamma2
        if self.pre_norm:
            a = self.attn(self.norm1(x))
            x = x + self.drop_path(a if g1 is None else g1 * a)
            f = self.mlp(self.norm2(x))
            x = x + self.drop_path(f if g2 is None else g2 * f)
        else:  # post-norm variant of the reference
            a = self.attn(x)
            x = self.norm1(x + self.drop_path(a if g1 is None else g1 * a))
            f = self.mlp(x)
            x = self.norm2(x + self.drop_path(f if g2 is None else g2 * f))
        return x.permute(0, 3, 1, 2)


def _per_stage(name: str, value: Sequence[Any], n: int = 4) -> list[Any]:
    value = list(value)
    if len(value) != n:
        raise ConfigError(f"BiFormer: {name} needs {n} entries (one per stage), got {value}")
    return value


@BACKBONES.register()
class BiFormer(nn.Module):
    """BiFormer as a detection backbone (``BiFormer_mm`` of the reference) returning normalised stage outputs.

    Defaults are BiFormer-S as the reference's detection configs set it (``retinanet.1x.biformer_small.py``):
    ``depth=[4,4,18,4]``, ``embed_dim=[64,128,256,512]``, ``head_dim=32`` (BRA heads = ``qk_dims[i] // head_dim``),
    ``mlp_ratios=3``, ``n_win=16`` regions per side, ``topks=[1,4,16,-2]`` (the last stage uses global attention
    with LePE), ``side_dwconv=5``, ``auto_pad=True``. BiFormer-B: ``embed_dim=qk_dims=[96,192,384,768]``. The
    classification models use ``n_win=7``; detection raises it to 16 so regions stay small on large images.

    Other args: ``qk_dims`` (None -> ``embed_dim``); ``drop_path_rate`` (linear over all blocks);
    ``use_checkpoint_stages`` (gradient checkpointing of those stages' blocks while training);
    ``kv_downsample_mode`` / ``kv_per_wins`` / ``kv_downsample_ratios`` (key/value pooling inside each region,
    ``'identity'`` = none); ``layer_scale_init_value`` (> 0 enables ``gamma1/gamma2``); ``param_routing`` /
    ``diff_routing`` / ``soft_routing`` (routing variants of the paper's ablations); ``pre_norm``;
    ``param_attention`` ('qkvo' or 'qkv' without ``wo``); ``mlp_dwconv``; ``out_indices``; ``frozen_stages`` k >= 0
    freezes the stem and, for k >= 1, ``downsample_layers[:k]``, ``stages[:k]`` and their output norms (a DenseDet
    addition, the reference has none); ``norm_eval`` keeps the BatchNorms of the patch embeddings in eval mode during
    training (reference default True); ``disable_bn_grad`` freezes their affine parameters; ``legacy_extra_norms``
    (see the module docstring); ``pretrained`` / ``init_cfg`` a local path or URL of a BiFormer checkpoint
    (classification ``{'model': ...}`` or a detector's ``backbone.*``), loaded by :meth:`init_weights`.

    ``forward``: ``(B, in_chans, H, W)`` -> tuple of ``(B, embed_dim[i], H_i, W_i)`` for ``i in out_indices``, with
    ``H_0 = ceil(ceil(H / 2) / 2)`` and each later stage halving with rounding up (strides 4, 8, 16, 32).
    """

    def __init__(
        self,
        depth: Sequence[int] = (4, 4, 18, 4),
        in_chans: int = 3,
        embed_dim: Sequence[int] = (64, 128, 256, 512),
        head_dim: int = 32,
        qk_scale: float | None = None,
        drop_path_rate: float = 0.0,
        use_checkpoint_stages: Sequence[int] = (),
        n_win: int = 16,
        kv_downsample_mode: str = "identity",
        kv_per_wins: Sequence[int] = (-1, -1, -1, -1),
        kv_downsample_ratios: Sequence[int] = (4, 2, 1, 1),
        topks: Sequence[int] = (1, 4, 16, -2),
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        layer_scale_init_value: float = -1,
        qk_dims: Sequence[int | None] = (None, None, None, None),
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        pre_norm: bool = True,
        auto_pad: bool = True,
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        param_attention: str = "qkvo",
        mlp_dwconv: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        norm_eval: bool = True,
        disable_bn_grad: bool = False,
        legacy_extra_norms: bool = False,
        pretrained: str | None = None,
        init_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        depth = _per_stage("depth", depth)
        embed_dim = _per_stage("embed_dim", embed_dim)
        topks = _per_stage("topks", topks)
        mlp_ratios = _per_stage("mlp_ratios", mlp_ratios)
        kv_per_wins = _per_stage("kv_per_wins", kv_per_wins)
        kv_downsample_ratios = _per_stage("kv_downsample_ratios", kv_downsample_ratios)
        qk_dims = [q or d for q, d in zip(_per_stage("qk_dims", qk_dims), embed_dim, strict=True)]
        if any(q % head_dim for q in qk_dims):
            raise ConfigError(f"BiFormer: every qk_dim {qk_dims} must divide by head_dim {head_dim}")
        self.out_indices = tuple(out_indices)
        if not self.out_indices or any(not 0 <= i < 4 for i in self.out_indices):
            raise ConfigError(f"BiFormer: out_indices {self.out_indices} must be non-empty and within 0..3")
        if not -1 <= frozen_stages <= 4:
            raise ConfigError(f"BiFormer: frozen_stages must be in -1..4, got {frozen_stages}")
        if any(not 0 <= i < 4 for i in use_checkpoint_stages):
            raise ConfigError(f"BiFormer: use_checkpoint_stages {list(use_checkpoint_stages)} must be within 0..3")
        if embed_dim[0] % 2:
            raise ConfigError(f"BiFormer: embed_dim[0] must be even (the stem's first conv has half), got {embed_dim}")
        self.pretrained = pretrained_source(pretrained, init_cfg, "BiFormer")
        self.embed_dim = embed_dim
        self.n_win = n_win
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.legacy_extra_norms = legacy_extra_norms
        self.use_checkpoint_stages = tuple(use_checkpoint_stages)
        self.out_channels: list[int] = [embed_dim[i] for i in self.out_indices]

        # Patch embeddings: an overlapping two-conv stem (stride 4), then a 3x3/s2 conv + BN before each stage.
        self.downsample_layers = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(in_chans, embed_dim[0] // 2, 3, stride=2, padding=1),
                nn.BatchNorm2d(embed_dim[0] // 2),
                nn.GELU(),
                nn.Conv2d(embed_dim[0] // 2, embed_dim[0], 3, stride=2, padding=1),
                nn.BatchNorm2d(embed_dim[0]),
            )
        ])
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(nn.Conv2d(embed_dim[i], embed_dim[i + 1], 3, stride=2, padding=1),
                              nn.BatchNorm2d(embed_dim[i + 1]))
            )

        dp_rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
        self.stages = nn.ModuleList()
        cur = 0
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                BiFormerBlock(
                    embed_dim[i], drop_path=dp_rates[cur + j], layer_scale_init_value=layer_scale_init_value,
                    num_heads=qk_dims[i] // head_dim, n_win=n_win, qk_dim=qk_dims[i], qk_scale=qk_scale,
                    kv_per_win=kv_per_wins[i], kv_downsample_ratio=kv_downsample_ratios[i],
                    kv_downsample_mode=kv_downsample_mode, topk=topks[i], param_attention=param_attention,
                    param_routing=param_routing, diff_routing=diff_routing, soft_routing=soft_routing,
                    mlp_ratio=mlp_ratios[i], mlp_dwconv=mlp_dwconv, side_dwconv=side_dwconv,
                    before_attn_dwconv=before_attn_dwconv, pre_norm=pre_norm, auto_pad=auto_pad,
                )
                for j in range(depth[i])
            ]))
            cur += depth[i]

        # Output norms only where used (Identity elsewhere keeps the indices and leaves no unused parameters).
        self.extra_norms = nn.ModuleList([
            LayerNorm2d(embed_dim[i]) if (i in self.out_indices or legacy_extra_norms) else nn.Identity()
            for i in range(4)
        ])

        self._default_init()
        if disable_bn_grad:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)
        self._freeze_stages()

    def _default_init(self) -> None:
        """Reference init: Linear trunc-normal std 0.02 / bias 0, LayerNorm 1 / 0; convs and BN keep torch's."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        """Default initialisation, then load ``pretrained`` if set (missing/unexpected keys are warned about).

        A classification checkpoint's ``norm.*`` / ``head.*`` are skipped silently; the ``extra_norms.*`` it lacks
        are reported as missing and keep their fresh initialisation, as in the reference.
        """
        self._default_init()
        if self.pretrained is not None:
            source, prefix = self.pretrained
            load_pretrained(self, source, prefix=prefix, ignore_unexpected=("head.", "norm.", "pre_logits."))

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            self._freeze(self.downsample_layers[0])
        for i in range(self.frozen_stages):
            for m in (self.downsample_layers[i], self.stages[i], self.extra_norms[i]):
                self._freeze(m)

    @staticmethod
    def _freeze(m: nn.Module) -> None:
        m.eval()
        for p in m.parameters():
            p.requires_grad = False

    def train(self, mode: bool = True) -> BiFormer:
        """Set train/eval mode, keeping frozen stages in eval and, with ``norm_eval``, every BatchNorm in eval."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x``: ``(B, in_chans, H, W)`` -> tuple of the ``out_indices`` normalised stage outputs (NCHW)."""
        outs = []
        for i in range(4):
            x = self.downsample_layers[i](x)
            if i in self.use_checkpoint_stages and self.training and torch.is_grad_enabled():
                x = cp.checkpoint_sequential(self.stages[i], len(self.stages[i]), x, use_reentrant=False)
            else:
                x = self.stages[i](x)
            if self.legacy_extra_norms:
                x = self.extra_norms[i](x)
                if i in self.out_indices:
                    outs.append(x.contiguous())
            elif i in self.out_indices:
                outs.append(self.extra_norms[i](x).contiguous())
        return tuple(outs)
