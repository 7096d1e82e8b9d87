"""Drawing detections: the pure-PIL functions live in :mod:`densedet.engine.drawing` (the trainer's experiment
trackers draw validation images with them, and the engine sits below inference); this module keeps their
``densedet.inference.visualize`` names."""

from densedet.engine.drawing import class_color, draw_detections, save_detection_grid

__all__ = ["class_color", "draw_detections", "save_detection_grid"]
