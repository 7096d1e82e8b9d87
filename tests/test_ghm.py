"""GHM-C / GHM-R (Li et al., AAAI 2019): weights on hand-computed examples (momentum over two steps, empty bins,
ignored elements), ASL1 and its gradient in closed form, agreement with a per-bin loop written from the paper's
definition, the running densities in state dicts and checkpoints, and the GHM RetinaNet configs."""

from __future__ import annotations

import math

import pytest
import torch

import densedet
from densedet.config import load_config
from densedet.engine.checkpoint import load_model_weights
from densedet.losses import GHMC, GHMR, asl1_loss, build_loss


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _bce(p: float, t: int) -> float:
    return -math.log(p) if t == 1 else -math.log(1 - p)


# Probabilities (C = 2 classes, background label 2). With bins=4 the edges are 0, .25, .5, .75, 1 (+1e-6).
#   row 0: label 0        p = (0.9, 0.2)   g = (0.1, 0.2)   bins (0, 0)
#   row 1: background     p = (0.7, 0.1)   g = (0.7, 0.1)   bins (2, 0)
#   row 2: label 1, IGNORED  p = (0.9, 0.05)  g = (0.9, 0.95) would be bin 3 -> bin 3 stays empty
#   row 3: label 1        p = (0.3, 0.6)   g = (0.3, 0.4)   bins (1, 1)
PROBS = [[0.9, 0.2], [0.7, 0.1], [0.9, 0.05], [0.3, 0.6]]
LABELS = [0, 2, 1, 1]
ONEHOT = [[1, 0], [0, 0], [0, 1], [0, 1]]


def _ghmc_inputs(weights: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pred = torch.tensor([[_logit(p) for p in row] for row in PROBS], dtype=torch.float32)
    return pred, torch.tensor(LABELS), torch.tensor(weights)


def _expected(bin_weight: dict[int, float], bins_of: list[list[int | None]], tot: float) -> tuple[list, float]:
    """Element weights from per-bin weights (None = ignored) and the mean-reduced loss sum(w * BCE) / tot."""
    w = [[0.0 if b is None else bin_weight[b] for b in row] for row in bins_of]
    total = sum(w[i][j] * _bce(PROBS[i][j], ONEHOT[i][j]) for i in range(4) for j in range(2))
    return w, total / tot


BINS_STEP1 = [[0, 0], [2, 0], [None, None], [1, 1]]
BINS_STEP2 = [[0, 0], [2, 0], [None, None], [None, None]]


def test_ghmc_weights_without_momentum() -> None:
    # 6 valid elements: bin 0 holds 3, bin 1 holds 2, bin 2 holds 1, bin 3 is empty -> 3 non-empty bins.
    # w = tot / (count * n) = 6/(3*3), 6/(2*3), 6/(1*3).
    loss = GHMC(bins=4, momentum=0)
    pred, labels, weight = _ghmc_inputs([1, 1, 0, 1])
    w, mean = _expected({0: 2 / 3, 1: 1.0, 2: 2.0}, BINS_STEP1, 6)
    elem = loss(pred, labels, weight, reduction_override="none")
    bce = torch.tensor([[_bce(p, t) for p, t in zip(pr, tr, strict=True)] for pr, tr in zip(PROBS, ONEHOT,
                                                                                           strict=True)])
    torch.testing.assert_close(elem / bce, torch.tensor(w), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss(pred, labels, weight), torch.tensor(mean, dtype=torch.float32), rtol=1e-5,
                               atol=0)
    # avg_factor is ignored (GHM normalises by its own tot); the same targets given one-hot give the same loss
    torch.testing.assert_close(loss(pred, labels, weight, avg_factor=123.0), loss(pred, labels, weight))
    torch.testing.assert_close(loss(pred, torch.tensor(ONEHOT, dtype=torch.float32), weight[:, None].expand(4, 2)),
                               loss(pred, labels, weight))


def test_ghmc_weights_with_momentum_over_two_steps() -> None:
    m = 0.75
    loss = GHMC(bins=4, momentum=m, loss_weight=2.0)
    # step 1: acc = 0.25 * counts = (0.75, 0.5, 0.25, 0); w = 6 / (acc * 3)
    pred, labels, weight = _ghmc_inputs([1, 1, 0, 1])
    _, mean1 = _expected({0: 6 / (0.75 * 3), 1: 6 / (0.5 * 3), 2: 6 / (0.25 * 3)}, BINS_STEP1, 6)
    torch.testing.assert_close(loss(pred, labels, weight), torch.tensor(2 * mean1), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.acc_sum, torch.tensor([0.75, 0.5, 0.25, 0.0]))
    # step 2, rows 2 and 3 ignored: counts (3, 0, 1, 0), tot 4, n 2. Only the non-empty bins move:
    # acc0 = .75 * .75 + .25 * 3 = 1.3125, acc2 = .75 * .25 + .25 * 1 = .4375; acc1 keeps .5, acc3 keeps 0.
    pred, labels, weight = _ghmc_inputs([1, 1, 0, 0])
    _, mean2 = _expected({0: 4 / (1.3125 * 2), 2: 4 / (0.4375 * 2)}, BINS_STEP2, 4)
    torch.testing.assert_close(loss(pred, labels, weight), torch.tensor(2 * mean2), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.acc_sum, torch.tensor([1.3125, 0.5, 0.4375, 0.0]))


def test_ghmc_all_ignored_gives_zero_with_graph() -> None:
    loss = GHMC(bins=30, momentum=0.75)
    pred = torch.randn(5, 3, requires_grad=True)
    out = loss(pred, torch.tensor([0, 1, 2, 3, 3]), torch.zeros(5))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.count_nonzero(pred.grad) == 0
    assert torch.count_nonzero(loss.acc_sum) == 0


def _loop_reference(g, valid, edges, acc, mmt, tot):
    """The paper's per-bin definition, one bin at a time (the references' loop)."""
    weights = torch.zeros_like(g)
    n = 0
    for i in range(len(edges) - 1):
        inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
        num = int(inds.sum())
        if num > 0:
            if mmt > 0:
                acc[i] = mmt * acc[i] + (1 - mmt) * num
                weights[inds] = tot / acc[i]
            else:
                weights[inds] = tot / num
            n += 1
    return weights / max(n, 1)


@pytest.mark.parametrize("momentum", [0.0, 0.75])
def test_ghmc_matches_per_bin_loop_over_steps(momentum: float) -> None:
    gen = torch.Generator().manual_seed(0)
    loss = GHMC(bins=30, momentum=momentum)
    edges = [i / 30 for i in range(31)]
    edges[-1] += 1e-6
    acc = [0.0] * 30
    for _ in range(3):
        pred = torch.randn(200, 4, generator=gen) * 3
        labels = torch.randint(0, 5, (200,), generator=gen)
        lw = (torch.rand(200, generator=gen) > 0.2).float()
        target = torch.nn.functional.one_hot(labels, 5)[:, :4].float()
        g = (pred.sigmoid() - target).abs()
        valid = lw[:, None].expand(200, 4) > 0
        tot = max(float(valid.sum()), 1.0)
        w = _loop_reference(g, valid, edges, acc, momentum, tot)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")
        torch.testing.assert_close(loss(pred, labels, lw), (w * bce).sum() / tot, rtol=1e-5, atol=1e-7)
    if momentum:
        torch.testing.assert_close(loss.acc_sum, torch.tensor(acc, dtype=torch.float32))


def test_ghmr_hand_example() -> None:
    mu = 0.02
    d = [[0.0, 0.02, -0.02, 1.0], [0.5, 0.0, 0.003, -0.5]]
    # g = |d| / sqrt(d^2 + mu^2): 0 -> bin 0; +-0.02 -> 1/sqrt(2) = .707 -> bin 7; 1.0 -> .9998, +-0.5 -> .9992
    # -> bin 9; 0.003 -> .148 -> bin 1. Counts (bin0 2, bin1 1, bin7 2, bin9 3), n = 4, tot = 8 elements.
    bin_w = {0: 8 / (2 * 4), 1: 8 / (1 * 4), 7: 8 / (2 * 4), 9: 8 / (3 * 4)}
    bins_of = [[0, 7, 7, 9], [9, 0, 1, 9]]
    expected = sum(bin_w[bins_of[i][j]] * (math.sqrt(d[i][j] ** 2 + mu * mu) - mu)
                   for i in range(2) for j in range(4)) / 8
    loss = GHMR(mu=mu, bins=10, momentum=0, loss_weight=10.0)
    target = torch.tensor([[0.3, -0.2, 0.1, 0.0], [1.0, 2.0, -1.0, 0.5]])
    pred = target + torch.tensor(d, dtype=torch.float64).float()
    out = loss(pred, target, avg_factor=99.0)  # the RetinaHead's call: positives only, avg_factor ignored
    assert out.item() == pytest.approx(10 * expected, rel=1e-4)

    # per-box weights: box 1 weighs 0 -> only box 0's 4 elements count, tot = 4; bins 0, 7, 7, 9 -> n = 3
    w0 = {0: 4 / (1 * 3), 7: 4 / (2 * 3), 9: 4 / (1 * 3)}
    exp0 = sum(w0[b] * (math.sqrt(x * x + mu * mu) - mu) for b, x in zip(bins_of[0], d[0], strict=True)) / 4
    out0 = loss(pred, target, torch.tensor([1.0, 0.0]))
    assert out0.item() == pytest.approx(10 * exp0, rel=1e-4)


def test_ghmr_momentum_buffer_counts_positive_elements() -> None:
    loss = GHMR(mu=0.02, bins=10, momentum=0.7)
    pred = torch.randn(6, 4)
    loss(pred, torch.zeros(6, 4), torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0]))
    # first step: acc = 0.3 * counts, and the counts add up to the 16 valid elements
    assert loss.acc_sum.sum().item() == pytest.approx(0.3 * 16)


def test_asl1_gradient_is_closed_form() -> None:
    mu = 0.02
    d = torch.tensor([-2.0, -0.05, -0.02, -1e-3, 0.0, 1e-3, 0.02, 0.3, 5.0], dtype=torch.float64, requires_grad=True)
    loss = asl1_loss(d, torch.zeros_like(d), mu)
    torch.testing.assert_close(loss, torch.sqrt(d.detach() ** 2 + mu * mu) - mu)
    (grad,) = torch.autograd.grad(loss.sum(), d)
    torch.testing.assert_close(grad, d.detach() / torch.sqrt(d.detach() ** 2 + mu * mu))
    # and through the module: the harmonizing weights are constants of the backward pass
    m = GHMR(mu=mu, bins=10)
    pred = torch.tensor([[0.5, -0.01, 0.002, 3.0]], requires_grad=True)
    target = torch.zeros(1, 4)
    per_elem = m(pred, target, reduction_override="none")
    (g2,) = torch.autograd.grad(per_elem.sum(), pred)
    weights = (per_elem / asl1_loss(pred, target, mu)).detach()
    torch.testing.assert_close(g2, weights * pred.detach() / torch.sqrt(pred.detach() ** 2 + mu * mu))


def test_buffers_in_state_dict_and_round_trip() -> None:
    a = GHMC(bins=30, momentum=0.75)
    assert set(a.state_dict()) == {"edges", "acc_sum"}
    assert a.edges[-1].item() == pytest.approx(1 + 1e-6) and a.edges[15].item() == pytest.approx(0.5)
    assert GHMR(momentum=0.7).edges[-1].item() == 1e3
    assert set(GHMC(momentum=0).state_dict()) == {"edges"}  # MMDetection 2.x layout
    gen = torch.Generator().manual_seed(1)
    x, labels = torch.randn(50, 3, generator=gen), torch.randint(0, 4, (50,), generator=gen)
    a(x, labels)
    b = GHMC(bins=30, momentum=0.75)
    b.load_state_dict(a.state_dict(), strict=True)
    torch.testing.assert_close(b.acc_sum, a.acc_sum)
    x2 = torch.randn(50, 3, generator=gen)
    torch.testing.assert_close(b(x2, labels), a(x2, labels))  # the resumed average continues identically
    # An MMDetection 1.x checkpoint (plain-attribute state) has no entries: strict loading keeps edges, zero acc
    c = GHMC(bins=30, momentum=0.75)
    c.load_state_dict({}, strict=True)
    assert torch.count_nonzero(c.acc_sum) == 0 and c.edges[-1].item() == pytest.approx(1 + 1e-6)
    with pytest.raises(RuntimeError, match="size mismatch"):
        GHMC(bins=10, momentum=0.75).load_state_dict(a.state_dict(), strict=True)


def test_bad_arguments_fail_loudly() -> None:
    with pytest.raises(ValueError, match="use_sigmoid"):
        GHMC(use_sigmoid=False)
    with pytest.raises(ValueError, match="momentum"):
        GHMR(momentum=1.0)
    with pytest.raises(ValueError, match="bins"):
        GHMC(bins=0)
    with pytest.raises(ValueError, match="does not match"):
        GHMR()(torch.zeros(3, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="fits neither"):
        GHMC()(torch.zeros(3, 4), torch.zeros(3, 2))
    assert isinstance(build_loss({"type": "GHMR", "mu": 0.02, "bins": 10, "momentum": 0.7}), GHMR)


# ------------------------------------------------------------------------------------------------ configs / models
TINY = {"backbone__depth": 18, "backbone__base_channels": 8, "neck__in_channels": [8, 16, 32, 64],
        "neck__out_channels": 16, "bbox_head__in_channels": 16, "bbox_head__feat_channels": 16,
        "bbox_head__stacked_convs": 1, "num_classes": 3}


def test_ghm_configs_follow_the_references() -> None:
    head = load_config("retinanet_ghm_r50_fpn_1x_coco").model["bbox_head"]
    assert head["loss_cls"] == {"type": "GHMC", "bins": 30, "momentum": 0.75, "use_sigmoid": True,
                                "loss_weight": 1.0}
    assert head["loss_bbox"] == {"type": "GHMR", "mu": 0.02, "bins": 10, "momentum": 0.7, "loss_weight": 10.0}
    assert head["bbox_coder"]["target_stds"] == [1.0, 1.0, 1.0, 1.0]
    only_c = load_config("retinanet_ghm-c-only_r50_fpn_1x_coco")
    assert only_c.model["bbox_head"]["loss_cls"]["type"] == "GHMC"
    assert only_c.model["bbox_head"]["loss_bbox"] == {"type": "SmoothL1Loss", "beta": 0.11, "loss_weight": 1.0}
    origin = load_config("retinanet_origin_r50_fpn_1x_coco")
    assert origin.model["bbox_head"]["loss_cls"]["type"] == "FocalLoss"
    for cfg in (only_c, origin):
        assert cfg.optimizer.grad_clip == {"max_norm": 35, "norm_type": 2}
    for name, depth in (("retinanet_ghm_r101_fpn_1x_coco", 101), ("retinanet_ghm_x101_32x4d_fpn_1x_coco", 101),
                        ("retinanet_ghm_x101_64x4d_fpn_1x_coco", 101)):
        cfg = load_config(name)
        assert cfg.model["backbone"]["depth"] == depth
        assert cfg.model["bbox_head"]["loss_bbox"]["type"] == "GHMR"
        assert cfg.optimizer.grad_clip == {"max_norm": 35, "norm_type": 2}


@pytest.mark.parametrize("name", ["retinanet_ghm_r50_fpn_1x_coco", "retinanet_ghm-c-only_r50_fpn_1x_coco",
                                  "retinanet_origin_r50_fpn_1x_coco"])
def test_tiny_ghm_retinanet_loss_step(name: str) -> None:
    torch.manual_seed(0)
    model = densedet.build_model(name, **TINY)
    images = torch.randn(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 50.0], [30.0, 2.0, 62.0, 30.0]]),
                "labels": torch.tensor([0, 2])}]
    losses = model(images, targets, mode="loss")
    total = losses["loss_cls"] + losses["loss_bbox"]
    assert torch.isfinite(total)
    total.backward()
    assert model.bbox_head.retina_cls.weight.grad.abs().sum() > 0
    assert model.bbox_head.retina_reg.weight.grad.abs().sum() > 0
    head = model.bbox_head
    num_pos = losses["num_pos"].item()
    assert num_pos > 0
    # the running densities moved (their per-level values are checked in
    # test_ghm_head_loss_is_one_reference_call_per_level_with_sequential_momentum)
    for loss in (head.loss_cls, head.loss_bbox):
        if isinstance(loss, (GHMC, GHMR)):
            assert loss.acc_sum.sum() > 0


def test_ghm_r50_checkpoint_layout_and_released_checkpoint() -> None:
    ghm = densedet.build_model("retinanet_ghm_r50_fpn_1x_coco")
    base = densedet.build_model("retinanet_r50_fpn_1x_coco")
    ours = {k: tuple(v.shape) for k, v in ghm.state_dict().items()}
    loss_keys = {"bbox_head.loss_cls.edges": (31,), "bbox_head.loss_cls.acc_sum": (30,),
                 "bbox_head.loss_bbox.edges": (11,), "bbox_head.loss_bbox.acc_sum": (10,)}
    assert ours == {**{k: tuple(v.shape) for k, v in base.state_dict().items()}, **loss_keys}
    # MMDetection's released GHM checkpoint (trained with 1.x, loss state as plain attributes): no loss entries
    release = {k: v.clone() for k, v in base.state_dict().items()}
    release["bbox_head.retina_cls.weight"].normal_()
    ghm.load_state_dict(release, strict=True)
    assert torch.equal(ghm.bbox_head.retina_cls.weight, release["bbox_head.retina_cls.weight"])
    assert torch.count_nonzero(ghm.bbox_head.loss_cls.acc_sum) == 0
    # a DenseDet / MMDetection 2.x checkpoint carries the running densities and restores them
    state = ghm.state_dict()
    state["bbox_head.loss_bbox.acc_sum"] = torch.arange(10.0)
    ghm.load_state_dict(state, strict=True)
    torch.testing.assert_close(ghm.bbox_head.loss_bbox.acc_sum, torch.arange(10.0))


def test_released_ghm_checkpoint_loads_through_densedet_loader() -> None:
    model = densedet.build_model("retinanet_ghm_r50_fpn_1x_coco", **TINY)
    release = {k: v for k, v in model.state_dict().items() if ".loss_" not in k}
    load_model_weights(model, release, strict=True)


def test_authors_release_layout_converts_with_a_key_map(tmp_path) -> None:
    """libuyu/GHM_Detection's own RetinaHead (mmdetection/mmdet/models/single_stage_heads/retina_head.py) builds
    its towers from plain ``nn.Conv2d`` (``bbox_head.cls_convs.0.weight``, no ``.conv``) and has ``9 * 80``
    class channels (81 classes with background, sigmoid over the 80), ordered anchor-major like ours: only the
    tower keys need renaming, through the converter's prefix key map."""
    from densedet.engine.checkpoint import load_checkpoint
    from densedet.weights.mmdet import convert_mmdet_checkpoint

    model = densedet.build_model("retinanet_ghm_r50_fpn_1x_coco", **TINY)
    ours = {k: v for k, v in model.state_dict().items() if ".loss_" not in k}
    old = {(k.replace(".conv.", ".") if "_convs." in k and k.startswith("bbox_head.") else k):
           (torch.randn_like(v) if k.startswith("bbox_head.") else v) for k, v in ours.items()}
    assert "bbox_head.cls_convs.0.weight" in old and "bbox_head.retina_cls.weight" in old
    torch.save({"state_dict": old}, tmp_path / "ghm_authors.pth")
    key_map = {f"bbox_head.{b}_convs.{i}.": f"bbox_head.{b}_convs.{i}.conv." for b in ("cls", "reg") for i in range(4)}
    convert_mmdet_checkpoint(tmp_path / "ghm_authors.pth", tmp_path / "ghm.pth", key_map=key_map)
    model.load_state_dict(load_checkpoint(tmp_path / "ghm.pth")["state_dict"], strict=True)
    assert torch.equal(model.bbox_head.cls_convs[0].conv.weight, old["bbox_head.cls_convs.0.weight"])


# --------------------------------------------------------------------------------- per pyramid level, as the heads
def _reference_ghm_call(g, valid, tot, edges, acc, mmt, loss):
    """One reference call (mmdet 2.x ``GHMC``/``GHMR.forward``): the per-bin loop, ``sum(w * loss) / tot``."""
    return (_loop_reference(g, valid, edges, acc, mmt, tot) * loss).sum() / tot


def _ghm_retina_head():
    from densedet.models.heads import RetinaHead

    return RetinaHead(3, in_channels=8, feat_channels=8, stacked_convs=1,
                      anchor_generator={"octave_base_scale": 4, "scales_per_octave": 1, "ratios": [0.5, 1.0, 2.0],
                                        "strides": [8, 16]},
                      bbox_coder={"target_means": [0.0] * 4, "target_stds": [1.0] * 4},
                      loss_cls={"type": "GHMC", "bins": 30, "momentum": 0.75, "use_sigmoid": True, "loss_weight": 1.0},
                      loss_bbox={"type": "GHMR", "mu": 0.02, "bins": 10, "momentum": 0.7, "loss_weight": 10.0})


def test_ghm_head_loss_is_one_reference_call_per_level_with_sequential_momentum() -> None:
    """A 2-level, 2-image batch: the head's GHM-C / GHM-R losses equal the reference's ``loss_single`` per level
    (each level: its images' rows together, own histogram and ``tot``) summed over levels, and the running densities
    are updated level 0 then level 1, in each of two steps."""
    head = _ghm_retina_head()
    gen = torch.Generator().manual_seed(3)
    sizes = [(8, 8), (4, 4)]  # 64x64 images, strides 8 and 16
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 30.0, 62.0, 50.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[10.0, 10.0, 26.0, 50.0], [2.0, 2.0, 60.0, 60.0]]),
                "labels": torch.tensor([0, 1])}]
    metas = [{"img_shape": (64, 64), "pad_shape": (64, 64)}] * 2
    edges_c = [i / 30 for i in range(31)]
    edges_c[-1] += 1e-6
    edges_r = [i / 10 for i in range(10)] + [1e3]
    acc_c, acc_r = [0.0] * 30, [0.0] * 10
    for _ in range(2):
        cls = [torch.randn(2, 3 * 3, h, w, generator=gen) * 2 for h, w in sizes]
        reg = [torch.randn(2, 3 * 4, h, w, generator=gen) * 0.3 for h, w in sizes]
        losses = head.loss((cls, reg), targets, metas)
        t = head.assign_anchors(cls, targets, metas)  # the assignment itself is tested in test_assigners.py
        start, exp_cls, exp_box, per_level_pos = 0, 0.0, 0.0, []
        for lvl, n in enumerate(t.num_per_level):
            sl = slice(start, start + n)
            start += n
            # reference loss_single: (B * n_l, C) rows of this level, image-major
            pred = cls[lvl].permute(0, 2, 3, 1).reshape(-1, 3)
            labels, lw = t.labels[:, sl].reshape(-1), t.label_weights[:, sl].reshape(-1)
            target = torch.nn.functional.one_hot(labels, 4)[:, :3].float()
            valid = lw[:, None].expand(-1, 3) > 0
            g = (pred.sigmoid() - target).abs()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(pred, target, reduction="none")
            exp_cls += _reference_ghm_call(g, valid, max(float(valid.sum()), 1.0), edges_c, acc_c, 0.75, bce)
            # GHM-R over all anchors of the level with 0/1 bbox_weights (4 per positive)
            pos = t.pos[:, sl].reshape(-1)
            per_level_pos.append(int(pos.sum()))
            deltas = reg[lvl].permute(0, 2, 3, 1).reshape(-1, 4)
            anchors = t.priors[sl].repeat(2, 1)
            tgt = torch.zeros_like(deltas)
            tgt[pos] = head.bbox_coder.encode(anchors[pos], t.gt_boxes[:, sl].reshape(-1, 4)[pos])
            bw = pos[:, None].expand(-1, 4).float()
            d = deltas - tgt
            g = d.abs() / torch.sqrt(d * d + 0.02 ** 2)
            exp_box += 10.0 * _reference_ghm_call(g, bw > 0, max(float(bw.sum()), 1.0), edges_r, acc_r, 0.7,
                                                  asl1_loss(deltas, tgt, 0.02))
        assert all(p > 0 for p in per_level_pos)  # both levels hold positives: the grouping matters
        torch.testing.assert_close(losses["loss_cls"], exp_cls, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(losses["loss_bbox"], exp_box, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.loss_cls.acc_sum, torch.tensor(acc_c), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(head.loss_bbox.acc_sum, torch.tensor(acc_r), rtol=1e-6, atol=1e-6)

    # one call over all levels (the former computation) gives another value: the test tells them apart
    fresh = GHMC(bins=30, momentum=0.75)
    t = head.assign_anchors(cls, targets, metas)
    pooled = fresh(torch.cat([c.permute(0, 2, 3, 1).reshape(2, -1, 3) for c in cls], 1).reshape(-1, 3),
                   t.labels.reshape(-1), t.label_weights.reshape(-1))
    assert not torch.allclose(pooled, losses["loss_cls"], rtol=1e-2)


def test_ghm_level_ids_equal_separate_calls_and_empty_levels_do_not_move_the_state() -> None:
    gen = torch.Generator().manual_seed(4)
    pred, labels = torch.randn(30, 4, generator=gen) * 2, torch.randint(0, 5, (30,), generator=gen)
    lw = (torch.rand(30, generator=gen) > 0.2).float()
    level_ids = torch.tensor([0] * 12 + [2] * 18)  # level 1 has no rows
    grouped, separate = GHMC(bins=10, momentum=0.75), GHMC(bins=10, momentum=0.75)
    out = grouped(pred, labels, lw, level_ids=level_ids, num_levels=3)
    exp = separate(pred[:12], labels[:12], lw[:12]) + separate(pred[12:], labels[12:], lw[12:])
    torch.testing.assert_close(out, exp)
    torch.testing.assert_close(grouped.acc_sum, separate.acc_sum)
    # level ids inferred from the tensor give the same; GHM-R likewise
    torch.testing.assert_close(GHMC(bins=10)(pred, labels, lw, level_ids=level_ids),
                               GHMC(bins=10)(pred[:12], labels[:12], lw[:12]) + GHMC(bins=10)(pred[12:], labels[12:],
                                                                                            lw[12:]))
    r1, r2 = GHMR(momentum=0.7), GHMR(momentum=0.7)
    box_pred, box_t = torch.randn(7, 4, generator=gen), torch.randn(7, 4, generator=gen)
    ids = torch.tensor([1, 1, 0, 1, 0, 0, 1])
    out = r1(box_pred, box_t, level_ids=ids, num_levels=2)
    order = [ids == 0, ids == 1]
    torch.testing.assert_close(out, sum(r2(box_pred[m], box_t[m]) for m in order))
    torch.testing.assert_close(r1.acc_sum, r2.acc_sum)
    with pytest.raises(ValueError, match="level_ids"):
        r1(box_pred, box_t, level_ids=ids[:3])


def test_ghm_level_statistics_replay_the_training_weights() -> None:
    """The per-prior statistics call sees the weights of this step's training call and leaves the state as it was."""
    head = _ghm_retina_head()
    head.collect_level_stats = True
    gen = torch.Generator().manual_seed(5)
    sizes = [(8, 8), (4, 4)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([1])}] * 2
    metas = [{"img_shape": (64, 64), "pad_shape": (64, 64)}] * 2
    for _ in range(2):
        cls = [torch.randn(2, 9, h, w, generator=gen) for h, w in sizes]
        reg = [torch.randn(2, 12, h, w, generator=gen) for h, w in sizes]
        losses = head.loss((cls, reg), targets, metas)
        after = head.loss_cls.acc_sum.clone()
        # per level, the statistics' per-prior losses divided by the level's tot add up to the loss
        t = head.assign_anchors(cls, targets, metas)
        start, total = 0, 0.0
        for lvl, n in enumerate(t.num_per_level):
            tot = max(float(t.label_weights[:, start:start + n].sum()) * 3, 1.0)
            total += (losses[f"lvl{lvl}_pos_cls_loss"] * losses[f"lvl{lvl}_pos"]
                      + losses[f"lvl{lvl}_neg_cls_loss"] * losses[f"lvl{lvl}_neg"]) / tot
            start += n
        torch.testing.assert_close(total, losses["loss_cls"].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(head.loss_cls.acc_sum, after)


def test_ghmc_value_of_a_large_level_equals_the_reference_sum() -> None:
    """Issue 18: the loss value of a large level equals the reference's ``sum(w * BCE) / tot`` (mmdet 2.x
    ``GHMC.forward`` per level) to float32 rounding. The reference's weights come from the per-bin loop; its sums
    are taken here in float64 (exact to ~1e-12), so any accumulation error of DenseDet's float32 sums shows. A
    sequential float32 accumulation (a scatter-add over ~600k positive terms) was off by ~1e-3 relative."""
    gen = torch.Generator().manual_seed(5)
    c, rows = 80, [7200, 450]  # 2 images x 20x20 locations x 9 anchors, and a small level
    preds = [torch.randn(n, c, generator=gen) * 2 - 4 for n in rows]
    labels = [torch.where(torch.rand(n, generator=gen) < 0.02, torch.randint(0, c, (n,), generator=gen), c)
              for n in rows]
    loss = GHMC(bins=30, momentum=0.75)
    got = loss(torch.cat(preds), torch.cat(labels), torch.ones(sum(rows)),
               level_ids=torch.cat([torch.full((n,), k) for k, n in enumerate(rows)]), num_levels=2)
    edges = [i / 30 for i in range(31)]
    edges[-1] += 1e-6
    acc, want = [0.0] * 30, 0.0
    for pred, lab in zip(preds, labels):
        target = torch.nn.functional.one_hot(lab, c + 1)[:, :c].float()
        g = (pred.sigmoid() - target).abs()
        valid = torch.ones_like(g, dtype=torch.bool)
        tot = float(valid.sum())
        w = _loop_reference(g, valid, edges, acc, 0.75, tot).double()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(pred.double(), target.double(), reduction="none")
        want += float((w * bce).sum()) / tot
    assert abs(float(got) - want) <= 2e-6 * want, (float(got), want)
