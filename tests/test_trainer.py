"""Trainer end to end on a tiny synthetic COCO set with a toy detector: loss falls, artefacts, exact resume,
NaN handling, evaluation plumbing and the plain-text progress format.

``ToyDetector`` and ``make_cfg`` are also used by tests/test_ddp.py.
"""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from densedet.config import config_from_dict
from densedet.config.schema import Config
from densedet.data import make_synthetic_coco
from densedet.dist import reduce_mean
from densedet.engine import Trainer, evaluate, load_checkpoint, run_inference
from densedet.engine.logging import JsonlLogger, TrainProgress


class ToyDetector(nn.Module):
    """Two strided convs, then per-location class scores and ``ltrb`` distances (an FCOS in miniature).

    A location is positive for the smallest ground-truth box that contains it. The loss is normalised by the
    positive count averaged over processes (``reduce_mean``), as the real heads do, so DDP with batch 1 per
    process equals one process with batch 2.
    """

    stride = 4

    def __init__(self, num_classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.GroupNorm(4, 16), nn.ReLU(),
                                      nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU())
        self.drop = nn.Dropout(dropout)
        self.cls = nn.Conv2d(16, num_classes, 3, padding=1)
        self.reg = nn.Conv2d(16, 4, 3, padding=1)
        nn.init.constant_(self.cls.bias, -2.0)

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None, metas: list[dict] | None = None,
                mode: str = "loss") -> Any:
        images = (images.float() - 127.5) / 64.0  # uint8 pixels from collate: a toy's own normalisation
        feat = self.drop(self.backbone(images))
        b, _, h, w = feat.shape
        cls = self.cls(feat).permute(0, 2, 3, 1).reshape(b, h * w, self.num_classes)
        reg = self.reg(feat).permute(0, 2, 3, 1).reshape(b, h * w, 4)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        points = (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * self.stride  # (N, 2)
        if mode == "loss":
            cls, reg = cls.float(), reg.float()  # losses in fp32 under autocast, as mmdet's force_fp32
            m = max(1, max(len(t["boxes"]) for t in targets))
            boxes = images.new_zeros(b, m, 4)
            labels = torch.full((b, m), -1, dtype=torch.long)
            for i, t in enumerate(targets):
                boxes[i, : len(t["boxes"])] = t["boxes"]
                labels[i, : len(t["labels"])] = t["labels"]
            px, py = points[None, :, None, 0], points[None, :, None, 1]  # (1, N, 1)
            x1, y1, x2, y2 = (boxes[:, None, :, k] for k in range(4))  # (B, 1, M)
            ltrb = torch.stack([px - x1, py - y1, x2 - px, y2 - py], -1)  # (B, N, M, 4)
            inside = (ltrb.min(-1).values > 0) & (labels[:, None, :] >= 0)
            area = ((x2 - x1) * (y2 - y1)).expand_as(inside).masked_fill(~inside, float("inf"))
            best = area.argmin(-1)  # (B, N)
            pos = inside.any(-1)
            onehot = torch.zeros_like(cls)
            best_label = labels.gather(1, best)
            onehot[pos] = F.one_hot(best_label[pos], self.num_classes).float()
            num_pos = reduce_mean(pos.sum().float()).clamp(min=1.0)
            tgt = ltrb.gather(2, best[..., None, None].expand(-1, -1, 1, 4)).squeeze(2) / 16.0
            loss_cls = sigmoid_focal_loss(cls, onehot, reduction="sum") / num_pos
            loss_bbox = F.l1_loss(reg[pos], tgt[pos], reduction="sum") / num_pos
            return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "num_pos": pos.sum().float()}
        scores, idx = cls.sigmoid().flatten(1).topk(10, dim=1)
        loc, label = idx // self.num_classes, idx % self.num_classes
        d = reg.gather(1, loc[..., None].expand(-1, -1, 4)).clamp(min=0) * 16.0
        p = points[loc]
        out = []
        for i in range(b):
            box = torch.cat([p[i] - d[i, :, :2], p[i] + d[i, :, 2:]], -1)
            ws, hs = metas[i]["scale_factor"]
            out.append({"boxes": box / box.new_tensor([ws, hs, ws, hs]), "scores": scores[i], "labels": label[i]})
        return out


_PIPE = [{"type": "Resize", "img_scale": [64, 64], "keep_ratio": True},
         {"type": "RandomFlip", "flip_ratio": 0.5}]


def make_cfg(root: Path, **sections: dict) -> Config:
    raw: dict[str, Any] = {
        "model": {"type": "Toy"},
        "data": {"root": str(root), "samples_per_gpu": 4, "workers_per_gpu": 0, "val_samples_per_gpu": 4,
                 "train": {"ann_file": "annotations/instances_train.json", "img_dir": "train", "pipeline": _PIPE},
                 "val": {"ann_file": "annotations/instances_val.json", "img_dir": "val",
                         "pipeline": [_PIPE[0]]}},
        "optimizer": {"type": "AdamW", "lr": 0.01, "weight_decay": 1e-4, "auto_scale_lr": False},
        "schedule": {"epochs": 2, "policy": "step", "steps": [100], "warmup": "linear", "warmup_iters": 2},
        "runtime": {"seed": 0, "val_interval": 0, "log_interval": 1, "device": "cpu"},
    }
    for name, values in sections.items():
        raw[name] = {**raw[name], **values}
    return config_from_dict(raw, name="toy")


def train_lines(work_dir: Path) -> list[dict]:
    lines = [json.loads(s) for s in (work_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if r["type"] == "train"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a busy 2-core machine torch's thread pool oversubscribes and runs ~50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_coco(root, num_train=8, num_val=4, size=64, seed=0)
    return root


def test_training_reduces_loss_and_writes_artefacts(synth_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(synth_root, schedule={"epochs": 8, "policy": "cosine", "min_lr_ratio": 0.1},
                   optimizer={"grad_clip": {"max_norm": 20.0}},
                   runtime={"val_interval": 4, "checkpoint_interval": 2, "max_keep_ckpts": 2})
    torch.manual_seed(0)  # the toy model is built before the Trainer seeds; torch's own start seed is random
    trainer = Trainer(cfg, tmp_path, model=ToyDetector())
    assert trainer.iters_per_epoch == 2  # 8 images, 4 per batch
    metrics = trainer.train()

    lines = train_lines(tmp_path)
    assert [r["iter"] for r in lines] == list(range(1, 17))
    assert {"loss", "loss_cls", "loss_bbox", "num_pos", "grad_norm", "lr", "epoch", "time"} <= set(lines[0])
    for r in lines:
        assert r["loss"] == pytest.approx(r["loss_cls"] + r["loss_bbox"], rel=1e-5)
    first = sum(r["loss"] for r in lines[:3]) / 3
    last = sum(r["loss"] for r in lines[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert lines[0]["lr"] == pytest.approx(0.01 * 0.001)  # linear warm-up start

    vals = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines() if '"val"' in s]
    assert [v["epoch"] for v in vals] == [4, 8] and all("bbox_mAP" in v for v in vals)
    assert metrics["iter"] == 16 and metrics["bbox_mAP"] == vals[-1]["bbox_mAP"]
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pth")) == ["epoch_6.pth", "epoch_8.pth"]  # pruned
    assert (tmp_path / "last_checkpoint").read_text().strip() == "epoch_8.pth"
    assert load_checkpoint(tmp_path / "epoch_8.pth")["meta"]["classes"] == ["circle", "square", "triangle"]
    for name in ("curves.png", "train.log", "val_results.bbox.json", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    # The dumped config validates into the same settings (the toy model is not registered, so no load_config).
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again.schedule.epochs == 8 and again.optimizer.grad_clip == {"max_norm": 20.0}

    # load_from: a fresh trainer starts from those weights (weights only, iteration 0).
    cfg2 = make_cfg(synth_root, runtime={"load_from": str(tmp_path / "epoch_8.pth")})
    t2 = Trainer(cfg2, tmp_path / "ft", model=ToyDetector())
    assert t2.iter == 0
    for a, b in zip(trainer.model.state_dict().values(), t2.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def reference_run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    """Two uninterrupted epochs (dropout on, so the RNG stream matters); per-iteration losses and final weights."""
    work = tmp_path_factory.mktemp("ref")
    torch.manual_seed(123)
    t = Trainer(make_cfg(synth_root), work, model=ToyDetector(dropout=0.2))
    t.train()
    return train_lines(work), {k: v.clone() for k, v in t.model.state_dict().items()}


def _assert_same_continuation(work: Path, reference: tuple[list[dict], dict], model: nn.Module, after: int) -> None:
    ref_lines, ref_state = reference
    got = {r["iter"]: r for r in train_lines(work)}
    for r in ref_lines:
        if r["iter"] > after:
            for key in ("loss", "loss_cls", "loss_bbox", "lr"):
                assert got[r["iter"]][key] == r[key], (r["iter"], key)  # bit-identical
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_resume_at_epoch_boundary_is_exact(synth_root: Path, tmp_path: Path, reference_run) -> None:
    torch.manual_seed(123)
    first = Trainer(make_cfg(synth_root, schedule={"max_iters": 2}), tmp_path, model=ToyDetector(dropout=0.2))
    first.train()
    assert (tmp_path / "epoch_1.pth").is_file()
    torch.manual_seed(999)  # a different init: everything must come from the checkpoint
    resumed = Trainer(make_cfg(synth_root), tmp_path, model=ToyDetector(dropout=0.2), resume=True)
    assert resumed.iter == 2
    resumed.train()
    _assert_same_continuation(tmp_path, reference_run, resumed.model, after=2)


def test_resume_mid_epoch_is_exact(synth_root: Path, tmp_path: Path, reference_run) -> None:
    torch.manual_seed(123)
    Trainer(make_cfg(synth_root, schedule={"max_iters": 3}), tmp_path, model=ToyDetector(dropout=0.2)).train()
    ckpt = tmp_path / "iter_3.pth"
    assert (tmp_path / "last_checkpoint").read_text().strip() == "iter_3.pth"
    torch.manual_seed(7)
    resumed = Trainer(make_cfg(synth_root), tmp_path / "b", model=ToyDetector(dropout=0.2), resume=ckpt)
    resumed.train()
    _assert_same_continuation(tmp_path / "b", reference_run, resumed.model, after=3)


class _NanAt(ToyDetector):
    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, images, targets=None, metas=None, mode="loss"):
        out = super().forward(images, targets, metas, mode)
        if mode == "loss":
            self.calls += 1
            if self.calls == self.bad_call:
                out["loss_bbox"] = out["loss_bbox"] * float("nan")
        return out


def test_nan_loss_raises_with_location(synth_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(synth_root), tmp_path, model=_NanAt(bad_call=4))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"epoch 2, iteration 2 \(global iteration 4\).*loss_bbox=nan"):
        trainer.train()
    assert trainer.iter == 3
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


class _Oracle(nn.Module):
    """Predicts the ground truth of each image (from the COCO dict), in original-image pixels."""

    def __init__(self, gt: dict, cat2label: dict[int, int], empty: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.empty = empty
        self.by_image: dict[int, list] = {}
        for a in gt["annotations"]:
            self.by_image.setdefault(a["image_id"], []).append(a)
        self.cat2label = cat2label

    def forward(self, images, targets=None, metas=None, mode="predict"):
        out = []
        for meta in metas:
            anns = [] if self.empty else self.by_image.get(meta["image_id"], [])
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
            out.append({"boxes": boxes.float(), "scores": torch.ones(len(anns)),
                        "labels": torch.tensor([self.cat2label[a["category_id"]] for a in anns], dtype=torch.long)})
        return out


def test_evaluate_perfect_and_empty_predictions(synth_root: Path, tmp_path: Path) -> None:
    trainer = Trainer(make_cfg(synth_root, runtime={"val_interval": 1}), tmp_path, model=ToyDetector())
    ds, loader = trainer.val_dataset, trainer.val_loader
    cat2label = {c: lbl for lbl, c in ds.label2cat.items()}
    oracle = _Oracle(ds.coco_gt_dict, cat2label)
    dets = run_inference(oracle, loader, "cpu")
    assert [d["image_id"] for d in dets] == sorted(img["id"] for img in ds.coco_gt_dict["images"])
    result = evaluate(oracle, loader, ds, "cpu", out_json=tmp_path / "res.json")
    assert result.metrics["bbox_mAP"] == pytest.approx(1.0)
    assert len(json.loads((tmp_path / "res.json").read_text())) == len(ds.coco_gt_dict["annotations"])
    assert oracle.training  # train/eval mode restored
    empty = evaluate(_Oracle(ds.coco_gt_dict, cat2label, empty=True), loader, ds, "cpu")
    assert empty.metrics["bbox_mAP"] == 0.0


def test_plain_progress_lines_and_jsonl(tmp_path: Path) -> None:
    stream = io.StringIO()
    jsonl = JsonlLogger(tmp_path / "log.jsonl")
    prog = TrainProgress(total_iters=8, iters_per_epoch=4, epochs=2, log_interval=2, jsonl=jsonl, tty=False,
                         stream=stream)
    for it in range(6):
        epoch = it // 4
        prog.update(epoch, it, lr=0.01, stats={"loss": float(it), "loss_cls": 1.0, "loss_bbox": float(it) - 1.0})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"epoch 1/2 iter 2/4 loss 0\.5000 loss_bbox -0\.5000 loss_cls 1\.0000 lr 0\.01 "
                        r"[\d.]+ it/s eta \d+:\d\d:\d\d", lines[0]), lines[0]
    assert lines[2].startswith("epoch 2/2 iter 2/4 loss 4.5000")
    records = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["iter"], r["loss"]) for r in records] == [(1, 2, 0.5), (1, 4, 2.5), (2, 6, 4.5)]
    jsonl.log({"type": "train", "loss": float("nan")})
    assert yaml.safe_load((tmp_path / "log.jsonl").read_text().splitlines()[-1])["loss"] is None


def test_tqdm_bar_on_a_terminal() -> None:
    stream = io.StringIO()
    prog = TrainProgress(total_iters=4, iters_per_epoch=2, epochs=2, log_interval=1, tty=True, stream=stream)
    for it in range(4):
        prog.update(it // 2, it, lr=0.02, stats={"loss": 1.0, "loss_cls": 0.25})
    prog.close()
    text = stream.getvalue()
    assert "4/4" in text and "loss_cls=0.2500" in text and "it/s" in text
    assert "epoch 1/2 iter" not in text  # no plain lines when a bar is shown


def test_amp_on_cpu_uses_bfloat16_autocast(synth_root: Path, tmp_path: Path) -> None:
    cfg = make_cfg(synth_root, runtime={"amp": True}, schedule={"max_iters": 2})
    trainer = Trainer(cfg, tmp_path, model=ToyDetector())
    assert trainer.scaler is None  # no GradScaler on CPU
    seen = []
    trainer.model.cls.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    assert seen and all(d == torch.bfloat16 for d in seen)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_lines(tmp_path))
    assert (tmp_path / "iter_2.pth").is_file() is False and (tmp_path / "epoch_1.pth").is_file()


@pytest.mark.parametrize("native", [False, True])
def test_amp_on_a_cpu_without_native_bf16_says_so(synth_root: Path, tmp_path: Path, monkeypatch, caplog,
                                                  native: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cfg = make_cfg(synth_root, runtime={"amp": True}, schedule={"max_iters": 2})
    with caplog.at_level(logging.WARNING, logger="densedet"):
        Trainer(cfg, tmp_path, model=ToyDetector())
    notes = [r.getMessage() for r in caplog.records if "no native bfloat16" in r.getMessage()]
    assert len(notes) == (0 if native else 1), notes
