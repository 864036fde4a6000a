"""Tensor-in, tensors-out "cores" of torchvision's detectors: backbone (+FPN) and head(s), nothing else.

A torchvision detector takes a list of images, resizes and normalises them, runs backbone and head, then
decodes anchors and runs NMS. Only the middle part is what TensorRT accelerates and what channel pruning
touches; the rest is data-dependent Python. :func:`detection_core` keeps exactly that part, as a module whose
``forward(images [B, 3, H, W])`` returns a tuple of the head's raw tensors (what the head's ``forward``
computes, flattened into a tuple): no transform, no anchors, no postprocessing.

The core holds the detector's own ``backbone`` and head modules under the names ``backbone`` and ``head``
(for Faster R-CNN ``head`` is the RPN head; the RoI box head is left out), so module paths read like
torchvision's: ``head.classification_head.cls_logits``. All are built with ``weights=None,
weights_backbone=None`` (random weights, plain BatchNorm, nothing downloaded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..errors import ModelSpecError

_FPN_LEVELS = ("0", "1", "2", "3", "pool")  # the feature names of torchvision's resnet50 FPN with LastLevelMaxPool


@dataclass(frozen=True)
class CoreSpec:
    """One core: its torchvision builder, how to pick backbone and head from the detector, its default square
    input size (a multiple of 32, except SSD300's native 300), its output names, and the module paths of the
    layers that write the outputs (the layers to leave unpruned)."""

    builder: str
    head: Callable[[nn.Module], nn.Module]
    input_size: int
    output_names: tuple[str, ...]
    output_layers: tuple[str, ...]


def _ssd_output_layers(levels: int, lite: bool) -> tuple[str, ...]:
    # SSDlite's per-level predictor is Sequential(depthwise conv-bn-act, 1x1 conv): only the 1x1 conv writes output
    suffix = ".1" if lite else ""
    return tuple(f"head.{branch}.module_list.{i}{suffix}"
                 for branch in ("classification_head", "regression_head") for i in range(levels))


CORES: dict[str, CoreSpec] = {
    "retinanet_resnet50_fpn": CoreSpec(
        "retinanet_resnet50_fpn", lambda m: m.head, 512, ("cls_logits", "bbox_regression"),
        ("head.classification_head.cls_logits", "head.regression_head.bbox_reg")),
    "fcos_resnet50_fpn": CoreSpec(
        "fcos_resnet50_fpn", lambda m: m.head, 512, ("cls_logits", "bbox_regression", "bbox_ctrness"),
        ("head.classification_head.cls_logits", "head.regression_head.bbox_reg",
         "head.regression_head.bbox_ctrness")),
    "ssd300_vgg16": CoreSpec(
        "ssd300_vgg16", lambda m: m.head, 300, ("bbox_regression", "cls_logits"), _ssd_output_layers(6, False)),
    "ssdlite320_mobilenet_v3_large": CoreSpec(
        "ssdlite320_mobilenet_v3_large", lambda m: m.head, 320, ("bbox_regression", "cls_logits"),
        _ssd_output_layers(6, True)),
    "fasterrcnn_resnet50_fpn": CoreSpec(
        "fasterrcnn_resnet50_fpn", lambda m: m.rpn.head, 512,
        tuple(f"objectness_{lvl}" for lvl in _FPN_LEVELS) + tuple(f"bbox_deltas_{lvl}" for lvl in _FPN_LEVELS),
        ("head.cls_logits", "head.bbox_pred")),
}
CORE_NAMES: tuple[str, ...] = tuple(CORES)


class DetectionCore(nn.Module):
    """Backbone (+FPN) and head of a detector: ``forward(images)`` returns the head's tensors as a tuple."""

    def __init__(self, backbone: nn.Module, head: nn.Module, name: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.name = name

    def forward(self, images):
        features = self.backbone(images)
        # torchvision's detectors feed the head the list of feature maps, in the backbone's order
        features = list(features.values()) if isinstance(features, dict) else [features]
        return tuple(_flatten(self.head(features)))

    @property
    def spec(self) -> CoreSpec:
        return CORES[self.name]

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """The default input shape, batch 1."""
        size = self.spec.input_size
        return (1, 3, size, size)


def _flatten(out):
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for item in out:
            yield from _flatten(item)
    else:
        yield out


def core_spec(name: str) -> CoreSpec:
    """The :class:`CoreSpec` of ``name``; an unknown name raises :class:`ModelSpecError` listing the valid ones."""
    spec = CORES.get(name)
    if spec is None:
        raise ModelSpecError(f"unknown detection core '{name}'; valid names: {', '.join(CORE_NAMES)}")
    return spec


def detection_core(name: str, **kwargs) -> DetectionCore:
    """Build the core of torchvision detector ``name`` (one of :data:`CORE_NAMES`) with random weights, in eval
    mode. ``kwargs`` go to the torchvision builder (e.g. ``num_classes=4``)."""
    import torchvision

    spec = core_spec(name)
    detector = torchvision.models.get_model_builder(spec.builder)(weights=None, weights_backbone=None, **kwargs)
    return DetectionCore(detector.backbone, spec.head(detector), name).eval()
