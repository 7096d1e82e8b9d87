"""``densedet export``: a detector to ONNX (pixels in, padded detections out), checked in onnxruntime.

Needs the optional dependencies onnx, onnxscript and onnxruntime (``pip install 'densedet[export]'``); without them
:func:`export` raises :class:`ExportDependencyError` whose message is the install command.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densedet.config import Config, load_config
from densedet.errors import ConfigError

__all__ = ["EXPORT_INSTALL_HINT", "ExportDependencyError", "ExportResult", "build_deploy_module", "check_onnx",
           "export", "require_export_deps"]

EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
EXPORT_INSTALL_HINT = "pip install 'densedet[export]'   (that is: pip install onnx onnxscript onnxruntime)"


class ExportDependencyError(ImportError):
    """An optional export dependency is missing; the message says what to install."""


def require_export_deps(packages: tuple[str, ...] = EXPORT_PACKAGES) -> None:
    """Raise :class:`ExportDependencyError` naming the missing packages and the install command."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportDependencyError(f"ONNX export needs {', '.join(missing)}, not installed. Install with:\n  "
                                    f"{EXPORT_INSTALL_HINT}")


def _steps(pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A pipeline with any MultiScaleFlipAug flattened to its first view's steps."""
    from densedet.data.tta import tta_pipeline

    return [dict(s) for s in tta_pipeline(pipeline, False)]


def normalize_params(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
    """``(mean, std, to_rgb)`` of the ``Normalize`` step of ``data.val.pipeline`` (ImageNet defaults if none)."""
    for step in _steps(cfg.data.val.pipeline):
        if step.get("type") == "Normalize":
            return (tuple(step.get("mean", (123.675, 116.28, 103.53))), tuple(step.get("std", (58.395, 57.12, 57.375))),
                    bool(step.get("to_rgb", True)))
    return (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), True


def default_size(cfg: Config) -> tuple[int, int]:
    """(H, W) for a static export: the test Resize scale, short side x long side, rounded up to size_divisor."""
    d = max(1, int(cfg.data.size_divisor or 1))
    for step in _steps(cfg.data.val.pipeline):
        if step.get("type") == "Resize" and step.get("img_scale") is not None:
            scale = step["img_scale"]
            scale = scale[0] if isinstance(scale[0], (list, tuple)) else scale
            h, w = min(scale), max(scale)
            return (-(-int(h) // d) * d, -(-int(w) // d) * d)
    return (800, 1344)


def is_two_stage(model: nn.Module) -> bool:
    return hasattr(model, "roi_head")


def build_deploy_module(cfg: Config, model: nn.Module, nms: bool = True, max_det: int | None = None) -> nn.Module:
    """:class:`~densedet.deploy.graph.DeployDetector` (dense heads) or :class:`~densedet.deploy.two_stage_graph.
    DeployTwoStage` (Faster / Mask R-CNN) around ``model`` (eval, fused) with the config's normalisation and size
    divisor."""
    from densedet.deploy.graph import DeployDetector
    from densedet.deploy.two_stage_graph import DeployTwoStage

    mean, std, to_rgb = normalize_params(cfg)
    divisor = int(cfg.data.size_divisor or 1)
    if is_two_stage(model):
        if not nms:
            raise ConfigError(f"{cfg.name}: --no-nms (pre-NMS candidates) is implemented for dense heads only; a "
                              "two-stage graph always ends with the R-CNN NMS (and the masks of the kept boxes)",
                              path="export.nms")
        return DeployTwoStage(model, mean, std, to_rgb=to_rgb, size_divisor=divisor, max_det=max_det).eval()
    return DeployDetector(model, mean, std, to_rgb=to_rgb, size_divisor=divisor, nms=nms, max_det=max_det).eval()


@contextlib.contextmanager
def _deformconv_as_torchvision_op() -> Iterator[None]:
    """During export DenseDet's deformable convs call ``torchvision.ops.deform_conv2d`` (translated to ONNX
    ``DeformConv``) instead of the CPU grid-sample path."""
    from densedet.models import dcn

    old = dcn.DCN_IMPL
    dcn.DCN_IMPL = "torchvision"
    try:
        yield
    finally:
        dcn.DCN_IMPL = old


@dataclass
class ExportResult:
    """What :func:`export` wrote and checked."""

    path: Path
    input_shape: tuple[int, int, int, int]
    dynamic: bool
    nms: bool
    notes: list[str] = field(default_factory=list)
    check: dict[str, Any] | None = None
    outputs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        outs = ", ".join(self.outputs) or ("boxes, scores, labels, num_dets" if self.nms else "boxes, scores, labels")
        lines = [f"wrote {self.path} (input {'dynamic, traced at ' if self.dynamic else ''}"
                 f"{'x'.join(map(str, self.input_shape))} uint8/float RGB; {'' if self.nms else 'pre-NMS '}{outs})"]
        lines += [f"note: {n}" for n in self.notes]
        if self.check is not None:
            lines.append(format_check(self.check))
        return "\n".join(lines)


def _graph_notes(cfg: Config, model: nn.Module) -> list[str]:
    notes = []
    nms_cfg = (model.roi_head.nms_cfg if is_two_stage(model) else model.bbox_head.test_cfg).nms or {}
    if nms_cfg.get("type") == "soft_nms":
        notes.append("the config uses soft-NMS; the graph runs plain NMS (ONNX NonMaxSuppression) at its "
                     f"iou_threshold {nms_cfg.get('iou_threshold', 0.3)}, so scores are not decayed")
    from densedet.data.tta import find_tta

    if find_tta(cfg.data.val.pipeline) is not None:
        notes.append("the config tests with MultiScaleFlipAug (TTA); the graph runs one view at the input size")
    return notes


CLASSES_KEY = "densedet.classes"


def _checkpoint_classes(checkpoint: str | Path | None) -> list[str] | None:
    if checkpoint is None:
        return None
    from densedet.engine.checkpoint import load_checkpoint

    classes = (load_checkpoint(checkpoint).get("meta") or {}).get("classes")
    return [str(c) for c in classes] if classes else None


def load_eval_model(cfg: Config, checkpoint: str | Path | None) -> nn.Module:
    """The config's detector with ``checkpoint`` loaded strictly (random init without one), eval and fused."""
    from densedet.engine.checkpoint import load_checkpoint, load_model_weights
    from densedet.models.build import build_detector

    model = build_detector({**cfg.model, "backbone": {**cfg.model["backbone"], "pretrained": None}},
                           init=checkpoint is None)
    if checkpoint is not None:
        load_model_weights(model, load_checkpoint(checkpoint), strict=True, source=str(checkpoint))
    return model.eval().fuse()


def default_check_image(cfg: Config) -> np.ndarray:
    """The first image of the config's val set if it is on disk, else a rendered synthetic-shapes image."""
    from densedet.inference.predictor import read_image

    folder = Path(cfg.data.root) / (cfg.data.val.img_dir or "")
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if files:
            return read_image(files[0])
    from densedet.data.synth import make_synthetic_coco

    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic_coco(tmp, num_train=0, num_val=1, size=320, seed=0)
        return read_image(next(iter(sorted((Path(tmp) / "val").iterdir()))))


def resize_for_input(image: np.ndarray, size: tuple[int, int] | None, cfg: Config) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, h, w) uint8 graph input: to ``size`` (static graphs) or by the test pipeline's
    Resize (dynamic graphs)."""
    t = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    if size is None:
        from densedet.data.transforms import build_pipeline

        steps = [s for s in _steps(cfg.data.val.pipeline) if s.get("type") == "Resize"]
        h, w = image.shape[:2]
        sample = {"img": image, "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int64),
                  "ignore_boxes": np.zeros((0, 4), np.float32),
                  "meta": {"image_id": -1, "ori_shape": (h, w), "img_shape": (h, w), "scale_factor": (1.0, 1.0),
                           "flip": False}}
        out = build_pipeline(steps, "data.val.pipeline")(sample)["img"]
        return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1)[None]).astype(np.uint8)
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def compare_detections(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float = 1e-3) -> dict[str, Any]:
    """Match ``got`` to ``ref`` (greedy by IoU within the same label) and measure box differences.

    Each dict: ``boxes (D, 4)`` xyxy, ``scores (D,)``, ``labels (D,)``. Box tolerance: ``|a - b| <= rtol *
    max(|b|, 1)`` per coordinate. Returns counts, the largest relative box and absolute score differences and
    ``ok`` (same count, every detection matched with the same label within tolerance).
    """
    n_ref, n_got = len(ref["boxes"]), len(got["boxes"])
    pairs: list[tuple[int, int]] = []
    used = np.zeros(n_got, bool)
    max_rel, max_score, matched = 0.0, 0.0, 0
    iou = _box_iou(ref["boxes"], got["boxes"]) if n_ref and n_got else np.zeros((n_ref, n_got))
    for i in np.argsort(-ref["scores"], kind="stable"):
        cand = np.where(~used & (got["labels"] == ref["labels"][i]))[0]
        if len(cand) == 0:
            continue
        j = cand[np.argmax(iou[i, cand])]
        rel = np.abs(got["boxes"][j] - ref["boxes"][i]) / np.maximum(np.abs(ref["boxes"][i]), 1.0)
        if rel.max() > rtol:
            continue
        used[j] = True
        pairs.append((int(i), int(j)))
        matched += 1
        max_rel = max(max_rel, float(rel.max()))
        max_score = max(max_score, float(abs(got["scores"][j] - ref["scores"][i])))
    return {"eager": n_ref, "onnx": n_got, "matched": matched, "max_box_rel_diff": max_rel,
            "max_score_diff": max_score, "rtol": rtol, "ok": n_ref == n_got == matched, "pairs": pairs}


#: pasted masks of matched detections must overlap at least this much (IoU) in :func:`check_onnx`
MASK_IOU_MIN = 0.99


def mask_iou(a: Any, i: int, b: Any, j: int) -> float:
    """IoU of instance ``i`` of ``a`` and instance ``j`` of ``b`` (:class:`~densedet.structures.masks.InstanceMasks` of
    one image size); 1.0 when both are empty."""
    ma, mb = a.to_full(i).astype(bool), b.to_full(j).astype(bool)
    union = int((ma | mb).sum())
    return 1.0 if union == 0 else int((ma & mb).sum()) / union


def paste_onnx_masks(masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float = 0.5) -> Any:
    """The graph's ``(D, 28, 28)`` mask probabilities of ``(D, 4)`` boxes (pixels of a ``height x width`` image)
    pasted into their boxes with DenseDet's own box-only paste (:func:`densedet.models.roi_heads.
    paste_masks_in_boxes`, as the eager model) -> :class:`~densedet.structures.masks.InstanceMasks`."""
    from densedet.models.roi_heads import paste_masks_in_boxes
    from densedet.structures.masks import InstanceMasks

    crops = paste_masks_in_boxes(torch.from_numpy(np.ascontiguousarray(masks)), torch.from_numpy(boxes), height, width,
                                 threshold) if len(boxes) else []
    return InstanceMasks(crops, height, width)


def format_check(check: dict[str, Any]) -> str:
    verdict = "PASS" if check["ok"] else "FAIL"
    text = (f"onnxruntime check on {check.get('image', 'an image')} ({check.get('input', '?')}): {verdict} - "
            f"{check['matched']}/{check['eager']} eager detections matched by {check['onnx']} onnx detections, same "
            f"labels, max box difference {check['max_box_rel_diff']:.2e} (relative, tolerance {check['rtol']:g}), "
            f"max score difference {check['max_score_diff']:.2e}")
    if "min_mask_iou" in check:
        text += (f", min mask IoU {check['min_mask_iou']:.4f} over {check['masks_compared']} pasted masks "
                 f"(tolerance >= {MASK_IOU_MIN:g})")
    return text


def check_onnx(path: str | Path, deploy: nn.Module, images: np.ndarray, rtol: float = 1e-3) -> dict[str, Any]:
    """Run ``path`` in onnxruntime and ``deploy``'s detector eagerly (its own ``predict``, NMS included) on
    ``images`` ((B, 3, H, W) uint8) and compare image by image (:func:`compare_detections`). With masks (Mask
    R-CNN) the graph's 28x28 masks are pasted as the eager model pastes its own (:func:`paste_onnx_masks`) and
    every matched pair must have a mask IoU >= :data:`MASK_IOU_MIN` (``min_mask_iou``, ``masks_compared``).
    Returns the worst image's comparison."""
    from densedet.deploy.runtime import OnnxDetector

    outs = OnnxDetector(path).run(images)
    x = deploy.preprocess(torch.from_numpy(images))
    h, w = images.shape[-2:]
    metas = [{"img_shape": (h, w), "scale_factor": (1.0, 1.0)} for _ in range(x.shape[0])]
    with torch.no_grad():
        eager = deploy.detector(x, metas=metas, mode="predict")
    worst: dict[str, Any] | None = None
    for i, ref in enumerate(eager):
        n = int(outs["num_dets"][i])
        got = {"boxes": outs["boxes"][i, :n], "scores": outs["scores"][i, :n], "labels": outs["labels"][i, :n]}
        r = compare_detections({k: ref[k].numpy() for k in ("boxes", "scores", "labels")}, got, rtol)
        if "masks" in outs:
            thr = float(deploy.detector.roi_head.test_cfg.mask_thr_binary)
            pasted = paste_onnx_masks(outs["masks"][i, :n], got["boxes"], h, w, thr)
            ious = [mask_iou(ref["masks"], a, pasted, b) for a, b in r["pairs"]]
            r["masks_compared"], r["min_mask_iou"] = len(ious), min(ious, default=1.0)
            r["ok"] = r["ok"] and r["min_mask_iou"] >= MASK_IOU_MIN
        r.pop("pairs")
        if worst is None or (not r["ok"] and worst["ok"]) or r["max_box_rel_diff"] > worst["max_box_rel_diff"]:
            worst = r
    assert worst is not None
    worst["input"] = "x".join(map(str, images.shape))
    return worst


def export(config: str | Path | Config, checkpoint: str | Path | None = None, out: str | Path = "model.onnx", *,
           nms: bool = True, dynamic: bool = False, size: tuple[int, int] | None = None, batch: int = 1,
           max_det: int | None = None, overrides: list[str] | None = None, check: bool = True,
           check_image: str | Path | np.ndarray | None = None) -> ExportResult:
    """Export a detector to ONNX (opset 19) through torch's dynamo exporter and check it in onnxruntime.

    Args:
        config: built-in config name, YAML path or :class:`Config`; checkpoint: weights (strict), None = random.
        out: the .onnx file to write.
        nms: graph with NMS and fixed-shape outputs ``boxes (B, max_det, 4)``, ``scores (B, max_det)``, ``labels
            (B, max_det)`` (-1 padding), ``num_dets (B,)``; False: pre-NMS candidates ``boxes, scores, labels``.
        dynamic: dynamic batch, height and width (the graph is traced at ``size`` and a batch of
            ``max(batch, 2)``).
        size: (H, W) input size (default: the config's test scale, rounded up to ``data.size_divisor``; dynamic
            graphs are traced at 320x448 - pick a non-square size whose levels stay > 1 if you give one).
        max_det: detections per image (default ``test_cfg.max_per_img``).
        check / check_image: run the file in onnxruntime on an image (default: the first val image, or a
            synthetic one) and compare with eager PyTorch (boxes within 1e-3 relative, same labels).

    Returns:
        :class:`ExportResult` (``summary()`` prints what was written and the check).
    """
    require_export_deps()
    from densedet.deploy.ops import OPSET, custom_translation_table
    from densedet.inference.predictor import read_image

    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    model = load_eval_model(cfg, checkpoint)
    deploy = build_deploy_module(cfg, model, nms=nms, max_det=max_det)
    # A dynamic graph is traced at a size whose pyramid levels are all > 1 and never square (320x448 gives
    # 40x56 ... 3x4): torch.export would otherwise bake equal or size-1 level dims into the graph as constraints.
    h, w = size or ((320, 448) if dynamic else default_size(cfg))
    # A dynamic batch is traced at 2 at least: torch.export specialises a size-1 dimension to the constant 1.
    example = torch.zeros(max(batch, 2) if dynamic else batch, 3, h, w, dtype=torch.uint8)
    dynamic_shapes = None
    if dynamic:  # batch, height and width (the graph gives all images of a batch one size, as its input has)
        dim = torch.export.Dim
        dynamic_shapes = {"images": {0: dim.DYNAMIC, 2: dim.DYNAMIC, 3: dim.DYNAMIC}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    output_names = ["boxes", "scores", "labels", "num_dets"] if nms else ["boxes", "scores", "labels"]
    if getattr(deploy, "with_mask", False):
        output_names.append("masks")
    with _deformconv_as_torchvision_op(), torch.no_grad():
        program = torch.onnx.export(deploy, (example,), dynamo=True, opset_version=OPSET, input_names=["images"],
                                    output_names=output_names, dynamic_shapes=dynamic_shapes,
                                    custom_translation_table=custom_translation_table(), optimize=True,
                                    verbose=False)
    tmp = out.with_name(out.name + ".tmp")
    program.save(str(tmp))
    classes = _checkpoint_classes(checkpoint)
    if classes:  # so that Predictor / predict name the classes of an exported file
        import onnx

        proto = onnx.load(str(tmp))
        proto.metadata_props.add(key=CLASSES_KEY, value=json.dumps(classes))
        onnx.save(proto, str(tmp))
    tmp.replace(out)  # atomic: a failed save never leaves a half-written model behind
    result = ExportResult(out, tuple(example.shape), dynamic, nms, _graph_notes(cfg, model), outputs=output_names)
    if check and nms:
        image = check_image if isinstance(check_image, np.ndarray) else (
            read_image(check_image) if check_image is not None else default_check_image(cfg))
        inp = resize_for_input(image, None if dynamic else (h, w), cfg)
        result.check = check_onnx(out, deploy, inp)
        result.check["image"] = str(check_image) if isinstance(check_image, (str, Path)) else "the check image"
    return result
