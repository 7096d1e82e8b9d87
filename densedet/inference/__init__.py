"""Inference: :func:`load_detector` (config + weights -> a detector ready for inference, eager or onnxruntime),
:class:`Predictor` (images in, detections out), drawing detections, :func:`predict_video` (videos, webcams,
streams)."""

from densedet.inference.loading import choose_inference_device, load_detector, resolve_weights_path
from densedet.inference.predictor import Predictor, list_images
from densedet.inference.video import predict_video
from densedet.inference.visualize import draw_detections

__all__ = ["Predictor", "choose_inference_device", "draw_detections", "list_images", "load_detector",
           "predict_video", "resolve_weights_path"]
