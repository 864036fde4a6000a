"""A YOLOv8/YOLO11-style anchor-free detector (C2f backbone, C2PSA attention, FPN/PAN neck, decoupled heads, DFL
box decoder; :mod:`hard_detector`) prunes at 50 % with no ``ignore``: the report names what stays whole and why,
dead channels prune exactly, and the pruned model exports to ONNX, with and without NMS in the graph."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from hard_detector import HardDetector, build  # tests/cpu/ is on sys.path under pytest

from trt_prune.detection.nms_export import (
    OUTPUT_NAMES,
    DecodedOutput,
    NMSConfig,
    compare_detections,
    decode_plan,
    export_detector_nms,
    nms_reference,
    run_detections,
)
from trt_prune.errors import ExportError, PruneError
from trt_prune.exporter import export_onnx
from trt_prune.onnx_io import run_onnxruntime
from trt_prune.pruning import macs_of, prune, trace

SHAPE = (1, 3, 128, 128)
HW = SHAPE[2:]
ANCHORS = 16 * 16 + 8 * 8 + 4 * 4  # strides 8, 16, 32 at 128x128
BOX_GROUP = "head.box.0.2+head.box.1.2+head.box.2.2"
CLS_GROUP = "head.cls.0.2+head.cls.1.2+head.cls.2.2"
DFL_REASON = "convolution 'head.dfl.conv' reads channels from dim 2, expected 1"


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((batch, *SHAPE[1:]), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def pruned():
    return prune(build(), SHAPE, ratio=0.5)


def test_prunes_half_without_ignore(pruned):
    report, p = pruned.report, pruned.model
    assert (report["params_before"], report["macs_before"]) == (692_124, 60_400_384)
    # measured: 184 916 parameters (0.267) and 17 624 576 MACs (0.292) are left
    assert 0.25 * report["params_before"] < report["params_after"] < 0.28 * report["params_before"]
    assert 0.28 * report["macs_before"] < report["macs_after"] < 0.30 * report["macs_before"]
    assert macs_of(p, SHAPE) == report["macs_after"]  # a recount on the pruned model's own trace
    assert (report["groups_total"], report["groups_pruned"]) == (56, 54)
    # every part of the network lost channels: backbone C2f (both halves of the chunk), attention heads, neck, heads
    # (halves of 24 keep 16: round(12 / 8) * 8, each half alike, so chunk(2, 1) still splits in the right place)
    assert p.stem.conv.out_channels == 8 and p.c2f2.cv1.conv.out_channels == 2 * 16
    assert p.c2f2.m[1].cv1.conv.in_channels == 16 and p.c2f2.cv2.conv.in_channels == 4 * 16
    assert p.psa.attn.qkv.conv.out_channels == 2 * 3 * 16 and p.psa.attn.pe.conv.groups == 32  # 2 heads of q, k, v
    assert p.td3.cv1.conv.in_channels == 32 + 24 and p.pan5.cv2.conv.out_channels == 48
    # the output convs keep their channels (DFL bins, classes) and read pruned features; the DFL is untouched
    assert [tuple(b[2].weight.shape) for b in p.head.box] == [(64, 16, 1, 1)] * 3
    assert [tuple(c[2].weight.shape) for c in p.head.cls] == [(4, 16, 1, 1)] * 3
    assert torch.equal(p.head.dfl.conv.weight.view(-1), torch.arange(16.0))
    x = _images(2)
    with torch.no_grad():
        out = p(x)
    assert out.shape == (2, 8, ANCHORS) and torch.isfinite(out).all()
    assert ((out[:, 4:] >= 0) & (out[:, 4:] <= 1)).all()


def test_report_names_every_group_kept_whole_and_strict_refuses(pruned):
    assert pruned.report["kept_whole"] == [{"module": "head.dfl.conv", "op": "conv2d", "reason": DFL_REASON}]
    assert {g["key"]: g["reason"] for g in pruned.report["skipped_groups"]} == {
        BOX_GROUP: f"conv2d in 'head.dfl.conv': {DFL_REASON}",
        CLS_GROUP: "coupled to a model output",
    }
    with pytest.raises(PruneError, match=r"convolution 'head\.dfl\.conv' reads channels from dim 2.*\(strict: "
                                         r"this would keep the channels of 'head\.dfl\.conv' whole"):
        prune(build(), SHAPE, ratio=0.5, strict=True)


def test_dispatch_and_export_tracers_agree():
    model, example = build(), _images(1)
    dispatch, export = trace(model, example, tracer="dispatch"), trace(model, example, tracer="export")
    assert [(g.key, g.pinned, g.segments, g.classes) for g in dispatch.groups] == \
           [(g.key, g.pinned, g.segments, g.classes) for g in export.groups]
    assert dispatch.macs() == export.macs() == 60_400_384
    assert dispatch.kept_whole == export.kept_whole


def test_dead_channels_prune_exactly(kill_channels):
    """The second half of every prunable group (per chunk segment: C2f halves, q/k and v) is dead: pruning at 50 %
    with round_to=1 removes exactly those and the outputs (boxes in pixels, scores) stay the same."""
    model = build()
    graph = trace(model, _images(1))
    kill_channels(model, graph)
    x = _images(2)
    with torch.no_grad():
        expected = model(x)
    result = prune(model, SHAPE, ratio=0.5, round_to=1)
    groups = {g.key: g for g in graph.groups}
    for entry in result.recipe["groups"]:
        segments = groups[entry["key"]].segments or [list(range(entry["channels"]))]
        assert entry["keep"] == sorted(p for seg in segments for p in seg[:len(seg) // 2]), entry["key"]
    assert len(result.recipe["groups"]) == 54
    with torch.no_grad():
        got = result.model(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pruned_detector_exports_to_onnx(pruned, tmp_path):
    result = export_onnx(pruned.model, tmp_path / "det.onnx", SHAPE)  # dynamo, dynamic batch, its own parity check
    assert result.exporter == "dynamo" and result.fallback_reason is None
    assert result.parity["output"]["max_abs"] < 1e-3
    model = onnx.load(result.path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # the file holds the pruned weights: 184 355 values (BatchNorm folded or not), not the dense 692 124
    assert sum(math.prod(t.dims) for t in model.graph.initializer) < 0.3 * pruned.report["params_before"]
    x = _images(3, seed=7)
    got = run_onnxruntime(result.path, {"images": x.numpy()})["output"]
    with torch.no_grad():
        expected = pruned.model(x)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-3)


def test_pruned_detector_exports_with_nms(pruned, tmp_path):
    """The model declares its output decoded (xyxy pixels, probabilities): ``--nms`` converts, clips and selects;
    the graph's detections equal :func:`nms_reference` on the torch model's own boxes and scores."""
    result = export_detector_nms(pruned.model, tmp_path / "nms.onnx", SHAPE, exporter="torchscript")
    assert result.output_names == list(OUTPUT_NAMES) and result.op == "NonMaxSuppression"
    assert result.nms_parity["same"] and result.detections_parity["same"]
    assert result.detections_parity["detections_expected"] > 100  # 3 check images
    model = onnx.load(result.path)
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    # the model itself on other images (noise, no flat areas whose equal scores NMS may order either way), for
    # the default settings and for a class-agnostic, thresholded one
    agnostic = NMSConfig(score_threshold=0.5, max_detections=20, pre_nms_topk=200, class_agnostic=True)
    export_detector_nms(pruned.model, tmp_path / "agnostic.onnx", SHAPE, agnostic, exporter="torchscript",
                        check_parity=False)
    images = _images(4, seed=5)
    with torch.no_grad():
        boxes, scores = DecodedOutput(pruned.model, HW, "xyxy")(images)
    for path, config in ((result.path, NMSConfig()), (tmp_path / "agnostic.onnx", agnostic)):
        got = run_detections(path, images)
        assert got["detection_boxes"].shape == (4, config.max_detections, 4)
        assert (got["num_detections"] > 5).all()
        stats = compare_detections(got, nms_reference(boxes, scores, HW, config))
        assert stats["same"] and stats["max_box_diff"] < 1e-3, stats


class CentreBoxes(HardDetector):
    """The same detector with YOLOv8's exported box format: centre x, centre y, width, height."""

    trt_prune_decoded_boxes = "xywh"

    def forward(self, x):
        out = super().forward(x)
        corners = out[:, :4]
        centre = torch.cat(((corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]), 1)
        return torch.cat((centre, out[:, 4:]), 1)


def test_decoded_output_formats_and_refusals():
    model = build()
    centre = CentreBoxes()
    centre.load_state_dict(model.state_dict())
    centre.eval()
    plan = decode_plan(centre, SHAPE)
    assert (plan.num_classes, plan.num_anchors, plan.input_hw, plan.scope) == (4, ANCHORS, HW, "image")
    x = _images(2)
    with torch.no_grad():
        got, want = plan.module(x), DecodedOutput(model, HW, "xyxy")(x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1], want[1])
    assert got[0].min() == 0 and got[0].max() == HW[0]  # clipped to the image

    class Unknown(HardDetector):
        trt_prune_decoded_boxes = "cxcywh"

    with pytest.raises(ExportError, match="'cxcywh'; it must be one of xyxy, xywh"):
        decode_plan(Unknown().eval(), SHAPE)

    class Logits(HardDetector):
        def forward(self, x):
            out = super().forward(x)
            return torch.cat((out[:, :4], torch.logit(out[:, 4:])), 1)

    with pytest.raises(ExportError, match=r"class scores span .* must be probabilities in \[0, 1\]"):
        decode_plan(Logits().eval(), SHAPE)
