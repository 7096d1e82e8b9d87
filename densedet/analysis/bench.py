"""``densedet bench``: latency of inference options (and torchvision's peer) side by side, in one process.

Every variant is built, warmed up, then the timed iterations alternate between variants (A B C A B C ..., the start
rotating each round) so all see the same background load on a shared machine; the table reports median / min / max
latency, images per second and the ratio to the first variant. The header names the CPU, the thread count and the
torch version; the 1-min load average is sampled during timing.

Variants (``mode="infer"``): ``densedet fp32 (default)`` - the model as ``Predictor`` ran it before BN folding
(config's ``channels_last``, fp32); then one per ``--precision`` with BN folding (``fused``), optionally
``channels_last`` / ``torch.compile``; ``onnxruntime fp32`` with ``--backend onnxruntime`` (the model exported at
the bench size); ``torchvision fp32`` with ``--against torchvision`` for RetinaNet and FCOS heads (its pretrained
recipe's architecture, built by :func:`build_torchvision_detector`). ``mode="train"``: one SGD step (lr 1e-5 so the
weights stay put) per variant, bf16 meaning autocast around forward and loss.

Memory: ``peak +MiB`` is how much the process's peak RSS (``getrusage``) grew during the variant's warm-up; peaks
only grow, so a variant that needs less than an earlier one shows 0 (run it alone for its own number).
"""

from __future__ import annotations

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

import torch

__all__ = ["BenchResult", "add_bench_parser", "build_torchvision_detector", "cmd_bench", "cpu_name", "format_table",
           "run_bench", "torchvision_peer"]

_TV_PEERS = {"RetinaHead": "retinanet", "FCOSHead": "fcos"}


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
    """``'retinanet'`` / ``'fcos'`` when torchvision has the config's architecture, else None."""
    return _TV_PEERS.get(cfg.model["bbox_head"]["type"])


def build_torchvision_detector(arch: str, num_classes: int, size: tuple[int, int], score_thresh: float = 0.0,
                               nms_thresh: float = 0.5, detections: int = 100, topk: int = 1000) -> torch.nn.Module:
    """torchvision's RetinaNet / FCOS R50-FPN as its pretrained recipe builds it (FrozenBatchNorm2d, stem + layer1
    frozen, ``trainable_layers=3``, P6/P7 from P5), without weights; its transform never rescales ``size`` (H, W)
    inputs (``min_size``/``max_size`` set to it)."""
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    h, w = size
    common = {"min_size": min(h, w), "max_size": max(h, w), "score_thresh": score_thresh, "nms_thresh": nms_thresh,
              "detections_per_img": detections, "topk_candidates": topk}
    cls = {"retinanet": RetinaNet, "fcos": FCOS}[arch]
    return cls(backbone, num_classes, **common)


def make_batch(batch: int, size: tuple[int, int], num_classes: int, seed: int = 0,
               boxes_per_image: int = 10) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Raw pixels ``(B, 3, H, W)`` float with integer values 0..255 and per-image random gt (xyxy pixels)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images = torch.randint(0, 256, (batch, 3, h, w), generator=g).float()
    targets = []
    for _ in range(batch):
        wh = 16 + torch.rand(boxes_per_image, 2, generator=g) * min(240, min(h, w) // 2)
        xy = torch.rand(boxes_per_image, 2, generator=g) * (torch.tensor([w, h]) - wh)
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(0, num_classes, (boxes_per_image,), generator=g)})
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
    from densedet.deploy.onnx_export import normalize_params
    from densedet.models.build import build_detector

    torch.manual_seed(0)
    model = build_detector({**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}},
                           init=checkpoint is None)
    if checkpoint is not None:
        from densedet.engine.checkpoint import load_checkpoint, load_model_weights

        load_model_weights(model, load_checkpoint(checkpoint), strict=True, source=str(checkpoint))
    model.use_channels_last(channels_last)
    mean, std, to_rgb = normalize_params(cfg)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    h, w = images.shape[-2:]
    metas = [{"img_shape": (h, w), "scale_factor": (1.0, 1.0)} for _ in range(images.shape[0])]
    if compile_ and mode == "train":  # training: plain torch.compile of the network (weights change each step)
        model.extract_feat = torch.compile(model.extract_feat, dynamic=False)
        model.bbox_head.forward = torch.compile(model.bbox_head.forward, dynamic=False)

    def normalised() -> torch.Tensor:
        x = images.flip(1) if not to_rgb else images
        return (x - mean_t) / std_t

    if mode == "infer":
        model.eval().set_precision(precision)
        if fused:
            model.fuse()
        model.set_compile(compile_)  # inference: what --compile does in predict/test (frozen weights)

        def infer() -> Any:
            with torch.no_grad():
                return model(normalised(), metas=metas, mode="predict")

        return infer
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9,
                          weight_decay=1e-4)
    dd_targets = [dict(t, ignore_boxes=torch.zeros(0, 4)) for t in targets]

    def train_step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = model(normalised(), targets=dd_targets, metas=metas, mode="loss")
        total = sum(v for k, v in losses.items() if k.startswith("loss"))
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return float(total.detach())

    return train_step


def _onnx_variant(cfg: Any, checkpoint: str | None, images: torch.Tensor, workdir: Path) -> Callable[[], Any]:
    from densedet.deploy import OnnxDetector, export

    torch.manual_seed(0)
    b, _, h, w = images.shape
    res = export(cfg, checkpoint, workdir / "bench.onnx", size=(h, w), batch=b, check=False)
    sess = OnnxDetector(res.path, threads=torch.get_num_threads())
    pixels = images.to(torch.uint8).numpy()
    return lambda: sess.run(pixels)


def _torchvision_variant(arch: str, cfg: Any, mode: str, images: torch.Tensor, targets: list[dict],
                         score_thr: float) -> Callable[[], Any]:
    torch.manual_seed(0)
    test_cfg = cfg.model.get("test_cfg") or {}
    m = build_torchvision_detector(arch, int(cfg.model["bbox_head"]["num_classes"]), tuple(images.shape[-2:]),
                                   score_thresh=score_thr,
                                   nms_thresh=float((test_cfg.get("nms") or {}).get("iou_threshold", 0.5)),
                                   detections=int(test_cfg.get("max_per_img", 100)),
                                   topk=int(test_cfg.get("nms_pre", 1000)))
    image_list = [img / 255.0 for img in images]  # torchvision normalises inside its transform
    if mode == "infer":
        m.eval()

        def infer() -> Any:
            with torch.no_grad():
                return m(image_list)

        return infer
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-5, momentum=0.9, weight_decay=1e-4)

    def train_step() -> float:
        total = sum(m(image_list, targets).values())
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
    from densedet.config import Config, load_config
    from densedet.errors import ConfigError

    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be infer or train, got {mode!r}")
    if threads:
        torch.set_num_threads(threads)
    extra = list(overrides or [])
    if not isinstance(config, Config) and "bbox_head" not in load_config(config, extra, validate_model=False).model:
        raise ConfigError(f"densedet bench times single-stage (dense-head) detectors; {config} is two-stage: "
                          "use benchmarks/bench_maskrcnn.py for Mask R-CNN", path="model")
    if checkpoint is None:  # random weights score ~0.01: no threshold, so decode and NMS do their full work
        extra += ["model.test_cfg.score_thr=0.0"]
    cfg = config if isinstance(config, Config) else load_config(config, extra)
    num_classes = int(cfg.model["bbox_head"]["num_classes"])
    images, targets = make_batch(batch, size, num_classes)
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
            notes.append(f"torchvision has no {cfg.model['bbox_head']['type']} detector: no peer row")
        else:
            thr = float((cfg.model.get("test_cfg") or {}).get("score_thr", 0.05))
            variants.append((f"torchvision {arch} fp32",
                             lambda: _torchvision_variant(arch, cfg, mode, images, targets, thr)))
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
    import torchvision

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


def add_bench_parser(sub: Any, epilog: str) -> Any:
    from densedet.deploy.command import parse_size

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
    b.add_argument("--against", choices=["torchvision"], default=None, help="add torchvision's RetinaNet/FCOS")
    b.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="drop the 'densedet fp32 (default)' reference row")
    b.add_argument("--iters", type=int, default=10)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return b


def cmd_bench(args: Any) -> int:
    from densedet.deploy.onnx_export import ExportDependencyError

    try:
        report = run_bench(args.config, args.checkpoint, size=args.size, batch=args.batch, mode=args.mode,
                           precisions=tuple(args.precision), channels_last=args.channels_last,
                           compile_=args.compile, backends=tuple(args.backend), against=args.against,
                           iters=args.iters, warmup=args.warmup, threads=args.threads, baseline=args.baseline,
                           overrides=args.overrides)
    except ExportDependencyError as e:
        print(f"error: {e}")
        return 2
    print(format_table(report))
    return 0 if all(r.error is None for r in report["results"]) else 1
