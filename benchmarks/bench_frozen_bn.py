"""Training memory with and without FrozenBatchNorm2d in the frozen / non-trained BN layers (run by hand).

Usage::

    .venv/bin/python benchmarks/bench_frozen_bn.py --configs retinanet_r50_fpn_1x_coco \\
        fcos_r50_caffe_fpn_gn-head_1x_coco --size 512x512 --batch 2

Each (config, variant) runs in a fresh subprocess: build, then two SGD steps on random pixels with random gt;
reported is the peak RSS (getrusage) minus the RSS after construction. ``bn`` disables the conversion
(``densedet.models.backbones.resnet.freeze_batchnorms`` replaced by a no-op), ``frozen`` is the default.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def worker(config: str, variant: str, size: tuple[int, int], batch: int) -> dict:
    import torch

    import densedet
    from densedet.analysis.bench import make_batch, peak_rss_bytes, rss_bytes
    from densedet.models.backbones import resnet
    from densedet.models.layers import FrozenBatchNorm2d

    if variant == "bn":
        resnet.freeze_batchnorms = lambda *a, **k: 0
    torch.manual_seed(0)
    model = densedet.build_model(config).train()
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    images, targets = make_batch(batch, size, int(model.num_classes))
    x = images  # uint8 pixels: the model normalises them
    metas = [{"img_shape": size, "scale_factor": (1.0, 1.0)}] * batch
    targets = [dict(t, ignore_boxes=torch.zeros(0, 4)) for t in targets]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)
    built = rss_bytes()
    for _ in range(2):
        losses = model(x, targets, metas, mode="loss")
        opt.zero_grad()
        sum(v for k, v in losses.items() if k.startswith("loss")).backward()
        opt.step()
    return {"config": config, "variant": variant, "frozen_bn_layers": n_frozen,
            "peak_minus_build_mib": (peak_rss_bytes() - built) / 2**20}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", nargs="+", default=["retinanet_r50_fpn_1x_coco", "fcos_r50_caffe_fpn_gn-head_1x_coco"])
    p.add_argument("--size", default="512x512")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--worker", nargs=2)
    a = p.parse_args()
    size = tuple(int(v) for v in a.size.split("x"))
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], size, a.batch)))
        return 0
    print("| config | BN layers frozen | peak - build MiB (BatchNorm2d) | peak - build MiB (FrozenBatchNorm2d) "
          "| saved MiB |\n|---|---:|---:|---:|---:|")
    for cfg in a.configs:
        res = {}
        for variant in ("bn", "frozen"):
            out = subprocess.run([sys.executable, __file__, "--worker", cfg, variant, "--size", a.size, "--batch",
                                  str(a.batch)], capture_output=True, text=True, check=True).stdout
            res[variant] = json.loads(out.strip().splitlines()[-1])
        bn, fr = res["bn"]["peak_minus_build_mib"], res["frozen"]["peak_minus_build_mib"]
        print(f"| {cfg} | {res['frozen']['frozen_bn_layers']} | {bn:.0f} | {fr:.0f} | {bn - fr:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
