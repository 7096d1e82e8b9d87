"""YOLO (Ultralytics) layout -> COCO instances.

Layout: ``images/{train,val}/`` with a label file per image under ``labels/{train,val}/`` (same relative path,
``.txt``), and ``data.yaml`` giving ``names`` (a list, or a ``{id: name}`` mapping) and optionally ``path``,
``train`` and ``val`` image folders (relative to ``path``, else to the yaml's folder). The label folder of an image
folder is the same path with its last ``images`` component replaced by ``labels`` (Ultralytics
``img2label_paths``).

A label line is ``class cx cy w h`` with the centre and size normalised by the image width / height; it becomes the
absolute xyxy box ``[(cx - w/2) W, (cy - h/2) H, (cx + w/2) W, (cy + h/2) H]``. A line with more than five numbers
is a polygon ``class x1 y1 x2 y2 ...`` (normalised); its box is the polygon's extent. An image without a label file
is a background image (Ultralytics' convention), counted in the warning; an empty label file is a background image
too, silently. A class id outside ``0..len(names)-1``, a malformed line, or a NaN / infinite number in any field
(the class id included) is a :class:`DataError` naming the file and line.

Folders: ``data.yaml``'s ``path`` / ``train`` / ``val`` are followed wherever they point, also outside the folder
given with ``--data`` (Ultralytics' semantics: a dataset yaml may name image folders anywhere); the layout module
logs the folders it then reads and warns when the given folder's own images go unused (docs/own_data.md). Inside
an image folder, an image or label file that is a symlink resolving outside its folder is a :class:`DataError`
naming it, raised before it is opened.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from densedet.data.coco import DataError
from densedet.data.formats.common import IMAGE_EXTS, CocoBuilder, ProblemLog, clip_box, image_size, outside_reason

__all__ = ["label_dir_for", "parse_yolo_line", "read_data_yaml", "yolo_split_dirs", "yolo_to_coco"]

DATA_YAML_NAMES = ("data.yaml", "dataset.yaml", "data.yml")


def read_data_yaml(root: Path) -> tuple[Path | None, dict[str, Any]]:
    """The first of ``data.yaml`` / ``dataset.yaml`` / ``data.yml`` in ``root`` and its mapping (``{}`` if none)."""
    for name in DATA_YAML_NAMES:
        f = root / name
        if f.is_file():
            try:
                data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise DataError(f"{f}: invalid YAML ({e})") from e
            if not isinstance(data, dict):
                raise DataError(f"{f}: expected a mapping with 'names'")
            return f, data
    return None, {}


def yolo_classes(root: Path) -> list[str]:
    """Class names from ``data.yaml`` ``names`` (list or ``{id: name}`` with ids ``0..n-1``); ``nc`` must agree."""
    f, data = read_data_yaml(root)
    if f is None:
        raise DataError(f"{root}: no data.yaml with the class names (e.g. 'names: [cat, dog]')")
    names = data.get("names")
    if isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DataError(f"{f}: 'names' ids must be 0..{len(keys) - 1}, got {keys}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise DataError(f"{f}: 'names' must be a non-empty list of class names (or an {{id: name}} mapping)")
    names = [str(n) for n in names]
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{f}: nc is {data['nc']} but 'names' lists {len(names)} classes")
    if len(set(names)) != len(names):
        raise DataError(f"{f}: class names repeat: {names}")
    return names


def yolo_split_dirs(root: Path, split: str) -> list[Path]:
    """Image folders of ``split`` ('train' / 'val' / 'test'): from data.yaml when it names them, else
    ``images/{split}`` when it exists; ``[]`` when the split has none."""
    f, data = read_data_yaml(root)
    base = root
    if data.get("path"):
        p = Path(str(data["path"])).expanduser()
        base = p if p.is_absolute() else (root / p)
        if not base.is_dir():  # Ultralytics' path is often an absolute path of the author's machine
            base = root
    entry = data.get(split)
    if entry:
        entries = entry if isinstance(entry, list) else [entry]
        dirs = []
        for e in entries:
            d = Path(str(e))
            d = d if d.is_absolute() else (base / d)
            for alt in (root / str(e), root.joinpath(*[q for q in Path(str(e)).parts if q not in ("..", ".")])):
                if not d.is_dir() and alt.is_dir():  # Roboflow writes '../train/images' for root/train/images
                    d = alt
            if not d.is_dir():
                raise DataError(f"{f}: '{split}' names {e}, which is not a folder (looked at {d})")
            dirs.append(d.resolve())
        return dirs
    d = root / "images" / split
    return [d.resolve()] if d.is_dir() else []


def label_dir_for(img_dir: Path) -> Path:
    """The label folder of an image folder: the last ``images`` path component replaced by ``labels``."""
    parts = list(img_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts)
    raise DataError(f"{img_dir}: cannot place its labels (the path has no 'images' component)")


def parse_yolo_line(line: str, num_classes: int, width: float, height: float, where: str
                    ) -> tuple[int, list[float]]:
    """``class cx cy w h`` (or ``class x1 y1 x2 y2 ...`` polygon), normalised -> ``(label, xyxy pixels)``."""
    parts = line.split()
    try:
        cls_f = float(parts[0])
        vals = [float(v) for v in parts[1:]]
    except (ValueError, IndexError) as e:
        raise DataError(f"{where}: expected 'class cx cy w h' numbers, got {line!r}") from e
    if not all(math.isfinite(v) for v in (cls_f, *vals)):  # NaN passes every range check: refuse it here
        raise DataError(f"{where}: NaN or infinite number in {line!r}; every field must be a finite number")
    if cls_f != int(cls_f):
        raise DataError(f"{where}: class id must be an integer, got {parts[0]!r}")
    cls = int(cls_f)
    if not 0 <= cls < num_classes:
        raise DataError(f"{where}: class id {cls} is out of range: data.yaml names {num_classes} classes "
                        f"(ids 0..{num_classes - 1})")
    if len(vals) == 4:
        cx, cy, w, h = vals
        return cls, [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    if len(vals) >= 6 and len(vals) % 2 == 0:
        xs, ys = vals[0::2], vals[1::2]
        return cls, [min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height]
    raise DataError(f"{where}: expected 'class cx cy w h' (or a polygon 'class x1 y1 x2 y2 ...'), got {line!r}")


def yolo_to_coco(img_dirs: list[Path], classes: list[str], log: ProblemLog | None = None,
                 common_root: Path | None = None) -> dict[str, Any]:
    """COCO instances dict for every image under ``img_dirs``; ``file_name`` is relative to ``common_root``
    (default: the single folder of ``img_dirs``)."""
    if common_root is None:
        if len(img_dirs) != 1:
            raise ValueError("several image folders need a common_root")
        common_root = img_dirs[0]
    log = log or ProblemLog(str(common_root))
    coco = CocoBuilder(classes)
    for img_dir in img_dirs:
        lbl_dir = label_dir_for(img_dir)
        images = sorted(p for p in img_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        for img in images:
            rel = img.relative_to(img_dir)
            why = outside_reason(str(rel), img_dir)
            if why is not None:
                raise DataError(f"{img}: the image {why}, outside its folder {img_dir} (DenseDet reads no file "
                                f"outside the dataset's folders)")
            try:
                w, h = image_size(img)
            except OSError:
                log.add("unreadable_image", str(rel))
                continue
            iid = coco.add_image(img.relative_to(common_root).as_posix(), w, h)
            label = (lbl_dir / rel).with_suffix(".txt")
            why = outside_reason(str(rel.with_suffix(".txt")), lbl_dir)
            if why is not None:
                raise DataError(f"{label}: the label file {why}, outside its folder {lbl_dir} (DenseDet reads no "
                                f"file outside the dataset's folders)")
            if not label.is_file():
                log.add("missing_label", str(rel.with_suffix(".txt")))
                continue
            for n, line in enumerate(label.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{label}:{n}"
                cls, xyxy = parse_yolo_line(line, len(classes), w, h, where)
                box = clip_box(xyxy, w, h, log, f"{rel.with_suffix('.txt')}:{n}")
                if box is not None:
                    coco.add_box(iid, cls, box)
    return coco.to_dict()
