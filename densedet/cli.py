"""The ``densedet`` command: train, test, predict, data synth, convert, levels, configs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EPILOG = "Configs are built-in names (see `densedet configs`) or paths to YAML files; key=value overrides any key."


def _resolve_checkpoint(path: str) -> Path:
    from densedet.engine.checkpoint import latest_checkpoint

    p = Path(path)
    if p.is_dir():
        swa = p / "swa_final.pth"
        if swa.is_file():  # a finished SWA run: the averaged weights are the model (last_checkpoint is for resume)
            print(f"using the SWA-averaged weights {swa} (pass another .pth to test something else)", file=sys.stderr)
            return swa
        found = latest_checkpoint(p)
        if found is None:
            raise SystemExit(f"error: {p}: no checkpoint in this work dir")
        return Path(found)
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from densedet.config import load_config
    from densedet.engine import train

    cfg = load_config(args.config, args.overrides)
    work_dir = Path(args.work_dir or cfg.runtime.work_dir or Path("work_dirs") / cfg.name)
    resume: Any = args.resume
    if resume == "auto":
        resume = True
    from densedet.engine.dist import cleanup

    try:
        train(cfg, work_dir, resume=resume)
    finally:
        cleanup()
    return 0


def _build_eval_dataset(cfg: Any, split: str, tta: bool | None = None):
    from densedet.data import CocoDataset, tta_pipeline

    spec = getattr(cfg.data, split) or cfg.data.val
    root = Path(cfg.data.root)
    pipeline = tta_pipeline(spec.pipeline, tta, where=f"data.{split}.pipeline")
    return CocoDataset(root / spec.ann_file, root / spec.img_dir, pipeline=pipeline, test_mode=True)


def cmd_test(args: argparse.Namespace) -> int:
    import torch

    from densedet.config import load_config
    from densedet.data import build_dataloader
    from densedet.deploy.runtime import is_onnx_path, load_onnx_model
    from densedet.engine import evaluate
    from densedet.engine.checkpoint import load_checkpoint, load_model_weights
    from densedet.evaluation import format_metrics_table, format_per_class_table, plot_pr_curves
    from densedet.models.build import build_detector

    cfg = load_config(args.config, args.overrides)
    ckpt_path = _resolve_checkpoint(args.checkpoint)
    if args.backend == "onnxruntime" or (args.backend == "auto" and is_onnx_path(ckpt_path)):
        model, device, args.tta = load_onnx_model(cfg, ckpt_path), torch.device("cpu"), False
    else:
        model_cfg = {**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}}
        model = build_detector(model_cfg, init=False)
        load_model_weights(model, load_checkpoint(ckpt_path), strict=True, source=str(ckpt_path))
        device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
        model.to(device).use_channels_last(cfg.runtime.channels_last)
        _apply_inference_options(model, cfg, args)
    dataset = _build_eval_dataset(cfg, args.split, args.tta)
    loader = build_dataloader(dataset, batch_size=cfg.data.val_samples_per_gpu, num_workers=cfg.data.workers_per_gpu,
                              shuffle=False, seed=cfg.runtime.seed, size_divisor=cfg.data.size_divisor)
    out = Path(args.out) if args.out else ckpt_path.parent / "test"
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(model, loader, dataset, device, out_json=out / "results.bbox.json")
    print(format_metrics_table(result))
    print(format_per_class_table(result))
    plot_pr_curves(result, dataset.classes, out / "pr_curves.png")
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=2))
    print(f"results: {out / 'results.bbox.json'}  metrics: {out / 'metrics.json'}  PR curves: {out / 'pr_curves.png'}")
    return 0


def _apply_inference_options(model: Any, cfg: Any, args: argparse.Namespace) -> None:
    """--precision (default runtime.precision) and BN folding (unless --no-fuse)."""
    model.set_precision(args.precision or cfg.runtime.precision)
    if args.fuse:
        model.fuse()


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="inference precision of backbone/neck/head (default: runtime.precision); decode and NMS "
                        "stay fp32")
    p.add_argument("--backend", choices=["auto", "eager", "onnxruntime"], default="auto",
                   help="onnxruntime: run an exported .onnx file (a .pth is exported first); auto: onnxruntime for "
                        ".onnx checkpoints, else eager PyTorch")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fold BatchNorm into the preceding convs (default on; same detections to float rounding)")


def cmd_predict(args: argparse.Namespace) -> int:
    from densedet.inference.predictor import Predictor, list_images, read_image
    from densedet.inference.visualize import draw_detections, save_detection_grid

    predictor = Predictor(args.config, _resolve_checkpoint(args.checkpoint), device=args.device,
                          overrides=args.overrides, tta=args.tta, precision=args.precision, fuse=args.fuse,
                          backend=args.backend)
    files = list_images(args.input)[: args.limit or None]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, drawn = [], []
    for i in range(0, len(files), 4):
        chunk = files[i:i + 4]
        for path, det in zip(chunk, predictor(chunk)):
            img = draw_detections(read_image(path), det["boxes"], det["scores"], det["labels"], predictor.classes,
                                  score_thr=args.score_thr)
            img.save(out / f"{path.stem}.png")
            drawn.append(img)
            keep = det["scores"] > args.score_thr
            records.append({"file": str(path), "detections": [
                {"box_xyxy": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(c),
                 "class": predictor.classes[int(c)]}
                for b, s, c in zip(det["boxes"][keep], det["scores"][keep], det["labels"][keep])]})
    (out / "predictions.json").write_text(json.dumps(records, indent=1))
    if drawn:
        save_detection_grid(drawn[:16], out / "grid.png")
    print(f"drew {len(files)} images into {out}/ (grid.png, predictions.json)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from densedet.deploy.command import cmd_export as run

    return run(args, _resolve_checkpoint)


def cmd_synth(args: argparse.Namespace) -> int:
    from densedet.data.synth import make_synthetic_coco

    nval = args.num_val if args.num_val is not None else max(1, args.num_images // 4)
    paths = make_synthetic_coco(args.out, num_train=args.num_images, num_val=nval, size=args.size, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from densedet.compat.mmdet import convert_mmdet_checkpoint

    key_map = dict(kv.split("=", 1) for kv in args.key_map or [])
    report = convert_mmdet_checkpoint(args.src, args.dst, key_map)
    print(f"wrote {report['dst']} ({report['num_tensors']} tensors)")
    if report["refused_meta"]:
        print(f"meta objects not loaded (safe loading refused them; tensors kept): {report['refused_meta']}")
    if args.config:
        from densedet.config import load_config
        from densedet.engine.checkpoint import load_checkpoint, load_model_weights
        from densedet.models.build import build_detector

        cfg = load_config(args.config)
        model = build_detector({**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}}, init=False)
        load_model_weights(model, load_checkpoint(args.dst), strict=True, source=args.dst)
        print(f"checked: loads into {args.config} with strict=True")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from densedet.config import list_configs

    print("\n".join(list_configs()))
    return 0


def cmd_levels(args: argparse.Namespace) -> int:
    from densedet.diagnostics import LevelLogError, levels_report

    try:
        table, png = levels_report(args.work_dir, args.out)
    except (LevelLogError, ValueError, TypeError) as e:  # no lvl* keys, or a corrupt log line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwrote {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="densedet", description="Dense one-stage object detection in pure PyTorch.",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (torchrun for several processes)", epilog=EPILOG)
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optimizer.lr=0.02")
    t.add_argument("--work-dir", help="where checkpoints, logs and plots go (default work_dirs/CONFIG)")
    t.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the latest checkpoint in the work dir, or from the given file")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("test", help="evaluate a checkpoint with COCO metrics", epilog=EPILOG)
    e.add_argument("config")
    e.add_argument("checkpoint", help="checkpoint file or work dir (its latest checkpoint)")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--out", help="folder for results json, metrics and PR curves")
    e.add_argument("--split", default="val", choices=["val", "test"])
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: default as the config's pipeline (MultiScaleFlipAug); "
                        "--no-tta tests at its first scale only, --tta adds horizontal flips to one scale")
    _add_inference_options(e)
    e.set_defaults(fn=cmd_test)

    r = sub.add_parser("predict", help="draw detections on images", epilog=EPILOG)
    r.add_argument("config")
    r.add_argument("checkpoint", help="checkpoint file or work dir")
    r.add_argument("input", help="an image or a folder of images")
    r.add_argument("overrides", nargs="*")
    r.add_argument("--out", required=True)
    r.add_argument("--score-thr", type=float, default=0.3)
    r.add_argument("--limit", type=int, default=0, help="at most this many images (0 = all)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: default as the config's pipeline (MultiScaleFlipAug); "
                        "--no-tta tests at its first scale only, --tta adds horizontal flips to one scale")
    _add_inference_options(r)
    r.set_defaults(fn=cmd_predict)

    from densedet.deploy.command import add_export_parser

    add_export_parser(sub, EPILOG).set_defaults(fn=cmd_export)
    from densedet.bench import add_bench_parser, cmd_bench

    add_bench_parser(sub, EPILOG).set_defaults(fn=cmd_bench)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the built-in synthetic COCO-format dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--num-images", type=int, default=400, help="training images")
    s.add_argument("--num-val", type=int, default=None, help="validation images (default num-images/4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=320, help="image side in pixels")
    s.set_defaults(fn=cmd_synth)

    c = sub.add_parser("convert", help="convert a released MMDetection checkpoint")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--key-map", nargs="*", help="old_prefix=new_prefix renames")
    c.add_argument("--config", help="also check that the result loads into this config with strict=True")
    c.set_defaults(fn=cmd_convert)

    lv = sub.add_parser("levels", help="per-pyramid-level pos/neg counts and cls loss over training (table + PNG)")
    lv.add_argument("work_dir", help="a training work dir (reads its log.jsonl)")
    lv.add_argument("--out", help="PNG to write (default WORK_DIR/levels.png)")
    lv.set_defaults(fn=cmd_levels)

    lc = sub.add_parser("configs", help="list built-in configs")
    lc.set_defaults(fn=cmd_configs)
    return p


def main(argv: list[str] | None = None) -> int:
    from densedet.data.coco import DataError
    from densedet.engine.checkpoint import CheckpointError
    from densedet.registry import ConfigError

    parser = build_parser()
    # Overrides may come before or after options (`train CFG --work-dir D a=1`): collect stray key=value words.
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if "=" in e and not e.startswith("-")]
    if len(stray) != len(extra):
        parser.error(f"unrecognized arguments: {' '.join(e for e in extra if e not in stray)}")
    if stray:
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = list(args.overrides or []) + stray
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
