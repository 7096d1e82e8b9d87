"""Dataset layouts: COCO, Pascal VOC and YOLO roots, and the VOC / YOLO -> COCO json converters."""

from densedet.data.formats.layout import PreparedDataset, SplitFiles, detect_layout, prepare_dataset, split_holdout
from densedet.data.formats.voc import parse_voc_xml, voc_to_coco
from densedet.data.formats.yolo import parse_yolo_line, yolo_to_coco

__all__ = ["PreparedDataset", "SplitFiles", "detect_layout", "parse_voc_xml", "parse_yolo_line", "prepare_dataset",
           "split_holdout", "voc_to_coco", "yolo_to_coco"]
