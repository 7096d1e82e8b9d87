"""The compact annotation store (issue 20) and the one validated view shared by training and evaluation (issue 18):
items equal a plain per-annotation reference loader bit for bit, both json parsers give the same store, the store
holds no per-image Python object, compressed RLE strings are validated without decoding pixels, bad segmentations
are skipped for the loader and the evaluator alike, and nothing unbounded reaches the rasteriser."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from faster_coco_eval.core import mask as coco_mask
from PIL import Image
from rle_reference import uncompressed_rle

from densedet.data import CocoDataset, DataWarning, make_synthetic_coco
from densedet.data import annotation_store as store_module
from densedet.data.annotation_store import FLAG_BOX_FROM_MASK, load_annotation_store
from densedet.evaluation import evaluate_coco
from densedet.structures.masks import BitmapCrop, InstanceMasks, MaskFormatError, PolygonMask, decode_segmentation
from densedet.structures.rle_codec import rle_string_counts, valid_rle_strings


def write_every_kind(root: Path) -> tuple[Path, Path]:
    """Five images: multi-part polygons (one with vertices at x.9, where float32 would round differently),
    a polygon crossing the border (box clipped), compressed RLE, uncompressed RLE (crowd and not), a polygon crowd,
    an ``ignore`` flag, a degenerate and an outside box, an image with only crowd, an empty image, one with a
    category left out by ``classes``, non-contiguous image and annotation ids."""
    img_dir = root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = {1: (48, 64), 2: (40, 50), 3: (32, 32), 4: (36, 60), 5: (50, 40)}
    for i, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
    anns: list[dict] = []

    def add(img: int, cat: int, bbox: list, segm: Any, **kw: Any) -> None:
        anns.append({"id": len(anns) * 3 + 7, "image_id": img * 10, "category_id": cat, "bbox": bbox,
                     "segmentation": segm, **kw})

    add(1, 1, [2.5, 3.25, 20.1, 12.9], [[2.5, 3.25, 22.6, 3.25, 22.6, 10.0],
                                        [5.1, 10.2, 12.3, 16.15, 4.9, 16.15, 3.3, 12.0]], area=150.25)
    add(1, 3, [50.3, 30.7, 20, 20], [[50.3, 30.7, 70.3, 30.7, 70.3, 50.7, 50.3, 50.7]])
    full = np.zeros((48, 64), np.uint8)
    full[10:20, 30:45] = 1
    full[12, 46] = 1
    enc = coco_mask.encode(np.asfortranarray(full))
    add(1, 2, [30, 10, 17, 10], {"size": [48, 64], "counts": enc["counts"].decode()})
    crowd = np.zeros((48, 64), np.uint8)
    crowd[30:40, 5:25] = 1
    add(1, 1, [5, 30, 20, 10], uncompressed_rle(crowd), iscrowd=1, area=200)
    add(1, 2, [10, 10, 5, 5], [[10, 10, 15, 10, 15, 15]], ignore=1)
    add(2, 1, [1, 1, 10, 10], [[1, 1, 11, 1, 11, 11, 1, 11]], iscrowd=1)
    add(2, 2, [5, 5, 0, 5], [[5, 5, 5, 10, 6, 10]])
    add(2, 2, [60, 5, 4, 5], [[60, 5, 64, 5, 64, 10]])
    add(4, 3, [1, 1, 10, 10], [[1, 1, 11, 1, 11, 11]])
    blob = np.zeros((36, 60), np.uint8)
    blob[5:9, 40:55] = 1
    add(4, 1, [40, 5, 15, 4], uncompressed_rle(blob))
    add(4, 2, [0, 0, 60, 36], [[0, 0, 60, 0, 60, 36, 0, 36]])
    add(5, 2, [0.9, 1.9, 30.0, 40.2], [[0.9, 1.9, 10.9, 1.9, 10.9, 11.9], [20.9, 20.9, 30.9, 20.9, 30.9, 42.1],
                                       [1.9, 30.9, 9.9, 30.9, 5.9, 35.9, 2.1, 33.3]])
    data = {"images": [{"id": i * 10, "file_name": f"{i}.png", "width": w, "height": h} for i, (h, w) in sizes.items()],
            "annotations": anns,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]}
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file, img_dir


def reference_samples(ann_file: Path, test_mode: bool, with_mask: bool, classes: list[str] | None = None,
                      filter_empty_gt: bool = True) -> list[dict]:
    """The documented loading rules applied one annotation at a time to the raw json, Python floats and the raw
    segmentation objects (no store): the samples the dataset must hand to its pipeline."""
    data = json.loads(ann_file.read_text())
    cats = {c["id"]: c["name"] for c in data["categories"]}
    cat_ids = sorted(cats) if classes is None else [next(c for c, n in cats.items() if n == name) for name in classes]
    label_of = {c: i for i, c in enumerate(cat_ids)}
    out = []
    for img in data["images"]:
        h, w = img["height"], img["width"]
        boxes, labels, ignore, masks = [], [], [], []
        for a in data["annotations"]:
            if a["image_id"] != img["id"]:
                continue
            x, y, bw, bh = (float(v) for v in a["bbox"])
            if bw < 1e-3 or bh < 1e-3:
                continue
            box = [max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)]
            if box[2] - box[0] < 1e-3 or box[3] - box[1] < 1e-3:
                continue
            if a["category_id"] not in label_of:
                continue
            if a.get("iscrowd"):
                ignore.append(box)
                continue
            boxes.append(box)
            labels.append(label_of[a["category_id"]])
            if with_mask:
                masks.append(decode_segmentation(a["segmentation"], h, w))
        if not test_mode and filter_empty_gt and not boxes:
            continue
        sample = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int64),
                  "ignore_boxes": np.asarray(ignore, np.float32).reshape(-1, 4), "image_id": img["id"],
                  "file_name": img["file_name"]}
        if with_mask:
            sample["masks"] = masks
        out.append(sample)
    return out


def _same_mask_items(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert type(x) is type(y)
        if isinstance(x, PolygonMask):
            assert len(x.polys) == len(y.polys)
            for p, q in zip(x.polys, y.polys):
                assert p.dtype == q.dtype == np.float64 and np.array_equal(p, q)
        else:
            assert (x.x0, x.y0) == (y.x0, y.y0) and np.array_equal(x.bits, y.bits)


def _check_against_reference(ds: CocoDataset, ref: list[dict], pipeline: list | None) -> None:
    assert len(ds) == len(ref)
    assert [info["id"] for info in ds.img_infos] == [r["image_id"] for r in ref]
    for i, r in enumerate(ref):
        ann = ds.get_ann_info(i)
        for key in ("boxes", "labels", "ignore_boxes"):
            assert ann[key].dtype == r[key].dtype and np.array_equal(ann[key], r[key]), key
        for entropy in (3, 11):
            got = ds[(i, entropy)]
            sample = {"img": ds.load_image(i), "boxes": r["boxes"].copy(), "labels": r["labels"].copy(),
                      "ignore_boxes": r["ignore_boxes"].copy(),
                      "meta": {"image_id": r["image_id"], "file_name": r["file_name"],
                               "ori_shape": got["meta"]["ori_shape"], "img_shape": got["meta"]["ori_shape"],
                               "scale_factor": (1.0, 1.0), "flip": False}}
            if "masks" in r:
                h, w = sample["img"].shape[:2]
                sample["masks"] = InstanceMasks(r["masks"], h, w)
            want = ds.pipeline(sample, rng=np.random.default_rng(entropy))
            assert torch.equal(got["img"], torch.from_numpy(np.ascontiguousarray(want["img"].transpose(2, 0, 1))))
            assert torch.equal(got["boxes"], torch.as_tensor(want["boxes"]).reshape(-1, 4))
            assert torch.equal(got["labels"], torch.as_tensor(want["labels"]))
            assert torch.equal(got["ignore_boxes"], torch.as_tensor(want["ignore_boxes"]).reshape(-1, 4))
            assert got["meta"]["flip"] == bool(want["meta"]["flip"])
            if "masks" in r:
                assert (got["masks"].height, got["masks"].width) == (want["masks"].height, want["masks"].width)
                _same_mask_items(got["masks"].items, want["masks"].items)
            else:
                assert "masks" not in got


_PIPE = [{"type": "Resize", "img_scale": [(80, 60), (40, 30)], "multiscale_mode": "range", "keep_ratio": True},
         {"type": "RandomFlip", "flip_ratio": 0.5}]


@pytest.mark.parametrize("kw", [{}, {"with_mask": True}, {"test_mode": True, "with_mask": True},
                                {"filter_empty_gt": False, "with_mask": True}, {"classes": ["b", "a"]},
                                {"pipeline": _PIPE, "with_mask": True}])
def test_items_equal_a_per_annotation_reference_on_every_annotation_kind(tmp_path, kw) -> None:
    ann_file, img_dir = write_every_kind(tmp_path)
    with pytest.warns(DataWarning):  # the degenerate, outside and clipped boxes of the file
        ds = CocoDataset(ann_file, img_dir, **kw)
    ref = reference_samples(ann_file, kw.get("test_mode", False), kw.get("with_mask", False), kw.get("classes"),
                            kw.get("filter_empty_gt", True))
    _check_against_reference(ds, ref, kw.get("pipeline"))
    assert ds.skipped_counts["degenerate"] == ds.skipped_counts["outside"] == ds.skipped_counts["clipped"] == 1


def test_items_equal_the_reference_on_the_synthetic_set(tmp_path) -> None:
    paths = make_synthetic_coco(tmp_path / "s", num_train=10, num_val=4, size=96, seed=5)
    for split, test_mode in (("train", False), ("val", True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataWarning)
            ds = CocoDataset(paths[f"{split}_ann_file"], paths[f"{split}_img_dir"], _PIPE, test_mode=test_mode,
                             with_mask=True)
        _check_against_reference(ds, reference_samples(paths[f"{split}_ann_file"], test_mode, True), _PIPE)


def test_both_json_parsers_build_the_same_store(tmp_path, monkeypatch) -> None:
    pytest.importorskip("orjson")
    ann_file, _ = write_every_kind(tmp_path)
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["segmentation"][0][0] = float("nan")  # a NaN literal: orjson refuses, json reads it
    nan_file = tmp_path / "nan.json"
    nan_file.write_text(json.dumps(data))
    for f in (ann_file, nan_file):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            fast = load_annotation_store(f, with_mask=True)
            monkeypatch.setattr(store_module, "_fast_json", lambda: None)
            plain = load_annotation_store(f, with_mask=True)
            monkeypatch.undo()
        a, b = fast.arrays(), plain.arrays()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k
        assert fast.skipped == plain.skipped
    assert fast.skipped["mask: bad polygon"] == 1  # the NaN polygon, found through either parser


def _reachable(obj: Any, stop: set[int]) -> int:
    """Number of distinct objects reachable from ``obj`` through gc referents (arrays' buffers are not objects)."""
    seen, todo = set(stop), [obj]
    while todo:
        o = todo.pop()
        if id(o) in seen or isinstance(o, type):
            continue
        seen.add(id(o))
        todo.extend(gc.get_referents(o))
    return len(seen) - len(stop)


def test_the_store_holds_no_python_object_per_image_or_annotation(tmp_path) -> None:
    """Property: the objects a dataset keeps do not grow with its size (the annotations live in numpy buffers,
    which a forked worker reads without touching any reference count)."""
    counts = []
    for n in (6, 60):
        paths = make_synthetic_coco(tmp_path / f"s{n}", num_train=n, num_val=1, size=64, seed=1)
        ds = CocoDataset(paths["train_ann_file"], paths["train_img_dir"], _PIPE, with_mask=True)
        stop = {id(ds.pipeline)}  # transforms and their config are per dataset, not per image
        counts.append(_reachable(ds, stop))
        assert all(a.flags.writeable is False for a in ds.store.arrays().values())
    assert counts[0] == counts[1]


def _ref_rle_counts(s: bytes) -> list[int] | None:
    """cocoapi maskApi.c rleFrString, one character at a time (None where it would read past the string)."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s) or not 48 <= s[p] <= 111 or k >= 12:
                return None
            c = s[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def test_compressed_rle_runs_equal_cocoapi_decoding_and_garbage_is_refused() -> None:
    rng = np.random.default_rng(0)
    strings, pixels = [], []
    for _ in range(200):  # real encodings: valid, runs equal the reference decoder's
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        full = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        strings.append(coco_mask.encode(np.asfortranarray(full))["counts"])
        pixels.append(h * w)
    for _ in range(300):  # garbage, and one-character edits of real strings
        if rng.random() < 0.5:
            strings.append(bytes(rng.integers(40, 120, int(rng.integers(0, 20))).astype(np.uint8)))
        else:
            s = bytearray(strings[int(rng.integers(0, 200))])
            s[int(rng.integers(0, len(s)))] = int(rng.integers(48, 112))
            strings.append(bytes(s))
        pixels.append(int(rng.integers(1, 1600)))
    data = np.frombuffer(b"".join(strings), np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in strings])])
    counts, count_offsets, ok = rle_string_counts(data, offsets)
    valid = valid_rle_strings(data, offsets, np.asarray(pixels))
    for i, s in enumerate(strings):
        ref = _ref_rle_counts(s)
        if ref is not None and all(abs(v) < 2**32 for v in ref):
            assert ok[i] and counts[count_offsets[i]:count_offsets[i + 1]].tolist() == ref
        expected = ref is not None and all(0 <= v < 2**32 for v in ref) and sum(ref) == pixels[i]
        assert valid[i] == expected, (i, s, ref)
    assert valid[:200].all() and not valid[200:].all()


def _bad_mask_file(root: Path) -> tuple[Path, Path, dict[int, str]]:
    img_dir = root / "img"
    img_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(img_dir / "a.png")
    square = [[5, 5, 15, 5, 15, 15, 5, 15]]
    bad = {
        11: ([[0, 0, "NaN", 0, 10, 10]], "bad polygon"),  # a string coordinate
        12: ("INF", "bad polygon"),  # replaced by an Infinity literal below
        13: ([[0, 0, 1e12, 0, 10, 10]], "bad polygon"),  # finite, but a 5e12-pixel perimeter to rasterise
        14: ({"size": [40, 50], "counts": 7}, "bad RLE"),
        15: ({"size": [40, 50], "counts": [-5, 2005]}, "bad RLE"),
        16: ({"size": ["forty", 50], "counts": [2000]}, "bad RLE"),
        17: ({"size": [40, 50], "counts": "0123456789::;;<<"}, "bad RLE"),
        18: ({"size": [40, 50], "counts": [1999]}, "RLE of the wrong size"),
    }
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "segmentation": square, "area": 100},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "iscrowd": 1,
             "segmentation": uncompressed_rle(np.pad(np.ones((10, 10), np.uint8), ((20, 10), (20, 20)))), "area": 100}]
    for ann_id, (segm, _) in bad.items():
        anns.append({"id": ann_id, "image_id": 1, "category_id": 1, "bbox": [1, 1, 9, 9], "segmentation": segm})
    text = json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}], "annotations": anns,
                       "categories": [{"id": 1, "name": "x"}]})
    text = text.replace('"INF"', '[[0, 0, Infinity, 0, 10, 10]]')
    (root / "ann.json").write_text(text)
    return root / "ann.json", img_dir, {k: v for k, (_, v) in bad.items()}


def test_bad_segmentations_are_skipped_for_training_and_evaluation_alike(tmp_path) -> None:
    ann_file, img_dir, kinds = _bad_mask_file(tmp_path)
    for test_mode in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = CocoDataset(ann_file, img_dir, [], test_mode=test_mode, with_mask=True)
        texts = [str(c.message) for c in caught if issubclass(c.category, DataWarning)]
        for kind in set(kinds.values()):
            ids = [k for k, v in kinds.items() if v == kind]
            assert ds.skipped_counts[f"mask: {kind}"] == len(ids)
            assert any(f"with {kind} in {ann_file}" in t and f"ids {', '.join(map(str, ids[:5]))}" in t
                       for t in texts), (kind, texts)
        assert ds.get_ann_info(0)["ann_ids"].tolist() == [1] and len(ds.get_ann_info(0)["ignore_boxes"]) == 1
        gt = ds.coco_gt_dict
        assert [a["id"] for a in gt["annotations"]] == [1, 2]
    # the evaluator scores against exactly that: a perfect prediction of the kept masks is AP 1, no crash
    results = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": coco_mask.encode(np.asfortranarray(
        ds[0]["masks"].to_full(0)))}]
    results[0]["segmentation"]["counts"] = results[0]["segmentation"]["counts"].decode()
    assert evaluate_coco(ds.segm_gt_dict(), results, iou_type="segm").metrics["segm_mAP"] == pytest.approx(1.0)
    # a dataset loaded without masks validates them the same way when segm evaluation asks for them
    plain = CocoDataset(ann_file, img_dir, [], test_mode=True)
    assert "segmentation" not in plain.coco_gt_dict["annotations"][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [a["id"] for a in plain.segm_gt_dict()["annotations"]] == [1, 2]
    assert sorted(str(c.message).split(" with ")[1].split(" in ")[0] for c in caught) == sorted(set(kinds.values()))


def test_non_numeric_rle_size_is_a_mask_format_error_not_a_value_error() -> None:
    with pytest.raises(MaskFormatError) as e:
        decode_segmentation({"size": ["forty", 50], "counts": [2000]}, 40, 50)
    assert e.value.kind == "bad RLE"


def test_no_unbounded_polygon_reaches_the_rasteriser(tmp_path, monkeypatch) -> None:
    """Every polygon handed to faster-coco-eval's rasteriser, while loading, iterating and evaluating the file
    with NaN / Infinity / 1e12 polygons, is finite and within one image size of its image."""
    seen: list[np.ndarray] = []
    real = coco_mask.frPyObjects

    def spy(obj: Any, h: int, w: int) -> Any:
        polys = obj if isinstance(obj, list) else [obj]
        for p in polys:
            if isinstance(p, list):
                pts = np.asarray(p, np.float64)
                seen.append(pts)
                assert np.isfinite(pts).all() and np.abs(pts).max() < 1e4, pts  # the image is 50 x 40
        return real(obj, h, w)

    monkeypatch.setattr(coco_mask, "frPyObjects", spy)
    ann_file, img_dir, _ = _bad_mask_file(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ds = CocoDataset(ann_file, img_dir, [], test_mode=True, with_mask=True)
    ds[0]["masks"].to_full(0)
    evaluate_coco(ds.segm_gt_dict(), [], iou_type="segm")
    assert seen  # the good polygon did go through the spy
    # a hand-written ground truth with such a polygon is refused by evaluate_coco before rasterising
    raw = json.loads(ann_file.read_text())
    raw["annotations"] = [a for a in raw["annotations"] if a["id"] in (1, 12)]
    with pytest.raises(ValueError, match="annotation id 12: polygon 0 has NaN or inf"):
        evaluate_coco(raw, [], iou_type="segm")


def test_nan_polygon_evaluation_stays_bounded_in_a_memory_limited_process(tmp_path) -> None:
    """Before the store, evaluating a file with a NaN / 1e12 polygon made faster-coco-eval allocate ~22 GB. Run
    the whole load + evaluation in a child limited to 4 GiB of address space, so a regression fails this test
    (MemoryError / vector::reserve) instead of taking the machine down."""
    ann_file, img_dir, _ = _bad_mask_file(tmp_path)
    code = f"""
import resource, warnings
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from densedet.data import CocoDataset
from densedet.evaluation import evaluate_coco
warnings.simplefilter("ignore")
ds = CocoDataset({str(ann_file)!r}, {str(img_dir)!r}, [], test_mode=True)
r = evaluate_coco(ds.segm_gt_dict(), [], iou_type="segm")
print("segm evaluated on", len(ds.segm_gt_dict()["annotations"]), "annotations")
"""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=repo, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "segm evaluated on 2 annotations" in out.stdout


def _mask_box_file(root: Path) -> tuple[Path, Path]:
    img_dir = root / "img"
    img_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(img_dir / "a.png")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10],  # fine
         "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10],  # polygon right of the image
         "segmentation": [[55, 20, 65, 20, 65, 30]]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10],  # its mask is elsewhere: IoU 0
         "segmentation": [[30, 22.5, 44, 22.5, 44, 37.25, 30, 37.25]]},
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [30, 0, 10, 10],  # an all-zero RLE
         "segmentation": {"size": [40, 50], "counts": [2000]}},
    ]
    (root / "ann.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 50,
                                                           "height": 40}], "annotations": anns,
                                               "categories": [{"id": 1, "name": "x"}]}))
    return root / "ann.json", img_dir


@pytest.mark.parametrize("mode", ["warn", "skip", "use_mask"])
def test_mask_against_box_is_counted_and_skipped_or_repaired(tmp_path, mode) -> None:
    ann_file, img_dir = _mask_box_file(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDataset(ann_file, img_dir, [], with_mask=True, mask_bbox_check=mode)
    texts = " | ".join(str(c.message) for c in caught)
    assert ds.skipped_counts["mask: empty inside the image"] == 2 and "ids 2, 4" in texts
    assert ds.skipped_counts["mask: extent disagrees with bbox"] == 1 and "ids 3" in texts
    ann = ds.get_ann_info(0)
    expected_ids = {"warn": [1, 2, 3, 4], "skip": [1], "use_mask": [1, 3]}[mode]
    assert ann["ann_ids"].tolist() == expected_ids
    assert [a["id"] for a in ds.coco_gt_dict["annotations"]] == expected_ids  # the evaluator sees the same
    if mode == "use_mask":  # the box is the polygon's extent, for training and for the evaluator
        np.testing.assert_array_equal(ann["boxes"][1], [30, 22.5, 44, 37.25])
        assert ds.coco_gt_dict["annotations"][1]["bbox"] == [30, 22.5, 14, 14.75]
        assert ds.store.flags[1] & FLAG_BOX_FROM_MASK
    with pytest.raises(ValueError, match="mask_bbox_check"):
        CocoDataset(ann_file, img_dir, [], with_mask=True, mask_bbox_check="fix")


def test_evaluation_against_the_store_equals_evaluation_against_the_raw_file(tmp_path) -> None:
    """On a clean file (nothing skipped or clipped) the rebuilt ground truth scores exactly like the raw json,
    for boxes and masks (COCO's area ranges read the json's own areas, kept in the store)."""
    paths = make_synthetic_coco(tmp_path / "s", num_train=1, num_val=12, size=96, seed=2)
    ds = CocoDataset(paths["val_ann_file"], paths["val_img_dir"], [], test_mode=True, with_mask=True)
    raw = json.loads(Path(paths["val_ann_file"]).read_text())
    rng = np.random.default_rng(0)
    boxes, segms = [], []
    for a in raw["annotations"]:
        jitter = rng.normal(0, 2, 4)
        boxes.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": float(rng.random()),
                      "bbox": [a["bbox"][0] + jitter[0], a["bbox"][1] + jitter[1], a["bbox"][2], a["bbox"][3]]})
        img = next(i for i in raw["images"] if i["id"] == a["image_id"])
        full = InstanceMasks([decode_segmentation(a["segmentation"], img["height"], img["width"])], img["height"],
                             img["width"]).to_full(0)
        rle = coco_mask.encode(np.asfortranarray(np.roll(full, int(rng.integers(-2, 3)), axis=1)))
        segms.append({"image_id": a["image_id"], "category_id": a["category_id"], "score": boxes[-1]["score"],
                      "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    for iou_type, results in (("bbox", boxes), ("segm", segms)):
        a = evaluate_coco(raw, results, iou_type=iou_type).metrics
        b = evaluate_coco(ds.coco_gt_dict, results, iou_type=iou_type).metrics
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a), (a, b)
        assert 0.2 < a[f"{iou_type}_mAP"] < 1.0


def test_clipped_and_skipped_boxes_are_clipped_and_skipped_for_the_evaluator(tmp_path) -> None:
    ann_file, img_dir = write_every_kind(tmp_path)
    with pytest.warns(DataWarning):
        ds = CocoDataset(ann_file, img_dir, test_mode=True)
    gt = {a["id"]: a for a in ds.coco_gt_dict["annotations"]}
    raw = {a["id"]: a for a in json.loads(ann_file.read_text())["annotations"]}
    assert set(raw) - set(gt) == {25, 28}  # the degenerate and the outside box
    assert gt[10]["bbox"] == pytest.approx([50.3, 30.7, 64 - 50.3, 48 - 30.7])  # clipped to the 64x48 image
    for k in set(gt) - {10}:
        assert gt[k]["bbox"] == raw[k]["bbox"] and gt[k].get("area") == raw[k].get("area")
        assert gt[k]["iscrowd"] == raw[k].get("iscrowd", 0) and gt[k].get("ignore", 0) == raw[k].get("ignore", 0)
    assert len(ds.coco_gt_dict["images"]) == 5 and [c["id"] for c in ds.coco_gt_dict["categories"]] == [1, 2, 3]


def test_bitmap_crop_dtype_of_an_rle_is_unchanged(tmp_path) -> None:
    ann_file, img_dir = write_every_kind(tmp_path)
    with pytest.warns(DataWarning):
        ds = CocoDataset(ann_file, img_dir, [], with_mask=True)
    crops = [m for m in ds[0]["masks"].items if isinstance(m, BitmapCrop)]
    assert crops and all(c.bits.dtype == np.uint8 for c in crops)


def test_trainer_validates_the_val_split_with_masks_before_the_first_iteration(tmp_path) -> None:
    """A Mask R-CNN run builds its val set with masks when the trainer is constructed: a bad val mask is a counted
    warning naming the val file (and the log line says so) before any iteration; an unreadable val file stops the
    run there, not at its first evaluation."""
    from test_maskrcnn_train import make_cfg

    from densedet.engine import Trainer
    from densedet.errors import DataError

    root = tmp_path / "synth"
    make_synthetic_coco(root, num_train=4, num_val=2, size=96, seed=0)
    val_file = root / "annotations" / "instances_val.json"
    val = json.loads(val_file.read_text())
    val["annotations"][0]["segmentation"] = [[0, 0, 1e12, 0, 10, 10]]
    val_file.write_text(json.dumps(val))
    cfg = make_cfg(root, runtime={"val_interval": 1})
    with pytest.warns(DataWarning, match=rf"bad polygon in {val_file} \(ids {val['annotations'][0]['id']};"):
        trainer = Trainer(cfg, tmp_path / "work")
    assert trainer.iter == 0 and trainer.val_dataset.with_mask
    assert trainer.val_dataset.skipped_counts["mask: bad polygon"] == 1
    assert "val set: 2 images (at load: 1 mask: bad polygon)" in (tmp_path / "work" / "train.log").read_text()
    val["annotations"][0]["category_id"] = 999
    val_file.write_text(json.dumps(val))
    with pytest.raises(DataError, match=rf"{val_file}: annotation id .* unknown category id 999"):
        Trainer(cfg, tmp_path / "work2")


def test_mask_bbox_check_config_keys(tmp_path) -> None:
    from test_maskrcnn_train import make_cfg

    from densedet.errors import ConfigError

    cfg = make_cfg(tmp_path, data={"val": {"ann_file": "v.json", "img_dir": "v"},
                                   "train": {"ann_file": "t.json", "img_dir": "t", "mask_bbox_check": "use_mask",
                                             "mask_bbox_iou_thr": 0.3, "with_mask": True}})
    assert cfg.data.val.mask_options(cfg.data.train) == {"mask_bbox_check": "use_mask", "mask_bbox_iou_thr": 0.3}
    assert cfg.data.train.mask_options(cfg.data.train) == {"mask_bbox_check": "use_mask", "mask_bbox_iou_thr": 0.3}
    with pytest.raises(ConfigError, match=r"data.train.mask_bbox_check=fix: must be one of warn, skip, use_mask"):
        make_cfg(tmp_path, data={"train": {"mask_bbox_check": "fix"}})
    with pytest.raises(ConfigError, match=r"data.val.mask_bbox_iou_thr=1.5: must be >= 0 and <= 1"):
        make_cfg(tmp_path, data={"val": {"mask_bbox_iou_thr": 1.5}})


class _MaskOracle(torch.nn.Module):
    """Predicts each image's kept ground truth (boxes and masks) from a dataset loaded with masks."""

    def __init__(self, truth: CocoDataset) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.truth = {info["id"]: i for i, info in enumerate(truth.img_infos)}
        self.dataset = truth

    def forward(self, images, targets=None, metas=None, mode="predict"):
        out = []
        for meta in metas:
            item = self.dataset[self.truth[meta["image_id"]]]
            n = len(item["boxes"])
            out.append({"boxes": item["boxes"], "scores": torch.ones(n), "labels": item["labels"],
                         "masks": item["masks"]})
        return out


def test_evaluation_of_a_mask_model_on_data_it_trained_on_never_crashes(tmp_path) -> None:
    """The evaluator of a mask model, given a dataset loaded without masks (as `densedet test` does), scores
    against segmentations validated as for training: the NaN / 1e12 / corrupt-RLE annotations that training
    skipped are skipped there too, and a perfect prediction of the rest is AP 1 for boxes and masks."""
    from densedet.data import build_dataloader
    from densedet.engine.evaluator import evaluate

    ann_file, img_dir, _ = _bad_mask_file(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        truth = CocoDataset(ann_file, img_dir, [], test_mode=True, with_mask=True)
        plain = CocoDataset(ann_file, img_dir, [], test_mode=True)
        loader = build_dataloader(plain, 1, 0, shuffle=False, seed=0)
        result = evaluate(_MaskOracle(truth), loader, plain, "cpu", out_json=tmp_path / "r.bbox.json")
    assert result.metrics["bbox_mAP"] == pytest.approx(1.0) and result.metrics["segm_mAP"] == pytest.approx(1.0)
    assert (tmp_path / "r.segm.json").is_file()
