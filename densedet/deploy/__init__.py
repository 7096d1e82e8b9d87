"""Deployment: a detector object to ONNX (pixels in, padded detections - and Mask R-CNN's 28x28 masks - out), the
onnxruntime-vs-eager check, and running an exported file behind the detector's inference interface.

The config-level entry point is :func:`densedet.export` (config + checkpoint -> checked file) and the
``densedet export`` command.
"""

from densedet.deploy.graph import DeployDetector, DeployTwoStage, build_deploy_module, padded_nms
from densedet.deploy.onnx_export import ExportResult, check_onnx, compare_detections, export_detector, format_check
from densedet.deploy.runtime import (
    EXPORT_INSTALL_HINT,
    ExportDependencyError,
    OnnxDetector,
    OnnxRuntimeModel,
    is_onnx_path,
    paste_onnx_masks,
    require_export_deps,
)

__all__ = ["EXPORT_INSTALL_HINT", "DeployDetector", "DeployTwoStage", "ExportDependencyError", "ExportResult",
           "OnnxDetector", "OnnxRuntimeModel", "build_deploy_module", "check_onnx", "compare_detections",
           "export_detector", "format_check", "is_onnx_path", "padded_nms", "paste_onnx_masks",
           "require_export_deps"]


def __getattr__(name: str) -> object:
    # `densedet.deploy.export` (config + checkpoint -> file) moved up to `densedet.export` with the layering of
    # issue 17: deploy sits below the config-level API, so an alias here would import upwards. Say where it went.
    if name == "export":
        raise AttributeError("densedet.deploy.export moved to densedet.export (same arguments); "
                             "densedet.deploy.export_detector exports a detector object")
    raise AttributeError(f"module 'densedet.deploy' has no attribute {name!r}")
