"""Whether bfloat16 autocast is native on a device.

bf16 inference (``--precision bf16``) and bf16 autocast training (``runtime.amp`` on CPU) pay off only where the
hardware computes in bfloat16: AVX512-BF16 or AMX on x86 CPUs, Ampere or newer on CUDA. A CPU with only AVX2
(or AVX-512 without the BF16 extension) runs oneDNN's bf16 convolutions through conversions to float32: measured
on an AVX2-only 2-core guest with torch 2.14, a 3x3 64-channel convolution took 19 ms in bf16 (channels_last)
against 3 ms in float32, 116 ms in bf16 NCHW. The models still run correctly; the user is told once per process.
"""
from __future__ import annotations

import warnings

import torch

_warned: set[str] = set()


def bf16_emulation_note(device: torch.device | str) -> str | None:
    """A sentence saying why bf16 autocast on ``device`` is slower than float32, or ``None`` where it is native."""
    device = torch.device(device)
    if device.type == "cpu":
        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return None
        return (f"this CPU has no native bfloat16 (no AVX512-BF16 or AMX; torch reports "
                f"{torch.backends.cpu.get_cpu_capability()}), so bf16 convolutions are emulated and run several "
                f"times slower than float32: use fp32 here")
    if (device.type == "cuda" and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        return "this GPU has no native bfloat16 (it needs compute capability 8.0 or newer): use fp32 here"
    return None


def warn_if_bf16_emulated(device: torch.device | str) -> None:
    """Warn (a ``RuntimeWarning``, once per process and device type) when bf16 on ``device`` is emulated."""
    device = torch.device(device)
    if device.type in _warned:
        return
    note = bf16_emulation_note(device)
    if note is not None:
        _warned.add(device.type)
        warnings.warn(f"bf16 requested: {note}", RuntimeWarning, stacklevel=3)
