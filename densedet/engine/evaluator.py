"""Inference over a data loader and COCO evaluation, single- or multi-process.

With DDP every rank runs the images of its shard (the validation loader's distributed sampler does not pad, so
each image is seen once); detections are gathered with their image ids on every rank, de-duplicated and ordered by
image id. COCO evaluation runs on rank 0 and its result is broadcast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densedet.dist import all_gather_object, broadcast_object, get_world_size, is_main_process
from densedet.evaluation.coco_eval import detections_to_coco_results, evaluate_coco, save_results_json
from densedet.evaluation.segm import detections_to_segm_results
from densedet.models.detector import InferenceModel
from densedet.structures.rle import encode_instance_masks
from densedet.weights.state_dict import unwrap_model

__all__ = ["evaluate", "run_inference"]

logger = logging.getLogger("densedet")


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested dicts / lists / tuples to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@torch.no_grad()
def run_inference(model: InferenceModel | nn.Module, loader: Any, device: torch.device | str) -> list[dict[str, Any]]:
    """Predict every image of ``loader``.

    Args:
        model: detector (DDP wrappers are unwrapped: ranks may run different numbers of batches, and DDP's
            forward would wait for the others).
        loader: yields ``{"images": (B, 3, H, W), "metas": [{"image_id", ...}, ...]}``, or with test-time
            augmentation (``MultiScaleFlipAug``) ``{"views": [such a batch per view], "metas": ...}``, whose
            views the model merges (``mode="predict_aug"``).
        device: where to run.

    Returns:
        One dict per image, over all processes, ordered by image id: ``{"image_id": int, "boxes": (K, 4) xyxy
        original-image pixels, "scores": (K,), "labels": (K,) int64}``, tensors on CPU; for a mask model also
        ``"segms"``: K compressed COCO RLE dicts.
    """
    device = torch.device(device)
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    local: list[dict[str, Any]] = []
    try:
        for batch in loader:
            metas = batch["metas"]
            if "views" in batch:  # test-time augmentation: the model merges the views' detections
                dets = net([v["images"].to(device, non_blocking=True) for v in batch["views"]], None,
                           [v["metas"] for v in batch["views"]], mode="predict_aug")
            else:
                images = batch["images"].to(device, non_blocking=True)
                dets = net(images, None, metas, mode="predict")
            if len(dets) != len(metas):
                raise RuntimeError(f"run_inference: the model returned {len(dets)} results for {len(metas)} images")
            for det, meta in zip(dets, metas):
                local.append({"image_id": int(meta["image_id"]), "boxes": det["boxes"].detach().float().cpu(),
                              "scores": det["scores"].detach().float().cpu(),
                              "labels": det["labels"].detach().long().cpu()})
                if "masks" in det:  # instance masks travel as compact RLE (encoded from their box crops)
                    local[-1]["segms"] = encode_instance_masks(det["masks"])
    finally:
        net.train(was_training)

    gathered = local if get_world_size() == 1 else [r for part in all_gather_object(local) for r in part]
    unique: dict[int, dict[str, Any]] = {}
    for r in gathered:
        unique.setdefault(r["image_id"], r)  # a padded sampler would repeat images; keep the first
    return [unique[i] for i in sorted(unique)]


def evaluate(model: InferenceModel | nn.Module, loader: Any, dataset: Any, device: torch.device | str,
             out_json: str | Path | None = None) -> Any:
    """Run :func:`run_inference` and COCO bbox evaluation (plus ``segm`` for a mask model: its metrics join
    ``result.metrics`` and its :class:`EvalResult` is ``result.segm``).

    Args:
        dataset: has ``label2cat`` (contiguous label -> category id) and ``coco_gt_dict`` (COCO ground truth; a
            :class:`~densedet.data.CocoDataset` rebuilds it from its validated annotation store, so the evaluator
            sees what training saw), and for ``segm`` optionally ``segm_gt_dict()`` (the ground truth with
            validated segmentations).
        out_json: if given, the COCO results list is written there (rank 0, atomically).

    Returns:
        ``densedet.evaluation.EvalResult`` on every rank (computed on rank 0, broadcast).
    """
    dets = run_inference(model, loader, device)
    result = None
    if is_main_process():
        results = detections_to_coco_results(dets, [d["image_id"] for d in dets], dataset.label2cat)
        if out_json is not None:
            save_results_json(results, out_json)
        if not results:
            logger.warning("evaluation: the model produced no detections on %d images", len(dets))
        gt = box_gt = dataset.coco_gt_dict
        mask_model = bool(dets) and all("segms" in d for d in dets)
        segm_gt = _segm_ground_truth(dataset, gt) if mask_model else None
        if segm_gt is not None and (segm_gt.get("annotations") or not gt.get("annotations")):
            gt = segm_gt  # boxes are scored against what a mask model trains on (annotations with a usable mask)
        result = evaluate_coco(gt, results)
        if mask_model:
            anns = (segm_gt or {}).get("annotations", [])
            with_segm = sum("segmentation" in a for a in anns)
            if segm_gt is gt and with_segm == len(anns):
                result.segm = _evaluate_segm(dets, dataset, segm_gt, out_json)
                result.metrics.update(result.segm.metrics)
            else:
                logger.warning("evaluation: no segm metrics: %d of %d ground-truth annotations have a usable "
                               "'segmentation'", with_segm, len(box_gt.get("annotations", [])))
    return broadcast_object(result)


def _segm_ground_truth(dataset: Any, gt: dict) -> dict:
    """The ground truth with segmentations: ``gt`` itself when every annotation has one (a dataset loaded with
    masks: validated as for training), else the dataset's ``segm_gt_dict()`` (its file read again with the masks
    checked as for training), else ``gt`` as it is."""
    if all("segmentation" in a for a in gt.get("annotations", [])):
        return gt
    if callable(getattr(dataset, "segm_gt_dict", None)):
        return dataset.segm_gt_dict()
    return gt


def _evaluate_segm(dets: list[dict[str, Any]], dataset: Any, gt: dict, out_json: str | Path | None) -> Any:
    """``segm`` evaluation of mask detections against ``gt``; results go beside ``out_json`` as ``*.segm.json``."""
    results = detections_to_segm_results(dets, [d["image_id"] for d in dets], dataset.label2cat)
    if out_json is not None:
        path = Path(out_json)
        name = path.name[: -len(".bbox.json")] if path.name.endswith(".bbox.json") else path.stem
        save_results_json(results, path.with_name(f"{name}.segm.json"))
    return evaluate_coco(gt, results, iou_type="segm")
