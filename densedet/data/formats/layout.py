"""Recognise a dataset root as COCO, Pascal VOC or YOLO and make COCO json for its train / val splits.

* COCO: ``annotations/instances_{train,val}*.json`` with images in ``{split}2017/``, ``{split}/``,
  ``images/{split}2017/``, ``images/{split}/`` or ``images/``.
* VOC: ``Annotations/*.xml`` + ``JPEGImages/`` (+ ``ImageSets/Main/{train,val}.txt``, else ``trainval``/``test``);
  also the layouts labelling tools and dataset repositories write (:func:`voc_folders`): ``annotations/*.xml`` +
  ``images/``, XMLs beside their images in ``train/`` and ``valid/`` (Roboflow's "Pascal VOC" export), or in the
  root itself (labelImg's default).
* YOLO: ``data.yaml`` with ``names`` + ``images/{train,val}`` and ``labels/{train,val}``.

VOC and YOLO annotations are converted (:mod:`densedet.data.formats.voc`, :mod:`densedet.data.formats.yolo`) into
``$DENSEDET_HOME/datasets/<name>-<hash of the root path>/instances_{split}.json``; the dataset folder itself is
only read. The json is rebuilt when any annotation file changes (a fingerprint of names, sizes and mtimes).
A dataset without a validation split gets one: every 5th image (in file order) is held out for validation, and
that is logged.

A YOLO ``data.yaml`` whose ``path`` / ``train`` / ``val`` lead outside the given root is followed (Ultralytics'
semantics); the folders actually read are then logged (a warning-level line per split), and a :class:`DataWarning`
says so when the root holds images of its own that none of those folders contains (docs/own_data.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from densedet.data.coco import DataError, DataWarning, load_coco_json
from densedet.data.formats.common import IMAGE_EXTS, ProblemLog
from densedet.data.formats.voc import voc_classes, voc_split_ids, voc_to_coco
from densedet.data.formats.yolo import label_dir_for, read_data_yaml, yolo_classes, yolo_split_dirs, yolo_to_coco
from densedet.home import densedet_home
from densedet.io import atomic_write_json, atomic_write_text, ensure_writable_dir

__all__ = ["HOLDOUT_EVERY", "PreparedDataset", "SplitFiles", "detect_layout", "prepare_dataset", "split_holdout"]

logger = logging.getLogger("densedet")

HOLDOUT_EVERY = 5  # without a val split, images 4, 9, 14, ... (0-based, file order) are held out
_SPLITS = ("train", "val")


@dataclass
class SplitFiles:
    """One split as :class:`~densedet.data.CocoDataset` reads it."""

    ann_file: Path
    img_dir: Path


@dataclass
class PreparedDataset:
    """``kind`` ('coco' | 'voc' | 'yolo'), class names in label order, and the COCO files of each split."""

    kind: str
    root: Path
    classes: list[str]
    splits: dict[str, SplitFiles] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: dict[str, int] = field(default_factory=dict)  # conversion problems per kind (see formats.common)


def _coco_ann(root: Path, split: str) -> Path | None:
    found = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    return found[0] if found else None


_VAL_FOLDERS = ("val", "valid", "validation")


def _has_xml(folder: Path) -> bool:
    return folder.is_dir() and next(folder.glob("*.xml"), None) is not None


def voc_folders(root: Path) -> dict[str, tuple[Path, Path]] | None:
    """The (annotation folder, image folder) pairs of a VOC-style root, or None when it is not one.

    Keys: ``"all"`` for one folder pair whose splits come from ``ImageSets/Main`` (devkit) or a hold-out, or
    ``"train"`` (+ ``"val"``) for split folders. Checked in this order: the devkit (``Annotations/`` +
    ``JPEGImages/``); ``annotations/*.xml`` + ``images/``; ``train/*.xml`` (+ ``val/``, ``valid/`` or
    ``validation/``), XMLs beside their images; ``*.xml`` beside images in the root."""
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return {"all": (root / "Annotations", root / "JPEGImages")}
    if _has_xml(root / "annotations") and (root / "images").is_dir():
        return {"all": (root / "annotations", root / "images")}
    if _has_xml(root / "train"):
        pairs = {"train": (root / "train", root / "train")}
        for name in _VAL_FOLDERS:
            if _has_xml(root / name):
                pairs["val"] = (root / name, root / name)
                break
        return pairs
    if _has_xml(root) and any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir()):
        return {"all": (root, root)}
    return None


def detect_layout(root: str | Path) -> str:
    """'coco', 'voc' or 'yolo' for a dataset root; a :class:`DataError` listing what each layout needs otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    if _coco_ann(root, "train") is not None or _coco_ann(root, "val") is not None:
        return "coco"
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return "voc"
    if read_data_yaml(root)[0] is not None or ((root / "images").is_dir() and (root / "labels").is_dir()):
        return "yolo"
    if voc_folders(root) is not None:  # the other VOC-style layouts
        return "voc"
    raise DataError(
        f"{root}: not a dataset layout DenseDet recognises. Expected one of\n"
        "  COCO: annotations/instances_train*.json (+ instances_val*.json) and images in train2017/ val2017/ or "
        "images/\n  Pascal VOC: Annotations/*.xml, JPEGImages/, ImageSets/Main/{train,val}.txt (or annotations/*.xml "
        "+ images/, or XMLs beside their images in train/ + valid/ or in the folder itself)\n"
        "  YOLO: data.yaml (names: [...]), images/{train,val}/, labels/{train,val}/")


def _fingerprint(paths: list[Path], extra: Any = None) -> str:
    h = hashlib.sha1(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_dir_for(root: Path) -> Path:
    """``$DENSEDET_HOME/datasets/<folder name>-<8 hex of the absolute path>``."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:8]
    return densedet_home() / "datasets" / f"{root.resolve().name or 'dataset'}-{digest}"


def split_holdout(coco: dict[str, Any], every: int = HOLDOUT_EVERY) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a COCO dict by image order: every ``every``-th image (index ``every-1``, ``2*every-1``, ...) -> val."""
    val_ids = {img["id"] for k, img in enumerate(coco["images"]) if k % every == every - 1}

    def part(keep_val: bool) -> dict[str, Any]:
        return {**coco, "images": [i for i in coco["images"] if (i["id"] in val_ids) == keep_val],
                "annotations": [a for a in coco.get("annotations", []) if (a["image_id"] in val_ids) == keep_val]}

    return part(False), part(True)


def _coco_classes(ann: Path) -> list[str]:
    cats = load_coco_json(ann, require_annotations=False)["categories"]
    try:
        return [str(c["name"]) for c in sorted(cats, key=lambda c: c["id"])]
    except (KeyError, TypeError) as e:
        raise DataError(f"{ann}: every category needs an 'id' and a 'name'") from e


def _coco_img_dir(root: Path, split: str) -> Path:
    for cand in (root / f"{split}2017", root / split, root / "images" / f"{split}2017", root / "images" / split,
                 root / "images"):
        if cand.is_dir():
            return cand
    raise DataError(f"{root}: no image folder for the {split} split (looked for {split}2017/, {split}/, "
                    f"images/{split}2017/, images/{split}/, images/)")


def _prepare_coco(root: Path, ds: PreparedDataset, out: Path) -> None:
    anns = {s: _coco_ann(root, s) for s in _SPLITS}
    if anns["train"] is None:
        raise DataError(f"{root}: no annotations/instances_train*.json (only {anns['val']})")
    ds.classes = _coco_classes(anns["train"])
    if anns["val"] is not None:
        val_classes = _coco_classes(anns["val"])
        if val_classes != ds.classes:
            raise DataError(f"{anns['val']}: categories {val_classes} differ from those of {anns['train']} "
                            f"{ds.classes}")
        for s in _SPLITS:
            ds.splits[s] = SplitFiles(anns[s], _coco_img_dir(root, s))
        return
    img_dir = _coco_img_dir(root, "train")
    key = _fingerprint([anns["train"]], "coco-holdout")
    paths = _cached(out, key, lambda: dict(zip(_SPLITS, split_holdout(load_coco_json(anns["train"])))))
    ds.splits = {s: SplitFiles(paths[s], img_dir) for s in _SPLITS}
    ds.notes.append(f"no instances_val*.json: every {HOLDOUT_EVERY}th training image is held out for validation")


def _cached(cache: Path, key: str, build: Any, log: ProblemLog | None = None) -> dict[str, Path]:
    """The split json files in ``cache``, rebuilt by ``build() -> {split: coco dict}`` when ``key`` changed.

    The problems ``log`` collected while building are stored next to them, so a cached conversion warns again.
    """
    stamp, problems = cache / "fingerprint.txt", cache / "problems.json"
    paths = {s: cache / f"instances_{s}.json" for s in _SPLITS}
    if stamp.is_file() and stamp.read_text().strip() == key and all(p.is_file() for p in paths.values()):
        if log is not None and problems.is_file():
            saved = json.loads(problems.read_text())
            log.counts, log.examples = saved["counts"], saved["examples"]
        return paths
    ensure_writable_dir(cache, "the folder for the converted COCO json",
                        "Set DENSEDET_HOME to a writable folder (DenseDet converts VOC / YOLO annotations into "
                        "$DENSEDET_HOME/datasets), or convert once with `densedet data convert --out DIR` into a "
                        "writable DIR")
    for s, coco in build().items():
        atomic_write_json(paths[s], coco)
    if log is not None:
        atomic_write_json(problems, {"counts": log.counts, "examples": log.examples})
    atomic_write_text(stamp, key + "\n")
    return paths


def _prepare_voc(root: Path, ds: PreparedDataset, out: Path) -> None:
    folders = voc_folders(root)
    assert folders is not None  # detect_layout said 'voc'
    devkit = folders.get("all") == (root / "Annotations", root / "JPEGImages")
    ids: dict[str, list[str] | None] = {s: None for s in _SPLITS}
    if devkit:
        ids = {s: voc_split_ids(root, s) for s in _SPLITS}
        if ids["train"] is None and ids["val"] is None:
            ids = {"train": voc_split_ids(root, "trainval"), "val": voc_split_ids(root, "test")}
    ann_dirs = sorted({a for a, _ in folders.values()})
    xmls = [p for d in ann_dirs for p in d.glob("*.xml")]
    extra_files = [p for p in (root / "ImageSets" / "Main").glob("*.txt")] if devkit and (
        root / "ImageSets").is_dir() else []
    extra_files += [p for p in (root / "classes.txt", root / "labels.txt") if p.is_file()]
    images = sorted(str(p.relative_to(root)) for _, d in folders.values() for p in d.iterdir()
                    if p.suffix.lower() in IMAGE_EXTS)
    key = _fingerprint(xmls + extra_files, ["voc", images, {k: [str(a), str(b)] for k, (a, b) in folders.items()}])
    ds.classes = voc_classes(root, ann_dirs=ann_dirs)
    log = ProblemLog(str(root))
    split_dirs = {s: folders.get(s, folders.get("all")) for s in _SPLITS}
    whole = "all" in folders and (ids["train"] is None or ids["val"] is None)  # one folder, no lists: hold out

    def build() -> dict[str, Any]:
        if not whole and split_dirs["val"] is not None:  # ImageSets lists, or train/ + valid/ folders
            return {s: voc_to_coco(root, ids[s], ds.classes, log, ann_dir=split_dirs[s][0], img_dir=split_dirs[s][1])
                    for s in _SPLITS}
        ann_dir, img_dir = split_dirs["train"]
        coco = voc_to_coco(root, ids["train"] or ids["val"], ds.classes, log, ann_dir=ann_dir, img_dir=img_dir)
        return dict(zip(_SPLITS, split_holdout(coco)))

    paths = _cached(out, key, build, log)
    log.warn()
    ds.problems = dict(log.counts)
    if whole or split_dirs["val"] is None:
        why = "no ImageSets/Main train+val lists" if devkit else ("no val/ or valid/ folder" if "train" in folders
                                                                  else "one folder of annotations")
        ds.notes.append(f"{why}: every {HOLDOUT_EVERY}th image is held out for validation")
    if not devkit:
        ds.notes.append("VOC XML files read from " + ", ".join(
            f"{s}: {split_dirs[s][0].relative_to(root).as_posix() or '.'}/" for s in _SPLITS
            if split_dirs[s] is not None))
    ds.splits = {s: SplitFiles(paths[s], (split_dirs[s] or split_dirs["train"])[1]) for s in _SPLITS}


def _unused_own_image(root: Path, used: list[Path]) -> Path | None:
    """An image file under ``root`` that none of the ``used`` folders holds (the first found, walking in sorted
    order without following symlinks), or None."""
    used_real = {os.path.realpath(d) for d in used}
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if os.path.realpath(os.path.join(folder, d)) not in used_real
                            and not d.startswith("."))
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_EXTS:
                return Path(folder) / name
    return None


def _report_outside_folders(root: Path, dirs: dict[str, list[Path]]) -> None:
    """``data.yaml`` led outside ``root``: log each split's folders actually read, and warn when ``root``'s own
    images go unused (both deliberate: Ultralytics follows a dataset yaml anywhere)."""
    yaml_file = read_data_yaml(root)[0]
    outside = {s: [d for d in ds if not d.is_relative_to(root)] for s, ds in dirs.items()}
    if not any(outside.values()):
        return
    for split, ds in dirs.items():
        if outside[split]:
            logger.warning("%s leads outside %s: reading the %s images from %s (labels from %s)", yaml_file, root,
                           split, ", ".join(map(str, ds)), ", ".join(str(label_dir_for(d)) for d in ds))
    stray = _unused_own_image(root, dirs["train"] + dirs["val"])
    if stray is not None:
        read = "; ".join(f"{s}: {', '.join(map(str, ds))}" for s, ds in dirs.items() if ds)
        warnings.warn(f"{root} holds images that are not used (e.g. {stray.relative_to(root)}): {yaml_file} sends "
                      f"the splits to folders outside it ({read}). Edit its 'path' / 'train' / 'val' if the "
                      f"folder's own images are meant", DataWarning, stacklevel=3)


def _prepare_yolo(root: Path, ds: PreparedDataset, out: Path) -> None:
    ds.classes = yolo_classes(root)
    dirs = {s: yolo_split_dirs(root, s) for s in _SPLITS}
    if not dirs["train"]:
        raise DataError(f"{root}: no training images (data.yaml 'train', or images/train/)")
    _report_outside_folders(root, dirs)
    all_dirs = dirs["train"] + dirs["val"]
    # file_name entries are relative to the deepest folder holding every image folder
    common = Path(os.path.commonpath([str(d) for d in all_dirs]))
    files: list[Path] = []
    for d in all_dirs:
        files += [p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTS]
        lbl = label_dir_for(d)
        if lbl.is_dir():
            files += list(lbl.rglob("*.txt"))
    key = _fingerprint(files, ["yolo", ds.classes, [str(d) for d in all_dirs]])
    log = ProblemLog(str(root))

    def build() -> dict[str, Any]:
        if dirs["val"]:
            return {s: yolo_to_coco(dirs[s], ds.classes, log, common) for s in _SPLITS}
        return dict(zip(_SPLITS, split_holdout(yolo_to_coco(dirs["train"], ds.classes, log, common))))

    paths = _cached(out, key, build, log)
    log.warn()
    ds.problems = dict(log.counts)
    if not dirs["val"]:
        ds.notes.append(f"no val images: every {HOLDOUT_EVERY}th training image is held out for validation")
    ds.splits = {s: SplitFiles(paths[s], common) for s in _SPLITS}


def prepare_dataset(root: str | Path, out_dir: str | Path | None = None, expect: str | None = None
                    ) -> PreparedDataset:
    """Detect the layout of ``root`` and return COCO json + image folder for its train and val splits.

    ``out_dir``: where converted json goes (default: the DenseDet cache, :func:`cache_dir_for`); it must not be
    inside ``root``. ``expect``: the layout the caller requires ('coco' | 'voc' | 'yolo').
    """
    root = Path(root).expanduser().resolve()
    kind = detect_layout(root)
    if expect is not None and kind != expect:
        raise DataError(f"{root}: expected a {expect.upper()} layout, found a {kind.upper()} one")
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else cache_dir_for(root)
    if out.is_relative_to(root):
        raise DataError(f"{out}: the converted json must not be written inside the dataset folder {root}")
    ds = PreparedDataset(kind, root, [])
    {"coco": _prepare_coco, "voc": _prepare_voc, "yolo": _prepare_yolo}[kind](root, ds, out)
    for note in ds.notes:
        logger.info("%s: %s", root, note)
    return ds
