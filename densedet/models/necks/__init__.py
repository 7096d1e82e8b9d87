"""Necks; each registers itself in ``densedet.registry.NECKS``."""

from densedet.models.necks.fpn import FPN
from densedet.models.necks.pafpn import PAFPN

__all__ = ["FPN", "PAFPN"]
