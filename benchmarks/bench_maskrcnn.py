"""Speed and memory of DenseDet's Mask R-CNN R50-FPN against torchvision's ``maskrcnn_resnet50_fpn`` (run by hand).

Usage::

    .venv/bin/python benchmarks/bench_maskrcnn.py --threads 2 --iters 5 --warmup 1
    .venv/bin/python benchmarks/bench_maskrcnn.py --quick      # half the image sides, 1 warm-up + 2 iterations
    .venv/bin/python benchmarks/bench_maskrcnn.py --modes paste --threads 1   # mask paste + RLE only
    .venv/bin/python benchmarks/bench_maskrcnn.py --modes roialign --threads 1   # RoIAlign forward / backward only

Training step: batch 2 at 512x512, the same 8 gt boxes and masks per image (ellipses filling their boxes), SGD with
a tiny learning rate (every timed step sees the same weights). Inference: batch 1 at 800x1216 including
post-processing, mask paste and (for the masks) COCO RLE encoding of every detection, as ``densedet test`` and a
torchvision user writing COCO results both have to do. ``score_thr`` is 0 for both: random weights give near-uniform
class scores, so the usual 0.05 would leave no detection and no mask work.

Both models are built the same way: ResNet-50 with frozen BatchNorm statistics and stem + layer1 frozen (torchvision
``FrozenBatchNorm2d`` + ``trainable_layers=3``; DenseDet's config ``frozen_stages=1, norm_eval=True``), FPN, 81-way
classifier, RPN 2000/1000 pre-NMS proposals per level and 1000 kept for training/testing, 256 RPN and 512 R-CNN
samples, NMS 0.5 and 100 detections. torchvision's transform gets ``min_size``/``max_size`` equal to the input so it
never rescales. Both hold the same weights (DenseDet's random initialisation, seeded, copied into torchvision's
layout by :func:`copy_weights`): with different random weights the two RPNs keep different numbers of proposals
after NMS (1000 against 272 at the quick inference size), so the R-CNN heads would do different amounts of work.
DenseDet runs as ``densedet train`` / ``test`` and ``Predictor`` do by default: in its config's memory format
(``runtime.channels_last``) and, for inference, with BatchNorm folded into the convs (``model.fuse()``); torchvision
in its default NCHW with its ``FrozenBatchNorm2d``. Timing alternates the two models' iterations (A B A B ...) in
one process so both see the same background load; medians are reported, and the median of the per-pair ratios. Peak
memory: each (library, mode) runs alone in a fresh subprocess: peak RSS (``VmHWM``, reset after building the model)
minus the RSS then. ``--profile N`` prints the ``N`` operators with the most self CPU time of one step of each
library (``torch.profiler``) instead of timing.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

TRAIN_SIZE, INFER_SIZE = (512, 512), (800, 1216)
TRAIN_BATCH, INFER_BATCH, NUM_CLASSES, BOXES = 2, 1, 80, 8


def _inputs(mode: str, quick: bool) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    h, w = TRAIN_SIZE if mode == "train" else INFER_SIZE
    if quick:
        h, w = h // 2, w // 2
    b = TRAIN_BATCH if mode == "train" else INFER_BATCH
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 3, h, w, generator=g) * 255
    targets = []
    for _ in range(b):
        xy = torch.rand(BOXES, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = torch.rand(BOXES, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        boxes = torch.cat([xy, xy + wh], 1).floor()
        masks = np.zeros((BOXES, h, w), np.uint8)
        yy, xx = np.mgrid[:h, :w]
        for k, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            masks[k] = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1
        targets.append({"boxes": boxes, "labels": torch.randint(0, NUM_CLASSES, (BOXES,), generator=g),
                        "masks": masks})
    return images, targets


def _densedet_model() -> Any:
    """The config's model with seeded random weights, in the config's memory format."""
    from densedet.config import load_config
    from densedet.models.build import build_detector

    cfg = load_config("mask_rcnn_r50_fpn_1x_coco")
    model_cfg = {**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}}
    model_cfg["test_cfg"] = {**model_cfg["test_cfg"], "rcnn": {**model_cfg["test_cfg"]["rcnn"], "score_thr": 0.0}}
    torch.manual_seed(0)
    return build_detector(model_cfg).use_channels_last(cfg.runtime.channels_last)


def copy_weights(densedet_model: Any, tv_model: Any) -> None:
    """Load DenseDet's (mmdet-layout) weights into torchvision's ``MaskRCNN``: same backbone names under
    ``backbone.body``, FPN ``lateral_convs`` / ``fpn_convs`` -> ``inner_blocks`` / ``layer_blocks``, RPN, box head
    (torchvision puts the background class first and has background box deltas, zero here) and mask head (its
    background mask channel is zero). The delta encodings agree (RPN stds 1, R-CNN stds 0.1/0.1/0.2/0.2 = torchvision's
    weights 10/10/5/5) and so does the RoI level mapping, so both compute the same network up to torchvision's
    rounded anchors and its RoIAlign at a fixed 2 x 2 samples per bin (mmdet: adaptive)."""
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


def build_densedet(mode: str) -> Any:
    from densedet.structures.masks import InstanceMasks, decode_segmentation

    model = _densedet_model()
    if mode != "train":
        model.fuse()  # BatchNorm folded into the convs, as ``densedet test`` and ``Predictor`` do by default
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)

    def prepare(images: torch.Tensor, targets: list[dict[str, Any]]) -> tuple[Any, Any, Any]:
        h, w = images.shape[-2:]
        metas = [{"img_shape": (h, w), "pad_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)}
                 for _ in range(images.shape[0])]
        tgts = []
        for t in targets:
            # the dataset's form: each mask decoded from an RLE into its box crop
            from densedet.evaluation.segm import encode_crop_rle
            from densedet.structures.masks import BitmapCrop

            rles = [encode_crop_rle(BitmapCrop(0, 0, m), h, w) for m in t["masks"]]
            tgts.append({"boxes": t["boxes"], "labels": t["labels"], "ignore_boxes": torch.zeros(0, 4),
                         "masks": InstanceMasks([decode_segmentation(r, h, w) for r in rles], h, w)})
        return metas, tgts, None

    def train_step(images: torch.Tensor, metas: Any, tgts: Any) -> None:
        losses = model((images - mean) / std, tgts, metas, mode="loss")
        return sum(v for k, v in losses.items() if k.startswith("loss"))

    def infer(images: torch.Tensor, metas: Any) -> Any:
        from densedet.evaluation.segm import encode_instance_masks

        dets = model((images - mean) / std, None, metas, mode="predict")
        return [encode_instance_masks(d["masks"]) for d in dets]

    return model, prepare, train_step, infer


def build_torchvision(mode: str, size: tuple[int, int]) -> Any:
    from faster_coco_eval.core import mask as coco_mask
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    model = MaskRCNN(backbone, num_classes=NUM_CLASSES + 1, min_size=min(size), max_size=max(size),
                     rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000, rpn_pre_nms_top_n_test=1000,
                     rpn_post_nms_top_n_test=1000, box_score_thresh=0.0)
    copy_weights(_densedet_model(), model)

    def prepare(images: torch.Tensor, targets: list[dict[str, Any]]) -> tuple[Any, Any, Any]:
        tgts = [{"boxes": t["boxes"], "labels": t["labels"] + 1, "masks": torch.from_numpy(t["masks"])}
                for t in targets]
        return None, tgts, None

    def train_step(images: torch.Tensor, metas: Any, tgts: Any) -> None:
        losses = model(list(images / 255.0), tgts)
        return sum(losses.values())

    def infer(images: torch.Tensor, metas: Any) -> Any:
        out = model(list(images / 255.0))
        # the full-image (N, 1, H, W) probability stack torchvision returns, thresholded and encoded for COCO
        return [coco_mask.encode(np.asfortranarray((o["masks"][:, 0] > 0.5).permute(1, 2, 0).numpy().astype(np.uint8)))
                for o in out]

    return model, prepare, train_step, infer


def _variant(lib: str, mode: str, quick: bool) -> Any:
    images, targets = _inputs(mode, quick)
    size = tuple(images.shape[-2:])
    model, prepare, train_step, infer = build_densedet(mode) if lib == "densedet" else build_torchvision(mode, size)
    metas, tgts, _ = prepare(images, targets)
    if mode == "train":
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-5, momentum=0.9, weight_decay=1e-4)

        def step() -> None:
            loss = train_step(images, metas, tgts)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        model.eval()

        def step() -> None:
            with torch.no_grad():
                infer(images, metas)
    return step


def time_both(mode: str, iters: int, warmup: int, quick: bool, clock: Any = time.perf_counter) -> dict[str, Any]:
    steps = {lib: _variant(lib, mode, quick) for lib in ("densedet", "torchvision")}
    for _ in range(warmup):
        for s in steps.values():
            s()
    times: dict[str, list[float]] = {lib: [] for lib in steps}
    order = list(steps)
    for i in range(iters):
        for lib in order[i % 2:] + order[:i % 2]:
            t = clock()
            steps[lib]()
            times[lib].append(clock() - t)
    out = {lib: statistics.median(v) for lib, v in times.items()}
    # the ratio of each adjacent (A, B) pair, less exposed to load that drifts over the run than the medians' ratio
    out["pair_ratios"] = [tv / dd for dd, tv in zip(times["densedet"], times["torchvision"])]
    return out


def bench_paste_rle(reps: int = 3, num: int = 100) -> dict[str, float]:
    """Seconds to turn ``num`` 28x28 mask predictions into COCO RLEs on an 800x1216 image: DenseDet's box-only
    paste + crop RLE, against torchvision's ``paste_masks_in_image`` (a ``num x H x W`` stack) + full-image
    ``encode`` (what a torchvision user writing COCO results does)."""
    from faster_coco_eval.core import mask as coco_mask
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from densedet.evaluation.segm import encode_instance_masks
    from densedet.models.roi_heads import paste_masks_in_boxes
    from densedet.structures.masks import InstanceMasks

    h, w = INFER_SIZE
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(num, 28, 28, generator=g)
    xy = torch.rand(num, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    boxes = torch.cat([xy, xy + torch.rand(num, 2, generator=g) * 250 + 10], 1)
    times: dict[str, list[float]] = {"densedet": [], "torchvision": []}
    for _ in range(reps):
        t = time.perf_counter()
        encode_instance_masks(InstanceMasks(paste_masks_in_boxes(probs, boxes, h, w), h, w))
        times["densedet"].append(time.perf_counter() - t)
        t = time.perf_counter()
        full = paste_masks_in_image(probs[:, None], boxes, (h, w))[:, 0] > 0.5
        coco_mask.encode(np.asfortranarray(full.permute(1, 2, 0).numpy().astype(np.uint8)))
        times["torchvision"].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_roi_align(reps: int = 3, num: int = 1024) -> dict[str, dict[str, float]]:
    """Seconds for RoIAlign (7x7, aligned, sampling_ratio 0) of ``num`` RoIs on the four FPN levels of a batch of 2
    at 512x512 (256 channels, channels_last as DenseDet runs), forward and forward + backward: DenseDet's sparse
    products (:func:`densedet.models.roi_heads.roi_align.multilevel_roi_align`) against ``torchvision.ops.roi_align``
    per level (what the extractor did before)."""
    from torchvision.ops import roi_align as tv_roi_align

    from densedet.models.roi_heads import map_roi_levels
    from densedet.models.roi_heads.roi_align import multilevel_roi_align

    g = torch.Generator().manual_seed(0)
    strides = [4, 8, 16, 32]
    feats = [torch.randn(2, 256, 512 // s, 512 // s, generator=g).contiguous(memory_format=torch.channels_last)
             .requires_grad_() for s in strides]
    xy = torch.rand(num, 2, generator=g) * 410
    rois = torch.cat([torch.randint(0, 2, (num, 1), generator=g).float(), xy,
                      xy + torch.rand(num, 2, generator=g) * 300 + 4], 1)
    levels = map_roi_levels(rois, 4)

    def torchvision_levels() -> torch.Tensor:
        out = feats[0].new_zeros((num, 256, 7, 7))
        for lvl, s in enumerate(strides):
            idx = (levels == lvl).nonzero(as_tuple=True)[0]
            if idx.numel():
                out[idx] = tv_roi_align(feats[lvl], rois[idx], (7, 7), 1.0 / s, 0, True)
        return out

    def densedet() -> torch.Tensor:
        return multilevel_roi_align(feats, rois, levels, (7, 7), [1.0 / s for s in strides], 0, True)

    times: dict[str, dict[str, list[float]]] = {k: {"forward": [], "backward": []} for k in ("densedet", "torchvision")}
    for _ in range(reps):
        for name, fn in (("densedet", densedet), ("torchvision", torchvision_levels)):
            t = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            torch.autograd.grad(out, feats, torch.ones_like(out), allow_unused=True)
            times[name]["forward"].append(t1 - t)
            times[name]["backward"].append(time.perf_counter() - t1)
    return {k: {p: statistics.median(v) for p, v in d.items()} for k, d in times.items()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss() -> int:
    """This process's peak RSS (``VmHWM``). Not ``ru_maxrss``: Linux carries that over ``exec`` from the parent, so
    a child of the (large) timing process would report the parent's RSS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_child(lib: str, mode: str, quick: bool) -> None:
    step = _variant(lib, mode, quick)
    try:  # reset the peak to the current RSS, so that building the model(s) does not count (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss()
    for _ in range(2):
        step()
    print(json.dumps({"peak_mib": (_peak_rss() - base) / 2**20}))


def profile_both(mode: str, quick: bool, rows: int) -> None:
    """Print the ``rows`` operators with the most self CPU time in one (warm) step of each library."""
    from torch.profiler import ProfilerActivity, profile

    for lib in ("densedet", "torchvision"):
        step = _variant(lib, mode, quick)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"== {lib} {mode}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=None, help="timed iterations per model (default 5, --quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="half the image sides")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (time.process_time) instead of wall time; with --threads 1 it "
                        "is the work done, unaffected by waiting for a core on a loaded machine")
    p.add_argument("--modes", nargs="*", default=["paste", "roialign", "infer", "train"],
                   help="paste, roialign, infer, train")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="print the N operators with the most self CPU time per library and mode instead of timing")
    p.add_argument("--memory-child", nargs=2, metavar=("LIB", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.iters is None:
        args.iters = 2 if args.quick else 5
    if args.memory_child:
        memory_child(*args.memory_child, args.quick)
        return 0
    if args.profile:
        for mode in [m for m in args.modes if m in ("infer", "train")]:
            profile_both(mode, args.quick, args.profile)
        return 0
    rows = []
    if "roialign" in args.modes:
        r = bench_roi_align()
        for part in ("forward", "backward"):
            print(f"RoIAlign {part} of 1024 RoIs (batch 2, 512x512, 256 channels): DenseDet "
                  f"{r['densedet'][part] * 1e3:.1f} ms, torchvision {r['torchvision'][part] * 1e3:.1f} ms, ratio "
                  f"{r['torchvision'][part] / r['densedet'][part]:.2f}")
    if "paste" in args.modes:
        t = bench_paste_rle()
        print(f"paste + RLE of 100 masks at {INFER_SIZE[0]}x{INFER_SIZE[1]}: DenseDet {t['densedet'] * 1e3:.1f} ms, "
              f"torchvision {t['torchvision'] * 1e3:.1f} ms, ratio {t['torchvision'] / t['densedet']:.2f}")
    for mode in [m for m in args.modes if m in ("infer", "train")]:
        t = time_both(mode, args.iters, args.warmup, args.quick,
                      time.process_time if args.clock == "cpu" else time.perf_counter)
        mem = {}
        for lib in ("densedet", "torchvision"):
            cmd = [sys.executable, __file__, "--threads", str(args.threads), "--memory-child", lib, mode]
            out = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True, check=True)
            mem[lib] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
        rows.append((mode, t, mem))
    if not rows:
        return 0
    print(f"threads={args.threads} iters={args.iters} warmup={args.warmup} quick={args.quick} clock={args.clock} "
          f"torch={torch.__version__}")
    print("| mode | DenseDet s/iter | torchvision s/iter | speed ratio (tv / dd) | DenseDet peak MiB | "
          "torchvision peak MiB |")
    print("|---|---|---|---|---|---|")
    for mode, t, mem in rows:
        print(f"| {mode} | {t['densedet']:.3f} | {t['torchvision']:.3f} | {t['torchvision'] / t['densedet']:.2f} | "
              f"{mem['densedet']:.0f} | {mem['torchvision']:.0f} |")
    for mode, t, _ in rows:
        print(f"{mode}: ratio tv / dd of each alternating pair: {', '.join(f'{r:.2f}' for r in t['pair_ratios'])} "
              f"(median {statistics.median(t['pair_ratios']):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
