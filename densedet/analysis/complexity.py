"""Model complexity: parameters, multiply-adds, activation memory and the backbone's stages (``densedet info``).

Everything is measured on a forward pass with fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes
and dtypes, no data), so a Swin-L at 1333x800 costs a second and no memory:

- **FLOPs** through ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-add of
  convolutions and matrix products. They are reported as **multiply-adds (GMac)**, half its count, because that is
  what MMDetection's ``tools/analysis_tools/get_flops.py`` prints as "GFLOPs" (mmcv's ``get_model_complexity_info``
  counts one multiply-add as one FLOP). mmcv also counts BatchNorm, activations, pooling and conv bias adds, about
  0.3 % more on RetinaNet-R50 (tested against MMDetection's published 239.32 "GFLOPs" at 1280x800). Deformable
  convs count their sampling matmul (mmcv skips them), RoIAlign / NMS / decoding are not counted (as in mmcv).
- The input is ``(batch, 3, H, W)`` at ``--size HxW`` (MMDetection's default shape: 1280x800), through the model's
  own preprocessing (padding to ``size_divisor``) and its network (``mode="tensor"``: backbone, neck, dense head or
  RPN). A two-stage model adds its R-CNN heads on ``proposals`` RoIs (masks on ``mask_rois``), MMDetection 2.x's
  ``forward_dummy`` (1000 and 100).
- **Parameters**: total and trainable (``requires_grad``; MMDetection's "Params" counts the trainable ones, so
  frozen stages are left out there).
- **Activation memory**, weights and the input image excluded: the peak of the tensors alive at once during an
  inference forward (``no_grad``), and the tensors a training forward keeps for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks``, each storage once). Framework workspaces (cuDNN) are not included.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Complexity", "ModuleStats", "format_complexity", "model_complexity"]

MMDET_DEFAULT_SIZE = (1280, 800)  # get_flops.py --shape default: input (1, 3, 1280, 800)


@dataclass
class ModuleStats:
    """One row: a top-level module of the detector or a stage of its backbone. ``macs``: multiply-adds;
    ``out_shape``: the output's shape (first tensor of a tuple) for backbone stages; ``stride``: input height /
    output height when the output is a ``(B, C, H, W)`` map."""

    name: str
    kind: str
    params: int
    trainable: int
    macs: int
    out_shape: tuple[int, ...] | None = None
    stride: float | None = None


@dataclass
class Complexity:
    """What :func:`model_complexity` measured (see the module docstring for the definitions)."""

    model: str
    size: tuple[int, int]
    batch: int
    params: int
    trainable: int
    macs: int
    modules: list[ModuleStats]
    stages: list[ModuleStats]
    inference_peak_bytes: int | None = None
    train_saved_bytes: int | None = None
    roi: dict[str, int] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------ memory
class _LiveTensors(TorchDispatchMode):
    """Bytes of the storages created by the ops run under this mode that are alive at once (peak). A storage counts
    from the op that creates it until the last tensor using it is freed; ``skip``: storages not to count (weights,
    the input)."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip = skip
        self.refs: dict[int, list[int]] = {}  # storage key -> [bytes, live tensors]
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.skip:
            return
        if key not in self.refs:
            self.refs[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.refs[key]


@contextmanager
def _saved_for_backward(skip: set[int]) -> Iterator[dict[int, int]]:
    """Collect ``{storage key: bytes}`` of every tensor autograd saves (each storage once, ``skip`` left out)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            saved.setdefault(storage._cdata, storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


# ------------------------------------------------------------------------------------------------------ measuring
def _count(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _stage_modules(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's direct children, a ``ModuleList`` (never called itself: Swin's ``stages``) replaced by its
    items."""
    out = []
    for name, child in backbone.named_children():
        if isinstance(child, nn.ModuleList):
            out.extend((f"{name}.{i}", item) for i, item in enumerate(child))
        else:
            out.append((name, child))
    return out


def _rcnn_heads(model: nn.Module, batch: int, proposals: int, mask_rois: int) -> Any:
    """A two-stage model's R-CNN heads on zero RoI features of the sizes their extractors produce (MMDetection's
    ``forward_dummy``); None for a one-stage model."""
    roi_head = getattr(model, "roi_head", None)
    if roi_head is None:
        return None
    size = roi_head.bbox_head.roi_feat_size
    outs = roi_head.bbox_head(torch.zeros((batch * proposals, roi_head.bbox_roi_extractor.out_channels, size, size)))
    if getattr(roi_head, "with_mask", False):
        size = roi_head.mask_head.roi_feat_size
        outs = (outs, roi_head.mask_head(torch.zeros((batch * mask_rois, roi_head.mask_roi_extractor.out_channels,
                                                       size, size))))
    return outs


def _forward(model: nn.Module, images: torch.Tensor, proposals: int, mask_rois: int) -> Any:
    """The network in ``tensor`` mode (preprocessing, backbone, neck, dense head / RPN), then the R-CNN heads."""
    return model(images, mode="tensor"), _rcnn_heads(model, images.shape[0], proposals, mask_rois)


def model_complexity(model: nn.Module, size: tuple[int, int] = MMDET_DEFAULT_SIZE, batch: int = 1,
                     proposals: int = 1000, mask_rois: int = 100, memory: bool = True) -> Complexity:
    """Measure ``model`` (a DenseDet detector) at input ``size`` = (H, W) pixels.

    Args:
        batch: images per forward (MACs and memory scale with it).
        proposals / mask_rois: RoIs a two-stage model's box / mask head runs on.
        memory: also measure the activation memory (two more fake forwards).

    Returns:
        :class:`Complexity`; the model is left in the train/eval mode it had, its weights untouched.
    """
    h, w = (int(v) for v in size)
    if h < 1 or w < 1 or batch < 1:
        raise ValueError(f"model_complexity: size and batch must be positive, got {size} and {batch}")
    root = type(model).__name__
    was_training = model.training
    backbone = getattr(model, "backbone", None)
    stage_mods = _stage_modules(backbone) if backbone is not None else []
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {}

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple, out: Any) -> None:
            x = next((a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)), None)
            y = next((o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)), None)
            if y is not None:
                shapes[name] = (tuple(y.shape), tuple(x.shape) if x is not None else None)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in stage_mods]
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    counter = FlopCounterMode(display=False)
    heads = FlopCounterMode(display=False)  # apart: called directly, the heads are not named below the model
    try:
        model.eval()
        with fake:
            images = torch.zeros((batch, 3, h, w), dtype=torch.uint8)
            with torch.no_grad():
                with counter:
                    model(images, mode="tensor")
                with heads:
                    _rcnn_heads(model, batch, proposals, mask_rois)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    flops = counter.get_flop_counts()
    head_macs = int(heads.get_total_flops()) // 2

    def macs_of(path: str) -> int:
        return int(sum(flops.get(f"{root}.{path}", {}).values())) // 2

    modules = []
    for name, child in model.named_children():
        p, t = _count(child)
        macs = macs_of(name) + (head_macs if name == "roi_head" else 0)
        modules.append(ModuleStats(name, type(child).__name__, p, t, macs))
    stages = []
    for name, mod in stage_mods:
        p, t = _count(mod)
        out_shape, in_shape = shapes.get(name, (None, None))
        stride = None
        if out_shape is not None and len(out_shape) == 4 and out_shape[-2] > 0:
            stride = h / out_shape[-2]
        stages.append(ModuleStats(name, type(mod).__name__, p, t, macs_of(f"backbone.{name}"), out_shape, stride))
    total, trainable = _count(model)
    result = Complexity(root, (h, w), batch, total, trainable, int(counter.get_total_flops()) // 2 + head_macs,
                        modules, stages)
    if hasattr(model, "roi_head"):
        result.roi = {"proposals": proposals, "mask_rois": mask_rois if getattr(model.roi_head, "with_mask", False)
                      else 0}
    if memory:
        result.inference_peak_bytes, result.train_saved_bytes = _activation_memory(model, (batch, 3, h, w),
                                                                                   proposals, mask_rois)
    return result


def _activation_memory(model: nn.Module, shape: tuple[int, ...], proposals: int, mask_rois: int) -> tuple[int, int]:
    """(inference peak bytes, training saved-for-backward bytes), weights / buffers / input excluded."""
    was_training = model.training
    # a training forward counts batches in BatchNorm (num_batches_tracked += 1 on the real buffer): put them back
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with fake:
            images = torch.zeros(shape, dtype=torch.uint8)
            # weights: autograd saves the real parameters, the ops see their fake twins; neither counts. The twins are
            # memoised weakly: hold them, or a freed twin's storage address would be reused by an activation.
            weights = (*model.parameters(), *model.buffers())
            twins = [fake.from_tensor(t) for t in weights]
            skip = {t.untyped_storage()._cdata for t in (*weights, *twins)}
            skip.add(images.untyped_storage()._cdata)
            model.eval()
            meter = _LiveTensors(skip)
            with torch.no_grad(), meter:
                outs = _forward(model, images, proposals, mask_rois)
            del outs
            model.train()
            with _saved_for_backward(skip) as saved:
                outs = _forward(model, images, proposals, mask_rois)
            del outs, twins
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return meter.peak, sum(saved.values())


# ------------------------------------------------------------------------------------------------------ printing
def _num(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n} B"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                                 enumerate(zip(cells, widths))) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    return [rule, line(header), rule, *(line(r) for r in rows), rule]


def format_complexity(c: Complexity, name: str | None = None) -> str:
    """The report ``densedet info`` prints: summary lines, the per-module table and the backbone-stage table."""
    h, w = c.size
    lines = [f"{name or c.model}: {c.model}, input {c.batch}x3x{h}x{w} (batch x channels x H x W)"]
    if c.roi:
        roi = f"{c.roi['proposals']} proposals" + (f", masks on {c.roi['mask_rois']}" if c.roi["mask_rois"] else "")
        lines.append(f"R-CNN heads counted on {roi} per image (MMDetection's forward_dummy)")
    lines += [
        f"parameters: {_num(c.params)} total, {_num(c.trainable)} trainable (MMDetection's get_flops 'Params' is "
        f"the trainable count)",
        f"multiply-adds: {c.macs / 1e9:.2f} GMac (FlopCounterMode's conv/matmul FLOPs / 2; MMDetection's get_flops "
        f"prints this unit as 'GFLOPs'; {2 * c.macs / 1e9:.2f} GFLOPs counting multiplies and adds apart)",
        f"activation memory: inference peak {_bytes(c.inference_peak_bytes)} of live tensors; a training forward "
        f"keeps {_bytes(c.train_saved_bytes)} for backward (weights and the uint8 input excluded)",
        "",
    ]
    rows = [[f"{m.name} ({m.kind})", _num(m.params), _num(m.trainable), f"{m.macs / 1e9:.3f}",
             f"{100 * m.macs / c.macs:.1f}" if c.macs else "-"] for m in c.modules]
    rows.append(["total", _num(c.params), _num(c.trainable), f"{c.macs / 1e9:.3f}", "100.0" if c.macs else "-"])
    lines += _table(["module", "params", "trainable", "GMac", "%"], rows)
    if c.stages:
        lines += ["", "backbone stages:"]
        rows = []
        for s in c.stages:
            shape = "x".join(str(v) for v in s.out_shape[1:]) if s.out_shape else "-"
            stride = f"{s.stride:g}" if s.stride else "-"
            rows.append([f"{s.name} ({s.kind})", shape, stride, _num(s.params), f"{s.macs / 1e9:.3f}"])
        lines += _table(["stage", "output (per image)", "stride", "params", "GMac"], rows)
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)
