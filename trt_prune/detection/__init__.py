"""Detector outputs: decoding, NMS, COCO mAP and the training loss."""

from trt_prune.detection.decode import anchor_points, decode, postprocess
from trt_prune.detection.loss import DetectionLoss
from trt_prune.detection.metrics import coco_map, evaluate

__all__ = ["DetectionLoss", "anchor_points", "coco_map", "decode", "evaluate", "postprocess"]
