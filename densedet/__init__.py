"""DenseDet: dense one-stage object detection in pure PyTorch.

Public API::

    import densedet
    model = densedet.build_model("atss_r50_fpn_1x_coco", num_classes=3)
    predictor = densedet.Predictor("atss_r18_fpn_synth", "work_dirs/demo")
    dets = predictor("image.jpg")   # {"boxes", "scores", "labels", "class_names"}
"""

from densedet.api import build_model
from densedet.config import Config, ConfigError, list_configs, load_config
from densedet.inference.predictor import Predictor

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "Predictor", "__version__", "build_model", "list_configs", "load_config"]
