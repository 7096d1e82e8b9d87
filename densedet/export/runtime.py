"""Run an exported DenseDet ONNX file in onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OnnxDetector"]


class OnnxDetector:
    """An onnxruntime session of a file written by :func:`densedet.export.export`.

    ``run(images)``: ``images`` (B, 3, H, W) uint8 (or float 0..255) RGB at network resolution -> dict of numpy
    arrays named as the graph's outputs (``boxes``, ``scores``, ``labels``, ``num_dets`` with NMS). A static graph
    needs exactly its traced input shape (:attr:`input_shape`, ints) ; a dynamic one has strings there.
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from densedet.export.onnx_export import require_export_deps

        require_export_deps(("onnxruntime",))
        import onnxruntime as ort

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such ONNX file")
        opts = ort.SessionOptions()
        n = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if n > 0:
            opts.intra_op_num_threads = n
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape: list[Any] = list(inp.shape)
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def dynamic(self) -> bool:
        return not all(isinstance(s, int) for s in self.input_shape[2:])

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images)
        if images.dtype != np.uint8:
            images = images.astype(np.uint8)
        outs = self.session.run(None, {self.input_name: images})
        return dict(zip(self.output_names, outs))
