"""Box decoding and NMS inside the exported ONNX graph (``trt-prune export MODEL --nms``).

The exported graph takes ``images [B, 3, H, W]`` and returns what deployment code expects, padded with zeros
beyond ``num_detections``:

- ``num_detections [B, 1]`` int32
- ``detection_boxes [B, K, 4]`` float32, xyxy pixels, clipped to the image
- ``detection_scores [B, K]`` float32, sigmoid probabilities, sorted by decreasing score
- ``detection_classes [B, K]`` int32, 0-based class indices

Which models: ``builtin:demo-detector`` (and folders pruned from it), decoded here, the cores of
torchvision's RetinaNet, FCOS, SSD300 and SSDlite (``core:NAME``), decoded by
:mod:`trt_prune.detection.torchvision_decode` with the detector's own anchors, box coder and settings, and any
model whose output is already decoded as YOLOv8's exported head is, ``[B, 4 + C, A]`` (boxes in input pixels,
then class probabilities), when it says so in its attribute ``trt_prune_decoded_boxes = "xyxy"`` or ``"xywh"``
(:data:`DECODED_BOXES_ATTR`; the graph then only converts, clips and selects). :func:`decode_plan` says which,
and refuses the rest.

How it is built. The detector plus box decoding (for the demo: anchor points, ``softplus(raw) * stride``, clipping)
and the score activation are a torch module (:class:`DetectorDecode`, or ``CoreDecode``), exported by
:func:`trt_prune.exporter.export_onnx` as it is (either exporter, dynamic batch, its own parity check on the decoded
boxes and scores). The selection part (pre-NMS top-k, ``NonMaxSuppression``, the final top-K and the zero padding)
is written with ``onnx.helper`` and appended to that graph. Reasons: NMS's output has a data-dependent length, which
the dynamo exporter can only emit through a custom translation table (``export_onnx`` exposes none) or a fake static
shape, and torchvision's own ``nms`` symbolic is single-image, single-class; a hand-written tail is the same ONNX
for both exporters. The selection is also kept out of the torch-vs-ONNX parity check of the export, where a 1e-6
difference in a score can flip a top-k boundary and fail the check for no real reason; it is checked instead on
identical decoded inputs (:func:`export_detector_nms`).

Semantics, matched to :func:`trt_prune.detection.decode.postprocess` (the function that ``evaluate`` and the
demo use), which is the torch reference (for torchvision cores: the detector's own ``postprocess_detections``,
whose pre-NMS top-k is per FPN level or per class instead of per image, see :class:`DecodePlan`):

- candidates are (anchor, class) pairs with ``score > score_threshold`` (strict, as ONNX Runtime's
  NonMaxSuppression and torchvision's code both do); of those only the ``pre_nms_topk`` best-scoring ones
  (default :data:`~trt_prune.detection.decode.PRE_NMS_TOPK`) enter NMS. In the graph: a ``TopK`` over all
  ``N * C`` scores, the others set to 0 (dropped by the strict threshold, hence ``score_threshold >= 0``).
  This also keeps the candidates under the TopK box limit of TensorRT's NMS layer (5000 in its
  documentation; not checked here, no TensorRT on this machine).
- NMS per class: ONNX ``NonMaxSuppression`` with ``center_point_box=0`` on ``[B, N, 4]`` xyxy boxes and
  ``[B, C, N]`` scores is per batch item and per class, as ``torchvision.ops.batched_nms`` is; a box is
  suppressed when its IoU with a kept box is ``> iou_threshold`` in both. ONNX reads boxes as ``[y1, x1, y2,
  x2]``, but IoU is symmetric in the two axes, so xyxy boxes give the same IoU.
- class-agnostic: every (anchor, class) candidate competes with all others (``torchvision.ops.nms`` over
  the candidates of :func:`postprocess`); in the graph the boxes are tiled once per class and NMS runs as a
  single class over ``C * N`` candidates. A lower-scoring class of the same anchor is thus suppressed by its
  own box (IoU 1), except for zero-area boxes, which suppress nothing in either implementation.
- the ``K`` best survivors over all classes, by decreasing score (``max_output_boxes_per_class = K`` is
  enough: no class can place more than ``K`` in the top ``K``). Exact score ties may come out in another
  order (ONNX ``TopK`` puts the lower index first; torch's sort is not stable).

With ``plugin="efficient"`` the tail is one ``EfficientNMS_TRT`` node (TensorRT's plugin: same four outputs)
fed with the masked ``[B, N, C]`` scores; ONNX Runtime cannot run that graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
import torchvision
from onnx import TensorProto, helper
from torch import nn

from trt_prune.detection.decode import PRE_NMS_TOPK, anchor_points, decode, postprocess
from trt_prune.errors import ExportError
from trt_prune.onnx_io import default_opset

OUTPUT_NAMES = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")
DECODED_NAMES = ("decoded_boxes", "decoded_scores")
PLUGINS = ("onnx", "efficient")
# TensorRT's TopK takes K <= 3840; the graph uses TopK for the pre-NMS and the final selection.
TOPK_LIMIT = 3840
MIN_OPSET = 13  # ReduceSum/Unsqueeze with axes as inputs, GatherND batch_dims


@dataclass(frozen=True)
class NMSConfig:
    """What the graph's post-processing does. Defaults are :func:`postprocess`'s (the mAP setting).

    ``plugin``: ``"onnx"`` (standard ``NonMaxSuppression``, runs in ONNX Runtime and TensorRT) or
    ``"efficient"`` (TensorRT's ``EfficientNMS_TRT`` plugin node).
    """

    score_threshold: float = 0.001
    iou_threshold: float = 0.6
    max_detections: int = 100
    class_agnostic: bool = False
    pre_nms_topk: int = PRE_NMS_TOPK
    plugin: str = "onnx"

    def validate(self) -> NMSConfig:
        """Raise :class:`ExportError` naming the first bad value; return ``self``."""
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def count(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not (number(self.score_threshold) and 0 <= self.score_threshold < 1):
            raise ExportError(f"score threshold must be a number in [0, 1), got {self.score_threshold!r}")
        if not (number(self.iou_threshold) and 0 <= self.iou_threshold <= 1):
            raise ExportError(f"IoU threshold must be a number in [0, 1], got {self.iou_threshold!r}")
        for label, value in (("max detections", self.max_detections), ("pre-NMS top-k", self.pre_nms_topk)):
            if not (count(value) and 1 <= value <= TOPK_LIMIT):
                raise ExportError(f"{label} must be an integer in [1, {TOPK_LIMIT}] (TensorRT's TopK limit), "
                                  f"got {value!r}")
        if not isinstance(self.class_agnostic, bool):
            raise ExportError(f"class_agnostic must be True or False, got {self.class_agnostic!r}")
        if self.plugin not in PLUGINS:
            raise ExportError(f"unknown NMS plugin {self.plugin!r}; choose one of {', '.join(PLUGINS)}")
        if self.plugin == "efficient" and self.score_threshold <= 0:
            # candidates outside the pre-NMS top-k carry score 0: only a positive threshold drops them for sure
            raise ExportError("EfficientNMS_TRT needs a score threshold > 0 (e.g. 0.001)")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------- torch side
PRE_NMS_SCOPES = ("image", "level", "class")
#: A model attribute saying its output is already decoded, ``[B, 4 + C, A]`` as YOLOv8's exported head: per anchor
#: a box in input pixels, ``"xyxy"`` (x1, y1, x2, y2) or ``"xywh"`` (centre x, centre y, width, height), then
#: ``C`` class probabilities in [0, 1] (after the sigmoid). ``--nms`` then needs no knowledge of the head.
DECODED_BOXES_ATTR = "trt_prune_decoded_boxes"
BOX_FORMATS = ("xyxy", "xywh")


@dataclass
class DecodePlan:
    """How ``--nms`` decodes one model at one input size.

    ``module``: ``images -> (boxes [B, N, 4], scores [B, N, C])``, the part exported by :func:`export_onnx`.
    ``scope``: over what the ``pre_nms_topk`` best candidates are taken: the whole ``image`` (the demo
    detector), each FPN ``level`` (RetinaNet, FCOS: ``level_sizes`` anchors each) or each ``class`` (SSD),
    as the model's own post-processing does. ``defaults``: the model's own :class:`NMSConfig` settings.
    ``reference(images, config)``: the torch model's own post-processing, per-image detection dicts.
    """

    module: nn.Module
    num_classes: int
    num_anchors: int
    input_hw: tuple[int, int]
    scope: str = "image"
    level_sizes: tuple[int, ...] = ()
    defaults: dict = field(default_factory=dict)
    reference: object = None

    def config(self, **options) -> NMSConfig:
        """The model's own settings with ``options`` (non-``None`` values) over them, validated."""
        given = {k: v for k, v in options.items() if v is not None}
        return NMSConfig(**{**self.defaults, **given}).validate()

    def reference_from_decoded(self, boxes, scores, config: NMSConfig):
        """:func:`nms_reference` with this plan's pre-NMS scope."""
        return nms_reference(boxes, scores, self.input_hw, config, self.scope, self.level_sizes)


def decode_plan(model, input_shape, opset: int | None = None) -> DecodePlan:
    """The :class:`DecodePlan` of ``model`` at ``input_shape`` when ``--nms`` can decode it in ``opset``
    (``None``: the default): ``builtin:demo-detector`` (and folders pruned from it), and the cores of
    torchvision's RetinaNet, FCOS, SSD and SSDlite (``core:NAME``). Anything else raises :class:`ExportError`."""
    from trt_prune.models.cores import DetectionCore
    from trt_prune.models.demo_detector import DemoDetector

    if opset is not None and int(opset) < MIN_OPSET:
        raise ExportError(f"--nms needs opset {MIN_OPSET} or later, got {opset}")
    box_format = getattr(model, DECODED_BOXES_ATTR, None)
    if box_format is None and not isinstance(model, (DemoDetector, DetectionCore)):
        raise ExportError(f"--nms needs a known box decoder; it has one for builtin:demo-detector (and folders "
                          "pruned from it) and for core:retinanet_resnet50_fpn, core:fcos_resnet50_fpn, "
                          f"core:ssd300_vgg16, core:ssdlite320_mobilenet_v3_large; not for {type(model).__name__}. "
                          "A model whose output is already decoded ([B, 4 + C, A]: boxes in input pixels, then "
                          f"class probabilities, as YOLOv8's exported head) can say so: {DECODED_BOXES_ATTR} = "
                          "'xyxy' or 'xywh'. Otherwise export without --nms and decode outside the graph")
    if len(input_shape) != 4 or input_shape[1] != 3:
        raise ExportError(f"--nms needs an image input shape Bx3xHxW, got {'x'.join(map(str, input_shape))}")
    h, w = int(input_shape[2]), int(input_shape[3])
    if box_format is not None:
        return _decoded_plan(model, box_format, (h, w))
    if isinstance(model, DemoDetector):
        if h % 32 or w % 32:
            raise ExportError(f"the demo detector needs H and W that are multiples of 32, got {h}x{w}")
        wrapper = DetectorDecode(model, (h, w))

        def reference(images, config):
            with torch.no_grad():
                raw = model(images.to(wrapper.points.device))
            return reference_detections(raw, (h, w), config, strides=model.strides)

        return DecodePlan(wrapper, int(model.num_classes), int(wrapper.points.shape[0]), (h, w),
                          reference=reference)

    from trt_prune.detection.torchvision_decode import CoreDecode, core_kind, core_nms_defaults, core_reference

    core_kind(model)  # a core without a decoder raises before any work
    wrapper = CoreDecode(model, (h, w))

    def reference(images, config):
        images = images.to(wrapper.anchors.device)
        if not config.class_agnostic:
            return core_reference(model, images, config)
        with torch.no_grad():  # torchvision has no class-agnostic mode: its steps, then one NMS over all classes
            boxes, scores = wrapper(images)
        return nms_reference(boxes, scores, (h, w), config, wrapper.scope, wrapper.level_sizes)

    with torch.no_grad():
        num_classes = int(wrapper(torch.zeros(1, 3, h, w, device=wrapper.anchors.device))[1].shape[-1])
    return DecodePlan(wrapper, num_classes, wrapper.num_anchors, (h, w), wrapper.scope, wrapper.level_sizes,
                      core_nms_defaults(model), reference)


class DetectorDecode(nn.Module):
    """``images -> (boxes [B, N, 4] xyxy pixels clipped to the image, scores [B, N, C] sigmoid)``.

    The same arithmetic as :func:`trt_prune.detection.decode.decode` followed by :func:`postprocess`'s
    clipping, with the anchor points of the fixed input size as buffers.
    """

    def __init__(self, model: nn.Module, input_hw, strides=None):
        super().__init__()
        self.model = model
        h, w = int(input_hw[0]), int(input_hw[1])
        self.input_hw = (h, w)
        device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
        points, stride = anchor_points(h, w, tuple(strides or model.strides), device=device)
        self.register_buffer("points", points, persistent=False)
        self.register_buffer("stride", stride[:, None], persistent=False)
        self.register_buffer("upper", torch.tensor([w, h, w, h], dtype=torch.float32, device=device),
                             persistent=False)

    def forward(self, images):
        pred = self.model(images).transpose(1, 2)
        dist = F.softplus(pred[..., :4]) * self.stride
        boxes = torch.cat((self.points - dist[..., :2], self.points + dist[..., 2:]), -1)
        boxes = torch.minimum(boxes.clamp(min=0.0), self.upper)
        return boxes, pred[..., 4:].sigmoid()


class DecodedOutput(nn.Module):
    """``images -> (boxes [B, A, 4] xyxy pixels clipped to the image, scores [B, A, C])`` for a model whose output
    is already decoded (:data:`DECODED_BOXES_ATTR`): ``xywh`` boxes become corners, scores pass as they are."""

    def __init__(self, model: nn.Module, input_hw, box_format: str):
        super().__init__()
        if box_format not in BOX_FORMATS:
            raise ExportError(f"{type(model).__name__}.{DECODED_BOXES_ATTR} is {box_format!r}; it must be one of "
                              f"{', '.join(BOX_FORMATS)}")
        self.model = model
        self.box_format = box_format
        h, w = int(input_hw[0]), int(input_hw[1])
        self.input_hw = (h, w)
        device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
        self.register_buffer("upper", torch.tensor([w, h, w, h], dtype=torch.float32, device=device),
                             persistent=False)

    def forward(self, images):
        pred = self.model(images).transpose(1, 2)
        boxes = pred[..., :4]
        if self.box_format == "xywh":
            half = boxes[..., 2:] / 2
            boxes = torch.cat((boxes[..., :2] - half, boxes[..., :2] + half), -1)
        return torch.minimum(boxes.clamp(min=0.0), self.upper), pred[..., 4:]


def _decoded_plan(model, box_format, input_hw) -> DecodePlan:
    """The plan for a model that declares its output decoded: checked once on a blank image (a ``[B, 4 + C, A]``
    tensor, scores in [0, 1]); its reference is :func:`nms_reference` on the same conversion in torch."""
    h, w = input_hw
    wrapper = DecodedOutput(model, (h, w), box_format)
    with torch.no_grad():
        raw = model(torch.zeros(1, 3, h, w, device=wrapper.upper.device))
    if not isinstance(raw, torch.Tensor) or raw.dim() != 3 or raw.shape[1] < 5:
        shape = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ExportError(f"{type(model).__name__} declares {DECODED_BOXES_ATTR}={box_format!r} but its output is "
                          f"{shape}, not [B, 4 + num_classes, anchors]")
    scores = raw[:, 4:]
    if not bool(((scores >= 0) & (scores <= 1)).all()):
        raise ExportError(f"{type(model).__name__} declares {DECODED_BOXES_ATTR}={box_format!r} but its class scores "
                          f"span [{float(scores.min()):.3g}, {float(scores.max()):.3g}]; they must be probabilities "
                          "in [0, 1] (apply the sigmoid in the model)")

    def reference(images, config):
        with torch.no_grad():
            boxes, scores = wrapper(images.to(wrapper.upper.device))
        return nms_reference(boxes, scores, (h, w), config)

    return DecodePlan(wrapper, int(raw.shape[1]) - 4, int(raw.shape[2]), (h, w), reference=reference)


def _candidates(flat_scores, threshold: float, k: int):
    """Indices into ``flat_scores`` with score ``> threshold``, at most the ``k`` best (torchvision's order)."""
    keep = torch.nonzero(flat_scores > threshold).squeeze(1)
    if keep.numel() > k:
        keep = keep[flat_scores[keep].topk(k).indices]
    return keep


def nms_reference(boxes, scores, input_hw, config: NMSConfig, scope: str = "image",
                  level_sizes=()) -> list[dict[str, torch.Tensor]]:
    """:func:`postprocess` from decoded ``boxes [B, N, 4]`` and ``scores [B, N, C]``, with ``config``'s options.

    Same steps: strict score threshold, the ``pre_nms_topk`` best candidates (of the whole image, of each
    level of ``level_sizes`` anchors, or of each class: ``scope``), clipping, NMS per class (``batched_nms``)
    or over all candidates (``nms``) when class-agnostic, the first ``max_detections``.
    """
    if scope not in PRE_NMS_SCOPES:
        raise ExportError(f"unknown pre-NMS scope {scope!r}; choose one of {', '.join(PRE_NMS_SCOPES)}")
    boxes, scores = torch.as_tensor(boxes).float(), torch.as_tensor(scores).float()
    h, w = float(input_hw[0]), float(input_hw[1])
    nc = scores.shape[-1]
    k, threshold = config.pre_nms_topk, config.score_threshold
    results = []
    for b in range(boxes.shape[0]):
        if scope == "class":
            parts = [(_candidates(scores[b, :, c], threshold, k), c) for c in range(nc)]
            anchor = torch.cat([idx for idx, _ in parts])
            label = torch.cat([torch.full_like(idx, c) for idx, c in parts])
        else:
            spans = [(0, scores.shape[1])] if scope == "image" else _spans(level_sizes)
            keep = torch.cat([start * nc + _candidates(scores[b, start:end].reshape(-1), threshold, k)
                              for start, end in spans])
            anchor, label = keep // nc, keep % nc
        cand = boxes[b, anchor].clone()
        cand[:, 0::2] = cand[:, 0::2].clamp(0.0, w)
        cand[:, 1::2] = cand[:, 1::2].clamp(0.0, h)
        cand_scores = scores[b, anchor, label]
        if config.class_agnostic:
            kept = torchvision.ops.nms(cand, cand_scores, config.iou_threshold)
        else:
            kept = torchvision.ops.batched_nms(cand, cand_scores, label, config.iou_threshold)
        kept = kept[: config.max_detections]
        results.append({"boxes": cand[kept], "scores": cand_scores[kept], "labels": label[kept]})
    return results


def _spans(level_sizes) -> list[tuple[int, int]]:
    ends = np.cumsum([int(n) for n in level_sizes]).tolist()
    return list(zip([0, *ends[:-1]], ends, strict=True))


def reference_detections(raw, input_hw, config: NMSConfig | None = None, strides=None
                         ) -> list[dict[str, torch.Tensor]]:
    """The torch reference for the graph: :func:`postprocess` itself for per-class NMS with the default
    pre-NMS top-k, :func:`nms_reference` on :func:`decode`'s output otherwise."""
    config = (config or NMSConfig()).validate()
    kwargs = {"strides": tuple(strides)} if strides is not None else {}
    if not config.class_agnostic and config.pre_nms_topk == PRE_NMS_TOPK:
        return postprocess(raw, input_hw, config.score_threshold, config.iou_threshold, config.max_detections,
                           **kwargs)
    boxes, scores = decode(raw, input_hw, **kwargs)
    return nms_reference(boxes, scores, input_hw, config)


def pad_detections(detections, max_detections: int) -> dict[str, np.ndarray]:
    """Per-image detection dicts → the graph's four padded arrays (by :data:`OUTPUT_NAMES`)."""
    b = len(detections)
    num = np.zeros((b, 1), np.int32)
    boxes = np.zeros((b, max_detections, 4), np.float32)
    scores = np.zeros((b, max_detections), np.float32)
    classes = np.zeros((b, max_detections), np.int32)
    for i, det in enumerate(detections):
        n = min(len(det["scores"]), max_detections)
        num[i, 0] = n
        boxes[i, :n] = _np(det["boxes"])[:n]
        scores[i, :n] = _np(det["scores"])[:n]
        classes[i, :n] = _np(det["labels"])[:n]
    return dict(zip(OUTPUT_NAMES, (num, boxes, scores, classes), strict=True))


def _per_image(detections) -> list:
    if isinstance(detections, dict) or (len(detections) == len(OUTPUT_NAMES)
                                        and not isinstance(detections[0], dict)):
        return unpad_detections(detections)
    return list(detections)


def unpad_detections(outputs) -> list[dict[str, np.ndarray]]:
    """The graph's four outputs (a dict by name, or a sequence in :data:`OUTPUT_NAMES` order) → one
    ``{"boxes", "scores", "labels"}`` dict per image, as :func:`postprocess` returns (numpy)."""
    num, boxes, scores, classes = (outputs[n] for n in OUTPUT_NAMES) if isinstance(outputs, dict) else outputs
    result = []
    for i in range(len(num)):
        n = int(np.asarray(num)[i].reshape(-1)[0])
        result.append({"boxes": np.asarray(boxes[i, :n]), "scores": np.asarray(scores[i, :n]),
                       "labels": np.asarray(classes[i, :n]).astype(np.int64)})
    return result


class DetectorWithNMS(nn.Module):
    """Eager torch equivalent of the exported graph: ``images ->`` the four padded outputs (int32 where the
    graph has int32), computed by :func:`reference_detections` on the detector's raw output."""

    def __init__(self, model: nn.Module, input_hw, config: NMSConfig | None = None):
        super().__init__()
        self.model = model
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.config = (config or NMSConfig()).validate()

    @torch.no_grad()
    def forward(self, images):
        raw = self.model(images)
        dets = reference_detections(raw, self.input_hw, self.config, strides=getattr(self.model, "strides", None))
        padded = pad_detections(dets, self.config.max_detections)
        return tuple(torch.from_numpy(padded[n]) for n in OUTPUT_NAMES)


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ---------------------------------------------------------------------------------------------- ONNX tail
class _Tail:
    """Collects the nodes and constants of the post-processing appended to the decode graph."""

    def __init__(self, prefix: str = "nms"):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def const(self, hint: str, values, dtype) -> str:
        array = np.asarray(values, dtype=dtype)
        name = self._name(hint)
        self.initializers.append(onnx.numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs, outputs: int | list[str] = 1, domain: str = "", **attrs):
        names = [self._name(f"{op_type}_out{i}") for i in range(outputs)] if isinstance(outputs, int) else outputs
        node = helper.make_node(op_type, list(inputs), names, name=self._name(op_type), domain=domain, **attrs)
        self.nodes.append(node)
        return names[0] if len(names) == 1 else names


def _topk_mask(t: _Tail, scores: str, k: int, axis: int) -> str:
    """``scores`` with every entry outside the ``k`` largest along ``axis`` set to 0."""
    values, indices = t.op("TopK", [scores, t.const("pre_k", [k], np.int64)], 2, axis=axis, largest=1, sorted=1)
    zeros = t.op("ConstantOfShape", [t.op("Shape", [scores])],
                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    return t.op("ScatterElements", [zeros, indices, values], axis=axis)


def _pre_nms_mask(t: _Tail, scores: str, num_anchors: int, num_classes: int, config: NMSConfig, scope: str,
                  level_sizes) -> str:
    """Scores ``[B, N, C]`` with every entry outside the ``pre_nms_topk`` best of its ``scope`` set to 0."""
    k = config.pre_nms_topk
    if scope == "class":  # per class, over the anchors
        if k >= num_anchors:
            return scores
        return _topk_mask(t, scores, k, axis=1)
    spans = [(0, num_anchors)] if scope == "image" else _spans(level_sizes)
    if all(k >= (end - start) * num_classes for start, end in spans):
        return scores
    flat_shape = t.const("flat", [0, -1], np.int64)
    parts = []
    for start, end in spans:
        part = scores
        if len(spans) > 1:
            part = t.op("Slice", [scores, t.const("start", [start], np.int64), t.const("end", [end], np.int64),
                                  t.const("axis", [1], np.int64)])
        if k < (end - start) * num_classes:
            flat = t.op("Reshape", [part, flat_shape])
            part = t.op("Reshape", [_topk_mask(t, flat, k, axis=1), t.op("Shape", [part])])
        parts.append(part)
    return parts[0] if len(parts) == 1 else t.op("Concat", parts, axis=1)


def _onnx_nms_tail(t: _Tail, boxes: str, scores: str, num_anchors: int, num_classes: int,
                   config: NMSConfig, scope: str, level_sizes) -> list[str]:
    total = num_anchors * num_classes
    scores = _pre_nms_mask(t, scores, num_anchors, num_classes, config, scope, level_sizes)
    by_class = t.op("Transpose", [scores], perm=[0, 2, 1])  # [B, C, N]
    if config.class_agnostic:
        nms_boxes = t.op("Tile", [boxes, t.const("tile", [1, num_classes, 1], np.int64)])  # [B, C*N, 4]
        nms_scores = t.op("Reshape", [by_class, t.const("one_class", [0, 1, -1], np.int64)])  # [B, 1, C*N]
    else:
        nms_boxes, nms_scores = boxes, by_class
    selected = t.op("NonMaxSuppression", [
        nms_boxes, nms_scores, t.const("max_per_class", [config.max_detections], np.int64),
        t.const("iou_threshold", [config.iou_threshold], np.float32),
        t.const("score_threshold", [config.score_threshold], np.float32)], center_point_box=0)  # [S, 3]
    # Survivors into a dense [B, C, N] score map (-1 elsewhere), then the K best per image over all classes.
    fill = t.op("ConstantOfShape", [t.op("Shape", [nms_scores])],
                value=helper.make_tensor("minus_one", TensorProto.FLOAT, [1], [-1.0]))
    kept = t.op("ScatterND", [fill, selected, t.op("GatherND", [nms_scores, selected])])
    flat = t.op("Reshape", [kept, t.const("flat", [0, -1], np.int64)])  # [B, C*N], index c * N + n
    k = min(config.max_detections, total)
    values, indices = t.op("TopK", [flat, t.const("k", [k], np.int64)], 2, axis=-1, largest=1, sorted=1)
    valid = t.op("GreaterOrEqual", [values, t.const("zero", 0.0, np.float32)])  # survivors have score > 0
    n_anchor = t.const("num_anchors", num_anchors, np.int64)
    anchor = t.op("Mod", [indices, n_anchor])
    label = t.op("Div", [indices, n_anchor])
    picked = t.op("GatherND", [boxes, t.op("Unsqueeze", [anchor, t.const("last", [-1], np.int64)])], batch_dims=1)
    det_boxes = t.op("Where", [t.op("Unsqueeze", [valid, t.const("last", [-1], np.int64)]), picked,
                               t.const("zero", 0.0, np.float32)])
    det_scores = t.op("Where", [valid, values, t.const("zero", 0.0, np.float32)])
    det_classes = t.op("Cast", [t.op("Where", [valid, label, t.const("zero", 0, np.int64)])], to=TensorProto.INT32)
    count = t.op("ReduceSum", [t.op("Cast", [valid], to=TensorProto.FLOAT), t.const("axis", [1], np.int64)],
                 keepdims=1)
    outputs = [t.op("Cast", [count], [OUTPUT_NAMES[0]], to=TensorProto.INT32)]
    pad = config.max_detections - k
    for name, tensor, rank in zip(OUTPUT_NAMES[1:], (det_boxes, det_scores, det_classes), (3, 2, 2), strict=True):
        if pad:
            pads = [0, 0] + [0] * (rank - 2) + [0, pad] + [0] * (rank - 2)
            t.op("Pad", [tensor, t.const("pads", pads, np.int64)], [name])
        else:
            t.op("Identity", [tensor], [name])
        outputs.append(name)
    return outputs


def _efficient_tail(t: _Tail, boxes: str, scores: str, num_anchors: int, num_classes: int,
                    config: NMSConfig, scope: str, level_sizes) -> list[str]:
    scores = _pre_nms_mask(t, scores, num_anchors, num_classes, config, scope, level_sizes)
    t.op("EfficientNMS_TRT", [boxes, scores], list(OUTPUT_NAMES), plugin_version="1", background_class=-1,
         max_output_boxes=config.max_detections, score_threshold=float(config.score_threshold),
         iou_threshold=float(config.iou_threshold), score_activation=0,
         class_agnostic=int(config.class_agnostic), box_coding=0)
    return list(OUTPUT_NAMES)


def append_nms(decode_model: onnx.ModelProto, config: NMSConfig, num_anchors: int, num_classes: int,
               scope: str = "image", level_sizes=()) -> onnx.ModelProto:
    """A copy of ``decode_model`` (outputs :data:`DECODED_NAMES`: boxes ``[B, N, 4]``, scores ``[B, N, C]``)
    with the post-processing of ``config`` appended; its outputs are :data:`OUTPUT_NAMES`. ``scope`` and
    ``level_sizes``: see :class:`DecodePlan`."""
    config = config.validate()
    if scope not in PRE_NMS_SCOPES:
        raise ExportError(f"unknown pre-NMS scope {scope!r}; choose one of {', '.join(PRE_NMS_SCOPES)}")
    if scope == "level" and sum(level_sizes) != num_anchors:
        raise ExportError(f"level sizes {list(level_sizes)} do not add up to the {num_anchors} anchors")
    model = onnx.ModelProto()
    model.CopyFrom(decode_model)
    graph = model.graph
    names = [o.name for o in graph.output]
    if names != list(DECODED_NAMES):
        raise ExportError(f"the decode graph has outputs {names}, expected {list(DECODED_NAMES)}")
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise ExportError(f"--nms needs opset {MIN_OPSET} or later, got {opset}")
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    tail = _Tail()
    build = _efficient_tail if config.plugin == "efficient" else _onnx_nms_tail
    build(tail, DECODED_NAMES[0], DECODED_NAMES[1], num_anchors, num_classes, config, scope, level_sizes)
    graph.node.extend(tail.nodes)
    graph.initializer.extend(tail.initializers)
    del graph.output[:]
    k = config.max_detections
    for name, dtype, dims in zip(OUTPUT_NAMES, (TensorProto.INT32, TensorProto.FLOAT, TensorProto.FLOAT,
                                                 TensorProto.INT32), ([1], [k, 4], [k], [k]), strict=True):
        value = helper.make_tensor_value_info(name, dtype, [None, *dims])
        value.type.tensor_type.shape.dim[0].CopyFrom(batch)
        graph.output.append(value)
    return model


# ------------------------------------------------------------------------------------------------ running
def run_detections(model, images) -> dict[str, np.ndarray]:
    """Run an ``--nms`` graph (path or proto) in ONNX Runtime on ``images`` (torch or numpy ``[B, 3, H, W]``)."""
    from trt_prune.onnx_io import run_onnxruntime

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    name = proto.graph.input[0].name
    source = model if isinstance(model, onnx.ModelProto) else str(model)
    return run_onnxruntime(source, {name: np.ascontiguousarray(_np(images), dtype=np.float32)})


def compare_detections(actual, expected, box_tol: float = 1e-3, score_tol: float = 1e-4) -> dict:
    """How closely detections ``actual`` reproduce ``expected`` (each: per-image dicts, or padded outputs).

    Detections are paired greedily in ``expected``'s order with an unpaired one of ``actual`` of the same
    class whose box is within ``box_tol`` (max abs, pixels) and score within ``score_tol``; pairing, rather
    than comparing rank by rank, lets exact score ties come out in either order. Returns counts, the worst
    box and score differences over pairs, ``class_agreement`` (pairs / larger count; 1.0 when both are
    empty), ``identical_images`` (every detection paired both ways) and ``same`` (all images identical).

    Exact score ties make "the same detections" ambiguous: at a top-k boundary either of two candidates with
    equal scores may be kept (ONNX ``TopK`` keeps the lower index, torch's ``topk`` does not promise one).
    ``tie_swaps`` counts the unpaired detections of images whose unpaired scores are the same on both sides
    (within ``score_tol``), and ``same_up_to_ties`` says every image is identical or differs only so.
    """
    actual, expected = _per_image(actual), _per_image(expected)
    if len(actual) != len(expected):
        raise ExportError(f"{len(actual)} images of detections to compare with {len(expected)}")
    stats = {"images": len(expected), "detections_expected": 0, "detections_actual": 0, "paired": 0,
             "identical_images": 0, "tie_swaps": 0, "tied_images": 0, "max_box_diff": 0.0, "max_score_diff": 0.0}
    for act, exp in zip(actual, expected, strict=True):
        ab, asc, al = (_np(act[k]).astype(np.float64) for k in ("boxes", "scores", "labels"))
        eb, esc, el = (_np(exp[k]).astype(np.float64) for k in ("boxes", "scores", "labels"))
        ab, eb = ab.reshape(-1, 4), eb.reshape(-1, 4)
        free = np.ones(len(al), bool)
        found = np.zeros(len(el), bool)
        paired = 0
        for i in range(len(el)):
            box_diff = np.abs(ab - eb[i]).max(1) if len(ab) else np.zeros(0)
            score_diff = np.abs(asc - esc[i])
            ok = free & (al == el[i]) & (box_diff <= box_tol) & (score_diff <= score_tol)
            if ok.any():
                j = int(np.flatnonzero(ok)[np.argmin(box_diff[ok])])
                free[j] = False
                found[i] = True
                paired += 1
                stats["max_box_diff"] = max(stats["max_box_diff"], float(box_diff[j]))
                stats["max_score_diff"] = max(stats["max_score_diff"], float(score_diff[j]))
        stats["detections_expected"] += len(el)
        stats["detections_actual"] += len(al)
        stats["paired"] += paired
        identical = paired == len(el) == len(al)
        stats["identical_images"] += int(identical)
        if not identical:
            lone_actual, lone_expected = np.sort(asc[free]), np.sort(esc[~found])
            if len(lone_actual) == len(lone_expected) and np.all(np.abs(lone_actual - lone_expected) <= score_tol):
                stats["tied_images"] += 1
                stats["tie_swaps"] += len(lone_actual)
    larger = max(stats["detections_expected"], stats["detections_actual"])
    stats["class_agreement"] = stats["paired"] / larger if larger else 1.0
    stats["same"] = stats["identical_images"] == stats["images"]
    stats["same_up_to_ties"] = stats["identical_images"] + stats["tied_images"] == stats["images"]
    return stats


# ------------------------------------------------------------------------------------------------- export
@dataclass
class NMSExportResult:
    """What :func:`export_detector_nms` wrote. ``decode`` is the export of the decode part (exporter, its
    parity on the decoded boxes and scores); ``nms_parity`` compares the graph's post-processing with
    :func:`nms_reference` on the same decoded inputs; ``detections_parity`` compares the whole graph with
    the torch model and :func:`reference_detections` (both on RoadScenes validation images; empty when
    parity was off or the graph holds a TensorRT plugin)."""

    path: str
    config: NMSConfig
    decode: object  # trt_prune.exporter.ExportResult of the decode graph
    op: str
    output_names: list[str]
    output_shapes: dict[str, list]
    nms_parity: dict = field(default_factory=dict)
    detections_parity: dict = field(default_factory=dict)
    pre_nms_scope: str = "image"

    def to_dict(self) -> dict:
        data = self.decode.to_dict()
        data.update(path=self.path, output_names=list(self.output_names), decode_outputs=list(DECODED_NAMES),
                    nms={**self.config.to_dict(), "op": self.op, "outputs": self.output_shapes,
                         "pre_nms_scope": self.pre_nms_scope},
                    nms_parity=self.nms_parity, detections_parity=self.detections_parity)
        return data


def check_images(input_hw, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` RoadScenes validation images at ``input_hw``, ``[count, 3, H, W]`` float32 in [0, 1].

    RoadScenes draws sizes that are multiples of 32; other sizes (SSD300's 300x300) are cropped from the next
    such size up."""
    from trt_prune.data import RoadScenes

    h, w = int(input_hw[0]), int(input_hw[1])
    if h < 1 or w < 1:
        raise ExportError(f"cannot draw check images at {h}x{w}; give a positive height and width")
    size = (-(-h // 32) * 32, -(-w // 32) * 32)
    scenes = RoadScenes("val", length=max(count, 1), size=size, seed=seed)
    return torch.stack([scenes[i][0][:, :h, :w] for i in range(count)], 0)


def export_detector_nms(model, path, input_shape=(1, 3, 320, 320), config: NMSConfig | None = None, *,
                        exporter: str = "dynamo", opset: int | None = None, dynamic_batch: bool = True,
                        check_parity: bool = True, atol: float = 1e-4, rtol: float = 1e-3) -> NMSExportResult:
    """Export ``model`` (a detector :func:`decode_plan` accepts) with decoding and NMS in the graph.

    ``config=None`` uses the model's own post-processing settings (:attr:`DecodePlan.defaults`). ``config``
    validates first, then the model; nothing is written until every check passed, and ``path`` appears atomically.
    With ``check_parity``: the decode part is checked by :func:`export_onnx` (random inputs, batch and batch+1,
    ``atol`` and ``rtol``; boxes are in pixels), then, for the ``onnx`` plugin, the finished graph runs in ONNX
    Runtime on RoadScenes validation images (batch and batch+1, when dynamic): its detections must equal
    :func:`nms_reference` on the decode graph's own boxes and scores (else :class:`ExportError`), and are compared
    with the torch model's own post-processing, :attr:`DecodePlan.reference` (reported in ``detections_parity``).
    """
    from trt_prune.exporter import export_onnx
    from trt_prune.onnx_io import load_onnx, run_onnxruntime, save_onnx, staging_folder

    if config is not None:
        config.validate()
    plan = decode_plan(model, tuple(input_shape), opset)
    config = plan.config() if config is None else config
    h, w = plan.input_hw
    with staging_folder(path) as tmp:
        decoded_path = tmp / "decode.onnx"
        decoded = export_onnx(plan.module, decoded_path, tuple(input_shape), exporter=exporter, opset=opset,
                              dynamic_batch=dynamic_batch, output_names=DECODED_NAMES, check_parity=check_parity,
                              atol=atol, rtol=rtol)
        decode_model = load_onnx(decoded_path, error=ExportError)
        final = append_nms(decode_model, config, plan.num_anchors, plan.num_classes, plan.scope, plan.level_sizes)
        if config.plugin == "onnx":
            try:
                onnx.checker.check_model(final, full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
                raise ExportError(f"the graph with NMS fails onnx.checker: {exc}") from exc
        nms_parity, det_parity = {}, {}
        if check_parity and config.plugin == "onnx":
            batch = int(input_shape[0])
            batches = [batch, batch + 1] if dynamic_batch else [batch]
            images = check_images((h, w), sum(batches))
            nms_stats, det_stats = [], []
            start = 0
            for b in batches:
                chunk = images[start:start + b]
                start += b
                try:
                    got = run_detections(final, chunk)
                    boxes, scores = run_onnxruntime(decoded_path, {decoded.input_names[0]: chunk.numpy()}).values()
                except Exception as exc:
                    raise ExportError(f"ONNX Runtime cannot run the graph with NMS at batch {b} ({exc})") from exc
                nms_stats.append(compare_detections(got, plan.reference_from_decoded(boxes, scores, config)))
                # boxes within the pixels the decode check allowed (1e-3 px at the default atol)
                det_stats.append(compare_detections(got, plan.reference(chunk, config), box_tol=max(1e-3, atol)))
            nms_parity, det_parity = _merge(nms_stats), _merge(det_stats)
            if not det_parity["detections_expected"]:
                count = det_parity["images"]
                note = (f"the torch model finds nothing above score {config.score_threshold} on the {count} "
                        f"check image{'s' if count != 1 else ''}, so only empty outputs were compared")
                nms_parity["note"] = det_parity["note"] = note
            if not nms_parity["same_up_to_ties"]:
                hint = ""
                distinct = int(np.unique(scores).size)
                if distinct < min(scores.size, config.max_detections):
                    # an untrained head (SSDlite's zero-initialised classifier) scores every box the same
                    hint = (f"; the scores hold only {distinct} distinct value(s), as an untrained head gives, and "
                            "exact ties may be broken in another order: load trained weights, or pass "
                            "check_parity=False (--no-parity)")
                raise ExportError(f"the graph's NMS differs from torch on the same decoded boxes and scores "
                                  f"({nms_parity['paired']} of {nms_parity['detections_expected']} detections "
                                  f"paired){hint}; nothing was written")
        written = save_onnx(final, path)
    op = "EfficientNMS_TRT" if config.plugin == "efficient" else "NonMaxSuppression"
    batch_dim = "batch" if dynamic_batch else int(input_shape[0])
    k = config.max_detections
    shapes = {OUTPUT_NAMES[0]: [batch_dim, 1], OUTPUT_NAMES[1]: [batch_dim, k, 4], OUTPUT_NAMES[2]: [batch_dim, k],
              OUTPUT_NAMES[3]: [batch_dim, k]}
    return NMSExportResult(path=str(written), config=config, decode=decoded, op=op, output_names=list(OUTPUT_NAMES),
                           output_shapes=shapes, nms_parity=nms_parity, detections_parity=det_parity,
                           pre_nms_scope=plan.scope)


def _merge(stats: list[dict]) -> dict:
    total = {key: sum(s[key] for s in stats) for key in ("images", "detections_expected", "detections_actual",
                                                          "paired", "identical_images")}
    total["max_box_diff"] = max(s["max_box_diff"] for s in stats)
    total["max_score_diff"] = max(s["max_score_diff"] for s in stats)
    larger = max(total["detections_expected"], total["detections_actual"])
    total["class_agreement"] = total["paired"] / larger if larger else 1.0
    total["same"] = total["identical_images"] == total["images"]
    total["tie_swaps"] = sum(s["tie_swaps"] for s in stats)
    total["tied_images"] = sum(s["tied_images"] for s in stats)
    total["same_up_to_ties"] = total["identical_images"] + total["tied_images"] == total["images"]
    return total
