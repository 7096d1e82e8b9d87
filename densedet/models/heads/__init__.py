"""Dense detection heads; each registers itself in :data:`densedet.registry.HEADS`."""

from densedet.models.heads.anchor_heads import ATSSHead, RetinaHead
from densedet.models.heads.dense_head import DenseHead
from densedet.models.heads.fcos_head import FCOSHead
from densedet.models.heads.umop_head import LRPHead

__all__ = ["ATSSHead", "DenseHead", "FCOSHead", "LRPHead", "RetinaHead"]
