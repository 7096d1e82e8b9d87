"""COCO evaluation-server submissions: results json named and zipped the way the server expects.

The COCO evaluation server takes a file named ``detections_<testset>_<alg>_results.json`` (boxes and masks alike),
alone at the root of a zip. That is how the READMEs that submit to it spell the naming out (the upload page,
cocodataset.org/#upload, is not reachable from here): darknet's YOLOv4 ("rename ... to
detections_test-dev2017_yolov4_results.json and compress it to detections_test-dev2017_yolov4_results.zip"), aLRP
Loss ("detections_test-dev2017_aLRPLoss_results.zip ... check the instructions in cocodataset.org/#upload"),
EfficientDet (``detections_test-dev2017_test_results.json``). MMDetection's ``--format-only`` writes
``PREFIX.bbox.json`` / ``PREFIX.segm.json`` and leaves renaming and zipping to the user; here both are done.

Box and mask results go to two separate files with the same name (one per server track: a file whose entries carry
a ``bbox`` is evaluated as boxes by the COCO API's ``loadRes``), the mask one in a ``segm/`` sub-folder.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from densedet.io import atomic_write, atomic_write_json

__all__ = ["Submission", "algorithm_name", "submission_file_name", "coco_testset_name", "write_coco_submission"]


def coco_testset_name(ann_file: str | Path) -> str:
    """The ``[testset]`` part of a submission name from the annotation file: ``image_info_test-dev2017.json`` ->
    ``test-dev2017``, ``instances_val2017.json`` -> ``val2017``; other names: their stem (``_`` -> ``-``)."""
    stem = Path(ann_file).name.removesuffix(".json")
    for prefix in ("image_info_", "instances_"):
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    return _token(stem)


def algorithm_name(name: str) -> str:
    """The ``[alg]`` part: ``name`` with every character other than letters, digits and ``-`` replaced by ``-``
    (``_`` separates the parts of a submission name, so ``vfnet_r50_fpn_1x_coco`` becomes
    ``vfnet-r50-fpn-1x-coco``)."""
    return _token(name)


def _token(text: str) -> str:
    token = re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")
    if not token:
        raise ValueError(f"cannot make a submission name part out of {text!r}")
    return token


def submission_file_name(testset: str, alg: str) -> str:
    """``detections_<testset>_<alg>_results.json`` (both parts made safe by :func:`_token`)."""
    return f"detections_{_token(testset)}_{_token(alg)}_results.json"


@dataclass
class Submission:
    """What :func:`write_coco_submission` wrote: the json and the zip holding it, and the number of entries."""

    json_path: Path
    zip_path: Path
    num_results: int
    iou_type: str


def write_coco_submission(results: list[dict], out_dir: str | Path, testset: str, alg: str,
                          iou_type: str = "bbox") -> Submission:
    """Write COCO results entries as a server submission: ``OUT/detections_<testset>_<alg>_results.json`` and
    ``.zip`` (the json alone at the zip's root, deflated); for ``iou_type="segm"`` under ``OUT/segm/``.

    Args:
        results: COCO results entries (``image_id``, ``category_id``, ``bbox`` or ``segmentation`` (RLE with
            ``counts`` as text), ``score``), e.g. from :func:`~densedet.evaluation.detections_to_coco_results`.
        testset / alg: the name parts (see :func:`coco_testset_name`, :func:`algorithm_name`).
        iou_type: ``"bbox"`` or ``"segm"``.

    Both files are written atomically. An empty ``results`` list is written as ``[]`` (the server scores it 0).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"write_coco_submission: iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    key = "bbox" if iou_type == "bbox" else "segmentation"
    for i, r in enumerate(results[:1]):  # one entry tells the kind: a mixed-up list would be scored as the wrong one
        if key not in r:
            raise ValueError(f"write_coco_submission: results[{i}] has no '{key}' for an {iou_type} submission")
    folder = Path(out_dir) / ("segm" if iou_type == "segm" else "")
    name = submission_file_name(testset, alg)
    json_path = atomic_write_json(folder / name, results)
    zip_path = folder / f"{name.removesuffix('.json')}.zip"

    def write_zip(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(json_path, arcname=name)

    atomic_write(zip_path, write_zip)
    return Submission(json_path, zip_path, len(results), iou_type)
