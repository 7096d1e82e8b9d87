"""``torch.compile`` of a detector's backbone + neck + head for inference (``--compile``, ``runtime.compile``).

Only the network part is compiled (the tensor-in, tensors-out ``bbox_head(extract_feat(images))``); decoding,
candidate selection and NMS stay eager, in float32, as without compiling. Inductor's ``freezing`` is on: with the
weights fixed, it folds them into the graph, pre-packs them for oneDNN and fuses conv + ReLU/add, which is where
the CPU speed comes from (without freezing, compiling gains nothing measurable on CPU: docs/benchmarks.md).
Consequences the caller accepts: the first call per distinct input shape compiles (tens of seconds for a
ResNet-50 on 2 cores), the weights must not change afterwards (inference only), and after
``torch._dynamo.config.recompile_limit`` distinct shapes torch falls back to eager for new shapes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from densedet.errors import NotImplementedConfigError

__all__ = ["compile_network", "require_compiler"]


def require_compiler() -> None:
    """Inductor builds C++ kernels on CPU: say what is missing instead of failing inside the first call."""
    cxx = os.environ.get("CXX")
    if (cxx and shutil.which(cxx)) or any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return
    raise NotImplementedConfigError(
        "--compile (runtime.compile) needs a C++ compiler for torch.compile's CPU kernels and none was found "
        "(set CXX or install g++, e.g. `apt-get install g++`); run without --compile", path="runtime.compile")


def compile_network(fn: Callable[[Tensor], Any]) -> Callable[[Tensor], Any]:
    """``torch.compile(fn)`` for inference: static shapes, Inductor with ``freezing`` (see the module doc)."""
    require_compiler()
    return torch.compile(fn, dynamic=False, options={"freezing": True})
