"""``export --nms``: decode + NMS in the graph, checked against the torch post-processing on real images."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from trt_prune.cli import cli
from trt_prune.detection.decode import decode, postprocess
from trt_prune.detection.nms_export import (
    DECODED_NAMES,
    OUTPUT_NAMES,
    DetectorDecode,
    DetectorWithNMS,
    NMSConfig,
    append_nms,
    check_images,
    compare_detections,
    export_detector_nms,
    nms_reference,
    pad_detections,
    reference_detections,
    run_detections,
    unpad_detections,
)
from trt_prune.errors import ExportError
from trt_prune.exporter import export_onnx
from trt_prune.models import load_model
from trt_prune.onnx_io import run_onnxruntime

HW = (320, 320)


@pytest.fixture(scope="module")
def detector():
    loaded = load_model("builtin:demo-detector")
    assert loaded.meta.weights.startswith("shipped:")
    return loaded.model


@pytest.fixture(scope="module")
def images():
    return check_images(HW, 6, seed=3)


@pytest.fixture(scope="module")
def raw(detector, images):
    with torch.no_grad():
        return detector(images)


@pytest.fixture(scope="module")
def exported(detector, tmp_path_factory):
    """The demo detector with default NMS, once per exporter."""
    folder = tmp_path_factory.mktemp("nms")
    return {name: export_detector_nms(detector, folder / f"{name}.onnx", (1, 3, *HW), exporter=name)
            for name in ("dynamo", "torchscript")}


@pytest.fixture(scope="module")
def decode_graph(detector, tmp_path_factory, images):
    """The decode part alone (TorchScript, no parity check: the full exports check it) and its outputs on
    ``images``, so each NMS variant is only a new tail."""
    path = tmp_path_factory.mktemp("decode") / "decode.onnx"
    export_onnx(DetectorDecode(detector, HW), path, (1, 3, *HW), exporter="torchscript",
                output_names=DECODED_NAMES, check_parity=False)
    model = onnx.load(str(path))
    boxes, scores = run_onnxruntime(model, {"images": images.numpy()}).values()
    return model, boxes, scores


def _tail(decode_graph, **options):
    model, boxes, scores = decode_graph
    config = NMSConfig(**options)
    return append_nms(model, config, boxes.shape[1], scores.shape[2]), config


def _iou(a, b):
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


# ------------------------------------------------------------------------------------ the exported graph
@pytest.mark.parametrize("name", ["dynamo", "torchscript"])
def test_graph_matches_torch_postprocess_at_batch_1_and_3(exported, detector, images, raw, name):
    result = exported[name]
    assert result.decode.exporter == name and result.decode.fallback_reason is None
    assert result.nms_parity["same"] and result.detections_parity["same"]
    model = onnx.load(result.path)
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("NonMaxSuppression") == 1 and "EfficientNMS_TRT" not in ops
    nms = next(n for n in model.graph.node if n.op_type == "NonMaxSuppression")
    assert all(a.i == 0 for a in nms.attribute if a.name == "center_point_box")
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert batch and all(o.type.tensor_type.shape.dim[0].dim_param == batch for o in model.graph.output)
    expected = postprocess(raw, HW)  # the project's own post-processing, default thresholds
    assert sum(len(d["scores"]) for d in expected) >= 10  # real detections, not an empty comparison
    for chunk in (slice(0, 1), slice(1, 4)):
        got = run_detections(result.path, images[chunk])
        b = chunk.stop - chunk.start
        assert got["num_detections"].shape == (b, 1) and got["num_detections"].dtype == np.int32
        assert got["detection_boxes"].shape == (b, 100, 4) and got["detection_boxes"].dtype == np.float32
        assert got["detection_scores"].shape == (b, 100) and got["detection_classes"].dtype == np.int32
        stats = compare_detections(got, expected[chunk], box_tol=1e-3, score_tol=1e-4)
        assert stats["same"], stats
        assert stats["max_box_diff"] <= 1e-3 and stats["class_agreement"] == 1.0
        # rank by rank too: no exact score ties here
        for i, det in enumerate(unpad_detections(got)):
            assert det["labels"].tolist() == expected[chunk][i]["labels"].tolist()
            np.testing.assert_allclose(det["boxes"], expected[chunk][i]["boxes"].numpy(), atol=1e-3, rtol=0)
            np.testing.assert_allclose(det["scores"], expected[chunk][i]["scores"].numpy(), atol=1e-5, rtol=0)


def test_torch_module_equals_graph(exported, detector, images):
    torch_out = DetectorWithNMS(detector, HW)(images[:3])
    assert [t.dtype for t in torch_out] == [torch.int32, torch.float32, torch.float32, torch.int32]
    got = run_detections(exported["torchscript"].path, images[:3])
    assert compare_detections(got, [t.numpy() for t in torch_out])["same"]


def test_reference_mirror_is_postprocess(raw):
    boxes, scores = decode(raw, HW)
    mine = nms_reference(boxes, scores, HW, NMSConfig())
    theirs = postprocess(raw, HW)
    for a, b in zip(mine, theirs, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key])
    assert reference_detections(raw, HW, NMSConfig(score_threshold=0.2))[0]["scores"].min() > 0.2


# ---------------------------------------------------------------------------------------------- options
def test_thresholds_and_max_detections_are_honoured(decode_graph, images):
    _, boxes, scores = decode_graph
    graph, config = _tail(decode_graph, score_threshold=0.3, iou_threshold=0.5, max_detections=5)
    got = run_detections(graph, images)
    num = got["num_detections"][:, 0]
    assert num.max() == 5 and num.min() < 5  # K caps busy images; quiet ones are padded
    for i, n in enumerate(num):
        scores_i = got["detection_scores"][i]
        assert (scores_i[:n] > 0.3).all() and (np.diff(scores_i[:n]) <= 0).all()
        assert not scores_i[n:].any() and not got["detection_boxes"][i, n:].any()
        assert not got["detection_classes"][i, n:].any()
        kept = got["detection_boxes"][i, :n]
        same_class = got["detection_classes"][i, :n]
        for a in range(n):
            for b in range(a + 1, n):
                if same_class[a] == same_class[b]:
                    assert _iou(kept[a], kept[b]) <= 0.5
    assert compare_detections(got, nms_reference(boxes, scores, HW, config))["same"]


def test_pre_nms_topk_matches_reference_and_bites(decode_graph, images):
    _, boxes, scores = decode_graph
    graph, config = _tail(decode_graph, score_threshold=0.0, pre_nms_topk=40, max_detections=60)
    got = run_detections(graph, images)
    expected = nms_reference(boxes, scores, HW, config)
    assert compare_detections(got, expected)["same"]
    unlimited = nms_reference(boxes, scores, HW, NMSConfig(score_threshold=0.0, max_detections=60))
    assert not compare_detections(expected, unlimited)["same"]  # the top-k changed what NMS saw


def test_class_agnostic_differs_from_per_class_where_classes_overlap(decode_graph, images):
    _, boxes, scores = decode_graph
    per_class_graph, per_class = _tail(decode_graph, iou_threshold=0.6)
    agnostic_graph, agnostic = _tail(decode_graph, iou_threshold=0.6, class_agnostic=True)
    per = run_detections(per_class_graph, images)
    agn = run_detections(agnostic_graph, images)
    assert compare_detections(per, nms_reference(boxes, scores, HW, per_class))["same"]
    assert compare_detections(agn, nms_reference(boxes, scores, HW, agnostic))["same"]

    def cross_class_overlaps(out):
        found = 0
        for det in unpad_detections(out):
            for a in range(len(det["labels"])):
                for b in range(a + 1, len(det["labels"])):
                    found += det["labels"][a] != det["labels"][b] and _iou(det["boxes"][a], det["boxes"][b]) > 0.6
        return found

    assert cross_class_overlaps(per) > 0  # e.g. one object scored as car and as truck: both kept per class
    assert cross_class_overlaps(agn) == 0
    assert agn["num_detections"].sum() < per["num_detections"].sum()


def test_efficient_nms_node(decode_graph):
    graph, _ = _tail(decode_graph, plugin="efficient", score_threshold=0.25, iou_threshold=0.45,
                     max_detections=50, class_agnostic=True)
    nodes = [n for n in graph.graph.node if n.op_type == "EfficientNMS_TRT"]
    assert len(nodes) == 1 and not any(n.op_type == "NonMaxSuppression" for n in graph.graph.node)
    node = nodes[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"plugin_version": b"1", "background_class": -1, "max_output_boxes": 50,
                     "score_threshold": pytest.approx(0.25), "iou_threshold": pytest.approx(0.45),
                     "score_activation": 0, "class_agnostic": 1, "box_coding": 0}
    assert node.domain == "" and list(node.output) == list(OUTPUT_NAMES)
    producers = {o: n for n in graph.graph.node for o in n.output}
    assert node.input[0] == "decoded_boxes"  # [B, N, 4] corner boxes
    assert producers[node.input[1]].op_type == "Reshape"  # the masked [B, N, C] sigmoid scores
    outputs = {o.name: o.type.tensor_type for o in graph.graph.output}
    assert [outputs[n].elem_type for n in OUTPUT_NAMES] == [6, 1, 1, 6]  # int32, float, float, int32
    assert [[d.dim_value for d in outputs[n].shape.dim[1:]] for n in OUTPUT_NAMES] == [[1], [50, 4], [50], [50]]
    assert all(outputs[n].shape.dim[0].dim_param == "batch" for n in OUTPUT_NAMES)


@pytest.mark.parametrize("options", [
    {"iou_threshold": 1.5}, {"iou_threshold": -0.1}, {"score_threshold": 1.0}, {"score_threshold": float("nan")},
    {"max_detections": 0}, {"max_detections": 5000}, {"pre_nms_topk": 0}, {"plugin": "batched"},
    {"plugin": "efficient", "score_threshold": 0.0}, {"max_detections": 2.5},
])
def test_bad_options_raise_one_error(options):
    with pytest.raises(ExportError):
        NMSConfig(**options).validate()


def test_api_refuses_model_without_decoder(tmp_path):
    with pytest.raises(ExportError, match="known box decoder"):
        export_detector_nms(torch.nn.Conv2d(3, 8, 3), tmp_path / "m.onnx", (1, 3, 64, 64))
    assert list(tmp_path.iterdir()) == []


def test_padding_helpers_round_trip(raw):
    dets = postprocess(raw[:2], HW)
    padded = pad_detections(dets, 100)
    assert compare_detections(unpad_detections(padded), dets)["same"]


# --------------------------------------------------------------------------------------------------- CLI
def test_cli_export_nms_json_contract(tmp_path):  # the dynamic batch is covered by the exports above
    out = tmp_path / "det.onnx"
    result = CliRunner().invoke(cli, ["export", "builtin:demo-detector", "--nms", "--exporter", "torchscript",
                                      "--score-threshold", "0.05", "--iou-threshold", "0.5", "--max-detections",
                                      "20", "--static-batch", "-o", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["path"] == str(out.resolve()) and out.is_file()
    assert data["output_names"] == list(OUTPUT_NAMES) and data["decode_outputs"] == list(DECODED_NAMES)
    assert data["exporter"] == "torchscript" and data["opset"] == 18
    assert data["nms"]["op"] == "NonMaxSuppression" and data["nms"]["max_detections"] == 20
    assert data["nms"]["score_threshold"] == 0.05 and data["nms"]["class_agnostic"] is False
    assert data["nms"]["outputs"] == {"num_detections": [1, 1], "detection_boxes": [1, 20, 4],
                                      "detection_scores": [1, 20], "detection_classes": [1, 20]}
    dims = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in onnx.load(str(out)).graph.output]
    assert dims == [[1, 1], [1, 20, 4], [1, 20], [1, 20]]  # --static-batch: a fixed batch of 1
    assert data["nms_parity"]["same"] and data["detections_parity"]["same"]
    assert data["detections_parity"]["max_box_diff"] <= 1e-3
    assert set(data["parity_per_output"]) == set(DECODED_NAMES) and data["parity"]["max_abs"] < 1e-3
    assert [p.name for p in tmp_path.iterdir()] == ["det.onnx"]  # no staging leftovers


@pytest.mark.parametrize("args, message", [
    (["builtin:demo-detector", "--nms", "--iou-threshold", "1.5"], "IoU threshold"),
    (["builtin:demo-detector", "--nms", "--max-detections", "0"], "max detections"),
    (["torchvision:resnet18", "--nms"], "known box decoder"),
    (["builtin:demo-detector", "--nms", "--opset", "12"], "opset 13"),
    (["builtin:demo-detector", "--nms", "--input-shape", "1x3x300x300"], "multiples of 32"),
    (["builtin:demo-detector", "--score-threshold", "0.5"], "only apply with --nms"),
])
def test_cli_bad_nms_request_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "sub" / "det.onnx"
    result = CliRunner().invoke(cli, ["export", *args, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
