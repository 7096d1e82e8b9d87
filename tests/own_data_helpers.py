"""Write small Pascal VOC and YOLO datasets (from the synthetic COCO set) for the own-data tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from densedet.data.synth import make_synthetic_coco


def _voc_xml(name: str, w: int, h: int, objects: list[tuple[str, list[float], int, int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><truncated>{t}</truncated><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d, t in objects)
    return (f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth>"
            f"</size>{objs}</annotation>")


def synth_as_voc(out: Path, num_train: int = 8, num_val: int = 4, size: int = 96, seed: int = 0) -> Path:
    """A VOC root (Annotations, JPEGImages, ImageSets/Main/{train,val}.txt) holding the synthetic shapes."""
    src = make_synthetic_coco(out.parent / f".{out.name}_src", num_train=num_train, num_val=num_val, size=size,
                              seed=seed)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        coco = json.loads(Path(src[f"{split}_ann_file"]).read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        ids = []
        for img in coco["images"]:
            stem = f"{split}_{Path(img['file_name']).stem}"
            ids.append(stem)
            shutil.copy(Path(src[f"{split}_img_dir"]) / img["file_name"], out / "JPEGImages" / f"{stem}.png")
            objs = [(names[a["category_id"]], [a["bbox"][0] + 1, a["bbox"][1] + 1, a["bbox"][0] + a["bbox"][2] + 1,
                                               a["bbox"][1] + a["bbox"][3] + 1], 0, 0)  # VOC corners are 1-based
                    for a in coco["annotations"] if a["image_id"] == img["id"]]
            (out / "Annotations" / f"{stem}.xml").write_text(
                _voc_xml(f"{stem}.png", img["width"], img["height"], objs))
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    shutil.rmtree(src["root"])
    return out


def synth_as_yolo(out: Path, num_train: int = 8, num_val: int = 4, size: int = 96, seed: int = 0) -> Path:
    """A YOLO root (data.yaml, images/{train,val}, labels/{train,val}) holding the synthetic shapes."""
    src = make_synthetic_coco(out.parent / f".{out.name}_src", num_train=num_train, num_val=num_val, size=size,
                              seed=seed)
    classes = None
    for split in ("train", "val"):
        coco = json.loads(Path(src[f"{split}_ann_file"]).read_text())
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        classes = [c["name"] for c in cats]
        label_of = {c["id"]: i for i, c in enumerate(cats)}
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "labels" / split).mkdir(parents=True, exist_ok=True)
        for img in coco["images"]:
            shutil.copy(Path(src[f"{split}_img_dir"]) / img["file_name"], out / "images" / split / img["file_name"])
            w, h = img["width"], img["height"]
            lines = [f"{label_of[a['category_id']]} {(a['bbox'][0] + a['bbox'][2] / 2) / w:.6f} "
                     f"{(a['bbox'][1] + a['bbox'][3] / 2) / h:.6f} {a['bbox'][2] / w:.6f} {a['bbox'][3] / h:.6f}"
                     for a in coco["annotations"] if a["image_id"] == img["id"]]
            (out / "labels" / split / Path(img["file_name"]).with_suffix(".txt").name).write_text("\n".join(lines))
    (out / "data.yaml").write_text(f"path: .\ntrain: images/train\nval: images/val\nnames: {classes}\n")
    shutil.rmtree(src["root"])
    return out
