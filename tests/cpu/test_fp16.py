"""fp16 ONNX for strongly typed TensorRT: dtypes, the block list, IO types, parity, bad input."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from trt_prune.cleaner import clean_onnx
from trt_prune.exporter import export_onnx
from trt_prune.onnx_io import random_feeds, run_onnxruntime
from trt_prune.precision import DEFAULT_BLOCK_OPS, PrecisionError, choose_blocked, to_fp16

FP16, FP32 = TensorProto.FLOAT16, TensorProto.FLOAT


class TinyNet(nn.Module):
    """Conv + GroupNorm + SiLU, LayerNorm, attention Softmax, two spatial means, a box and a scored class head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.ln = nn.LayerNorm(16)
        self.box = nn.Linear(16, 4)
        self.cls = nn.Linear(16, 3)

    def forward(self, x):
        y = F.silu(self.gn(self.conv(x)))                              # SiLU: a Sigmoid that must stay fp16
        t = self.ln(y.flatten(2).transpose(1, 2))                      # [B, 256, 16]
        a = torch.softmax(t @ t.transpose(1, 2) * 0.25, -1) @ t
        p = a.mean(1) + y.mean((2, 3))                                 # reductions over 256 elements
        return torch.cat([self.box(p), torch.sigmoid(self.cls(p))], 1)  # scores through Concat to the output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> onnx.ModelProto:
    folder = tmp_path_factory.mktemp("fp16")
    torch.manual_seed(0)
    export_onnx(TinyNet(), folder / "raw.onnx", (1, 3, 16, 16), exporter="torchscript")
    clean_onnx(folder / "raw.onnx", folder / "tiny.onnx")
    return onnx.load(folder / "tiny.onnx")


@pytest.fixture()
def src(tiny, tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save_model(tiny, path)
    return path


def _types(model: onnx.ModelProto) -> dict[str, int]:
    typed = onnx.shape_inference.infer_shapes(model)
    values = [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in typed.graph.initializer})
    return types


def test_weights_and_activations_fp16_blocked_ops_fp32_with_casts(src, tmp_path):
    before = src.read_bytes()
    result = to_fp16(src, tmp_path / "fp16.onnx")
    assert src.read_bytes() == before  # the input is only read
    model = onnx.load(result.dst)
    types = _types(model)
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}

    blocked = {b["node"]: b for b in result.blocked}
    assert Counter(b["op"] for b in result.blocked) == Counter(
        {"InstanceNormalization": 1, "ReduceMean": 2, "LayerNormalization": 1, "Softmax": 1, "Sigmoid": 1,
         "Concat": 1})
    assert all("256 elements" in b["reason"] for b in result.blocked if b["op"] == "ReduceMean")
    assert blocked["/Sigmoid_1"]["reason"] == "score activation feeding graph output 'output'"
    assert "/Sigmoid" not in blocked  # SiLU's sigmoid is not a score: it runs in fp16
    assert result.block_list["ops"] == sorted(DEFAULT_BLOCK_OPS)

    # every float tensor a blocked node reads or writes is fp32; its fp16 inputs arrive through a Cast to fp32
    for name in blocked:
        node = nodes[name]
        for tensor in [*node.input[:1], *node.output]:
            assert types[tensor] == FP32, (name, tensor)
        source = producer.get(node.input[0])
        if source is not None and source.op_type == "Cast":
            assert source.attribute[0].i == FP32
    # the rest computes in fp16: conv, SiLU, matmuls, linear layers
    for name in ("/conv/Conv", "/Sigmoid", "/Mul", "/MatMul", "/MatMul_1", "/box/Gemm", "/cls/Gemm"):
        assert types[nodes[name].output[0]] == FP16, name
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert weights["conv.weight"] == weights["box.weight"] == weights["cls.weight"] == FP16
    assert weights["ln.weight"] == weights["ln.bias"] == FP32  # read by the fp32 LayerNorm only
    assert result.initializers["by_dtype"]["float16"]["count"] >= 6

    # Casts: one per fp16->fp32 and fp32->fp16 boundary, none that undoes another
    for node in model.graph.node:
        if node.op_type == "Cast" and node.input[0] in producer:
            assert producer[node.input[0]].op_type != "Cast", node.name
    assert result.casts_before == 0 and result.casts_after == sum(n.op_type == "Cast" for n in model.graph.node)
    assert result.io_types == {"images": "float", "output": "float"}
    assert model.graph.node[0].op_type == "Cast"  # the input's Cast to fp16, first: the graph is sorted
    assert result.bytes_before == src.stat().st_size and result.bytes_after == os.path.getsize(result.dst)

    # parity, recomputed here
    feeds = random_feeds(onnx.load(src), seed=7)
    expected = run_onnxruntime(onnx.load(src), feeds)["output"]
    got = run_onnxruntime(model, feeds)["output"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-2, rtol=1e-2)
    assert 0 < result.parity["output"]["max_abs"] < 1e-2
    assert result.tolerance == {"atol": 1e-2, "rtol": 1e-2}


def test_fp16_inputs_and_outputs_when_asked(src, tmp_path):
    result = to_fp16(src, tmp_path / "io16.onnx", keep_io_types=False)
    model = onnx.load(result.dst)
    assert result.io_types == {"images": "float16", "output": "float16"}
    assert [v.type.tensor_type.elem_type for v in model.graph.input] == [FP16]
    # fp16 output: the tail after the score activation stays fp16, only the Sigmoid itself is fp32
    assert Counter(b["op"] for b in result.blocked)["Concat"] == 0
    x = random_feeds(onnx.load(src), seed=1)["images"]
    out = run_onnxruntime(model, {"images": x.astype(np.float16)})["output"]
    assert out.dtype == np.float16
    reference = run_onnxruntime(onnx.load(src), {"images": x})["output"]
    np.testing.assert_allclose(out.astype(np.float32), reference, atol=1e-2, rtol=1e-2)


def test_block_list_options(src, tmp_path):
    result = to_fp16(src, tmp_path / "a.onnx", block_ops=["Softmax"], reduce_min_elements=None,
                     block_head_activations=False, block_nodes=["/box/Gemm"])
    assert [(b["node"], b["reason"]) for b in result.blocked] == [("/Softmax", "in block_ops"),
                                                                 ("/box/Gemm", "in block_nodes")]
    assert result.block_list["ops"] == ["Softmax"] and result.block_list["reduce_min_elements"] is None
    with pytest.raises(PrecisionError, match="block_nodes names \\['nope'\\] not in the graph"):
        to_fp16(src, tmp_path / "b.onnx", block_nodes=["nope"])
    assert not (tmp_path / "b.onnx").exists()


def _reduce_graph() -> onnx.ModelProto:
    """Reductions over 4 and 1024 elements, a variance, ReduceSumSquare, a SiLU and a scored output."""
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("ReduceMean", ["small", "axes"], ["m_small"], name="mean_small"),
        helper.make_node("Pow", ["big", "two"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["var"], name="mean_big"),
        helper.make_node("ReduceSumSquare", ["small", "axes"], ["ss"], name="sumsq", keepdims=1),
        helper.make_node("GlobalAveragePool", ["small"], ["gap"], name="gap"),
        helper.make_node("Add", ["m_small", "var"], ["s0"], name="add0"),
        helper.make_node("Add", ["s0", "ss"], ["s1"], name="add1"),
        helper.make_node("Add", ["s1", "gap"], ["s2"], name="add2"),
        helper.make_node("Sigmoid", ["s2"], ["gate"], name="silu_sigmoid"),
        helper.make_node("Mul", ["s2", "gate"], ["act"], name="silu_mul"),
        helper.make_node("Sigmoid", ["act"], ["score"], name="score"),
        helper.make_node("Reshape", ["score", "flat"], ["y"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes, "reductions",
        [helper.make_tensor_value_info("small", FP32, [1, 8, 2, 2]),
         helper.make_tensor_value_info("big", FP32, [1, 8, 32, 32])],
        [helper.make_tensor_value_info("y", FP32, [1, 8])],
        [axes, two, numpy_helper.from_array(np.array([1, 8], np.int64), "flat")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return onnx.shape_inference.infer_shapes(model)


def test_reductions_blocked_where_they_matter():
    blocked = {b["node"]: b["reason"] for b in choose_blocked(_reduce_graph(), DEFAULT_BLOCK_OPS,
                                                              fp32_outputs=["y"])}
    assert blocked == {
        "square": "square feeding ReduceMean 'mean_big' (variance/RMS)",
        "mean_big": "reduces 1024 elements per output (>= 256)",
        "sumsq": "sum of squares/products/exponentials overflows fp16 on few elements",
        "score": "score activation feeding graph output 'y'",
        "flatten": "carries fp32 scores to fp32 graph output 'y'",
    }  # mean_small and gap (4 elements) and the SiLU's sigmoid stay fp16
    everything = choose_blocked(_reduce_graph(), {}, reduce_min_elements=4, head_activations=False)
    assert {b["node"] for b in everything} == {"mean_small", "square", "mean_big", "sumsq", "gap"}


def test_hand_built_graph_converts_and_matches(tmp_path):
    src = tmp_path / "r.onnx"
    onnx.save_model(_reduce_graph(), src)
    result = to_fp16(src, tmp_path / "r16.onnx")
    model = onnx.load(result.dst)
    types = _types(model)
    out = {n.name: types[n.output[0]] for n in model.graph.node}
    assert out["mean_small"] == out["gap"] == out["silu_sigmoid"] == out["add2"] == FP16
    assert out["square"] == out["mean_big"] == out["sumsq"] == out["score"] == out["flatten"] == FP32
    # blocked nodes read the fp32 graph input directly, not through Cast(fp16) -> Cast(fp32)
    inputs = {n.name: list(n.input) for n in model.graph.node}
    assert inputs["square"][0] == "big" and inputs["sumsq"][0] == "small"
    assert [o.name for o in model.graph.output] == ["y"]
    assert result.parity["y"]["mismatched"] == 0


@pytest.mark.parametrize("content", [b"", b"not an onnx file \xff\xfe", None])
def test_corrupt_input_is_one_clear_error_and_writes_nothing(src, tmp_path, content):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(src.read_bytes()[:200] if content is None else content)
    before = broken.read_bytes()
    with pytest.raises(PrecisionError, match="broken.onnx"):
        to_fp16(broken, tmp_path / "out.onnx")
    assert broken.read_bytes() == before
    with pytest.raises(PrecisionError, match="does not exist"):
        to_fp16(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert sorted(os.listdir(tmp_path)) == ["broken.onnx", "tiny.onnx"]


def test_self_overwrite_parity_failure_and_bad_options_write_nothing(src, tmp_path):
    before = src.read_bytes()
    with pytest.raises(PrecisionError, match="source file itself"):
        to_fp16(src, src)
    with pytest.raises(PrecisionError, match="differs from the fp32 one beyond atol=0, rtol=0"):
        to_fp16(src, tmp_path / "strict.onnx", atol=0, rtol=0)
    with pytest.raises(PrecisionError, match="atol must be a number >= 0"):
        to_fp16(src, tmp_path / "x.onnx", atol=-1)
    assert src.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["tiny.onnx"]  # no output, no temporary leftovers


def test_fp16_model_is_refused(src, tmp_path):
    once = to_fp16(src, tmp_path / "once.onnx", keep_io_types=False)
    with pytest.raises(PrecisionError, match="already holds fp16 inputs, outputs or weights"):
        to_fp16(once.dst, tmp_path / "twice.onnx")
    assert not (tmp_path / "twice.onnx").exists()


def test_detector_with_nms_in_the_graph(tmp_path):
    """`export --nms`: the score sigmoid and the NMS tail stay fp32 up to the fp32 outputs; parity is checked on
    the decoded boxes and scores going into TopK/NMS, where a tiny difference may reorder the detections."""
    from trt_prune.detection.nms_export import NMSConfig, export_detector_nms, unpad_detections
    from trt_prune.models.demo_detector import DemoDetector

    torch.manual_seed(0)
    raw = tmp_path / "nms.onnx"
    export_detector_nms(DemoDetector().eval(), raw, (1, 3, 320, 320), NMSConfig(), exporter="torchscript",
                        check_parity=False)
    clean_onnx(raw, tmp_path / "clean.onnx")
    result = to_fp16(tmp_path / "clean.onnx", tmp_path / "fp16.onnx")
    blocked = {b["node"]: b for b in result.blocked}
    sigmoid = [b for b in result.blocked if b["op"] == "Sigmoid"]
    assert len(sigmoid) == 1 and sigmoid[0]["reason"] == "score activation feeding graph output 'detection_scores'"
    assert {"NonMaxSuppression", "TopK", "GatherND"} <= {b["op"] for b in blocked.values()}
    assert set(result.parity) == {"nms/TopK_7:input0", "nms/NonMaxSuppression_24:input0"}
    assert result.io_types == {"images": "float", "num_detections": "int32", "detection_boxes": "float",
                               "detection_scores": "float", "detection_classes": "int32"}
    model = onnx.load(result.dst)
    types = _types(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 63 and all(types[n.output[0]] == FP16 for n in convs)
    score = next(n for n in model.graph.node if n.name == sigmoid[0]["node"])
    assert types[score.input[0]] == types[score.output[0]] == FP32
    images = np.random.default_rng(0).random((2, 3, 320, 320), dtype=np.float32)
    detections = unpad_detections(run_onnxruntime(model, {"images": images}))
    assert len(detections) == 2 and all(d["boxes"].dtype == np.float32 for d in detections)


def test_plugin_node_stays_as_it_is(tmp_path):
    f32 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Mul", ["x", "w"], ["m"], name="mul"),
             helper.make_node("Sigmoid", ["m"], ["s"], name="score"),
             helper.make_node("MyNMS_TRT", ["m", "s"], ["y"], name="plugin")]
    graph = helper.make_graph(nodes, "plugin", [helper.make_tensor_value_info("x", FP32, [1, 4])],
                              [helper.make_tensor_value_info("y", FP32, [1, 4])], [f32("w", [[1, 2, 3, 4]])])
    src = tmp_path / "plugin.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)
    result = to_fp16(src, tmp_path / "fp16.onnx")
    blocked = {b["node"]: b["reason"] for b in result.blocked}
    assert blocked["plugin"].startswith("not an ONNX op")
    assert blocked["score"] == "score activation feeding graph output 'y'"  # through the plugin
    assert set(result.parity) == {"plugin:input0", "plugin:input1"}
    model = onnx.load(result.dst)
    plugin = next(n for n in model.graph.node if n.name == "plugin")
    types = _types(model)
    assert [types[t] for t in plugin.input] == [FP32, FP32] and plugin.domain == ""
    assert types[next(n for n in model.graph.node if n.name == "mul").output[0]] == FP16
