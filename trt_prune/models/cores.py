"""Tensor-in, tensors-out "cores" of torchvision's detectors: backbone (+FPN) and head(s), nothing else.

A torchvision detector takes a list of images, resizes and normalises them, runs backbone and head, then
decodes anchors and runs NMS. Only the middle part is what TensorRT accelerates and what channel pruning
touches; the rest is data-dependent Python. :func:`detection_core` keeps exactly that part, as a module whose
``forward(images [B, 3, H, W])`` returns a tuple of the head's raw tensors (what the head's ``forward``
computes, flattened into a tuple): no transform, no anchors, no postprocessing.

The core holds the detector's own ``backbone`` and head modules under the names ``backbone`` and ``head``
(for Faster R-CNN ``head`` is the RPN head; the RoI box head is left out), so module paths read like
torchvision's: ``head.classification_head.cls_logits``, and its state dict loads a torchvision checkpoint of
the detector (RetinaNet, FCOS and SSD keep no weights outside backbone and head). All are built with
``weights=None, weights_backbone=None`` (random weights, plain BatchNorm, nothing downloaded).

What the detector needs after the head (its anchor generator, box coder and post-processing settings) is
kept as :attr:`DetectionCore.post`, a plain attribute: not a submodule, so pruning, state dicts and export
never see it; :mod:`trt_prune.detection.torchvision_decode` uses it to put decoding and NMS in the graph.
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


@dataclass
class CorePost:
    """The detector's parts after the head: ``anchor_generator`` (a parameter-free module), ``box_coder``,
    the thresholds of its ``postprocess_detections`` and the class whose method that is."""

    detector_class: type
    anchor_generator: nn.Module
    box_coder: object
    score_thresh: float
    nms_thresh: float
    detections_per_img: int
    topk_candidates: int


class DetectionCore(nn.Module):
    """Backbone (+FPN) and head of a detector: ``forward(images)`` returns the head's tensors as a tuple."""

    def __init__(self, backbone: nn.Module, head: nn.Module, name: str, post: CorePost | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.name = name
        self.post = post

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
    post = None
    if hasattr(detector, "postprocess_detections") and hasattr(detector, "topk_candidates"):
        post = CorePost(type(detector), detector.anchor_generator, detector.box_coder, detector.score_thresh,
                        detector.nms_thresh, detector.detections_per_img, detector.topk_candidates)
    return DetectionCore(detector.backbone, spec.head(detector), name, post).eval()


def calibrate_batchnorm(model: nn.Module, images) -> nn.Module:
    """Reset every BatchNorm's running statistics to those of ``images`` (one forward pass in train mode).

    Randomly initialised cores have BatchNorm statistics that match nothing: activations shrink layer by layer
    (SSDlite's head outputs are constant to 1e-15) and every box gets the same score. Statistics measured on
    real-looking images give the spread of scores a trained detector has, which the NMS checks need (ties
    make "the same detections" undefined). Returns ``model``, in eval mode; no parameter changes.
    """
    import torch

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    try:
        with torch.no_grad():
            model(images)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return model
