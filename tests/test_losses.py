"""Losses against closed forms and hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

from densedet.losses import (
    CrossEntropyLoss,
    FocalLoss,
    GIoULoss,
    IoULoss,
    L1Loss,
    SmoothL1Loss,
    build_loss,
    giou_loss,
    iou_loss,
    l1_loss,
    sigmoid_focal_loss,
    smooth_l1_loss,
    weight_reduce_loss,
)
from densedet.registry import ConfigError

EPS = torch.finfo(torch.float32).eps
LOGITS = [[0.0, 1.0, -1.0], [2.0, -2.0, 0.5]]
LABELS = [1, 3]  # row 1 is background (label == num_classes)


def focal_closed_form(logits, labels, gamma, alpha):
    """Element-wise focal loss written out: -alpha (1-p)^g log p for the target class, else -(1-a) p^g log(1-p)."""
    out = []
    for row, lab in zip(logits, labels):
        r = []
        for c, x in enumerate(row):
            p = 1 / (1 + math.exp(-x))
            if c == lab:
                r.append(-alpha * (1 - p) ** gamma * math.log(p))
            else:
                r.append(-(1 - alpha) * p**gamma * math.log(1 - p))
        out.append(r)
    return torch.tensor(out)


def test_focal_matches_closed_form_2x3():
    pred = torch.tensor(LOGITS)
    expected = focal_closed_form(LOGITS, LABELS, 2.0, 0.25)
    out = sigmoid_focal_loss(pred, torch.tensor(LABELS), reduction="none")
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(sigmoid_focal_loss(pred, torch.tensor(LABELS)), expected.mean())
    # One-hot float targets give the same loss as integer labels.
    onehot = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(sigmoid_focal_loss(pred, onehot, reduction="sum"), expected.sum())


def test_focal_alpha_gamma_effect():
    pred, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    # gamma=0, alpha=0.5: half the plain BCE.
    bce = F.binary_cross_entropy_with_logits(pred, torch.tensor([[0.0, 1, 0], [0, 0, 0]]), reduction="none")
    torch.testing.assert_close(sigmoid_focal_loss(pred, labels, gamma=0.0, alpha=0.5, reduction="none"), bce / 2)
    # Larger gamma down-weights every element (pt < 1), and most the easy ones.
    g1 = sigmoid_focal_loss(pred, labels, gamma=1.0, reduction="none")
    g2 = sigmoid_focal_loss(pred, labels, gamma=2.0, reduction="none")
    assert (g2 < g1).all()
    # alpha weighs positives by alpha and negatives by 1 - alpha.
    a = sigmoid_focal_loss(pred, labels, alpha=0.75, reduction="none")
    b = sigmoid_focal_loss(pred, labels, alpha=0.25, reduction="none")
    torch.testing.assert_close(a[0, 1] / b[0, 1], torch.tensor(3.0))
    torch.testing.assert_close(a[0, 0] / b[0, 0], torch.tensor(1 / 3))


def test_focal_weights_and_avg_factor():
    pred, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    el = focal_closed_form(LOGITS, LABELS, 2.0, 0.25)
    row_w = torch.tensor([2.0, 0.0])
    torch.testing.assert_close(sigmoid_focal_loss(pred, labels, row_w, reduction="sum"), 2 * el[0].sum())
    full_w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(sigmoid_focal_loss(pred, labels, full_w, reduction="sum"), (el * full_w).sum())
    torch.testing.assert_close(sigmoid_focal_loss(pred, labels, avg_factor=4.0), el.sum() / (4.0 + EPS))
    module = FocalLoss(gamma=2.0, alpha=0.25, loss_weight=3.0)
    torch.testing.assert_close(module(pred, labels, avg_factor=2), 3 * el.sum() / (2 + EPS))
    torch.testing.assert_close(module(pred, labels, reduction_override="none"), 3 * el)
    with pytest.raises(ValueError, match="use_sigmoid"):
        FocalLoss(use_sigmoid=False)


def test_focal_gradient_flows():
    pred = torch.tensor(LOGITS, requires_grad=True)
    sigmoid_focal_loss(pred, torch.tensor(LABELS)).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_weight_reduce_loss_semantics():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.tensor([1.0, 0.0, 1.0, 0.5])
    assert weight_reduce_loss(loss, w, "sum").item() == pytest.approx(6.0)
    assert weight_reduce_loss(loss, w, "mean").item() == pytest.approx(1.5)
    assert weight_reduce_loss(loss, w, "mean", avg_factor=3).item() == pytest.approx(6.0 / (3 + EPS))
    # avg_factor 0 does not divide by zero.
    assert weight_reduce_loss(loss * 0, None, "mean", avg_factor=0).item() == 0.0
    torch.testing.assert_close(weight_reduce_loss(loss, w, "none", avg_factor=3), loss * w)
    with pytest.raises(ValueError, match="avg_factor"):
        weight_reduce_loss(loss, w, "sum", avg_factor=3)
    with pytest.raises(ValueError, match="reduction"):
        weight_reduce_loss(loss, w, "max")


def test_smooth_l1_values():
    pred = torch.tensor([[0.5, 2.0, -0.5, 0.0]])
    target = torch.zeros(1, 4)
    # beta=1: 0.5 * 0.25, 2 - 0.5, 0.125, 0.
    out = smooth_l1_loss(pred, target, beta=1.0, reduction="none")
    torch.testing.assert_close(out, torch.tensor([[0.125, 1.5, 0.125, 0.0]]))
    # beta=4: every |d| < 4 -> 0.5 d^2 / 4.
    torch.testing.assert_close(smooth_l1_loss(pred, target, beta=4.0, reduction="sum"), torch.tensor(4.5 / 8))
    m = SmoothL1Loss(beta=1.0, loss_weight=2.0)
    torch.testing.assert_close(m(pred, target, avg_factor=1.0), 2 * torch.tensor(1.75) / (1 + EPS))
    with pytest.raises(ValueError, match="beta"):
        SmoothL1Loss(beta=0.0)


def test_l1_with_box_and_coord_weights():
    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    target = torch.zeros(2, 4)
    assert l1_loss(pred, target, reduction="sum").item() == 10.0
    # (N,) weight applies to each box's 4 coordinates.
    assert l1_loss(pred, target, torch.tensor([0.5, 1.0]), reduction="sum").item() == 5.0
    w4 = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert L1Loss(loss_weight=2.0)(pred, target, w4, reduction_override="sum").item() == 10.0
    empty = torch.zeros(0, 4, requires_grad=True)
    assert l1_loss(empty, torch.zeros(0, 4)).item() == 0.0


def test_giou_and_iou_loss_values():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 3.0, 3.0]])
    target = torch.tensor([[5.0, 5.0, 15.0, 15.0], [20.0, 0.0, 30.0, 10.0], [1.0, 1.0, 3.0, 3.0]])
    # GIoU: 1/7 - 50/225, -1/3, 1.
    expected = torch.tensor([1 - (1 / 7 - 50 / 225), 1 + 1 / 3, 0.0])
    torch.testing.assert_close(giou_loss(pred, target, reduction="none"), expected)
    torch.testing.assert_close(GIoULoss(loss_weight=2.0)(pred, target), 2 * expected.mean())
    # IoU loss: log mode clamps IoU 0 to eps.
    ious = torch.tensor([1 / 7, 0.0, 1.0])
    torch.testing.assert_close(iou_loss(pred, target, mode="linear", reduction="none"), 1 - ious)
    torch.testing.assert_close(
        IoULoss(reduction="none")(pred, target), torch.tensor([math.log(7), -math.log(1e-6), 0.0])
    )
    torch.testing.assert_close(IoULoss(linear=True)(pred, target), (1 - ious).mean())


def test_giou_weights():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]], requires_grad=True)
    target = torch.tensor([[5.0, 5.0, 15.0, 15.0], [20.0, 0.0, 30.0, 10.0]])
    per_box = giou_loss(pred, target, reduction="none").detach()
    m = GIoULoss(reduction="sum")
    # (N, 4) weights are averaged per box.
    w4 = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(m(pred, target, w4), 0.5 * per_box[0] + per_box[1])
    torch.testing.assert_close(m(pred, target, torch.tensor([0.0, 2.0])), 2 * per_box[1])
    # All-zero weight: exactly zero, still attached to the graph.
    zero = m(pred, target, torch.zeros(2))
    assert zero.item() == 0.0
    zero.backward()
    assert pred.grad is not None and (pred.grad == 0).all()


def test_cross_entropy_sigmoid_centerness_and_softmax():
    pred = torch.tensor([0.3, -1.2, 2.0])
    target = torch.tensor([0.5, 0.0, 1.0])
    p = torch.sigmoid(pred)
    bce = -(target * p.log() + (1 - target) * (1 - p).log())
    torch.testing.assert_close(CrossEntropyLoss(use_sigmoid=True)(pred, target), bce.mean())
    torch.testing.assert_close(CrossEntropyLoss(use_sigmoid=True)(pred, target, avg_factor=2.0), bce.sum() / (2 + EPS))
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    labels = torch.tensor([1, 0])
    nll = -torch.log_softmax(logits, -1)[torch.arange(2), labels]
    torch.testing.assert_close(CrossEntropyLoss(loss_weight=0.5)(logits, labels), 0.5 * nll.mean())
    w = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(CrossEntropyLoss(reduction="sum")(logits, labels, w), nll[0])
    # Sigmoid with integer labels expands to one-hot; label == C is background (all zeros).
    onehot = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    expected = F.binary_cross_entropy_with_logits(logits, onehot)
    torch.testing.assert_close(CrossEntropyLoss(use_sigmoid=True)(logits, torch.tensor([1, 3])), expected)


def test_build_loss_from_config():
    loss = build_loss({"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0}, "model.head.loss_cls")
    assert isinstance(loss, FocalLoss) and loss.gamma == 2.0
    assert isinstance(build_loss({"type": "GIoULoss", "loss_weight": 2.0}), GIoULoss)
    with pytest.raises(ConfigError, match="gama"):
        build_loss({"type": "FocalLoss", "gama": 2.0}, "model.head.loss_cls")
    with pytest.raises(ConfigError, match="unknown loss type"):
        build_loss({"type": "FocalLos"})


@pytest.mark.parametrize("gamma,alpha,with_weight", [(2.0, 0.25, True), (1.5, 0.5, False), (0.0, 0.25, True)])
def test_fused_label_focal_matches_generic_values_and_gradients(gamma, alpha, with_weight) -> None:
    """Hard labels take the fused closed-form path; it must equal the one-hot formula and its autograd gradient."""
    from densedet.losses.focal import labels_to_binary

    g = torch.Generator().manual_seed(7)
    pred = (torch.randn(50, 6, generator=g) * 3).requires_grad_()
    labels = torch.randint(0, 7, (50,), generator=g)  # 6 = background
    weight = torch.rand(50, generator=g) if with_weight else None
    fused = sigmoid_focal_loss(pred, labels, weight, gamma=gamma, alpha=alpha, avg_factor=7.0)
    (gf,) = torch.autograd.grad(fused, pred)
    ref_pred = pred.detach().clone().requires_grad_()
    onehot = labels_to_binary(labels, 6, torch.float32)
    ref = sigmoid_focal_loss(ref_pred, onehot, None if weight is None else weight[:, None].expand(50, 6),
                             gamma=gamma, alpha=alpha, avg_factor=7.0)
    (gr,) = torch.autograd.grad(ref, ref_pred)
    assert torch.allclose(fused, ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(gf, gr, rtol=1e-4, atol=1e-7)
    mean_fused = sigmoid_focal_loss(pred, labels, weight, gamma=gamma, alpha=alpha)
    mean_ref = sigmoid_focal_loss(ref_pred, onehot, None if weight is None else weight[:, None].expand(50, 6),
                                  gamma=gamma, alpha=alpha)
    assert torch.allclose(mean_fused, mean_ref, rtol=1e-5)
