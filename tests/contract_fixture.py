"""The before/after equality check of the detector-contract redesign (issue "one detector contract").

Every built-in config is built at weights that depend on nothing but each tensor's *name* (so the check does not
depend on the order in which a model initialises its layers), run on one fixed two-image batch (different sizes,
so padding and the rescale to the original image are exercised) in ``predict`` and ``loss`` modes, and summarised:
per image the detections (boxes, scores, labels; mask areas for Mask R-CNN), and every loss/statistic value.

``tests/data/contract_reference.pt`` holds those summaries as the code computed them *before* the redesign
(commit 0fb0683, through its own ``Normalize`` step and collate); ``test_contract_equality.py`` recomputes them
with the current code and compares. Regenerate with ``python tests/contract_fixture.py`` only when a change of
outputs is intended, and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

REFERENCE = Path(__file__).parent / "data" / "contract_reference.pt"
# every detection is kept (random weights score low), as many as the configs' max_per_img allow
OVERRIDES = {"single": ["model.test_cfg.score_thr=0.0"],
             "two": ["model.test_cfg.rcnn.score_thr=0.0"]}
IMAGE_SHAPES = [(96, 128), (80, 112)]  # (h, w) of the two images; the batch is padded to 96 x 128
SCALE_FACTORS = [(1.0, 1.0), (0.5, 0.5)]  # the second image was resized by 0.5 from a 160 x 224 original
BOXES_PER_IMAGE = 4


def fill_weights(model: torch.nn.Module) -> None:
    """Overwrite every floating-point tensor of ``model.state_dict()`` with values drawn from a generator seeded by
    the tensor's name: weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), running variances
    in [0.5, 1.5]."""
    state = model.state_dict()
    with torch.no_grad():
        for name, t in state.items():
            if not t.is_floating_point():
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            shape = tuple(t.shape)
            if name.endswith("running_var"):
                v = 0.5 + torch.rand(shape, generator=g)
            elif t.dim() >= 2:
                fan_in = max(1, math.prod(shape[1:]))
                v = torch.randn(shape, generator=g) / math.sqrt(fan_in)
            elif name.endswith("weight") or name.endswith("scale"):
                v = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                v = 0.1 * torch.randn(shape, generator=g)
            t.copy_(v.to(t.dtype))


def make_pixels() -> list[np.ndarray]:
    """The two (H, W, 3) uint8 RGB images: smooth gradients plus seeded noise (not constant: BN/GN see variety)."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in IMAGE_SHAPES:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
        out.append(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def make_metas() -> list[dict[str, Any]]:
    metas = []
    for (h, w), sf in zip(IMAGE_SHAPES, SCALE_FACTORS):
        metas.append({"img_shape": (h, w), "ori_shape": (round(h / sf[1]), round(w / sf[0])), "scale_factor": sf,
                      "pad_shape": (math.ceil(h / 32) * 32, math.ceil(w / 32) * 32),
                      "batch_input_shape": (96, 128), "flip": False})
    return metas


def make_targets(num_classes: int, with_mask: bool) -> list[dict[str, Any]]:
    """Seeded gt boxes (xyxy pixels) inside each image; with masks, one quadrilateral polygon per box."""
    g = np.random.default_rng(1)
    targets = []
    for h, w in IMAGE_SHAPES:
        wh = g.uniform(12, min(h, w) / 2, (BOXES_PER_IMAGE, 2))
        xy = g.uniform(0, 1, (BOXES_PER_IMAGE, 2)) * (np.array([w, h]) - wh)
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        t = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(g.integers(0, num_classes,
                                                                                     BOXES_PER_IMAGE)),
             "ignore_boxes": torch.zeros(0, 4)}
        if with_mask:
            polys = []
            for x1, y1, x2, y2 in boxes.tolist():
                cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
                polys.append([[cx, y1, x2, cy, cx, y2, x1, cy]])  # a diamond touching the box's sides
            t["polygons"] = polys
        targets.append(t)
    return targets


def summarize_predictions(dets: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    out = []
    for d in dets:
        s = {"boxes": d["boxes"].detach().float().cpu(), "scores": d["scores"].detach().float().cpu(),
             "labels": d["labels"].detach().long().cpu()}
        if "masks" in d:
            s["mask_areas"] = torch.tensor([float(d["masks"].to_full(i).sum()) for i in range(len(d["masks"]))])
        out.append(s)
    return out


def summarize_losses(losses: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in losses.items():
        if isinstance(v, torch.Tensor):
            out[k] = float(v.detach().float().mean())
        elif isinstance(v, (list, tuple)):
            out[k] = float(sum(x.detach().float().mean() for x in v))
        else:
            out[k] = float(v)
    return out


def model_key(model_cfg: dict[str, Any], norm: Any) -> str:
    """Configs with the same model dict (and normalisation) share one computation."""
    text = json.dumps({"model": model_cfg, "norm": norm}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def compare_detections(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], where: str) -> None:
    """Same detections to float rounding: scores (sorted) within 1e-3 relative; >= 97% of the reference detections
    matched by a detection of the same label with boxes within 1e-2 px + 1e-3 relative (a score tie or an NMS
    decision at the IoU threshold may flip by rounding); mask areas of matched pairs within 2% (+2 px)."""
    assert len(ref["scores"]) == len(got["scores"]), f"{where}: {len(got['scores'])} detections, reference " \
                                                     f"{len(ref['scores'])}"
    n = len(ref["scores"])
    if n == 0:
        return
    torch.testing.assert_close(got["scores"].sort(descending=True)[0], ref["scores"].sort(descending=True)[0],
                               rtol=1e-3, atol=1e-5, msg=lambda m: f"{where}: scores differ: {m}")
    used = torch.zeros(n, dtype=torch.bool)
    matched = 0
    for i in range(n):
        tol = 1e-2 + 1e-3 * ref["boxes"][i].abs()
        ok = (~used) & (got["labels"] == ref["labels"][i]) & ((got["boxes"] - ref["boxes"][i]).abs() <= tol).all(1)
        ok &= (got["scores"] - ref["scores"][i]).abs() <= 1e-3 * ref["scores"][i].abs() + 1e-5
        idx = ok.nonzero().flatten()
        if len(idx):
            j = int(idx[0])
            used[j] = True
            matched += 1
            if "mask_areas" in ref:
                a, b = float(ref["mask_areas"][i]), float(got["mask_areas"][j])
                assert abs(a - b) <= 0.02 * a + 2, f"{where}: mask area {b} vs reference {a} (detection {i})"
    assert matched >= 0.97 * n, f"{where}: only {matched} of {n} reference detections found"


def compare_losses(ref: dict[str, float], got: dict[str, float], where: str) -> None:
    assert set(got) == set(ref), f"{where}: loss keys {sorted(got)} vs reference {sorted(ref)}"
    for k, v in ref.items():
        assert math.isclose(got[k], v, rel_tol=1e-4, abs_tol=1e-6), f"{where}: {k} = {got[k]!r}, reference {v!r}"


# ----------------------------------------------------------------------------------------------- generation
def _generate_before() -> dict[str, Any]:  # pragma: no cover - run by hand against the pre-redesign code
    """Summaries computed with the pre-redesign API: Normalize from the val pipeline, model fed normalised floats."""
    from densedet.config import list_configs, load_config
    from densedet.data.transforms import Normalize
    from densedet.deploy.onnx_export import normalize_params
    from densedet.models.build import build_detector
    from densedet.structures.masks import InstanceMasks

    torch.set_num_threads(1)  # as the test suite (conftest.py): same reduction order, same rounding
    pixels = make_pixels()
    metas = make_metas()
    refs: dict[str, Any] = {"configs": {}, "models": {}}
    for name in list_configs():
        raw = load_config(name, validate_model=False)
        kind = "two" if "roi_head" in raw.model else "single"
        cfg = load_config(name, OVERRIDES[kind] + ["model.backbone.pretrained=null"])
        norm = normalize_params(cfg)
        key = model_key(cfg.model, norm)
        refs["configs"][name] = key
        if key in refs["models"]:
            continue
        torch.manual_seed(0)
        model = build_detector(cfg.model, init=False)
        fill_weights(model)
        mean, std, to_rgb = norm
        step = Normalize(mean, std, to_rgb)
        batch = torch.zeros(2, 3, 96, 128)
        for i, px in enumerate(pixels):
            img = step({"img": px.copy(), "meta": {}})["img"]
            batch[i, :, : img.shape[1], : img.shape[2]] = img
        num_classes = model.num_classes
        with_mask = kind == "two" and model.with_mask
        targets = make_targets(num_classes, with_mask)
        for t, (h, w) in zip(targets, IMAGE_SHAPES):
            if with_mask:
                t["masks"] = InstanceMasks.from_coco(t.pop("polygons"), h, w)
        model.eval()
        with torch.no_grad():
            dets = model(batch, metas=[dict(m) for m in metas], mode="predict")
        model.train()
        torch.manual_seed(0)
        losses = model(batch, targets=targets, metas=[dict(m) for m in metas], mode="loss")
        refs["models"][key] = {"config": name, "predict": summarize_predictions(dets),
                               "loss": summarize_losses(losses)}
        print(name, key, {k: round(v, 4) for k, v in refs["models"][key]["loss"].items() if k.startswith("loss")},
              flush=True)
    return refs


def summaries_now(name: str) -> dict[str, Any]:
    """``{"predict", "loss"}`` summaries of built-in config ``name`` computed by the current code (uint8 batch,
    the model's own ``data_preprocessor``): what ``test_contract_equality.py`` compares with the reference."""
    from densedet.config import load_config
    from densedet.models.build import build_detector
    from densedet.structures.masks import InstanceMasks

    raw = load_config(name, validate_model=False)
    kind = "two" if "roi_head" in raw.model else "single"
    cfg = load_config(name, OVERRIDES[kind] + ["model.backbone.pretrained=null"])
    torch.manual_seed(0)
    model = build_detector(cfg.model, init=False)
    fill_weights(model)
    batch = torch.zeros(2, 3, 96, 128, dtype=torch.uint8)  # pixels, as collate pads them: the model normalises
    for i, px in enumerate(make_pixels()):
        batch[i, :, : px.shape[0], : px.shape[1]] = torch.from_numpy(px).permute(2, 0, 1)
    with_mask = kind == "two" and model.with_mask
    targets = make_targets(model.num_classes, with_mask)
    for t, (h, w) in zip(targets, IMAGE_SHAPES):
        if with_mask:
            t["masks"] = InstanceMasks.from_coco(t.pop("polygons"), h, w)
    model.eval()
    with torch.no_grad():
        dets = summarize_predictions(model(batch, metas=make_metas(), mode="predict"))
    model.train()
    torch.manual_seed(0)
    losses = summarize_losses(model(batch, targets=targets, metas=make_metas(), mode="loss"))
    return {"predict": dets, "loss": losses}


def update_reference(names: list[str]) -> None:  # pragma: no cover - run by hand for an intended change
    """Recompute the reference entries of the models of configs ``names`` with the current code and keep every
    other entry as it is (``python tests/contract_fixture.py --update NAME ...``); say why in the commit."""
    torch.set_num_threads(1)  # as the test suite (conftest.py)
    refs = torch.load(REFERENCE, weights_only=True)
    for name in names:
        key = refs["configs"][name]
        refs["models"][key] = {"config": refs["models"][key].get("config", name), **summaries_now(name)}
        print(name, key, {k: round(v, 4) for k, v in refs["models"][key]["loss"].items() if k.startswith("loss")},
              flush=True)
    torch.save(refs, REFERENCE)
    print(f"updated {len(names)} entries of {REFERENCE}")


if __name__ == "__main__":  # pragma: no cover
    import sys

    if sys.argv[1:2] == ["--update"]:
        update_reference(sys.argv[2:])
    else:
        REFERENCE.parent.mkdir(exist_ok=True)
        torch.save(_generate_before(), REFERENCE)
        print(f"wrote {REFERENCE}")
