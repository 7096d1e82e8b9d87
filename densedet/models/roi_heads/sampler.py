"""Random positive/negative sampling of assigned priors or proposals, batched and seeded.

MMDetection 2.x ``RandomSampler`` (mmdet/core/bbox/samplers/random_sampler.py): per image, up to
``int(num * pos_fraction)`` positives drawn uniformly without replacement, then ``num - #sampled positives``
negatives (capped at ``neg_pos_ub * max(#pos, 1)`` when ``neg_pos_ub >= 0``). Here a whole padded batch is sampled at
once: every candidate gets a uniform random key and the ``k`` smallest keys among an image's positives (negatives)
win, which is a uniform draw of ``k`` without replacement.

Reproducibility: the keys come from a private ``torch.Generator`` on the CPU seeded from one draw of the global torch
generator (:func:`sampling_generator`). The trainer saves and restores the global generator in its checkpoints, so
a resumed run samples exactly what the uninterrupted run sampled, on any device.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_sample", "sampling_generator"]


def sampling_generator() -> torch.Generator:
    """A CPU generator seeded from the global torch RNG (one 62-bit draw)."""
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    return torch.Generator().manual_seed(seed)


def _smallest_k(candidates: Tensor, keys: Tensor, k: Tensor) -> Tensor:
    """``(B, N)`` bool: per row, the ``k[b]`` candidates with the smallest keys."""
    masked = torch.where(candidates, keys, keys.new_full((), 2.0))  # keys are in [0, 1)
    order = masked.argsort(dim=1)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return candidates & (rank < k[:, None])


def random_sample(pos: Tensor, neg: Tensor, num: int, pos_fraction: float, neg_pos_ub: float = -1,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Sample positives and negatives of a batch.

    Args:
        pos, neg: ``(B, N)`` bool candidates (disjoint; padding and ignored entries in neither).
        num: samples per image; pos_fraction: the share of positives aimed at.
        neg_pos_ub: cap of negatives per sampled positive (``-1``: none).
        generator: CPU generator for the random keys (default: :func:`sampling_generator`).

    Returns:
        ``(pos_sampled, neg_sampled)``, ``(B, N)`` bool.
    """
    if pos.shape[1] == 0:
        return pos.clone(), neg.clone()
    g = generator if generator is not None else sampling_generator()
    keys = torch.rand(pos.shape, generator=g).to(pos.device)
    num_pos = torch.full((pos.shape[0],), int(num * pos_fraction), device=pos.device)
    pos_sel = _smallest_k(pos, keys, num_pos)
    sampled_pos = pos_sel.sum(1)
    num_neg = num - sampled_pos
    if neg_pos_ub >= 0:
        num_neg = torch.minimum(num_neg, (neg_pos_ub * sampled_pos.clamp(min=1)).long())
    # fresh keys for negatives, so that the negative draw does not depend on which entries were positive
    neg_keys = torch.rand(neg.shape, generator=g).to(neg.device)
    return pos_sel, _smallest_k(neg, neg_keys, num_neg)
