"""GHM and UMOP evidence on the synthetic set (issue 4, part 7): run by hand, not in CI.

Trains, with the same half-width ResNet-18 FPN, schedule, data and seed:
  RetinaNet FL + SmoothL1  vs  GHM-C + SmoothL1  vs  GHM-C + GHM-R   (retinanet_r18_fpn_synth + loss overrides)
  ATSS                      vs  UMOP (LRPHead + progressive focal loss)   (atss_r18_fpn_synth + overrides)
and reports bbox AP / AP50, the mean training-step time (relative to the focal-loss model of the same family),
and ATSS's per-level positive/negative counts (the seed's "level imbalance").

    .venv/bin/python benchmarks/bench_ghm_umop.py --epochs 12 --out work_dirs/bench_ghm_umop
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SL1 = "model.bbox_head.loss_bbox={_delete_: true, type: SmoothL1Loss, beta: 0.11, loss_weight: 1.0}"
GHMC = "model.bbox_head.loss_cls={_delete_: true, type: GHMC, bins: 30, momentum: 0.75, loss_weight: 1.0}"
GHMR = "model.bbox_head.loss_bbox={_delete_: true, type: GHMR, mu: 0.02, bins: 10, momentum: 0.7, loss_weight: 10.0}"
UMOP = ["model.type=UMOP", "model.bbox_head.type=LRPHead",
        "model.bbox_head.loss_cls={_delete_: true, type: ProgressiveFocalLoss, gamma: 2.0, delta: 0.5, w: 0.5}"]

VARIANTS = {
    "RetinaNet FL + SL1": ("retinanet_r18_fpn_synth", [SL1]),
    "RetinaNet GHM-C + SL1": ("retinanet_r18_fpn_synth", [GHMC, SL1]),
    "RetinaNet GHM-C + GHM-R": ("retinanet_r18_fpn_synth", [GHMC, GHMR]),
    "ATSS (FL)": ("atss_r18_fpn_synth", []),
    "UMOP (progressive FL)": ("atss_r18_fpn_synth", UMOP),
}
BASELINE = {"RetinaNet": "RetinaNet FL + SL1", "ATSS": "ATSS (FL)", "UMOP": "ATSS (FL)"}


def step_seconds(log: Path) -> float:
    """Mean seconds per iteration between the first and last logged training lines (validation excluded)."""
    recs = [json.loads(s) for s in log.read_text().splitlines()]
    train = [r for r in recs if r["type"] == "train"]
    if len(train) < 2:
        return float("nan")
    first, last = train[0], train[-1]  # validation runs only after the last epoch (val_interval = epochs)
    return (last["time"] - first["time"]) / max(last["iter"] - first["iter"], 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--out", default="work_dirs/bench_ghm_umop")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", help="subset of variant names")
    p.add_argument("--load-from", help="initial weights for every variant (runtime.load_from, non-strict), e.g. a "
                                       "backbone-only state dict: the seeds train from ImageNet-initialised backbones")
    p.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every variant")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from densedet.analysis.levels import format_level_table, read_level_log
    from densedet.config import load_config
    from densedet.engine import train

    rows = {}
    for name, (cfg_name, extra) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        work = Path(args.out) / name.lower().replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
        overrides = [*extra, f"schedule.epochs={args.epochs}", f"runtime.val_interval={args.epochs}",
                     "runtime.log_interval=10", *args.set]
        if args.load_from:
            overrides.append(f"runtime.load_from={args.load_from}")
        metrics = train(load_config(cfg_name, overrides), work)
        rows[name] = {"AP": metrics.get("bbox_mAP"), "AP50": metrics.get("bbox_mAP_50"),
                      "step_s": step_seconds(work / "log.jsonl"), "work": str(work)}
        print(name, rows[name], flush=True)

    print("\n| model | bbox AP | AP50 | s / step | step time vs FL baseline |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        base = rows.get(BASELINE[name.split()[0]])
        rel = r["step_s"] / base["step_s"] if base else float("nan")
        print(f"| {name} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['step_s']:.3f} | {rel:.2f}x |")
    if "ATSS (FL)" in rows:
        print("\nATSS per-level statistics (densedet levels):\n")
        print(format_level_table(read_level_log(Path(rows["ATSS (FL)"]["work"]) / "log.jsonl")))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
