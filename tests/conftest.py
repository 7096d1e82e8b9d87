"""Test-wide settings: one intra-op thread per process keeps CPU tests fast and steady on small machines
(several pytest workers or DDP processes would otherwise oversubscribe the cores)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
