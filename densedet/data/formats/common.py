"""Shared pieces of the VOC / YOLO -> COCO converters: the COCO json builder and the counted problem report.

Converters never stop at the first odd file of a real dataset: a problem that is safe to skip (an unreadable XML,
a missing label file, a box outside its image) is counted per kind and reported in one :class:`DataWarning` per
kind, naming up to five of the offending files, as :class:`densedet.data.coco.CocoDataset` does for COCO input.
Problems that would silently train the wrong thing (a class id out of range, a malformed label line) are a
:class:`DataError` naming the file and line.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from densedet.data.coco import DataError, DataWarning

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

# kind -> (verb, what) for "<verb> N <what> in ROOT (e.g. ...)"
PROBLEM_TEXT = {
    "unreadable_xml": ("skipped", "images whose annotation XML cannot be parsed"),
    "missing_xml": ("skipped", "images listed in ImageSets without an annotation XML"),
    "missing_image": ("skipped", "annotations whose image file is missing"),
    "unreadable_image": ("skipped", "images that cannot be opened"),
    "missing_label": ("kept as background", "images without a label file"),
    "unknown_class": ("skipped", "boxes of a class not in the class list"),
    "outside": ("skipped", "boxes entirely outside their image"),
    "degenerate": ("skipped", "boxes with non-positive width or height"),
    "clipped": ("clipped", "boxes partly outside their image (clipped to the image)"),
}


@dataclass
class ProblemLog:
    """Counts of skipped / fixed input per kind, with a few examples each."""

    source: str
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, example: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 5:
            ex.append(example)

    def warn(self) -> None:
        """One :class:`DataWarning` per kind seen."""
        for kind, n in self.counts.items():
            verb, what = PROBLEM_TEXT[kind]
            more = ", ..." if n > len(self.examples[kind]) else ""
            warnings.warn(f"{verb} {n} {what} in {self.source} (e.g. {', '.join(self.examples[kind])}{more})",
                          DataWarning, stacklevel=3)


def outside_reason(name: str, folder: Path) -> str | None:
    """Why the relative file name ``name`` leads outside ``folder``, or None when ``folder / name`` stays inside.

    Refused: an absolute path (POSIX, Windows drive or UNC), any ``..`` component (even one that comes back, as
    :class:`~densedet.data.coco.CocoDataset` refuses it), and a path whose symlinks resolve outside the real path of
    ``folder`` (``folder`` itself may be a symlink, e.g. ``JPEGImages`` -> a shared image store). Nothing is opened:
    only ``lstat`` / ``readlink`` through :func:`os.path.realpath`.
    """
    if os.path.isabs(name) or name.startswith(("/", "\\")) or name[1:3] in (":/", ":\\"):
        return "is an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "goes up with '..'"
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(folder, name))
    if os.path.commonpath([root, target]) != root:
        return f"resolves to {target} (a symlink)"
    return None


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the image header, after EXIF orientation (as :class:`CocoDataset` decodes it)."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block: PIL's exif_transpose ignores it too
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def clip_box(box: list[float], width: float, height: float, log: ProblemLog, where: str, tol: float = 1e-3
             ) -> list[float] | None:
    """Clip an xyxy box to the image; ``None`` (counted) when it is degenerate or entirely outside. Clipping by
    at most ``tol`` px is silent (rounding in label files, VOC's 1-based corners written 0-based)."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        log.add("degenerate", where)
        return None
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if cx2 <= cx1 or cy2 <= cy1:
        log.add("outside", where)
        return None
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        log.add("clipped", where)
    return [cx1, cy1, cx2, cy2]


class CocoBuilder:
    """Accumulates images and xyxy boxes into a COCO instances dict (category ids 1..C in class order)."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = list(classes)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add_image(self, file_name: str, width: int, height: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": int(width), "height": int(height)})
        return image_id

    def add_box(self, image_id: int, label: int, xyxy: list[float], iscrowd: bool = False,
                **extra: Any) -> None:
        """``xyxy`` absolute pixels; ``label`` 0-based index into ``classes``; ``iscrowd`` marks an ignore region."""
        x1, y1, x2, y2 = (float(v) for v in xyxy)
        w, h = x2 - x1, y2 - y1
        self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                 "bbox": [round(x1, 4), round(y1, 4), round(w, 4), round(h, 4)],
                                 "area": round(w * h, 4), "iscrowd": int(bool(iscrowd)), **extra})

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "annotations": self.annotations,
                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.classes)]}


def read_class_file(path: Path) -> list[str]:
    """One class name per non-empty line; a :class:`DataError` on duplicates."""
    names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: class names {dup} appear more than once")
    if not names:
        raise DataError(f"{path}: no class names")
    return names
