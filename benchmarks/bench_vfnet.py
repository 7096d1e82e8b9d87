"""VarifocalNet evidence (issue 3, part 7): run by hand, not in CI.

Part 1 -- accuracy on the synthetic set. Trains, with the same half-width ResNet-18 FPN, schedule, data and seed:
  ATSS + FL  vs  ATSS + VFL (ATSSVGFLHead use_vfl)  vs  VFNet     (atss_r18_fpn_synth / vfnet_r18_fpn_synth)
  RetinaNet + FL  vs  RetinaNet + VFL (use_vfl)                    (retinanet_r18_fpn_synth)
and prints bbox AP / AP50 and the mean training-step time.

Part 2 -- inference latency of VFNet-R50 vs DenseDet's ATSS-R50 (the seed: "almost no extra cost") and vs
torchvision's FCOS-R50, same input (one 800x1216 image, random weights, 80 classes, score_thr 0 so that
post-processing has the same amount of work), one process, alternating timed iterations (A B C A B C ..., rotating
start) so that all see the same background load; medians and ratios.

    .venv/bin/python benchmarks/bench_vfnet.py train --epochs 12 --out work_dirs/bench_vfnet
    .venv/bin/python benchmarks/bench_vfnet.py latency --iters 10 --warmup 2 --threads 2 [--dcn torchvision]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ghm_umop import step_seconds  # noqa: E402

VFL_ATSS = ["model.bbox_head.type=ATSSVGFLHead", "model.bbox_head.use_vfl=true"]
VARIANTS = {
    "ATSS + FL": ("atss_r18_fpn_synth", []),
    "ATSS + VFL": ("atss_r18_fpn_synth", VFL_ATSS),
    "VFNet": ("vfnet_r18_fpn_synth", []),
    "RetinaNet + FL": ("retinanet_r18_fpn_synth", []),
    "RetinaNet + VFL": ("retinanet_r18_fpn_synth", ["model.bbox_head.use_vfl=true"]),
}
INFER_SIZE = (800, 1216)
POST = {"test_cfg.score_thr": 0.0, "test_cfg.nms_pre": 1000, "test_cfg.max_per_img": 100}


def run_training(args: argparse.Namespace) -> None:
    from densedet.config import load_config
    from densedet.engine import train

    torch.set_num_threads(args.threads)
    rows: dict[str, dict[str, Any]] = {}
    for name, (cfg_name, extra) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        work = Path(args.out) / name.lower().replace(" ", "").replace("+", "_")
        overrides = [*extra, f"schedule.epochs={args.epochs}", f"runtime.val_interval={args.epochs}",
                     "runtime.log_interval=10"]
        metrics = train(load_config(cfg_name, overrides), work)
        rows[name] = {"AP": metrics.get("bbox_mAP"), "AP50": metrics.get("bbox_mAP_50"),
                      "step_s": step_seconds(work / "log.jsonl"), "work": str(work)}
        print(name, rows[name], flush=True)
    print("\n| model | bbox AP | AP50 | s / step |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['step_s']:.3f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))


def _densedet(name: str, channels_last: bool) -> Any:
    import densedet

    m = densedet.build_model(name, num_classes=80, **POST).eval()
    m.use_channels_last(channels_last)
    metas = [{"img_shape": INFER_SIZE, "scale_factor": (1.0, 1.0)}]

    def step(images: torch.Tensor) -> Any:
        return m(images, metas=metas, mode="predict")  # pixels: the model normalises them

    return step


def _torchvision_fcos() -> Any:
    """torchvision's FCOS-R50 pretrained-recipe architecture (FrozenBN), no weights, no resizing."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
    m = FCOS(backbone, 80, min_size=min(INFER_SIZE), max_size=max(INFER_SIZE), score_thresh=0.0, nms_thresh=0.6,
             detections_per_img=100, topk_candidates=1000).eval()

    def step(images: torch.Tensor) -> Any:
        return m([img / 255.0 for img in images])

    return step


def run_latency(args: argparse.Namespace) -> None:
    from densedet.models import dcn

    dcn.DCN_IMPL = args.dcn
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.rand(1, 3, *INFER_SIZE, generator=torch.Generator().manual_seed(0)) * 255.0
    cl = not args.nchw
    variants = {
        "DenseDet VFNet-R50": _densedet("vfnet_r50_fpn_1x_coco", cl),
        "DenseDet ATSS-R50": _densedet("atss_r50_fpn_1x_coco", cl),
        "torchvision FCOS-R50": _torchvision_fcos(),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    with torch.inference_mode():
        for step in variants.values():
            for _ in range(args.warmup):
                step(images)
        for i in range(args.iters):
            for name in names[i % len(names):] + names[:i % len(names)]:
                t0 = time.perf_counter()
                variants[name](images)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    layout = "channels_last" if cl else "NCHW"
    print(f"\nInference, 1 x 3 x {INFER_SIZE[0]} x {INFER_SIZE[1]}, {args.threads} threads, {args.iters} iterations, "
          f"DenseDet {layout}, deformable conv {args.dcn}\n")
    print("| model | median s | vs VFNet-R50 (time / VFNet time) |\n|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / med['DenseDet VFNet-R50']:.2f} |")
    print(f"\nVFNet / ATSS time: {med['DenseDet VFNet-R50'] / med['DenseDet ATSS-R50']:.3f}x; "
          f"torchvision FCOS / VFNet time: {med['torchvision FCOS-R50'] / med['DenseDet VFNet-R50']:.3f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="AP on the synthetic set")
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--out", default="work_dirs/bench_vfnet")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--only", nargs="*", help="subset of variant names")
    lat = sub.add_parser("latency", help="inference latency, VFNet vs ATSS vs torchvision FCOS")
    lat.add_argument("--iters", type=int, default=10)
    lat.add_argument("--warmup", type=int, default=2)
    lat.add_argument("--threads", type=int, default=2)
    lat.add_argument("--nchw", action="store_true", help="DenseDet without channels_last")
    lat.add_argument("--dcn", default="auto", choices=["auto", "torchvision", "sampled"],
                     help="deformable-conv implementation (densedet.models.dcn.DCN_IMPL)")
    args = p.parse_args()
    run_training(args) if args.cmd == "train" else run_latency(args)


if __name__ == "__main__":
    main()
