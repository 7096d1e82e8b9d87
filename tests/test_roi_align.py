"""The sparse-product RoIAlign (densedet.models.roi_heads.roi_align) against torchvision.ops.roi_align, the
reference kernel: forward values and input gradients on random RoIs (borders crossed, sub-pixel, empty, inverted and
larger-than-the-map boxes), adaptive and fixed sampling, both alignments, several output sizes; the multi-level
extractor against torchvision per level; a numerical gradient check; a tiny Mask R-CNN's losses and gradients
through either kernel."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align as tv_roi_align

from densedet.models.build import build_detector
from densedet.models.roi_heads import SingleRoIExtractor, map_roi_levels
from densedet.models.roi_heads import roi_extractor as roi_extractor_module
from densedet.models.roi_heads.roi_align import multilevel_roi_align, roi_align, sparse_roi_align_supported


def _random_rois(n: int, img_w: float, img_h: float, batch: int, seed: int) -> torch.Tensor:
    """Boxes from sub-pixel to larger than the image, a third of them crossing its border, plus edge cases."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([img_w * 1.2, img_h * 1.2]) - torch.tensor([img_w, img_h]) * 0.1
    wh = torch.rand(n, 2, generator=g) ** 3 * torch.tensor([img_w * 1.5, img_h * 1.5])
    rois = torch.cat([torch.randint(0, batch, (n, 1), generator=g).float(), xy, xy + wh], 1)
    special = torch.tensor([[0, 10.0, 10.0, 10.0, 10.0],  # empty
                            [0, 20.0, 20.0, 12.0, 15.0],  # inverted
                            [0, 3.2, 4.1, 3.7, 4.3],  # sub-pixel
                            [batch - 1, -img_w, -img_h, 2 * img_w, 2 * img_h],  # far larger than the image
                            [batch - 1, img_w - 2.0, img_h - 2.0, img_w + 30.0, img_h + 40.0],  # mostly outside
                            [0, -50.0, -50.0, -20.0, -10.0]])  # entirely outside
    return torch.cat([rois, special])


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within ``rel`` relative to the largest magnitude (sums run in another order than torchvision's)."""
    scale = float(expected.detach().abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("sampling_ratio,aligned,size", [(0, True, (7, 7)), (0, True, (14, 14)),
                                                         (0, False, (3, 5)), (2, True, (7, 7)), (1, False, (4, 4))])
def test_forward_and_input_gradient_equal_torchvision(sampling_ratio: int, aligned: bool,
                                                      size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 23, 31, requires_grad=True)
    scale = 0.25
    rois = _random_rois(150, 31 / scale, 23 / scale, batch=2, seed=1)
    ref = tv_roi_align(x, rois, size, scale, sampling_ratio, aligned)
    out = roi_align(x, rois, size, scale, sampling_ratio, aligned)
    assert out.shape == ref.shape == (rois.shape[0], 6, *size)
    _close(out, ref)
    if sampling_ratio == 0 and aligned:  # empty / inverted boxes get no samples: zeros
        assert float(ref[-6:-4].detach().abs().max()) == 0 and float(out[-6:-4].detach().abs().max()) == 0
    grad = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, grad)
    (g_out,) = torch.autograd.grad(out, x, grad)
    _close(g_out, g_ref)


def test_float64_matches_torchvision_to_double_rounding_and_passes_gradcheck() -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    rois = _random_rois(40, 44.0, 36.0, batch=1, seed=3).double()
    ref = tv_roi_align(x, rois, (5, 5), 0.25, 0, True)
    torch.testing.assert_close(roi_align(x, rois, 5, 0.25, 0, True), ref, rtol=1e-12, atol=1e-12)
    small = rois[:8]
    assert torch.autograd.gradcheck(lambda t: roi_align(t, small, 3, 0.25, 0, True), (x,))


@pytest.mark.parametrize("channels_last", [False, True])
def test_multilevel_equals_torchvision_per_level_with_gradients(channels_last: bool) -> None:
    """The extractor's one-product path against torchvision on each RoI's level (the extractor's former code)."""
    torch.manual_seed(4)
    strides = [4, 8, 16, 32]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = [torch.randn(2, 8, 320 // s, 384 // s).contiguous(memory_format=fmt).requires_grad_() for s in strides]
    rois = _random_rois(300, 384.0, 320.0, batch=2, seed=5)
    levels = map_roi_levels(rois, 4)
    assert set(levels.tolist()) == {0, 1, 2, 3}
    out = multilevel_roi_align(feats, rois, levels, (7, 7), [1 / s for s in strides], 0, True)
    ref = torch.zeros_like(out)
    for lvl, s in enumerate(strides):
        idx = (levels == lvl).nonzero(as_tuple=True)[0]
        ref = ref.index_copy(0, idx, tv_roi_align(feats[lvl], rois[idx], (7, 7), 1 / s, 0, True))
    _close(out, ref)
    grad = torch.randn_like(ref)
    g_out = torch.autograd.grad(out, feats, grad)
    g_ref = torch.autograd.grad(ref, feats, grad)
    for a, b in zip(g_out, g_ref):
        assert a.shape == b.shape
        _close(a, b)


def test_extractor_paths_agree_and_fallbacks() -> None:
    """SingleRoIExtractor takes the sparse path on CPU float in eager mode and torchvision's otherwise (bf16,
    tracing): same values either way; no RoIs give an empty result."""
    torch.manual_seed(6)
    strides = [4, 8, 16, 32]
    ext = SingleRoIExtractor({"type": "RoIAlign", "output_size": 7, "sampling_ratio": 0}, 4, strides)
    feats = tuple(torch.randn(1, 4, 256 // s, 256 // s) for s in strides)
    rois = _random_rois(50, 256.0, 256.0, batch=1, seed=7)
    assert sparse_roi_align_supported(feats)
    assert not sparse_roi_align_supported([f.bfloat16() for f in feats])
    eager = ext(feats, rois)
    traced = torch.jit.trace(lambda *f: ext(f, rois), feats, check_trace=False)
    _close(eager, traced(*feats))
    assert ext(feats, rois[:0]).shape == (0, 4, 7, 7)


def _tiny_mask_rcnn() -> torch.nn.Module:
    from densedet.config import load_config

    cfg = load_config("mask_rcnn_r18_fpn_synth")
    torch.manual_seed(0)
    return build_detector(cfg.model).use_channels_last(cfg.runtime.channels_last)


def test_tiny_mask_rcnn_losses_and_gradients_equal_with_either_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from densedet.structures.masks import BitmapCrop, InstanceMasks

    model = _tiny_mask_rcnn().train()
    images = torch.randn(2, 3, 128, 128)
    targets = []
    for b in range(2):
        boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [40.0 + b, 30.0, 120.0, 100.0]])
        crops = [BitmapCrop(10, 12, torch.ones(78, 60, dtype=torch.uint8).numpy()),
                 BitmapCrop(40 + b, 30, torch.ones(70, 80 - b, dtype=torch.uint8).numpy())]
        targets.append({"boxes": boxes, "labels": torch.tensor([0, 2]), "ignore_boxes": torch.zeros(0, 4),
                        "masks": InstanceMasks(crops, 128, 128)})

    def run() -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(1)  # the samplers draw from the global generator
        model.zero_grad()
        losses = model(images, targets, None, mode="loss")
        sum(v for k, v in losses.items() if k.startswith("loss")).backward()
        return losses, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fast_losses, fast_grads = run()
    monkeypatch.setattr(roi_extractor_module, "sparse_roi_align_supported", lambda feats: False)
    ref_losses, ref_grads = run()
    for k in ref_losses:
        _close(fast_losses[k], ref_losses[k], rel=1e-4)
    assert len(fast_grads) == len(ref_grads)
    for a, b in zip(fast_grads, ref_grads):
        _close(a, b, rel=1e-4)
