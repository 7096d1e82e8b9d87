"""Batched target assigners: max-IoU (RetinaNet), ATSS, FCOS ranges with centre sampling, points (RepPoints).

All take priors shared by the batch and a :class:`~densedet.structures.PaddedTargets`, and return an
:class:`AssignResult` whose ``gt_inds`` use ``>= 0`` positive gt index, ``-1`` negative, ``-2`` ignored.
"""

from densedet.assigners.atss import atss_assign
from densedet.assigners.fcos import (
    DEFAULT_REGRESS_RANGES,
    expand_regress_ranges,
    expand_strides,
    fcos_assign,
    fcos_assign_levels,
)
from densedet.assigners.fovea import fovea_assign, fovea_grid
from densedet.assigners.max_iou import IGNORED, NEGATIVE, AssignResult, max_iou_assign
from densedet.assigners.point import point_assign

__all__ = [
    "DEFAULT_REGRESS_RANGES",
    "IGNORED",
    "NEGATIVE",
    "AssignResult",
    "atss_assign",
    "expand_regress_ranges",
    "expand_strides",
    "fcos_assign",
    "fcos_assign_levels",
    "fovea_assign",
    "fovea_grid",
    "max_iou_assign",
    "point_assign",
]
