"""FCOS recipe study: DenseDet FCOS variants against torchvision's FCOS on one backbone + FPN (issue 13, item 4).

Run by hand, not a test. Usage::

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/bench_fcos_recipe.py --seeds 0,1 --epochs 6 \
        --jobs 2 --threads 1 --out fcos_recipe.json
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_fcos_recipe.py --quick      # smoke run: 1 epoch, 5 iters

Every (variant, seed) trains in its own fresh subprocess with DenseDet's ``Trainer`` on the built-in synthetic set
(``--config``, default ``fcos_r18_fpn_synth``: 400 train / 100 val images, 320 px, batch 8, AdamW, cosine
schedule), so data order, augmentation, optimizer, parameter-wise decay rules, lr schedule and evaluation are
identical for every variant. What differs:

* ``tv``: torchvision's ``FCOS`` (``torchvision.models.detection.fcos``: its ``FCOSHead``, its assignment in
  ``FCOS.compute_loss``, its losses and its post-processing), ``num_convs`` = the config's ``stacked_convs``, its
  default GroupNorm(32), one anchor per location of side = stride (its default ``AnchorGenerator`` rule), running
  on *the same* DenseDet backbone + FPN module (same class, same initialisation from the same seed);
  its ``GeneralizedRCNNTransform`` is bypassed: both get the same padded pixel batch from DenseDet's loader,
  normalised by the DenseDet model's ``data_preprocessor``;
* ``dd_*``: DenseDet's ``FCOSHead`` from the config with the overrides listed in ``VARIANTS``.

Each trained model is evaluated (COCO AP, faster-coco-eval through ``densedet.engine.evaluate``) under two
post-processing rules, so that the training recipe and the test rule can be told apart:

* ``dd``: DenseDet/mmdet 2.x -- per level the top ``nms_pre`` = 1000 by class score above ``score_thr`` = 0.05,
  times sigmoid(centerness), class-wise NMS IoU 0.5, 100 per image (the config's ``test_cfg``);
* ``tv``: torchvision's ``FCOS.postprocess_detections`` -- score sqrt(sigmoid(cls) * sigmoid(ctr)) above 0.2,
  top 1000 per level by that score, class-wise NMS IoU 0.6, 100 per image (checked against torchvision's own
  function on the first validation batch of the ``tv`` model).

Output: a markdown table (mean and both seeds of AP / AP50 / AP75 per variant and rule) on stdout, progress on
stderr, every number in ``--out`` JSON.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# The two head recipes, spelled out so that a variant does not depend on what the config currently says:
# mmdet's (``fcos_r18_fpn_synth`` before issue 13) and torchvision's (the config since).
HEAD = "model.bbox_head."
MMDET_HEAD = {HEAD + "bbox_loss_weighting": "centerness", HEAD + "scale_per_level": True,
              HEAD + "norm_cfg": {"type": "GN", "num_groups": 16, "requires_grad": True}}
TV_HEAD = {HEAD + "bbox_loss_weighting": "uniform", HEAD + "scale_per_level": False,
           HEAD + "norm_cfg": {"type": "GN", "num_groups": 32, "requires_grad": True}}
# name -> (library, DenseDet config overrides, description). The ``tv`` model takes only backbone, neck, data,
# optimizer and schedule from the config.
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "tv": ("torchvision", {}, "torchvision FCOS head, assignment, losses"),
    "dd_mmdet": ("densedet", MMDET_HEAD, "mmdet recipe: centerness-weighted GIoU, per-level Scale, GN(16)"),
    "dd_uniform": ("densedet", {**MMDET_HEAD, HEAD + "bbox_loss_weighting": "uniform"},
                   "mmdet recipe with GIoU averaged over positives (torchvision)"),
    "dd_noscale": ("densedet", {**MMDET_HEAD, HEAD + "scale_per_level": False},
                   "mmdet recipe without the per-level Scale (torchvision)"),
    "dd_uniform_noscale": ("densedet", {**TV_HEAD, HEAD + "norm_cfg": MMDET_HEAD[HEAD + "norm_cfg"]},
                           "uniform GIoU + no Scale, GN(16): torchvision's recipe but the GN groups"),
    "dd_tv": ("densedet", TV_HEAD, "torchvision's recipe: uniform GIoU, no Scale, GN(32) (= fcos_r18_fpn_synth now)"),
}
# results written before the variants were spelled out (same runs, then named after the config they ran)
LEGACY_NAMES = {"dd_config": "dd_mmdet"}
DEFAULT_VARIANTS = "tv,dd_mmdet,dd_tv,dd_uniform,dd_noscale"
TV_TEST = {"score_thresh": 0.2, "nms_thresh": 0.6, "topk_candidates": 1000, "detections_per_img": 100}
METRICS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")


# --------------------------------------------------------------------------------------------------- models
def build_torchvision_fcos(det: Any, num_classes: int, num_convs: int, strides: list[int]) -> Any:
    """torchvision's FCOS on the backbone + neck of the DenseDet detector ``det`` (same modules, same weights)."""
    import torch
    from torch import nn
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOS, FCOSHead
    from torchvision.models.detection.image_list import ImageList

    class Features(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.neck = det.backbone, det.neck
            self.out_channels = det.bbox_head.in_channels

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            return list(self.neck(self.backbone(x)))

    class TorchvisionFCOS(nn.Module):
        """DenseDet's detector interface (``forward(images, targets, metas, mode)``) around torchvision's FCOS."""

        def __init__(self) -> None:
            super().__init__()
            feats = Features()
            # torchvision's rule: one square anchor per location whose side is the level's stride
            anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
            head = FCOSHead(feats.out_channels, 1, num_classes, num_convs=num_convs)
            self.fcos = FCOS(feats, num_classes, anchor_generator=anchors, head=head, **TV_TEST)
            self.pre = det.data_preprocessor  # the DenseDet config's normalisation (pixels in)
            self.num_classes = num_classes
            self.channels_last = False

        def use_channels_last(self, enable: bool = True) -> TorchvisionFCOS:
            self.channels_last = enable
            return self.to(memory_format=torch.channels_last if enable else torch.contiguous_format)

        def head_outputs(self, images: torch.Tensor, metas: list[dict[str, Any]]) -> tuple[Any, ...]:
            images = self.pre(images, metas)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            il = ImageList(images, [tuple(int(v) for v in m["img_shape"][:2]) for m in metas])
            feats = self.fcos.backbone(images)
            outs = self.fcos.head(feats)
            anchors = self.fcos.anchor_generator(il, feats)
            return il, feats, outs, anchors

        def forward(self, images: torch.Tensor, targets: list[dict[str, Any]] | None = None,
                    metas: list[dict[str, Any]] | None = None, mode: str = "loss") -> Any:
            il, feats, outs, anchors = self.head_outputs(images, metas)
            if mode != "loss":
                raise ValueError("TorchvisionFCOS: predictions go through raw_outputs()")
            tv_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
            losses = self.fcos.compute_loss(tv_targets, outs, anchors, [f.shape[2] * f.shape[3] for f in feats])
            return {"loss_cls": losses["classification"], "loss_bbox": losses["bbox_regression"],
                    "loss_centerness": losses["bbox_ctrness"]}

        @torch.no_grad()
        def raw_outputs(self, images: torch.Tensor, metas: list[dict[str, Any]]) -> tuple[list, list, list]:
            """Per level: cls logits (B, N_l, C), centerness logits (B, N_l), boxes (B, N_l, 4) xyxy clipped."""
            il, feats, outs, anchors = self.head_outputs(images, metas)
            sizes = [f.shape[2] * f.shape[3] for f in feats]
            anchors = torch.stack(anchors)  # (B, N, 4)
            boxes = self.fcos.box_coder.decode(outs["bbox_regression"], anchors)
            boxes = clip(boxes, metas)
            return (list(outs["cls_logits"].split(sizes, 1)), list(outs["bbox_ctrness"][..., 0].split(sizes, 1)),
                    list(boxes.split(sizes, 1)))

    return TorchvisionFCOS()


def clip(boxes: Any, metas: list[dict[str, Any]]) -> Any:
    """Clip (B, N, 4) xyxy boxes to each image's ``img_shape``."""
    import torch

    hw = torch.tensor([m["img_shape"][:2] for m in metas], dtype=boxes.dtype, device=boxes.device)
    lim = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1)[:, None]
    return torch.minimum(boxes.clamp(min=0), lim)


def densedet_raw_outputs(det: Any, images: Any, metas: list[dict[str, Any]]) -> tuple[list, list, list]:
    """DenseDet FCOS: per level cls logits (B, N_l, C), centerness logits (B, N_l), boxes (B, N_l, 4) clipped."""
    import torch

    from densedet.models.heads.dense_head import flatten_levels

    head = det.bbox_head
    with torch.no_grad():
        cls, dist, ctr = head(det.extract_feat(det.data_preprocessor(images, metas)))  # eval: distances in pixels
        sizes = [tuple(m.shape[-2:]) for m in cls]
        points, per_level = head.points(sizes, images.device, torch.float32)
        boxes = head.bbox_coder.decode(points[None], flatten_levels(dist, 4))
    return ([flatten_levels([c], head.num_classes) for c in cls], [flatten_levels([c], 1)[..., 0] for c in ctr],
            list(clip(boxes, metas).split(per_level, 1)))


def postprocess_dd(raw: tuple[list, list, list], metas: list[dict[str, Any]], num_classes: int,
                   test_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """DenseDet's post-processing (the config's ``test_cfg``) on raw per-level outputs."""
    from densedet.models.heads.postprocess import parse_test_cfg, postprocess_levels

    cls, ctr, boxes = raw

    def decode(lvl: int, idx: Any) -> Any:
        return boxes[lvl].gather(1, idx[..., None].expand(-1, -1, 4))

    return postprocess_levels([c.sigmoid() for c in cls], [c.sigmoid() for c in ctr], decode, num_classes,
                              parse_test_cfg(test_cfg), metas, rescale=True)


def postprocess_tv(raw: tuple[list, list, list], metas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """torchvision's ``FCOS.postprocess_detections`` rule (its defaults, ``TV_TEST``), boxes rescaled to the
    original image."""
    import torch
    from torchvision.ops import batched_nms

    cls, ctr, boxes = raw
    out = []
    for i, meta in enumerate(metas):
        all_boxes, all_scores, all_labels = [], [], []
        for c, t, b in zip(cls, ctr, boxes):
            nc = c.shape[-1]
            scores = torch.sqrt(c[i].sigmoid() * t[i].sigmoid()[:, None]).flatten()
            keep = torch.where(scores > TV_TEST["score_thresh"])[0]
            top, order = scores[keep].topk(min(TV_TEST["topk_candidates"], keep.numel()))
            keep = keep[order]
            all_boxes.append(b[i][keep // nc])
            all_scores.append(top)
            all_labels.append(keep % nc)
        bx, sc, lb = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        k = batched_nms(bx, sc, lb, TV_TEST["nms_thresh"])[:TV_TEST["detections_per_img"]]
        sw, sh = meta["scale_factor"][:2]
        out.append({"boxes": bx[k] / bx.new_tensor([sw, sh, sw, sh]), "scores": sc[k], "labels": lb[k]})
    return out


def check_tv_rule(model: Any, loader: Any) -> dict[str, Any]:
    """Compare :func:`postprocess_tv` with torchvision's own ``postprocess_detections`` on the first validation
    batch (both in the input frame): number of detections and largest |difference| of boxes and scores."""
    import torch

    batch = next(iter(loader))
    images, metas = batch["images"], batch["metas"]
    raw = model.raw_outputs(images, metas)
    unit = [dict(m, scale_factor=(1.0, 1.0)) for m in metas]
    mine = postprocess_tv(raw, unit)
    with torch.no_grad():
        il, feats, outs, anchors = model.head_outputs(images, metas)
        sizes = [f.shape[2] * f.shape[3] for f in feats]
        split = {k: list(v.split(sizes, 1)) for k, v in outs.items()}
        ref = model.fcos.postprocess_detections(split, [list(a.split(sizes)) for a in anchors], il.image_sizes)
    worst, same, count = 0.0, True, 0
    for a, b in zip(mine, ref):
        count += len(b["boxes"])
        if a["boxes"].shape != b["boxes"].shape or not torch.equal(a["labels"], b["labels"]):
            same = False
        elif a["boxes"].numel():
            worst = max(worst, float((a["boxes"] - b["boxes"]).abs().max()),
                        float((a["scores"] - b["scores"]).abs().max()))
    return {"same_detections": same, "num_detections": count, "max_abs_diff": worst}


class RuleModel:
    """Presents raw outputs + one post-processing rule as the ``mode="predict"`` model ``evaluate`` expects."""

    def __init__(self, raw_fn: Any, post_fn: Any, net: Any) -> None:
        self.raw_fn, self.post_fn, self.net = raw_fn, post_fn, net

    def eval(self) -> RuleModel:
        self.net.eval()
        return self

    def train(self, mode: bool = True) -> RuleModel:
        self.net.train(mode)
        return self

    @property
    def training(self) -> bool:
        return self.net.training

    def __call__(self, images: Any, targets: Any, metas: list[dict[str, Any]], mode: str = "predict") -> Any:
        return self.post_fn(self.raw_fn(images, metas), metas)


# --------------------------------------------------------------------------------------------------- one run
def run_one(config: str, variant: str, seed: int, epochs: int, work_root: Path, data_root: Path,
            max_iters: int | None) -> dict[str, Any]:
    import torch

    import densedet
    from densedet.engine import Trainer
    from densedet.engine.evaluator import evaluate
    from densedet.engine.trainer import set_random_seed

    lib, overrides, _ = VARIANTS[variant]
    over = {"data.root": str(data_root), "data.auto_create": None, "runtime.seed": seed,
            "schedule.epochs": epochs, "runtime.val_interval": 0, "runtime.checkpoint_interval": 0,
            "runtime.log_interval": 25, **overrides}
    if max_iters:
        over["schedule.max_iters"] = max_iters
    cfg = densedet.load_config(config, over)
    set_random_seed(seed)  # the backbone + neck of every variant start from the same weights for one seed
    det = densedet.build_detector(cfg.model)
    head = cfg.model["bbox_head"]
    model = det if lib == "densedet" else build_torchvision_fcos(
        det, head["num_classes"], head.get("stacked_convs", 4), list(head.get("strides", (8, 16, 32, 64, 128))))
    work = work_root / f"{variant}_s{seed}"
    trainer = Trainer(cfg, work, model=model)
    t0 = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - t0

    # validation set (the trainer builds none with val_interval 0)
    from densedet.data import CocoDataset, build_dataloader

    val = CocoDataset(data_root / cfg.data.val.ann_file, data_root / cfg.data.val.img_dir, cfg.data.val.pipeline,
                      filter_empty_gt=False, test_mode=True)
    loader = build_dataloader(val, cfg.data.val_samples_per_gpu, 0, shuffle=False, seed=seed,
                              size_divisor=cfg.data.size_divisor)
    net = trainer.model
    net.eval()
    nc = head["num_classes"]
    if lib == "densedet":
        def raw_fn(images: Any, metas: list[dict[str, Any]]) -> Any:
            return densedet_raw_outputs(net, images, metas)
    else:
        raw_fn = net.raw_outputs
    res: dict[str, Any] = {"variant": variant, "lib": lib, "seed": seed, "epochs": epochs, "iters": trainer.iter,
                           "train_s": train_s, "train_loss": out.get("train_loss"), "overrides": overrides,
                           "params": sum(p.numel() for p in net.parameters() if p.requires_grad), "rules": {}}
    if lib == "torchvision":
        res["tv_rule_check"] = check_tv_rule(net, loader)
    rules = {"dd": lambda raw, metas: postprocess_dd(raw, metas, nc, cfg.model.get("test_cfg") or {}),
             "tv": postprocess_tv}
    for rule, post in rules.items():
        result = evaluate(RuleModel(raw_fn, post, net), loader, val, torch.device("cpu"))
        res["rules"][rule] = {k: float(result.metrics[k]) for k in METRICS}
    return res


# --------------------------------------------------------------------------------------------------- driver
def spawn(args: argparse.Namespace, variant: str, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", f"{variant}:{seed}", "--config", args.config, "--epochs",
           str(args.epochs), "--threads", str(args.threads), "--work-dir", str(args.work_dir)]
    if args.max_iters:
        cmd += ["--max-iters", str(args.max_iters)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {variant}:{seed} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if args.out:  # partial results survive an interrupted study
        with open(args.out.with_suffix(".partial.jsonl"), "a") as f:
            f.write(json.dumps(res) + "\n")
    m = res["rules"]["dd"]
    print(f"  {variant}:{seed} done in {time.perf_counter() - t0:5.0f} s: AP {m['bbox_mAP']:.3f} "
          f"AP50 {m['bbox_mAP_50']:.3f} AP75 {m['bbox_mAP_75']:.3f} (dd rule)", file=sys.stderr, flush=True)
    return res


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| variant | rule | AP (mean) | AP50 (mean) | AP75 (mean) | AP per seed | AP50 per seed | AP75 per seed |",
             "|---|---|---:|---:|---:|---|---|---|"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    for v in variants:
        rs = sorted((r for r in results if r["variant"] == v), key=lambda r: r["seed"])
        for rule in ("dd", "tv"):
            cells = []
            for k in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"):
                cells.append(f"{statistics.mean(r['rules'][rule][k] for r in rs):.3f}")
            per = [" / ".join(f"{r['rules'][rule][k]:.3f}" for r in rs) for k in ("bbox_mAP", "bbox_mAP_50",
                                                                                  "bbox_mAP_75")]
            lines.append(f"| {v} | {rule} | " + " | ".join(cells) + " | " + " | ".join(per) + " |")
    lines += ["", "Seeds: " + ", ".join(sorted({str(r["seed"]) for r in results})) + "; rule dd = DenseDet test_cfg "
              "(score_thr 0.05 on cls, x centerness, NMS 0.5); rule tv = torchvision (sqrt(cls*ctr) > 0.2, NMS 0.6)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="fcos_r18_fpn_synth", help="DenseDet config (backbone, neck, data, optim)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds")
    p.add_argument("--epochs", type=int, default=6, help="epochs of 50 iterations (batch 8) per run")
    p.add_argument("--max-iters", type=int, default=None, help="stop every run after this many iterations")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (fresh subprocess each)")
    p.add_argument("--work-dir", type=Path, default=Path("work_dirs/bench_fcos_recipe"))
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 5 iterations, seed 0")
    p.add_argument("--out", type=Path, help="write every number to this JSON file")
    p.add_argument("--collect", nargs="+", type=Path, metavar="DIR",
                   help="only rebuild the table (and --out) from the result.json files of earlier runs under DIRs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.collect:
        found = sorted(f for d in args.collect for f in d.glob("*_s*/result.json"))
        if not found:
            p.error(f"no */result.json under {[str(d) for d in args.collect]}")
        results = [json.loads(f.read_text()) for f in found]
        for r in results:
            if r["variant"] in LEGACY_NAMES:
                r["ran_as"], r["variant"] = r["variant"], LEGACY_NAMES[r["variant"]]
        order = {v: i for i, v in enumerate(VARIANTS)}
        results.sort(key=lambda r: (order.get(r["variant"], len(order)), r["seed"]))
        print(markdown(results))
        if args.out:
            args.out.write_text(json.dumps({"meta": {"collected_from": [str(f) for f in found]},
                                            "results": results}, indent=2))
        return 0
    if args.quick:
        args.epochs, args.max_iters, args.seeds = 1, 5, "0"
    data_root = (args.work_dir / "synth").resolve()

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        variant, seed = args.worker.rsplit(":", 1)
        res = run_one(args.config, variant, int(seed), args.epochs, args.work_dir.resolve(), data_root,
                      args.max_iters)
        (args.work_dir / f"{variant}_s{seed}" / "result.json").write_text(json.dumps(res, indent=2))
        print(json.dumps(res))
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; known: {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    import densedet

    cfg = densedet.load_config(args.config)
    if not (data_root / cfg.data.train.ann_file).is_file():  # created once, before the parallel workers start
        densedet.make_synthetic_coco(data_root, **cfg.data.synth)
    import torch
    import torchvision

    meta = {"config": args.config, "epochs": args.epochs, "max_iters": args.max_iters, "seeds": seeds,
            "threads": args.threads, "jobs": args.jobs, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "variants": {v: {"lib": VARIANTS[v][0], "overrides": VARIANTS[v][1], "what": VARIANTS[v][2]}
                         for v in variants}}
    t0 = time.perf_counter()
    jobs = [(v, s) for v in variants for s in seeds]  # variant-major: both seeds of a variant run together
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda job: spawn(args, *job), jobs))
    meta["total_wall_s"] = time.perf_counter() - t0
    report = markdown(results)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
