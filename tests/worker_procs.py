"""Waiting for the worker subprocesses of the multi-process tests (DDP, simulated SLURM)."""
from __future__ import annotations

import subprocess


def wait_workers(procs: list[subprocess.Popen], timeout: float, what: str = "worker") -> None:
    """Wait for every process; on a time-out kill them all, and fail naming the worker and its output tail."""
    for i, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{what} {i} timed out") from None
        assert p.returncode == 0, f"{what} {i} failed:\n{out[-4000:]}"
