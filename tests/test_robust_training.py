"""No non-finite checkpoint, ever (issue 9, item 10): AMP gradient check with counted skips and a stop, checkpoints
refused when they hold NaN/inf, convs on maps smaller than their kernel in fp32 under autocast, and the temp
file of a killed save removed at the next start (item 11); and (issue 18 item 5) ``runtime.load_from`` never reads
the backbone's ``pretrained`` source."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import TINY_ATSS
from torch import nn

from densedet.config import config_from_dict, load_config
from densedet.data import make_synthetic_coco
from densedet.engine import Trainer, load_checkpoint, train
from densedet.engine.checkpoint import find_nonfinite, remove_stale_temp_files
from densedet.errors import CheckpointError, NonFiniteError
from densedet.io import atomic_torch_save
from densedet.models.build import build_detector
from densedet.models.layers import ConvModule

_PIPE = [{"type": "Resize", "img_scale": [64, 64], "keep_ratio": True}]


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_coco(root, num_train=8, num_val=2, size=64, seed=0)
    return root


class Poisoned(nn.Module):
    """One conv; the loss is finite, but on the forward calls in ``poison`` (1-based) the backward pass turns
    the gradient into NaN. ``states`` keeps the weight seen at each call."""

    def __init__(self, poison: set[int] | None = None, poison_from: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.poison, self.poison_from = poison or set(), poison_from
        self.calls = 0
        self.states: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor, targets: Any = None, metas: Any = None, mode: str = "loss") -> Any:
        self.calls += 1
        self.states.append(self.conv.weight.detach().clone())
        out = self.conv(images.float() / 255.0).float()  # uint8 pixels from collate
        if self.calls in self.poison or (self.poison_from is not None and self.calls >= self.poison_from):
            out.register_hook(lambda g: g * float("nan"))
        return {"loss": (out.mean() - 1.0) ** 2}


def _cfg(root: Path, **runtime: Any):
    return config_from_dict({
        "model": {"type": "Poisoned"},
        "data": {"root": str(root), "samples_per_gpu": 2, "workers_per_gpu": 0,
                 "train": {"ann_file": "annotations/instances_train.json", "img_dir": "train", "pipeline": _PIPE}},
        "optimizer": {"type": "SGD", "lr": 0.1, "auto_scale_lr": False},
        "schedule": {"epochs": 1, "warmup": None},
        "runtime": {"val_interval": 0, "log_interval": 1, "device": "cpu", "amp": True, **runtime},
    }, name="poisoned")


def test_poisoned_gradient_step_is_skipped_and_counted(synth_root, tmp_path, caplog) -> None:
    model = Poisoned(poison={2})
    trainer = Trainer(_cfg(synth_root), tmp_path, model=model)
    with caplog.at_level(logging.WARNING, logger="densedet"):
        out = trainer.train()
    assert trainer.iter == 4 and trainer.skipped_steps == 1 and out["skipped_steps"] == 1
    assert torch.equal(model.states[2], model.states[1])  # step 2 did not move the weights
    assert not torch.equal(model.states[1], model.states[0]) and not torch.equal(model.states[3], model.states[2])
    assert "epoch 1, iteration 2 (global iteration 2): optimizer step skipped (1 skipped" in caplog.text
    ckpt = load_checkpoint(tmp_path / "epoch_1.pth")
    assert find_nonfinite(ckpt) == []


def test_consecutive_poisoned_gradients_stop_training_and_nothing_is_saved(synth_root, tmp_path) -> None:
    trainer = Trainer(_cfg(synth_root, max_consecutive_skips=2), tmp_path, model=Poisoned(poison_from=2))
    with pytest.raises(NonFiniteError, match=r"non-finite gradients in 2 consecutive steps \(the last at epoch 1, "
                                             r"iteration 3 .*max_consecutive_skips=2"):
        trainer.train()
    assert list(tmp_path.glob("*.pth")) == []
    assert find_nonfinite(trainer.model.state_dict()) == []  # the weights never took a NaN step


def test_save_refuses_nonfinite_model_or_optimizer_state(synth_root, tmp_path) -> None:
    trainer = Trainer(_cfg(synth_root), tmp_path, model=Poisoned())
    trainer.train()
    good = (tmp_path / "epoch_1.pth").read_bytes()
    with torch.no_grad():
        trainer.model.conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"epoch_1\.pth: not written: 1 tensor hold NaN or inf "
                                              r"\(state_dict\.conv\.weight\)"):
        trainer.save(tmp_path / "epoch_1.pth")
    assert (tmp_path / "epoch_1.pth").read_bytes() == good  # the last good checkpoint is untouched
    with torch.no_grad():
        trainer.model.conv.weight.nan_to_num_(0.0)
    state = next(iter(trainer.optimizer.state.values()))
    state["momentum_buffer"][0] = float("inf")
    with pytest.raises(CheckpointError, match=r"optimizer\.state\.0\.momentum_buffer"):
        trainer.save(tmp_path / "epoch_2.pth")
    assert not (tmp_path / "epoch_2.pth").exists() and not list(tmp_path.glob(".*.tmp"))


def test_find_nonfinite_sees_nested_averaged_weights() -> None:
    ckpt = {"state_dict": {"w": torch.ones(2)}, "meta": {"swa": {"average": {"w": torch.tensor([1.0, float("inf")])},
                                                                "n": torch.tensor(3)}}}
    assert find_nonfinite(ckpt) == ["meta.swa.average.w"]


def test_conv_on_a_map_smaller_than_its_kernel_runs_in_fp32_under_autocast() -> None:
    torch.manual_seed(0)
    for _ in range(10):  # the bf16 CPU backward of a bare conv here returns garbage in most trials
        conv = ConvModule(8, 8, 3, stride=2, padding=1, act_cfg=None)
        x = torch.randn(2, 8, 1, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        assert y.dtype == torch.float32
        y.sum().backward()
        amp_grad, conv.conv.weight.grad = conv.conv.weight.grad, None
        conv(x).sum().backward()  # plain fp32: the expected gradient
        assert torch.isfinite(amp_grad).all()
        torch.testing.assert_close(amp_grad, conv.conv.weight.grad, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a map as large as the kernel keeps the fast bf16 path
        assert conv(torch.randn(1, 8, 3, 3)).dtype == torch.bfloat16


def test_amp_training_with_a_1x1_pyramid_level_stays_finite(tmp_path, synth_root) -> None:
    overrides = [
        "model.backbone.base_channels=8", "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
        "model.bbox_head.in_channels=16", "model.bbox_head.feat_channels=16", "model.bbox_head.stacked_convs=1",
        "model.bbox_head.norm_cfg={type: GN, num_groups: 4}", "data.samples_per_gpu=2", "data.workers_per_gpu=0",
        "data.train.pipeline=[{type: Resize, img_scale: [64, 64]}]", "schedule.epochs=2",
        "runtime.val_interval=0", "runtime.device=cpu", "runtime.amp=true", f"data.root={synth_root}",
    ]
    trainer = Trainer(load_config("atss_r18_fpn_synth", overrides), tmp_path)
    sizes: list[tuple[int, int]] = []
    trainer.model.neck.register_forward_hook(lambda m, i, o: sizes.extend(tuple(f.shape[-2:]) for f in o))
    out = trainer.train()
    assert sizes[-2:] == [(1, 1), (1, 1)]  # P6 and P7 of a 64 px image: P7's stride-2 conv runs on a 1x1 map
    # Without the fp32 guard most of these 8 steps get NaN/garbage weight gradients and are skipped.
    assert out["skipped_steps"] == 0
    assert find_nonfinite(load_checkpoint(tmp_path / "epoch_2.pth")) == []


def test_temp_file_of_a_killed_save_is_removed_on_the_next_start(synth_root, tmp_path) -> None:
    # A process killed inside atomic_torch_save (between writing the temp file and renaming it).
    script = textwrap.dedent(f"""
        import os, torch
        from densedet.engine import checkpoint
        checkpoint.os.replace = lambda *a: os._exit(9)
        checkpoint.atomic_torch_save({{"w": torch.ones(3)}}, {str(tmp_path / "epoch_3.pth")!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    assert subprocess.run([sys.executable, "-c", script], env=env).returncode == 9
    stale = list(tmp_path.glob(".epoch_3.pth.*.tmp"))
    assert len(stale) == 1 and not (tmp_path / "epoch_3.pth").exists()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        busy = tmp_path / f".epoch_4.pth.{live.pid}.0123abcd.tmp"  # a save still in progress in another process
        busy.write_bytes(b"x")
        other = tmp_path / ".notes.txt.tmp"  # not a checkpoint temp file: left alone
        other.write_bytes(b"x")
        Trainer(_cfg(synth_root), tmp_path, model=Poisoned())
        live.kill()
    assert not stale[0].exists() and busy.exists() and other.exists()
    assert remove_stale_temp_files(tmp_path) == [busy]  # its writer is gone now


def test_load_from_skips_the_backbone_pretrained_weights(tmp_path, caplog) -> None:
    """Issue 18 item 5: with ``runtime.load_from`` set, the backbone's ``pretrained`` source is never read (the
    checkpoint overwrites those weights anyway), so fine-tuning works offline; the log says so. The source here is
    a file that does not exist: reading it would be a CheckpointError."""
    root = tmp_path / "synth"
    make_synthetic_coco(root, num_train=2, num_val=1, size=64, seed=0)
    tiny = [o for o in TINY_ATSS if not o.startswith("model.backbone.pretrained")]
    start = build_detector(load_config("atss_r18_fpn_synth", TINY_ATSS).model)
    atomic_torch_save({"state_dict": start.state_dict()}, tmp_path / "start.pth")
    missing = tmp_path / "no_such_backbone.pth"
    overrides = tiny + [f"model.backbone.pretrained={missing}", f"runtime.load_from={tmp_path / 'start.pth'}",
                        f"data.root={root}", "data.auto_create=null", "data.samples_per_gpu=2",
                        "data.workers_per_gpu=0", "schedule.epochs=1", "runtime.val_interval=0",
                        "runtime.log_interval=1"]
    cfg = load_config("atss_r18_fpn_synth", overrides)
    with caplog.at_level(logging.INFO, logger="densedet"):
        trainer = Trainer(cfg, tmp_path / "wd")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("runtime.load_from is set: not fetching the backbone's pretrained weights" in m and str(missing) in m
               for m in msgs), msgs
    assert any("loaded initial weights from" in m for m in msgs)
    for k, v in start.state_dict().items():  # every weight, the backbone's included, is the checkpoint's
        assert torch.equal(trainer.model.state_dict()[k], v), k
    train(cfg, tmp_path / "wd2")  # and the run itself starts and finishes
    assert (tmp_path / "wd2" / "epoch_1.pth").is_file()
    assert not missing.exists()
    # without load_from the same config does read the source, so the test above could fail
    with pytest.raises(CheckpointError, match="no_such_backbone"):
        Trainer(load_config("atss_r18_fpn_synth", [o for o in overrides if not o.startswith("runtime.load_from")]),
                tmp_path / "wd3")
