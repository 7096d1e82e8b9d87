"""BiFormer backbone: shapes at odd sizes, bi-level routing against closed forms, padding, layout, counts, freezing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densedet.config import load_config
from densedet.models.backbones.biformer import BiFormer, BiFormerBlock, BiLevelRoutingAttention, GlobalAttention
from densedet.registry import BACKBONES, ConfigError

TINY = dict(depth=[1, 1, 2, 1], embed_dim=[16, 32, 48, 64], qk_dims=[16, 32, 48, 64], head_dim=8, mlp_ratios=[2] * 4)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values for every parameter and BN buffer, so mixed-up weights cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * (0.3 if t.dim() > 1 else 0.2))
    return model


def _split_qkv(attn: BiLevelRoutingAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Token q, k, v as (N, L, C) from the module's own linear weights (row-major tokens)."""
    w, b = attn.qkv.qkv.weight, attn.qkv.qkv.bias
    qkv = x.flatten(1, 2) @ w.T + b
    qk = attn.qk_dim
    return qkv[..., :qk], qkv[..., qk : 2 * qk], qkv[..., 2 * qk :]


def _heads(t: torch.Tensor, m: int) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], m, -1).transpose(1, 2)  # (N, m, L, d)


def _masked_attention_reference(
    attn: BiLevelRoutingAttention, x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Full multi-head attention over all tokens (optionally masked per query token) + LePE on v, then wo.

    ``x``: (N, H, W, C); ``mask``: (N, L, L) bool, True = may attend. Written with plain matmuls over the whole map,
    no regions, no gather: an independent route to the same numbers.
    """
    n, h, w, c = x.shape
    q, k, v = _split_qkv(attn, x)
    m = attn.num_heads
    logits = (_heads(q, m) * attn.scale) @ _heads(k, m).transpose(-2, -1)  # (N, m, L, L)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None], float("-inf"))
    out = (logits.softmax(-1) @ _heads(v, m)).transpose(1, 2).reshape(n, h, w, c)
    out = out + F.conv2d(v.view(n, h, w, c).permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias,
                         padding=attn.lepe.kernel_size[0] // 2, groups=c).permute(0, 2, 3, 1)
    return out @ attn.wo.weight.T + attn.wo.bias


def _region_of_token(h: int, w: int, n_win: int) -> torch.Tensor:
    rows = torch.arange(h).repeat_interleave(w) // (h // n_win)
    cols = torch.arange(w).repeat(h) // (w // n_win)
    return rows * n_win + cols  # (L,) row-major region id


def test_output_strides_and_channels_at_odd_size() -> None:
    # 333x517: every stride-2 conv (k3, p1) rounds up; the BRA maps (84x130, 42x65, 21x33) need padding to 16.
    model = BiFormer(**TINY).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 333, 517))
    sizes = [(84, 130), (42, 65), (21, 33), (11, 17)]
    assert [tuple(o.shape) for o in outs] == [(1, c, h, w) for c, (h, w) in zip(TINY["embed_dim"], sizes, strict=True)]
    assert model.out_channels == TINY["embed_dim"]
    sub = BiFormer(**TINY, out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = sub(torch.randn(1, 3, 65, 97))
    assert [tuple(o.shape) for o in outs] == [(1, 32, 9, 13), (1, 64, 3, 4)] and sub.out_channels == [32, 64]
    assert BACKBONES["BiFormer"] is BiFormer


def test_bra_with_all_regions_routed_is_full_attention_plus_lepe() -> None:
    # topk = n_win^2: every query region attends to every region, so BRA = plain MHA over all tokens (scale
    # qk_dim^-0.5, as the reference) + LePE(v), then wo.
    torch.manual_seed(0)
    attn = _randomize(BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=4, side_dwconv=3)).double()
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(attn(x), _masked_attention_reference(attn, x, None))
    assert attn.scale == 8**-0.5


def test_bra_routing_equals_attention_masked_to_the_topk_regions() -> None:
    # 3x3 regions of 2x2 tokens, each region keeps its 2 best regions by mean-q . mean-k affinity. Expected: full
    # attention where a query token may only see key tokens of its region's routed regions.
    torch.manual_seed(1)
    n_win, topk, h, w, c = 3, 2, 6, 6, 8
    attn = _randomize(BiLevelRoutingAttention(c, num_heads=2, n_win=n_win, topk=topk, side_dwconv=3), 1).double()
    x = torch.randn(2, h, w, c, dtype=torch.float64)
    q, k, _ = _split_qkv(attn, x)
    region = _region_of_token(h, w, n_win)
    onehot = F.one_hot(region, n_win * n_win).double()  # (L, P)
    q_reg = onehot.T @ q / onehot.sum(0)[:, None]  # region means, (N, P, qk)
    k_reg = onehot.T @ k / onehot.sum(0)[:, None]
    affinity = q_reg @ k_reg.transpose(1, 2)
    routed = affinity.argsort(dim=-1, descending=True)[..., :topk]  # (N, P, topk)
    allowed_regions = torch.zeros(2, n_win * n_win, n_win * n_win, dtype=torch.bool)
    allowed_regions.scatter_(2, routed, True)
    mask = allowed_regions[:, region][:, :, region]  # (N, L, L): query token's region -> key token's region
    assert mask.sum(-1).eq(topk * 4).all()
    torch.testing.assert_close(attn(x), _masked_attention_reference(attn, x, mask))
    # The routing is hard and non-differentiable by default: no gradient reaches q/k through it.
    _, idx = attn.route(q_reg.requires_grad_(), k_reg)
    assert not idx.requires_grad and set(map(tuple, idx.sort(-1).values.flatten(0, 1).tolist())) == set(
        map(tuple, routed.sort(-1).values.flatten(0, 1).tolist())
    )


def test_global_attention_lepe_closed_form() -> None:
    # topk=-2 (last stage): 8 heads, no qkv bias, scale (dim/8)^-0.5, LePE on the attention input.
    torch.manual_seed(2)
    attn = _randomize(GlobalAttention(16, side_dwconv=5), 2).double()
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    t = x.flatten(1, 2)
    q, k, v = (t @ attn.qkv.weight.T).split(16, dim=-1)
    logits = (_heads(q, 8) @ _heads(k, 8).transpose(-2, -1)) / math.sqrt(2)
    out = (logits.softmax(-1) @ _heads(v, 8)).transpose(1, 2).reshape(2, 3, 5, 16)
    out = out + F.conv2d(x.permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias, padding=2, groups=16).permute(
        0, 2, 3, 1)
    torch.testing.assert_close(attn(x), out @ attn.proj.weight.T + attn.proj.bias)
    assert attn.qkv.bias is None


def test_auto_pad_equals_explicit_zero_padding_and_is_a_no_op_without_padding() -> None:
    torch.manual_seed(3)
    padded = _randomize(BiLevelRoutingAttention(8, num_heads=2, n_win=3, topk=2, auto_pad=True), 3).double()
    plain = copy.deepcopy(padded)
    plain.auto_pad = False
    # Input that needs no padding: same output through both paths.
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(padded(x), plain(x), rtol=0, atol=0)
    # Input that needs padding: the reference zero-pads the (normalised) map bottom/right and crops the output.
    x = torch.randn(2, 7, 8, 8, dtype=torch.float64)
    expected = plain(F.pad(x, (0, 0, 0, 1, 0, 2)))[:, :7, :8]
    torch.testing.assert_close(padded(x), expected)
    with pytest.raises(ValueError, match="auto_pad"):
        plain(x)


def test_backbone_auto_pad_no_op_when_every_stage_divides() -> None:
    # 128x128 with n_win=2: stage maps 32, 16, 8, 4 all divide, so auto_pad must change nothing.
    cfg = dict(TINY, n_win=2, topks=[1, 2, 4, -2])
    a = _randomize(BiFormer(**cfg, auto_pad=True)).eval()
    b = BiFormer(**cfg, auto_pad=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        for oa, ob in zip(a(x), b(x), strict=True):
            torch.testing.assert_close(oa, ob, rtol=0, atol=0)
        # The detector feeds channels_last images: same numbers.
        for oa, oc in zip(a(x), a(x.contiguous(memory_format=torch.channels_last)), strict=True):
            torch.testing.assert_close(oa, oc)
    with pytest.raises(ValueError, match="auto_pad"), torch.no_grad():
        b(torch.randn(1, 3, 120, 128))


def _expected_keys_and_shapes(embed: list[int], depth: list[int], mlp: int = 3) -> dict[str, tuple[int, ...]]:
    """The released BiFormer_mm layout, written out by hand from models/biformer.py + biformer_mm.py."""
    keys: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{s}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    half = embed[0] // 2
    keys |= {"downsample_layers.0.0.weight": (half, 3, 3, 3), "downsample_layers.0.0.bias": (half,)}
    bn("downsample_layers.0.1", half)
    keys |= {"downsample_layers.0.3.weight": (embed[0], half, 3, 3), "downsample_layers.0.3.bias": (embed[0],)}
    bn("downsample_layers.0.4", embed[0])
    for i in range(1, 4):
        keys[f"downsample_layers.{i}.0.weight"] = (embed[i], embed[i - 1], 3, 3)
        keys[f"downsample_layers.{i}.0.bias"] = (embed[i],)
        bn(f"downsample_layers.{i}.1", embed[i])
    for i, c in enumerate(embed):
        for j in range(depth[i]):
            p = f"stages.{i}.{j}."
            keys |= {p + "pos_embed.weight": (c, 1, 3, 3), p + "pos_embed.bias": (c,)}
            for norm in ("norm1", "norm2"):
                keys |= {p + f"{norm}.weight": (c,), p + f"{norm}.bias": (c,)}
            keys |= {p + "attn.lepe.weight": (c, 1, 5, 5), p + "attn.lepe.bias": (c,)}
            if i < 3:  # BRA
                keys |= {p + "attn.qkv.qkv.weight": (3 * c, c), p + "attn.qkv.qkv.bias": (3 * c,),
                         p + "attn.wo.weight": (c, c), p + "attn.wo.bias": (c,)}
            else:  # AttentionLePE
                keys |= {p + "attn.qkv.weight": (3 * c, c), p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,)}
            keys |= {p + "mlp.0.weight": (mlp * c, c), p + "mlp.0.bias": (mlp * c,),
                     p + "mlp.3.weight": (c, mlp * c), p + "mlp.3.bias": (c,)}
        keys |= {f"extra_norms.{i}.weight": (c,), f"extra_norms.{i}.bias": (c,)}
    return keys


@pytest.mark.parametrize(("embed", "classifier_millions"), [([64, 128, 256, 512], 25.5), ([96, 192, 384, 768], 56.8)])
def test_layout_and_parameter_count_of_small_and_base(embed: list[int], classifier_millions: float) -> None:
    with torch.device("meta"):
        model = BiFormer(depth=[4, 4, 18, 4], embed_dim=embed, qk_dims=embed, head_dim=32)
    state = model.state_dict()
    expected = _expected_keys_and_shapes(embed, [4, 4, 18, 4])
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(math.prod(s) for k, s in expected.items() if "running" not in k and "num_batches" not in k)
    # The published size is of the ImageNet classifier (BiFormer paper Table 1 and the repository README:
    # BiFormer-S 25.5 M, BiFormer-B 56.8 M): drop the 4 output LayerNorms, add the final BatchNorm and the
    # 1000-way linear head.
    c = embed[-1]
    classifier = n_params - sum(2 * e for e in embed) + 2 * c + c * 1000 + 1000
    assert round(classifier / 1e6, 1) == classifier_millions


def test_tiny_classifier_parameter_count() -> None:
    # BiFormer-T (depth 2-2-8-2, widths of S): 13.1 M in the paper's Table 1 / README.
    embed = [64, 128, 256, 512]
    with torch.device("meta"):
        model = BiFormer(depth=[2, 2, 8, 2], embed_dim=embed, qk_dims=embed, head_dim=32)
    n = sum(p.numel() for p in model.parameters()) - sum(2 * e for e in embed) + 2 * 512 + 512 * 1000 + 1000
    assert round(n / 1e6, 1) == 13.1


def test_official_classification_checkpoint_loads(tmp_path) -> None:
    model = _randomize(BiFormer(**TINY), 4)
    ckpt = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("extra_norms.")}
    ckpt |= {"norm.weight": torch.ones(64), "norm.bias": torch.zeros(64), "head.weight": torch.zeros(1000, 64),
             "head.bias": torch.zeros(1000)}
    path = tmp_path / "biformer_tiny_cls.pth"
    torch.save({"model": ckpt, "epoch": 300}, path)
    fresh = BiFormer(**TINY, pretrained=str(path))
    with pytest.warns(UserWarning, match="extra_norms") as record:
        fresh.init_weights()
    msg = " ".join(str(r.message) for r in record)
    assert "head." not in msg and "unexpected" not in msg
    loaded = fresh.state_dict()
    for k, v in ckpt.items():
        if k in loaded:
            torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    assert all(k in loaded for k in ckpt if not k.startswith(("norm.", "head.")))


def test_frozen_stages_and_norm_eval_really_freeze() -> None:
    model = _randomize(BiFormer(**TINY, frozen_stages=1, norm_eval=True), 5)
    model.train()
    frozen = [model.downsample_layers[0], model.stages[0], model.extra_norms[0]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in model.stages[1].parameters())
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = sum(o.square().mean() for o in model(torch.randn(2, 3, 64, 64)))
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k in before:
        if k.startswith(("downsample_layers.0.", "stages.0.", "extra_norms.0.")) or "running_" in k:
            torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(after["stages.1.0.mlp.0.weight"], before["stages.1.0.mlp.0.weight"])
    # Without norm_eval the unfrozen patch-embedding BN updates its statistics; the frozen stem's does not.
    model2 = _randomize(BiFormer(**TINY, frozen_stages=1, norm_eval=False), 5).train()
    stem_mean = model2.downsample_layers[0][1].running_mean.clone()
    ds1_mean = model2.downsample_layers[1][1].running_mean.clone()
    model2(torch.randn(2, 3, 64, 64))
    assert torch.equal(model2.downsample_layers[0][1].running_mean, stem_mean)
    assert not torch.equal(model2.downsample_layers[1][1].running_mean, ds1_mean)


def test_drop_path_only_in_training() -> None:
    a = _randomize(BiFormer(**TINY, drop_path_rate=0.5), 6)
    b = BiFormer(**TINY, drop_path_rate=0.0)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for oa, ob in zip(a(x), b(x), strict=True):
            torch.testing.assert_close(oa, ob, rtol=0, atol=0)
        a.train()
        torch.manual_seed(0)
        first = a(x)[-1]
        torch.manual_seed(1)
        assert not torch.allclose(first, a(x)[-1])


def test_gradient_checkpointing_gives_the_same_outputs_and_grads() -> None:
    a = _randomize(BiFormer(**TINY, norm_eval=True), 7).train()
    b = BiFormer(**TINY, norm_eval=True, use_checkpoint_stages=[0, 2]).train()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    sa = sum(o.sum() for o in a(x))
    sb = sum(o.sum() for o in b(x))
    sa.backward()
    sb.backward()
    torch.testing.assert_close(sa, sb)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_legacy_extra_norms_feed_the_next_stage() -> None:
    # Paper-time variant: the normalised map goes on to the next stage, so stage-0 outputs agree and later differ.
    a = _randomize(BiFormer(**TINY), 8).eval()
    b = BiFormer(**TINY, legacy_extra_norms=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        oa, ob = a(x), b(x)
        torch.testing.assert_close(oa[0], ob[0])
        assert not torch.allclose(oa[1], ob[1])
        # Legacy = normalise, then the next downsample + stage consume the normalised map.
        expected = b.extra_norms[1](b.stages[1](b.downsample_layers[1](ob[0])))
    torch.testing.assert_close(ob[1], expected)


def test_block_variants_and_bad_options() -> None:
    x = torch.randn(1, 8, 4, 4)
    for topk in (0, -1, -2, 2):
        blk = BiFormerBlock(8, num_heads=2, n_win=2, topk=topk, layer_scale_init_value=1e-6, mlp_dwconv=True).eval()
        assert blk(x).shape == x.shape
        # Layer scale 1e-6: the block is close to identity after its pos_embed.
        torch.testing.assert_close(blk(x), x + blk.pos_embed(x), atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="topk"):
        BiFormer(**TINY, n_win=2, topks=[1, 4, 16, -2])  # 16 regions routed out of 4
    with pytest.raises(ConfigError, match="before_attn_dwconv"):
        BiFormer(**TINY, before_attn_dwconv=5)
    with pytest.raises(ConfigError, match="head_dim"):
        BiFormer(**dict(TINY, head_dim=12))
    with pytest.raises(ConfigError, match="diff_routing"):
        BiFormer(**TINY, diff_routing=True)


def test_soft_param_routing_is_differentiable_through_the_router() -> None:
    attn = BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=2, param_routing=True, diff_routing=True,
                                   soft_routing=True)
    attn(torch.randn(1, 4, 4, 8)).sum().backward()
    assert attn.router.emb.weight.grad is not None and attn.router.emb.weight.grad.abs().sum() > 0


def test_retinanet_biformer_configs() -> None:
    for name, embed, dpr in (("retinanet.1x.biformer_small", [64, 128, 256, 512], 0.2),
                             ("retinanet.1x.biformer_base", [96, 192, 384, 768], 0.3)):
        cfg = load_config(name)
        bb = cfg.model["backbone"]
        assert bb["type"] == "BiFormer" and bb["embed_dim"] == embed and bb["n_win"] == 16
        assert bb["topks"] == [1, 4, 16, -2] and bb["drop_path_rate"] == dpr and "depth" in bb
        assert cfg.model["neck"]["in_channels"] == embed and cfg.model["neck"]["start_level"] == 1
        assert cfg.optimizer.type == "AdamW" and cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 1e-4
        assert cfg.runtime.amp is True and cfg.schedule.epochs == 12 and cfg.model["bbox_head"]["num_classes"] == 80
