"""DenseDet: dense one-stage object detection (and Mask R-CNN) in pure PyTorch.

Public API::

    import densedet
    model = densedet.build_model("atss_r50_fpn_1x_coco", num_classes=3)      # trainable, takes uint8 pixels
    det = densedet.load_detector(densedet.load_config("mask_rcnn_r18_fpn_synth"), "work_dirs/mr", precision="bf16")
    predictor = densedet.Predictor("atss_r18_fpn_synth", "work_dirs/demo")
    dets = predictor("image.jpg")   # {"boxes" (K,4) xyxy, "scores", "labels", "class_names"}
    densedet.export("atss_r18_fpn_synth", "work_dirs/demo/latest.pth", "model.onnx")  # needs densedet[export]
"""

from densedet.analysis.data_check import data_check
from densedet.api import build_model, export
from densedet.config import Config, ConfigError, list_configs, load_config
from densedet.data import CocoDataset, DataError, build_dataloader, make_synthetic_coco
from densedet.data.formats import detect_layout, prepare_dataset
from densedet.deploy import ExportDependencyError, OnnxDetector, OnnxRuntimeModel
from densedet.engine import Trainer, evaluate, train
from densedet.errors import CheckpointError, DenseDetError, NonFiniteError, PathError
from densedet.evaluation import EvalResult, evaluate_coco
from densedet.inference import Predictor, draw_detections, load_detector, predict_video
from densedet.models.build import build_detector
from densedet.models.detector import Detector, InferenceModel, SingleStageDetector
from densedet.models.two_stage import TwoStageDetector
from densedet.version import __version__
from densedet.weights import ZOO, convert_mmdet_checkpoint, fetch_zoo_weights, load_checkpoint, load_model_weights

__all__ = [
    "CheckpointError", "CocoDataset", "Config", "ConfigError", "DataError", "DenseDetError", "Detector", "EvalResult",
    "ExportDependencyError", "InferenceModel", "NonFiniteError", "OnnxDetector", "OnnxRuntimeModel", "PathError",
    "Predictor", "SingleStageDetector", "Trainer", "TwoStageDetector", "ZOO", "__version__", "build_dataloader",
    "build_detector", "build_model", "convert_mmdet_checkpoint", "data_check", "detect_layout", "draw_detections",
    "evaluate", "evaluate_coco", "export", "fetch_zoo_weights", "list_configs", "load_checkpoint", "load_config",
    "load_detector", "load_model_weights", "make_synthetic_coco", "predict_video", "prepare_dataset", "train",
]
