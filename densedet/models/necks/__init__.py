"""Necks; each registers itself in ``densedet.registry.NECKS``."""

from densedet.models.necks.fpn import FPN
from densedet.models.necks.pafpn import PAFPN
from densedet.models.necks.pafpnx import PAFPNX

__all__ = ["FPN", "PAFPN", "PAFPNX"]
