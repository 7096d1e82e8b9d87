"""Deployment: ONNX export of a detector (pixels in, padded detections - and Mask R-CNN's 28x28 masks - out) and
running the exported file."""

from densedet.deploy.onnx_export import (
    EXPORT_INSTALL_HINT,
    ExportDependencyError,
    ExportResult,
    build_deploy_module,
    check_onnx,
    export,
    paste_onnx_masks,
    require_export_deps,
)
from densedet.deploy.runtime import OnnxDetector, OnnxRuntimeModel, load_onnx_model

__all__ = ["EXPORT_INSTALL_HINT", "ExportDependencyError", "ExportResult", "OnnxDetector", "OnnxRuntimeModel",
           "build_deploy_module", "check_onnx", "export", "load_onnx_model", "paste_onnx_masks",
           "require_export_deps"]
