"""Necks; each registers itself in ``densedet.registry.NECKS``."""

from densedet.models.necks.fpn import FPN

__all__ = ["FPN"]
