"""UMOP: the progressive focal loss's per-level gamma / alpha, the LRPHead's per-level loss and normalisation, the
configs, the checkpoint layout (= ATSS's), cross-process averaging and a tiny training run."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss as tv_focal

import densedet
from densedet.assigners import atss_assign
from densedet.config import ConfigError, list_configs, load_config
from densedet.losses import ProgressiveFocalLoss, build_loss, positive_ce_condition
from densedet.models.heads import ATSSHead, LRPHead
from densedet.models.heads.dense_head import flatten_levels
from densedet.structures import pad_targets


def _ce(x: float) -> float:
    """-log(sigmoid(x)) written out."""
    return math.log(1.0 + math.exp(-x))


def _level(gt_logits: list[float], c: int = 3, num_neg: int = 4, seed: int = 0):
    """One level's (P, C) logits / labels: positives with the given logit at their gt class, random elsewhere,
    then ``num_neg`` background priors with large random logits (they must not matter)."""
    g = torch.Generator().manual_seed(seed)
    p = len(gt_logits)
    pred = torch.randn(p + num_neg, c, generator=g) * 5
    labels = torch.full((p + num_neg,), c, dtype=torch.long)
    for i, x in enumerate(gt_logits):
        labels[i] = i % c
        pred[i, i % c] = x
    return pred, labels


@pytest.mark.parametrize("gt_logits, gamma", [
    ([-2.0, -1.5], (_ce(-2.0) + _ce(-1.5)) / 2),  # inside the range: gamma_l is the mean cross-entropy itself
    ([-5.0, -4.0], 2.5),  # hard level: clamped to gamma + delta
    ([3.0, 4.0], 1.5),  # easy level: clamped to gamma - delta
])
def test_gamma_alpha_of_a_level(gt_logits, gamma) -> None:
    pred, labels = _level(gt_logits)
    cond = positive_ce_condition(pred, labels, torch.ones(len(labels)))
    assert cond.item() == pytest.approx(sum(_ce(x) for x in gt_logits) / len(gt_logits), rel=1e-5)
    g, a = ProgressiveFocalLoss(gamma=2.0, delta=0.5, w=0.5).gamma_alpha(cond)
    assert g.item() == pytest.approx(gamma, rel=1e-5)
    assert a.item() == pytest.approx(0.5 / gamma, rel=1e-5)


def test_condition_selection_and_no_positive_fallback() -> None:
    # an ignored positive (label weight 0) and a saturated one (float32 sigmoid == 1, the reference drops it from
    # the mean rather than counting a 0) are left out
    pred, labels = _level([-2.0, 0.5, 20.0])
    weights = torch.tensor([1.0, 0.0, 1.0] + [1.0] * 4)
    assert positive_ce_condition(pred, labels, weights).item() == pytest.approx(_ce(-2.0), rel=1e-5)
    # leading batch dims work the same
    assert positive_ce_condition(pred[None], labels[None], weights[None]).item() == pytest.approx(_ce(-2.0), rel=1e-5)
    # no positive: the reference's constant 2, which the defaults turn into focal loss's own gamma 2 / alpha 0.25
    neg_pred, neg_labels = _level([])
    cond = positive_ce_condition(neg_pred, neg_labels, torch.ones(len(neg_labels)))
    assert cond.item() == 2.0
    g, a = ProgressiveFocalLoss().gamma_alpha(cond)
    assert (g.item(), a.item()) == (2.0, 0.25)
    # the constant is 2 whatever gamma is (then clamped): gamma 3 +- 0.5 gives 2.5
    assert ProgressiveFocalLoss(gamma=3.0).gamma_alpha(cond)[0].item() == 2.5
    # only ignored positives count as none
    assert positive_ce_condition(pred[1:2], labels[1:2], torch.zeros(1)).item() == 2.0


def test_loss_module_is_focal_loss_with_the_level_parameters() -> None:
    pred, labels = _level([-1.0, 0.3, 1.0], num_neg=6, seed=1)
    pred.requires_grad_(True)
    weights = torch.ones(len(labels))
    weights[-1] = 0
    loss_fn = build_loss({"type": "ProgressiveFocalLoss", "delta": 0.5, "w": 0.5, "loss_weight": 2.0})
    cond = 1.8
    out = loss_fn(pred, labels, weights, avg_factor=3.0, lvl_gamma=torch.tensor(cond))
    onehot = torch.nn.functional.one_hot(labels, 4)[:, :3].float()
    exp = 2.0 * (tv_focal(pred, onehot, alpha=0.5 / cond, gamma=cond, reduction="none") * weights[:, None]).sum() / 3
    assert out.item() == pytest.approx(exp.item(), rel=1e-5)
    (g1,) = torch.autograd.grad(out, pred)
    (g2,) = torch.autograd.grad(exp, pred)
    assert torch.allclose(g1, g2, atol=1e-6)
    with pytest.raises(ValueError, match="lvl_gamma"):
        loss_fn(pred, labels)
    with pytest.raises(ConfigError, match="delta"):
        ProgressiveFocalLoss(gamma=1.0, delta=1.0)


# ---------------------------------------------------------------------------------------------------- the head
KW = {"num_classes": 3, "in_channels": 8, "feat_channels": 8, "stacked_convs": 1,
      "norm_cfg": {"type": "GN", "num_groups": 4},
      "anchor_generator": {"octave_base_scale": 8, "scales_per_octave": 1, "ratios": [1.0], "strides": [8, 16]}}
METAS = [{"img_shape": (128, 128), "pad_shape": (128, 128)}] * 2
SMALL = [13.0, 17.0, 61.0, 55.0]  # positives on level 0 (64-px anchors) only
LARGE = [4.0, 6.0, 124.0, 122.0]  # positives on level 1 (128-px anchors) only


def _t(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long), "ignore_boxes": torch.zeros(0, 4)}


def _outs(head, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 8, 8, 8, generator=g)]
    with torch.no_grad():
        return tuple([m.detach().clone().requires_grad_(True) for m in o] for o in head(feats))


def _head(**extra):
    torch.manual_seed(0)
    head = LRPHead(**KW, **extra)
    head.init_weights()
    return head


def test_head_loss_equals_a_direct_per_level_computation() -> None:
    head = _head()
    outs = _outs(head)
    targets = [_t([SMALL, LARGE], [0, 2]), _t([[70.0, 60.0, 110.0, 104.0]], [1])]
    losses = head.loss(outs, targets, METAS)

    # Direct: the assigner's labels (not under test here), then per level and written out: mean -log sigmoid of the
    # positives' gt logits -> clamp -> focal loss (torchvision's) over all valid priors / all positives.
    cls_scores = outs[0]
    sizes = [tuple(m.shape[-2:]) for m in cls_scores]
    priors, per_level = head.priors(sizes, "cpu", torch.float32)
    gt = pad_targets(targets)
    assign = atss_assign(priors, per_level, gt, topk=9)
    labels, _ = assign.gather(gt.gt_labels, gt.gt_boxes, 3)
    pos = assign.pos_mask
    num_total = max(int(pos.sum()), 1)
    total, start = 0.0, 0
    for lvl, n in enumerate(per_level):
        x = flatten_levels([cls_scores[lvl]], 3).detach()  # (2, n, 3)
        lab = labels[:, start:start + n]
        pos_l = pos[:, start:start + n]
        ces = [_ce(x[b, i, lab[b, i]].item()) for b in range(2) for i in range(n) if pos_l[b, i]]
        cond = sum(ces) / len(ces) if ces else 2.0
        g = min(max(cond, 1.5), 2.5)
        onehot = torch.nn.functional.one_hot(lab, 4)[..., :3].float()
        level_loss = tv_focal(x, onehot, alpha=0.5 / g, gamma=g, reduction="sum").item() / num_total
        assert losses[f"lvl{lvl}_gamma"].item() == pytest.approx(g, rel=1e-5)
        assert losses[f"lvl{lvl}_alpha"].item() == pytest.approx(0.5 / g, rel=1e-5)
        assert losses[f"lvl{lvl}_loss_cls"].item() == pytest.approx(level_loss, rel=1e-4)
        assert ces, "the constructed batch should have positives on every level"
        total += level_loss
        start += n
    assert losses["loss_cls"].item() == pytest.approx(total, rel=1e-4)

    # box and centerness losses are ATSS's, value and gradient
    atss = ATSSHead(**KW)
    atss.load_state_dict(head.state_dict(), strict=True)
    ref = atss.loss(outs, targets, METAS)
    for key in ("loss_bbox", "loss_centerness", "num_pos"):
        assert torch.allclose(losses[key], ref[key]), key
    ga = torch.autograd.grad(losses["loss_bbox"] + losses["loss_centerness"], outs[1] + outs[2])
    gb = torch.autograd.grad(ref["loss_bbox"] + ref["loss_centerness"], outs[1] + outs[2])
    assert all(torch.allclose(a, b) for a, b in zip(ga, gb))


@pytest.mark.parametrize("cls_norm", ["global", "level"])
def test_one_levels_positives_do_not_change_another_levels_loss(cls_norm: str) -> None:
    head = _head(cls_norm=cls_norm)
    head.collect_level_stats = True
    outs = _outs(head, seed=1)
    empty = _t([], [])
    base = head.loss(outs, [_t([SMALL], [0]), empty], METAS)
    more = head.loss(outs, [_t([SMALL, LARGE], [0, 2]), empty], METAS)  # adds positives on level 1 only
    assert base["lvl0_pos"] == more["lvl0_pos"] > 0
    assert base["lvl1_pos"] == 0 < more["lvl1_pos"]
    # level 0's focusing parameters depend on level 0 alone; level 1 leaves the no-positive fallback
    assert base["lvl0_gamma"] == more["lvl0_gamma"] and base["lvl0_alpha"] == more["lvl0_alpha"]
    assert base["lvl1_gamma"] == 2.0 and more["lvl1_gamma"] != 2.0
    assert more["lvl1_loss_cls"] != base["lvl1_loss_cls"]
    if cls_norm == "level":  # each level over its own positives: level 0's loss does not move at all
        assert torch.allclose(base["lvl0_loss_cls"], more["lvl0_loss_cls"])
    else:  # reference: one normaliser (all positives) for every level; level 0's unnormalised sum is unchanged
        # (the image without objects counts as one positive in the normaliser, mmdet get_targets' max(#pos, 1))
        n0, n1 = base["num_pos"] + 1, more["num_pos"] + 1
        assert n1 > n0
        assert torch.allclose(base["lvl0_loss_cls"] * n0, more["lvl0_loss_cls"] * n1)


def test_head_without_positives_and_bad_config() -> None:
    head = _head()
    outs = _outs(head)
    losses = head.loss(outs, [_t([], []), _t([], [])], METAS)
    for lvl in range(2):
        assert losses[f"lvl{lvl}_gamma"] == 2.0 and losses[f"lvl{lvl}_alpha"] == 0.25
    # plain focal loss (gamma 2, alpha 0.25) over all valid priors / 1: the fallback is ATSS's own loss
    atss = ATSSHead(**KW)
    atss.load_state_dict(head.state_dict())
    assert torch.allclose(losses["loss_cls"], atss.loss(outs, [_t([], []), _t([], [])], METAS)["loss_cls"])
    losses["loss_cls"].backward()
    with pytest.raises(ConfigError, match="ProgressiveFocalLoss"):
        LRPHead(**KW, loss_cls={"type": "FocalLoss"})
    with pytest.raises(ConfigError, match="cls_norm"):
        LRPHead(**KW, cls_norm="image")


# ------------------------------------------------------------------------------------------------ configs, layout
UMOP_CONFIGS = ["umop_r50_fpn_1x_coco", "umop_r50_fpn_1.5x_coco", "umop_r101_fpn_1.5x_coco",
                "umop_r101_fpn_mdconv_c3-c5_1.5x_coco", "umop_x101_fpn_1.5x_coco",
                "umop_x101_fpn_mdconv_c3-c5_1.5x_coco", "umop_r2_101_fpn_mdconv_c3-c5_mstrain_2x_coco",
                "umop_swin-S_fpn_2x_coco_mstrain", "umop_swin-B_fpn_2x_coco_mstrain",
                "umop_swin-L_fpn_2x_coco_mstrain", "umop_swin-L_fpn_2x_coco_mstrain_mstest"]


def test_umop_configs() -> None:
    assert set(UMOP_CONFIGS) <= set(list_configs())
    for name in UMOP_CONFIGS:
        cfg = load_config(name)
        head = cfg.model["bbox_head"]
        assert cfg.model["type"] == "UMOP" and head["type"] == "LRPHead", name
        assert head["loss_cls"] == {"type": "ProgressiveFocalLoss", "use_sigmoid": True, "delta": 0.5, "w": 0.5,
                                    "loss_weight": 1.0}, name
        assert head["loss_bbox"] == {"type": "GIoULoss", "loss_weight": 2.0}, name
    r2 = load_config("umop_r2_101_fpn_mdconv_c3-c5_mstrain_2x_coco")
    assert r2.data.train.pipeline[0] == {"type": "Resize", "img_scale": [[1333, 480], [1333, 960]],
                                         "multiscale_mode": "range", "keep_ratio": True}
    assert (r2.schedule.epochs, r2.schedule.steps) == (24, [16, 22])
    assert load_config("umop_r50_fpn_1.5x_coco").schedule.steps == [12, 16]
    swin = load_config("umop_swin-L_fpn_2x_coco_mstrain")
    assert swin.optimizer.type == "AdamW" and swin.optimizer.lr == 1e-4 and swin.runtime.amp
    assert swin.model["neck"]["in_channels"] == [192, 384, 768, 1536]


def test_mstest_config_tests_every_scale_and_flip() -> None:
    """The "MS test" row: UMOP's umop_swin-L_fpn_2x_coco_mstrain_mstest.py tests at 4 scales, each also flipped."""
    from densedet.data.transforms import build_pipeline

    cfg = load_config("umop_swin-L_fpn_2x_coco_mstrain_mstest")
    for split in (cfg.data.val, cfg.data.test):
        aug = build_pipeline(split.pipeline, "data.test.pipeline").transforms[-1]
        assert aug.num_views == 8
        assert sorted({scale for scale, _, _ in aug.views}) == sorted(aug.img_scale) and len(aug.img_scale) == 4
        assert [flip for _, flip, _ in aug.views].count(True) == 4


def test_multiscaleflipaug_must_be_the_last_step() -> None:
    from densedet.data.transforms import build_pipeline

    aug = {"type": "MultiScaleFlipAug", "img_scale": [64, 64], "transforms": [{"type": "Resize", "keep_ratio": True}]}
    with pytest.raises(ConfigError, match=r"pipeline\[0\]: MultiScaleFlipAug must be the last step.*Normalize"):
        build_pipeline([aug, {"type": "Normalize", "mean": [0, 0, 0], "std": [1, 1, 1]}], "data.val.pipeline")


def test_umop_r50_checkpoint_layout_is_atss_r50() -> None:
    umop = densedet.build_model("umop_r50_fpn_1x_coco")
    atss = densedet.build_model("atss_r50_fpn_1x_coco")
    sd = atss.state_dict()
    assert {k: v.shape for k, v in umop.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    umop.load_state_dict(sd, strict=True)


# -------------------------------------------------------------------------------------------------- DDP averaging
def _worker(out: Path) -> None:
    """Rank r of 2 (gloo): the same head, different targets; rank 1 has no positive at all."""
    from densedet.dist import cleanup, get_rank, init_distributed

    init_distributed()
    rank = get_rank()
    head = _head(loss_cls={"type": "ProgressiveFocalLoss", "gamma": 10.0, "delta": 9.9})  # clamp out of the way
    outs = _outs(head)
    targets = [_t([SMALL, LARGE], [0, 2]), _t([], [])] if rank == 0 else [_t([], []), _t([], [])]
    losses = head.loss(outs, targets, METAS)
    (out / f"rank{rank}.json").write_text(json.dumps({k: v.item() for k, v in losses.items()}))
    cleanup()


def test_conditions_are_averaged_over_processes(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, str(tmp_path)], env=env))
    assert all(p.wait(timeout=120) == 0 for p in procs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    # the single-process conditions of rank 0's batch (no clamping at 10 +- 9.9); rank 1 contributes the fallback 2
    head = _head(loss_cls={"type": "ProgressiveFocalLoss", "gamma": 10.0, "delta": 9.9})
    alone = head.loss(_outs(head), [_t([SMALL, LARGE], [0, 2]), _t([], [])], METAS)
    for lvl in range(2):
        expect = (alone[f"lvl{lvl}_gamma"].item() + 2.0) / 2
        assert r0[f"lvl{lvl}_gamma"] == pytest.approx(expect, rel=1e-6)
        assert r1[f"lvl{lvl}_gamma"] == pytest.approx(expect, rel=1e-6)


# ----------------------------------------------------------------------------------------------------- training
def test_tiny_umop_trains(tmp_path: Path) -> None:
    from densedet.data import make_synthetic_coco
    from densedet.engine import train

    root = tmp_path / "synth"
    make_synthetic_coco(root, num_train=8, num_val=4, size=96, seed=3)
    tiny = [
        "model.type=UMOP", "model.bbox_head.type=LRPHead",
        "model.bbox_head.loss_cls={_delete_: true, type: ProgressiveFocalLoss, delta: 0.5, w: 0.5}",
        "model.backbone.base_channels=8", "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
        "model.bbox_head.in_channels=16", "model.bbox_head.feat_channels=16", "model.bbox_head.stacked_convs=1",
        "model.bbox_head.norm_cfg={type: GN, num_groups: 4}",
        "data.samples_per_gpu=4", "data.val_samples_per_gpu=4", "data.workers_per_gpu=0",
        "data.train.pipeline=[{type: Resize, img_scale: [96, 96]}, {type: RandomFlip, flip_ratio: 0.5}]",
        "data.val.pipeline=[{type: Resize, img_scale: [96, 96]}]",
        "optimizer.lr=0.004", "schedule.warmup_iters=4", "runtime.log_interval=1", "runtime.val_interval=0",
        "runtime.device=cpu", "schedule.epochs=15", f"data.root={root}",
    ]
    torch.manual_seed(0)
    work = tmp_path / "work"
    train(load_config("atss_r18_fpn_synth", tiny), work)
    recs = [json.loads(s) for s in (work / "log.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["type"] == "train"]
    assert len(recs) == 30
    losses = [r["loss"] for r in recs]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    for r in recs:
        for lvl in range(5):
            assert 1.5 <= r[f"lvl{lvl}_gamma"] <= 2.5
            assert r[f"lvl{lvl}_alpha"] == pytest.approx(0.5 / r[f"lvl{lvl}_gamma"], rel=1e-5)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
