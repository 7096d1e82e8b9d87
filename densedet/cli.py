"""The ``densedet`` command: train, test, predict, data synth, convert, levels, configs, info, analyze."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

from densedet.analysis.bench import add_bench_parser, cmd_bench, parse_size
from densedet.analysis.complexity import MMDET_DEFAULT_SIZE, format_complexity, model_complexity
from densedet.analysis.data_check import data_check
from densedet.analysis.levels import LevelLogError, levels_report
from densedet.api import check_export_target, export
from densedet.config import list_configs, load_config
from densedet.config.schema import LOGGER_NAMES, check_logger_names
from densedet.data import CocoDataset, build_dataloader, tta_pipeline
from densedet.data.coco import load_coco_json
from densedet.data.formats import prepare_dataset
from densedet.data.formats.common import IMAGE_EXTS
from densedet.data.synth import make_synthetic_coco
from densedet.dist import cleanup
from densedet.engine import evaluate, run_inference, train
from densedet.errors import CheckpointError, ConfigError, DataError, DenseDetError, PathError, os_error_reason
from densedet.evaluation import (
    algorithm_name,
    coco_testset_name,
    detections_to_coco_results,
    format_metrics_table,
    format_per_class_table,
    load_results_json,
    plot_pr_curves,
    write_coco_submission,
    write_error_analysis,
)
from densedet.evaluation.confusion import DEFAULT_IOU_THR, DEFAULT_SCORE_THR
from densedet.evaluation.segm import detections_to_segm_results
from densedet.inference import Predictor
from densedet.inference import draw_predictions as dp
from densedet.inference.loading import load_detector, model_device, resolve_weights_path
from densedet.inference.video import is_video_source, predict_video, require_av
from densedet.io import atomic_write_text, ensure_writable_dir
from densedet.models.build import build_detector
from densedet.weights import SWA_FINAL, convert_mmdet_checkpoint, fetch_zoo_weights, format_zoo_table, get_entry

EPILOG = "Configs are built-in names (see `densedet configs`) or paths to YAML files; key=value overrides any key."


def _resolve_checkpoint(path: str, config: str | None = None) -> Path:
    """:func:`densedet.inference.resolve_weights_path` (a file, a work dir, ``zoo`` / ``zoo:NAME``), saying on
    stderr when a work dir means its SWA average."""
    found = resolve_weights_path(path, config)
    if Path(path).is_dir() and found.name == SWA_FINAL:
        print(f"using the SWA-averaged weights {found} (pass another .pth to test something else)", file=sys.stderr)
    return found


def _zoo_row_config(args: argparse.Namespace) -> None:
    """``predict/test NAME zoo``: NAME may be a zoo row whose config has another name (e.g. the seed repos' own
    trainings, ``atss_r50_fpn_1x_coco_vfnetrepo``); use that row's config and weights."""
    if getattr(args, "checkpoint", None) != "zoo":
        return
    if args.config not in list_configs():
        entry = get_entry(args.config)
        if entry.config:
            args.checkpoint, args.config = f"zoo:{entry.name}", entry.config


def _load_cfg(args: argparse.Namespace) -> Any:
    """The config with overrides, ``--data`` and ``--img-size`` applied."""
    return load_config(args.config, args.overrides, data=getattr(args, "data", None),
                       img_size=getattr(args, "img_size", None))


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a dataset root in COCO, Pascal VOC or YOLO layout: every split reads it and the "
                                  "head gets its number of classes (see docs/own_data.md)")
    p.add_argument("--img-size", help="N or WxH: rescale every train/test scale of the config to it "
                                      "(multi-scale ranges keep their proportions)")


def _writable(folder: str | Path, what: str, option: str = "--out") -> Path:
    """``folder`` created and checked writable before any long work writes into it (a one-line path error)."""
    return ensure_writable_dir(folder, what, f"Choose another {option}")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_cfg(args)
    if args.logger:  # --logger adds to runtime.loggers
        cfg.runtime.loggers = check_logger_names([*cfg.runtime.loggers, *args.logger], "--logger")
    work_dir = Path(args.work_dir or cfg.runtime.work_dir or Path("work_dirs") / cfg.name)
    _writable(work_dir, "the work dir", "--work-dir")
    resume: Any = args.resume
    if resume == "auto":
        resume = True
    try:
        train(cfg, work_dir, resume=resume)
    finally:
        cleanup()
    return 0


def _build_eval_dataset(cfg: Any, split: str, tta: bool | None = None) -> CocoDataset:
    """The split's dataset in test mode; a ``data.test`` without a pipeline uses ``data.val``'s (what
    ``_base_/coco_test-dev.yaml`` relies on: it names only the files)."""
    spec = getattr(cfg.data, split) or cfg.data.val
    root = Path(cfg.data.root)
    steps, where = (spec.pipeline, f"data.{split}.pipeline") if spec.pipeline else (cfg.data.val.pipeline,
                                                                                      "data.val.pipeline")
    pipeline = tta_pipeline(steps, tta, where=where)
    # with masks for a mask model (as the trainer's val set): the evaluator then scores against the annotations
    # training kept, and the masks are checked before inference starts
    return CocoDataset(root / spec.ann_file, root / spec.img_dir, pipeline=pipeline, test_mode=True,
                       with_mask=spec.with_mask or cfg.data.train.with_mask, **spec.mask_options(cfg.data.train))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def _check_model_classes(model: Any, dataset: CocoDataset, ckpt_path: Path | None) -> None:
    """Weights that name their classes must be evaluated on a dataset with as many (a model trained with
    ``--data`` tested without it would be scored against another dataset's categories); other names are a
    warning (the same classes may be spelt differently)."""
    names = getattr(model, "classes", None)
    if not names or list(names) == list(dataset.classes):
        return
    if len(names) != len(dataset.classes):
        raise DataError(f"{ckpt_path}: the weights hold {_count(len(names), 'class')} ({', '.join(names[:5])}"
                        f"{', ...' if len(names) > 5 else ''}) but {dataset.ann_file} has {len(dataset.classes)}; "
                        "test on the data the model was trained on (--data PATH as in training)")
    print(f"warning: the weights name their classes {names}, {dataset.ann_file} {dataset.classes}: matched by "
          "position", file=sys.stderr)


def cmd_test(args: argparse.Namespace) -> int:
    _zoo_row_config(args)
    cfg = _load_cfg(args)
    if args.out:
        _writable(args.out, "the results folder (--out)")
    ckpt_path = _resolve_checkpoint(args.checkpoint, args.config)
    model = load_detector(cfg, ckpt_path, device=args.device, precision=args.precision, fuse=args.fuse,
                          compile=args.compile, backend=args.backend)
    split = args.split or ("test" if cfg.data.test is not None else "val")
    dataset = _build_eval_dataset(cfg, split, args.tta if model.supports_tta else False)
    _check_model_classes(model, dataset, ckpt_path)
    loader = build_dataloader(dataset, batch_size=cfg.data.val_samples_per_gpu, num_workers=cfg.data.workers_per_gpu,
                              shuffle=False, seed=cfg.runtime.seed, size_divisor=cfg.data.size_divisor)
    zoo = args.checkpoint.startswith("zoo")  # released weights: results go to work_dirs, not into the cache
    out = Path(args.out) if args.out else (Path("work_dirs") / cfg.name / "test_zoo" if zoo else
                                           ckpt_path.parent / "test")
    _writable(out, "the results folder (--out)")
    if args.format_only or not dataset.has_annotations:
        if not args.format_only:
            print(f"{dataset.ann_file} has no 'annotations' (an image-info file such as image_info_test-dev2017.json):"
                  " writing the evaluation-server files without metrics", file=sys.stderr)
        return _format_only(args, cfg, model, loader, dataset, out)
    result = evaluate(model, loader, dataset, model_device(model), out_json=out / "results.bbox.json")
    print(format_metrics_table(result))
    print(format_per_class_table(result))
    if result.segm is not None:  # a mask model: segm metrics beside bbox (results.segm.json)
        print(format_metrics_table(result.segm))
        print(format_per_class_table(result.segm))
    plot_pr_curves(result, dataset.classes, out / "pr_curves.png")
    atomic_write_text(out / "metrics.json", json.dumps(result.metrics, indent=2))
    print(f"results: {out / 'results.bbox.json'}  metrics: {out / 'metrics.json'}  PR curves: {out / 'pr_curves.png'}")
    if args.analysis:  # confusion matrix + TIDE errors, from the results just written
        print("error analysis (confusion matrix, TIDE; --no-analysis skips it) ...", file=sys.stderr)
        segm = out / "results.segm.json"
        analysis = write_error_analysis(dataset.coco_gt_dict, load_results_json(out / "results.bbox.json"), out,
                                        load_results_json(segm) if result.segm is not None else None,
                                        score_thr=args.cm_score_thr, iou_thr=args.cm_iou_thr)
        print(analysis.summary())
    return 0


def _format_only(args: argparse.Namespace, cfg: Any, model: Any, loader: Any, dataset: CocoDataset,
                 out: Path) -> int:
    """``test --format-only``: inference, then the COCO server's files (json + zip, bbox and segm); no metrics."""
    dets = run_inference(model, loader, model_device(model))
    image_ids = [d["image_id"] for d in dets]
    testset = args.testset or coco_testset_name(dataset.ann_file)
    alg = algorithm_name(args.alg or cfg.name)
    written = [write_coco_submission(detections_to_coco_results(dets, image_ids, dataset.label2cat), out, testset,
                                     alg, "bbox")]
    if dets and all("segms" in d for d in dets):
        written.append(write_coco_submission(detections_to_segm_results(dets, image_ids, dataset.label2cat), out,
                                             testset, alg, "segm"))
    for sub in written:
        print(f"{sub.iou_type}: {sub.num_results} detections on {len(dets)} images -> {sub.zip_path} "
              f"(holds {sub.json_path.name})")
    print("upload each zip to the COCO evaluation server's matching track (no metrics computed here)")
    return 0


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="inference precision of backbone/neck/head (default: runtime.precision); decode and NMS "
                        "stay fp32")
    p.add_argument("--backend", choices=["auto", "eager", "onnxruntime"], default="auto",
                   help="onnxruntime: run an exported .onnx file (a .pth is exported first); auto: onnxruntime for "
                        ".onnx checkpoints, else eager PyTorch")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fold BatchNorm into the preceding convs (default on; same detections to float rounding)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network (default: runtime.compile; the first image of each new padded size "
                        "compiles, tens of seconds); decode, NMS and a second stage stay eager")


def cmd_predict(args: argparse.Namespace) -> int:
    # `predict CFG CKPT --split val k=v`: argparse took k=v for INPUT (a URL's query is no override)
    if args.input and "=" in args.input and not Path(args.input).exists() and "://" not in args.input:
        args.overrides, args.input = [args.input, *(args.overrides or [])], None
    if bool(args.split) == bool(args.input):
        print("error: give INPUT (an image or a folder, or with --ann FILE the folder of its images) or --split "
              f"SPLIT, not {'both' if args.split else 'neither'}", file=sys.stderr)
        return 2
    _zoo_row_config(args)
    _writable(args.out, "the drawings folder (--out)")
    config = _load_cfg(args) if (args.data or args.img_size) else args.config
    video = bool(args.input and not args.ann and is_video_source(args.input))
    if args.every != 1 and not video:
        print("error: --every applies to a video, webcam or stream INPUT", file=sys.stderr)
        return 2
    if video:
        require_av()  # before loading the model: PyAV missing is a one-line install hint
    predictor = Predictor(config, _resolve_checkpoint(args.checkpoint, args.config), device=args.device,
                          overrides=args.overrides, tta=args.tta, precision=args.precision, fuse=args.fuse,
                          backend=args.backend, compile=args.compile)
    if video:  # a video file, a webcam index or a stream URL (docs/video.md)
        done = predict_video(predictor, args.input, args.out, every=args.every, score_thr=args.score_thr,
                             max_frames=args.limit)
        stopped = " (stopped by Ctrl-C)" if done["interrupted"] else ""
        print(f"detected {done['frames_detected']} of {done['frames_read']} frames in {done['seconds']:.1f} s "
              f"({done['fps']:.1f} fps){stopped}: {done['video']}  per-frame detections: {done['jsonl']}")
        return 0
    if args.split:
        items = dp.coco_images(*dp.split_files(predictor.cfg, args.split), limit=args.limit)
    elif args.ann:
        items = dp.coco_images(args.ann, args.input, limit=args.limit)
    else:
        items = dp.folder_images(args.input, limit=args.limit)
    # A folder skips files it cannot decode (counted); a single file or an annotation file's image is an error.
    skip = not args.split and not args.ann and Path(args.input).is_dir()
    done = dp.predict_and_draw(predictor, items, args.out, score_thr=args.score_thr, grid_tiles=args.grid,
                               skip_undecodable=skip)
    grid = f"grid.png with {done['grid_tiles']} of them, " if done["grid_tiles"] else ""
    print(f"drew {done['images']} images into {done['out']}/ ({grid}predictions.json)")
    if done["skipped"]:
        skipped = done["skipped"]
        print(f"warning: skipped {len(skipped)} of {len(items)} files that could not be decoded: "
              f"{', '.join(Path(p).name for p in skipped[:10])}{' ...' if len(skipped) > 10 else ''}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_export_target(Path(args.out))  # before the checkpoint is fetched and minutes of export run
    if args.checkpoint and "=" in args.checkpoint and not Path(args.checkpoint).exists():
        args.overrides, args.checkpoint = [args.checkpoint, *(args.overrides or [])], None  # an override, no weights
    result = export(args.config, _resolve_checkpoint(args.checkpoint, args.config) if args.checkpoint else None,
                    args.out, nms=args.nms, dynamic=args.dynamic, size=args.size, batch=args.batch,
                    max_det=args.max_det, overrides=args.overrides, check=args.check, check_image=args.check_image)
    print(result.summary())
    return 0 if result.check is None or result.check["ok"] else 1


def add_export_parser(sub: argparse._SubParsersAction, epilog: str) -> argparse.ArgumentParser:
    x = sub.add_parser("export", help="export to ONNX (pixels in, NMS inside, padded outputs) and check it in "
                                      "onnxruntime", epilog=epilog)
    x.add_argument("config")
    x.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint file or work dir (omit for random weights, e.g. to time the graph)")
    x.add_argument("overrides", nargs="*")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--no-nms", dest="nms", action="store_false",
                   help="output the decoded pre-NMS candidates (boxes, scores, labels) instead of detections")
    x.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    x.add_argument("--size", type=parse_size, default=None,
                   help="input HEIGHTxWIDTH (default: the config's test scale rounded up to data.size_divisor)")
    x.add_argument("--batch", type=int, default=1, help="batch size of a static graph (default 1)")
    x.add_argument("--max-det", type=int, default=None, help="detections per image (default test_cfg.max_per_img)")
    x.add_argument("--check-image", default=None,
                   help="image for the onnxruntime-vs-eager check (default: first val image, or a synthetic one)")
    x.add_argument("--no-check", dest="check", action="store_false", help="skip the onnxruntime check")
    return x


def cmd_synth(args: argparse.Namespace) -> int:
    nval = args.num_val if args.num_val is not None else max(1, args.num_images // 4)
    paths = make_synthetic_coco(args.out, num_train=args.num_images, num_val=nval, size=args.size, seed=args.seed,
                                force=args.force)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    if args.out:
        _writable(Path(args.out).parent, "the folder of --out")
    text, png, _ = data_check(args.path, args.config, args.img_size, args.out, args.max_images, args.overrides)
    print(text)
    print(f"\nwrote {png}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    # an --out inside the dataset is refused by prepare_dataset: never create it there
    if not Path(args.out).expanduser().resolve().is_relative_to(Path(args.src).expanduser().resolve()):
        _writable(args.out, "the json folder (--out)")
    ds = prepare_dataset(args.src, out_dir=args.out, expect=args.fmt)
    for split, f in ds.splits.items():
        print(f"{split}: {f.ann_file}  (images in {f.img_dir})")
    print(f"{len(ds.classes)} classes: {ds.classes}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    key_map = dict(kv.split("=", 1) for kv in args.key_map or [])
    _writable(Path(args.dst).parent, "the folder of DST", "DST")
    model = None
    if args.config:  # check the fit before writing: an unfit file is never left at dst
        model = load_detector(load_config(args.config), None, device="cpu", fuse=False, compile=False,
                              precision="fp32", backend="eager")
    report = convert_mmdet_checkpoint(args.src, args.dst, key_map, model=model)
    print(f"wrote {report['dst']} ({report['num_tensors']} tensors)")
    if report["refused_meta"]:
        print(f"meta objects not loaded (safe loading refused them; tensors kept): {report['refused_meta']}")
    if args.config:
        print(f"checked: loads into {args.config} with strict=True")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.fetch:
        print(f"{args.fetch}: {fetch_zoo_weights(args.fetch)}")
        return 0
    print(format_zoo_table(show_urls=args.urls))
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    print("\n".join(list_configs()))
    return 0


def cmd_levels(args: argparse.Namespace) -> int:
    if args.out:
        _writable(Path(args.out).parent, "the folder of --out")
    try:
        table, png = levels_report(args.work_dir, args.out)
    except (LevelLogError, ValueError, TypeError) as e:  # no lvl* keys, or a corrupt log line: a data error
        raise DataError(str(e)) from e
    print(table)
    print(f"\nwrote {png}")
    return 0


def _count_arg(minimum: int) -> Any:
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def cmd_info(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*(args.overrides or []), "model.backbone.pretrained=null"])
    model = build_detector(cfg.model, init=False)  # random weights: the counts do not depend on them
    report = model_complexity(model, args.size, batch=args.batch, proposals=args.proposals,
                              mask_rois=args.mask_rois, memory=args.memory)
    print(format_complexity(report, cfg.name))
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    _writable(args.out, "the analysis folder (--out)")
    gt = load_coco_json(args.ann_file)
    try:
        bbox = load_results_json(args.results)
        segm = load_results_json(args.segm) if args.segm else None
        analysis = write_error_analysis(gt, bbox, args.out, segm, score_thr=args.score_thr, iou_thr=args.iou_thr)
    except ValueError as e:  # a results file that is not a results list, or ids the ground truth lacks
        raise DataError(str(e)) from e
    print(analysis.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="densedet", description="Dense one-stage object detection in pure PyTorch.",
                                epilog=EPILOG + " Exit codes: 2 config or path, 3 data, 4 checkpoint, 5 non-finite "
                                "training (docs/cli.md).")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (also DENSEDET_DEBUG=1); accepted anywhere on the line")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (torchrun or srun for several processes)", epilog=EPILOG)
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optimizer.lr=0.02")
    t.add_argument("--work-dir", help="where checkpoints, logs and plots go (default work_dirs/CONFIG)")
    t.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the latest checkpoint in the work dir, or from the given file")
    t.add_argument("--logger", action="append", choices=LOGGER_NAMES, metavar="NAME",
                   help=f"also log to an experiment tracker ({', '.join(LOGGER_NAMES)}; repeatable; adds to "
                        "runtime.loggers): losses, lr, speed, memory, COCO metrics, per-class AP, validation images "
                        "(docs/tracking.md)")
    _add_data_args(t)
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("test", help="evaluate a checkpoint with COCO metrics", epilog=EPILOG)
    e.add_argument("config")
    e.add_argument("checkpoint", help="checkpoint file, work dir (its latest checkpoint), or 'zoo' / 'zoo:NAME' "
                                      "(released weights, downloaded once)")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--out", help="folder for results json, metrics and PR curves")
    e.add_argument("--split", default=None, choices=["val", "test"],
                   help="the config's data split to test (default: data.test when the config has one, as "
                        "MMDetection's test_dataloader, else data.val)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    e.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: default as the config's pipeline (MultiScaleFlipAug); "
                        "--no-tta tests at its first scale only, --tta adds horizontal flips to one scale")
    e.add_argument("--format-only", action="store_true",
                   help="write the COCO evaluation server's files (detections_<testset>_<alg>_results.json and its "
                        ".zip; segm/ for masks) without computing metrics; automatic for an annotation file "
                        "without 'annotations' (image_info_test-dev2017.json)")
    e.add_argument("--testset", help="the submission name's test set (default from the annotation file: "
                                     "image_info_test-dev2017.json -> test-dev2017)")
    e.add_argument("--alg", help="the submission name's algorithm part (default: the config name, '_' -> '-')")
    e.add_argument("--no-analysis", dest="analysis", action="store_false",
                   help="skip the confusion matrix and the TIDE error breakdown (seconds on COCO val)")
    e.add_argument("--cm-score-thr", type=float, default=DEFAULT_SCORE_THR,
                   help=f"confusion matrix: keep detections scored >= this (default {DEFAULT_SCORE_THR}, "
                        "MMDetection's confusion_matrix.py)")
    e.add_argument("--cm-iou-thr", type=float, default=DEFAULT_IOU_THR,
                   help=f"confusion matrix: IoU that matches a detection to an object (default {DEFAULT_IOU_THR})")
    _add_data_args(e)
    _add_inference_options(e)
    e.set_defaults(fn=cmd_test)

    r = sub.add_parser("predict", help="draw detections on images, videos, webcams and streams", epilog=EPILOG)
    r.add_argument("config")
    r.add_argument("checkpoint", help="checkpoint file or work dir")
    r.add_argument("input", nargs="?", help="an image or a folder of images (with --ann: the folder of its images); "
                                           "a video file (.mp4, .avi, .mov, .mkv, ...), a webcam index (0) or a "
                                           "stream URL (rtsp://...): an annotated video + per-frame JSON lines")
    r.add_argument("overrides", nargs="*")
    r.add_argument("--out", required=True)
    src = r.add_mutually_exclusive_group()
    src.add_argument("--ann", help="draw exactly the images of this COCO annotation file (INPUT: their folder), "
                                   "with its boxes dashed")
    src.add_argument("--split", choices=["train", "val", "test"],
                     help="draw exactly the images of the config's data split (data.root + ann_file / img_dir)")
    r.add_argument("--score-thr", type=float, default=0.3)
    r.add_argument("--limit", type=int, default=0, help="at most this many images, or video frames read (0 = all)")
    r.add_argument("--every", type=int, default=1, metavar="N",
                   help="video: detect on every N-th frame (the output video keeps those, at fps / N)")
    r.add_argument("--grid", type=int, default=12,
                   help="grid.png tiles: the first min(N, images) drawn, enlarged or reduced to 480 px (0 = none)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    r.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: default as the config's pipeline (MultiScaleFlipAug); "
                        "--no-tta tests at its first scale only, --tta adds horizontal flips to one scale")
    _add_data_args(r)
    _add_inference_options(r)
    r.set_defaults(fn=cmd_predict)

    add_export_parser(sub, EPILOG).set_defaults(fn=cmd_export)
    add_bench_parser(sub, EPILOG).set_defaults(fn=cmd_bench)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write the built-in synthetic COCO-format dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--num-images", type=int, default=400, help="training images")
    s.add_argument("--num-val", type=int, default=None, help="validation images (default num-images/4)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", type=int, default=320, help="image side in pixels")
    s.add_argument("--force", action="store_true",
                   help="write into OUT even if it holds files other than a previous synthetic set")
    s.set_defaults(fn=cmd_synth)
    ck = dsub.add_parser("check", help="dataset statistics and, with --config, how its objects would be assigned "
                                       "to the pyramid levels (table + PNG)")
    ck.add_argument("path", help="dataset root (COCO, Pascal VOC or YOLO layout)")
    ck.add_argument("--config", help="analyse the assignment of this config's head")
    ck.add_argument("overrides", nargs="*", help="key=value overrides of --config")
    ck.add_argument("--img-size", help="N or WxH: the training scale to analyse (as train --img-size)")
    ck.add_argument("--out", help="PNG to write (default data_check_<dataset>.png)")
    ck.add_argument("--max-images", type=int, default=2000, help="assign at most this many training images")
    ck.set_defaults(fn=cmd_data_check)
    dc = dsub.add_parser("convert", help="write COCO json for a Pascal VOC or YOLO dataset")
    dc.add_argument("--from", dest="fmt", required=True, choices=["voc", "yolo"])
    dc.add_argument("src", help="the dataset root")
    dc.add_argument("--out", required=True, help="folder for instances_train.json / instances_val.json "
                                                 "(not inside the dataset)")
    dc.set_defaults(fn=cmd_data_convert)

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

    z = sub.add_parser("zoo", help="list released weights (every seed row + MMDetection baselines); --fetch NAME "
                                   "downloads one into $DENSEDET_HOME")
    z.add_argument("--urls", action="store_true", help="also print each row's download URL")
    z.add_argument("--fetch", metavar="NAME", help="download (resume, checksum) and convert the weights of NAME")
    z.set_defaults(fn=cmd_zoo)

    inf = sub.add_parser("info", help="parameters, multiply-adds (FLOPs), activation memory and backbone stages of "
                                      "a config's model (docs/diagnostics.md)", epilog=EPILOG)
    inf.add_argument("config")
    inf.add_argument("overrides", nargs="*")
    inf.add_argument("--size", type=parse_size, default=MMDET_DEFAULT_SIZE,
                     help="input HEIGHTxWIDTH (default 1280x800, MMDetection get_flops.py's shape)")
    inf.add_argument("--batch", type=_count_arg(1), default=1, help="images per forward (default 1)")
    inf.add_argument("--proposals", type=_count_arg(0), default=1000,
                     help="two-stage models: RoIs of the box head (default 1000, MMDetection's forward_dummy)")
    inf.add_argument("--mask-rois", type=_count_arg(0), default=100,
                     help="two-stage models: RoIs of the mask head (default 100)")
    inf.add_argument("--no-memory", dest="memory", action="store_false", help="skip the activation-memory passes")
    inf.add_argument("--json", help="also write the numbers to this json file")
    inf.set_defaults(fn=cmd_info)

    an = sub.add_parser("analyze", help="confusion matrix and TIDE error breakdown of a COCO results json "
                                        "(what `test` writes beside its metrics)")
    an.add_argument("ann_file", help="COCO annotation json (the ground truth)")
    an.add_argument("results", help="COCO results json (boxes), e.g. a test run's results.bbox.json")
    an.add_argument("--segm", help="COCO results json of masks (results.segm.json) for a segm TIDE breakdown")
    an.add_argument("--out", required=True, help="folder for confusion_matrix.png/.csv and tide_errors.*")
    an.add_argument("--score-thr", type=float, default=DEFAULT_SCORE_THR,
                    help=f"confusion matrix score threshold (default {DEFAULT_SCORE_THR}, MMDetection's)")
    an.add_argument("--iou-thr", type=float, default=DEFAULT_IOU_THR,
                    help=f"confusion matrix IoU threshold (default {DEFAULT_IOU_THR}, MMDetection's --tp-iou-thr)")
    an.set_defaults(fn=cmd_analyze)

    lc = sub.add_parser("configs", help="list built-in configs")
    lc.set_defaults(fn=cmd_configs)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the ``densedet`` command; returns the exit code (see docs/cli.md for the table).

    A user error (:class:`densedet.errors.DenseDetError`, or a missing input file) is printed as one line on stderr
    and mapped to its kind's exit code; ``--debug`` (anywhere on the line) or ``DENSEDET_DEBUG=1`` re-raises it
    with its traceback instead.
    """

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DENSEDET_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
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
    except Exception as e:
        code = _user_error_exit(e, debug)
        if code is None:
            raise
        return code
    except KeyboardInterrupt:
        if debug:
            raise
        print("densedet: interrupted", file=sys.stderr)
        return 130


#: file suffixes by what they hold, for OSErrors that reach the CLI without a DenseDet error around them
WEIGHT_SUFFIXES = (".pth", ".pt", ".onnx", ".safetensors", ".bin", ".ckpt", ".pkl", ".part", ".sha256")
CONFIG_SUFFIXES = (".yaml", ".yml")
DATA_SUFFIXES = (".json", ".jsonl", ".xml", ".txt", ".csv", *IMAGE_EXTS)


def _os_error_kind(err: OSError) -> tuple[str, int, str]:
    """``(kind, exit code, message)`` of an ``OSError`` that no DenseDet error wrapped (the safety net behind the
    errors raised at the source): a full disk or a read-only file system -> path (2: an output's place); else by
    the suffix of the path it names, a weights / ``.onnx`` file -> checkpoint (4), a config -> config (2), an
    annotation or image -> data (3); any other path (a folder, an output) -> path (2), except a missing one given
    on the command line -> input (3, as before)."""
    path = err.filename if err.filename is not None else err.filename2
    suffix = Path(str(path)).suffix.lower() if path is not None else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # only writes fail so: an output's place
        kind, code = PathError.kind, PathError.exit_code
    elif suffix in WEIGHT_SUFFIXES:
        kind, code = CheckpointError.kind, CheckpointError.exit_code
    elif suffix in CONFIG_SUFFIXES:
        kind, code = ConfigError.kind, ConfigError.exit_code
    elif suffix in DATA_SUFFIXES:
        kind, code = DataError.kind, DataError.exit_code
    elif isinstance(err, FileNotFoundError):  # an input path given on the command line that does not exist
        kind, code = "input", DataError.exit_code
    else:
        kind, code = PathError.kind, PathError.exit_code
    where = f"{path}: " if path is not None else ""
    also = f" (-> {err.filename2})" if err.filename is not None and err.filename2 is not None else ""
    return kind, code, f"{where}{os_error_reason(err)}{also}"


def _user_error_exit(err: BaseException, debug: bool) -> int | None:
    """Print a user error as one line and return its exit code; None for a bug (or ``debug``): re-raise it.

    User errors: every :class:`~densedet.errors.DenseDetError`, and every ``OSError`` (permission denied, not a
    folder, a full disk, a missing file ...), named by its path (see :func:`_os_error_kind`)."""
    if isinstance(err, DenseDetError):
        kind, code, text = err.kind, err.exit_code, str(err)
    elif isinstance(err, OSError):
        kind, code, text = _os_error_kind(err)
    else:
        return None
    if debug:
        return None
    # One line: a listing some messages append on indented lines (a checkpoint's missing keys) is joined with ';'.
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()] or [type(err).__name__]
    message = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")
    print(f"densedet: {kind} error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
