"""Overrides that shrink the `*_synth` ATSS config to a model that runs in milliseconds (tests only)."""

TINY_ATSS = [
    "model.backbone.base_channels=8", "model.neck.in_channels=[16,32,64]", "model.neck.out_channels=16",
    "model.bbox_head.in_channels=16", "model.bbox_head.feat_channels=16", "model.bbox_head.stacked_convs=1",
    "model.bbox_head.norm_cfg={type: GN, num_groups: 4}", "model.backbone.pretrained=null",
]


def val_resize(size: int) -> str:
    """``data.val.pipeline`` override: resize to ``size`` x ``size`` (keep ratio) and normalise."""
    return f"data.val.pipeline=[{{type: Resize, img_scale: [{size}, {size}]}}]"
