"""ONNX files this project did not export: clean, fp16, inspect sparsity and profile on them.

Two graphs are written by hand with ``onnx.helper`` the way other converters write them (opset 11 and 13;
named dynamic dimensions; weights in ``Constant`` nodes; BatchNormalization as its own node after a Conv;
Resize, Pad and Clip with inputs where newer opsets have attributes; ``GlobalAveragePool``; ``Squeeze`` with
attribute axes; node names like ``Conv_0``, no scopes, no doc strings), two come from torchvision through the
TorchScript exporter without constant folding (BatchNorm kept), with a named dynamic batch, height and width.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from trt_prune.cleaner import clean_onnx
from trt_prune.errors import CleanError, PrecisionError
from trt_prune.onnx_io import candidate_input_shapes, onnx_sha256, spatial_hints
from trt_prune.precision import to_fp16
from trt_prune.sparsity.inspect import inspect_sparsity
from trt_prune.stages import profile as profile_onnx

# ------------------------------------------------------------------------------------------------ the files


def _constant(name: str, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"Constant_{name}",
                            value=numpy_helper.from_array(np.asarray(array), name))


class _Weights:
    """Seeded weights, each held in its own Constant node (as tf2onnx and keras2onnx write them)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []

    def add(self, name: str, array) -> str:
        self.nodes.append(_constant(name, array))
        return name

    def normal(self, name: str, *shape: int, scale: float = 0.3) -> str:
        return self.add(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def batchnorm(self, index: int, x: str, channels: int, out: str) -> onnx.NodeProto:
        scale = self.add(f"bn{index}_scale", (1 + 0.1 * self.rng.standard_normal(channels)).astype(np.float32))
        var = self.add(f"bn{index}_var", (0.5 + self.rng.random(channels)).astype(np.float32))
        return helper.make_node("BatchNormalization", [x, scale, self.normal(f"bn{index}_bias", channels),
                                                       self.normal(f"bn{index}_mean", channels), var], [out],
                                name=f"BatchNormalization_{index}", epsilon=1e-5)


def _model(weights: _Weights, nodes, name, inputs, outputs, opset: int, producer: str) -> onnx.ModelProto:
    graph = helper.make_graph(weights.nodes + nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=producer)
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def opset11_classifier() -> onnx.ModelProto:
    """Conv(s2)+BN+Clip(0, 6) → Pad(input pads) → MaxPool(3, s2, no padding) → Conv+BN+Relu, Conv(s2)+Relu →
    Resize(x2, opset-11 scales input) + skip → GlobalAveragePool → Squeeze(axes attribute) → Gemm.

    The skip connection only adds up when the input divides by 8 (total stride), and the MaxPool needs 6 input
    pixels: at height and width 1 (what a dynamic axis used to become) the Add broadcasts 1 against 2."""
    w = _Weights(0)
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["input", w.normal("w0", 8, 3, 3, 3), w.normal("b0", 8)], ["t0"], name="Conv_0",
                         kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        w.batchnorm(1, "t0", 8, "t1"),
        helper.make_node("Clip", ["t1", w.add("clip_min", np.float32(0)), w.add("clip_max", np.float32(6))], ["t2"],
                         name="Clip_2"),
        helper.make_node("Pad", ["t2", w.add("pads", i64([0, 0, 1, 1, 0, 0, 1, 1])), w.add("pad_value", np.float32(0))],
                         ["t3"], name="Pad_3", mode="constant"),
        helper.make_node("MaxPool", ["t3"], ["t4"], name="MaxPool_4", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Conv", ["t4", w.normal("w5", 16, 8, 3, 3)], ["t5"], name="Conv_5", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        w.batchnorm(6, "t5", 16, "t6"),
        helper.make_node("Relu", ["t6"], ["t7"], name="Relu_7"),
        helper.make_node("Conv", ["t7", w.normal("w8", 16, 16, 3, 3), w.normal("b8", 16)], ["t8"], name="Conv_8",
                         kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["t8"], ["t9"], name="Relu_9"),
        helper.make_node("Resize", ["t9", w.add("roi", np.zeros(0, np.float32)),
                                    w.add("scales", np.array([1, 1, 2, 2], np.float32))], ["t10"], name="Resize_10",
                         mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        helper.make_node("Add", ["t7", "t10"], ["t11"], name="Add_11"),
        helper.make_node("GlobalAveragePool", ["t11"], ["t12"], name="GlobalAveragePool_12"),
        helper.make_node("Squeeze", ["t12"], ["t13"], name="Squeeze_13", axes=[2, 3]),
        helper.make_node("Gemm", ["t13", w.normal("fc_w", 10, 16), w.normal("fc_b", 10)], ["output"], name="Gemm_14",
                         transB=1),
    ]
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                          ["batch", 3, "DynamicDimension.0", "DynamicDimension.1"])
    return _model(w, nodes, "classifier", [image], [helper.make_tensor_value_info("output", TensorProto.FLOAT,
                                                                                   ["batch", 10])], 11, "tf2onnx")


def opset13_segmenter() -> onnx.ModelProto:
    """Conv+BN+Relu (skip) → AveragePool(2, s2) → Conv → Clip(min only) → Resize to the skip's size (``sizes``
    computed from Shape/Slice/Concat; empty roi and scales) → Concat → 1x1 Conv → Softmax over the classes."""
    w = _Weights(1)
    i64 = lambda v: np.array(v, np.int64)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["images", w.normal("w0", 8, 3, 3, 3), w.normal("b0", 8)], ["t0"], name="Conv_0",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        w.batchnorm(1, "t0", 8, "t1"),
        helper.make_node("Relu", ["t1"], ["skip"], name="Relu_2"),
        helper.make_node("AveragePool", ["skip"], ["t3"], name="AveragePool_3", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["t3", w.normal("w4", 8, 8, 3, 3)], ["t4"], name="Conv_4", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["t4", w.add("lo", np.float32(0)), ""], ["t5"], name="Clip_5"),
        helper.make_node("Shape", ["t5"], ["s6"], name="Shape_6"),
        helper.make_node("Slice", ["s6", w.add("st0", i64([0])), w.add("en2", i64([2])), w.add("ax0", i64([0]))],
                         ["s7"], name="Slice_7"),
        helper.make_node("Shape", ["skip"], ["s8"], name="Shape_8"),
        helper.make_node("Slice", ["s8", w.add("st2", i64([2])), w.add("en4", i64([4])), w.add("ax0b", i64([0]))],
                         ["s9"], name="Slice_9"),
        helper.make_node("Concat", ["s7", "s9"], ["sizes"], name="Concat_10", axis=0),
        helper.make_node("Resize", ["t5", "", "", "sizes"], ["t11"], name="Resize_11", mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("Concat", ["skip", "t11"], ["t12"], name="Concat_12", axis=1),
        helper.make_node("Conv", ["t12", w.normal("w13", 2, 16, 1, 1), w.normal("b13", 2)], ["t13"], name="Conv_13",
                         kernel_shape=[1, 1]),
        helper.make_node("Softmax", ["t13"], ["output"], name="Softmax_14", axis=1),
    ]
    dims = ["DynamicDimension.0", "height", "width"]
    return _model(w, nodes, "segmenter",
                  [helper.make_tensor_value_info("images", TensorProto.FLOAT, [dims[0], 3, *dims[1:]])],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, [dims[0], 2, *dims[1:]])], 13,
                  "keras2onnx")


def fixed_size_head() -> onnx.ModelProto:
    """Dynamic height and width in name only: Conv(3, no padding) → Flatten → Gemm with 4*35*35 inputs, so only
    37x37 runs (a size no candidate lands on)."""
    w = _Weights(2)
    nodes = [helper.make_node("Conv", ["x", w.normal("w", 4, 3, 3, 3)], ["t0"], name="Conv_0", kernel_shape=[3, 3]),
             helper.make_node("Flatten", ["t0"], ["t1"], name="Flatten_1"),
             helper.make_node("Gemm", ["t1", w.normal("fc", 5, 4 * 35 * 35, scale=0.01)], ["y"], name="Gemm_2",
                              transB=1)]
    return _model(w, nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], 11, "pytorch")


def torchvision_export(name: str, opset: int, path: Path) -> None:
    """torchvision ``name`` (random weights, seed 0) through the TorchScript exporter. ``do_constant_folding=False``
    keeps each BatchNorm as its own node (as ``training=TrainingMode.PRESERVE`` does, with a warning), and the
    weights TorchScript finds equal are shared through Identity nodes."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}})


# name -> (how to make it, the shape clean chooses, nodes after our clean, a shape to give)
FOREIGN = {
    "classifier-opset11": (opset11_classifier, [1, 3, 8, 16], 13, [2, 3, 64, 96]),
    "segmenter-opset13": (opset13_segmenter, [1, 3, 2, 4], 14, [2, 3, 30, 44]),
    "resnet18-opset11": (("resnet18", 11), [1, 3, 32, 64], 49, [2, 3, 64, 96]),
    "mobilenet_v3_small-opset13": (("mobilenet_v3_small", 13), [1, 3, 32, 64], 141, [2, 3, 64, 96]),
}


@pytest.fixture(scope="module", params=list(FOREIGN))
def foreign(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    path = tmp_path_factory.mktemp("foreign") / f"{name}.onnx"
    make = FOREIGN[name][0]
    if callable(make):
        onnx.save_model(make(), path)
    else:
        torchvision_export(*make, path)
    return name, path


def _polygraphy_sanitize(path: Path) -> onnx.ModelProto:
    """What ``polygraphy surgeon sanitize --fold-constants`` does (its constant folding, with shape inference,
    repeated until nothing folds), through Polygraphy's API: no process start-up."""
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        return fold_constants(onnx.load(str(path)))


def _onnxslim(path: Path) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(onnx.load(str(path)))


def _dims(model: onnx.ModelProto) -> list[list]:
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input]


# ------------------------------------------------------------------------------------------------ the stages
def test_clean_chooses_a_size_keeps_parity_and_beats_polygraphy_and_onnxslim(foreign, tmp_path):
    name, src = foreign
    _, chosen, nodes, _ = FOREIGN[name]
    digest = onnx_sha256(src)
    result = clean_onnx(src, tmp_path / "clean.onnx")
    assert onnx_sha256(src) == digest
    assert result.input_shapes == {"input" if name != "segmenter-opset13" else "images": chosen}
    assert result.to_dict()["input_shapes"] == result.input_shapes
    assert result.parity["output"]["mismatched"] == 0 and result.parity["output"]["max_abs"] < 1e-4
    cleaned = onnx.load(result.dst)
    assert _dims(cleaned) == _dims(onnx.load(str(src)))  # the dynamic axes stay dynamic
    ops = Counter(n.op_type for n in cleaned.graph.node)
    assert ops["BatchNormalization"] == ops["Constant"] == ops["Identity"] == 0  # BN folded into the convs
    slim = next(p for p in result.passes if p["name"] == "onnxslim")
    assert "BatchNormalization" in slim["detail"] and slim["nodes_after"] < slim["nodes_before"]

    theirs = len(_polygraphy_sanitize(src).graph.node)
    slimmed = len(_onnxslim(src).graph.node)
    print(f"{name}: nodes {result.nodes_before} -> ours {result.nodes_after}, polygraphy {theirs}, onnxslim {slimmed}")
    assert result.nodes_after == nodes
    assert result.nodes_after <= theirs and result.nodes_after <= slimmed


def test_clean_and_fp16_at_a_given_shape(foreign, tmp_path):
    name, src = foreign
    given = FOREIGN[name][3]
    key = "images" if name == "segmenter-opset13" else "input"
    result = clean_onnx(src, tmp_path / "clean.onnx", input_shape=given)
    assert result.input_shapes == {key: given}  # batch 2 given: no extra batch-2 run needed
    assert result.parity["output"]["mismatched"] == 0

    fp16 = to_fp16(src, tmp_path / "fp16.onnx", input_shape={key: given})
    assert fp16.input_shapes == {key: given} and fp16.to_dict()["input_shapes"] == {key: given}
    assert fp16.parity["output"]["mismatched"] == 0
    assert fp16.io_types == {key: "float", "output": "float"}
    assert fp16.initializers["by_dtype"]["float16"]["count"] > 0
    model = onnx.load(fp16.dst)
    assert _dims(model) == _dims(onnx.load(str(src)))


def test_fp16_chooses_the_same_size_as_clean(foreign, tmp_path):
    name, src = foreign
    result = to_fp16(src, tmp_path / "fp16.onnx")
    assert list(result.input_shapes.values()) == [FOREIGN[name][1]]
    assert result.parity["output"]["mismatched"] == 0


def test_inspect_sparsity_sees_weights_in_constant_nodes_and_behind_identity(foreign):
    _, src = foreign
    model = onnx.load(str(src))
    records = inspect_sparsity(src)
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert [r.node for r in records] == [n.name for n in weighted]  # one record per conv/linear weight
    assert all(not r.holds_24 for r in records)  # random dense weights
    first = records[0]  # the stem conv: 3 input channels, no 2:4 possible
    assert first.shape[1] == 3 and not first.eligible and first.reason == "input channels 3 not a multiple of 4"


def test_profile_maps_every_layer(foreign):
    name, src = foreign
    result = profile_onnx(src, backend="onnxruntime", input_shape=[1, *FOREIGN[name][3][1:]], iterations=3, warmup_s=0,
                          min_duration_s=0, layer_runs=2)
    rows = result.per_layer
    assert rows and all(r["module"] is not None for r in rows)
    model = onnx.load(str(src))
    convs = {n.name for n in model.graph.node if n.op_type == "Conv"}
    assert convs <= {m for r in rows for m in r["members"]}  # every conv runs in some profiled layer
    if name.startswith(("classifier", "segmenter")):  # no scopes: a layer is known by its heaviest node's name
        names = {n.name for n in model.graph.node}
        assert all(r["module"] in names for r in rows)
        assert all(r["module"] in convs for r in rows if r["op"] == "Conv")
    else:  # TorchScript names carry the module path
        import torchvision

        modules = dict(getattr(torchvision.models, name.split("-")[0])().named_modules())
        assert all(r["module"] in modules for r in rows)


# ------------------------------------------------------------------------------------------- sizes and errors
def test_sizes_come_from_the_graphs_strides():
    assert spatial_hints(opset11_classifier()) == (8, 6)  # strides 2, 2, 2 less the x2 resize; the pool needs 6
    assert spatial_hints(opset13_segmenter()) == (2, 2)
    candidates, chosen = candidate_input_shapes(opset11_classifier())
    assert chosen == ["input"]
    assert [c["input"] for c in candidates] == [(1, 3, 8, 16), (1, 3, 8, 8), (1, 3, 16, 16), (1, 3, 224, 224),
                                                (1, 3, 320, 320)]
    given, _ = candidate_input_shapes(opset11_classifier(), {"input": (2, 3, 40, 40)})
    assert given == [{"input": (2, 3, 40, 40)}]


def test_no_size_fits_is_one_error_asking_for_input_shape(tmp_path):
    src = tmp_path / "fixed.onnx"
    onnx.save_model(fixed_size_head(), src)
    asks = (r"cannot choose a size for the dynamic axes of input 'x' \(ONNX shape \['batch', 3, 'h', 'w'\]\): "
            r"ONNX Runtime fails at every size tried \(3x4, 3x3, 6x6, 224x224, 320x320; last: .*Gemm.*\); pass "
            r"input_shape \(CLI: --input-shape\) with the full shape the model takes, e.g. \[1, 3, <h>, <w>\]$")
    with pytest.raises(CleanError, match=asks):
        clean_onnx(src, tmp_path / "clean.onnx")
    with pytest.raises(PrecisionError, match=asks):
        to_fp16(src, tmp_path / "fp16.onnx")
    assert sorted(os.listdir(tmp_path)) == ["fixed.onnx"]
    result = clean_onnx(src, tmp_path / "clean.onnx", input_shape=[1, 3, 37, 37])
    assert result.input_shapes == {"x": [1, 3, 37, 37]} and result.parity["y"]["mismatched"] == 0


@pytest.mark.parametrize(("input_shape", "message"), [
    ([1, 3, 64], r"input_shape for 'input' is \[1, 3, 64\]; it must be 4 positive integer sizes matching the "
                 r"ONNX shape \['batch', 3, 'DynamicDimension.0', 'DynamicDimension.1'\]$"),
    ([1, 4, 64, 64], r"input_shape for 'input' is \[1, 4, 64, 64\], but axis 1 is fixed at 3 in the ONNX shape "
                     r"\['batch', 3, 'DynamicDimension.0', 'DynamicDimension.1'\]$"),
    ([1, 3, 0, 64], r"it must be 4 positive integer sizes"),
    ([1, 3, "64", 64], r"it must be 4 positive integer sizes"),
    ({"image": [1, 3, 64, 64]}, r"input_shape names \['image'\], which are not model inputs \['input'\]$"),
    ("1x3x64x64", r"input_shape must be a shape \(a sequence of ints\) or a dict from input name to shape"),
    ([1, 3, 36, 36], r"ONNX Runtime cannot run the (source graph|fp32 model) at input shape "
                     r"\{'input': \[1, 3, 36, 36\]\} \(.*\), so parity cannot be checked; give an input_shape the "
                     r"model accepts, or pass check_parity=False"),
])
def test_bad_input_shape_is_one_error_and_writes_nothing(tmp_path, input_shape, message):
    src = tmp_path / "classifier.onnx"
    onnx.save_model(opset11_classifier(), src)
    before = src.read_bytes()
    with pytest.raises(CleanError, match=message):
        clean_onnx(src, tmp_path / "clean.onnx", input_shape=input_shape)
    with pytest.raises(PrecisionError, match=message):
        to_fp16(src, tmp_path / "fp16.onnx", input_shape=input_shape)
    assert src.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["classifier.onnx"]


def test_one_shape_for_a_model_with_two_inputs_is_refused(tmp_path):
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"], name="Add_0")], "two",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in "ab"],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    src = tmp_path / "two.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), src)
    with pytest.raises(CleanError, match=r"the model has 2 inputs \['a', 'b'\]; give input_shape as a dict from "
                                         r"input name to shape$"):
        clean_onnx(src, tmp_path / "out.onnx", input_shape=[3, 4])
    result = clean_onnx(src, tmp_path / "out.onnx", input_shape={"a": [3, 4]})
    assert result.input_shapes == {"a": [3, 4], "b": [1, 4]}  # b: batch 1, then 2


def test_negative_dimension_from_a_converter_is_dynamic(tmp_path):
    # some converters write -1 for "any size"; parity used to hand it to numpy and crash with a traceback
    model = opset11_classifier()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_value = -1
    dims[3].Clear()  # neither a value nor a name
    src = tmp_path / "negative.onnx"
    onnx.save_model(model, src)
    result = clean_onnx(src, tmp_path / "clean.onnx")
    assert result.input_shapes == {"input": [1, 3, 8, 16]} and result.parity["output"]["mismatched"] == 0


# ----------------------------------------------------------------------------------------- profiling names
def test_unnamed_nodes_take_onnx_runtimes_names_and_map_to_themselves(tmp_path):
    from trt_prune.profiling.layers import build_module_map, ort_node_names

    model = opset11_classifier()
    for node in model.graph.node:
        node.name = ""  # ONNX allows it; some converters write no names at all
    names = ort_node_names(model.graph.node)
    # Constant nodes become initializers in ONNX Runtime and do not count: the first Conv is Conv_0
    assert [n for n in names if not n.startswith("Constant")][:4] == ["Conv_0", "BatchNormalization_1", "Clip_2",
                                                                       "Pad_3"]
    mapping = build_module_map(model)
    assert mapping["Conv_0"] == "Conv_0" and mapping["Gemm_14"] == "Gemm_14"  # no scopes: each node is its own
    src = tmp_path / "unnamed.onnx"
    onnx.save_model(model, src)
    rows = profile_onnx(src, backend="onnxruntime", input_shape=[1, 3, 64, 64], iterations=3, warmup_s=0,
                        min_duration_s=0, layer_runs=2).per_layer
    assert all(r["module"] is not None for r in rows)
    placed = {m for r in rows for m in r["members"]}
    assert {"Conv_0", "Conv_5", "Conv_8", "Add_11", "Gemm_14"} <= placed
    # the NCHWc transformer's own Reshapes around the broadcasting Add serve the layer next to them
    reshapes = [r for r in rows if r["op"] == "Reshape" and not r["members"]]
    assert reshapes and all(r["module"] in set(names) for r in reshapes)
