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


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler")
def test_compiled_two_stage_network_gives_the_eager_detections():
    """Mask R-CNN: backbone + neck + RPN compiled; proposals, the RoI head and the mask paste stay eager."""
    torch.manual_seed(0)
    model = build_model("mask_rcnn_r18_fpn_synth").eval().fuse()
    model.set_score_thr(0.0)
    x = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        ref = model(x, mode="predict")[0]
        model.set_compile(True)
        got = model(x, mode="predict")[0]
    n = min(len(ref["boxes"]), 30)
    assert n > 0 and torch.allclose(got["boxes"][:n], ref["boxes"][:n], rtol=1e-3, atol=1e-2)
    assert torch.equal(got["labels"][:n], ref["labels"][:n])
    assert len(got["masks"]) == len(got["boxes"])


def test_compile_needs_a_compiler(monkeypatch):
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


def test_onnx_model_refuses_compile_and_bf16_as_config_errors(tmp_path):
    """An exported file runs as exported: load_detector refuses --compile / --precision bf16 with one-line config
    errors (exit 2) before the file is opened, not tracebacks."""
    from densedet.config import load_config
    from densedet.inference import load_detector
    from densedet.registry import ConfigError

    fake = tmp_path / "m.onnx"
    fake.write_bytes(b"not opened")
    cfg = load_config("atss_r18_fpn_synth")
    with pytest.raises(ConfigError, match="drop --compile") as err:
        load_detector(cfg, fake, compile=True)
    assert err.value.path == "runtime.compile" and err.value.exit_code == 2
    with pytest.raises(ConfigError, match="drop --precision") as err:
        load_detector(cfg, fake, precision="bf16")
    assert err.value.path == "runtime.precision"
