"""Build a detector from the ``model`` section of a config."""

from __future__ import annotations

from typing import Any

from torch import nn

import densedet.models.backbones  # noqa: F401  (registers backbones)
import densedet.models.detector  # noqa: F401  (registers detectors)
import densedet.models.heads  # noqa: F401  (registers heads)
import densedet.models.necks  # noqa: F401  (registers necks)
import densedet.models.two_stage  # noqa: F401  (registers two-stage detectors)
from densedet.registry import DETECTORS


def build_detector(model_cfg: dict[str, Any], init: bool = True) -> nn.Module:
    """Construct the detector; ``init`` runs weight initialisation (and pretrained loading)."""
    model = DETECTORS.build(model_cfg, "model")
    if init:
        model.init_weights()
    return model
