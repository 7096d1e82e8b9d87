"""``densedet data check PATH [--config NAME]``: dataset statistics and what training would assign.

Statistics (from the annotations, no image decoding): images and boxes per class, images without boxes, duplicate
boxes (same class, IoU >= 0.9 in one image), duplicate image files (same bytes), boxes fixed or dropped at load
(outside / partly outside the image, degenerate), and the box size (``sqrt(w * h)``) in original pixels, at the
training scale and relative to the image.

Assignment (with ``--config``): every training image is resized as the config's training ``Resize`` would
(its single scale; with a multi-scale range, the test scale) and padded to ``size_divisor``; the head of the
config then assigns its own priors to the boxes with the assigner training uses (max-IoU for RetinaNet, ATSS for
ATSS / UMOP / VFNet, FCOS ranges, FoveaBox scale ranges, RepPoints' init-stage point assigner). Counted: positives
per pyramid level and per image, and the objects that get no positive at all, each with a reason:

* ``too small``: its size is below the smallest prior the head has (anchors: the smallest anchor side
  ``octave_base_scale * stride_P3``; FCOS: a P3 stride cell; FoveaBox: the lowest scale range);
* ``too large``: above the largest prior (anchors: the largest anchor side; FoveaBox: the highest scale range);
* ``no prior centre inside``: no location of any level falls inside the box (ATSS and FCOS need one);
* ``outranked``: it had candidates but the assigner's threshold or a competing object took them.

When levels get no positives or more than 10% of the objects are lost, it suggests an ``octave_base_scale`` (anchor
heads: the scale whose anchors' geometric mid-size matches the objects' geometric mid-size), ``regress_ranges``
(FCOS / VFNet: the objects' max-half-side quintiles) or an ``--img-size`` that moves the objects into the priors'
range.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from densedet.config import load_config
from densedet.config.own_data import pipeline_scales
from densedet.data.coco import CocoDataset
from densedet.data.formats import prepare_dataset
from densedet.data.formats.common import PROBLEM_TEXT
from densedet.data.transforms import Resize
from densedet.inference.loading import load_detector
from densedet.io import atomic_write
from densedet.structures.boxes import pad_targets

__all__ = ["AssignmentReport", "DatasetStats", "assign_gt", "assignment_report", "data_check", "dataset_stats",
           "format_report", "plot_report", "prior_size_range", "train_scale"]

REASONS = ("too small", "too large", "no prior centre inside", "outranked")
_LOST_FRACTION = 0.1  # suggest changes when more than this fraction of objects gets no positive


@dataclass
class DatasetStats:
    """Annotation statistics of one split; sizes are ``sqrt(w * h)`` of the kept (non-ignore) boxes."""

    split: str
    classes: list[str]
    num_images: int
    boxes_per_class: list[int]
    images_per_class: list[int]
    images_without_boxes: int
    ignore_boxes: int
    duplicate_boxes: int
    load_fixes: dict[str, int]
    duplicate_images: int
    sizes: np.ndarray
    train_sizes: np.ndarray | None = None
    relative_sizes: np.ndarray | None = None  # sqrt(w h / (W H)): box size relative to the resized image


@dataclass
class AssignmentReport:
    """What the config's head assigns on the training images (see the module docstring)."""

    head: str
    scale: tuple[int, int]
    num_images: int
    num_objects: int
    pos_per_level: list[int]
    objects_per_level: list[int]
    pos_per_image: np.ndarray
    lost: Counter = field(default_factory=Counter)
    prior_range: tuple[float, float] = (0.0, math.inf)
    suggestions: list[str] = field(default_factory=list)
    level_names: list[str] = field(default_factory=list)  # "P3".. by stride (an RPN's first level is P2)


# ---------------------------------------------------------------------------------------------------- statistics
def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def _duplicate_files(paths: list[Path]) -> int:
    """How many files repeat an earlier one byte for byte (hashing only files that share a size)."""
    by_size: dict[int, list[Path]] = {}
    for p in paths:
        if p.is_file():
            by_size.setdefault(p.stat().st_size, []).append(p)
    dup = 0
    for group in by_size.values():
        if len(group) > 1:
            digests = [hashlib.sha1(p.read_bytes()).hexdigest() for p in group]
            dup += len(digests) - len(set(digests))
    return dup


def dataset_stats(dataset: Any, split: str, scale: tuple[int, int] | None = None) -> DatasetStats:
    """Statistics of a :class:`~densedet.data.CocoDataset` (loaded with ``filter_empty_gt=False``)."""
    c = len(dataset.classes)
    boxes_per_class, images_per_class = [0] * c, [0] * c
    sizes, train_sizes, relative = [], [], []
    empty = dup = ignore = 0
    for i, info in enumerate(dataset.img_infos):
        ann = dataset.get_ann_info(i)
        b, lab = ann["boxes"], ann["labels"]
        ignore += len(ann["ignore_boxes"])
        if len(b) == 0:
            empty += 1
            continue
        for k in np.unique(lab):
            images_per_class[int(k)] += 1
        for k in lab:
            boxes_per_class[int(k)] += 1
        iou = _box_iou(b, b)
        same = (lab[:, None] == lab[None]) & (iou >= 0.9)
        dup += int(np.triu(same, 1).any(0).sum())
        s = np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
        sizes.append(s)
        relative.append(s / math.sqrt(info["width"] * info["height"]))
        if scale is not None:
            w, h = info["width"], info["height"]
            nw, nh = Resize.rescale_size(w, h, scale)
            train_sizes.append(s * math.sqrt(nw / w * nh / h))
    fixes = {k: v for k, v in getattr(dataset, "skipped_counts", {}).items() if k != "unselected_category"}
    dup_images = _duplicate_files([Path(dataset.img_dir) / info["file_name"] for info in dataset.img_infos])
    return DatasetStats(split, list(dataset.classes), len(dataset.img_infos), boxes_per_class, images_per_class,
                        empty, ignore, dup, fixes, dup_images, np.concatenate(sizes) if sizes else np.zeros(0),
                        (np.concatenate(train_sizes) if train_sizes else np.zeros(0)) if scale is not None else None,
                        np.concatenate(relative) if relative else np.zeros(0))


def train_scale(cfg: Any) -> tuple[tuple[int, int], str]:
    """The ``(long, short)`` scale the analysis resizes to, and where it came from."""
    raw = {"data": {s: {"pipeline": getattr(cfg.data, s).pipeline} for s in ("train", "val")}}
    for split in ("train", "val"):
        for scales in pipeline_scales(raw, split):
            if len(scales) == 1:
                w, h = scales[0]
                return (int(w), int(h)), f"data.{split}.pipeline"
    raise ValueError("the config's pipelines have no single Resize scale")


# ---------------------------------------------------------------------------------------------------- assignment
def prior_size_range(head: Any) -> tuple[float, float]:
    """Smallest and largest object size (``sqrt(w h)``, input pixels) the head's priors are made for
    (:meth:`~densedet.models.heads.DenseHead.prior_size_range`)."""
    return head.prior_size_range()


@torch.no_grad()
def assign_gt(head: Any, sizes: list[tuple[int, int]], targets: list[dict[str, torch.Tensor]],
              metas: list[dict[str, Any]]) -> tuple[torch.Tensor, list[int]]:
    """The head's own training assignment (:meth:`~densedet.models.heads.DenseHead.assign_priors`): ``gt_inds``
    (B, N) (``>= 0`` positive for that gt, else negative or ignored) over its priors of all levels, and the priors
    per level."""
    return head.assign_priors(sizes, pad_targets(targets, device=torch.device("cpu")), metas)


def _centre_inside(box: np.ndarray, strides: list[int]) -> bool:
    """Whether a location of any level (centres at ``(i + 0.5) * stride``, mmdet's offset for anchors at their
    centre and points) lies strictly inside ``box``."""
    x1, y1, x2, y2 = box
    for s in strides:
        kx = math.floor(x2 / s - 0.5 - 1e-9) - math.ceil(x1 / s - 0.5 + 1e-9)
        ky = math.floor(y2 / s - 0.5 - 1e-9) - math.ceil(y1 / s - 0.5 + 1e-9)
        if kx >= 0 and ky >= 0:
            return True
    return False


def assignment_report(head: Any, dataset: Any, scale: tuple[int, int], size_divisor: int = 32,
                      max_images: int = 2000) -> AssignmentReport:
    """Run the head's assignment on (at most ``max_images``, evenly spaced) training images at ``scale``."""
    n = len(dataset.img_infos)
    idx = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int)) if n else np.zeros(0, int)
    strides = [int(s if isinstance(s, (int, float)) else s[0]) for s in head.strides]
    lo, hi = prior_size_range(head)
    num_levels = len(strides)
    pos_lvl, obj_lvl = [0] * num_levels, [0] * num_levels
    pos_img, lost, total = [], Counter(), 0
    for i in idx:
        info, ann = dataset.img_infos[i], dataset.get_ann_info(int(i))
        w, h = info["width"], info["height"]
        nw, nh = Resize.rescale_size(w, h, scale)
        f = np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
        boxes = ann["boxes"] * f
        ph, pw = (math.ceil(nh / size_divisor) * size_divisor, math.ceil(nw / size_divisor) * size_divisor)
        sizes = [(math.ceil(ph / s), math.ceil(pw / s)) for s in strides]
        meta = {"img_shape": (nh, nw), "pad_shape": (ph, pw)}
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(ann["labels"]),
                  "ignore_boxes": torch.from_numpy(ann["ignore_boxes"] * f)}
        gt_inds, per_level = assign_gt(head, sizes, [target], [meta])
        gi = gt_inds[0]
        level = torch.repeat_interleave(torch.arange(num_levels), torch.tensor(per_level))
        pos = gi >= 0
        pos_img.append(int(pos.sum()))
        for lvl in range(num_levels):
            sel = pos & (level == lvl)
            pos_lvl[lvl] += int(sel.sum())
            obj_lvl[lvl] += int(torch.unique(gi[sel]).numel())
        got = set(torch.unique(gi[pos]).tolist())
        total += len(boxes)
        for k, b in enumerate(boxes):
            if k in got:
                continue
            size = math.sqrt(max(float((b[2] - b[0]) * (b[3] - b[1])), 0.0))
            if size < lo:
                lost["too small"] += 1
            elif size > hi:
                lost["too large"] += 1
            elif not _centre_inside(b, strides):
                lost["no prior centre inside"] += 1
            else:
                lost["outranked"] += 1
    return AssignmentReport(type(head).__name__, scale, len(idx), total, pos_lvl, obj_lvl, np.array(pos_img),
                            lost, (lo, hi), level_names=[f"P{round(math.log2(s))}" for s in strides])


def suggest(report: AssignmentReport, head: Any, sizes: np.ndarray) -> list[str]:
    """Config changes that move the objects into the priors' range (see the module docstring)."""
    out: list[str] = []
    empty = [name for name, p in zip(report.level_names, report.pos_per_level) if p == 0]
    lost = sum(report.lost.values())
    if not (empty or (report.num_objects and lost > _LOST_FRACTION * report.num_objects)) or sizes.size == 0:
        return out
    q05, q95 = np.percentile(sizes, [5, 95])
    obj_mid = math.sqrt(max(q05, 1e-6) * q95)
    lo, hi = report.prior_range
    gen = getattr(head, "anchor_generator", None)
    if gen is not None and getattr(head, "use_atss", True) and gen.octave_base_scale:
        prior_mid = math.sqrt(lo * hi)
        base = gen.octave_base_scale * obj_mid / prior_mid
        out.append(f"model.bbox_head.anchor_generator.octave_base_scale={max(1, round(base))} (now "
                   f"{gen.octave_base_scale}: anchors {lo:.0f}-{hi:.0f} px, objects {q05:.0f}-{q95:.0f} px "
                   f"(5th-95th percentile) at this scale)")
    elif hasattr(head, "regress_ranges"):
        # FCOS ranges bound max(l, t, r, b) at a location, about half the longer side for a centred point
        qs = [round(float(v)) for v in np.percentile(sizes / 2 * 1.2, [20, 40, 60, 80])]
        ranges = [[-1, qs[0]]] + [[a, b] for a, b in zip(qs, qs[1:])] + [[qs[-1], 100000000]]
        out.append(f"model.bbox_head.regress_ranges='{ranges}' (objects' half-size quintiles at this scale)")
    if math.isfinite(lo) and math.isfinite(hi):
        factor = math.sqrt(lo * hi) / obj_mid
        long, short = report.scale
        out.append(f"--img-size {max(32, round(long * factor))}x{max(32, round(short * factor))} (x{factor:.2f}: "
                   f"objects' mid-size {obj_mid:.0f} px onto the priors' mid-size {math.sqrt(lo * hi):.0f} px)")
    if empty:
        out.insert(0, f"levels without any positive: {', '.join(empty)}")
    return out


# ---------------------------------------------------------------------------------------------------- output
def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), "  ".join("-" * w for w in widths)] + [fmt.format(*r) for r in rows])


def _hist_rows(sizes: np.ndarray) -> list[list[str]]:
    edges = [0, 8, 16, 32, 64, 128, 256, 512, math.inf]
    counts = np.histogram(sizes, bins=edges)[0] if sizes.size else np.zeros(len(edges) - 1, int)
    return [[f"{a}-{b if math.isfinite(b) else ''} px", str(int(c))] for a, b, c in zip(edges, edges[1:], counts)]


def format_report(stats: list[DatasetStats], report: AssignmentReport | None, notes: list[str]) -> str:
    """The text ``densedet data check`` prints."""
    parts = []
    for st in stats:
        rows = [[n, str(b), str(im)] for n, b, im in zip(st.classes, st.boxes_per_class, st.images_per_class)]
        fixes = ", ".join(f"{v} {k}" for k, v in st.load_fixes.items() if v)
        parts.append(f"{st.split}: {st.num_images} images, {sum(st.boxes_per_class)} boxes, "
                     f"{st.images_without_boxes} images without boxes, {st.ignore_boxes} ignore (crowd/difficult) "
                     f"boxes, {st.duplicate_boxes} duplicate boxes (same class, IoU >= 0.9), "
                     f"{st.duplicate_images} duplicate image files\n"
                     f"boxes fixed or dropped at load: {fixes or 'none'}")
        parts.append(_table(rows, ["class", "boxes", "images"]))
        size_rows = _hist_rows(st.sizes)
        header = ["box size sqrt(wh)", "original"]
        if st.train_sizes is not None:
            header.append("at training scale")
            for r, t in zip(size_rows, _hist_rows(st.train_sizes)):
                r.append(t[1])
        parts.append(_table(size_rows, header))
        if st.relative_sizes is not None:
            edges = [0, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, math.inf]
            counts = np.histogram(st.relative_sizes, bins=edges)[0]
            rows = [[f"{a:.0%}-{'' if not math.isfinite(b) else f'{b:.0%}'}", str(int(c))]
                    for a, b, c in zip(edges, edges[1:], counts)]
            parts.append(_table(rows, ["box size / image size", "boxes"]))
    if report is not None:
        lo, hi = report.prior_range
        parts.append(f"assignment by {report.head} on {report.num_images} training images at scale "
                     f"{report.scale[0]}x{report.scale[1]} (priors for objects of {lo:.0f}-{hi:.0f} px):")
        rows = [[name, str(p), f"{p / max(report.num_images, 1):.1f}", str(o)]
                for name, p, o in zip(report.level_names, report.pos_per_level, report.objects_per_level)]
        parts.append(_table(rows, ["level", "positives", "per image", "objects"]))
        ppi = report.pos_per_image
        lost = sum(report.lost.values())
        parts.append(f"positives per image: mean {ppi.mean() if ppi.size else 0:.1f}, min "
                     f"{ppi.min() if ppi.size else 0}, max {ppi.max() if ppi.size else 0}")
        parts.append(f"objects without any positive: {lost} of {report.num_objects}"
                     + (" (" + ", ".join(f"{report.lost[r]} {r}" for r in REASONS if report.lost[r]) + ")"
                        if lost else ""))
        if report.suggestions:
            parts.append("suggested:\n  " + "\n  ".join(report.suggestions))
    parts += [f"note: {n}" for n in notes]
    return "\n\n".join(parts)


def plot_report(stats: list[DatasetStats], report: AssignmentReport | None, out_png: str | Path) -> Path:
    """Box-size histograms (original and at training scale, with the priors' range) and positives per level."""
    ncols = 2 if report is not None else 1
    fig = Figure(figsize=(6 * ncols, 4))
    axes = np.atleast_1d(fig.subplots(1, ncols))
    ax = axes[0]
    all_sizes = np.concatenate([s.sizes for s in stats]) if stats else np.zeros(0)
    top = max(float(all_sizes.max()) if all_sizes.size else 1.0, 2.0)
    bins = np.logspace(0, math.log10(top * 1.5), 30)
    for st in stats:
        ax.hist(st.sizes, bins=bins, alpha=0.5, label=f"{st.split}: original")
        if st.train_sizes is not None:
            ax.hist(st.train_sizes, bins=bins, histtype="step", linewidth=1.5, label=f"{st.split}: training scale")
    if report is not None:
        lo, hi = report.prior_range
        ax.axvspan(lo, min(hi, bins[-1]), color="grey", alpha=0.15, label="priors' range")
    ax.set(xscale="log", xlabel="box size sqrt(w h) [px]", ylabel="boxes", title="box sizes")
    ax.legend(fontsize=7)
    if report is not None:
        ax2 = axes[1]
        names = report.level_names
        ax2.bar(names, report.pos_per_level, color="C2")
        for x, v in enumerate(report.pos_per_level):
            ax2.text(x, v, str(v), ha="center", va="bottom", fontsize=8)
        ax2.set(title=f"positives per level ({report.head}, {report.num_images} images)", ylabel="positives")
    FigureCanvasAgg(fig)
    fig.tight_layout()
    return atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def data_check(path: str | Path, config: str | None = None, img_size: str | None = None,
               out_png: str | Path | None = None, max_images: int = 2000, overrides: list[str] | None = None
               ) -> tuple[str, Path, dict[str, Any]]:
    """Run the checks on the dataset root ``path`` (``config`` + ``key=value`` ``overrides`` for the assignment);
    returns ``(table text, png path, {"dataset", "stats", "assignment"})``."""
    ds = prepare_dataset(path)
    cfg = head = None
    scale = None
    notes = list(ds.notes)
    if ds.problems:
        notes.append(f"{ds.kind.upper()} conversion: " + "; ".join(
            f"{PROBLEM_TEXT[k][0]} {n} {PROBLEM_TEXT[k][1]}" for k, n in ds.problems.items()))
    if config is not None:
        cfg = load_config(config, overrides, data=ds.root, img_size=img_size)
        scale, where = train_scale(cfg)
        notes.append(f"training scale {scale[0]}x{scale[1]} from {where} of {config}")
        model = load_detector(cfg, None, device="cpu", fuse=False, compile=False, precision="fp32", backend="eager")
        head = model.dense_head  # a single-stage detector's head, a two-stage detector's RPN
    stats, datasets = [], {}
    for split, files in ds.splits.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the counts are in the report
            dset = CocoDataset(files.ann_file, files.img_dir, filter_empty_gt=False)
        datasets[split] = dset
        stats.append(dataset_stats(dset, split, scale))
    report = None
    if head is not None:
        report = assignment_report(head, datasets["train"], scale, cfg.data.size_divisor, max_images)
        train_sizes = stats[0].train_sizes if stats[0].train_sizes is not None else np.zeros(0)
        report.suggestions = suggest(report, head, train_sizes)
    text = format_report(stats, report, notes)
    png = plot_report(stats, report, out_png or Path(f"data_check_{ds.root.name}.png"))
    return text, png, {"dataset": ds, "stats": stats, "assignment": report}
