"""Training engine: optimizer, lr schedule, checkpoints, distributed helpers, logging, evaluation and the trainer."""

from densedet.engine.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    restore_rng,
    save_checkpoint,
)
from densedet.engine.evaluator import evaluate, run_inference
from densedet.engine.lr_schedule import LrScheduler, lr_factor
from densedet.engine.optim import build_optimizer
from densedet.engine.trainer import Trainer, train

__all__ = [
    "CheckpointError",
    "LrScheduler",
    "Trainer",
    "build_optimizer",
    "evaluate",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "lr_factor",
    "restore_rng",
    "run_inference",
    "save_checkpoint",
    "train",
]
