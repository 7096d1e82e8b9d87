"""Box geometry, padded ground truth, box coders and prior generators."""

from densedet.structures.boxes import (
    PaddedTargets,
    bbox_overlaps,
    box_area,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    pad_targets,
)
from densedet.structures.coders import (
    DeltaXYWHBBoxCoder,
    DistancePointBBoxCoder,
    clip_boxes,
)
from densedet.structures.priors import AnchorGenerator, PointGenerator

__all__ = [
    "AnchorGenerator",
    "DeltaXYWHBBoxCoder",
    "DistancePointBBoxCoder",
    "PaddedTargets",
    "PointGenerator",
    "bbox_overlaps",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "clip_boxes",
    "pad_targets",
]
