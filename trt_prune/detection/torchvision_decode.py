"""Box decoding for the cores of torchvision's one-stage detectors (RetinaNet, FCOS, SSD, SSDlite).

:class:`CoreDecode` turns a :class:`~trt_prune.models.cores.DetectionCore`'s raw head outputs into the
``boxes [B, N, 4]`` (xyxy pixels, clipped) and ``scores [B, N, C]`` that the NMS tail of
:mod:`trt_prune.detection.nms_export` consumes, with the detector's own anchors (computed once for the fixed
input size by its own anchor generator) and its own box coder, so the arithmetic is torchvision's:

- RetinaNet: ``BoxCoder(1, 1, 1, 1).decode_single``, sigmoid scores; top-k candidates per FPN level;
- FCOS: ``BoxLinearCoder.decode``, scores ``sqrt(sigmoid(cls) * sigmoid(centerness))``; top-k per level;
- SSD / SSDlite: ``BoxCoder(10, 10, 5, 5).decode_single``, softmax scores with the background column (class
  0) set to 0, so class indices are torchvision's labels; top-k per class.

:func:`core_reference` is the torch reference: the detector class's own ``postprocess_detections`` run on the
split head outputs, as the detector's ``forward`` does (without the resize back to the caller's image size:
the core has no transform). Thresholds come from :class:`~trt_prune.detection.nms_export.NMSConfig`; their
defaults (:func:`core_nms_defaults`) are the detector's own.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from trt_prune.errors import ExportError

# decoder kind and pre-NMS top-k scope of each core that has a one-stage post-processing
KINDS = {
    "retinanet_resnet50_fpn": ("retinanet", "level"),
    "fcos_resnet50_fpn": ("fcos", "level"),
    "ssd300_vgg16": ("ssd", "class"),
    "ssdlite320_mobilenet_v3_large": ("ssd", "class"),
}


def core_kind(core) -> tuple[str, str]:
    """``(decoder kind, pre-NMS scope)`` of ``core``, or :class:`ExportError` when it has no decoder here."""
    name = getattr(core, "name", None)
    if name not in KINDS or getattr(core, "post", None) is None:
        raise ExportError(f"--nms has no box decoder for the core {name!r} (a two-stage detector's RPN is not a "
                          f"final detector); it has one for {', '.join(KINDS)} and builtin:demo-detector")
    return KINDS[name]


def core_nms_defaults(core) -> dict:
    """The detector's own post-processing settings, as :class:`NMSConfig` keyword arguments."""
    post = core.post
    return {"score_threshold": float(post.score_thresh), "iou_threshold": float(post.nms_thresh),
            "max_detections": int(post.detections_per_img), "pre_nms_topk": int(post.topk_candidates)}


def _device(module: nn.Module) -> torch.device:
    return next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device


@torch.no_grad()
def core_anchors(core, input_hw) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The detector's anchors for an ``input_hw`` image, ``[N, 4]`` xyxy pixels, and the anchors per level."""
    from torchvision.models.detection.image_list import ImageList

    h, w = int(input_hw[0]), int(input_hw[1])
    device = _device(core)
    images = torch.zeros(1, 3, h, w, device=device)
    was_training = core.training
    core.eval()
    try:
        features = core.backbone(images)
    finally:
        core.train(was_training)
    features = list(features.values()) if isinstance(features, dict) else [features]
    anchors = core.post.anchor_generator(ImageList(images, [(h, w)]), features)[0]
    locations = [f.shape[-2] * f.shape[-1] for f in features]
    per_location = anchors.shape[0] // sum(locations)
    return anchors, tuple(n * per_location for n in locations)


class CoreDecode(nn.Module):
    """``images -> (boxes [B, N, 4] xyxy pixels clipped to the image, scores [B, N, C])`` for a torchvision
    one-stage core, with the anchors of a fixed ``input_hw`` as a buffer."""

    def __init__(self, core: nn.Module, input_hw):
        super().__init__()
        self.kind, self.scope = core_kind(core)
        self.core = core
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        anchors, self.level_sizes = core_anchors(core, self.input_hw)
        h, w = self.input_hw
        self.register_buffer("anchors", anchors, persistent=False)
        self.register_buffer("upper", torch.tensor([w, h, w, h], dtype=torch.float32, device=anchors.device),
                             persistent=False)
        self.output_names = core.spec.output_names

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])

    def forward(self, images):
        out = dict(zip(self.output_names, self.core(images), strict=True))
        rel = out["bbox_regression"]
        coder = self.core.post.box_coder
        if self.kind == "fcos":
            boxes = coder.decode(rel, self.anchors)  # BoxLinearCoder broadcasts over the batch
            scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
        else:
            b = rel.shape[0]
            boxes = coder.decode_single(rel.reshape(-1, 4), self.anchors.repeat(b, 1)).reshape(b, -1, 4)
            if self.kind == "ssd":
                scores = F.softmax(out["cls_logits"], dim=-1)
                keep = torch.ones(scores.shape[-1], dtype=scores.dtype, device=scores.device)
                scores = scores * keep.index_fill(0, torch.tensor([0], device=scores.device), 0.0)
            else:
                scores = torch.sigmoid(out["cls_logits"])
        # torchvision's clip_boxes_to_image: x into [0, W], y into [0, H]
        return torch.minimum(boxes.clamp(min=0.0), self.upper), scores


@torch.no_grad()
def core_reference(core, images, config) -> list[dict[str, torch.Tensor]]:
    """Detections of ``core`` on ``images`` by the detector's own ``postprocess_detections`` with
    ``config``'s score and IoU thresholds, detections per image and top-k candidates (per class NMS only)."""
    if config.class_agnostic:
        raise ExportError("torchvision's post-processing has no class-agnostic mode; compare with "
                          "nms_reference on the decoded outputs instead")
    kind, _ = core_kind(core)
    post = core.post
    h, w = images.shape[-2:]
    anchors, level_sizes = core_anchors(core, (h, w))
    out = dict(zip(core.spec.output_names, core(images), strict=True))
    b = images.shape[0]
    if kind == "ssd":
        head, image_anchors = out, [anchors] * b
    else:
        head = {k: list(v.split(level_sizes, dim=1)) for k, v in out.items()}
        image_anchors = [list(anchors.split(level_sizes))] * b
    settings = types.SimpleNamespace(box_coder=post.box_coder, score_thresh=config.score_threshold,
                                     nms_thresh=config.iou_threshold, detections_per_img=config.max_detections,
                                     topk_candidates=config.pre_nms_topk)
    return post.detector_class.postprocess_detections(settings, head, image_anchors, [(int(h), int(w))] * b)
