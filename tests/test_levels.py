"""Per-level imbalance diagnostics: counts equal the assigner's output, mean losses equal a direct computation,
nothing is collected unless asked, the trainer asks on logged iterations, and ``densedet levels`` reads a log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.ops import sigmoid_focal_loss

from densedet.assigners import atss_assign, expand_regress_ranges, fcos_assign, max_iou_assign
from densedet.cli import main
from densedet.engine.logging import TrainProgress
from densedet.models.heads import ATSSHead, FCOSHead, RetinaHead
from densedet.structures import pad_targets

GN4 = {"type": "GN", "num_groups": 4}
SIZE = 64
# image 1 is padded alone to 32 x 64 inside the 64 x 64 batch: the lower half of its priors is batch padding
METAS = [{"img_shape": (64, 64), "pad_shape": (64, 64)}, {"img_shape": (30, 60), "pad_shape": (32, 64)}]


def _targets(boxes, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long), "ignore_boxes": torch.zeros(0, 4)}


TARGETS = [_targets([[3.0, 4.0, 50.0, 41.0], [30.0, 2.0, 62.0, 20.0], [10.0, 40.0, 26.0, 60.0]], [0, 1, 1]),
           _targets([[4.0, 2.0, 28.0, 26.0], [36.0, 6.0, 52.0, 28.0]], [1, 0])]


def _head(kind: str, **kw):
    if kind == "retina":
        return RetinaHead(2, 8, 8, 1, anchor_generator={"octave_base_scale": 4, "scales_per_octave": 3,
                                                        "ratios": [0.5, 1.0, 2.0], "strides": [8, 16]}, **kw)
    if kind == "atss":
        return ATSSHead(2, 8, 8, 1, norm_cfg=GN4, anchor_generator={
            "ratios": [1.0], "octave_base_scale": 2, "scales_per_octave": 1, "strides": [8, 16]}, **kw)
    return FCOSHead(2, 8, 8, 1, strides=[8, 16], regress_ranges=[(-1, 24), (24, 1e8)], norm_cfg=GN4, **kw)


def _outs(head, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 8, SIZE // s, SIZE // s, generator=g) for s in head.strides]
    with torch.no_grad():
        return head(feats)


def _flat(maps: list[torch.Tensor], c: int) -> torch.Tensor:
    """(B, A*c, H, W) per level -> (B, sum H*W*A, c), written out here rather than taken from the head."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, c) for m in maps], 1)


def _per_level(mask: torch.Tensor, per_level: list[int]) -> list[int]:
    out, start = [], 0
    for n in per_level:
        out.append(int(mask[:, start:start + n].sum()))
        start += n
    return out


def _level_means(values: torch.Tensor, mask: torch.Tensor, per_level: list[int]) -> list[float]:
    out, start = [], 0
    for n in per_level:
        v, m = values[:, start:start + n], mask[:, start:start + n]
        out.append(float(v[m].mean()) if m.any() else 0.0)
        start += n
    return out


# ----------------------------------------------------------------------------------------------- level_stats
def test_level_stats_hand_example() -> None:
    head = _head("atss")  # two levels
    level_ids = torch.tensor([0, 0, 0, 1, 1])
    pos = torch.tensor([[True, False, False, False, False], [False, True, False, False, False]])
    neg = torch.tensor([[False, True, True, True, False], [True, False, False, True, False]])
    loss = torch.tensor([[2.0, 0.5, 1.5, 0.25, float("nan")], [4.0, 1.0, float("inf"), 0.75, 9.0]])
    assert head.level_stats(level_ids, pos, neg, loss) == {}  # off by default
    head.collect_level_stats = True
    s = head.level_stats(level_ids, pos, neg, loss)
    expected = {"lvl0_pos": 2, "lvl0_neg": 3, "lvl0_pos_neg_ratio": 2 / 3,
                "lvl0_pos_cls_loss": (2.0 + 1.0) / 2, "lvl0_neg_cls_loss": (0.5 + 1.5 + 4.0) / 3,
                # level 1 has no positive: ratio 0 and mean loss 0, not nan; the nan / inf priors are unused
                "lvl1_pos": 0, "lvl1_neg": 2, "lvl1_pos_neg_ratio": 0.0,
                "lvl1_pos_cls_loss": 0.0, "lvl1_neg_cls_loss": (0.25 + 0.75) / 2}
    assert set(s) == set(expected)
    for k, v in expected.items():
        assert s[k].dim() == 0 and s[k].dtype == torch.float32 and not s[k].requires_grad, k
        assert s[k].item() == pytest.approx(v), k
    no_loss = head.level_stats(level_ids, pos, torch.zeros_like(neg))
    assert set(no_loss) == {f"lvl{i}_{q}" for i in (0, 1) for q in ("pos", "neg", "pos_neg_ratio")}
    assert no_loss["lvl0_pos_neg_ratio"].item() == 2.0  # pos / max(neg, 1)


# ------------------------------------------------------------------------------------- heads vs the assigner
@pytest.mark.parametrize("kind", ["retina", "atss"])
def test_anchor_head_counts_and_losses_equal_assigner(kind: str) -> None:
    head = _head(kind)
    outs = _outs(head)
    head.collect_level_stats = True
    stats = head.loss(outs, TARGETS, METAS)

    sizes = [tuple(m.shape[-2:]) for m in outs[0]]
    priors, per_level = head.priors(sizes, torch.device("cpu"), torch.float32)
    # anchors are centred on their location's top-left corner (rounded: the anchor corners carry float error)
    centres = ((priors[:, :2] + priors[:, 2:]) / 2).round()
    valid = torch.stack([(centres[:, 1] < m["pad_shape"][0]) & (centres[:, 0] < m["pad_shape"][1]) for m in METAS])
    gt = pad_targets(TARGETS)
    if kind == "retina":
        assign = max_iou_assign(priors, gt, prior_valid=valid, **head.assigner_kwargs)
    else:
        assign = atss_assign(priors, per_level, gt, prior_valid=valid, **head.assigner_kwargs)
    pos = (assign.gt_inds >= 0) & valid
    neg = (assign.gt_inds == -1) & valid
    ignored = (assign.gt_inds == -2) & valid
    assert (~valid).any() and pos.any()
    if kind == "retina":
        assert ignored.any()  # IoUs in [0.4, 0.5): neither positive nor negative

    exp_pos, exp_neg = _per_level(pos, per_level), _per_level(neg, per_level)
    assert [stats[f"lvl{i}_pos"].item() for i in range(2)] == exp_pos
    assert [stats[f"lvl{i}_neg"].item() for i in range(2)] == exp_neg
    assert sum(exp_pos) == stats["num_pos"].item()
    for i in range(2):
        assert stats[f"lvl{i}_pos_neg_ratio"].item() == pytest.approx(exp_pos[i] / max(exp_neg[i], 1))

    # focal loss per prior from torchvision's definition on one-hot targets, label weight 0 on ignored priors
    cls = _flat(outs[0], 2)
    onehot = torch.zeros_like(cls)
    b, p = pos.nonzero(as_tuple=True)
    onehot[b, p, gt.gt_labels[b, assign.gt_inds[b, p]]] = 1.0
    per_prior = sigmoid_focal_loss(cls, onehot, alpha=0.25, gamma=2.0, reduction="none").sum(-1)
    per_prior = per_prior * (valid & ~ignored).float()
    for name, mask in (("pos", pos), ("neg", neg)):
        exp = _level_means(per_prior, mask, per_level)
        got = [stats[f"lvl{i}_{name}_cls_loss"].item() for i in range(2)]
        assert got == pytest.approx(exp, rel=1e-5), name


def test_fcos_counts_equal_assigner() -> None:
    head = _head("fcos")
    outs = _outs(head)
    head.collect_level_stats = True
    stats = head.loss(outs, TARGETS, METAS)
    sizes = [tuple(m.shape[-2:]) for m in outs[0]]
    points, per_level = head.points(sizes, torch.device("cpu"), torch.float32)
    strides = torch.tensor([8.0] * per_level[0] + [16.0] * per_level[1])
    ranges = expand_regress_ranges(head.regress_ranges, per_level)
    assign, _ = fcos_assign(points, strides, ranges, pad_targets(TARGETS))
    pos = assign.gt_inds >= 0
    exp_pos = _per_level(pos, per_level)
    assert [stats[f"lvl{i}_pos"].item() for i in range(2)] == exp_pos
    assert [stats[f"lvl{i}_neg"].item() for i in range(2)] == [2 * n - k for n, k in zip(per_level, exp_pos)]
    assert all(k > 0 for k in exp_pos)
    cls = _flat(outs[0], 2)
    onehot = torch.zeros_like(cls)
    b, p = pos.nonzero(as_tuple=True)
    onehot[b, p, pad_targets(TARGETS).gt_labels[b, assign.gt_inds[b, p]]] = 1.0
    per_prior = sigmoid_focal_loss(cls, onehot, alpha=0.25, gamma=2.0, reduction="none").sum(-1)
    assert [stats[f"lvl{i}_pos_cls_loss"].item() for i in range(2)] == pytest.approx(
        _level_means(per_prior, pos, per_level), rel=1e-5)


@pytest.mark.parametrize("kind", ["retina", "atss", "fcos"])
def test_no_stats_when_flag_off_and_losses_unchanged(kind: str) -> None:
    head = _head(kind)
    outs = _outs(head)
    off = head.loss(outs, TARGETS, METAS)
    assert not any(k.startswith("lvl") for k in off)
    head.collect_level_stats = True
    on = head.loss(outs, TARGETS, METAS)
    assert {k for k in on if k.startswith("lvl")} and set(off) < set(on)
    for k in off:
        assert torch.equal(off[k], on[k]), k


def test_ghmc_stats_reproduce_the_step_loss_and_leave_its_state_alone() -> None:
    """With GHM-C (momentum 0.75) the per-prior losses sum to the training loss of the same step, and collecting
    them does not move the running bin densities."""
    ghm = {"type": "GHMC", "bins": 30, "momentum": 0.75, "use_sigmoid": True, "loss_weight": 1.0}
    plain, watched = _head("retina", loss_cls=ghm), _head("retina", loss_cls=ghm)
    watched.collect_level_stats = True
    for seed in (0, 1):  # the second step starts from a non-zero EMA
        outs = _outs(plain, seed)
        a = plain.loss(outs, TARGETS, METAS)
        s = watched.loss(outs, TARGETS, METAS)
        assert torch.equal(plain.loss_cls.acc_sum, watched.loss_cls.acc_sum)
        assert torch.equal(a["loss_cls"], s["loss_cls"])
        # GHM is computed per level (tot = that level's valid elements, 2 classes each), summed over levels
        total = sum(sum(s[f"lvl{i}_{q}_cls_loss"] * s[f"lvl{i}_{q}"] for q in ("pos", "neg"))
                    / (2 * sum(s[f"lvl{i}_{q}"] for q in ("pos", "neg"))) for i in range(2))
        assert total.item() == pytest.approx(s["loss_cls"].item(), rel=1e-4)


# ------------------------------------------------------------------------------------------------ trainer
@pytest.fixture()
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_trainer_sets_the_flag_on_logged_iterations(tmp_path: Path, _one_thread) -> None:
    from densedet.config import load_config
    from densedet.data import make_synthetic_coco
    from densedet.engine.trainer import Trainer
    from densedet.models.build import build_detector

    root = tmp_path / "synth"
    make_synthetic_coco(root, num_train=8, num_val=2, size=96, seed=3)
    tiny = ["model.backbone.base_channels=8", "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
            "model.bbox_head.in_channels=16", "model.bbox_head.feat_channels=16", "model.bbox_head.stacked_convs=1",
            "model.bbox_head.norm_cfg={type: GN, num_groups: 4}", "data.samples_per_gpu=2",
            "data.workers_per_gpu=0", "data.train.pipeline=[{type: Resize, img_scale: [96, 96]}]",
            "runtime.val_interval=0", "runtime.device=cpu", f"data.root={root}", "schedule.epochs=2"]

    def run(work: Path, log_interval: int) -> tuple[list[bool], list[dict], object]:
        cfg = load_config("atss_r18_fpn_synth", [*tiny, f"runtime.log_interval={log_interval}"])
        model = build_detector(cfg.model)
        head, flags, loss = model.bbox_head, [], model.bbox_head.loss

        def spy(*args, **kwargs):
            flags.append(head.collect_level_stats)
            return loss(*args, **kwargs)

        head.loss = spy
        Trainer(cfg, work, model=model).train()
        lines = [json.loads(s) for s in (work / "log.jsonl").read_text().splitlines()]
        return flags, [r for r in lines if r["type"] == "train"], head

    flags, lines, head = run(tmp_path / "every", 1)
    assert flags == [True] * 8 and len(lines) == 8 and head.collect_level_stats is False
    for r in lines:  # one iteration per line: the levels' positives add up to that iteration's num_pos
        assert sum(r[f"lvl{i}_pos"] for i in range(5)) == r["num_pos"]
        assert all(float(r[f"lvl{i}_neg"]).is_integer() for i in range(5))

    flags, lines, _ = run(tmp_path / "every3", 3)  # 4 iterations per epoch: lines at 3, 4 (epoch end), 6, 8
    logged = {r["iter"] for r in lines}
    assert logged == {3, 4, 6, 8}
    assert flags == [i + 1 in logged for i in range(8)]


def test_progress_averages_a_key_over_the_iterations_that_report_it(tmp_path: Path) -> None:
    prog = TrainProgress(total_iters=4, iters_per_epoch=4, epochs=1, log_interval=2, enabled=False)
    prog.update(0, 0, 0.1, {"loss": 1.0})
    out = prog.update(0, 1, 0.1, {"loss": 3.0, "lvl0_pos": 7.0})
    assert out == {"loss": 2.0, "lvl0_pos": 7.0}


# ------------------------------------------------------------------------------------------------ CLI
def _write_log(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_cli_levels_prints_table_and_writes_png(tmp_path: Path, capsys) -> None:
    recs = [
        {"type": "train", "epoch": 1, "iter": 10, "loss": 1.0, "lvl0_pos": 12, "lvl0_neg": 3000,
         "lvl0_pos_neg_ratio": 0.004, "lvl1_pos": 5, "lvl1_neg": 700, "lvl1_pos_neg_ratio": 5 / 700,
         "lvl0_gamma": 2.5, "lvl1_gamma": 1.5, "lvl0_alpha": 0.2, "lvl1_alpha": 1 / 3},
        {"type": "val", "epoch": 1, "iter": 20, "bbox_mAP": 0.1, "lvl0_pos": 999},  # not a train line: skipped
        {"type": "train", "epoch": 1, "iter": 20, "loss": 0.8, "lvl0_pos": 18, "lvl0_neg": 2994,
         "lvl0_pos_neg_ratio": None, "lvl1_pos": 7, "lvl1_neg": 698, "lvl1_pos_neg_ratio": 0.01,
         "lvl0_gamma": 2.1, "lvl1_gamma": 1.9, "lvl0_alpha": 0.25, "lvl1_alpha": 0.5},
        {"type": "train", "epoch": 2, "iter": 30, "loss": 0.7, "lvl0_pos": 21, "lvl0_neg": 2991,
         "lvl0_pos_neg_ratio": 0.007, "lvl1_pos": 9, "lvl1_neg": 696, "lvl1_pos_neg_ratio": 0.0129,
         "lvl0_gamma": 2.0, "lvl1_gamma": 2.0, "lvl0_alpha": 0.25, "lvl1_alpha": 0.25},
    ]
    _write_log(tmp_path / "log.jsonl", recs)
    assert main(["levels", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    blocks = out.split("level ")[1:]
    assert [b.split("\n", 1)[0] for b in blocks] == ["0", "1"]
    rows = {b.split("\n", 1)[0]: {ln.split()[0]: ln.split()[1:] for ln in b.splitlines()[2:] if ln.strip()}
            for b in blocks}
    assert rows["0"]["pos"] == ["12", "21", "17", "3"]  # first, last, mean (12 + 18 + 21) / 3, lines
    assert rows["0"]["neg"][:3] == ["3000", "2991", "2995"]
    assert rows["0"]["pos_neg_ratio"] == ["0.004", "0.007", "0.0055", "2"]  # the null is a gap, not a zero
    assert rows["1"]["gamma"][:3] == ["1.5", "2", "1.8"]
    assert float(rows["1"]["alpha"][2]) == pytest.approx((1 / 3 + 0.5 + 0.25) / 3, rel=1e-3)
    assert list(rows["0"]) == ["pos", "neg", "pos_neg_ratio", "gamma", "alpha"]
    png = tmp_path / "levels.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 500

    other = tmp_path / "plots" / "lv.png"
    assert main(["levels", str(tmp_path), "--out", str(other)]) == 0
    assert other.is_file()


def test_cli_levels_errors_name_the_file(tmp_path: Path, capsys) -> None:
    _write_log(tmp_path / "log.jsonl", [{"type": "train", "epoch": 1, "iter": 1, "loss": 1.0}])
    assert main(["levels", str(tmp_path)]) == 3  # a data error (docs/cli.md)
    err = capsys.readouterr().err
    assert str(tmp_path / "log.jsonl") in err and "runtime.log_interval" in err
    assert not (tmp_path / "levels.png").exists()
    assert main(["levels", str(tmp_path / "nowhere")]) == 3
    assert "log.jsonl" in capsys.readouterr().err
