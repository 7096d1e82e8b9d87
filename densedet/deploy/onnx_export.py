"""ONNX export of a detector (pixels in, padded detections out) and the onnxruntime-vs-eager check.

:func:`export_detector` exports a :class:`~densedet.models.detector.Detector` object (its graph module from
:func:`~densedet.deploy.graph.build_deploy_module`) through torch's dynamo exporter (opset 19) and writes the file
atomically with the class names in its metadata; :func:`check_onnx` runs the file in onnxruntime beside the eager
model. The config-level :func:`densedet.export` (config + checkpoint -> file + check) is built on these.

Needs the optional dependencies onnx, onnxscript and onnxruntime (``pip install 'densedet[export]'``); without them
:class:`~densedet.deploy.runtime.ExportDependencyError` says what to install.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from densedet.deploy.graph import build_deploy_module
from densedet.deploy.ops import OPSET, custom_translation_table
from densedet.deploy.runtime import OnnxDetector, paste_onnx_masks, require_export_deps
from densedet.io import atomic_write
from densedet.models import dcn

__all__ = ["CLASSES_KEY", "ExportResult", "check_onnx", "compare_detections", "export_detector", "format_check",
           "mask_iou"]

CLASSES_KEY = "densedet.classes"


@contextlib.contextmanager
def _deformconv_as_torchvision_op() -> Iterator[None]:
    """During export DenseDet's deformable convs call ``torchvision.ops.deform_conv2d`` (translated to ONNX
    ``DeformConv``) instead of the CPU grid-sample path."""
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



def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def compare_detections(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float = 1e-3) -> dict[str, Any]:
    """Match ``got`` to ``ref`` (greedy by IoU within the same label) and measure box differences.

    Each dict: ``boxes (D, 4)`` xyxy, ``scores (D,)``, ``labels (D,)``. Box tolerance: ``|a - b| <= rtol *
    max(|b|, 1)`` per coordinate. Returns counts, the largest relative box and absolute score differences and
    ``ok`` (same count, every detection matched with the same label within tolerance, or part of a score tie at the
    ``max_det`` cut: ``tied_at_cut``).
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
    # Detections of exactly equal score at the ``max_det`` cut: torch's and onnxruntime's top-k may keep different
    # members of a tie (both correct). Unmatched detections on both sides that all score the lowest kept score
    # (within float rounding) are such a tie, counted in ``tied_at_cut``, not a mismatch.
    tied = 0
    if n_ref == n_got and matched < n_ref:
        left_ref = np.setdiff1d(np.arange(n_ref), [i for i, _ in pairs])
        left_got = np.where(~used)[0]
        cut = float(ref["scores"].min())
        tol = 1e-5 * max(abs(cut), 1e-12) + 1e-7
        if (len(left_ref) == len(left_got) and np.all(np.abs(ref["scores"][left_ref] - cut) <= tol)
                and np.all(np.abs(got["scores"][left_got] - cut) <= tol)):
            tied = len(left_ref)
    return {"eager": n_ref, "onnx": n_got, "matched": matched, "tied_at_cut": tied, "max_box_rel_diff": max_rel,
            "max_score_diff": max_score, "rtol": rtol, "ok": n_ref == n_got == matched + tied, "pairs": pairs}


#: pasted masks of matched detections must overlap at least this much (IoU) in :func:`check_onnx`
MASK_IOU_MIN = 0.99


def mask_iou(a: Any, i: int, b: Any, j: int) -> float:
    """IoU of instance ``i`` of ``a`` and instance ``j`` of ``b`` (:class:`~densedet.structures.masks.InstanceMasks` of
    one image size); 1.0 when both are empty."""
    ma, mb = a.to_full(i).astype(bool), b.to_full(j).astype(bool)
    union = int((ma | mb).sum())
    return 1.0 if union == 0 else int((ma & mb).sum()) / union


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
    outs = OnnxDetector(path).run(images)
    h, w = images.shape[-2:]
    metas = [{"img_shape": (h, w), "ori_shape": (h, w), "scale_factor": (1.0, 1.0)} for _ in range(len(images))]
    with torch.no_grad():
        eager = deploy.detector(torch.from_numpy(images), metas=metas, mode="predict")
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




def graph_notes(detector: nn.Module) -> list[str]:
    """What the exported graph does differently from the eager model (soft-NMS runs as plain NMS)."""
    nms_cfg = detector.detection_cfg.nms or {}
    if nms_cfg.get("type") == "soft_nms":
        return ["the config uses soft-NMS; the graph runs plain NMS (ONNX NonMaxSuppression) at its iou_threshold "
                f"{nms_cfg.get('iou_threshold', 0.3)}, so scores are not decayed"]
    return []


def export_detector(detector: nn.Module, out: str | Path, size: tuple[int, int], *, nms: bool = True,
                    dynamic: bool = False, batch: int = 1, max_det: int | None = None,
                    classes: list[str] | None = None) -> tuple[ExportResult, nn.Module]:
    """Export ``detector`` (eval mode; fused when the caller wants) to ``out`` (ONNX opset 19) through torch's
    dynamo exporter; the file is written atomically, with ``classes`` in its metadata (``densedet.classes``).

    Args:
        size: (H, W) of the traced input (dynamic graphs: pick a non-square size whose pyramid levels stay > 1).
        nms: graph with NMS and fixed-shape outputs (see :mod:`densedet.deploy.graph`); False: pre-NMS candidates.
        dynamic: dynamic batch, height and width (traced at a batch of ``max(batch, 2)``).
    Returns:
        ``(ExportResult, deploy module)``; the module is what :func:`check_onnx` compares against.
    """
    require_export_deps()
    deploy = build_deploy_module(detector, nms=nms, max_det=max_det)
    h, w = size
    # A dynamic batch is traced at 2 at least: torch.export specialises a size-1 dimension to the constant 1.
    example = torch.zeros(max(batch, 2) if dynamic else batch, 3, h, w, dtype=torch.uint8)
    dynamic_shapes = None
    if dynamic:  # batch, height and width (the graph gives all images of a batch one size, as its input has)
        dim = torch.export.Dim
        dynamic_shapes = {"images": {0: dim.DYNAMIC, 2: dim.DYNAMIC, 3: dim.DYNAMIC}}
    output_names = ["boxes", "scores", "labels", "num_dets"] if nms else ["boxes", "scores", "labels"]
    if deploy.with_mask:
        output_names.append("masks")
    with _deformconv_as_torchvision_op(), torch.no_grad():
        program = torch.onnx.export(deploy, (example,), dynamo=True, opset_version=OPSET, input_names=["images"],
                                    output_names=output_names, dynamic_shapes=dynamic_shapes,
                                    custom_translation_table=custom_translation_table(), optimize=True,
                                    verbose=False)

    def write(tmp: Path) -> None:
        program.save(str(tmp))
        if classes:  # so that Predictor / predict name the classes of an exported file
            import onnx  # optional dependency, checked by require_export_deps

            proto = onnx.load(str(tmp))
            proto.metadata_props.add(key=CLASSES_KEY, value=json.dumps([str(c) for c in classes]))
            onnx.save(proto, str(tmp))

    atomic_write(out, write)  # a failed save never leaves a half-written model behind
    result = ExportResult(Path(out), tuple(example.shape), dynamic, nms, graph_notes(detector),
                          outputs=output_names)
    return result, deploy
