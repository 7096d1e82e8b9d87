"""Names that moved in the detector-contract redesign keep working with a DeprecationWarning, and old configs with
a ``Normalize`` pipeline step load into models that normalise themselves (densedet/config/legacy.py)."""

from __future__ import annotations

import importlib

import pytest
import torch

from densedet.config import load_config
from densedet.config.legacy import move_normalize_into_model
from densedet.registry import ConfigError

NORM = {"type": "Normalize", "mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0], "to_rgb": False}


@pytest.mark.parametrize(("old", "new", "name"), [
    ("densedet.data.masks", "densedet.structures.masks", "InstanceMasks"),
    ("densedet.diagnostics", "densedet.analysis.levels", "levels_report"),
    ("densedet.bench", "densedet.analysis.bench", "run_bench"),
    ("densedet.engine.dist", "densedet.dist", "reduce_mean"),
    ("densedet.zoo", "densedet.weights", "fetch_zoo_weights"),
    ("densedet.compat.mmdet", "densedet.weights.mmdet", "convert_mmdet_checkpoint"),
])
def test_old_module_paths_warn_and_give_the_new_objects(old: str, new: str, name: str) -> None:
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_config_level_export_says_where_it_moved() -> None:
    # no alias (deploy is below the config-level API), but the error names the new place
    import densedet.deploy

    with pytest.raises(AttributeError, match=r"densedet\.export \(same arguments\)"):
        densedet.deploy.export  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        densedet.deploy.nothing_here  # noqa: B018
    assert callable(densedet.deploy.export_detector)


def test_predict_candidates_is_an_alias_of_candidates() -> None:
    from densedet.api import build_model

    torch.manual_seed(0)
    model = build_model("atss_r18_fpn_synth").eval()
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    metas = [{"img_shape": (64, 64)}]
    with torch.no_grad():
        outs = model(x, mode="tensor")
        with pytest.warns(DeprecationWarning, match="candidates"):
            old = model.bbox_head.predict_candidates(outs, metas)
        new = model.candidates(outs, metas)
    assert all(torch.equal(a, b) for a, b in zip(old, new))


def test_normalize_steps_move_into_the_model() -> None:
    raw = {"model": {"type": "RetinaNet"}, "data": {"size_divisor": 16, "train": {"pipeline": [
        {"type": "Resize"}, NORM]}, "val": {"pipeline": [{"type": "MultiScaleFlipAug", "transforms": [
            {"type": "Resize"}, NORM]}]}}}
    with pytest.warns(DeprecationWarning, match="Normalize"):
        out = move_normalize_into_model(raw, {}, "old.yaml")
    assert out["model"]["data_preprocessor"] == {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0], "to_rgb": False,
                                                 "pad_size_divisor": 16}
    assert out["data"]["train"]["pipeline"] == [{"type": "Resize"}]
    assert out["data"]["val"]["pipeline"][0]["transforms"] == [{"type": "Resize"}]
    assert raw["data"]["train"]["pipeline"][-1] == NORM  # the input is not modified


@pytest.mark.parametrize(("pipelines", "match"), [
    ({"train": [NORM], "val": [{**NORM, "mean": [0, 0, 0]}]}, "normalises differently"),
    ({"train": [NORM, {"type": "RandomFlip"}]}, "come after Normalize"),
])
def test_normalize_shim_refuses_what_it_cannot_move(pipelines: dict, match: str) -> None:
    raw = {"model": {"type": "RetinaNet"}, "data": {k: {"pipeline": v} for k, v in pipelines.items()}}
    with pytest.raises(ConfigError, match=match):
        move_normalize_into_model(raw, {}, "old.yaml")


def test_user_written_preprocessor_disagreeing_with_normalize_is_an_error() -> None:
    raw = {"model": {"type": "RetinaNet", "data_preprocessor": {"mean": [9, 9, 9]}},
           "data": {"train": {"pipeline": [NORM]}}}
    with pytest.raises(ConfigError, match="disagrees"):
        move_normalize_into_model(raw, {"model.data_preprocessor": "/my/config.yaml"}, "my.yaml")


def test_an_old_style_override_gives_the_same_model_input() -> None:
    """A built-in config with an old-style pipeline override (Normalize at the end) normalises as before."""
    new = load_config("atss_r18_fpn_synth")
    with pytest.warns(DeprecationWarning):
        old = load_config("atss_r18_fpn_synth", ["data.val.pipeline=[{type: Resize, img_scale: [96, 96]}, "
                                                 "{type: Normalize}]"])
    assert old.model["data_preprocessor"] == new.model["data_preprocessor"]
    assert [s["type"] for s in old.data.val.pipeline] == ["Resize"]


def test_aliases_know_only_the_names_that_moved() -> None:
    import densedet.compat.mmdet
    import densedet.engine.dist

    with pytest.raises(AttributeError, match="'densedet.engine.dist' has no attribute 'no_such_name'"):
        densedet.engine.dist.no_such_name  # noqa: B018
    # a restricted alias: weights.mmdet has other names (nn), but only convert_mmdet_checkpoint moved from compat
    assert hasattr(importlib.import_module("densedet.weights.mmdet"), "nn")
    with pytest.raises(AttributeError, match="'densedet.compat.mmdet' has no attribute 'nn'"):
        densedet.compat.mmdet.nn  # noqa: B018
