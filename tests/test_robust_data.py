"""The dataset never reads a file outside its image folder, says why a training set is empty, and decodes
16-bit images by scaling (issue 9, items 7, 8 and 11)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densedet.data import CocoDataset, DataError
from densedet.data.image_io import decode_image


def _dataset(root: Path, file_names: list[str], anns: list[dict] | None = None) -> tuple[Path, Path]:
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "images": [{"id": i + 1, "file_name": f, "width": 32, "height": 24} for i, f in enumerate(file_names)],
        "annotations": anns if anns is not None else [
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}
            for i in range(len(file_names))],
        "categories": [{"id": 1, "name": "a"}],
    }
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, img_dir


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path PIL is asked to open (the only way the dataset reads image files)."""
    paths: list[str] = []
    real_open = Image.open

    def spy(fp, *args, **kwargs):
        paths.append(os.fspath(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    return paths


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "symlinked_folder"])
def test_file_outside_img_dir_is_rejected_before_anything_is_opened(tmp_path, opened, case) -> None:
    outside = tmp_path / "outside.png"
    Image.new("RGB", (32, 24)).save(outside)
    root = tmp_path / "ds"
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    Image.new("RGB", (32, 24)).save(img_dir / "ok.png")
    bad = {"dotdot": "../../outside.png", "absolute": str(outside), "symlink": "sub/link.png",
           "symlinked_folder": "ext/outside.png"}[case]
    if case == "symlink":
        (img_dir / "sub").mkdir()
        (img_dir / "sub" / "link.png").symlink_to(outside)
    if case == "symlinked_folder":
        (img_dir / "ext").symlink_to(tmp_path, target_is_directory=True)
    ann_file, img_dir = _dataset(root, ["ok.png", bad])
    why = {"dotdot": "goes up with '..'", "absolute": "is an absolute path", "symlink": "is a symlink to",
           "symlinked_folder": f"is a symlink to {outside}"}[case]
    with pytest.raises(DataError, match=rf"image id 2: file_name '{bad}' {why}"):
        CocoDataset(ann_file, img_dir)
    with pytest.raises(DataError, match="image id 2"):  # evaluation datasets are checked the same way
        CocoDataset(ann_file, img_dir, test_mode=True)
    assert opened == []  # not the outside file, not even the good one: checked at load, before any image


def test_etc_passwd_is_never_opened(tmp_path, opened) -> None:
    ann_file, img_dir = _dataset(tmp_path, ["../../../../etc/passwd"])
    with pytest.raises(DataError, match="goes up with"):
        CocoDataset(ann_file, img_dir)
    assert opened == []


def test_symlinks_and_subfolders_inside_img_dir_are_fine(tmp_path) -> None:
    ann_file, img_dir = _dataset(tmp_path, ["a/x.png", "y.png"])
    (img_dir / "a").mkdir()
    Image.new("RGB", (32, 24), (10, 20, 30)).save(img_dir / "a" / "x.png")
    (img_dir / "y.png").symlink_to(img_dir / "a" / "x.png")  # a symlink that stays inside
    ds = CocoDataset(ann_file, img_dir)
    assert ds[1]["img"].shape == (3, 24, 32)


def test_empty_training_set_says_how_many_images_were_dropped_and_why(tmp_path) -> None:
    anns = [  # image 1: none; 2: only crowd; 3 and 4: only degenerate / outside boxes
        {"id": 1, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 1},
        {"id": 2, "image_id": 3, "category_id": 1, "bbox": [1, 1, 0, 5], "iscrowd": 0},
        {"id": 3, "image_id": 4, "category_id": 1, "bbox": [100, 100, 5, 5], "iscrowd": 0},
    ]
    ann_file, img_dir = _dataset(tmp_path, ["1.png", "2.png", "3.png", "4.png"], anns)
    with pytest.warns(UserWarning), pytest.raises(DataError) as e:
        CocoDataset(ann_file, img_dir)
    msg = str(e.value)
    assert "training set is empty after filtering: all 4 images were dropped" in msg
    assert "1 without annotations" in msg and "1 with only crowd" in msg and "2 whose boxes are all invalid" in msg
    assert "\n" not in msg
    with pytest.warns(UserWarning):
        assert len(CocoDataset(ann_file, img_dir, test_mode=True)) == 4  # evaluation keeps every image


def _png_rgb16(path: Path, rgb: np.ndarray) -> None:
    """Write a 48-bit (16 bits per channel) RGB PNG by hand: PIL cannot write one."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def test_16bit_png_is_scaled_not_clipped(tmp_path) -> None:
    grey = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # really a 16-bit file
    img = decode_image(tmp_path / "g16.png")
    expected = np.rint(grey / 257.0).astype(np.uint8)  # 65535 -> 255, 32896 -> 128: scaled by 255/65535
    assert img.dtype == np.uint8 and img.shape == (2, 4, 3)
    np.testing.assert_array_equal(img, np.repeat(expected[:, :, None], 3, axis=2))
    rgb = np.stack([grey, grey[::-1], 65535 - grey], axis=2)
    _png_rgb16(tmp_path / "c16.png", rgb)
    np.testing.assert_allclose(decode_image(tmp_path / "c16.png").astype(int), rgb / 257.0, atol=1)


def test_16bit_png_same_pixels_in_dataset_and_predictor(tmp_path) -> None:
    from densedet.inference.predictor import read_image

    ann_file, img_dir = _dataset(tmp_path, ["g16.png"])
    grey = (np.arange(24 * 32).reshape(24, 32) * 85).astype(np.uint16)
    Image.fromarray(grey).save(img_dir / "g16.png")
    ds = CocoDataset(ann_file, img_dir)
    via_dataset = ds.load_image(0)
    np.testing.assert_array_equal(via_dataset[:, :, 0], np.rint(grey / 257.0).astype(np.uint8))
    assert via_dataset.max() > 200  # clipping would have made it almost all 255 and the gradient lost
    np.testing.assert_array_equal(read_image(img_dir / "g16.png"), via_dataset)
    np.testing.assert_array_equal(read_image(Image.open(img_dir / "g16.png")), via_dataset)
