"""``export --nms`` for the cores of torchvision's RetinaNet, FCOS and SSDlite: the graph in ONNX Runtime gives
the detections of the detector's own ``postprocess_detections`` on road-scene images."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torchvision
from click.testing import CliRunner

from trt_prune.cli import cli
from trt_prune.detection.nms_export import (
    NMSConfig,
    append_nms,
    check_images,
    compare_detections,
    decode_plan,
    export_detector_nms,
    run_detections,
)
from trt_prune.detection.torchvision_decode import core_reference
from trt_prune.errors import ExportError
from trt_prune.exporter import export_onnx
from trt_prune.models.cores import calibrate_batchnorm, detection_core
from trt_prune.onnx_io import load_onnx

# name: input size, score threshold low enough that a random-weight head has candidates (None: the model's own),
# and the box tolerance in pixels. Random weights with BatchNorm statistics from 4 images are numerically rougher
# than trained ones: ONNX Runtime's raw outputs differ from torch's by ~3e-4, up to 0.01 px once decoded against
# anchors hundreds of pixels wide. The NMS itself is checked exactly (on identical decoded inputs) by the export.
CASES = {
    "retinanet_resnet50_fpn": (256, 0.0102, 0.05),
    "fcos_resnet50_fpn": (256, 0.07, 0.05),
    "ssdlite320_mobilenet_v3_large": (320, None, 0.05),
}


def _core(name):
    torch.manual_seed(0)
    size = CASES[name][0]
    core = detection_core(name, num_classes=5)
    return calibrate_batchnorm(core, check_images((size, size), 4, seed=11))


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    name = request.param
    size, threshold, atol = CASES[name]
    core = _core(name)
    plan = decode_plan(core, (1, 3, size, size))
    config = plan.config(score_threshold=threshold)
    path = tmp_path_factory.mktemp("cores") / f"{name}.onnx"
    result = export_detector_nms(core, path, (1, 3, size, size), config, atol=atol)
    return name, core, plan, config, result


def test_graph_gives_torchvisions_own_detections(exported):
    name, core, plan, config, result = exported
    size = CASES[name][0]
    # the model's own settings, with only the score threshold lowered
    own = core.post
    assert (config.iou_threshold, config.max_detections, config.pre_nms_topk) == (
        own.nms_thresh, own.detections_per_img, own.topk_candidates)
    assert result.pre_nms_scope == ("class" if name.startswith("ssd") else "level")
    # the export's own checks: NMS exact on the same decoded inputs (up to exact score ties, which a random head
    # with scores packed into [0.0100, 0.0105] has), and detections vs torchvision's post-processing
    parity = result.nms_parity
    assert parity["same_up_to_ties"] and parity["detections_expected"] > 100
    assert parity["paired"] + parity["tie_swaps"] == parity["detections_expected"]
    assert parity["tie_swaps"] <= 0.01 * parity["detections_expected"]
    assert result.detections_parity["class_agreement"] > 0.99
    images = check_images((size, size), 3, seed=5)
    got = run_detections(result.path, images)
    expected = core_reference(core, images, config)
    assert sum(len(d["scores"]) for d in expected) > 50
    stats = compare_detections(got, expected, box_tol=CASES[name][2], score_tol=1e-4)
    assert stats["class_agreement"] > 0.99, stats
    assert stats["max_box_diff"] <= CASES[name][2]


def test_class_agnostic_and_pre_nms_topk_follow_the_reference(exported, tmp_path):
    name, core, plan, config, result = exported
    size = CASES[name][0]
    decode_path = tmp_path / "decode.onnx"
    export_onnx(plan.module, decode_path, (1, 3, size, size), exporter="torchscript",
                output_names=("decoded_boxes", "decoded_scores"), check_parity=False)
    decode_model = load_onnx(decode_path)
    images = check_images((size, size), 2, seed=9)
    with torch.no_grad():
        boxes, scores = plan.module(images)
    counts, overlaps = {}, {}
    for label, cfg in (("per_class", config),
                       ("agnostic", NMSConfig(**{**config.to_dict(), "class_agnostic": True})),
                       ("topk", NMSConfig(**{**config.to_dict(), "pre_nms_topk": 7}))):
        graph = append_nms(decode_model, cfg, plan.num_anchors, plan.num_classes, plan.scope, plan.level_sizes)
        got = run_detections(graph, images)
        expected = plan.reference_from_decoded(boxes, scores, cfg)
        stats = compare_detections(got, expected, box_tol=CASES[name][2])
        assert stats["class_agreement"] > 0.99, (label, stats)
        counts[label] = stats["detections_expected"]
        n = int(got["num_detections"][0, 0])
        iou = torchvision.ops.box_iou(*[torch.from_numpy(got["detection_boxes"][0, :n])] * 2).fill_diagonal_(0)
        iou = iou.nan_to_num(0.0)  # zero-area boxes clipped at the border
        overlaps[label] = float(iou.max()) if n > 1 else 0.0
    # 7 candidates per level (5 levels) or per class (4 foreground classes) leave at most 35 per image
    assert counts["topk"] <= 2 * 35 < counts["per_class"]
    # per class, boxes of different classes may overlap beyond the IoU threshold; class-agnostic, none do
    assert overlaps["per_class"] > config.iou_threshold >= overlaps["agnostic"]


def test_faster_rcnn_core_and_odd_shapes_are_refused():
    with pytest.raises(ExportError, match="no box decoder for the core 'fasterrcnn_resnet50_fpn'"):
        decode_plan(detection_core("fasterrcnn_resnet50_fpn"), (1, 3, 256, 256))
    with pytest.raises(ExportError, match="Bx3xHxW"):
        decode_plan(detection_core("fcos_resnet50_fpn"), (1, 3, 256))


def test_cli_exports_a_pruned_core_with_nms(tmp_path):
    runner = CliRunner()
    pruned = tmp_path / "fcos30"
    res = runner.invoke(cli, ["prune", "core:fcos_resnet50_fpn", "--ratio", "0.3", "--input-shape", "1x3x256x256",
                              "--out", str(pruned), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "fcos30_nms.onnx"
    res = runner.invoke(cli, ["export", str(pruned), "--nms", "--score-threshold", "0.05", "--input-shape",
                              "1x3x256x256", "-o", str(out), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output + res.stderr
    data = json.loads(res.stdout)
    # FCOS's own settings, except the score threshold given
    assert {k: data["nms"][k] for k in ("score_threshold", "iou_threshold", "max_detections", "pre_nms_topk",
                                         "pre_nms_scope")} == {"score_threshold": 0.05, "iou_threshold": 0.6,
                                                               "max_detections": 100, "pre_nms_topk": 1000,
                                                               "pre_nms_scope": "level"}
    assert data["nms_parity"]["same_up_to_ties"] and data["output_names"][0] == "num_detections"
    model = load_onnx(out)
    assert [o.name for o in model.graph.output] == data["output_names"]
    assert any(n.op_type == "NonMaxSuppression" for n in model.graph.node)


# Ops of the appended tail, all in onnx-tensorrt's support matrix (docs/operators.md, TensorRT 8.5 onwards),
# with the inputs it requires to be initializers: TopK's K; NonMaxSuppression's max boxes, IoU and score
# thresholds; Slice's starts/ends/axes (we also keep them constant); Unsqueeze's axes.
TENSORRT_TAIL_OPS = {"Reshape", "TopK", "ConstantOfShape", "Shape", "ScatterElements", "Slice", "Concat",
                     "Transpose", "Tile", "NonMaxSuppression", "ScatterND", "GatherND", "GreaterOrEqual", "Mod",
                     "Div", "Unsqueeze", "Where", "Cast", "ReduceSum", "Pad", "Identity"}
MUST_BE_INITIALIZERS = {"TopK": [1], "NonMaxSuppression": [2, 3, 4], "Slice": [1, 2, 3], "Unsqueeze": [1]}


def test_tail_uses_only_ops_tensorrt_parses_with_constant_arguments(exported):
    *_, result = exported
    model = load_onnx(result.path)
    initializers = {t.name for t in model.graph.initializer}
    tail = [n for n in model.graph.node if n.name.startswith("nms/")]
    assert tail and {n.op_type for n in tail} <= TENSORRT_TAIL_OPS
    for node in tail:
        for index in MUST_BE_INITIALIZERS.get(node.op_type, []):
            assert node.input[index] in initializers, (node.name, index)
        if node.op_type == "TopK":  # TensorRT's TopK takes K <= 3840
            k = next(t for t in model.graph.initializer if t.name == node.input[1])
            assert int(onnx.numpy_helper.to_array(k)[0]) <= 3840
