"""Model-owned pixel preprocessing: the detector, not the data pipeline, turns pixels into its input.

As Detectron2 (``pixel_mean`` / ``pixel_std`` buffers), torchvision (``GeneralizedRCNNTransform``) and MMDetection 3
(``DetDataPreprocessor``) do: the data pipeline and collate carry ``uint8`` images (4x less memory traffic and
host-to-device copy than float32), and :class:`DetPreprocessor` normalises them on the model's device. The same
module runs in training, evaluation, the Python API and inside an exported ONNX graph, so the four cannot disagree.

Semantics are those of the ``Normalize`` pipeline step followed by collate's zero padding (mmcv ``imnormalize`` +
mmdet ``Pad``): ``(x - mean) / std`` per channel in the channel order of the network input (``to_rgb: false`` swaps
DenseDet's RGB images to BGR first, for Caffe-style weights), every pixel outside an image's own ``img_shape`` set
to 0 *after* normalising, and the batch zero-padded bottom/right to a multiple of ``pad_size_divisor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densedet.registry import ConfigError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DetPreprocessor", "build_preprocessor"]

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class DetPreprocessor(nn.Module):
    """``(B, 3, H, W)`` pixels (``uint8``, or float in 0..255) -> ``(B, 3, Hp, Wp)`` float32 network input.

    Args:
        mean, std: per channel, in 0..255 units and in the channel order of the network input. The defaults
            (0 and 1) keep the pixels as they are: a model built from a bare model dict without
            ``data_preprocessor`` takes already-normalised input, as before normalisation moved into the model.
        to_rgb: ``False`` flips DenseDet's RGB images to BGR before normalising (Caffe-style weights).
        pad_size_divisor: the output's height and width are multiples of it (1: no padding).

    ``mean`` / ``inv_std`` are non-persistent buffers: checkpoints keep the layout of MMDetection's (which hold no
    normalisation), and the values come from the config.
    """

    def __init__(self, mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 to_rgb: bool = True, pad_size_divisor: int = 1) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ConfigError(f"model.data_preprocessor: mean and std need 3 values each, got {list(mean)!r}, "
                              f"{list(std)!r}", path="model.data_preprocessor")
        if min(float(s) for s in std) <= 0:
            raise ConfigError(f"model.data_preprocessor.std must be positive, got {list(std)!r}",
                              path="model.data_preprocessor.std")
        if int(pad_size_divisor) < 1:
            raise ConfigError(f"model.data_preprocessor.pad_size_divisor must be >= 1, got {pad_size_divisor!r}",
                              path="model.data_preprocessor.pad_size_divisor")
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32)
        self.register_buffer("mean", torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        # 1 / std in float32 and a multiply, as the Normalize step computed it (bit-identical outputs)
        self.register_buffer("inv_std", (1.0 / std_t).view(1, 3, 1, 1), persistent=False)
        self.to_rgb = bool(to_rgb)
        self.pad_size_divisor = int(pad_size_divisor)
        self.identity = (not any(float(m) for m in mean)) and all(float(s) == 1.0 for s in std) and self.to_rgb

    def extra_repr(self) -> str:
        std = (1.0 / self.inv_std.flatten()).tolist()
        return (f"mean={[round(v, 4) for v in self.mean.flatten().tolist()]}, std={[round(v, 4) for v in std]}, "
                f"to_rgb={self.to_rgb}, pad_size_divisor={self.pad_size_divisor}")

    def config(self) -> dict[str, Any]:
        """The ``model.data_preprocessor`` mapping that builds this module."""
        return {"mean": self.mean.flatten().tolist(), "std": (1.0 / self.inv_std.flatten()).tolist(),
                "to_rgb": self.to_rgb, "pad_size_divisor": self.pad_size_divisor}

    def forward(self, images: Tensor, metas: Sequence[dict[str, Any]] | None = None) -> Tensor:
        """Normalise ``images`` (B, 3, H, W); with ``metas`` (per image ``img_shape`` (h, w)) the pixels outside each
        image's own area (batch padding) become 0; then pad to ``pad_size_divisor``."""
        x = images if images.dtype == torch.float32 else images.float()
        if not self.identity:
            if not self.to_rgb:
                x = x.flip(1)
            x = (x - self.mean) * self.inv_std
            if metas is not None:
                x = _zero_outside(x, metas)
        d = self.pad_size_divisor
        h, w = x.shape[-2:]
        # While tracing / exporting the sizes are symbolic: pad unconditionally (zero amounts pad nothing), so the
        # graph pads every input size, not only the one it was traced at.
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if d > 1 and (tracing or h % d or w % d):
            x = F.pad(x, (0, (w + d - 1) // d * d - w, 0, (h + d - 1) // d * d - h))
        return x


def _zero_outside(x: Tensor, metas: Sequence[dict[str, Any]]) -> Tensor:
    """Zero every pixel of image ``i`` outside ``metas[i]["img_shape"]`` (collate pads bottom/right)."""
    hp, wp = x.shape[-2:]
    shapes = [tuple(int(v) for v in m.get("img_shape", (hp, wp))[:2]) for m in metas]
    if all(h >= hp and w >= wp for h, w in shapes):
        return x
    hs = torch.tensor([s[0] for s in shapes], device=x.device)
    ws = torch.tensor([s[1] for s in shapes], device=x.device)
    inside = ((torch.arange(hp, device=x.device)[None, :, None] < hs[:, None, None])
              & (torch.arange(wp, device=x.device)[None, None, :] < ws[:, None, None]))
    return x * inside[:, None].to(x.dtype)


def build_preprocessor(cfg: dict[str, Any] | None) -> DetPreprocessor:
    """``model.data_preprocessor`` (mmdet 3's ``DetDataPreprocessor`` keys ``mean``, ``std``, ``bgr_to_rgb``,
    ``pad_size_divisor`` are accepted too) -> :class:`DetPreprocessor`; ``None`` -> identity."""
    cfg = dict(cfg or {})
    kind = cfg.pop("type", "DetDataPreprocessor")
    if kind not in ("DetDataPreprocessor", "DetPreprocessor"):
        raise ConfigError(f"model.data_preprocessor.type: only DetDataPreprocessor, got {kind!r}",
                          path="model.data_preprocessor.type")
    if "bgr_to_rgb" in cfg:  # mmdet 3 decodes BGR: bgr_to_rgb=True there means an RGB network input, to_rgb here
        cfg["to_rgb"] = bool(cfg.pop("bgr_to_rgb"))
    if cfg.get("pad_value", 0) != 0:
        raise ConfigError(f"model.data_preprocessor.pad_value={cfg['pad_value']!r}: only 0 (the padding is zero after "
                          "normalising) is available", path="model.data_preprocessor.pad_value")
    cfg.pop("pad_value", None)
    allowed = {"mean", "std", "to_rgb", "pad_size_divisor"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ConfigError(f"model.data_preprocessor: unknown key(s) {unknown} (known: {sorted(allowed)})",
                          path=f"model.data_preprocessor.{unknown[0]}")
    for key in ("mean", "std"):
        if key in cfg and (not isinstance(cfg[key], (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in cfg[key])):
            raise ConfigError(f"model.data_preprocessor.{key}={cfg[key]!r}: must be a list of 3 numbers",
                              path=f"model.data_preprocessor.{key}")
    return DetPreprocessor(**cfg)
