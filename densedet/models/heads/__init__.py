"""Dense detection heads; each registers itself in :data:`densedet.registry.HEADS`."""

from densedet.models.heads.anchor_heads import ATSSHead, RetinaHead
from densedet.models.heads.dense_head import DenseHead
from densedet.models.heads.fcos_head import FCOSHead
from densedet.models.heads.fovea_head import FoveaHead
from densedet.models.heads.reppoints_head import RepPointsHead
from densedet.models.heads.rpn_head import RPNHead
from densedet.models.heads.umop_head import LRPHead
from densedet.models.heads.vfnet_head import VFNetHead, star_dcn_offset

__all__ = ["ATSSHead", "DenseHead", "FCOSHead", "FoveaHead", "LRPHead", "RPNHead", "RepPointsHead", "RetinaHead",
           "VFNetHead", "star_dcn_offset"]
