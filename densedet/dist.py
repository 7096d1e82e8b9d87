"""torch.distributed helpers that are no-ops in a single process.

Multi-process runs are started by ``torchrun`` (or anything that sets the same environment variables: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or by SLURM's ``srun`` (one task per GPU:
:func:`slurm_environment` derives torchrun's variables from ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
``SLURM_LOCALID`` / the node list / the job id); :func:`init_distributed` reads them, torchrun's first. Every
other helper works whether or not a process group exists, so model and loss code can call them unconditionally.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from densedet.errors import ConfigError

__all__ = [
    "all_gather_object",
    "all_reduce_dict",
    "barrier",
    "broadcast_object",
    "cleanup",
    "expand_nodelist",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "reduce_mean",
    "slurm_environment",
    "slurm_master_port",
]

logger = logging.getLogger("densedet")

TORCH_DEFAULT_PORT = 29500  # torch.distributed's default MASTER_PORT (mmcv's fallback too)


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


# ----------------------------------------------------------------------------------------------------------- SLURM
_NODELIST_ITEM = re.compile(r"[^,\[\]]+|\[[^\[\]]*\]")


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list in its compressed form, in order, as ``scontrol show hostnames`` prints them.

    ``"node[01-03,07],gpu5"`` -> ``node01 node02 node03 node07 gpu5``. A name may hold several bracket groups
    (``"rack[1-2]-n[1-2]"`` -> ``rack1-n1 rack1-n2 rack2-n1 rack2-n2``, the last group varying fastest); a range
    keeps the zero padding of its first bound (``[08-10]`` -> ``08 09 10``); a name without brackets is kept as it is.

    Raises:
        ConfigError: an unbalanced bracket, an empty group, a bound that is not a number or a range that runs down.
    """
    names: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(nodelist + ","):  # split on the commas outside brackets
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ConfigError(f"SLURM node list {nodelist!r}: unbalanced brackets", "SLURM_JOB_NODELIST")
        if ch == "," and depth == 0:
            names.extend(_expand_one(nodelist[start:i].strip(), nodelist))
            start = i + 1
    if depth != 0:
        raise ConfigError(f"SLURM node list {nodelist!r}: unbalanced brackets", "SLURM_JOB_NODELIST")
    return names


def _expand_one(name: str, whole: str) -> list[str]:
    if not name:
        return []
    parts: list[list[str]] = []
    for piece in _NODELIST_ITEM.findall(name):
        if not piece.startswith("["):
            parts.append([piece])
            continue
        values: list[str] = []
        for item in piece[1:-1].split(","):
            lo, sep, hi = item.strip().partition("-")
            if not lo.isdigit() or (sep and not hi.isdigit()):
                raise ConfigError(f"SLURM node list {whole!r}: {item.strip()!r} in {piece} is not N or N-M",
                                  "SLURM_JOB_NODELIST")
            if sep and int(hi) < int(lo):
                raise ConfigError(f"SLURM node list {whole!r}: range {item.strip()!r} runs down", "SLURM_JOB_NODELIST")
            values += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi if sep else lo) + 1)]
        parts.append(values)
    return ["".join(combo) for combo in itertools.product(*parts)]


def _first_host(nodelist: str) -> str:
    """The first host of ``nodelist``: ``scontrol show hostnames`` when SLURM's tools are on the PATH (as mmcv's
    ``_init_dist_slurm`` does), else :func:`expand_nodelist`."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=60, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError) as e:
            logger.warning("scontrol show hostnames %s failed (%s); expanding the node list here", nodelist, e)
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ConfigError(f"SLURM node list {nodelist!r} names no host", "SLURM_JOB_NODELIST")
    return hosts[0]


def slurm_master_port(job_id: str | None) -> int:
    """A port every task of a job computes alike: 15000 + the job id's last four digits (PyTorch Lightning's
    ``SLURMEnvironment.main_port``), so two jobs sharing a node do not both take 29500; 29500 without a job id."""
    digits = re.sub(r"\D", "", job_id or "")
    return 15000 + int(digits[-4:]) if digits else TORCH_DEFAULT_PORT


def slurm_environment(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """torchrun's variables for a process that SLURM's ``srun`` started, or ``None`` when it was not (or torchrun's
    own variables are set: they win, e.g. ``srun torchrun ...`` with one task per node).

    The semantics of MMDetection's ``--launcher slurm`` (mmcv/runner/dist_utils.py and mmengine/dist/utils.py
    ``_init_dist_slurm``): ``RANK`` = ``SLURM_PROCID``, ``WORLD_SIZE`` = ``SLURM_NTASKS``, ``MASTER_ADDR`` = the first
    host of the node list unless ``MASTER_ADDR`` is set, ``MASTER_PORT`` kept when set. Where mmcv differs:
    ``LOCAL_RANK`` = ``SLURM_LOCALID`` (mmcv: ``SLURM_PROCID % GPUs``, the same with one task per GPU), the node list
    of the step (``SLURM_STEP_NODELIST``, then ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST``) and, without
    ``MASTER_PORT``, :func:`slurm_master_port` of ``SLURM_JOB_ID`` instead of a fixed 29500. A job named ``bash`` or
    ``interactive`` is an interactive allocation, not an ``srun`` launch (PyTorch Lightning's rule), and one task is
    a single process: both give ``None``.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        return None
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return None
    if env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    try:
        ntasks, rank = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
        local = int(env["SLURM_LOCALID"]) if "SLURM_LOCALID" in env else rank % max(1, torch.cuda.device_count())
    except ValueError as e:
        raise ConfigError(f"SLURM variables SLURM_PROCID={env.get('SLURM_PROCID')!r} SLURM_NTASKS="
                          f"{env.get('SLURM_NTASKS')!r} SLURM_LOCALID={env.get('SLURM_LOCALID')!r}: {e}",
                          "SLURM_PROCID") from e
    if ntasks <= 1:
        return None
    out = {"RANK": str(rank), "WORLD_SIZE": str(ntasks), "LOCAL_RANK": str(local)}
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ConfigError("SLURM_NTASKS > 1 but no SLURM_JOB_NODELIST to find the first node in (or set "
                              "MASTER_ADDR)", "SLURM_JOB_NODELIST")
        out["MASTER_ADDR"] = _first_host(nodelist)
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(slurm_master_port(env.get("SLURM_JOB_ID")))
    return out


# --------------------------------------------------------------------------------------------------- process group
def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment variables, or by SLURM's when ``srun`` started
    this process (:func:`slurm_environment`, written into ``os.environ`` so the rest of the process sees torchrun's
    names; torchrun's variables win when both are present).

    Args:
        backend: ``"nccl"`` / ``"gloo"``; default nccl when CUDA is available, else gloo (CPU).
        timeout_s: collective timeout.

    Returns:
        ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` when ``WORLD_SIZE`` is unset or 1 (nothing is initialised).
        Calling it again once the group exists just returns the current values.
    """
    if is_distributed():
        return get_rank(), get_world_size(), get_local_rank()
    slurm = slurm_environment()
    if slurm is not None:
        os.environ.update(slurm)
        logger.info("SLURM task %s of %s (local %s): rendezvous at %s:%s", slurm["RANK"], slurm["WORLD_SIZE"],
                    slurm["LOCAL_RANK"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed: WORLD_SIZE={world_size} but {missing} are not set; launch with torchrun "
                           f"or srun")
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
