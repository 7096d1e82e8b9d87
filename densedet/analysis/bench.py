"""``densedet bench``: latency of inference options (and torchvision's peer) side by side, in one process.

Every variant is built, warmed up, then the timed iterations alternate between variants (A B C A B C ..., the start
rotating each round) so all see the same background load on a shared machine; the table reports median / min / max
latency, images per second and the ratio to the first variant. The header names the CPU, the thread count and the
torch version; the 1-min load average is sampled during timing.

Variants (``mode="infer"``): ``densedet fp32 (default)`` - the model as ``Predictor`` ran it before BN folding
(config's ``channels_last``, fp32); then one per ``--precision`` with BN folding (``fused``), optionally
``channels_last`` / ``torch.compile``; ``onnxruntime fp32`` with ``--backend onnxruntime`` (the model exported at
the bench size); ``torchvision fp32`` with ``--against torchvision`` for RetinaNet and FCOS heads and for Mask /
Faster R-CNN (its pretrained recipe's architecture, built by :func:`build_torchvision_detector`; the two-stage peers
hold DenseDet's weights, :func:`copy_two_stage_weights`). Every DenseDet variant is loaded by
:func:`densedet.inference.load_detector`, so one- and two-stage detectors take the same options. ``mode="train"``:
one SGD step (lr 1e-5 so the weights stay put) per variant, bf16 meaning autocast around forward and loss.

Inputs: ``(B, 3, H, W)`` uint8 pixels (the models normalise them) and, for training, 10 random boxes per image
(with ellipse masks for Mask R-CNN).

Memory: ``peak +MiB`` is how much the process's peak RSS (``getrusage``) grew during the variant's warm-up; peaks
only grow, so a variant that needs less than an earlier one shows 0 (run it alone for its own number).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torchvision.models import resnet50
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor, resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from densedet.config import Config, load_config
from densedet.deploy.onnx_export import export_detector
from densedet.deploy.runtime import OnnxDetector
from densedet.errors import ConfigError
from densedet.inference.loading import load_detector, resolve_weights_path
from densedet.models.build import build_detector
from densedet.structures.masks import BitmapCrop, InstanceMasks, decode_segmentation
from densedet.structures.rle import encode_crop_rle
from densedet.weights import load_checkpoint, load_model_weights

__all__ = ["BenchResult", "add_bench_parser", "build_torchvision_detector", "cmd_bench", "copy_two_stage_weights",
           "cpu_name", "format_table", "make_batch", "parse_size", "run_bench", "torchvision_peer"]

# torchvision's detector for a config's head (dense detectors) or detector type (two-stage)
_TV_PEERS = {"RetinaHead": "retinanet", "FCOSHead": "fcos", "MaskRCNN": "maskrcnn", "FasterRCNN": "fasterrcnn"}


def cpu_name() -> str:
    """The CPU model from ``lscpu`` (or ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is KiB on Linux


def torchvision_peer(cfg: Any) -> str | None:
    """``'retinanet'`` / ``'fcos'`` / ``'maskrcnn'`` / ``'fasterrcnn'`` when torchvision has the config's
    architecture, else None."""
    head = (cfg.model.get("bbox_head") or {}).get("type")
    return _TV_PEERS.get(head) or _TV_PEERS.get(cfg.model.get("type"))


def build_torchvision_detector(arch: str, num_classes: int, size: tuple[int, int], score_thresh: float = 0.0,
                               nms_thresh: float = 0.5, detections: int = 100, topk: int = 1000) -> torch.nn.Module:
    """torchvision's RetinaNet / FCOS / Mask R-CNN / Faster R-CNN R50-FPN as its pretrained recipe builds it
    (FrozenBatchNorm2d, stem + layer1 frozen, ``trainable_layers=3``; dense: P6/P7 from P5; two-stage: RPN 2000 /
    1000 proposals in training and 1000 / 1000 at test, as mmdet's Mask R-CNN), without weights; its transform
    never rescales ``size`` (H, W) inputs (``min_size``/``max_size`` set to it)."""
    h, w = size
    if arch in ("maskrcnn", "fasterrcnn"):
        backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
        cls = MaskRCNN if arch == "maskrcnn" else FasterRCNN
        return cls(backbone, num_classes=num_classes + 1, min_size=min(h, w), max_size=max(h, w),
                   rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000, rpn_pre_nms_top_n_test=1000,
                   rpn_post_nms_top_n_test=1000, box_score_thresh=score_thresh, box_nms_thresh=nms_thresh,
                   box_detections_per_img=detections)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    common = {"min_size": min(h, w), "max_size": max(h, w), "score_thresh": score_thresh, "nms_thresh": nms_thresh,
              "detections_per_img": detections, "topk_candidates": topk}
    return {"retinanet": RetinaNet, "fcos": FCOS}[arch](backbone, num_classes, **common)


def copy_two_stage_weights(densedet_model: torch.nn.Module, tv_model: torch.nn.Module) -> None:
    """Load a DenseDet (mmdet-layout) Faster / Mask R-CNN R50-FPN's weights into torchvision's: same backbone names
    under ``backbone.body``, FPN ``lateral_convs`` / ``fpn_convs`` -> ``inner_blocks`` / ``layer_blocks``, RPN, box
    head (torchvision puts the background class first and has background box deltas, zero here) and mask head (its
    background mask channel is zero). The delta encodings agree (RPN stds 1, R-CNN stds 0.1/0.1/0.2/0.2 =
    torchvision's weights 10/10/5/5) and so does the RoI level mapping, so both compute the same network up to
    torchvision's rounded anchors and its RoIAlign at a fixed 2 x 2 samples per bin (mmdet: adaptive). With
    different random weights the two RPNs would keep different numbers of proposals after NMS, and the R-CNN heads
    would do different amounts of work."""
    def bg_first(v: torch.Tensor) -> torch.Tensor:  # classifier rows: background last -> first
        return torch.cat([v[-1:], v[:-1]])

    def zero_bg(rows: int) -> Any:  # prepend zero rows for torchvision's background deltas / mask channel
        return lambda v: torch.cat([v.new_zeros((rows, *v.shape[1:])), v])

    rh, tv = "roi_head.", "roi_heads."
    table = [("neck.lateral_convs.", "backbone.fpn.inner_blocks.", None),
             ("neck.fpn_convs.", "backbone.fpn.layer_blocks.", None),
             ("rpn_head.rpn_conv.", "rpn.head.conv.0.0.", None), ("rpn_head.rpn_cls.", "rpn.head.cls_logits.", None),
             ("rpn_head.rpn_reg.", "rpn.head.bbox_pred.", None),
             (rh + "bbox_head.shared_fcs.0.", tv + "box_head.fc6.", None),
             (rh + "bbox_head.shared_fcs.1.", tv + "box_head.fc7.", None),
             (rh + "bbox_head.fc_cls.", tv + "box_predictor.cls_score.", bg_first),
             (rh + "bbox_head.fc_reg.", tv + "box_predictor.bbox_pred.", zero_bg(4)),
             (rh + "mask_head.convs.", tv + "mask_head.", None),
             (rh + "mask_head.upsample.", tv + "mask_predictor.conv5_mask.", None),
             (rh + "mask_head.conv_logits.", tv + "mask_predictor.mask_fcn_logits.", zero_bg(1)),
             ("backbone.", "backbone.body.", None)]
    out: dict[str, torch.Tensor] = {}
    for k, v in densedet_model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        old, new, fn = next(row for row in table if k.startswith(row[0]))
        key = new + k[len(old):]
        if old.startswith(("neck.", rh + "mask_head.convs.")):
            key = key.replace(".conv.", ".0.")  # ConvModule's .conv -> Conv2dNormActivation's .0
        out[key] = fn(v) if fn else v
    tv_model.load_state_dict(out, strict=True)


def make_batch(batch: int, size: tuple[int, int], num_classes: int, seed: int = 0, boxes_per_image: int = 10,
               masks: bool = False) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Raw pixels ``(B, 3, H, W)`` uint8 and per-image random gt (xyxy pixels); with ``masks`` each box holds an
    ellipse mask (``masks_full`` (M, H, W) uint8 for torchvision, ``masks`` InstanceMasks for DenseDet)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images = torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8)
    targets = []
    for _ in range(batch):
        wh = 16 + torch.rand(boxes_per_image, 2, generator=g) * min(240, min(h, w) // 2)
        xy = torch.rand(boxes_per_image, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], 1).floor()
        t: dict[str, Any] = {"boxes": boxes, "labels": torch.randint(0, num_classes, (boxes_per_image,), generator=g),
                             "ignore_boxes": torch.zeros(0, 4)}
        if masks:
            full = np.zeros((boxes_per_image, h, w), np.uint8)
            yy, xx = np.mgrid[:h, :w]
            for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
                cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
                full[k] = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1
            t["masks_full"] = full
            t["masks"] = InstanceMasks([decode_segmentation(encode_crop_rle(BitmapCrop(0, 0, m), h, w), h, w)
                                        for m in full], h, w)
        targets.append(t)
    return images, targets


@dataclass
class BenchResult:
    name: str
    times_s: list[float] = field(default_factory=list)
    peak_growth_mib: float = 0.0
    error: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else float("nan")


def _densedet_variant(cfg: Any, checkpoint: str | None, mode: str, images: torch.Tensor, targets: list[dict],
                      precision: str, fused: bool, channels_last: bool, compile_: bool) -> Callable[[], Any]:
    torch.manual_seed(0)  # random weights: every variant gets the same ones
    h, w = images.shape[-2:]
    metas = [{"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": (h, w), "scale_factor": (1.0, 1.0)}
             for _ in range(images.shape[0])]
    if mode == "infer":  # what densedet test / predict / Predictor run
        model = load_detector(cfg, checkpoint, device="cpu", precision=precision, fuse=fused, compile=compile_,
                              channels_last=channels_last, backend="eager")
        if checkpoint is None:  # random weights score ~0.01: no threshold, so decode and NMS do their full work
            model.set_score_thr(0.0)

        def infer() -> Any:
            with torch.no_grad():
                return model(images, metas=metas, mode="predict")

        return infer
    model = build_detector(_bench_model_cfg(cfg), init=checkpoint is None)
    if checkpoint is not None:
        load_model_weights(model, load_checkpoint(resolve_weights_path(checkpoint, cfg.name)), strict=True,
                           source=str(checkpoint))
    model.use_channels_last(channels_last).train()
    if compile_:  # training: plain torch.compile of the network (the weights change every step)
        model.network = torch.compile(model.network, dynamic=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9,
                          weight_decay=1e-4)

    def train_step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = model(images, targets=targets, metas=metas, mode="loss")
        total = sum(v for k, v in losses.items() if k.startswith("loss"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return float(total.detach())

    return train_step


def _bench_model_cfg(cfg: Any) -> dict[str, Any]:
    return {**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}}


def _onnx_variant(cfg: Any, checkpoint: str | None, images: torch.Tensor, workdir: Path) -> Callable[[], Any]:
    torch.manual_seed(0)
    b, _, h, w = images.shape
    model = load_detector(cfg, checkpoint, device="cpu", precision="fp32", compile=False, backend="eager")
    res, _ = export_detector(model, workdir / "bench.onnx", (h, w), batch=b)
    sess = OnnxDetector(res.path, threads=torch.get_num_threads())
    pixels = images.numpy()
    return lambda: sess.run(pixels)


def _torchvision_variant(arch: str, cfg: Any, checkpoint: str | None, mode: str, images: torch.Tensor,
                         targets: list[dict], notes: list[str]) -> Callable[[], Any]:
    torch.manual_seed(0)
    det_cfg = load_detector(cfg, checkpoint, device="cpu", fuse=False, compile=False, precision="fp32",
                            backend="eager")
    if checkpoint is None:
        det_cfg.set_score_thr(0.0)
    tc = det_cfg.detection_cfg
    m = build_torchvision_detector(arch, det_cfg.num_classes, tuple(images.shape[-2:]), score_thresh=tc.score_thr,
                                   nms_thresh=float(tc.nms_kwargs()["iou_threshold"]),
                                   detections=int(tc.max_per_img), topk=int(tc.nms_pre))
    if arch in ("maskrcnn", "fasterrcnn"):  # the same weights as DenseDet's model (see copy_two_stage_weights)
        try:
            copy_two_stage_weights(det_cfg, m)
            notes.append("torchvision's model holds DenseDet's weights (copy_two_stage_weights), so both do the same "
                         "amount of R-CNN work")
        except (RuntimeError, StopIteration):  # another backbone than torchvision's ResNet-50 FPN
            notes.append(f"{cfg.name}'s layout is not torchvision's R50-FPN: the torchvision peer has its own random "
                         "weights (its R-CNN stage may do a different amount of work)")
    image_list = [img.float() / 255.0 for img in images]  # torchvision normalises inside its transform
    if mode == "infer":
        m.eval()

        def infer() -> Any:
            with torch.no_grad():
                return m(image_list)

        return infer
    m.train()
    tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + (1 if arch in ("maskrcnn", "fasterrcnn") else 0),
                   **({"masks": torch.from_numpy(t["masks_full"])} if arch == "maskrcnn" else {})} for t in targets]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-5, momentum=0.9, weight_decay=1e-4)

    def train_step() -> float:
        total = sum(m(image_list, tv_targets).values())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return float(total.detach())

    return train_step


def run_bench(config: Any, checkpoint: str | None = None, size: tuple[int, int] = (800, 1216), batch: int = 1,
              mode: str = "infer", precisions: tuple[str, ...] = ("fp32",), channels_last: bool = False,
              compile_: bool = False, backends: tuple[str, ...] = ("eager",), against: str | None = None,
              iters: int = 10, warmup: int = 2, threads: int | None = None, baseline: bool = True,
              overrides: list[str] | None = None) -> dict[str, Any]:
    """Build the variants, warm each up, time them alternately; returns ``{"header", "results", "loads", ...}``
    (see the module doc). ``config``: name, YAML path or :class:`~densedet.config.Config`."""
    if mode not in ("infer", "train"):
        raise ConfigError(f"mode must be infer or train, got {mode!r}", path="mode")
    if threads:
        torch.set_num_threads(threads)
    cfg = config if isinstance(config, Config) else load_config(config, list(overrides or []))
    with torch.device("meta"):  # what kind of model, how many classes: no weights needed
        shape = build_detector(_bench_model_cfg(cfg), init=False)
    images, targets = make_batch(batch, size, shape.num_classes, masks=shape.mask_thr_binary is not None)
    variants: list[tuple[str, Callable[[], Callable[[], Any]]]] = []
    default_cl = bool(cfg.runtime.channels_last)
    if baseline:
        variants.append((f"densedet fp32 (default{', channels_last' if default_cl else ''})",
                         lambda: _densedet_variant(cfg, checkpoint, mode, images, targets, "fp32", False,
                                                   default_cl, False)))
    if "eager" in backends:
        for p in precisions:
            tags = [p] + (["fused"] if mode == "infer" else []) + (["channels_last"] if channels_last else []) + \
                (["compile"] if compile_ else [])
            variants.append((f"densedet {' + '.join(tags)}",
                             lambda p=p: _densedet_variant(cfg, checkpoint, mode, images, targets, p, True,
                                                           channels_last, compile_)))
    tmp = Path(tempfile.mkdtemp(prefix="densedet_bench_"))
    if "onnxruntime" in backends:
        if mode != "infer":
            raise ValueError("--backend onnxruntime times inference only (--mode infer)")
        variants.append(("onnxruntime fp32", lambda: _onnx_variant(cfg, checkpoint, images, tmp)))
    notes = []
    if against == "torchvision":
        arch = torchvision_peer(cfg)
        if arch is None:
            kind = (cfg.model.get("bbox_head") or {}).get("type") or cfg.model.get("type")
            notes.append(f"torchvision has no {kind} detector: no peer row")
        else:
            variants.append((f"torchvision {arch} fp32",
                             lambda: _torchvision_variant(arch, cfg, checkpoint, mode, images, targets, notes)))
    results = [BenchResult(name) for name, _ in variants]
    steps: list[Callable[[], Any] | None] = []
    for (_, build), res in zip(variants, results):
        before = peak_rss_bytes()
        try:
            step = build()
            for _ in range(warmup):
                step()
        except Exception as e:  # one variant failing (e.g. no compiler for torch.compile) keeps the others
            res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            step = None
        res.peak_growth_mib = (peak_rss_bytes() - before) / 2**20
        steps.append(step)
    loads = [os.getloadavg()[0]]
    live = [i for i, s in enumerate(steps) if s is not None]
    for it in range(iters):
        k = it % max(1, len(live))
        for i in live[k:] + live[:k]:
            t0 = time.perf_counter()
            steps[i]()  # type: ignore[misc]
            results[i].times_s.append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    header = (f"densedet bench: {cfg.name or config} {mode}, batch {batch}, {size[0]}x{size[1]}, "
              f"{'checkpoint ' + str(checkpoint) if checkpoint else 'random weights (score_thr 0)'}\n"
              f"CPU: {cpu_name()}; {torch.get_num_threads()} threads; torch {torch.__version__}, torchvision "
              f"{torchvision.__version__}; {iters} alternating timed iterations after {warmup} warm-up; 1-min "
              f"load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    return {"header": header, "results": results, "batch": batch, "notes": notes, "loads": loads}


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of a :func:`run_bench` report; ``speed-up`` is the first variant's median / this one's."""
    rows = report["results"]
    ref = next((r.median_s for r in rows if r.times_s), float("nan"))
    lines = [report["header"], "", "| variant | median ms | min ms | max ms | images/s | speed-up | peak +MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.error or not r.times_s:
            lines.append(f"| {r.name} | failed: {r.error} | | | | | |")
            continue
        lines.append(f"| {r.name} | {1e3 * r.median_s:.1f} | {1e3 * min(r.times_s):.1f} | "
                     f"{1e3 * max(r.times_s):.1f} | {report['batch'] / r.median_s:.2f} | {ref / r.median_s:.2f}x | "
                     f"{r.peak_growth_mib:.0f} |")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    """``'800x1216'`` -> (800, 1216) (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, e.g. 800x1216, got '{text}'") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got '{text}'")
    return h, w


def add_bench_parser(sub: Any, epilog: str) -> Any:
    b = sub.add_parser("bench", help="time inference/training options side by side (and torchvision's peer)",
                       epilog=epilog)
    b.add_argument("config")
    b.add_argument("checkpoint", nargs="?", default=None, help="weights (default: random, score_thr 0)")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--size", type=parse_size, default=(800, 1216), help="HEIGHTxWIDTH (default 800x1216)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--mode", choices=["infer", "train"], default="infer")
    b.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                   help="one DenseDet variant per precision (fused BN for inference)")
    b.add_argument("--channels-last", action="store_true", help="channels_last for those variants")
    b.add_argument("--compile", action="store_true", help="torch.compile backbone+neck+head of those variants")
    b.add_argument("--backend", nargs="+", choices=["eager", "onnxruntime"], default=["eager"],
                   help="onnxruntime adds the exported model (fp32, exported at --size)")
    b.add_argument("--against", choices=["torchvision"], default=None,
                   help="add torchvision's RetinaNet / FCOS / Mask R-CNN / Faster R-CNN (the config's architecture)")
    b.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="drop the 'densedet fp32 (default)' reference row")
    b.add_argument("--iters", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return b


def cmd_bench(args: Any) -> int:
    report = run_bench(args.config, args.checkpoint, size=args.size, batch=args.batch, mode=args.mode,
                       precisions=tuple(args.precision), channels_last=args.channels_last, compile_=args.compile,
                       backends=tuple(args.backend), against=args.against, iters=args.iters, warmup=args.warmup,
                       threads=args.threads, baseline=args.baseline, overrides=args.overrides)
    print(format_table(report))
    return 0 if all(r.error is None for r in report["results"]) else 1
