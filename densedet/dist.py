"""torch.distributed helpers that are no-ops in a single process.

Multi-process runs are started by ``torchrun`` (or anything that sets the same environment variables: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); :func:`init_distributed` reads them. Every other
helper works whether or not a process group exists, so model and loss code can call them unconditionally.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_object",
    "all_reduce_dict",
    "barrier",
    "broadcast_object",
    "cleanup",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "reduce_mean",
]


def is_distributed() -> bool:
    """True when a default process group with more than zero peers is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment variables.

    Args:
        backend: ``"nccl"`` / ``"gloo"``; default nccl when CUDA is available, else gloo (CPU).
        timeout_s: collective timeout.

    Returns:
        ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` when ``WORLD_SIZE`` is unset or 1 (nothing is initialised).
        Calling it again once the group exists just returns the current values.
    """
    if is_distributed():
        return get_rank(), get_world_size(), get_local_rank()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed: WORLD_SIZE={world_size} but {missing} are not set; launch with torchrun")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("init_distributed: backend 'nccl' needs CUDA; use 'gloo' on CPU")
        # Bind the process to its GPU before the group exists, so NCCL never touches GPU 0 from every rank.
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world_size, local_rank


def cleanup() -> None:
    """Destroy the default process group (if any)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes (a new tensor; ``tensor`` itself when not distributed).

    As MMDetection's ``reduce_mean`` (mmdet/core/utils/dist_utils.py): all_reduce(SUM) of ``tensor / world_size``.
    Heads use it to normalise a loss by the positive count averaged over processes. Not differentiable.
    """
    if not is_distributed():
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor.div_(get_world_size()), op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_dict(data: dict[str, Any], op: str = "mean") -> dict[str, torch.Tensor]:
    """All-reduce a dict of scalars/tensors in one collective.

    Keys are processed in sorted order so every rank packs the same layout (each rank must pass the same keys and
    shapes). Values may be Python numbers or tensors; the result holds float tensors of the original shapes on the
    device the communication backend needs.

    Args:
        op: ``"mean"`` or ``"sum"``.
    """
    if op not in ("mean", "sum"):
        raise ValueError(f"all_reduce_dict: op must be 'mean' or 'sum', got '{op}'")
    device = torch.device("cuda", torch.cuda.current_device()) if (
        is_distributed() and dist.get_backend() == "nccl") else torch.device("cpu")
    keys = sorted(data)
    tensors = [torch.as_tensor(data[k]).detach().to(device=device, dtype=torch.float64) for k in keys]
    if not is_distributed() or not keys:
        return {k: t.float() for k, t in zip(keys, tensors)}
    shapes = [t.shape for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if op == "mean":
        flat /= get_world_size()
    out, start = {}, 0
    for k, shape in zip(keys, shapes):
        n = shape.numel()
        out[k] = flat[start:start + n].reshape(shape).float()
        start += n
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled); ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return ``src``'s ``obj`` on every rank (pickled); ``obj`` itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
