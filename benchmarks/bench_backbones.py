"""Forward latency and peak memory of DenseDet's backbones against timm's implementation of the same architecture.

Run by hand, not a test. Usage::

    .venv/bin/python benchmarks/bench_backbones.py --threads 2 --iters 3 --warmup 1 --channels-last --out bb.json
    .venv/bin/python benchmarks/bench_backbones.py --quick --backbones r50,swin_t     # smoke run

Each case is eval mode, ``torch.no_grad()``, batch 1, one fixed random input of 800x1344: 800x1333 (the 1x
schedule's test scale) padded to a multiple of 32, as the detectors' collate pads it. Every model here accepts that
size (timm's Swin is built for it with ``img_size=(800, 1344)``; its stage maps are padded to window multiples).

Timing: one fresh subprocess per backbone builds the DenseDet backbone (``BACKBONES.build`` with the settings of
the model's config, ``pretrained`` dropped: random weights, no downloads), timm's model
(``timm.create_model(name, pretrained=False, features_only=True, out_indices=...)``) and, with
``--channels-last``, both again in ``torch.channels_last`` (conv backbones only), warms each up, then alternates
their timed iterations (A B A B ..., rotating the start) so that every variant sees the same background load of a
shared machine; the median per variant is reported. Memory: each variant then runs alone in its own fresh
subprocess: its peak resident set size over the forward passes minus its RSS right after construction
(activations and allocator caching, not the weights). The peak counter (``VmHWM``) is reset after construction
through ``/proc/self/clear_refs``, so a construction-time peak cannot hide the forward's; the method otherwise follows
``bench_vs_torchvision.py``. The parent prints markdown tables with the ratio ``timm_time / densedet_time``
(> 1 means DenseDet is faster) and, with ``--profile N``, the top ops of each variant by self CPU time.
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
from collections.abc import Callable
from typing import Any

from densedet.analysis.bench import cpu_name

INPUT_SIZE = (800, 1344)  # (H, W): 800x1333 padded to a multiple of 32, as the detectors' collate does

# name -> (DenseDet config to take the backbone from, overrides of that backbone dict, timm model or None,
#          timm out_indices matching the DenseDet outputs, conv backbone?)
CONV_OUT = (1, 2, 3, 4)  # timm ResNet feature indices of layer1..layer4
CASES: dict[str, tuple[str, dict[str, Any], str | None, tuple[int, ...], bool]] = {
    "r50": ("retinanet_r50_fpn_1x_coco", {}, "resnet50", CONV_OUT, True),
    "r101": ("retinanet_r101_fpn_1x_coco", {}, "resnet101", CONV_OUT, True),
    "x101_32x4d": ("retinanet_x101_32x4d_fpn_1x_coco", {}, "resnext101_32x4d", CONV_OUT, True),
    "x101_64x4d": ("retinanet_x101_64x4d_fpn_1x_coco", {}, "resnext101_64x4d", CONV_OUT, True),
    # MMDetection configs/res2net/*_r2_101_fpn_*: Res2Net(depth=101, scales=4, base_width=26) on the R-50 base
    # (deep stem, avg-down shortcuts = timm's res2net101d, not the plain res2net101_26w_4s).
    "r2_101": ("retinanet_r50_fpn_1x_coco", {"type": "Res2Net", "depth": 101, "scales": 4, "base_width": 26,
                                             "style": "pytorch"}, "res2net101d", CONV_OUT, True),
    "swin_t": ("retinanet_swin-t-p4-w7_fpn_1x_coco", {}, "swin_tiny_patch4_window7_224", (1, 2, 3), False),
    "swin_s": ("retinanet_swin-t-p4-w7_fpn_1x_coco", {"arch": "small", "drop_path_rate": 0.3},
               "swin_small_patch4_window7_224", (1, 2, 3), False),
    "swin_b": ("retinanet_swin-t-p4-w7_fpn_1x_coco", {"arch": "base", "drop_path_rate": 0.3},
               "swin_base_patch4_window7_224", (1, 2, 3), False),
    "swin_l": ("retinanet_swin-t-p4-w7_fpn_1x_coco", {"arch": "large", "drop_path_rate": 0.3},
               "swin_large_patch4_window7_224", (1, 2, 3), False),
    "biformer_s": ("retinanet.1x.biformer_small", {}, None, (), False),
    "biformer_b": ("retinanet.1x.biformer_base", {}, None, (), False),
}
DEFAULT_BACKBONES = "r50,r101,x101_32x4d,x101_64x4d,r2_101,swin_t,swin_s,swin_b,biformer_s,biformer_b"
LABELS = {"r50": "ResNet-50", "r101": "ResNet-101", "x101_32x4d": "ResNeXt-101 32x4d",
          "x101_64x4d": "ResNeXt-101 64x4d", "r2_101": "Res2Net-101 26w4s", "swin_t": "Swin-T", "swin_s": "Swin-S",
          "swin_b": "Swin-B", "swin_l": "Swin-L", "biformer_s": "BiFormer-S", "biformer_b": "BiFormer-B"}


# --------------------------------------------------------------------------------------------------- models


def densedet_backbone_cfg(name: str) -> dict[str, Any]:
    """The backbone dict of the case's config (with its overrides), ``pretrained`` removed."""
    from densedet.config.loader import load_config

    config, overrides = CASES[name][0], CASES[name][1]
    cfg = dict(load_config(config).model["backbone"])
    if overrides.get("type") not in (None, cfg["type"]):  # another backbone type on this config's settings
        cfg = {k: v for k, v in cfg.items() if k not in ("groups", "base_width")}
    cfg.update(overrides)
    cfg.pop("pretrained", None)
    cfg.pop("init_cfg", None)
    return cfg


def build_model(lib: str, name: str) -> Any:
    """DenseDet backbone or timm feature extractor for one case, random weights, eval mode."""
    import torch

    torch.manual_seed(0)
    if lib == "densedet":
        import densedet.models  # noqa: F401  (registers the backbones)
        from densedet.registry import BACKBONES

        m = BACKBONES.build(densedet_backbone_cfg(name), "bench")
        if hasattr(m, "init_weights"):
            m.init_weights()  # default init only: pretrained was removed
    else:
        import timm

        _, _, timm_name, out_indices, conv = CASES[name]
        kwargs: dict[str, Any] = {} if conv else {"img_size": INPUT_SIZE}
        m = timm.create_model(timm_name, pretrained=False, features_only=True, out_indices=out_indices, **kwargs)
    return m.eval()


def make_step(lib: str, name: str, m: Any, channels_last: bool) -> Callable[[], Any]:
    """One forward pass (eval, no_grad, batch 1) on the fixed input. timm's Swin returns NHWC maps; they are
    permuted to contiguous NCHW, the layout DenseDet's Swin returns and an FPN consumes (about 1 ms)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *INPUT_SIZE, generator=g)
    if channels_last:
        m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    nhwc = lib == "timm" and not CASES[name][4]

    def step() -> Any:
        with torch.no_grad():
            outs = m(x)
            if nhwc:
                outs = [o.permute(0, 3, 1, 2).contiguous() for o in outs]
            return outs

    return step


def variants_of(name: str, channels_last: bool) -> list[tuple[str, bool]]:
    libs = ["densedet"] + (["timm"] if CASES[name][2] else [])
    specs = [(lib, False) for lib in libs]
    if channels_last and CASES[name][4]:
        specs += [(lib, True) for lib in libs]
    return specs


# --------------------------------------------------------------------------------------------------- workers


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS (VmHWM) since the last :func:`reset_peak_rss`, or since the start."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def time_case(name: str, threads: int, iters: int, warmup: int, channels_last: bool,
              profile: int) -> list[dict[str, Any]]:
    """Time all variants of one backbone in this process, alternating their iterations."""
    import torch

    torch.set_num_threads(threads)
    specs = variants_of(name, channels_last)
    models = [build_model(lib, name) for lib, _ in specs]
    steps = [make_step(lib, name, m, cl) for (lib, cl), m in zip(specs, models)]
    shapes = []
    for step in steps:
        for _ in range(warmup):
            outs = step()
        shapes.append([list(o.shape) for o in outs])
    times: list[list[float]] = [[] for _ in steps]
    loads = [os.getloadavg()[0]]
    for i in range(iters):
        order = list(range(len(steps)))
        for j in order[i % len(order):] + order[:i % len(order)]:
            t0 = time.perf_counter()
            steps[j]()
            times[j].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    results = []
    for (lib, cl), m, step, ts, shp in zip(specs, models, steps, times, shapes):
        res: dict[str, Any] = {
            "backbone": name, "lib": lib, "channels_last": cl, "threads": threads, "iters": iters, "warmup": warmup,
            "times_s": ts, "median_s": statistics.median(ts), "params": sum(p.numel() for p in m.parameters()),
            "out_shapes": shp, "loadavg_1min": loads,
            "model": CASES[name][2] if lib == "timm" else densedet_backbone_cfg(name)}
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


def measure_memory(name: str, lib: str, threads: int, channels_last: bool, iters: int) -> dict[str, Any]:
    """In a fresh process: RSS after construction (input included), then peak RSS over ``iters`` forwards."""
    import torch

    torch.set_num_threads(threads)
    step = make_step(lib, name, build_model(lib, name), channels_last)
    rss_built = rss_bytes()
    reset = reset_peak_rss()
    for _ in range(iters):
        step()
    peak = peak_rss_bytes()
    return {"rss_after_build_mib": rss_built / 2**20, "peak_rss_mib": peak / 2**20,
            "peak_minus_build_mib": (peak - rss_built) / 2**20, "peak_reset": reset, "mem_iters": iters}


# --------------------------------------------------------------------------------------------------- driver


def spawn(args: argparse.Namespace, job: str) -> Any:
    """Run one worker job in a fresh interpreter; returns its JSON answer."""
    cmd = [sys.executable, __file__, "--worker", job, "--threads", str(args.threads), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--profile", str(args.profile), "--mem-iters", str(args.mem_iters)]
    if args.channels_last:
        cmd.append("--channels-last")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {job} failed:\n{proc.stderr[-4000:]}")
    print(f"  {job:<32} done in {time.perf_counter() - t0:5.0f} s (load {os.getloadavg()[0]:.2f})",
          file=sys.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def get(name: str, lib: str, cl: bool = False) -> dict[str, Any] | None:
        for r in results:
            if (r["backbone"], r["lib"], r["channels_last"]) == (name, lib, cl):
                return r
        return None

    def ms(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return f"{1e3 * r['median_s']:.0f} ({1e3 * min(r['times_s']):.0f}-{1e3 * max(r['times_s']):.0f})"

    def ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> str:
        return f"**{num['median_s'] / den['median_s']:.2f}x**" if num and den else "-"

    def mib(r: dict[str, Any] | None) -> str:
        return f"{r['peak_minus_build_mib']:.0f}" if r and "peak_minus_build_mib" in r else "-"

    def mparams(r: dict[str, Any] | None) -> str:
        return f"{r['params'] / 1e6:.2f}" if r else "-"

    names = list(dict.fromkeys(r["backbone"] for r in results))
    lines = [f"Machine: {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}, timm {meta['timm']}; "
             f"input 1x3x{INPUT_SIZE[0]}x{INPUT_SIZE[1]}, eval, no_grad; {meta['iters']} timed iterations after "
             f"{meta['warmup']} warm-up, alternated; ms = median (min-max) of one forward.", "",
             "| backbone | timm model | DenseDet ms | timm ms | timm/DenseDet | DenseDet peak MiB | timm peak MiB "
             "| DenseDet params (M) | timm params (M) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        d, t = get(name, "densedet"), get(name, "timm")
        lines.append(f"| {LABELS[name]} | {CASES[name][2] or '(none in timm)'} | {ms(d)} | {ms(t)} | {ratio(t, d)} "
                     f"| {mib(d)} | {mib(t)} | {mparams(d)} | {mparams(t)} |")
    loads = [x for r in results for x in r["loadavg_1min"]]
    lines += ["", f"Peak MiB = peak RSS during {meta['mem_iters']} forward(s) of the variant alone in a fresh process "
              "minus its RSS after construction. 1-min load average during timing: "
              f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs.", ""]
    cl_names = [n for n in names if get(n, "densedet", True)]
    if cl_names:
        lines += ["`channels_last` (model and input), conv backbones:", "",
                  "| backbone | DenseDet NCHW ms | DenseDet CL ms | timm CL ms | DenseDet NCHW/CL "
                  "| timm(NCHW)/DenseDet(CL) | timm(CL)/DenseDet(CL) | DenseDet CL peak MiB | timm CL peak MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in cl_names:
            d, dc, t, tc = get(n, "densedet"), get(n, "densedet", True), get(n, "timm"), get(n, "timm", True)
            lines.append(f"| {LABELS[n]} | {ms(d)} | {ms(dc)} | {ms(tc)} | {ratio(d, dc)} | {ratio(t, dc)} "
                         f"| {ratio(tc, dc)} | {mib(dc)} | {mib(tc)} |")
        lines.append("")
    profiled = [r for r in results if r.get("profile_top")]
    if profiled:
        lines += ["Top ops by self CPU time (one profiled forward each):", ""]
        for r in profiled:
            tag = f"{LABELS[r['backbone']]} / {r['lib']}{' / channels_last' if r['channels_last'] else ''}"
            ops = "; ".join(f"`{p['op']}` {p['self_cpu_ms']:.0f} ms ({p['self_pct']:.0f}%, {p['calls']}x)"
                            for p in r["profile_top"])
            lines.append(f"* {tag}: {ops}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mem-iters", type=int, default=1, help="forwards per memory subprocess")
    parser.add_argument("--quick", action="store_true", help="smoke run: --iters 1 --warmup 1")
    parser.add_argument("--backbones", default=DEFAULT_BACKBONES, help=f"comma list of {sorted(CASES)}")
    parser.add_argument("--channels-last", action="store_true",
                        help="also time DenseDet and timm in channels_last (conv backbones)")
    parser.add_argument("--profile", type=int, default=0, help="print the top N ops of one profiled forward")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=None, help="write all raw numbers as JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.iters, args.warmup = 1, 1

    if args.worker:  # child process: one job, JSON on the last stdout line
        kind, *rest = args.worker.split(":")
        if kind == "time":
            out: Any = time_case(rest[0], args.threads, args.iters, args.warmup, args.channels_last, args.profile)
        else:
            out = measure_memory(rest[0], rest[1], args.threads, rest[2] == "cl", args.mem_iters)
        print(json.dumps(out))
        return

    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown backbones {unknown}; known: {sorted(CASES)}")
    import timm
    import torch

    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for name in names:
        case = spawn(args, f"time:{name}")
        if not args.no_memory:
            for r in case:
                r.update(spawn(args, f"mem:{name}:{r['lib']}:{'cl' if r['channels_last'] else 'nchw'}"))
        results += case
    meta = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "iters": args.iters, "warmup": args.warmup,
            "mem_iters": args.mem_iters, "command": " ".join(sys.argv),
            "wall_s": time.perf_counter() - t_start}
    print(markdown_report(results, meta))
    print(f"total wall time {meta['wall_s']:.0f} s", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
