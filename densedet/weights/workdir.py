"""Which file of a training work dir holds the weights: ``last_checkpoint`` (written by the trainer after every
save), the newest ``*.pth``, and the SWA-averaged ``swa_final.pth`` of a finished SWA run."""

from __future__ import annotations

import logging
from pathlib import Path

from densedet.errors import CheckpointNotFoundError
from densedet.io import atomic_write_text

__all__ = ["LAST_CHECKPOINT_FILE", "SWA_FINAL", "latest_checkpoint", "mark_last_checkpoint", "resolve_checkpoint"]

logger = logging.getLogger("densedet")

LAST_CHECKPOINT_FILE = "last_checkpoint"
SWA_FINAL = "swa_final.pth"  # the averaged model of a finished SWA phase (densedet.engine.swa)

def mark_last_checkpoint(work_dir: str | Path, ckpt_path: str | Path) -> None:
    """Record ``ckpt_path`` in ``work_dir/last_checkpoint`` (atomically; relative to work_dir when inside it)."""
    work_dir, ckpt_path = Path(work_dir), Path(ckpt_path)
    try:
        name = str(ckpt_path.resolve().relative_to(work_dir.resolve()))
    except ValueError:
        name = str(ckpt_path.resolve())
    atomic_write_text(work_dir / LAST_CHECKPOINT_FILE, name + "\n")


def latest_checkpoint(work_dir: str | Path) -> Path | None:
    """The checkpoint named by ``work_dir/last_checkpoint``, else the newest ``*.pth`` there, else ``None``."""
    work_dir = Path(work_dir)
    marker = work_dir / LAST_CHECKPOINT_FILE
    if marker.is_file():
        name = marker.read_text().strip()
        if name:
            cand = Path(name) if Path(name).is_absolute() else work_dir / name
            if cand.is_file():
                return cand
            logger.warning("%s names %s, which does not exist; looking for other checkpoints", marker, cand)
    ckpts = [p for p in work_dir.glob("*.pth") if not p.name.startswith(".")]
    if not ckpts:
        return None
    return max(ckpts, key=lambda p: (p.stat().st_mtime_ns, p.name))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint to test or predict with: ``path`` itself when it is a file, and for a training work dir its
    ``swa_final.pth`` (a finished SWA run: the averaged weights are the model) or else :func:`latest_checkpoint`.

    ``densedet test/predict`` and :class:`densedet.Predictor` all resolve through this function. Raises
    :class:`CheckpointNotFoundError` naming ``path`` when it is neither a file nor a work dir with a checkpoint.
    """
    p = Path(path)
    if p.is_dir():
        swa = p / SWA_FINAL
        if swa.is_file():
            return swa
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointNotFoundError(f"{p}: no checkpoint in this work dir (no {LAST_CHECKPOINT_FILE}, no *.pth)")
        return found
    if not p.is_file():
        raise CheckpointNotFoundError(f"{p}: no such checkpoint file or work dir")
    return p
