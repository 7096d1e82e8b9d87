"""DenseDet's cache folder: ``$DENSEDET_HOME``, default ``~/.cache/densedet``.

Downloaded weights go to ``<home>/checkpoints`` and COCO json converted from VOC / YOLO datasets to
``<home>/datasets`` (never into the user's dataset folder).
"""

from __future__ import annotations

import os
from pathlib import Path


def densedet_home() -> Path:
    """``$DENSEDET_HOME`` when set, else ``~/.cache/densedet`` (not created here)."""
    env = os.environ.get("DENSEDET_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "densedet"
