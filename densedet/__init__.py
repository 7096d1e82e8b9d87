"""DenseDet: dense one-stage object detection in pure PyTorch.

Public API::

    import densedet
    model = densedet.build_model("atss_r50_fpn_1x_coco", num_classes=3)
    predictor = densedet.Predictor("atss_r18_fpn_synth", "work_dirs/demo")
    dets = predictor("image.jpg")   # {"boxes" (K,4) xyxy, "scores", "labels", "class_names"}
    densedet.export("atss_r18_fpn_synth", "work_dirs/demo/latest.pth", "model.onnx")  # needs densedet[export]
"""

from densedet.analysis.data_check import data_check
from densedet.api import build_model
from densedet.config import Config, ConfigError, list_configs, load_config
from densedet.data import CocoDataset, DataError, build_dataloader, make_synthetic_coco
from densedet.data.formats import detect_layout, prepare_dataset
from densedet.deploy import ExportDependencyError, OnnxDetector, export
from densedet.engine import Trainer, evaluate, load_checkpoint, load_model_weights, train
from densedet.errors import CheckpointError, DenseDetError, NonFiniteError
from densedet.evaluation import EvalResult, evaluate_coco
from densedet.inference.predictor import Predictor
from densedet.inference.visualize import draw_detections
from densedet.models.build import build_detector
from densedet.version import __version__
from densedet.weights import ZOO, convert_mmdet_checkpoint, fetch_zoo_weights

__all__ = [
    "CheckpointError", "CocoDataset", "Config", "ConfigError", "DataError", "DenseDetError", "EvalResult",
    "ExportDependencyError", "NonFiniteError", "OnnxDetector", "Predictor", "Trainer", "ZOO", "__version__",
    "build_dataloader", "build_detector", "build_model", "convert_mmdet_checkpoint", "data_check", "detect_layout",
    "draw_detections", "evaluate", "evaluate_coco", "export", "fetch_zoo_weights", "list_configs", "load_checkpoint",
    "load_config", "load_model_weights", "make_synthetic_coco", "prepare_dataset", "train",
]
