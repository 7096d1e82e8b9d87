"""Swin Transformer backbone: shapes at odd sizes, equality with timm, window/shift/padding semantics, checkpoint
formats, parameter counts, frozen stages, key layout and the RetinaNet Swin-T config."""

from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

from densedet.models.backbones.swin import (
    SwinBlock,
    SwinTransformer,
    load_swin_checkpoint,
    relative_position_index,
    shifted_window_mask,
)
from densedet.registry import ConfigError

# A narrow Swin for fast tests: widths 16/32/64/128, every stage with one W-MSA and one SW-MSA block.
TINY = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "window_size": 7}


def _perturb_(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every LayerNorm/bias away from its 1/0 init so that a wrongly mapped one changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_output_strides_and_channels_at_odd_size() -> None:
    torch.manual_seed(0)
    model = SwinTransformer(**TINY, drop_path_rate=0.0).eval()
    h, w = 333, 517  # neither a multiple of the patch size (4) nor of 32 * window: every padding path runs
    with torch.no_grad():
        outs = model(torch.randn(1, 3, h, w))
    assert model.out_channels == [16, 32, 64, 128]
    for i, (out, stride) in enumerate(zip(outs, (4, 8, 16, 32))):
        assert out.shape == (1, 16 * 2**i, math.ceil(h / stride), math.ceil(w / stride))
        assert torch.isfinite(out).all()


def test_out_indices_select_stages_and_norms() -> None:
    model = SwinTransformer(**TINY, out_indices=(1, 3))
    assert model.out_channels == [32, 128]
    assert not hasattr(model, "norm0") and not hasattr(model, "norm2")
    with torch.no_grad():
        outs = model.eval()(torch.randn(1, 3, 64, 96))
    assert [o.shape[1:] for o in outs] == [(32, 8, 12), (128, 2, 3)]


def test_equals_timm_swin_tiny_at_224_with_weights_copied(tmp_path) -> None:
    """The strongest check: timm's Swin-T (``always_partition=True``: like the detection reference, shift even the
    7x7 last stage) with random weights, saved in timm's layout and loaded through ``pretrained``, gives the same
    stage outputs as ours (before our output norms; they are compared against a plain LayerNorm of timm's)."""
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, always_partition=True).eval()
    _perturb_(ref)
    path = tmp_path / "timm_swin_t.pth"
    torch.save(ref.state_dict(), path)

    model = SwinTransformer(arch="tiny", drop_path_rate=0.0, pretrained=str(path))
    with pytest.warns(UserWarning, match="unexpected keys"):
        report = load_swin_checkpoint(model, str(path))
    assert sorted(report["unexpected"]) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert sorted(report["missing"]) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert report["mismatched"] == []

    x = torch.randn(2, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        outs = model(x)
        y = ref.patch_embed(x)
        feats = []
        for layer in ref.layers:
            y = layer(y)
            feats.append(y)
    for out, feat in zip(outs, feats):
        expected = F.layer_norm(feat, feat.shape[-1:]).permute(0, 3, 1, 2)
        torch.testing.assert_close(out, expected, atol=5e-5, rtol=1e-4)

    # timm's final norm is our norm3 when copied across.
    model.norm3.load_state_dict(ref.norm.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x)[3], ref.norm(feats[3]).permute(0, 3, 1, 2), atol=5e-5, rtol=1e-4)

    # The classification rule (no shift where the map fits one window) changes the last stage: the check above is
    # sensitive to the detection semantics we keep.
    cls = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    cls.load_state_dict(ref.state_dict())
    with torch.no_grad():
        last = cls.norm(cls.layers(cls.patch_embed(x))).permute(0, 3, 1, 2)
        assert (model(x)[3] - last).abs().max() > 1e-3


def test_relative_position_index_hand_computed() -> None:
    # Window 2, tokens (0,0), (0,1), (1,0), (1,1): index = (dy + 1) * 3 + (dx + 1), d = query - key.
    expected = torch.tensor([[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
    assert torch.equal(relative_position_index(2), expected)


def test_shifted_window_mask_hand_computed() -> None:
    # 4x4 map, window 2, shift 1: regions along each axis are [0, 0, 1, 2] (split at -window and -shift).
    mask = shifted_window_mask(4, 4, window_size=2, shift=1)
    assert mask.shape == (4, 4, 4)
    assert torch.equal(mask[0], torch.zeros(4, 4))  # top-left window lies in one region
    # top-right window: tokens (0,2), (0,3), (1,2), (1,3) have column regions 1, 2, 1, 2
    m = -100.0
    assert torch.equal(mask[1], torch.tensor([[0, m, 0, m], [m, 0, m, 0], [0, m, 0, m], [m, 0, m, 0]]))
    # bottom-right window: four different regions, only the diagonal is free
    assert torch.equal(mask[3], torch.full((4, 4), m).fill_diagonal_(0.0))


def _naive_window_attention(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token SW-MSA with the reference's order (zero-pad to the window grid, then roll by -shift).

    ``x``: normalised tokens ``(H, W, C)``. A token at padded position ``i`` sits at ``(i - shift) mod Hp`` after
    the roll; it attends to every token of its rolled window, with -100 added across regions when shifted.
    """
    attn, ws, s = block.attn, block.window_size, block.shift
    h, w, c = x.shape
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    padded = torch.zeros(hp, wp, c)
    padded[:h, :w] = x
    heads, d = attn.num_heads, c // attn.num_heads
    q, k, v = attn.qkv(padded).view(hp, wp, 3, heads, d).unbind(2)
    table = attn.relative_position_bias_table

    def region(r: int, n: int) -> int:
        return int(r >= n - ws) + int(r >= n - s)

    out = torch.zeros(h, w, c)
    for i in range(h):
        for j in range(w):
            ri, rj = (i - s) % hp, (j - s) % wp
            logits, values = [], []
            for a in range(hp):
                for b in range(wp):
                    ra, rb = (a - s) % hp, (b - s) % wp
                    if ra // ws != ri // ws or rb // ws != rj // ws:
                        continue
                    rel = (ri % ws - ra % ws + ws - 1) * (2 * ws - 1) + (rj % ws - rb % ws + ws - 1)
                    logit = (q[i, j] * k[a, b]).sum(-1) * attn.scale + table[rel]
                    if s and (region(ri, hp), region(rj, wp)) != (region(ra, hp), region(rb, wp)):
                        logit = logit - 100.0
                    logits.append(logit)
                    values.append(v[a, b])
            p = torch.stack(logits).softmax(0)  # (keys, heads)
            out[i, j] = (p[..., None] * torch.stack(values)).sum(0).reshape(c)
    return attn.proj(out)


@pytest.mark.parametrize("shift", [0, 2])
def test_padded_window_attention_matches_token_by_token_reference(shift: int) -> None:
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=4, shift=shift).eval()
    _perturb_(block)
    x = torch.randn(1, 9, 10, 8)  # pads to 12 x 12: three windows per axis, some partly padding
    hp, wp = 12, 12
    mask = shifted_window_mask(hp, wp, 4, 2)
    with torch.no_grad():
        got = block._attention(x, mask)
        expected = _naive_window_attention(block, x[0])
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)


def test_padding_leaves_windows_without_padding_unchanged() -> None:
    """A W-MSA block is window-local: on a 10 x 14 map (padded to 14 x 14) the first window row never sees the
    padding, so it equals the same block on the 7 x 14 crop (which needs no padding)."""
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=7, shift=0).eval()
    _perturb_(block)
    x = torch.randn(2, 10, 14, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x)[:, :7], block(x[:, :7]), atol=1e-6, rtol=1e-6)


def test_input_padding_equals_explicit_zero_padding() -> None:
    """The backbone pads its input right/bottom with zeros to the patch grid: a 222 x 219 image gives exactly the
    outputs of the same image zero-padded by hand to 224 x 220, at every stage."""
    torch.manual_seed(0)
    model = SwinTransformer(**TINY, drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 222, 219)
    with torch.no_grad():
        a = model(x)
        b = model(F.pad(x, (0, 1, 0, 2)))
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def _official_state(model: SwinTransformer) -> dict[str, torch.Tensor]:
    """What microsoft/Swin-Transformer saves: no output norms, a final ``norm`` and ``head``, ``attn_mask`` buffers."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("norm")}
    last = model.num_features[-1]
    state.update({"norm.weight": torch.ones(last), "norm.bias": torch.zeros(last),
                  "head.weight": torch.zeros(1000, last), "head.bias": torch.zeros(1000)})
    for i, layer in enumerate(model.layers):
        for j, blk in enumerate(layer.blocks):
            if blk.shift:
                state[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 49, 49)
    return state


def test_official_imagenet_checkpoint_format(tmp_path) -> None:
    torch.manual_seed(0)
    source = SwinTransformer(**TINY, drop_path_rate=0.0).eval()
    _perturb_(source)
    with torch.no_grad():
        for i in range(4):  # the official file has no output norms: keep them at the init the target will have
            getattr(source, f"norm{i}").reset_parameters()
    path = tmp_path / "swin_official.pth"
    torch.save({"model": _official_state(source)}, path)

    target = SwinTransformer(**TINY, drop_path_rate=0.0, pretrained=str(path))
    with pytest.warns(UserWarning) as record:
        target.init_weights()
    message = str(record[0].message)
    for key in ("head.weight", "head.bias", "norm.weight", "norm0.weight", "norm3.bias"):
        assert key in message
    assert "attn_mask" not in message and "relative_position_index" not in message
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        for u, v in zip(source(x), target.eval()(x)):
            torch.testing.assert_close(u, v, atol=0, rtol=0)


def test_detector_checkpoint_backbone_keys_load_without_report(tmp_path) -> None:
    torch.manual_seed(0)
    source = SwinTransformer(**TINY)
    _perturb_(source)
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["bbox_head.atss_cls.weight"] = torch.zeros(3)
    path = tmp_path / "umop_like.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 24}}, path)
    target = SwinTransformer(**TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report: every backbone key maps
        report = load_swin_checkpoint(target, str(path))
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_bias_table_of_another_window_size_is_resized(tmp_path) -> None:
    """A window-12 checkpoint (the 384-px ImageNet-22k weights) into a window-7 model: the (23*23, heads) tables
    become (13*13, heads) by bicubic resizing, which keeps a per-head constant table constant."""
    big = SwinTransformer(**{**TINY, "window_size": 12})
    state = big.state_dict()
    for k in [k for k in state if k.endswith("relative_position_bias_table")]:
        heads = state[k].shape[1]
        state[k] = torch.arange(1.0, heads + 1).expand(23 * 23, heads).clone()
    path = tmp_path / "w12.pth"
    torch.save(state, path)
    small = SwinTransformer(**TINY)
    report = load_swin_checkpoint(small, str(path))
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    table = small.layers[3].blocks[1].attn.relative_position_bias_table
    assert table.shape == (13 * 13, 4)
    torch.testing.assert_close(table, torch.arange(1.0, 5.0).expand(169, 4), atol=1e-5, rtol=0)
    assert torch.equal(small.layers[0].blocks[0].attn.relative_position_index, relative_position_index(7))


# Swin paper (Liu et al. 2021), Table 1: ImageNet-1K models with a 1000-class head, params in millions.
PAPER_PARAMS_M = {"tiny": 28, "small": 50, "base": 88, "large": 197}
TIMM_NAMES = {"tiny": "swin_tiny_patch4_window7_224", "small": "swin_small_patch4_window7_224",
              "base": "swin_base_patch4_window7_224", "large": "swin_large_patch4_window7_224"}


@pytest.mark.parametrize("arch", ["tiny", "small", "base", "large"])
def test_parameter_counts(arch: str) -> None:
    with torch.device("meta"):
        ours = SwinTransformer(arch=arch)
        ref = timm.create_model(TIMM_NAMES[arch], pretrained=False)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    last = ours.num_features[-1]
    head, final_norm = last * 1000 + 1000, 2 * last
    out_norms = sum(2 * c for c in ours.num_features)
    # Same network as timm's classifier, minus its head and final norm, plus one LayerNorm per output stage.
    assert n_ours == n_ref - head - final_norm + out_norms
    assert round((n_ours + head + final_norm - out_norms) / 1e6) == PAPER_PARAMS_M[arch]
    if arch == "tiny":
        assert n_ours == 27_520_698  # "Swin-T backbone ~27.5 M" (28 M with the head)


def test_frozen_stages_follow_reference_counting() -> None:
    model = SwinTransformer(**TINY, frozen_stages=3)  # patch_embed + layers[0] + layers[1]
    model.train()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters()
                      if name.startswith(("patch_embed.", "layers.0.", "layers.1."))}
    assert not model.patch_embed.training and not model.layers[1].training and model.layers[2].training
    model(torch.randn(1, 3, 64, 64))[-1].sum().backward()
    assert model.layers[1].blocks[0].attn.qkv.weight.grad is None
    assert model.layers[2].blocks[0].attn.qkv.weight.grad is not None


def test_frozen_stages_disable_drop_path() -> None:
    """Frozen stages stay in eval mode, so their stochastic depth is off: with every stage frozen, two training
    forwards agree; unfrozen, the same drop path rate makes them differ."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    frozen = SwinTransformer(**TINY, drop_path_rate=0.9, frozen_stages=5).train()
    with torch.no_grad():
        assert torch.equal(frozen(x)[-1], frozen(x)[-1])
    free = SwinTransformer(**TINY, drop_path_rate=0.9).train()
    with torch.no_grad():
        assert not torch.equal(free(x)[-1], free(x)[-1])


def test_checkpointing_gives_same_outputs_and_grads() -> None:
    torch.manual_seed(0)
    plain = SwinTransformer(**TINY, drop_path_rate=0.0).train()
    ckpt = SwinTransformer(**TINY, drop_path_rate=0.0, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 48)
    a, b = plain(x), ckpt(x)
    sum(o.sum() for o in a).backward()
    sum(o.sum() for o in b).backward()
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    torch.testing.assert_close(plain.layers[0].blocks[1].attn.qkv.weight.grad,
                               ckpt.layers[0].blocks[1].attn.qkv.weight.grad)


def test_state_dict_key_layout() -> None:
    model = SwinTransformer(embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=3, out_indices=(1,))
    block = ["norm1.weight", "norm1.bias", "attn.relative_position_bias_table", "attn.relative_position_index",
             "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
             "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias",
                "layers.0.downsample.reduction.weight", "layers.0.downsample.norm.weight",
                "layers.0.downsample.norm.bias", "norm1.weight", "norm1.bias"}
    for i, depth in enumerate((1, 2)):
        expected |= {f"layers.{i}.blocks.{j}.{k}" for j in range(depth) for k in block}
    assert set(model.state_dict()) == expected
    sd = model.state_dict()
    assert sd["layers.0.downsample.reduction.weight"].shape == (16, 32)
    assert sd["layers.1.blocks.0.attn.relative_position_bias_table"].shape == (25, 2)
    assert "patch_embed.norm.weight" not in SwinTransformer(**TINY, patch_norm=False).state_dict()


def test_arch_shorthand_and_config_errors() -> None:
    with torch.device("meta"):
        small = SwinTransformer(arch="small")
        assert (small.embed_dim, small.depths, small.num_heads) == (96, (2, 2, 18, 2), (3, 6, 12, 24))
        assert SwinTransformer(arch="large").out_channels == [192, 384, 768, 1536]
        assert SwinTransformer(arch="base", embed_dim=128).embed_dim == 128
        with pytest.raises(ConfigError, match="arch='base' has embed_dim=128"):
            SwinTransformer(arch="base", embed_dim=96)
        with pytest.raises(ConfigError, match="unknown arch"):
            SwinTransformer(arch="huge")
        with pytest.raises(ConfigError, match="out_indices"):
            SwinTransformer(out_indices=(4,))
        with pytest.raises(ConfigError, match="not divisible"):
            SwinTransformer(embed_dim=10, depths=(2,), num_heads=(3,), out_indices=(0,))
        with pytest.raises(ConfigError, match="not both"):
            SwinTransformer(pretrained="a.pth", init_cfg={"type": "Pretrained", "checkpoint": "a.pth"})


def test_absolute_position_embedding_is_resized_to_the_input() -> None:
    model = SwinTransformer(**TINY, ape=True, pretrain_img_size=64).eval()
    assert model.absolute_pos_embed.shape == (1, 16, 16, 16)
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 90, 70))
    assert outs[0].shape == (1, 16, 23, 18)


def test_retinanet_swin_t_config_builds() -> None:
    from densedet.config import load_config

    cfg = load_config("retinanet_swin-t-p4-w7_fpn_1x_coco")
    backbone = cfg.model["backbone"]
    assert backbone["type"] == "SwinTransformer" and backbone["arch"] == "tiny"
    assert backbone["out_indices"] == [1, 2, 3] and "depth" not in backbone
    assert cfg.model["neck"]["in_channels"] == [192, 384, 768] and cfg.model["neck"]["start_level"] == 0
    assert cfg.optimizer.type == "SGD" and cfg.optimizer.lr == 0.01


def _unfold_permutation(c: int) -> torch.Tensor:
    """``perm[u]`` = index in our concatenation order of the channel ``nn.Unfold(2, stride=2)`` puts at ``u``.

    Built by labelling every (channel, row, col) of a 2x2 patch and reading the labels back in both orders."""
    labels = torch.arange(c * 4, dtype=torch.float32).view(1, c, 2, 2)
    unfold_ids = F.unfold(labels, kernel_size=2, stride=2)[0, :, 0]
    concat_ids = torch.cat([labels[0, :, 0, 0], labels[0, :, 1, 0], labels[0, :, 0, 1], labels[0, :, 1, 1]])
    return torch.stack([(concat_ids == u).nonzero()[0, 0] for u in unfold_ids])


def test_mmdet_patch_merging_channels_are_reordered() -> None:
    """MMDetection merges patches with ``nn.Unfold`` (channel-major order): its reduction/norm weights, converted,
    make our PatchMerging compute the same as unfold -> LayerNorm -> Linear."""
    from densedet.models.backbones.swin import PatchMerging, mmdet_swin_to_reference

    torch.manual_seed(0)
    c = 3
    norm, reduction = torch.nn.LayerNorm(4 * c), torch.nn.Linear(4 * c, 2 * c, bias=False)
    _perturb_(norm)
    x = torch.randn(2, 6, 4, c)  # (B, H, W, C)
    with torch.no_grad():
        patches = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # (B, L, 4C)
        expected = reduction(norm(patches)).view(2, 3, 2, 2 * c)
        mm = {"stages.0.downsample.reduction.weight": reduction.weight, "stages.0.downsample.norm.weight": norm.weight,
              "stages.0.downsample.norm.bias": norm.bias}
        converted = mmdet_swin_to_reference(mm)
        ours = PatchMerging(c)
        ours.load_state_dict({k.removeprefix("layers.0.downsample."): v for k, v in converted.items()})
        torch.testing.assert_close(ours(x), expected)


def test_mmdet_layout_detector_checkpoint_loads(tmp_path) -> None:
    """A detector checkpoint with MMDetection's Swin names (as its model zoo ships for
    retinanet_swin-t-p4-w7_fpn_1x_coco) loads with every key mapped and reproduces the outputs."""
    torch.manual_seed(0)
    source = SwinTransformer(**TINY, out_indices=(1, 2, 3)).eval()
    _perturb_(source)
    renames = [(".attn.", ".attn.w_msa."), (".mlp.fc1.", ".ffn.layers.0.0."), (".mlp.fc2.", ".ffn.layers.1."),
               ("patch_embed.proj.", "patch_embed.projection.")]
    mm = {}
    for k, v in source.state_dict().items():
        new = k.replace("layers.", "stages.", 1) if k.startswith("layers.") else k
        for a, b in renames:
            new = new.replace(a, b)
        if ".downsample." in k:
            perm = _unfold_permutation(v.shape[-1] // 4)
            v = v[..., perm]
        mm[f"backbone.{new}"] = v
    assert "backbone.stages.2.blocks.1.attn.w_msa.relative_position_bias_table" in mm
    path = tmp_path / "mmdet_retinanet_swin.pth"
    torch.save({"state_dict": mm}, path)
    target = SwinTransformer(**TINY, out_indices=(1, 2, 3))
    assert load_swin_checkpoint(target, str(path)) == {"missing": [], "unexpected": [], "mismatched": []}
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        for u, v in zip(source(x), target.eval()(x)):
            torch.testing.assert_close(u, v, atol=0, rtol=0)


def test_retinanet_with_swin_trains_every_backbone_parameter() -> None:
    """As the Swin-T RetinaNet config wires it (out_indices 1..3, FPN start_level 0, extra convs on the input), at
    a narrow width: one loss backward reaches every backbone parameter, also with channels-last inputs."""
    from densedet.config import load_config
    from densedet.models.build import build_detector

    model_cfg = load_config("retinanet_swin-t-p4-w7_fpn_1x_coco").model
    # drop_path_rate 0: stochastic depth may drop a branch for both images, leaving it without a gradient
    model_cfg["backbone"] = {**model_cfg["backbone"], "arch": None, **TINY, "pretrained": None, "drop_path_rate": 0.0}
    model_cfg["neck"] = {**model_cfg["neck"], "in_channels": [32, 64, 128], "out_channels": 16}
    model_cfg["bbox_head"] = {**model_cfg["bbox_head"], "num_classes": 3, "in_channels": 16, "feat_channels": 16,
                              "stacked_convs": 1}
    torch.manual_seed(0)
    model = build_detector(model_cfg).use_channels_last().train()
    images = torch.randn(2, 3, 96, 128)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 5.0, 120.0, 90.0]]), "labels": torch.tensor([2])}]
    losses = model(images, targets, mode="loss")
    sum(v for k, v in losses.items() if k.startswith("loss")).backward()
    no_grad = [n for n, p in model.backbone.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], no_grad
