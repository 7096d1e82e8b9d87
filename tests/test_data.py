"""Data pipeline: transforms (hand-checked sizes and boxes), dataset semantics, collate, samplers, loader."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densedet.data import (
    CocoDataset,
    DistributedGroupSampler,
    GroupSampler,
    InferenceSampler,
    Normalize,
    RandomFlip,
    Resize,
    SeededSampler,
    build_dataloader,
    build_pipeline,
    collate,
    make_synthetic_coco,
)
from densedet.data.transforms import flip_boxes
from densedet.errors import DataWarning
from densedet.registry import ConfigError

# No test here expects an annotation warning: turn any into a failure.
pytestmark = pytest.mark.filterwarnings("error::densedet.data.coco.DataWarning")


def _sample(w: int, h: int, boxes=((10, 20, 100, 200),), seed: int = 0) -> dict:
    img = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return {
        "img": img,
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.zeros(len(boxes), dtype=np.int64),
        "ignore_boxes": np.zeros((0, 4), dtype=np.float32),
        "meta": {"ori_shape": (h, w), "img_shape": (h, w), "scale_factor": (1.0, 1.0), "flip": False},
    }


def _write_coco(root: Path, images, anns, cats=((1, "a"),), write_images: bool = True) -> tuple[Path, Path]:
    """images: (id, w, h); anns: dicts with at least image_id, category_id, bbox (ids added in order)."""
    img_dir = root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, w, h in images],
        "annotations": [{"id": k + 1, "iscrowd": 0, **a} for k, a in enumerate(anns)],
        "categories": [{"id": c, "name": n} for c, n in cats],
    }
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    if write_images:
        for i, w, h in images:
            Image.new("RGB", (w, h), (i % 256, 50, 100)).save(img_dir / f"{i}.png")
    return ann_file, img_dir


# ----------------------------------------------------------------------------------------------------- Resize
@pytest.mark.parametrize(
    ("w", "h", "expected"),
    [
        (640, 480, (1067, 800)),  # short edge limits: s = 800/480, 640*s = 1066.67 -> 1067
        (480, 640, (800, 1067)),  # portrait: same factor
        (500, 375, (1067, 800)),  # s = 800/375 = 2.1333, 500*s = 1066.67 -> 1067
        (1000, 200, (1333, 267)),  # long edge limits: s = 1.333, 200*s = 266.6 -> 267
        (1333, 800, (1333, 800)),  # already at scale
    ],
)
def test_resize_keep_ratio_sizes(w, h, expected):
    sample = Resize(img_scale=(1333, 800), keep_ratio=True)(_sample(w, h, boxes=()))
    new_w, new_h = expected
    assert sample["img"].shape == (new_h, new_w, 3)
    assert sample["meta"]["img_shape"] == (new_h, new_w)
    assert sample["meta"]["scale_factor"] == pytest.approx((new_w / w, new_h / h))


def test_resize_scales_and_clips_boxes():
    s = _sample(640, 480, boxes=[(10, 20, 100, 200), (600, 400, 650, 490)])
    out = Resize(img_scale=(1333, 800))(s)
    fx, fy = 1067 / 640, 800 / 480
    expected = np.array([[10 * fx, 20 * fy, 100 * fx, 200 * fy], [600 * fx, 400 * fy, 1067, 800]], dtype=np.float32)
    np.testing.assert_allclose(out["boxes"], expected, rtol=1e-6)
    assert out["boxes"].dtype == np.float32


def test_resize_no_keep_ratio_is_exact():
    out = Resize(img_scale=(1333, 800), keep_ratio=False)(_sample(640, 480))
    assert out["img"].shape == (800, 1333, 3)
    assert out["meta"]["scale_factor"] == pytest.approx((1333 / 640, 800 / 480))
    np.testing.assert_allclose(out["boxes"][0], [10 * 1333 / 640, 20 * 800 / 480, 100 * 1333 / 640, 200 * 800 / 480])


def test_resize_range_mode_samples_inclusive_integer_edges():
    t = Resize(img_scale=[(1333, 640), (1333, 800)], multiscale_mode="range")
    rng = np.random.default_rng(0)
    scales = [t._sample_scale(rng) for _ in range(4000)]
    longs = {s[0] for s in scales}
    shorts = np.array([s[1] for s in scales])
    assert longs == {1333}
    assert shorts.min() == 640 and shorts.max() == 800  # both ends reachable (randint(min, max + 1))
    assert len(set(shorts.tolist())) == 161
    # An image of 4:3 resized with a sampled scale has its short side equal to the sampled short edge.
    out = t(_sample(64, 48), rng=np.random.default_rng(1))
    long_edge, short = t._sample_scale(np.random.default_rng(1))
    assert long_edge == 1333 and out["img"].shape[:2] == (short, Resize.rescale_size(64, 48, (1333, short))[0])


def test_resize_value_mode_picks_listed_scales():
    scales = [(1333, 640), (1333, 704), (1333, 800)]
    t = Resize(img_scale=scales, multiscale_mode="value")
    rng = np.random.default_rng(0)
    assert {t._sample_scale(rng) for _ in range(300)} == set(scales)


def test_resize_ratio_range():
    t = Resize(img_scale=(100, 50), ratio_range=(0.5, 2.0))
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(200):
        long_edge, short_edge = t._sample_scale(rng)
        ratios.append(long_edge / 100)
        assert abs(short_edge - 50 * long_edge / 100) <= 1  # both sides scaled by the same ratio (int truncation)
    assert 0.5 <= min(ratios) < 0.6 and 1.9 < max(ratios) <= 2.0
    with pytest.raises(ConfigError, match="ratio_range"):
        Resize(img_scale=[(100, 50), (200, 100)], ratio_range=(0.5, 2.0))


def test_resize_rejects_bad_config():
    with pytest.raises(ConfigError, match="multiscale_mode"):
        Resize(img_scale=(1333, 800), multiscale_mode="wrong")
    with pytest.raises(ConfigError, match="scale"):
        Resize(img_scale=[(1333, 800, 3)])


# ----------------------------------------------------------------------------------------------------- flip
def test_flip_known_box_and_pixels():
    s = _sample(100, 60, boxes=[(10, 20, 30, 40)])
    before = s["img"].copy()
    out = RandomFlip(flip_ratio=1.0)(s)
    np.testing.assert_array_equal(out["boxes"], [[70, 20, 90, 40]])  # x1' = w - x2, x2' = w - x1
    np.testing.assert_array_equal(out["img"][:, 0], before[:, 99])
    assert out["meta"]["flip"] is True
    vert = flip_boxes(np.array([[10, 20, 30, 40]], dtype=np.float32), (60, 100), "vertical")
    np.testing.assert_array_equal(vert, [[10, 20, 30, 40]])  # symmetric about y = 30


def test_flip_twice_is_identity():
    s = _sample(57, 31, boxes=[(1.5, 2.25, 40, 30), (0, 0, 57, 31)])
    ref = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
    flip = RandomFlip(flip_ratio=1.0)
    out = flip(flip(s))
    np.testing.assert_array_equal(out["img"], ref["img"])
    np.testing.assert_allclose(out["boxes"], ref["boxes"])


def test_flip_ratio_frequency():
    rng = np.random.default_rng(0)
    flips = [RandomFlip(0.5)(_sample(8, 8), rng=rng)["meta"]["flip"] for _ in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55
    assert not any(RandomFlip(0.0)(_sample(8, 8), rng=rng)["meta"]["flip"] for _ in range(50))


# ----------------------------------------------------------------------------------------------------- normalize
def test_normalize_values_rgb_and_caffe():
    with pytest.warns(DataWarning, match="model.data_preprocessor"):  # deprecated in DenseDet pipelines
        Normalize()
    warnings.simplefilter("ignore", DataWarning)  # (restored by pytest after the test)
    s = _sample(4, 3)
    s["img"][:] = (200, 100, 50)
    out = Normalize()(s)["img"]
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (3, 3, 4)
    expected = [(200 - 123.675) / 58.395, (100 - 116.28) / 57.12, (50 - 103.53) / 57.375]
    torch.testing.assert_close(out[:, 1, 2], torch.tensor(expected), rtol=1e-6, atol=1e-6)

    s = _sample(4, 3)
    s["img"][:] = (200, 100, 50)
    caffe = Normalize(mean=(103.53, 116.28, 123.675), std=(1, 1, 1), to_rgb=False)(s)["img"]
    torch.testing.assert_close(caffe[:, 0, 0], torch.tensor([50 - 103.53, 100 - 116.28, 200 - 123.675]))


def test_build_pipeline_from_config_and_errors():
    warnings.simplefilter("ignore", DataWarning)  # Normalize's deprecation (restored by pytest after the test)
    pipe = build_pipeline(
        [
            {"type": "Resize", "img_scale": [64, 32]},
            {"type": "RandomFlip", "flip_ratio": 0.0},
            {"type": "Normalize"},
        ],
        where="cfg.data.train.pipeline",
    )
    out = pipe(_sample(128, 96))
    assert out["img"].shape == (3, 32, 43)  # s = min(64/128, 32/96) = 1/3 -> int(42.67+.5) = 43, 32
    with pytest.raises(ConfigError, match=r"cfg\.data\.train\.pipeline\[0\].*'Resise'.*Resize"):
        build_pipeline([{"type": "Resise"}], where="cfg.data.train.pipeline")
    with pytest.raises(ConfigError, match=r"pipeline\[1\].*flip_rato"):
        build_pipeline([{"type": "Normalize"}, {"type": "RandomFlip", "flip_rato": 0.5}])
    with pytest.raises(ConfigError, match="LoadImageFromFile.*not needed"):
        build_pipeline([{"type": "LoadImageFromFile"}])
    with pytest.raises(TypeError, match="before Normalize"):
        build_pipeline([{"type": "Normalize"}, {"type": "Resize", "img_scale": [64, 32]}])(_sample(16, 16))


# ----------------------------------------------------------------------------------------------------- collate
def test_collate_pads_to_divisor_and_keeps_content():
    a = {"img": torch.rand(3, 50, 70), "boxes": torch.tensor([[1.0, 2, 3, 4]]), "labels": torch.tensor([2]),
         "ignore_boxes": torch.zeros(0, 4), "meta": {"image_id": 7, "img_shape": (50, 70)}}
    b = {"img": torch.rand(3, 33, 100), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
         "ignore_boxes": torch.tensor([[0.0, 0, 5, 5]]), "meta": {"image_id": 9, "img_shape": (33, 100)}}
    batch = collate([a, b], size_divisor=32)
    images = batch["images"]
    assert images.shape == (2, 3, 64, 128)
    torch.testing.assert_close(images[0, :, :50, :70], a["img"])
    torch.testing.assert_close(images[1, :, :33, :100], b["img"])
    assert images[0, :, 50:].abs().sum() == 0 and images[0, :, :, 70:].abs().sum() == 0
    assert images[1, :, 33:].abs().sum() == 0 and images[1, :, :, 100:].abs().sum() == 0
    assert [m["image_id"] for m in batch["metas"]] == [7, 9]
    assert batch["metas"][0]["pad_shape"] == (64, 96) and batch["metas"][1]["pad_shape"] == (64, 128)
    assert all(m["batch_input_shape"] == (64, 128) for m in batch["metas"])
    assert "pad_shape" not in a["meta"]  # metas are copies
    assert torch.equal(batch["targets"][0]["labels"], torch.tensor([2]))
    assert batch["targets"][1]["ignore_boxes"].shape == (1, 4)
    assert collate([a, b], size_divisor=0)["images"].shape == (2, 3, 50, 100)


# ----------------------------------------------------------------------------------------------------- dataset
def test_noncontiguous_category_ids(tmp_path):
    cats = [(90, "c90"), (1, "c1"), (5, "c5")]
    anns = [
        {"image_id": 1, "category_id": 90, "bbox": [1, 1, 5, 5]},
        {"image_id": 1, "category_id": 1, "bbox": [2, 2, 5, 5]},
        {"image_id": 1, "category_id": 5, "bbox": [3, 3, 5, 5]},
    ]
    ann_file, img_dir = _write_coco(tmp_path, [(1, 20, 20)], anns, cats)
    ds = CocoDataset(ann_file, img_dir)
    assert ds.cat_ids == [1, 5, 90]
    assert ds.cat2label == {1: 0, 5: 1, 90: 2} and ds.label2cat == {0: 1, 1: 5, 2: 90}
    assert ds.classes == ["c1", "c5", "c90"]
    assert ds.get_ann_info(0)["labels"].tolist() == [2, 0, 1]
    assert ds[0]["labels"].tolist() == [2, 0, 1]

    sub = CocoDataset(ann_file, img_dir, classes=["c90", "c1"])
    assert sub.classes == ["c90", "c1"] and sub.label2cat == {0: 90, 1: 1}
    info = sub.get_ann_info(0)
    assert info["labels"].tolist() == [0, 1]
    np.testing.assert_array_equal(info["boxes"], [[1, 1, 6, 6], [2, 2, 7, 7]])  # xywh -> xyxy


def test_crowd_goes_to_ignore_boxes(tmp_path):
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4]},
        {"image_id": 1, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 1},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 8, 8], "iscrowd": 1},  # crowd only
    ]
    ann_file, img_dir = _write_coco(tmp_path, [(1, 32, 32), (2, 32, 32)], anns)
    ds = CocoDataset(ann_file, img_dir)
    assert len(ds) == 1  # image 2 has no non-crowd box
    item = ds[0]
    torch.testing.assert_close(item["boxes"], torch.tensor([[1.0, 2, 4, 6]]))
    torch.testing.assert_close(item["ignore_boxes"], torch.tensor([[5.0, 5, 15, 15]]))
    assert item["boxes"].dtype == torch.float32 and item["labels"].dtype == torch.int64


def test_empty_image_filtering(tmp_path):
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"image_id": 3, "category_id": 1, "bbox": [1, 1, 4, 4]},
    ]
    ann_file, img_dir = _write_coco(tmp_path, [(1, 16, 16), (2, 16, 16), (3, 24, 16)], anns)
    assert [i["id"] for i in CocoDataset(ann_file, img_dir).img_infos] == [1, 3]
    assert len(CocoDataset(ann_file, img_dir, filter_empty_gt=False)) == 3
    test_ds = CocoDataset(ann_file, img_dir, test_mode=True)
    assert len(test_ds) == 3
    empty = test_ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["meta"]["image_id"] == 2
    np.testing.assert_array_equal(test_ds.aspect_flags, [0, 0, 1])  # 24 / 16 > 1
    assert test_ds.aspect_flags.dtype == np.uint8
    assert len(test_ds.coco_gt_dict["images"]) == 3


def test_getitem_pipeline_meta_and_boxes(tmp_path):
    anns = [{"image_id": 4, "category_id": 1, "bbox": [10, 5, 30, 40]}]
    ann_file, img_dir = _write_coco(tmp_path, [(4, 64, 48)], anns)
    img = np.zeros((48, 64, 3), dtype=np.uint8)
    img[:, :32] = (255, 0, 0)
    Image.fromarray(img).save(img_dir / "4.png")
    pipeline = [
        {"type": "Resize", "img_scale": [128, 96]},
        {"type": "RandomFlip", "flip_ratio": 1.0},
    ]
    item = CocoDataset(ann_file, img_dir, pipeline=pipeline)[0]
    assert item["img"].dtype == torch.uint8  # pixels: the model normalises them
    meta = item["meta"]
    assert meta["image_id"] == 4 and meta["file_name"] == "4.png"
    assert meta["ori_shape"] == (48, 64) and meta["img_shape"] == (96, 128)
    assert meta["scale_factor"] == (2.0, 2.0) and meta["flip"] is True
    assert item["img"].shape == (3, 96, 128)
    # xyxy (10, 5, 40, 45) * 2 = (20, 10, 80, 90), flipped in width 128: (48, 10, 108, 90)
    torch.testing.assert_close(item["boxes"], torch.tensor([[48.0, 10, 108, 90]]))
    # red left half moved to the right half by the flip
    assert item["img"][0, 50, 120] == 255 and item["img"][0, 50, 5] == 0


def test_image_modes_and_exif_orientation(tmp_path):
    images = [(1, 40, 20), (2, 20, 40), (3, 30, 30)]
    anns = [{"image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]} for i, _, _ in images]
    ann_file, img_dir = _write_coco(tmp_path, images, anns, write_images=False)
    Image.new("L", (40, 20), 128).save(img_dir / "1.png")
    rotated = Image.new("RGB", (40, 20), (10, 20, 30))  # stored 40x20, EXIF says rotate -> shown 20x40
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(img_dir / "2.png", exif=exif)
    Image.new("RGBA", (30, 30), (1, 2, 3, 4)).save(img_dir / "3.png")
    ds = CocoDataset(ann_file, img_dir)
    assert ds[0]["img"].shape == (3, 20, 40) and float(ds[0]["img"][1, 0, 0]) == 128.0
    assert ds[1]["img"].shape == (3, 40, 20)
    assert ds[2]["img"].shape == (3, 30, 30) and ds[2]["img"][:, 0, 0].tolist() == [1.0, 2.0, 3.0]


# ----------------------------------------------------------------------------------------------------- samplers
class _Flags:
    def __init__(self, flags):
        self.aspect_flags = np.asarray(flags, dtype=np.uint8)

    def __len__(self):
        return len(self.aspect_flags)


def test_group_sampler_same_aspect_batches_and_coverage():
    flags = [0, 1, 1, 0, 0, 1, 0, 0, 1, 1, 1, 0, 0]  # 7 zeros, 6 ones
    ds = _Flags(flags)
    bs = 4
    sampler = GroupSampler(ds, bs, seed=3)
    assert len(sampler) == 8 + 8
    sampler.set_epoch(0)
    order = list(sampler)
    assert len(order) == len(sampler)
    batches = [order[i : i + bs] for i in range(0, len(order), bs)]
    assert all(len({flags[j] for j in b}) == 1 for b in batches)
    assert set(order) == set(range(len(flags)))
    sampler.set_epoch(0)
    assert list(sampler) == order  # a function of (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != order
    fresh = GroupSampler(ds, bs, seed=3)
    assert list(fresh) == order and list(fresh) != order  # without set_epoch: epochs 0, 1, ...
    plain = list(GroupSampler(ds, bs, shuffle=False))
    assert plain[:8] == [0, 3, 4, 6, 7, 11, 12, 0]


def test_distributed_group_sampler_shards():
    flags = [0] * 12 + [1] * 6
    ds = _Flags(flags)
    bs, world = 2, 3
    shards = [list(DistributedGroupSampler(ds, bs, world, r, seed=5)) for r in range(world)]
    assert all(len(s) == len(shards[0]) == 6 for s in shards)  # 12/(2*3)*2 + 6/(2*3)*2
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[1]).isdisjoint(shards[2])
    assert set(shards[0]) | set(shards[1]) | set(shards[2]) == set(range(18))
    for s in shards:
        assert all(flags[s[i]] == flags[s[i + 1]] for i in range(0, len(s), bs))

    # Padding by repetition: 7 + 3 images, batch 2, 2 ranks -> groups padded to 8 and 4.
    flags = [0] * 7 + [1] * 3
    shards = [list(DistributedGroupSampler(_Flags(flags), 2, 2, r, seed=1)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6
    assert set(shards[0]) | set(shards[1]) == set(range(10))
    for s in shards:
        assert all(flags[s[i]] == flags[s[i + 1]] for i in range(0, len(s), 2))
    with pytest.raises(ValueError, match="rank"):
        DistributedGroupSampler(_Flags(flags), 2, 2, 2)


def test_seeded_sampler_entropy_and_epochs():
    inner = GroupSampler(_Flags([0, 0, 1, 1]), 2, seed=-5)  # negative seeds are accepted
    sampler = SeededSampler(inner, seed=9)
    sampler.set_epoch(4)
    items = list(sampler)
    inner.set_epoch(4)
    assert [i for i, _ in items] == list(inner)  # set_epoch reached the wrapped sampler
    assert all(entropy == (9, 4, i) for i, entropy in items)
    assert len(sampler) == len(inner) == 4


def test_inference_sampler_shards():
    shards = [list(InferenceSampler(range(10), 3, r)) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(InferenceSampler(range(2), 4, 3)) == []


# ----------------------------------------------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def synth_small(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), num_train=8, num_val=2, size=64, seed=1)


def _collect(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(b["images"].clone(), [m["image_id"] for m in b["metas"]], [m["flip"] for m in b["metas"]]) for b in loader]


def test_build_dataloader_reproducible_across_workers(synth_small):
    pipeline = [{"type": "Resize", "img_scale": [96, 64]}, {"type": "RandomFlip"}]
    ds = CocoDataset(synth_small["train_ann_file"], synth_small["train_img_dir"], pipeline=pipeline)
    loader0 = build_dataloader(ds, batch_size=3, num_workers=0, shuffle=True, seed=7)
    e0 = _collect(loader0, 0)
    assert all(b[0].shape[0] == 3 and b[0].shape[-1] % 32 == 0 and b[0].dtype == torch.uint8 for b in e0)
    assert sorted({i for b in e0 for i in b[1]}) == list(range(1, 9))
    again = _collect(loader0, 0)
    e1 = _collect(loader0, 1)
    assert [b[1] for b in e1] != [b[1] for b in e0] or [b[2] for b in e1] != [b[2] for b in e0]
    loader2 = build_dataloader(ds, batch_size=3, num_workers=2, shuffle=True, seed=7)
    with_workers = _collect(loader2, 0)
    for ref in (again, with_workers):
        assert [b[1] for b in ref] == [b[1] for b in e0] and [b[2] for b in ref] == [b[2] for b in e0]
        assert all(torch.equal(x[0], y[0]) for x, y in zip(ref, e0))
    flips = [f for b in e0 + e1 for f in b[2]]
    assert any(flips) and not all(flips)


def test_build_dataloader_eval_shards(synth_small):
    ds = CocoDataset(synth_small["val_ann_file"], synth_small["val_img_dir"], test_mode=True, pipeline=[])
    loader = build_dataloader(ds, batch_size=1, num_workers=0, shuffle=False, seed=0)
    ids = [m["image_id"] for b in loader for m in b["metas"]]
    assert ids == [1, 2]
    per_rank = [
        [m["image_id"] for b in build_dataloader(ds, 1, 0, False, 0, distributed=True, rank=r, world_size=2)
         for m in b["metas"]]
        for r in range(2)
    ]
    assert per_rank == [[1], [2]]
