"""COCO compressed RLE strings read without trusting them: many strings decoded to their run lengths at once.

A compressed COCO RLE (cocoapi ``common/maskApi.c``, ``rleToString`` / ``rleFrString``) writes each run length as a
LEB128-like group of characters ``48 + v`` holding 5 bits each (low bits first), bit ``0x20`` meaning "more
characters follow" and bit ``0x10`` of the last character the sign; from the fourth count on (index ``m > 2``) the
value is stored as the difference to the count two places earlier. cocoapi decodes such a string without any
check, and decoding a garbage string writes as many pixels as its counts claim: that is how one bad annotation
makes a rasteriser allocate without bound. :func:`rle_string_counts` decodes a whole batch of strings with numpy
(no Python loop per character) so that a loader can reject every string whose runs are not non-negative and do not
add up to ``h * w`` before anything is decoded into pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MAX_GROUP_CHARS", "rle_string_counts", "valid_rle_strings"]

# 12 characters carry 60 bits: more than any run of a real image (< 2**32 pixels) needs; longer groups are garbage
# (and would overflow the 64-bit shift).
MAX_GROUP_CHARS = 12
_COUNT_LIMIT = 1 << 32  # cocoapi stores counts as uint32


def rle_string_counts(data: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode the run lengths of ``n`` compressed COCO RLE strings (cocoapi ``rleFrString``).

    Args:
        data: ``(L,)`` uint8, the strings' ASCII bytes one after the other.
        offsets: ``(n + 1,)`` int64, string ``i`` is ``data[offsets[i]:offsets[i + 1]]``.

    Returns:
        ``counts`` ``(G,)`` int64 (the runs of every string, in order; garbage where a string is malformed),
        ``count_offsets`` ``(n + 1,)`` int64 (string ``i``'s runs are ``counts[count_offsets[i]:count_offsets[i+1]]``)
        and ``well_formed`` ``(n,)`` bool: every character in ``'0'..'o'``, no group longer than
        :data:`MAX_GROUP_CHARS`, the last group terminated, no delta of 2**32 or more. Whether the runs make a mask
        is :func:`valid_rle_strings`' question.
    """
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    ok = np.ones(n, dtype=bool)
    if len(data) == 0:
        return np.zeros(0, np.int64), np.zeros(n + 1, np.int64), ok
    string_of = np.repeat(np.arange(n), lengths)  # (L,) which string each character belongs to
    c = data.astype(np.int64) - 48
    bad_char = (c < 0) | (c > 63)
    ok[string_of[bad_char]] = False
    more = (c & 0x20) != 0
    nonempty = lengths > 0
    last = offsets[1:][nonempty] - 1
    ok[np.flatnonzero(nonempty)[more[last]]] = False  # a group running past the end of its string
    ends = ~more
    ends[last] = True  # a group never spans two strings, even in a malformed one
    group_end = np.flatnonzero(ends)
    group_start = np.concatenate([[0], group_end[:-1] + 1])
    group_len = group_end - group_start + 1
    group_string = string_of[group_start]
    ok[group_string[group_len > MAX_GROUP_CHARS]] = False
    # Value of each group: 5 bits per character, low bits first, sign-extended from bit 0x10 of the last one.
    k = np.arange(len(data)) - np.repeat(group_start, group_len)
    shift = 5 * np.minimum(k, MAX_GROUP_CHARS)
    x = np.add.reduceat((c & 0x1F) << shift, group_start)
    width = 5 * np.minimum(group_len, MAX_GROUP_CHARS)
    negative = (c[group_end] & 0x10) != 0
    x = np.where(negative, x - (np.int64(1) << width), x)
    ok[group_string[np.abs(x) >= _COUNT_LIMIT]] = False
    x = np.where(np.abs(x) >= _COUNT_LIMIT, 0, x)  # keep the sums below from overflowing on garbage
    # Index m of each count inside its string; from m = 3 on, count[m] = x[m] + count[m - 2]: a running sum over
    # the odd indices from 1 and over the even indices from 2 (count[0] stands alone).
    count_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(group_string, minlength=n), out=count_offsets[1:])
    m = np.arange(len(x)) - count_offsets[group_string]
    counts = x.copy()
    chained = np.flatnonzero(m >= 1)
    if chained.size:
        key = group_string[chained] * 2 + (m[chained] & 1)
        perm = np.argsort(key, kind="stable")  # chains contiguous, m ascending inside each
        order, key_sorted = chained[perm], key[perm]
        running = np.cumsum(x[order])
        first = np.concatenate([[True], key_sorted[1:] != key_sorted[:-1]])
        base = (running - x[order])[first]  # the sum before each chain starts
        counts[order] = running - np.repeat(base, np.diff(np.concatenate([np.flatnonzero(first), [len(order)]])))
    return counts, count_offsets, ok


def valid_rle_strings(data: np.ndarray, offsets: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: string ``i`` is a well-formed compressed RLE whose runs are non-negative, below 2**32 and add
    up to exactly ``pixels[i]`` (``h * w`` of its image), i.e. decoding it writes exactly the image's pixels."""
    counts, count_offsets, ok = rle_string_counts(data, offsets)
    n = len(count_offsets) - 1
    pixels = np.asarray(pixels, dtype=np.int64).reshape(n)
    if n == 0:
        return ok
    string_of = np.repeat(np.arange(n), np.diff(count_offsets))
    bad = (counts < 0) | (counts >= _COUNT_LIMIT)
    ok[string_of[bad]] = False
    total = np.concatenate([[0], np.cumsum(np.where(bad, 0, counts))])
    ok &= (total[count_offsets[1:]] - total[count_offsets[:-1]]) == pixels
    return ok
