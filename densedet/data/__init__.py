"""COCO-format data: dataset, transforms, batching, samplers and a synthetic shapes dataset."""

from densedet.data.annotation_store import AnnotationStore, load_annotation_store
from densedet.data.coco import CocoDataset, DataError, DataWarning, load_coco_json
from densedet.data.collate import collate
from densedet.data.samplers import (
    DistributedGroupSampler,
    GroupSampler,
    InferenceSampler,
    SeededSampler,
    build_dataloader,
)
from densedet.data.synth import SYNTH_CLASSES, make_synthetic_coco
from densedet.data.transforms import (
    Compose,
    Normalize,
    RandomFlip,
    Resize,
    build_pipeline,
    seed_transforms,
    transform_rng,
)
from densedet.data.tta import MultiScaleFlipAug, tta_pipeline
from densedet.structures.masks import InstanceMasks

__all__ = [
    "SYNTH_CLASSES",
    "AnnotationStore",
    "CocoDataset",
    "Compose",
    "DataError",
    "DataWarning",
    "DistributedGroupSampler",
    "InstanceMasks",
    "GroupSampler",
    "InferenceSampler",
    "MultiScaleFlipAug",
    "Normalize",
    "RandomFlip",
    "Resize",
    "SeededSampler",
    "build_dataloader",
    "build_pipeline",
    "collate",
    "load_annotation_store",
    "load_coco_json",
    "make_synthetic_coco",
    "seed_transforms",
    "transform_rng",
    "tta_pipeline",
]
