"""``densedet export``: argument parsing and the command (registered in :mod:`densedet.cli`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_size(text: str) -> tuple[int, int]:
    """``'800x1216'`` -> (800, 1216) (height x width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, e.g. 800x1216, got '{text}'") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got '{text}'")
    return h, w


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


def cmd_export(args: argparse.Namespace, resolve_checkpoint) -> int:
    from densedet.deploy.onnx_export import ExportDependencyError, export

    if args.checkpoint and "=" in args.checkpoint and not Path(args.checkpoint).exists():
        args.overrides, args.checkpoint = [args.checkpoint, *(args.overrides or [])], None  # an override, no weights
    try:
        result = export(args.config, resolve_checkpoint(args.checkpoint) if args.checkpoint else None, args.out,
                        nms=args.nms, dynamic=args.dynamic, size=args.size, batch=args.batch, max_det=args.max_det,
                        overrides=args.overrides, check=args.check, check_image=args.check_image)
    except ExportDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0 if result.check is None or result.check["ok"] else 1
