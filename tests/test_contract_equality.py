"""Before/after equality of the detector-contract redesign: every built-in config, at name-seeded weights, gives the
detections and losses that the code before the redesign gave (``tests/data/contract_reference.pt``, written by
``tests/contract_fixture.py`` from commit 0fb0683, when the data pipeline normalised and the model took floats).
Now the batch is uint8 pixels and the model's ``data_preprocessor`` normalises: the same numbers must come out."""

from __future__ import annotations

import pytest
import torch
from contract_fixture import (
    IMAGE_SHAPES,
    OVERRIDES,
    REFERENCE,
    compare_detections,
    compare_losses,
    fill_weights,
    make_metas,
    make_pixels,
    make_targets,
    summarize_losses,
    summarize_predictions,
)

from densedet.config import list_configs, load_config
from densedet.models.build import build_detector
from densedet.structures.masks import InstanceMasks

REF = torch.load(REFERENCE, weights_only=True) if REFERENCE.is_file() else {"configs": {}, "models": {}}
# one test per distinct model (configs that differ only in data / schedule share their model's reference)
FIRST = {}
for _name, _key in sorted(REF["configs"].items()):
    FIRST.setdefault(_key, _name)


def test_every_builtin_config_has_a_reference() -> None:
    assert sorted(REF["configs"]) == list_configs()


@pytest.mark.parametrize("name", sorted(FIRST.values()))
def test_outputs_equal_the_pre_redesign_code(name: str) -> None:
    ref = REF["models"][REF["configs"][name]]
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
    for i, (r, g) in enumerate(zip(ref["predict"], dets)):
        compare_detections(r, g, f"{name} image {i}")
    compare_losses(ref["loss"], losses, name)
