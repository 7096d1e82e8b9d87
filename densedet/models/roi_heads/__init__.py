"""Second-stage (RoI) heads of two-stage detectors: RoI feature extraction, sampling, box and mask heads."""

from densedet.models.roi_heads.bbox_head import Shared2FCBBoxHead
from densedet.models.roi_heads.mask_head import FCNMaskHead, paste_masks_in_boxes
from densedet.models.roi_heads.roi_align import multilevel_roi_align
from densedet.models.roi_heads.roi_extractor import SingleRoIExtractor, map_roi_levels
from densedet.models.roi_heads.sampler import random_sample, sampling_generator
from densedet.models.roi_heads.standard_roi_head import StandardRoIHead

__all__ = ["FCNMaskHead", "Shared2FCBBoxHead", "SingleRoIExtractor", "StandardRoIHead", "map_roi_levels",
           "multilevel_roi_align", "paste_masks_in_boxes", "random_sample", "sampling_generator"]
