"""Pascal VOC XML annotations -> COCO instances.

The folders come from :mod:`densedet.data.formats.layout`: the VOC devkit's ``Annotations/*.xml`` + ``JPEGImages/``
(+ ``ImageSets/Main/{split}.txt``), or the layouts labelling tools and dataset repositories use (``annotations/``
+ ``images/``; XMLs beside their images, in one folder or in ``train/`` + ``valid/``). Every function takes the
annotation folder and the image folder (the devkit's by default).

Semantics follow MMDetection ``XMLDataset`` (mmdet/datasets/xml_style.py): ``bndbox`` corners are VOC's 1-based
pixel coordinates and become ``[xmin - 1, ymin - 1, xmax - 1, ymax - 1]`` (mmdet truncates them to integers first;
here fractional corners, as CVAT writes them, are kept); an object flagged
``difficult`` goes to the ignore boxes (here: ``iscrowd: 1``, which COCO evaluation and :class:`CocoDataset` treat
as an ignore region) and objects of a class outside the class list are skipped. ``truncated`` does not change
training (mmdet reads it nowhere); it is kept as an attribute of the annotation. The image size comes from the
XML's ``size`` element, or from the image header when the XML has none (mmdet does the same).

Classes: ``classes.txt`` (or ``labels.txt``) in the dataset root, one name per line, when present; otherwise every
object name found in the annotation folder(s), sorted.

Containment: an image id (``ImageSets`` line) and an XML's ``<filename>`` are file names inside the annotation and
image folders. An absolute path, a ``..`` component, or a symlink resolving outside that folder is a
:class:`DataError` naming the XML (or the ``ImageSets`` line), raised before the file it names is opened: an
annotation never makes DenseDet read a file outside the dataset (:func:`~densedet.data.formats.common.outside_reason`).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from densedet.data.coco import DataError
from densedet.data.formats.common import (
    IMAGE_EXTS,
    CocoBuilder,
    ProblemLog,
    clip_box,
    image_size,
    outside_reason,
    read_class_file,
)

__all__ = ["VocObject", "VocRecord", "parse_voc_xml", "voc_classes", "voc_split_ids", "voc_to_coco", "xml_path"]


@dataclass
class VocObject:
    name: str
    xyxy: list[float]
    difficult: bool = False
    truncated: bool = False


@dataclass
class VocRecord:
    """One parsed XML: ``filename`` as written, ``width``/``height`` (0 when absent) and its objects."""

    filename: str
    width: int
    height: int
    objects: list[VocObject] = field(default_factory=list)


def _text(node: ET.Element | None, tag: str, default: str = "") -> str:
    child = node.find(tag) if node is not None else None
    return child.text.strip() if child is not None and child.text else default


def parse_voc_xml(path: Path) -> VocRecord:
    """Parse one VOC XML; a :class:`DataError` naming the file when it is not valid XML or a box is malformed."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{path}: cannot parse the annotation XML ({e})") from e
    size = root.find("size")
    try:
        width, height = int(float(_text(size, "width", "0"))), int(float(_text(size, "height", "0")))
    except (ValueError, OverflowError) as e:  # 'abc', 'nan' (ValueError), 'inf' (OverflowError)
        raise DataError(f"{path}: <size> holds a non-number or a non-finite one ({e})") from e
    rec = VocRecord(_text(root, "filename"), width, height)
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        bnd = obj.find("bndbox")
        if not name or bnd is None:
            raise DataError(f"{path}: object #{k} lacks a <name> or a <bndbox>")
        try:
            xyxy = [float(_text(bnd, t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        except ValueError as e:
            raise DataError(f"{path}: object #{k} ({name}) has a bndbox that is not 4 numbers ({e})") from e
        if not all(math.isfinite(v) for v in xyxy):
            raise DataError(f"{path}: object #{k} ({name}) has a non-finite bndbox corner {xyxy}")
        flag = {t: _text(obj, t, "0") for t in ("difficult", "truncated")}
        rec.objects.append(VocObject(name, xyxy, difficult=flag["difficult"] in ("1", "true"),
                                     truncated=flag["truncated"] in ("1", "true")))
    return rec


def voc_split_ids(root: Path, split: str) -> list[str] | None:
    """Image ids of ``ImageSets/Main/{split}.txt`` (first word of each line), or ``None`` when the file is absent.

    An id that would lead outside ``Annotations/`` (absolute, ``..``) is a :class:`DataError` naming the line."""
    f = root / "ImageSets" / "Main" / f"{split}.txt"
    if not f.is_file():
        return None
    ids = []
    for n, ln in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
        if not ln.strip():
            continue
        image_id = ln.split()[0]
        why = outside_reason(f"{image_id}.xml", root / "Annotations")
        if why is not None and "symlink" not in why:  # a symlinked XML is named by xml_path when it is read
            raise DataError(f"{f}:{n}: image id '{image_id}' {why}; ids are file names inside "
                            f"{root / 'Annotations'} (DenseDet reads no file outside the dataset)")
        ids.append(image_id)
    return ids


def xml_path(ann_dir: Path, image_id: str) -> Path:
    """``ann_dir / '{image_id}.xml'``, after checking that it stays inside ``ann_dir`` (a :class:`DataError` naming
    it otherwise: an absolute id, ``..``, or a symlink leading outside)."""
    path = ann_dir / f"{image_id}.xml"
    why = outside_reason(f"{image_id}.xml", ann_dir)
    if why is not None:
        raise DataError(f"{path}: the annotation file {why}, outside {ann_dir} (DenseDet reads no file outside the "
                        f"dataset)")
    return path


def voc_classes(root: Path, records: dict[str, VocRecord] | None = None,
                ann_dirs: list[Path] | None = None) -> list[str]:
    """``classes.txt`` / ``labels.txt`` in ``root`` when present, else the sorted set of object names in
    ``records`` (default: every XML of ``ann_dirs``, default ``[root / 'Annotations']``)."""
    for name in ("classes.txt", "labels.txt"):
        if (root / name).is_file():
            return read_class_file(root / name)
    ann_dirs = ann_dirs or [root / "Annotations"]
    if records is None:  # unreadable XMLs are skipped here: the conversion counts them
        records = {}
        for ann_dir in ann_dirs:
            for p in sorted(ann_dir.glob("*.xml")):
                xml = xml_path(ann_dir, p.stem)  # a symlink leading outside: an error, never opened
                try:
                    records[str(xml)] = parse_voc_xml(xml)
                except DataError:
                    continue
    names = sorted({o.name for r in records.values() for o in r.objects})
    if not names:
        where = ", ".join(str(d) for d in ann_dirs)
        raise DataError(f"{where}: no objects in any XML, so no classes (add a classes.txt to {root})")
    return names


def _find_image(img_dir: Path, image_id: str, rec: VocRecord, xml: Path) -> Path | None:
    """The image of ``xml``: ``img_dir/<filename>``, else ``img_dir/<image_id>.<ext>``; None when missing.

    Containment is checked before anything is looked at: a ``<filename>`` that is absolute, has ``..`` or is a
    symlink leading outside ``img_dir`` (and a found image that is such a symlink) is a :class:`DataError`
    naming ``xml``."""

    def refuse(name: str, why: str) -> DataError:
        return DataError(f"{xml}: <filename> '{name}' {why}, outside the image folder {img_dir}; file names must "
                         f"be relative paths inside it (DenseDet reads no file outside the dataset)")

    if rec.filename:
        why = outside_reason(rec.filename, img_dir)
        if why is not None:
            raise refuse(rec.filename, why)
        if (img_dir / rec.filename).is_file():
            return img_dir / rec.filename
    for ext in IMAGE_EXTS:
        for name in (f"{image_id}{ext}", f"{image_id}{ext.upper()}"):
            why = outside_reason(name, img_dir)
            if why is not None:
                raise refuse(name, why)
            if (img_dir / name).is_file():
                return img_dir / name
    return None


def voc_to_coco(root: str | Path, ids: list[str] | None = None, classes: list[str] | None = None,
                log: ProblemLog | None = None, *, ann_dir: Path | None = None,
                img_dir: Path | None = None) -> dict[str, Any]:
    """COCO instances dict for the VOC images ``ids`` (default: every XML in ``ann_dir``).

    ``ann_dir`` / ``img_dir`` default to the devkit's ``root/Annotations`` and ``root/JPEGImages`` (they may be
    one folder, XMLs beside their images). ``file_name`` entries are relative to ``img_dir``. Unreadable XMLs,
    missing images, unknown classes and boxes outside their image are counted in ``log`` (warned about by the
    caller); a degenerate box is skipped.
    """
    root = Path(root)
    ann_dir = Path(ann_dir) if ann_dir is not None else root / "Annotations"
    img_dir = Path(img_dir) if img_dir is not None else root / "JPEGImages"
    if not ann_dir.is_dir():
        raise DataError(f"{root}: no {ann_dir.name}/ folder of VOC XML files (not a Pascal VOC layout)")
    log = log or ProblemLog(str(root))
    if ids is None:
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
    records: dict[str, VocRecord] = {}
    xmls: dict[str, Path] = {}
    for image_id in ids:
        xml = xml_path(ann_dir, image_id)
        if not xml.is_file():
            log.add("missing_xml", xml.name)
            continue
        try:
            records[image_id] = parse_voc_xml(xml)
            xmls[image_id] = xml
        except DataError:
            log.add("unreadable_xml", xml.name)
    classes = list(classes) if classes is not None else voc_classes(root, records, [ann_dir])
    label_of = {n: i for i, n in enumerate(classes)}
    coco = CocoBuilder(classes)
    for image_id, rec in records.items():
        img = _find_image(img_dir, image_id, rec, xmls[image_id])
        if img is None:
            log.add("missing_image", f"{image_id}.xml")
            continue
        w, h = rec.width, rec.height
        if w <= 0 or h <= 0:
            try:
                w, h = image_size(img)
            except OSError:
                log.add("unreadable_image", img.name)
                continue
        iid = coco.add_image(img.relative_to(img_dir).as_posix(), w, h)
        for k, obj in enumerate(rec.objects):
            where = f"{image_id}.xml object #{k}"
            if obj.name not in label_of:
                log.add("unknown_class", f"{where} ({obj.name})")
                continue
            # 1-based VOC corners -> 0-based pixels; a corner 1 px outside (tools writing 0-based) is clipped silently
            box = clip_box([v - 1 for v in obj.xyxy], w, h, log, where, tol=1.0)
            if box is not None:
                coco.add_box(iid, label_of[obj.name], box, iscrowd=obj.difficult, difficult=int(obj.difficult),
                             truncated=int(obj.truncated))
    return coco.to_dict()
