"""Decode an image file into the ``(H, W, 3)`` uint8 RGB array every DenseDet pipeline starts from.

One function for the dataset and the predictor, so both see the same pixels: EXIF orientation applied, palette /
grey / alpha / CMYK images converted to RGB, and high-bit-depth images *scaled* to 8 bits. PIL's own
``convert("RGB")`` clips a 16-bit grey PNG (mode ``I;16``) at 255, which turns most of the image white; here a
16-bit value ``v`` becomes ``round(v / 257)`` (65535 -> 255), the same mapping PIL uses for 16-bit RGB PNGs, which
it already reads as 8-bit RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from densedet.errors import DataError

__all__ = ["decode_image", "read_image", "to_rgb8"]

# Everything PIL raises for a file that is not a (complete) image of a format it knows.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

_16BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(im: Image.Image) -> np.ndarray:
    """A PIL image -> ``(H, W, 3)`` uint8 RGB, scaling 16-bit / 32-bit integer and float images to 0..255."""
    if im.mode in _16BIT_MODES or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        # mode I (32-bit) holds 16-bit PNGs on some Pillow versions; wider data is scaled by its own maximum.
        top = 65535.0 if a.size == 0 or a.max() <= 65535 else float(a.max())
        grey = np.rint(a.clip(0, None) * (255.0 / top)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        top = 1.0 if a.size == 0 or a.max() <= 1.0 else 255.0  # float images are 0..1 or 0..255
        grey = np.rint(a.clip(0, top) * (255.0 / top)).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def decode_image(path: str | Path, what: str = "") -> np.ndarray:
    """Read ``path`` -> ``(H, W, 3)`` uint8 RGB, EXIF orientation applied.

    Raises :class:`~densedet.errors.DataError` naming the file (and ``what``, e.g. ``"image id 7"``) when it is
    missing or cannot be decoded.
    """
    where = f" ({what})" if what else ""
    try:
        with Image.open(path) as im:
            return to_rgb8(ImageOps.exif_transpose(im))
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}{where}") from e
    except DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {path}{where}: {e}") from e


def read_image(image: str | Path | Image.Image | Any) -> np.ndarray:
    """Any supported input -> (H, W, 3) uint8 RGB array in the frame the user sees.

    A path and a PIL image are turned upright by their EXIF orientation tag (``ImageOps.exif_transpose``, as image
    viewers and :class:`~densedet.data.CocoDataset` do), so the same photo gives the same array either way; the
    caller's PIL image is not modified. A numpy array (or anything ``np.asarray`` takes, e.g. a CPU tensor) carries
    no EXIF and is taken as-is: it must already be upright, ``(H, W, 3)`` uint8 RGB.
    """
    if isinstance(image, (str, Path)):
        return decode_image(image)  # the dataset's decoder: same pixels (16-bit scaled, EXIF applied)
    if isinstance(image, Image.Image):
        return to_rgb8(ImageOps.exif_transpose(image))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise DataError(f"an image array must be (H, W, 3) uint8 RGB, got {arr.shape} {arr.dtype}")
    return arr
