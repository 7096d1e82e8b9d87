"""A hand-written COCO uncompressed RLE encoder: the independent expectation of the mask tests."""
from __future__ import annotations

import numpy as np


def uncompressed_rle(full: np.ndarray) -> dict:
    """COCO uncompressed RLE of an (H, W) 0/1 mask: column-major runs, starting with a (possibly empty) zero run."""
    counts, cur, run = [], 0, 0
    for v in full.T.reshape(-1).tolist():
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": list(full.shape), "counts": counts}
