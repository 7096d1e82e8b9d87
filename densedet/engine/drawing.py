"""Draw detections (and optionally ground truth) on images with PIL; tile drawn images into a grid.

Pure PIL + numpy (no model, no torch import): `densedet predict`, `densedet.draw_detections` and the trainer's
experiment trackers (validation images in TensorBoard / MLflow) draw with it. Re-exported as
:mod:`densedet.inference.visualize`."""

from __future__ import annotations

import colorsys
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from densedet.io import atomic_write

__all__ = ["class_color", "draw_detections", "save_detection_grid"]

_GOLDEN = 0.618033988749895


def class_color(label: int) -> tuple[int, int, int]:
    """Fixed RGB colour of a class: hues stepped by the golden ratio, so neighbouring labels differ strongly and
    any number of classes gets distinct colours; saturation/value alternate to separate hues that come close."""
    hue = (label * _GOLDEN) % 1.0
    sat = 0.85 if label % 2 == 0 else 0.65
    val = 0.95 if (label // 2) % 2 == 0 else 0.8
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return round(r * 255), round(g * 255), round(b * 255)


def _as_array(x: Any, name: str, cols: int | None) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if cols is None:
        return a.reshape(-1)
    if a.size == 0:
        return a.reshape(0, cols)
    if a.ndim != 2 or a.shape[1] != cols:
        raise ValueError(f"draw_detections: {name} must have shape (K, {cols}), got {tuple(a.shape)}")
    return a


def _to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")  # convert() always returns a copy: the caller's image is never drawn on
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"draw_detections: expected an (H, W, 3) uint8 RGB array, got {arr.shape} {arr.dtype}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable default font (Pillow >= 10.1 with FreeType)
    except TypeError:  # older Pillow: fixed-size bitmap default font
        return ImageFont.load_default()


def _dashed_rectangle(draw: ImageDraw.ImageDraw, box: Sequence[float], width: int, dash: int) -> None:
    """Rectangle outline of alternating white and black dashes: visible on any background and class colour."""
    x1, y1, x2, y2 = box
    corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)]
    for (ax, ay), (bx, by) in itertools.pairwise(corners):
        length = math.hypot(bx - ax, by - ay)
        n = max(1, math.ceil(length / dash))
        for i in range(n):
            t0, t1 = i / n, (i + 1) / n
            color = (255, 255, 255) if i % 2 == 0 else (0, 0, 0)
            draw.line(
                [(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                fill=color,
                width=width,
            )


def _draw_masks(img: Image.Image, masks: Any, indices: np.ndarray, labels: np.ndarray) -> Image.Image:
    """Blend each selected instance's mask (from its box crop only) into ``img`` and outline it."""
    if (masks.height, masks.width) != (img.height, img.width):
        raise ValueError(f"draw_detections: masks are {masks.width}x{masks.height}, the image {img.width}x{img.height}")
    arr = np.asarray(img).copy()
    for i, label in zip(indices.tolist(), labels.tolist()):
        c = masks.crop_of(int(i))
        h, w = c.bits.shape
        if h == 0 or w == 0:
            continue
        on = c.bits.astype(bool)
        region = arr[c.y0:c.y0 + h, c.x0:c.x0 + w]
        color = np.asarray(class_color(int(label)), dtype=np.float32)
        region[on] = (0.5 * region[on] + 0.5 * color).astype(np.uint8)
        padded = np.pad(on, 1)  # a mask pixel with a background 4-neighbour is on the outline
        inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        region[on & ~inner] = color.astype(np.uint8)
    return Image.fromarray(arr)


def draw_detections(
    image: Image.Image | np.ndarray,
    boxes: Any,
    scores: Any,
    labels: Any,
    class_names: Sequence[str],
    score_thr: float = 0.3,
    gt_boxes: Any | None = None,
    display_side: int | None = None,
    masks: Any | None = None,
) -> Image.Image:
    """Draw detections with class-coloured boxes and ``"name 0.87"`` labels on a copy of ``image``.

    Args:
        image: PIL image or (H, W, 3) uint8 RGB array; never modified.
        boxes: (K, 4) xyxy in pixels of ``image``; tensor or array.
        scores: (K,) confidences; only boxes with ``score > score_thr`` are drawn (mmdet ``imshow_det_bboxes``).
        labels: (K,) contiguous class indices into ``class_names``.
        class_names: names of the classes.
        score_thr: display threshold.
        gt_boxes: optional (N, 4) xyxy ground-truth boxes, drawn thin and dashed white/black.
        display_side: if set, the image is first resized (bilinear) so that its longer side has this many pixels
            and the boxes are scaled with it: a small image is enlarged before drawing, so its labels get a
            readable size instead of being drawn at 10 px on a thumbnail (the overview grid of ``densedet
            predict`` draws every tile so).
        masks: optional :class:`~densedet.structures.masks.InstanceMasks` aligned with ``boxes``: each drawn instance's
            mask gets a translucent fill (50 %) and a one-pixel outline in its class colour.

    Returns:
        A new RGB PIL image (``display_side`` on its longer side when given). Outline width and font size scale
        with the image size; higher-scoring boxes are drawn last (on top).
    """
    img = _to_pil(image)
    b = _as_array(boxes, "boxes", 4)
    s = _as_array(scores, "scores", None)
    lab = _as_array(labels, "labels", None).astype(np.int64)
    if not (len(b) == len(s) == len(lab)):
        raise ValueError(f"draw_detections: {len(b)} boxes, {len(s)} scores and {len(lab)} labels differ in length")
    bad = (lab < 0) | (lab >= len(class_names))
    if bad.any():
        raise ValueError(
            f"draw_detections: labels {sorted(set(lab[bad].tolist()))} out of range for {len(class_names)} classes"
        )
    keep = s > score_thr
    order = np.argsort(s[keep], kind="stable")  # ascending: the most confident box ends on top
    if masks is not None:  # in the image's own pixels, before any display resize
        if len(masks) != len(keep):
            raise ValueError(f"draw_detections: {len(masks)} masks for {len(keep)} boxes")
        img = _draw_masks(img, masks, np.flatnonzero(keep)[order], lab[keep][order])
    scale = 1.0
    if display_side is not None:
        if display_side < 1:
            raise ValueError(f"draw_detections: display_side must be >= 1, got {display_side}")
        scale = display_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
        b = b * scale
    b, s, lab = b[keep][order], s[keep][order], lab[keep][order]

    w_img, h_img = img.size
    short = min(w_img, h_img)
    width = max(1, round(short / 250))
    font = _font(max(10, round(short / 40)))
    draw = ImageDraw.Draw(img)

    if gt_boxes is not None:
        gt = _as_array(gt_boxes, "gt_boxes", 4) * scale
        for box in gt.tolist():
            x1, x2 = sorted((box[0], box[2]))
            y1, y2 = sorted((box[1], box[3]))
            _dashed_rectangle(draw, (x1, y1, x2, y2), width=max(1, width // 2), dash=max(4, 3 * width))

    for box, score, label in zip(b.tolist(), s.tolist(), lab.tolist()):
        x1, x2 = sorted((box[0], box[2]))  # tolerate flipped corners rather than let PIL raise mid-drawing
        y1, y2 = sorted((box[1], box[3]))
        color = class_color(label)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        text = f"{class_names[label]} {score:.2f}"
        tx1, ty1, tx2, ty2 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx2 - tx1, ty2 - ty1
        pad = max(1, width)
        # Label above the box when it fits, otherwise just inside its top edge.
        top = y1 - th - 2 * pad if y1 - th - 2 * pad >= 0 else y1
        left = min(max(x1, 0), max(0, w_img - tw - 2 * pad))
        draw.rectangle((left, top, left + tw + 2 * pad, top + th + 2 * pad), fill=color)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text(
            (left + pad - tx1, top + pad - ty1), text, font=font, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255)
        )
    return img


def save_detection_grid(
    images: Sequence[Image.Image], out_png: str | Path, ncols: int = 4, background: tuple[int, int, int] = (32, 32, 32)
) -> Path:
    """Tile images row-major into one PNG; each cell is as large as the largest image, images centred in it.

    Returns:
        ``out_png`` as a Path (written atomically).
    """
    if not images:
        raise ValueError("save_detection_grid: no images to tile")
    if ncols < 1:
        raise ValueError(f"save_detection_grid: ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    cell_w = max(im.width for im in images)
    cell_h = max(im.height for im in images)
    gap = 4
    grid = Image.new("RGB", (ncols * cell_w + (ncols - 1) * gap, nrows * cell_h + (nrows - 1) * gap), color=background)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        x = c * (cell_w + gap) + (cell_w - im.width) // 2
        y = r * (cell_h + gap) + (cell_h - im.height) // 2
        grid.paste(im.convert("RGB"), (x, y))
    return atomic_write(out_png, lambda tmp: grid.save(tmp, format="PNG"))
