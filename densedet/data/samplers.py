"""Samplers (aspect-ratio grouping, distributed sharding, sequential inference shards) and ``build_dataloader``.

Reproducibility: the order of a training epoch is a function of ``(seed, epoch)`` only; call ``set_epoch(epoch)``
before each epoch (without it, successive iterations use epochs 0, 1, 2, ...). ``build_dataloader`` wraps the
sampler in :class:`SeededSampler`, which hands each item the entropy ``(seed, epoch, index)`` for its random
transforms, so augmentation does not depend on worker count, worker persistence, world size or global RNG state:
resuming at an epoch boundary replays the same stream (for datasets with ``accepts_seeded_keys``; others draw
from per-process generators seeded in ``worker_init_fn``). An index that is repeated to pad an epoch gets the same
augmentation both times.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from densedet.data.collate import collate
from densedet.data.transforms import seed_transforms

__all__ = [
    "DistributedGroupSampler",
    "GroupSampler",
    "InferenceSampler",
    "SeededSampler",
    "build_dataloader",
]


class _EpochMixin:
    """``set_epoch`` fixes the epoch; without it, every new iteration advances it by one."""

    epoch: int = 0
    _explicit: bool = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._explicit = True

    def _take_epoch(self) -> int:
        epoch = self.epoch
        if not self._explicit:
            self.epoch += 1
        return epoch


def _group_flags(dataset: Sized, group_by_aspect_ratio: bool) -> np.ndarray:
    flags = getattr(dataset, "aspect_flags", None) if group_by_aspect_ratio else None
    if flags is None:  # datasets without aspect information form one group
        return np.zeros(len(dataset), dtype=np.int64)
    flags = np.asarray(flags, dtype=np.int64)
    if flags.shape != (len(dataset),):
        raise ValueError(f"aspect_flags has shape {flags.shape}, expected ({len(dataset)},)")
    return flags


def _seed(seed: int) -> int:
    """Seeds go into numpy SeedSequences, which take non-negative integers only."""
    return int(seed) % 2**63


def _check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


class GroupSampler(_EpochMixin, Sampler[int]):
    """Indices in runs of ``batch_size`` that share an aspect flag (MMDetection 2.x ``GroupSampler``).

    Each group is shuffled and padded by repetition to a multiple of ``batch_size``; the resulting batches are
    shuffled. With ``DataLoader(batch_size=batch_size)`` every batch holds images of one aspect group and every
    index appears at least once per epoch. ``shuffle=False`` keeps index order within groups and batch order.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        group_by_aspect_ratio: bool = True,
    ) -> None:
        _check_batch(batch_size)
        self.flags = _group_flags(dataset, group_by_aspect_ratio)
        self.batch_size = batch_size
        self.seed = _seed(seed)
        self.shuffle = shuffle
        sizes = np.bincount(self.flags) if len(self.flags) else np.zeros(0, dtype=np.int64)
        self.num_samples = int(sum(math.ceil(s / batch_size) * batch_size for s in sizes))

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self._take_epoch()])
        chunks = []
        for g in np.unique(self.flags):
            idx = np.flatnonzero(self.flags == g)
            if self.shuffle:
                idx = rng.permutation(idx)
            extra = math.ceil(len(idx) / self.batch_size) * self.batch_size - len(idx)
            idx = np.concatenate([idx, np.resize(idx, extra)])  # np.resize repeats idx cyclically
            chunks.append(idx.reshape(-1, self.batch_size))
        if not chunks:
            return iter([])
        batches = np.concatenate(chunks)
        if self.shuffle:
            batches = batches[rng.permutation(len(batches))]
        return iter(batches.reshape(-1).tolist())

    def __len__(self) -> int:
        return self.num_samples


class DistributedGroupSampler(_EpochMixin, Sampler[int]):
    """Per-rank share of aspect-grouped batches (MMDetection 2.x ``DistributedGroupSampler``).

    Every group is shuffled with a generator seeded by ``(seed, epoch)`` (the same on every rank) and padded by
    repetition to a multiple of ``batch_size * num_replicas``; whole batches are shuffled, and rank ``r`` takes
    the ``r``-th contiguous slice of ``num_samples`` indices. Shares are equal-sized and occupy disjoint positions
    of the epoch list; they repeat an index only where padding was needed. Give every rank the same ``seed``.
    """

    def __init__(
        self,
        dataset: Sized,
        batch_size: int,
        num_replicas: int,
        rank: int,
        seed: int = 0,
        group_by_aspect_ratio: bool = True,
    ) -> None:
        _check_batch(batch_size)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.flags = _group_flags(dataset, group_by_aspect_ratio)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = _seed(seed)
        sizes = np.bincount(self.flags) if len(self.flags) else np.zeros(0, dtype=np.int64)
        self.num_samples = int(sum(math.ceil(s / batch_size / num_replicas) * batch_size for s in sizes))
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self._take_epoch()])
        chunks = []
        per_round = self.batch_size * self.num_replicas
        for g in np.unique(self.flags):
            idx = rng.permutation(np.flatnonzero(self.flags == g))
            padded = math.ceil(len(idx) / per_round) * per_round
            chunks.append(np.resize(idx, padded).reshape(-1, self.batch_size))
        if not chunks:
            return iter([])
        batches = np.concatenate(chunks)
        indices = batches[rng.permutation(len(batches))].reshape(-1)
        assert len(indices) == self.total_size
        offset = self.num_samples * self.rank
        return iter(indices[offset : offset + self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


class InferenceSampler(_EpochMixin, Sampler[int]):
    """Sequential, contiguous shard per rank without padding (every index exactly once over all ranks).

    Shard size ``ceil(N / num_replicas)``; the last ranks may get fewer (or no) indices (as Detectron2's
    ``InferenceSampler``). ``set_epoch`` is accepted and has no effect.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        total = len(dataset)
        shard = (total - 1) // num_replicas + 1 if total else 0
        self.begin = min(shard * rank, total)
        self.end = min(shard * (rank + 1), total)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class SeededSampler(_EpochMixin, Sampler[tuple[int, tuple[int, int, int]]]):
    """Wrap an index sampler to yield ``(index, (seed, epoch, index))``: the key plus the entropy for its transforms.

    ``set_epoch`` is forwarded to the wrapped sampler; ``sampler`` is the wrapped one.
    """

    def __init__(self, sampler: Sampler[int], seed: int) -> None:
        self.sampler = sampler
        self.seed = _seed(seed)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, tuple[int, int, int]]]:
        epoch = self._take_epoch()
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        return ((int(i), (self.seed, epoch, int(i))) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


def _worker_init(worker_id: int, rank: int) -> None:
    """Seed a worker's python/numpy/transform RNGs from the seed torch gave it and the rank."""
    # torch.initial_seed() is base_seed + worker_id, base_seed drawn from the loader's generator.
    seed = int(np.random.SeedSequence([torch.initial_seed() % 2**63, rank]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    seed_transforms(seed)


def build_dataloader(
    dataset: Any,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    distributed: bool = False,
    rank: int = 0,
    world_size: int = 1,
    size_divisor: int = 32,
    group_by_aspect_ratio: bool = True,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding :func:`~densedet.data.collate.collate` batches.

    ``shuffle=True`` (training): :class:`GroupSampler`, or :class:`DistributedGroupSampler` when ``distributed``;
    ``shuffle=False`` (evaluation): :class:`InferenceSampler` (this rank's sequential shard, no padding). The
    sampler is wrapped in :class:`SeededSampler` when the dataset declares ``accepts_seeded_keys`` (as
    :class:`~densedet.data.coco.CocoDataset` does; others get plain indices). Call
    ``loader.sampler.set_epoch(epoch)`` before each epoch. Workers are persistent when ``num_workers > 0``.
    """
    _check_batch(batch_size)
    if shuffle:
        if distributed:
            inner: Sampler[int] = DistributedGroupSampler(
                dataset, batch_size, world_size, rank, seed=seed, group_by_aspect_ratio=group_by_aspect_ratio
            )
        else:
            inner = GroupSampler(dataset, batch_size, seed=seed, group_by_aspect_ratio=group_by_aspect_ratio)
    else:
        inner = InferenceSampler(dataset, world_size if distributed else 1, rank if distributed else 0)
    generator = torch.Generator()
    generator.manual_seed(_seed(seed))
    if num_workers == 0:  # item transforms run here: seed the fallback generator for index-only access
        seed_transforms(int(np.random.SeedSequence([_seed(seed), rank]).generate_state(1)[0]))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=SeededSampler(inner, seed) if getattr(dataset, "accepts_seeded_keys", False) else inner,
        num_workers=num_workers,
        collate_fn=functools.partial(collate, size_divisor=size_divisor),
        worker_init_fn=functools.partial(_worker_init, rank=rank),
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        drop_last=False,
    )
