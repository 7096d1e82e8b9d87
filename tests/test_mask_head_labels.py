"""FCNMaskHead.forward_labels (only each RoI's class channel) against the full head's output indexed by class: the
same logits, loss and parameter gradients; and chunked mask inference gives the same masks as one call."""

from __future__ import annotations

import pytest
import torch

import densedet.models.roi_heads.standard_roi_head as roi_head_module
from densedet.models.roi_heads import FCNMaskHead


def _head(channels_last: bool) -> FCNMaskHead:
    torch.manual_seed(0)
    head = FCNMaskHead(num_convs=2, in_channels=8, conv_out_channels=8, num_classes=5)
    head.init_weights()
    torch.nn.init.normal_(head.conv_logits.bias)
    return head.to(memory_format=torch.channels_last) if channels_last else head


@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_labels_equals_full_head_indexed_by_class(channels_last: bool) -> None:
    head = _head(channels_last)
    x = torch.randn(7, 8, 14, 14)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 4, 2, 2, 1, 3, 4])
    targets = (torch.rand(7, 28, 28) > 0.5).float()

    full = head(x)
    ref = full[torch.arange(7), labels]
    loss_ref = head.loss(full, targets, labels)
    grads_ref = torch.autograd.grad(loss_ref, list(head.parameters()))

    out = head.forward_labels(x, labels)
    assert out.shape == (7, 28, 28)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    loss = head.loss(out, targets, labels)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(loss, list(head.parameters()))
    for (name, _), g, g_ref in zip(head.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6, msg=name)
    # classes that no RoI has get no gradient in conv_logits, exactly as through the full head
    assert float(grads[-2].reshape(5, -1)[[i for i in range(5) if i not in labels.tolist()]].abs().sum()) == 0


def test_chunked_mask_inference_equals_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from densedet.config import load_config
    from densedet.models.build import build_detector

    cfg = load_config("mask_rcnn_r18_fpn_synth")
    torch.manual_seed(0)
    model = build_detector(cfg.model).eval()
    images = torch.randn(2, 3, 96, 128)
    metas = [{"img_shape": (96, 128), "pad_shape": (96, 128), "scale_factor": (1.0, 1.0), "ori_shape": (96, 128)}] * 2
    model.roi_head.test_cfg.score_thr = 0.0
    with torch.no_grad():
        one = model(images, None, metas, mode="predict")
        monkeypatch.setattr(roi_head_module, "_MASK_CHUNK", 3)
        chunked = model(images, None, metas, mode="predict")
    assert sum(len(d["boxes"]) for d in one) > 6  # several chunks
    for a, b in zip(one, chunked):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        assert len(a["masks"]) == len(b["masks"])
        for i in range(len(a["masks"])):
            ca, cb = a["masks"].crop_of(i), b["masks"].crop_of(i)
            assert (ca.x0, ca.y0) == (cb.x0, cb.y0) and (ca.bits == cb.bits).all()
