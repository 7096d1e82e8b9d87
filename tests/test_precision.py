"""bf16 on hardware without native bfloat16: one warning per process, the detections still computed."""
from __future__ import annotations

import warnings

import pytest
import torch

from densedet import build_model
from densedet.models import precision


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())


def _cpu_features(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("avx512_bf16,amx,native", [(False, False, False), (True, False, True), (False, True, True)])
def test_cpu_note_follows_the_cpu_features(monkeypatch, avx512_bf16, amx, native):
    _cpu_features(monkeypatch, avx512_bf16, amx)
    note = precision.bf16_emulation_note("cpu")
    assert (note is None) == native
    if not native:
        assert "AVX512-BF16" in note and "fp32" in note


def test_bf16_inference_warns_once_on_an_emulating_cpu(monkeypatch, fresh_warnings):
    _cpu_features(monkeypatch, False, False)
    model = build_model("atss_r18_fpn_synth").eval().set_precision("bf16")
    x = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        first = model(x, mode="tensor")
        model(x, mode="tensor")
    emulated = [w for w in caught if issubclass(w.category, RuntimeWarning) and "bf16" in str(w.message)]
    assert len(emulated) == 1, [str(w.message) for w in caught]
    assert all(t.dtype == torch.float32 for t in torch.utils._pytree.tree_leaves(first))


def test_no_warning_where_bf16_is_native_or_fp32(monkeypatch, fresh_warnings):
    _cpu_features(monkeypatch, True, False)
    model = build_model("atss_r18_fpn_synth").eval()
    x = torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model.set_precision("bf16")(x, mode="tensor")
        _cpu_features(monkeypatch, False, False)
        model.set_precision("fp32")(x, mode="tensor")  # fp32 never asks
    assert not [w for w in caught if "bf16 requested" in str(w.message)]
