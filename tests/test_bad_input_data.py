"""Bad dataset input fails loudly (or is skipped with a counted warning), naming the file and the item."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densedet.data import CocoDataset, DataError, DataWarning, build_pipeline
from densedet.registry import ConfigError


def _write(root: Path, anns: list[dict], images=((1, 32, 24), (2, 32, 24)), cats=((1, "a"), (2, "b"))) -> tuple:
    img_dir = root / "images"
    img_dir.mkdir(exist_ok=True)
    for i, w, h in images:
        Image.new("RGB", (w, h), (100, 150, 200)).save(img_dir / f"{i}.png")
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, w, h in images],
        "annotations": [{"iscrowd": 0, **a} for a in anns],
        "categories": [{"id": c, "name": n} for c, n in cats],
    }
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, img_dir


def _ann(ann_id: int, bbox, image_id: int = 1, cat: int = 1) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox}


def test_missing_image_names_path_and_id(tmp_path):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(2, [1, 1, 5, 5], image_id=2)])
    (img_dir / "2.png").unlink()
    ds = CocoDataset(ann_file, img_dir)
    ds[0]  # the other image still loads
    with pytest.raises(DataError, match=r"not found: .*2\.png \(image id 2"):
        ds[1]


def test_corrupt_image_names_path(tmp_path):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(2, [1, 1, 5, 5], image_id=2)])
    (img_dir / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (img_dir / "1.png").write_bytes((img_dir / "1.png").read_bytes()[:60])  # truncated PNG
    ds = CocoDataset(ann_file, img_dir)
    for i, name in ((1, "2.png"), (0, "1.png")):
        with pytest.raises(DataError, match=rf"cannot decode image .*{re.escape(name)}"):
            ds[i]


def test_stale_image_size_in_json_is_a_counted_warning_using_the_real_size(tmp_path):
    # json says 32x24 (w x h) for both; the real files are 40x30 and 24x32. Boxes fit both real images.
    ann_file, img_dir = _write(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(2, [2, 2, 4, 4], image_id=2)])
    Image.new("RGB", (40, 30)).save(img_dir / "1.png")
    Image.new("RGB", (24, 32)).save(img_dir / "2.png")
    ds = CocoDataset(ann_file, img_dir)
    with pytest.warns(DataWarning, match=r"1\.png \(image id 1\) is 40x30 .* says 32x24; using the real size "
                                         r"\(1 image with a stale size"):
        item = ds[0]
    assert item["img"].shape[1:] == (30, 40) and item["meta"]["ori_shape"] == (30, 40)
    with pytest.warns(DataWarning, match=r"\(2 images with a stale size"):
        assert ds[1]["img"].shape[1:] == (32, 24)
    assert ds.stale_size_count == 2


def test_stale_image_size_with_boxes_outside_the_real_image_is_an_error(tmp_path):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [20, 1, 10, 5])], images=[(1, 32, 24)])
    Image.new("RGB", (24, 32)).save(img_dir / "1.png")  # box reaches x=30 > real width 24
    with pytest.raises(DataError, match=r"1\.png \(image id 1\) is 24x32 .* says 32x24 .* reach x=30"):
        CocoDataset(ann_file, img_dir)[0]


def test_zero_and_negative_size_boxes_are_counted(tmp_path):
    anns = [
        _ann(1, [1, 1, 5, 5]),
        _ann(5, [1, 1, 0, 5]),
        _ann(9, [3, 3, 4, -2]),
        _ann(11, [3, 3, 1e-4, 4]),
        _ann(12, [2, 2, 0.5, 0.5]),  # tiny but valid (> 1e-3): kept
    ]
    ann_file, img_dir = _write(tmp_path, anns)
    with pytest.warns(DataWarning) as record:
        ds = CocoDataset(ann_file, img_dir)
    messages = [str(r.message) for r in record]
    assert len(messages) == 1
    assert re.search(r"skipped 3 annotations with non-positive width/height", messages[0])
    assert str(ann_file) in messages[0] and "ids 5, 9, 11" in messages[0]
    assert ds.skipped_counts["degenerate"] == 3 and ds.skipped_counts["outside"] == 0
    assert ds.get_ann_info(0)["ann_ids"].tolist() == [1, 12]


def test_boxes_outside_image_are_skipped_or_clipped(tmp_path):
    anns = [
        _ann(1, [40, 1, 5, 5]),  # right of a 32 px wide image
        _ann(2, [-10, -10, 5, 5]),  # above-left
        _ann(3, [32, 0, 4, 4]),  # touches the right border only
        _ann(4, [-4, 2, 10, 30]),  # partly outside: clipped to (0, 2, 6, 24)
        _ann(6, [30, 20, 10, 10]),  # partly outside: clipped to (30, 20, 32, 24)
        _ann(7, [2, 2, 4, 4]),
    ]
    ann_file, img_dir = _write(tmp_path, anns)
    with pytest.warns(DataWarning) as record:
        ds = CocoDataset(ann_file, img_dir)
    text = "\n".join(str(r.message) for r in record)
    assert len(record) == 2
    assert re.search(r"skipped 3 annotations with boxes entirely outside .* \(ids 1, 2, 3\)", text)
    assert re.search(r"clipped 2 annotations with boxes partly outside .* \(ids 4, 6\)", text)
    assert text.count(str(ann_file)) == 2
    assert ds.skipped_counts == {"degenerate": 0, "outside": 3, "clipped": 2, "unselected_category": 0}
    np.testing.assert_array_equal(ds.get_ann_info(0)["boxes"], [[0, 2, 6, 24], [30, 20, 32, 24], [2, 2, 6, 6]])


def test_unknown_category_names_file_annotation_and_image(tmp_path):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(17, [1, 1, 5, 5], image_id=2, cat=7)])
    with pytest.raises(DataError) as err:
        CocoDataset(ann_file, img_dir)
    msg = str(err.value)
    assert str(ann_file) in msg and "annotation id 17" in msg and "image id 2" in msg
    assert "unknown category id 7" in msg and "[1, 2]" in msg


def test_nan_and_inf_boxes(tmp_path):
    for ann_id, bbox in ((3, [1, float("nan"), 5, 5]), (4, [1, 1, float("inf"), 5])):
        ann_file, img_dir = _write(tmp_path, [_ann(1, [1, 1, 5, 5]), _ann(ann_id, bbox, image_id=2)])
        with pytest.raises(DataError, match=rf"{re.escape(str(ann_file))}: annotation id {ann_id} \(image id 2\).*NaN"):
            CocoDataset(ann_file, img_dir)


def test_malformed_annotations(tmp_path):
    cases = [
        (_ann(8, [1, 1, 5]), r"annotation id 8 \(image id 1\): bbox must be \[x, y, w, h\]"),
        (_ann(8, [1, 1, "5", 5]), r"annotation id 8 \(image id 1\): bbox must hold 4 numbers"),
        (_ann(8, [1, 1, 5, 5], image_id=99), r"annotation id 8 \(image id 99\): image id 99 is not in 'images'"),
        ({"id": 8, "image_id": 1, "category_id": 1}, r"annotation id 8 lacks \['bbox'\]"),
    ]
    for ann, pattern in cases:
        ann_file, img_dir = _write(tmp_path, [_ann(1, [1, 1, 5, 5]), ann])
        with pytest.raises(DataError, match=rf"{re.escape(str(ann_file))}: {pattern}"):
            CocoDataset(ann_file, img_dir)


def test_empty_truncated_missing_json(tmp_path):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [1, 1, 5, 5])])
    good = ann_file.read_text()

    ann_file.write_text("")
    with pytest.raises(DataError, match=rf"annotation file {re.escape(str(ann_file))} is empty"):
        CocoDataset(ann_file, img_dir)

    ann_file.write_text(good[: len(good) // 2])
    with pytest.raises(DataError, match=rf"{re.escape(str(ann_file))} is not valid JSON \(truncated"):
        CocoDataset(ann_file, img_dir)

    data = json.loads(good)
    del data["categories"]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"{re.escape(str(ann_file))} lacks the top-level key\(s\) \['categories'\]"):
        CocoDataset(ann_file, img_dir)

    ann_file.write_text("[1, 2]")
    with pytest.raises(DataError, match="expected a JSON object"):
        CocoDataset(ann_file, img_dir)

    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match=rf"annotation file not found: {re.escape(str(missing))}"):
        CocoDataset(missing, img_dir)


def test_missing_image_dir_and_bad_entries(tmp_path):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [1, 1, 5, 5])])
    with pytest.raises(DataError, match=rf"image folder not found: .*nowhere \(images of {re.escape(str(ann_file))}"):
        CocoDataset(ann_file, tmp_path / "nowhere")

    data = json.loads(ann_file.read_text())
    data["images"].append({"id": 1, "file_name": "dup.png", "width": 4, "height": 4})
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"image id 1 appears twice"):
        CocoDataset(ann_file, img_dir)

    data["images"][-1] = {"id": 3, "file_name": "x.png", "width": 0, "height": 4}
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"image id 3 \(x\.png\) has invalid size 0 x 4"):
        CocoDataset(ann_file, img_dir)

    data["images"][-1] = {"id": 3, "file_name": "x.png"}
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[2\] needs 'id', 'file_name', 'width' and 'height'"):
        CocoDataset(ann_file, img_dir)


def test_unknown_class_name_and_bad_pipeline(tmp_path):
    ann_file, img_dir = _write(tmp_path, [_ann(1, [1, 1, 5, 5])])
    with pytest.raises(DataError, match=r"classes \['zebra'\] are not among its categories \['a', 'b'\]"):
        CocoDataset(ann_file, img_dir, classes=["a", "zebra"])
    with pytest.raises(ConfigError, match=r"pipeline of instances\.json\[0\].*unknown transform type 'Flip'"):
        CocoDataset(ann_file, img_dir, pipeline=[{"type": "Flip"}])
    with pytest.raises(ConfigError, match="must be a list"):
        build_pipeline({"type": "Resize"})
