"""`Predictor` takes a work dir as the CLI does, and applies EXIF orientation to every input type (issue 13,
items 2 and 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from tiny_models import TINY_ATSS, val_resize

from densedet.cli import _resolve_checkpoint
from densedet.config import load_config
from densedet.engine.checkpoint import CheckpointNotFoundError, mark_last_checkpoint, save_checkpoint
from densedet.inference.predictor import Predictor
from densedet.models.build import build_detector

TINY = [*TINY_ATSS, "model.test_cfg.score_thr=0.0", val_resize(96)]
CFG = "atss_r18_fpn_synth"
EXIF_ORIENTATION = 0x0112


def _save_random_model(path: Path, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    model = build_detector(load_config(CFG, TINY).model)
    save_checkpoint(path, model, meta={"classes": ["circle", "square", "triangle"]})
    return model.bbox_head.atss_cls.weight.detach().clone()


def _loaded_weight(pred: Predictor) -> torch.Tensor:
    return pred.model.bbox_head.atss_cls.weight.detach().cpu()


def test_predictor_takes_a_work_dir_and_picks_the_cli_checkpoint(tmp_path: Path) -> None:
    work = tmp_path / "work"
    w1 = _save_random_model(work / "epoch_1.pth", seed=1)
    w2 = _save_random_model(work / "epoch_2.pth", seed=2)  # newer file, but last_checkpoint names epoch_1
    mark_last_checkpoint(work, work / "epoch_1.pth")
    assert not torch.equal(w1, w2)
    pred = Predictor(CFG, work, device="cpu", overrides=TINY)
    assert pred.checkpoint == _resolve_checkpoint(str(work)) == work / "epoch_1.pth"
    assert torch.equal(_loaded_weight(pred), w1) and pred.classes == ["circle", "square", "triangle"]
    assert Predictor(CFG, str(work / "epoch_2.pth"), device="cpu", overrides=TINY).checkpoint == work / "epoch_2.pth"

    w_swa = _save_random_model(work / "swa_final.pth", seed=3)  # a finished SWA run: the average is the model
    pred = Predictor(CFG, str(work), device="cpu", overrides=TINY)
    assert pred.checkpoint == _resolve_checkpoint(str(work)) == work / "swa_final.pth"
    assert torch.equal(_loaded_weight(pred), w_swa)


def test_predictor_errors_name_the_work_dir_or_file(tmp_path: Path) -> None:
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="empty_run: no checkpoint in this work dir"):
        Predictor(CFG, tmp_path / "empty_run", device="cpu", overrides=TINY)
    with pytest.raises(CheckpointNotFoundError, match="nope.pth: no such checkpoint file or work dir"):
        Predictor(CFG, tmp_path / "nope.pth", device="cpu", overrides=TINY)


@pytest.fixture(scope="module")
def rotated_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 128x96 (w x h) JPEG whose EXIF orientation 6 says: rotate 90 degrees clockwise to view (96x128)."""
    rng = np.random.default_rng(0)
    pixels = np.full((96, 128, 3), 200, np.uint8)
    pixels[10:40, 20:90] = (30, 60, 220)  # an asymmetric blob, so a missed rotation changes the detections
    pixels[60:90, 100:120] = (220, 40, 40)
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = tmp_path_factory.mktemp("exif") / "rotated.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    return path


def test_exif_orientation_same_for_path_and_pil_and_boxes_in_the_viewed_frame(rotated_jpeg: Path) -> None:
    pred = Predictor(CFG, None, device="cpu", overrides=TINY)
    pil = Image.open(rotated_jpeg)
    assert pil.size == (128, 96) and pil.getexif()[EXIF_ORIENTATION] == 6
    upright = ImageOps.exif_transpose(pil)
    assert upright.size == (96, 128)

    from_path = pred(rotated_jpeg)
    from_pil = pred(pil)
    from_upright_array = pred(np.asarray(upright.convert("RGB")))  # arrays are taken as-is: already upright
    from_stored_array = pred(np.asarray(pil.convert("RGB")))  # ... so the stored frame gives other boxes
    assert len(from_path["boxes"]) > 0
    for other in (from_pil, from_upright_array):
        assert torch.equal(from_path["boxes"], other["boxes"]) and torch.equal(from_path["scores"], other["scores"])
    assert not torch.equal(from_path["boxes"], from_stored_array["boxes"])

    boxes = from_path["boxes"]  # xyxy in the viewed 96 x 128 frame: tall, not wide
    assert (boxes[:, 0::2] <= 96 + 1e-3).all() and (boxes[:, 1::2] <= 128 + 1e-3).all()
    assert (boxes[:, 3] > 96 + 1).any()
    assert pil.size == (128, 96) and pil.getexif()[EXIF_ORIENTATION] == 6  # the caller's image is untouched
