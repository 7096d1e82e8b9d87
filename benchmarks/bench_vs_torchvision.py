"""Speed and memory of DenseDet against torchvision's RetinaNet and FCOS (run by hand, not a test).

Usage::

    .venv/bin/python benchmarks/bench_vs_torchvision.py --threads 2 --iters 10 --warmup 2 --out bench.json
    .venv/bin/python benchmarks/bench_vs_torchvision.py --quick            # smoke run, 1 warm-up + 2 iterations

Timing: for each (model, mode) one fresh subprocess builds the DenseDet and the torchvision model (and, with
``--channels-last``, a channels_last DenseDet), warms each up, then alternates their timed iterations (A B A B ...,
rotating the start) so that both see the same background load on a shared machine; median per variant.
Memory: each (library, model, mode) variant then runs alone in its own fresh subprocess: peak RSS
(``getrusage`` ``ru_maxrss``) over two iterations minus the RSS right after model construction.
The parent prints markdown tables: times, ratios ``torchvision_time / densedet_time`` (> 1 means DenseDet is
faster), peak memory, a per-part breakdown, optional ``channels_last`` numbers and optional profiler tables.

How the comparison is made fair (see docs/benchmarks.md for the remaining, documented differences):

* same input (one fixed random image batch, seed 0), same batch size, same ``torch.set_num_threads``;
* same 80 classes and the same ~10 fixed random gt boxes per image;
* torchvision is built from its public pieces exactly as its *pretrained* recipe builds it
  (``FrozenBatchNorm2d`` everywhere, stem + layer1 frozen, ``trainable_layers=3``, P6/P7 from P5), only without
  loading weights: with ``weights_backbone=None`` its builders would otherwise train every layer with live
  BatchNorm, which is not what anyone trains. DenseDet R50 configs freeze stem + layer1 with BN in eval mode;
* ``GeneralizedRCNNTransform`` gets ``min_size``/``max_size`` equal to the input size, so it never rescales
  (it still runs a scale-1.0 bilinear interpolate and stacks the list into a batch: part of its forward,
  timed and shown as the ``transform`` part);
* normalisation is *included in both*: torchvision normalises inside its transform, DenseDet inside the model
  (``model.data_preprocessor``); both start from the same raw-pixel batch;
* the same post-processing settings: ``score_thr=0.0`` for both (random weights give sigmoid scores near the
  0.01 prior, so the usual 0.05 threshold would leave post-processing with nothing to do), top 1000 per level
  before NMS, class-wise NMS IoU 0.5, 100 detections per image;
* SGD with momentum and weight decay over the trainable parameters, with a tiny learning rate (1e-5) so every
  timed step sees the same weights (random weights with a normal learning rate can diverge to NaN, which changes
  the work done).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from densedet.analysis.bench import cpu_name, peak_rss_bytes, rss_bytes

DD_CONFIGS = {"retinanet": "retinanet_r50_fpn_1x_coco", "fcos": "fcos_r50_caffe_fpn_gn-head_1x_coco"}
TRAIN_SIZE = (512, 512)  # (H, W), batch 2
INFER_SIZE = (800, 1216)  # (H, W), batch 1
TRAIN_BATCH, INFER_BATCH = 2, 1
NUM_CLASSES = 80
BOXES_PER_IMAGE = 10
# Targets of the issue: minimum torchvision_time / densedet_time.
TARGETS = {("retinanet", "train"): 1.5, ("fcos", "train"): 1.2, ("retinanet", "infer"): 1.2, ("fcos", "infer"): 1.2}


# --------------------------------------------------------------------------------------------------- inputs


def make_inputs(mode: str, seed: int = 0) -> tuple[Any, list[dict[str, Any]]]:
    """Raw-pixel images (B, 3, H, W) float in [0, 255] and per-image targets (``xyxy`` absolute pixels)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, (h, w) = (TRAIN_BATCH, TRAIN_SIZE) if mode == "train" else (INFER_BATCH, INFER_SIZE)
    images = torch.rand(b, 3, h, w, generator=g) * 255.0
    targets = []
    for _ in range(b):
        wh = 16 + torch.rand(BOXES_PER_IMAGE, 2, generator=g) * 240  # sides in [16, 256) px
        xy = torch.rand(BOXES_PER_IMAGE, 2, generator=g) * (torch.tensor([w, h]) - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, NUM_CLASSES, (BOXES_PER_IMAGE,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


# --------------------------------------------------------------------------------------------------- models


class PartTimer:
    """Accumulates wall time of named callables by wrapping them on the instance (no library code is edited)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.enabled = False

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - t0

        setattr(obj, attr, timed)

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.totals[name] += seconds


def build_densedet(model: str, timer: PartTimer) -> Any:
    import densedet

    m = densedet.build_model(DD_CONFIGS[model], num_classes=NUM_CLASSES,
                             **{"test_cfg.score_thr": 0.0, "test_cfg.nms_pre": 1000, "test_cfg.max_per_img": 100,
                                "test_cfg.nms": {"type": "nms", "iou_threshold": 0.5}})
    timer.wrap(m.backbone, "forward", "backbone")
    timer.wrap(m.neck, "forward", "neck (FPN)")
    timer.wrap(m.bbox_head, "forward", "head convs")
    timer.wrap(m.bbox_head, "loss", "loss + assignment")
    timer.wrap(m.bbox_head, "predict", "post-processing")
    return m


def build_torchvision(model: str, mode: str, timer: PartTimer) -> Any:
    """torchvision's pretrained-recipe architecture (FrozenBN, trainable_layers=3), without weights."""
    from densedet.analysis.bench import build_torchvision_detector

    m = build_torchvision_detector(model, NUM_CLASSES, TRAIN_SIZE if mode == "train" else INFER_SIZE,
                                   score_thresh=0.0, nms_thresh=0.5, detections=100, topk=1000)
    timer.wrap(m.transform, "forward", "transform (normalise+resize+batch)")
    timer.wrap(m.backbone.body, "forward", "backbone")
    timer.wrap(m.backbone.fpn, "forward", "neck (FPN)")
    timer.wrap(m.head, "forward", "head convs")
    timer.wrap(m.anchor_generator, "forward", "anchors")
    timer.wrap(m, "compute_loss", "loss + assignment")
    timer.wrap(m, "postprocess_detections", "post-processing")
    timer.wrap(m.transform, "postprocess", "transform.postprocess")
    return m


# --------------------------------------------------------------------------------------------------- one case


def make_step(lib: str, model_name: str, mode: str, m: Any, timer: PartTimer,
              channels_last: bool) -> Callable[[], Any]:
    """A closure running one timed iteration of the case."""
    import torch

    images, targets = make_inputs(mode)
    if lib == "densedet":
        h, w = images.shape[-2:]
        metas = [{"img_shape": (h, w), "scale_factor": (1.0, 1.0)} for _ in range(images.shape[0])]
        dd_targets = [dict(t, ignore_boxes=torch.zeros(0, 4)) for t in targets]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            m.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)

        def run(mode_: str) -> Any:
            x = images.contiguous(memory_format=fmt)  # pixels: the model normalises them (data_preprocessor)
            return m(x, targets=dd_targets if mode_ == "train" else None, metas=metas,
                     mode="loss" if mode_ == "train" else "predict")
    else:
        image_list = [img / 255.0 for img in images]  # torchvision takes [0, 1] images and normalises itself

        def run(mode_: str) -> Any:
            return m(image_list, targets if mode_ == "train" else None)

    if mode == "infer":
        m.eval()

        def infer_step() -> Any:
            with torch.no_grad():
                return run("infer")

        return infer_step

    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-5, momentum=0.9, weight_decay=1e-4)

    def train_step() -> float:
        losses = run("train")
        total = sum(v for k, v in losses.items() if k.startswith("loss")) if lib == "densedet" \
            else sum(losses.values())
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        timer.add("backward", t1 - t0)
        timer.add("optimizer step", t2 - t1)
        value = float(total.detach())
        if value != value:  # NaN: the work done would no longer be representative
            raise RuntimeError(f"{lib} {model_name}: loss became NaN")
        return value

    return train_step


def build_variant(lib: str, model_name: str, mode: str,
                  channels_last: bool) -> tuple[Callable[[], Any], PartTimer, Any]:
    """Build one (library, model, mode) variant: its step closure, its part timer and the model."""
    import torch

    torch.manual_seed(0)
    timer = PartTimer()
    m = build_densedet(model_name, timer) if lib == "densedet" else build_torchvision(model_name, mode, timer)
    return make_step(lib, model_name, mode, m, timer, channels_last), timer, m


def time_variants(model_name: str, mode: str, threads: int, iters: int, warmup: int, channels_last: bool,
                  profile: int) -> list[dict[str, Any]]:
    """Time DenseDet and torchvision (and DenseDet channels_last) in one process, alternating iterations.

    The machine may be shared: interleaving A B A B ... (with a rotating start) makes both libraries see the
    same background load, so their ratio stays meaningful even when absolute times drift.
    """
    import torch

    torch.set_num_threads(threads)
    specs = [("densedet", False), ("torchvision", False)] + ([("densedet", True)] if channels_last else [])
    variants = [build_variant(lib, model_name, mode, cl) for lib, cl in specs]
    for step, _, _ in variants:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in variants]
    loads = [os.getloadavg()[0]]
    for i in range(iters):
        order = list(range(len(variants)))
        for j in order[i % len(order):] + order[:i % len(order)]:
            step, timer, _ = variants[j]
            timer.enabled = True
            t0 = time.perf_counter()
            step()
            times[j].append(time.perf_counter() - t0)
            timer.enabled = False
        loads.append(os.getloadavg()[0])
    results = []
    for (lib, cl), (step, timer, m), ts in zip(specs, variants, times):
        res: dict[str, Any] = {
            "lib": lib, "model": model_name, "mode": mode, "channels_last": cl, "threads": threads,
            "iters": iters, "warmup": warmup, "times_s": ts, "median_s": statistics.median(ts),
            "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "parts_ms": {k: 1e3 * v / iters for k, v in timer.totals.items()}, "loadavg_1min": loads}
        if profile:
            res["profile_top"] = profile_step(step, profile)
        results.append(res)
    return results


def profile_step(step: Callable[[], Any], top: int) -> list[dict[str, Any]]:
    """Profile one iteration with torch.profiler; the ``top`` ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "self_pct": 100.0 * e.self_cpu_time_total / total_self, "calls": e.count} for e in rows]


def measure_memory(lib: str, model_name: str, mode: str, threads: int, channels_last: bool) -> dict[str, Any]:
    """In a fresh process: RSS right after construction, then peak RSS over two iterations (the second
    iteration runs with the optimizer state the first one created)."""
    import torch

    torch.set_num_threads(threads)
    step, _, _ = build_variant(lib, model_name, mode, channels_last)
    rss_built = rss_bytes()
    for _ in range(2):
        step()
    peak = peak_rss_bytes()
    return {"rss_after_build_mib": rss_built / 2**20, "peak_rss_mib": peak / 2**20,
            "peak_minus_build_mib": (peak - rss_built) / 2**20}


# --------------------------------------------------------------------------------------------------- driver


def spawn(args: argparse.Namespace, job: str) -> Any:
    """Run one worker job in a fresh interpreter; returns its JSON answer."""
    cmd = [sys.executable, __file__, "--worker", job, "--threads", str(args.threads), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--profile", str(args.profile)]
    if args.channels_last:
        cmd.append("--channels-last")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-4000:]}")
    print(f"  {job:<40} done in {time.perf_counter() - t0:5.0f} s (load {os.getloadavg()[0]:.2f})",
          file=sys.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def get(lib: str, model: str, mode: str, cl: bool = False) -> dict[str, Any] | None:
        for r in results:
            if (r["lib"], r["model"], r["mode"], r["channels_last"]) == (lib, model, mode, cl):
                return r
        return None

    def ms(r: dict[str, Any]) -> str:
        return f"{1e3 * r['median_s']:.0f} ({1e3 * min(r['times_s']):.0f}-{1e3 * max(r['times_s']):.0f})"

    def mib(r: dict[str, Any]) -> str:
        return f"{r['peak_minus_build_mib']:.0f}" if "peak_minus_build_mib" in r else "-"

    models = list(dict.fromkeys(r["model"] for r in results))
    modes = list(dict.fromkeys(r["mode"] for r in results))
    desc = {"train": f"train step, batch {TRAIN_BATCH}, {TRAIN_SIZE[0]}x{TRAIN_SIZE[1]}",
            "infer": f"inference, batch {INFER_BATCH}, {INFER_SIZE[0]}x{INFER_SIZE[1]}"}
    lines = [f"Machine: {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}, "
             f"torchvision {meta['torchvision']}; {meta['iters']} timed iterations after {meta['warmup']} "
             f"warm-up; ms = median (min-max) of one step.", "",
             "| model | case | DenseDet ms | torchvision ms | tv/DenseDet | target | DenseDet peak MiB "
             "| torchvision peak MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for model in models:
        for mode in modes:
            d, t = get("densedet", model, mode), get("torchvision", model, mode)
            if d is None or t is None:
                continue
            ratio = t["median_s"] / d["median_s"]
            target = TARGETS.get((model, mode))
            ok = "" if target is None else (f">= {target} {'met' if ratio >= target else 'MISSED'}")
            lines.append(f"| {model} | {desc[mode]} | {ms(d)} | {ms(t)} | **{ratio:.2f}x** | {ok} | {mib(d)} "
                         f"| {mib(t)} |")
    loads = [x for r in results for x in r["loadavg_1min"]]
    mem_note = ("Peak MiB = peak RSS (getrusage ru_maxrss) of the variant running alone in a fresh subprocess for "
                "two iterations, minus its RSS right after model construction (activations, gradients, optimizer "
                "state, allocator caching). " if any("peak_minus_build_mib" in r for r in results) else "")
    lines += ["", f"{mem_note}1-min load average during timing: {min(loads):.1f}-{max(loads):.1f} "
              f"on {os.cpu_count()} CPUs.", ""]

    cl_rows = [(model, mode) for model in models for mode in modes if get("densedet", model, mode, True)]
    if cl_rows:
        lines += ["DenseDet with `channels_last` (model and input), same settings:", "",
                  "| model | case | NCHW ms | channels_last ms | NCHW/channels_last | tv/DenseDet(channels_last) |",
                  "|---|---|---:|---:|---:|---:|"]
        for model, mode in cl_rows:
            d, c, t = get("densedet", model, mode), get("densedet", model, mode, True), get("torchvision", model, mode)
            tv = f"{t['median_s'] / c['median_s']:.2f}x" if t else "-"
            lines.append(f"| {model} | {desc[mode]} | {1e3 * d['median_s']:.0f} | {1e3 * c['median_s']:.0f} "
                         f"| {d['median_s'] / c['median_s']:.2f}x | {tv} |")
        lines.append("")

    lines += ["Where the time goes (mean ms per iteration; parts nest: the forward parts sum to less than the step "
              "because of glue code):", ""]
    for model in models:
        for mode in modes:
            cases = [r for r in (get("densedet", model, mode), get("torchvision", model, mode),
                                 get("densedet", model, mode, True)) if r]
            if not cases:
                continue
            names = list(dict.fromkeys(k for r in cases for k in r["parts_ms"]))
            heads = [r["lib"] + (" (channels_last)" if r["channels_last"] else "") for r in cases]
            lines += [f"*{model}, {desc[mode]}*", "", "| part | " + " | ".join(heads) + " |",
                      "|---|" + "---:|" * len(cases)]
            for n in names:
                lines.append(f"| {n} | " + " | ".join(f"{r['parts_ms'][n]:.0f}" if n in r["parts_ms"] else "-"
                                                      for r in cases) + " |")
            lines.append("| **step (median)** | " + " | ".join(f"**{1e3 * r['median_s']:.0f}**" for r in cases)
                         + " |")
            lines.append("")

    prof = [r for r in results if r.get("profile_top")]
    if prof:
        lines += ["Profiler, one iteration, top ops by self CPU time:", ""]
        for r in prof:
            lines += [f"*{r['lib']}{' (channels_last)' if r['channels_last'] else ''} {r['model']} {r['mode']}*", "",
                      "| op | self CPU ms | % | calls |", "|---|---:|---:|---:|"]
            for e in r["profile_top"]:
                lines.append(f"| `{e['op']}` | {e['self_cpu_ms']:.1f} | {e['self_pct']:.1f} | {e['calls']} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads for every case")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per case (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations per case")
    p.add_argument("--quick", action="store_true", help="smoke run: --iters 2 --warmup 1")
    p.add_argument("--models", default="retinanet,fcos", help="comma list of: retinanet, fcos")
    p.add_argument("--modes", default="train,infer", help="comma list of: train, infer")
    p.add_argument("--channels-last", action="store_true",
                   help="also run DenseDet with channels_last model and input")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one extra iteration per case and report the top N ops by self CPU time")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    p.add_argument("--out", type=Path, help="also write every raw number to this JSON file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # lib:model:mode:channels_last, runs one case
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.warmup = 2, 1

    if args.worker:  # job "time:<model>:<mode>" or "mem:<lib>:<model>:<mode>:<0|1 channels_last>"
        kind, *rest = args.worker.split(":")
        if kind == "time":
            res: Any = time_variants(rest[0], rest[1], args.threads, args.iters, args.warmup, args.channels_last,
                                     args.profile)
        else:
            res = measure_memory(rest[0], rest[1], rest[2], args.threads, bool(int(rest[3])))
        print(json.dumps(res))
        return 0

    models = [s.strip() for s in args.models.split(",") if s.strip()]
    modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    bad = [m for m in models if m not in DD_CONFIGS] + [m for m in modes if m not in ("train", "infer")]
    if bad or not models or not modes:
        p.error(f"unknown or empty --models/--modes entries: {bad}")

    import torch
    import torchvision

    meta = {"cpu": cpu_name(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "threads": args.threads, "iters": args.iters,
            "warmup": args.warmup, "command": " ".join([Path(sys.executable).name, *sys.argv])}
    results = []
    t0 = time.perf_counter()
    for model_name in models:
        for mode in modes:
            timed = spawn(args, f"time:{model_name}:{mode}")
            if not args.no_memory:
                for r in timed:
                    r.update(spawn(args, f"mem:{r['lib']}:{model_name}:{mode}:{int(r['channels_last'])}"))
            results += timed
    meta["total_wall_s"] = time.perf_counter() - t0
    report = markdown_report(results, meta)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
