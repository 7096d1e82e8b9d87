"""Mask R-CNN inference: the exported ONNX graph in onnxruntime against eager DenseDet, same input (run by hand).

Usage::

    .venv/bin/python benchmarks/bench_maskrcnn_onnx.py --config mask_rcnn_r50_fpn_1x_coco --size 800x1216 \\
        --repeats 5 --score-thr 0.0

Random weights (seeded); ``--score-thr 0.0`` makes the R-CNN keep ``max_per_img`` (100) detections so the mask
head runs on a full set in both (a fresh classifier gives every class ~1/81). The model is exported statically
at ``--size`` (``densedet export``'s onnxruntime check is printed first). Timed, alternating, after one warm-up
each: eager ``model(x, metas, mode="predict")`` (fused, fp32, channels_last per the config) and
:class:`~densedet.deploy.runtime.OnnxRuntimeModel` on the same normalised batch - both return boxes in the
original image and masks pasted into it (box-only paste), so post-processing is inside both timings.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="mask_rcnn_r50_fpn_1x_coco")
    ap.add_argument("--size", default="800x1216", help="HEIGHTxWIDTH of the (static) graph and the input")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--score-thr", type=float, default=0.0, help="test_cfg.rcnn.score_thr of both")
    ap.add_argument("--max-det", type=int, default=None, help="export --max-det (default test_cfg.rcnn)")
    args = ap.parse_args()

    import numpy as np
    import torch
    from densedet.deploy.command import parse_size

    from densedet.analysis.bench import cpu_name
    from densedet.config import load_config
    from densedet.deploy import export
    from densedet.deploy.onnx_export import normalize_params
    from densedet.deploy.runtime import OnnxRuntimeModel
    from densedet.models.build import build_detector

    h, w = parse_size(args.size)
    cfg = load_config(args.config, [f"model.test_cfg.rcnn.score_thr={args.score_thr}"])
    torch.manual_seed(0)
    ckpt = Path(tempfile.mkdtemp(prefix="bench_mr_onnx_")) / "random.pth"
    model = build_detector({**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}})
    torch.save({"state_dict": model.state_dict()}, ckpt)
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.config} {h}x{w}")
    t0 = time.perf_counter()
    res = export(cfg, ckpt, ckpt.with_name("model.onnx"), size=(h, w), max_det=args.max_det)
    print(f"export + check: {time.perf_counter() - t0:.1f} s")
    print(res.summary())

    model.eval().fuse()
    model.use_channels_last(cfg.runtime.channels_last)
    mean, std, to_rgb = normalize_params(cfg)
    onnx_model = OnnxRuntimeModel(res.path, mean, std, to_rgb, mask_thr=0.5)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, h, w), dtype=np.uint8)).float()
    x = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    metas = [{"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)}]
    runs = {"eager fp32": lambda: model(x, metas=metas, mode="predict"),
            "onnxruntime fp32": lambda: onnx_model(x, metas=metas)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    dets = {}
    with torch.no_grad():
        for name, fn in runs.items():
            dets[name] = len(fn()[0]["boxes"])  # warm-up
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["eager fp32"])
    print(f"{'variant':<18} {'median s':>9} {'min s':>7} {'max s':>7} {'vs eager':>9} {'dets':>5}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<18} {med:9.3f} {min(ts):7.3f} {max(ts):7.3f} {base / med:8.2f}x {dets[name]:5d}")


if __name__ == "__main__":
    main()
