"""Deployment: ONNX export of a detector (pixels in, padded detections out) and running the exported file."""

from densedet.export.onnx_export import (
    EXPORT_INSTALL_HINT,
    ExportDependencyError,
    ExportResult,
    build_deploy_module,
    check_onnx,
    export,
    require_export_deps,
)
from densedet.export.runtime import OnnxDetector

__all__ = ["EXPORT_INSTALL_HINT", "ExportDependencyError", "ExportResult", "OnnxDetector", "build_deploy_module",
           "check_onnx", "export", "require_export_deps"]
