"""``--compile`` (runtime.compile): torch.compile of backbone + neck + head for inference, decode/NMS eager."""

import shutil

import pytest
import torch

from densedet.api import build_model
from densedet.errors import NotImplementedConfigError
from densedet.models import compile as compile_mod


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler")
def test_compiled_network_equals_eager_and_training_stays_eager():
    torch.manual_seed(0)
    model = build_model("atss_r18_fpn_synth").eval()
    model.bbox_head.test_cfg.score_thr = 0.0  # keep candidates so decode + NMS see the compiled outputs
    model.use_channels_last(True).fuse()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ref = model(x, mode="tensor")
        ref_dets = model(x, mode="predict")[0]
        model.set_compile(True)
        assert model._compiled is not None
        out = model(x, mode="tensor")
        dets = model(x, mode="predict")[0]
    leaves = list(zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)))
    assert len(leaves) == 3 * 5  # cls, reg, centerness x 5 levels
    # Inductor reorders float sums (and folds the weights), so equal to float32 rounding, not bit-exact
    assert max(_rel(a, b) for a, b in leaves) < 1e-4
    n = min(len(dets["boxes"]), 50)
    assert n > 0 and torch.allclose(dets["boxes"][:n], ref_dets["boxes"][:n], rtol=1e-4, atol=1e-3)
    assert torch.equal(dets["labels"][:n], ref_dets["labels"][:n])
    model.set_compile(False)
    assert model._compiled is None


def test_compile_not_available_for_two_stage_and_without_a_compiler(monkeypatch):
    with pytest.raises(NotImplementedConfigError, match="two-stage"):
        build_model("mask_rcnn_r18_fpn_synth").set_compile(True)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_mod.shutil, "which", lambda name: None)
    with pytest.raises(NotImplementedConfigError, match="C\\+\\+ compiler") as err:
        build_model("atss_r18_fpn_synth").set_compile(True)
    assert err.value.path == "runtime.compile"


def test_runtime_compile_is_a_typed_config_value():
    from densedet.config import load_config
    from densedet.registry import ConfigError

    assert load_config("atss_r18_fpn_synth").runtime.compile is False
    assert load_config("atss_r18_fpn_synth", ["runtime.compile=true"]).runtime.compile is True
    with pytest.raises(ConfigError, match="runtime.compile"):
        load_config("atss_r18_fpn_synth", ["runtime.compile=sometimes"])


def test_onnx_model_refuses_compile_and_bf16_as_config_errors():
    """An exported file runs as exported: --compile / --precision bf16 are one-line config errors (exit 2), not
    tracebacks; compile=False / fp32 are accepted (what Predictor passes by default)."""
    from densedet.deploy.runtime import OnnxRuntimeModel
    from densedet.registry import ConfigError

    model = OnnxRuntimeModel.__new__(OnnxRuntimeModel)  # the options never touch the session
    assert model.set_compile(False) is model and model.set_precision("fp32") is model
    with pytest.raises(ConfigError, match="drop --compile") as err:
        model.set_compile(True)
    assert err.value.path == "runtime.compile" and err.value.exit_code == 2
    with pytest.raises(ConfigError, match="drop --precision") as err:
        model.set_precision("bf16")
    assert err.value.path == "runtime.precision"
