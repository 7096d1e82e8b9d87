"""Operators of the exported graph that need a custom ONNX translation.

* ``densedet::nms_keep``: class-aware NMS as a keep mask, ONNX ``NonMaxSuppression`` in the exported file. It
  returns a fixed-shape ``(B, K)`` mask rather than a variable list of indices, so everything after it (top-k to
  ``max_det``, padding) has static shapes.
* ``torchvision::deform_conv2d``: ONNX ``DeformConv`` (opset 19), whose inputs and attributes are torchvision's
  (offset layout ``(B, 2 * offset_groups * kh * kw, Ho, Wo)`` with ``(dy, dx)`` pairs, mask ``(B, offset_groups *
  kh * kw, Ho, Wo)``); see the ONNX operator spec of ``DeformConv``.

The onnxscript functions are built lazily (:func:`custom_translation_table`) so that importing DenseDet never
needs onnxscript.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import nms

__all__ = ["custom_translation_table", "nms_keep"]

#: ONNX opset of the exported graphs: DeformConv exists from opset 19.
OPSET = 19


@torch.library.custom_op("densedet::nms_keep", mutates_args=())
def nms_keep(boxes: Tensor, scores: Tensor, iou_threshold: float, max_keep: int) -> Tensor:
    """Per image greedy NMS over ``boxes (B, K, 4)`` xyxy with ``scores (B, K)``; entries with score <= 0 never
    survive (they are padding). Returns a ``(B, K)`` bool mask of the survivors, at most ``max_keep`` per image
    (the best ones). Class-aware NMS is done by the caller, by offsetting each class's boxes (torchvision
    ``batched_nms`` trick)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    for b in range(boxes.shape[0]):
        live = (scores[b] > 0).nonzero(as_tuple=True)[0]
        kept = nms(boxes[b, live].float(), scores[b, live].float(), iou_threshold)[:max_keep]
        keep[b, live[kept]] = True
    return keep


@nms_keep.register_fake
def _nms_keep_fake(boxes: Tensor, scores: Tensor, iou_threshold: float, max_keep: int) -> Tensor:
    return torch.empty(scores.shape, dtype=torch.bool, device=scores.device)


def custom_translation_table() -> dict[Any, Any]:
    """``{torch op: onnxscript function}`` for ``torch.onnx.export(..., custom_translation_table=...)``."""
    from onnxscript import opset19 as op

    # Plain Python functions: the exporter traces them with the actual attribute values.
    def nms_keep_onnx(boxes, scores, iou_threshold: float, max_keep: int):
        # NonMaxSuppression: boxes (B, K, 4) as any diagonal corner pair, scores (B, 1, K); keeps boxes with
        # score > score_threshold (0: padding never survives); returns (M, 3) [batch, class, box] survivor rows.
        scores3 = op.Unsqueeze(scores, op.Constant(value_ints=[1]))
        sel = op.NonMaxSuppression(boxes, scores3, op.Constant(value_ints=[int(max_keep)]),
                                   op.Constant(value_floats=[float(iou_threshold)]), op.Constant(value_floats=[0.0]))
        idx = op.Gather(sel, op.Constant(value_ints=[0, 2]), axis=1)  # (M, 2): [batch, box]
        n_sel = op.Slice(op.Shape(sel), op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
        ones = op.Expand(op.Constant(value_floats=[1.0]), n_sel)
        zeros = op.Expand(op.Constant(value_floats=[0.0]), op.Shape(scores))
        return op.Cast(op.ScatterND(zeros, idx, ones), to=9)  # 9: BOOL

    def deform_conv2d_onnx(x, weight, offset, mask, bias, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                           dil_h: int, dil_w: int, groups: int, offset_groups: int, use_mask: bool):
        inputs = [x, weight, offset, bias] + ([mask] if use_mask else [])
        return op.DeformConv(*inputs, dilations=[dil_h, dil_w], group=groups, offset_group=offset_groups,
                             pads=[pad_h, pad_w, pad_h, pad_w], strides=[stride_h, stride_w])

    return {torch.ops.densedet.nms_keep.default: nms_keep_onnx,
            torch.ops.torchvision.deform_conv2d.default: deform_conv2d_onnx}
