"""Own datasets: COCO / VOC / YOLO layout detection, VOC and YOLO -> COCO conversion against hand-written json,
counted bad input, classes from the data, --img-size rewriting, _base_ by name, `densedet data convert`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
from own_data_helpers import synth_as_voc, synth_as_yolo
from PIL import Image

from densedet.cli import main
from densedet.config import load_config
from densedet.config.own_data import parse_img_size
from densedet.data import CocoDataset, DataError, DataWarning
from densedet.data.formats import detect_layout, prepare_dataset, voc_to_coco, yolo_to_coco
from densedet.data.synth import make_synthetic_coco
from densedet.registry import ConfigError


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEDET_HOME", str(tmp_path / "home"))


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _xml(fname: str, w: int, h: int, objs: str) -> str:
    return (f"<annotation><filename>{fname}</filename><size><width>{w}</width><height>{h}</height></size>"
            f"{objs}</annotation>")


def _obj(name: str, box: tuple, difficult: int = 0, truncated: int = 0) -> str:
    return (f"<object><name>{name}</name><truncated>{truncated}</truncated><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox>"
            f"</object>")


def _voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    Image.new("RGB", (100, 80)).save(root / "JPEGImages" / "a.jpg")
    Image.new("RGB", (60, 40)).save(root / "JPEGImages" / "b.jpg")
    (root / "Annotations" / "a.xml").write_text(_xml("a.jpg", 100, 80, _obj("dog", (10, 20, 50, 60))
                                                     + _obj("cat", (0, 0, 30, 30), difficult=1)
                                                     + _obj("dog", (60, 10, 90, 70), truncated=1)))
    (root / "Annotations" / "b.xml").write_text(_xml("b.jpg", 60, 40, _obj("cat", (5, 5, 15, 25))))
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("b\n")
    return root


def test_voc_conversion_matches_hand_written_coco(tmp_path) -> None:
    root = _voc_root(tmp_path)
    coco = voc_to_coco(root, ["a"], classes=["cat", "dog"])
    # 1-based VOC corners -> 0-based (mmdet subtracts 1); (0, 0) is 1 px outside and clipped silently;
    # difficult -> ignore region (iscrowd 1) as mmdet's ignore_flag; truncated kept as a normal box
    assert coco == {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [9.0, 19.0, 40.0, 40.0], "area": 1600.0,
             "iscrowd": 0, "difficult": 0, "truncated": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 29.0, 29.0], "area": 841.0,
             "iscrowd": 1, "difficult": 1, "truncated": 0},
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [59.0, 9.0, 30.0, 60.0], "area": 1800.0,
             "iscrowd": 0, "difficult": 0, "truncated": 1},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    ds = prepare_dataset(root)
    assert ds.kind == "voc" and ds.classes == ["cat", "dog"]  # sorted object names
    train = CocoDataset(ds.splits["train"].ann_file, ds.splits["train"].img_dir)
    ann = train.get_ann_info(0)
    assert ann["boxes"].tolist() == [[9, 19, 49, 59], [59, 9, 89, 69]] and ann["labels"].tolist() == [1, 1]
    assert ann["ignore_boxes"].tolist() == [[0, 0, 29, 29]]


def _relayout(devkit: Path, out: Path, layout: str) -> Path:
    """The devkit root of :func:`_voc_root` re-laid out as labelling tools and dataset repositories write VOC."""
    src_ann, src_img = devkit / "Annotations", devkit / "JPEGImages"
    for stem, split in (("a", "train"), ("b", "val")):
        ann_dir, img_dir = {"lower": (out / "annotations", out / "images"), "flat": (out, out),
                            "roboflow": (out / split, out / split)}[layout]
        for d in (ann_dir, img_dir):
            d.mkdir(parents=True, exist_ok=True)
        (ann_dir / f"{stem}.xml").write_bytes((src_ann / f"{stem}.xml").read_bytes())
        (img_dir / f"{stem}.jpg").write_bytes((src_img / f"{stem}.jpg").read_bytes())
    if layout == "roboflow":
        (out / "val").rename(out / "valid")
    return out


@pytest.mark.parametrize("layout", ["lower", "flat", "roboflow"])
def test_voc_xml_layouts_of_labelling_tools(layout, tmp_path) -> None:
    # annotations/ + images/ (dataset repositories), XMLs beside images (labelImg), train/ + valid/ (Roboflow):
    # the same XMLs give the same boxes as the devkit layout
    devkit = _voc_root(tmp_path)
    root = _relayout(devkit, tmp_path / layout, layout)
    before = _snapshot(root)
    assert detect_layout(root) == "voc"
    ds = prepare_dataset(root)
    assert ds.kind == "voc" and ds.classes == ["cat", "dog"]
    expected = {"a": voc_to_coco(devkit, ["a"], ["cat", "dog"]), "b": voc_to_coco(devkit, ["b"], ["cat", "dog"])}
    seen = {}
    for split in ("train", "val"):
        coco = json.loads(ds.splits[split].ann_file.read_text())
        for img in coco["images"]:
            stem = Path(img["file_name"]).stem
            assert (ds.splits[split].img_dir / img["file_name"]).is_file()
            boxes = [(a["category_id"], a["bbox"], a["iscrowd"]) for a in coco["annotations"]
                     if a["image_id"] == img["id"]]
            seen[stem] = (split, boxes)
    for stem, ref in expected.items():
        assert seen[stem][1] == [(a["category_id"], a["bbox"], a["iscrowd"]) for a in ref["annotations"]]
    if layout == "roboflow":  # its split folders are the splits
        assert {k: v[0] for k, v in seen.items()} == {"a": "train", "b": "val"}
    else:  # one folder: the hold-out (every 5th image; 2 images -> both in train)
        assert set(seen) == {"a", "b"} and any("held out" in n for n in ds.notes)
    assert _snapshot(root) == before  # nothing written into the dataset


def test_folder_of_xml_without_images_is_not_a_layout(tmp_path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.xml").write_text(_xml("a.jpg", 10, 10, ""))
    with pytest.raises(DataError, match="XMLs beside their images"):
        detect_layout(tmp_path / "x")


def test_yolo_conversion_matches_hand_written_coco(tmp_path) -> None:
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(root / "images" / "train" / "x.png")
    # cx cy w h normalised: centre (0.5, 0.5) of 200x100 and size 0.2 x 0.4 -> x 80..120, y 30..70
    (root / "labels" / "train" / "x.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.2 0.1 0.2\n")
    coco = yolo_to_coco([root / "images" / "train"], ["a", "b"])
    assert coco["images"] == [{"id": 1, "file_name": "x.png", "width": 200, "height": 100}]
    got = [(a["category_id"], a["bbox"]) for a in coco["annotations"]]
    assert got == [(2, [80.0, 30.0, 40.0, 40.0]), (1, [10.0, 10.0, 20.0, 20.0])]


def test_layout_detection(tmp_path) -> None:
    coco = make_synthetic_coco(tmp_path / "c", num_train=2, num_val=1, size=64)["root"]
    assert detect_layout(coco) == "coco"
    assert detect_layout(synth_as_voc(tmp_path / "v", 2, 1, 64)) == "voc"
    assert detect_layout(synth_as_yolo(tmp_path / "y", 2, 1, 64)) == "yolo"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="Pascal VOC: Annotations"):
        detect_layout(tmp_path / "empty")
    ds = prepare_dataset(coco)
    assert ds.splits["train"].img_dir == Path(coco).resolve() / "train"


def test_yolo_bad_input_is_counted_or_named(tmp_path) -> None:
    root = tmp_path / "yolo"
    for s in ("train", "val"):
        (root / "images" / s).mkdir(parents=True)
        (root / "labels" / s).mkdir(parents=True)
    for n in ("a", "b", "c"):
        Image.new("RGB", (100, 100)).save(root / "images" / "train" / f"{n}.png")
    Image.new("RGB", (100, 100)).save(root / "images" / "val" / "v.png")
    (root / "labels" / "train" / "a.txt").write_text("0 0.95 0.5 0.2 0.2\n0 1.5 1.5 0.1 0.1\n")  # clipped, outside
    (root / "labels" / "train" / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # c.png: no label file
    (root / "labels" / "val" / "v.txt").write_text("")
    (root / "data.yaml").write_text("names: [thing]\n")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = prepare_dataset(root)
    msgs = sorted(str(w.message) for w in rec if issubclass(w.category, DataWarning))
    assert any(m.startswith("clipped 1 boxes") and "a.txt:1" in m for m in msgs)
    assert any(m.startswith("skipped 1 boxes entirely outside") and "a.txt:2" in m for m in msgs)
    assert any(m.startswith("kept as background 1 images without a label file") and "c.txt" in m for m in msgs)
    train = json.loads(ds.splits["train"].ann_file.read_text())
    assert len(train["images"]) == 3 and [a["bbox"] for a in train["annotations"]] == [[85.0, 40.0, 15.0, 20.0],
                                                                                        [40.0, 40.0, 20.0, 20.0]]
    (root / "labels" / "train" / "b.txt").write_text("0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"b\.txt:2: class id 3 is out of range: data.yaml names 1 classes"):
        prepare_dataset(root)
    (root / "labels" / "train" / "b.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(DataError, match=r"b\.txt:1: expected 'class cx cy w h'"):
        prepare_dataset(root)


def test_voc_bad_input_is_counted(tmp_path) -> None:
    root = _voc_root(tmp_path)
    (root / "Annotations" / "c.xml").write_text("<annotation><object>")  # truncated XML
    (root / "Annotations" / "d.xml").write_text(_xml("d.jpg", 10, 10, _obj("cat", (1, 1, 5, 5))))  # no image
    (root / "Annotations" / "e.xml").write_text(_xml("e.jpg", 60, 40, _obj("cat", (50, 30, 70, 50))
                                                     + _obj("cat", (70, 50, 80, 60))))
    Image.new("RGB", (60, 40)).save(root / "JPEGImages" / "e.jpg")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nc\nd\ne\nf\n")
    before = _snapshot(root)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = prepare_dataset(root)
    msgs = [str(w.message) for w in rec if issubclass(w.category, DataWarning)]
    assert any(m.startswith("skipped 1 images whose annotation XML cannot be parsed") and "c.xml" in m for m in msgs)
    assert any(m.startswith("skipped 1 annotations whose image file is missing") and "d.xml" in m for m in msgs)
    assert any(m.startswith("skipped 1 images listed in ImageSets without an annotation XML") for m in msgs)
    assert any(m.startswith("clipped 1 boxes") for m in msgs)
    assert any(m.startswith("skipped 1 boxes entirely outside") for m in msgs)
    train = json.loads(ds.splits["train"].ann_file.read_text())
    assert [i["file_name"] for i in train["images"]] == ["a.jpg", "e.jpg"]
    want = {"unreadable_xml": 1, "missing_image": 1, "missing_xml": 1, "clipped": 1, "outside": 1}
    assert ds.problems == want
    with warnings.catch_warnings(record=True) as again:  # the cached conversion still reports them
        warnings.simplefilter("always")
        assert prepare_dataset(root).problems == want
    assert sorted(str(w.message) for w in again) == sorted(msgs)
    assert _snapshot(root) == before  # nothing written into the dataset
    with pytest.raises(DataError, match="must not be written inside the dataset"):
        prepare_dataset(root, out_dir=root / "json")


def test_classes_from_data_and_mismatch_error(tmp_path) -> None:
    voc = synth_as_voc(tmp_path / "v", 2, 1, 64)
    cfg = load_config("vfnet_r50_fpn_1x_coco", data=voc)  # built-in 80 classes -> the data's 3
    assert cfg.model["bbox_head"]["num_classes"] == 3
    assert Path(cfg.data.train.ann_file).is_file() and cfg.data.test.img_dir == cfg.data.val.img_dir
    user = tmp_path / "mine.yaml"
    user.write_text("_base_: atss_r18_fpn_synth\nmodel: {bbox_head: {num_classes: 5}}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: model\.bbox_head\.num_classes is 5 but the dataset .* has "
                                          r"3 classes \['circle', 'square', 'triangle'\]"):
        load_config(user, data=voc)
    with pytest.raises(ConfigError, match="command-line override: model.bbox_head.num_classes is 7"):
        load_config("atss_r18_fpn_synth", ["model.bbox_head.num_classes=7"], data=voc)
    assert load_config(user, ["model.bbox_head.num_classes=3"], data=voc).model["bbox_head"]["num_classes"] == 3


def test_base_may_name_a_builtin_config(tmp_path) -> None:
    user = tmp_path / "mine.yaml"
    user.write_text("_base_: vfnet_r50_fpn_1x_coco\noptimizer: {lr: 0.005}\n")
    cfg = load_config(user)
    ref = load_config("vfnet_r50_fpn_1x_coco")
    assert cfg.optimizer.lr == 0.005 and cfg.model == ref.model
    user.write_text("_base_: [_base_/models/atss_r50_fpn.yaml, nope_config]\n")
    with pytest.raises(ConfigError, match="_base_ 'nope_config' is neither a file"):
        load_config(user)


def test_img_size_rewrites_every_scale() -> None:
    assert parse_img_size("640") == (640, 640) and parse_img_size("800x600") == (800, 600)
    with pytest.raises(ConfigError, match="N or WxH"):
        parse_img_size("big")
    # mstrain: 1333x[480:960] train, 1333x800 test -> factors 640/1333 (long) and 640/800 (short)
    cfg = load_config("vfnet_r50_fpn_mstrain_2x_coco", img_size=640)
    assert cfg.data.train.pipeline[0]["img_scale"] == [[640, 384], [640, 768]]
    assert cfg.data.val.pipeline[0]["img_scale"] == [640, 640]
    # TTA scales (val and test) rescale with the train scale 1333x800 as reference
    cfg = load_config("vfnet_r50_fpn_1x_coco_tta", img_size="1000x400")
    want = [[round(w * 1000 / 1333), round(h * 400 / 800)] for w, h in [[1200, 800], [1300, 900], [1500, 1000],
                                                                         [1600, 1200]]]
    assert cfg.data.val.pipeline[0]["img_scale"] == want and cfg.data.test.pipeline[0]["img_scale"] == want
    assert cfg.data.train.pipeline[0]["img_scale"] == [1000, 400]


def test_data_convert_cli(tmp_path, capsys) -> None:
    voc = synth_as_voc(tmp_path / "v", 3, 2, 64)
    before = _snapshot(voc)
    assert main(["data", "convert", "--from", "voc", str(voc), "--out", str(tmp_path / "out")]) == 0
    train = json.loads((tmp_path / "out" / "instances_train.json").read_text())
    assert len(train["images"]) == 3 and train["categories"][0] == {"id": 1, "name": "circle"}
    assert _snapshot(voc) == before
    assert main(["data", "convert", "--from", "yolo", str(voc), "--out", str(tmp_path / "o2")]) == 3  # a data error
    assert "expected a YOLO layout, found a VOC one" in capsys.readouterr().err


def test_newcomer_walk_voc_then_yolo(tmp_path, capsys) -> None:
    """docs/own_data.md on tiny generated VOC and YOLO sets: check, train, test (COCO metrics), predict (drawn
    boxes), then fine-tune the VOC model on the YOLO set with load_from; the datasets are never written to."""
    voc = synth_as_voc(tmp_path / "voc", num_train=4, num_val=2, size=64)
    yolo = synth_as_yolo(tmp_path / "yolo", num_train=4, num_val=2, size=64, seed=1)
    before = {r: _snapshot(r) for r in (voc, yolo)}
    common = ["--img-size", "64", "schedule.epochs=1", "data.samples_per_gpu=2", "data.workers_per_gpu=0",
              "runtime.log_interval=1"]
    assert main(["data", "check", str(voc), "--config", "atss_r18_fpn_synth", "--img-size", "64",
                 "--out", str(tmp_path / "check.png")]) == 0
    assert "assignment by ATSSHead on 4 training images at scale 64x64" in capsys.readouterr().out
    wd = tmp_path / "wd_voc"
    assert main(["train", "atss_r18_fpn_synth", "--data", str(voc), "--work-dir", str(wd)] + common) == 0
    assert (wd / "epoch_1.pth").is_file()
    assert main(["test", "atss_r18_fpn_synth", str(wd), "--data", str(voc), "--img-size", "64",
                 "--out", str(tmp_path / "test")]) == 0
    metrics = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert {"bbox_mAP", "bbox_mAP_50"} <= set(metrics) and 0.0 <= metrics["bbox_mAP_50"] <= 1.0
    assert main(["predict", "atss_r18_fpn_synth", str(wd), str(voc / "JPEGImages"), "--data", str(voc),
                 "--img-size", "64", "--out", str(tmp_path / "pred"), "--limit", "2"]) == 0
    assert len(list((tmp_path / "pred").glob("*.png"))) == 3  # 2 drawn images + grid.png
    wd2 = tmp_path / "wd_yolo"
    assert main(["train", "atss_r18_fpn_synth", "--data", str(yolo), "--work-dir", str(wd2),
                 f"runtime.load_from={wd / 'epoch_1.pth'}", "optimizer.lr=0.0005"] + common) == 0
    assert "loaded initial weights" in (wd2 / "train.log").read_text()
    assert {r: _snapshot(r) for r in (voc, yolo)} == before


def test_yolo_roboflow_layout(tmp_path) -> None:
    """Roboflow's export: train/images + train/labels, valid/..., data.yaml with '../train/images' paths."""
    root = tmp_path / "rf"
    for split, n in (("train", 2), ("valid", 1)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (50, 50)).save(root / split / "images" / f"{split}{i}.jpg")
            (root / split / "labels" / f"{split}{i}.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['cell']\n")
    assert detect_layout(root) == "yolo"
    ds = prepare_dataset(root)
    assert ds.classes == ["cell"] and ds.splits["train"].img_dir == root.resolve()
    val = json.loads(ds.splits["val"].ann_file.read_text())
    assert val["images"][0]["file_name"] == "valid/images/valid0.jpg"
    assert val["annotations"][0]["bbox"] == [12.5, 12.5, 25.0, 25.0]


def test_voc_and_yolo_routes_train_like_the_coco_route(tmp_path) -> None:
    """The same images and boxes reached through COCO json, Pascal VOC XML or YOLO labels give the same training
    losses (VOC: identical; YOLO: its 6-decimal normalised coordinates shift boxes by < 1e-4 px)."""
    from densedet.engine import train

    coco = make_synthetic_coco(tmp_path / "coco", num_train=4, num_val=2, size=64, seed=3)["root"]
    voc = synth_as_voc(tmp_path / "voc", num_train=4, num_val=2, size=64, seed=3)
    yolo = synth_as_yolo(tmp_path / "yolo", num_train=4, num_val=2, size=64, seed=3)
    losses = {}
    for name, root in (("coco", coco), ("voc", voc), ("yolo", yolo)):
        overrides = ["schedule.epochs=1", "data.samples_per_gpu=2", "runtime.val_interval=0",
                     "runtime.log_interval=1", "data.workers_per_gpu=0"]
        cfg = load_config("atss_r18_fpn_synth", overrides, data=root, img_size=64)
        train(cfg, tmp_path / f"wd_{name}")
        lines = [json.loads(ln) for ln in (tmp_path / f"wd_{name}" / "log.jsonl").read_text().splitlines()]
        losses[name] = [ln["loss"] for ln in lines if "loss" in ln]
    assert len(losses["coco"]) == 2
    assert losses["voc"] == losses["coco"]
    assert losses["yolo"] == pytest.approx(losses["coco"], rel=1e-4)


@pytest.fixture
def opened_images(monkeypatch) -> list[str]:
    """Every path the converters open with PIL (their only way to read an image)."""
    import densedet.data.formats.common as common

    seen: list[str] = []
    real_open = common.Image.open

    def spy(fp, *args, **kwargs):
        seen.append(os.path.realpath(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(common.Image, "open", spy)
    return seen


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_voc_filename_outside_the_dataset_is_refused_before_it_is_opened(kind, tmp_path, opened_images,
                                                                         capsys) -> None:
    """Issue 18 item 3: a VOC <filename> leading outside JPEGImages (``..``, absolute, a symlink) is a data error
    naming the XML (exit 3), and the file it names is never opened, even when the XML gives no <size>."""
    root = _voc_root(tmp_path)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (30, 20)).save(outside)
    name = {"dotdot": "../../outside.png", "absolute": str(outside), "symlink": "c.png"}[kind]
    if kind == "symlink":
        (root / "JPEGImages" / "c.png").symlink_to(outside)
    # no <size>: the converter would read the image header for it
    (root / "Annotations" / "c.xml").write_text(f"<annotation><filename>{name}</filename>"
                                                f"{_obj('cat', (1, 1, 5, 5))}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nc\n")
    why = {"dotdot": "goes up with '..'", "absolute": "is an absolute path", "symlink": "resolves to"}[kind]
    with pytest.raises(DataError, match=rf"c\.xml: <filename> '{re.escape(name)}' {why}"):
        prepare_dataset(root)
    assert str(outside) not in opened_images
    assert main(["data", "convert", "--from", "voc", str(root), "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("densedet: data error: ") and "c.xml" in err and len(err.splitlines()) == 1
    assert str(outside) not in opened_images


def test_voc_ids_and_xml_files_outside_are_refused(tmp_path) -> None:
    root = _voc_root(tmp_path)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\n../../secret\n")
    with pytest.raises(DataError, match=r"train\.txt:2: image id '\.\./\.\./secret' goes up with '\.\.'"):
        prepare_dataset(root)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nlinked\n")
    elsewhere = tmp_path / "elsewhere.xml"
    elsewhere.write_text(_xml("a.jpg", 100, 80, _obj("dog", (1, 1, 9, 9))))
    (root / "Annotations" / "linked.xml").symlink_to(elsewhere)
    with pytest.raises(DataError, match=r"linked\.xml: the annotation file resolves to .*elsewhere\.xml"):
        prepare_dataset(root)


@pytest.mark.parametrize("line", ["nan 0.5 0.5 0.2 0.2", "0 nan 0.5 0.2 0.2", "0 0.5 0.5 inf 0.2",
                                  "0 0.1 0.1 0.5 -inf 0.9 0.9"])
def test_yolo_non_finite_field_names_the_label_line(line, tmp_path) -> None:
    """Issue 18 item 3: NaN / inf in any YOLO field (class id included) is a data error naming file:line, not a
    traceback (class id) nor a box that passes every comparison (coordinates)."""
    root = synth_as_yolo(tmp_path / "y", 2, 1, 64)
    label = sorted((root / "labels" / "train").glob("*.txt"))[1]
    label.write_text(label.read_text().rstrip("\n") + f"\n{line}\n")
    n = len(label.read_text().splitlines())
    with pytest.raises(DataError, match=rf"labels/train/{label.name}:{n}: NaN or infinite number"):
        prepare_dataset(root)


def test_yolo_symlinked_image_or_label_outside_is_refused_unopened(tmp_path, opened_images) -> None:
    root = synth_as_yolo(tmp_path / "y", 2, 1, 64)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (30, 20)).save(outside)
    (root / "images" / "train" / "zz.png").symlink_to(outside)
    with pytest.raises(DataError, match=r"zz\.png: the image resolves to .*outside\.png"):
        prepare_dataset(root)
    assert str(outside) not in opened_images
    (root / "images" / "train" / "zz.png").unlink()
    secret = tmp_path / "secret.txt"
    secret.write_text("0 0.5 0.5 0.1 0.1\n")
    label = sorted((root / "labels" / "train").glob("*.txt"))[0]
    label.unlink()
    label.symlink_to(secret)
    with pytest.raises(DataError, match=rf"{label.name}: the label file resolves to .*secret\.txt"):
        prepare_dataset(root)


def test_data_yaml_leading_outside_is_followed_logged_and_warned(tmp_path, caplog) -> None:
    """data.yaml's path: pointing outside the --data folder is followed (Ultralytics), the folders read are logged,
    and the folder's own images, unused, are warned about."""
    other = synth_as_yolo(tmp_path / "other", 3, 1, 64, seed=2)
    given = synth_as_yolo(tmp_path / "given", 2, 1, 64)
    names = (given / "data.yaml").read_text().split("names:")[1]
    (given / "data.yaml").write_text(f"path: ../other\ntrain: images/train\nval: images/val\nnames:{names}")
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.WARNING, logger="densedet"):
        warnings.simplefilter("always")
        ds = prepare_dataset(given)
    train = json.loads(ds.splits["train"].ann_file.read_text())
    assert len(train["images"]) == 3 and ds.splits["train"].img_dir == other.resolve() / "images"
    logs = [r.getMessage() for r in caplog.records]
    for split in ("train", "val"):
        assert any(f"reading the {split} images from {other.resolve() / 'images' / split}" in m for m in logs), logs
    msgs = [str(w.message) for w in rec if issubclass(w.category, DataWarning)]
    assert any(m.startswith(f"{given.resolve()} holds images that are not used (e.g. images/train/") for m in msgs)
    # the same outside folders from a yaml in a folder without images of its own: logged, no warning
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "data.yaml").write_text(f"path: {other}\ntrain: images/train\nval: images/val\nnames:{names}")
    caplog.clear()
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.WARNING, logger="densedet"):
        warnings.simplefilter("always")
        prepare_dataset(bare)
    assert not [w for w in rec if issubclass(w.category, DataWarning)]
    assert any("reading the train images from" in r.getMessage() for r in caplog.records)


def test_mask_model_on_box_only_data_says_why(tmp_path) -> None:
    # every VOC annotation lacks a mask: the error names that, not "boxes all invalid"
    ds = prepare_dataset(synth_as_voc(tmp_path / "v", 3, 1, 64))
    split = ds.splits["train"]
    with pytest.warns(DataWarning, match="no segmentation"), pytest.raises(DataError) as err:
        CocoDataset(split.ann_file, split.img_dir, with_mask=True)
    assert "needs an instance mask" in str(err.value) and "no segmentation" in str(err.value)
    assert "filter_empty_gt" not in str(err.value)
    assert len(CocoDataset(split.ann_file, split.img_dir)) == 3  # the boxes themselves are fine
