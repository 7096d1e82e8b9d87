"""Varifocal Loss against its closed form (VarifocalNet, eq. 2) on hand-made inputs."""

import math

import pytest
import torch

from densedet.losses import VarifocalLoss, build_loss, varifocal_loss


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _bce(x: float, q: float) -> float:
    p = _sig(x)
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


# one positive element (q = 0.6 at the gt class) and three negatives
LOGITS = [[0.5, -1.0], [2.0, 0.0]]
TARGET = [[0.6, 0.0], [0.0, 0.0]]


def _expected(iou_weighted: bool, alpha: float = 0.75, gamma: float = 2.0) -> list[list[float]]:
    out = []
    for row_x, row_q in zip(LOGITS, TARGET):
        row = []
        for x, q in zip(row_x, row_q):
            if q > 0:
                w = q if iou_weighted else 1.0
            else:
                w = alpha * abs(_sig(x) - q) ** gamma
            row.append(_bce(x, q) * w)
        out.append(row)
    return out


@pytest.mark.parametrize("iou_weighted", [True, False])
def test_elementwise_closed_form(iou_weighted):
    pred, target = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGET, dtype=torch.float64)
    got = varifocal_loss(pred, target, iou_weighted=iou_weighted, reduction="none")
    torch.testing.assert_close(got, torch.tensor(_expected(iou_weighted), dtype=torch.float64))


def test_positive_term_hand_value():
    # q = 0.6, x = 0.5: BCE = -(0.6 log s(0.5) + 0.4 log(1 - s(0.5))) = 0.674077, weighted by q
    got = varifocal_loss(torch.tensor([[0.5]], dtype=torch.float64), torch.tensor([[0.6]], dtype=torch.float64),
                         reduction="sum")
    assert got.item() == pytest.approx(0.6 * 0.674077, rel=1e-5)


def test_negative_term_is_alpha_p_gamma_focal():
    # for q = 0: loss = alpha * p^gamma * -log(1 - p)
    x = torch.tensor([[1.3]], dtype=torch.float64)
    p = torch.sigmoid(x)
    got = varifocal_loss(x, torch.zeros_like(x), alpha=0.5, gamma=1.5, reduction="sum")
    assert got.item() == pytest.approx((0.5 * p**1.5 * -torch.log(1 - p)).item())


def test_module_reduction_weight_and_avg_factor():
    pred, target = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGET, dtype=torch.float64)
    loss = build_loss({"type": "VarifocalLoss", "loss_weight": 2.0}, "test")
    assert isinstance(loss, VarifocalLoss)
    exp = torch.tensor(_expected(True), dtype=torch.float64)
    row_w = torch.tensor([1.0, 0.0], dtype=torch.float64)  # second row ignored
    got = loss(pred, target, weight=row_w, avg_factor=3.0)
    assert got.item() == pytest.approx(2.0 * exp[0].sum().item() / 3.0, rel=1e-6)
    assert loss(pred, target, reduction_override="sum").item() == pytest.approx(2.0 * exp.sum().item())
    assert loss(pred, target).item() == pytest.approx(2.0 * exp.mean().item())


def test_gradient_flows_through_negative_weight():
    # d/dx [alpha p^2 softplus(x)] = alpha (2 p^2 (1-p) softplus(x) + p^3), p = sigmoid(x)
    x = torch.tensor([[0.7]], dtype=torch.float64, requires_grad=True)
    varifocal_loss(x, torch.zeros_like(x), reduction="sum").backward()
    p = _sig(0.7)
    sp = math.log1p(math.exp(0.7))
    assert x.grad.item() == pytest.approx(0.75 * (2 * p * p * (1 - p) * sp + p**3), rel=1e-9)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="IoU-aware"):
        varifocal_loss(torch.zeros(3, 2), torch.zeros(3))


def test_column_weight_n_by_1_broadcasts_like_mmdet():
    """VarifocalNet's anchor_head.loss_single passes ``label_weights.unsqueeze(1)`` (N, 1): mmdet's
    weight_reduce_loss broadcasts it over the classes, the same as the (N,) row weight."""
    pred, target = torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(TARGET, dtype=torch.float64)
    exp = torch.tensor(_expected(True), dtype=torch.float64)
    col = torch.tensor([[0.5], [2.0]], dtype=torch.float64)
    got = VarifocalLoss()(pred, target, weight=col, avg_factor=4.0)
    assert got.item() == pytest.approx((0.5 * exp[0].sum() + 2.0 * exp[1].sum()).item() / 4.0, rel=1e-6)
    torch.testing.assert_close(varifocal_loss(pred, target, col, reduction="none"), exp * col)
    torch.testing.assert_close(VarifocalLoss()(pred, target, weight=col[:, 0], avg_factor=4.0), got)
    with pytest.raises(ValueError, match="does not fit"):
        varifocal_loss(pred, target, torch.ones(2, 3, dtype=torch.float64))
