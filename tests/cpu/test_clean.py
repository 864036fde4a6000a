"""Graph cleaning: each pass, parity with the input graph, never touching src, errors, Polygraphy comparison."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from trt_prune.cleaner import DEFAULT_PASSES, PASSES, clean_onnx
from trt_prune.errors import CleanError, OutputError
from trt_prune.onnx_io import node_module, onnx_sha256, random_feeds, run_onnxruntime

# the default pipeline without onnxslim: for tests of what one of our own passes does
OWN_PASSES = [p for p in DEFAULT_PASSES if p != "onnxslim"]


def _const(name, values):
    return numpy_helper.from_array(np.asarray(values, np.float32 if np.asarray(values).dtype.kind == "f"
                                              else np.int64), name)


def messy_model() -> onnx.ModelProto:
    """x[2, 4] through constant arithmetic, pass-through ops, duplicate weights and a dead branch.

    Live computation: ``y = (x * (a + b) + w1) + w2`` with w1 == w2 and ``a + b`` constant.
    """
    nodes = [
        helper.make_node("Add", ["a", "b"], ["ab"], name="const_add"),          # folds to a constant
        helper.make_node("Identity", ["ab"], ["ab_id"], name="id0"),            # folds (constant input)
        helper.make_node("Mul", ["x", "ab_id"], ["m"], name="mul"),
        helper.make_node("Identity", ["m"], ["m_id"], name="id1"),
        helper.make_node("Dropout", ["m_id"], ["d"], name="drop"),
        helper.make_node("Cast", ["d"], ["c"], name="cast_same", to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["c", "shape24"], ["r"], name="reshape_same"),
        helper.make_node("Add", ["r", "w1"], ["s1"], name="add_w1"),
        helper.make_node("Add", ["s1", "w2"], ["s2"], name="add_w2"),
        helper.make_node("Identity", ["s2"], ["y"], name="id_out"),             # produces the graph output
        helper.make_node("Neg", ["x"], ["dead"], name="dead_neg"),              # nothing uses it
    ]
    for node in nodes:  # module scopes as the dynamo exporter writes them; cleaning must keep them
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=f"['', 'block', '{node.name}_op']")
    initializers = [_const("a", [[1.0, 2.0, 3.0, 4.0]]), _const("b", [[0.5, 0.5, 0.5, 0.5]]),
                    _const("w1", np.arange(8).reshape(2, 4) / 8), _const("w2", np.arange(8).reshape(2, 4) / 8),
                    _const("shape24", [2, 4])]
    graph = helper.make_graph(nodes, "messy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="test")
    onnx.checker.check_model(model)
    return model


@pytest.fixture()
def messy(tmp_path) -> Path:
    path = tmp_path / "messy.onnx"
    onnx.save_model(messy_model(), path)
    return path


def test_default_passes_shrink_the_graph_and_keep_its_output(messy, tmp_path):
    digest = onnx_sha256(messy)
    result = clean_onnx(messy, tmp_path / "clean.onnx")
    assert onnx_sha256(messy) == digest  # src untouched
    assert (result.nodes_before, result.nodes_after) == (11, 3)
    steps = {p["name"]: p for p in result.passes}
    assert [p["name"] for p in result.passes] == list(DEFAULT_PASSES)
    assert (steps["fold_constants"]["nodes_before"], steps["fold_constants"]["nodes_after"]) == (11, 8)
    assert "Add 1" in steps["fold_constants"]["detail"] and "Neg 1" in steps["fold_constants"]["detail"]
    assert steps["simplify_reshape"]["detail"] == "constant shape for 0 Reshape(s)"
    assert (steps["remove_identity"]["nodes_before"], steps["remove_identity"]["nodes_after"]) == (8, 3)
    for kind in ("Identity 2", "Dropout 1", "Cast 1", "Reshape 1"):
        assert kind in steps["remove_identity"]["detail"]
    assert steps["dedup_initializers"]["detail"].startswith("merged 1 duplicate")
    assert (steps["onnxslim"]["nodes_before"], steps["onnxslim"]["nodes_after"]) == (3, 3)

    cleaned = onnx.load(result.dst)
    assert [n.op_type for n in cleaned.graph.node] == ["Mul", "Add", "Add"]
    assert [o.name for o in cleaned.graph.output] == ["y"]  # the output keeps its name
    add_inputs = [n.input[1] for n in cleaned.graph.node if n.op_type == "Add"]
    assert add_inputs[0] == add_inputs[1]  # both Adds read the one shared weight
    assert len(cleaned.graph.initializer) == 2
    # metadata that graphsurgeon drops is back, so module scopes survive cleaning
    assert node_module(cleaned.graph.node[0]) == "block"
    assert cleaned.producer_name == "test"

    feeds = random_feeds(cleaned, seed=3)
    expected = (feeds["x"] * np.array([1.5, 2.5, 3.5, 4.5], np.float32)) + 2 * (np.arange(8).reshape(2, 4) / 8)
    np.testing.assert_allclose(run_onnxruntime(cleaned, feeds)["y"], expected, rtol=1e-6)
    np.testing.assert_array_equal(run_onnxruntime(cleaned, feeds)["y"], run_onnxruntime(onnx.load(messy), feeds)["y"])
    assert result.parity["y"] == {"max_abs": 0.0, "max_rel": 0.0, "mismatched": 0}
    assert result.input_shapes == {"x": [2, 4]}  # the graph's own static shape
    assert set(result.to_dict()) == {"src", "dst", "nodes_before", "nodes_after", "passes", "parity", "input_shapes"}


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_registered_pass_alone_keeps_the_output(messy, tmp_path, name):
    result = clean_onnx(messy, tmp_path / "c.onnx", passes=[name])
    assert [p["name"] for p in result.passes] == [name]
    assert result.nodes_after <= result.nodes_before == 11
    assert result.parity["y"]["mismatched"] == 0 and result.parity["y"]["max_abs"] < 1e-6


def test_chosen_passes_only(messy, tmp_path):
    result = clean_onnx(messy, tmp_path / "c.onnx", passes=["cleanup"])
    assert (result.nodes_before, result.nodes_after) == (11, 10)
    assert result.passes == [{"name": "cleanup", "nodes_before": 11, "nodes_after": 10,
                              "detail": "removed 1 dead node(s)"}]


def test_identity_chain_into_graph_input_is_kept(tmp_path):
    # y = Identity(x): removing it would rename the graph's output or input, so it must stay
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id")], "passthrough",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    src = tmp_path / "p.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)
    result = clean_onnx(src, tmp_path / "q.onnx")
    assert result.nodes_after == 1
    assert next(p for p in result.passes if p["name"] == "remove_identity")["detail"] == "removed: nothing"


def test_reshape_of_own_dynamic_shape_becomes_constant(tmp_path):
    # TorchScript's x.flatten(1) and x.view(x.size(0), -1) under a dynamic batch
    ints = lambda name, v: numpy_helper.from_array(np.asarray(v, np.int64), name)  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["x"], ["sh"], name="shape"),
        helper.make_node("Slice", ["sh", "zero", "one"], ["head"], name="slice"),
        helper.make_node("Concat", ["head", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="flatten"),
        helper.make_node("Shape", ["flat"], ["sh2"], name="shape2"),
        helper.make_node("Gather", ["sh2", "zero_scalar"], ["b"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["b", "zero"], ["b1"], name="unsqueeze"),
        helper.make_node("Concat", ["b1", "six_four"], ["target2"], name="concat2", axis=0),
        helper.make_node("Reshape", ["flat", "target2"], ["y"], name="view"),
    ]
    graph = helper.make_graph(
        nodes, "views", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, 4])],
        [ints("zero", [0]), ints("one", [1]), ints("minus1", [-1]), ints("zero_scalar", 0),
         ints("six_four", [6, 4])])
    src = tmp_path / "views.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)
    result = clean_onnx(src, tmp_path / "views_clean.onnx")
    step = next(p for p in result.passes if p["name"] == "simplify_reshape")
    assert (step["nodes_before"], step["nodes_after"]) == (9, 2) and step["detail"] == "constant shape for 2 Reshape(s)"
    cleaned = onnx.load(result.dst)
    assert [n.op_type for n in cleaned.graph.node] == ["Reshape", "Reshape"]
    shapes = {t.name: numpy_helper.to_array(t).tolist() for t in cleaned.graph.initializer}
    assert sorted(shapes.values()) == [[0, -1], [0, 6, 4]]
    x = np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(run_onnxruntime(cleaned, {"x": x})["y"], x.reshape(3, 6, 4))


def test_unknown_pass_lists_valid_ones(messy, tmp_path):
    with pytest.raises(CleanError, match="unknown clean pass 'fold'; valid names: cleanup, dedup_initializers, "
                                         "fold_constants, merge_transposes, onnxslim, remove_identity, "
                                         "shape_inference, simplify_reshape, toposort$"):
        clean_onnx(messy, tmp_path / "c.onnx", passes=["cleanup", "fold"])
    assert sorted(os.listdir(tmp_path)) == ["messy.onnx"]
    assert set(PASSES) == set(DEFAULT_PASSES)


@pytest.mark.parametrize("content", [b"", b"this is not protobuf \xff\xfe", None])
def test_corrupt_or_missing_source_is_a_clean_error(tmp_path, messy, content):
    src = tmp_path / "broken.onnx"
    if content is None:  # a real model cut in half
        src.write_bytes(messy.read_bytes()[:100])
    else:
        src.write_bytes(content)
    with pytest.raises(CleanError, match="broken.onnx"):
        clean_onnx(src, tmp_path / "out.onnx")
    with pytest.raises(CleanError, match="does not exist"):
        clean_onnx(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_unwritable_destination_and_self_overwrite(messy, tmp_path):
    digest = onnx_sha256(messy)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="file"):
        clean_onnx(messy, blocker / "out.onnx")
    with pytest.raises(CleanError, match="source file itself"):
        clean_onnx(messy, messy)
    assert onnx_sha256(messy) == digest
    assert sorted(os.listdir(tmp_path)) == ["file", "messy.onnx"]


@pytest.fixture()
def broken_pass():
    @PASSES.decorator("break_math")
    def bad_pass(graph):  # a "cleaning" that changes the math
        graph.nodes[2].op = "Sub"
        return graph, "broke it"

    yield "break_math"
    PASSES.unregister("break_math")


def test_parity_failure_writes_nothing(messy, tmp_path, broken_pass):
    with pytest.raises(CleanError, match=r"cleaning changed what the graph computes beyond atol=0.0001, rtol=0.001 "
                                         r"\(y at batch 2: 8 of 8 element\(s\) off.*nothing was written"):
        clean_onnx(messy, tmp_path / "c.onnx", passes=["cleanup", broken_pass])
    assert not (tmp_path / "c.onnx").exists()


def test_detector_clean_beats_polygraphy_sanitize(tmp_path):
    from trt_prune.exporter import export_onnx
    from trt_prune.models.demo_detector import DemoDetector

    torch.manual_seed(0)
    raw = tmp_path / "raw.onnx"
    # TorchScript: fast to export, and it leaves the most to clean (Constant/Identity/shape arithmetic)
    export_onnx(DemoDetector(), raw, exporter="torchscript", check_parity=False)
    digest = onnx_sha256(raw)
    ours = clean_onnx(raw, tmp_path / "ours.onnx")
    assert onnx_sha256(raw) == digest

    polygraphy = Path(sys.executable).with_name("polygraphy")
    subprocess.run([str(polygraphy), "surgeon", "sanitize", str(raw), "--fold-constants", "-o",
                    str(tmp_path / "pg.onnx")], check=True, capture_output=True, timeout=120)
    theirs = len(onnx.load(tmp_path / "pg.onnx", load_external_data=False).graph.node)
    raw_nodes = len(onnx.load(raw, load_external_data=False).graph.node)
    print(f"DemoDetector TorchScript nodes: raw {raw_nodes}, ours {ours.nodes_after}, polygraphy {theirs}")
    assert ours.nodes_before == raw_nodes > ours.nodes_after
    assert ours.nodes_after < theirs  # the dynamic-batch flatten needs no Shape/Slice/Concat here
    assert ours.parity["output"]["max_abs"] < 1e-5
    ops = Counter(n.op_type for n in onnx.load(ours.dst).graph.node)
    assert ops["Conv"] == 63 and ops["Identity"] == 0 and ops["Constant"] == 0 and ops["Shape"] == 0


# ------------------------------------------------------------------------------ passes on hand-built graphs
def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def test_passthrough_look_alikes_stay(tmp_path):
    # each of these changes something (type, shape, or may drop values), so remove_identity must keep it
    nodes = [
        helper.make_node("Cast", ["x"], ["half"], name="cast_fp16", to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["half"], ["back"], name="cast_fp32", to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["back", "shape32"], ["r"], name="reshape_changes"),
        helper.make_node("Dropout", ["r"], ["d", "mask"], name="dropout_mask_used"),
        helper.make_node("Cast", ["mask"], ["mask_f"], name="cast_mask", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["d", "mask_f"], ["y"], name="mul"),
    ]
    src = tmp_path / "keep.onnx"
    onnx.save_model(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])],
                           [_i64("shape32", [3, 2])]), src)
    result = clean_onnx(src, tmp_path / "out.onnx")
    step = next(p for p in result.passes if p["name"] == "remove_identity")
    assert step["detail"] == "removed: nothing" and result.nodes_after == 6
    # onnxslim 0.1.98 drops the Dropout whose mask is read; its broken result is not kept
    slim = next(p for p in result.passes if p["name"] == "onnxslim")
    assert slim["nodes_after"] == slim["nodes_before"] == 6
    assert result.parity["y"]["max_abs"] == 0.0


def test_fold_repeats_until_shapes_settle(tmp_path, monkeypatch):
    # Reshape's target is a constant that shape inference cannot see through (Neg): only after it is folded is
    # the Reshape's output shape static, and only then can Shape -> Gather -> Concat fold in a second pass
    import trt_prune.cleaner as clean_module

    nodes = [
        helper.make_node("Neg", ["neg_target"], ["target"], name="neg"),
        helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
        helper.make_node("Shape", ["r"], ["rs"], name="shape"),
        helper.make_node("Gather", ["rs", "one"], ["d1"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["d1", "zero"], ["d1u"], name="unsqueeze"),
        # r's dim 1 moved to position 0: not a copy that simplify_reshape can write as 0
        helper.make_node("Concat", ["d1u", "minus1"], ["t2"], name="concat", axis=0),
        helper.make_node("Reshape", ["r", "t2"], ["y"], name="reshape2"),
    ]
    src = tmp_path / "passes.onnx"
    onnx.save_model(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "m"])],
                           [_i64("neg_target", [1, -3, -2]), _i64("one", 1), _i64("zero", [0]),
                            _i64("minus1", [-1])]), src)
    result = clean_onnx(src, tmp_path / "out.onnx", passes=OWN_PASSES)
    fold = next(p for p in result.passes if p["name"] == "fold_constants")
    assert (fold["nodes_before"], fold["nodes_after"]) == (7, 2)
    assert fold["detail"].endswith("(3 passes)")  # two that fold, one that finds nothing left
    cleaned = onnx.load(result.dst)
    assert [n.op_type for n in cleaned.graph.node] == ["Reshape", "Reshape"]
    assert sorted(numpy_helper.to_array(t).tolist() for t in cleaned.graph.initializer) == [[-1, 3, 2], [3, -1]]
    assert result.parity["y"]["max_abs"] == 0.0  # checked at batch 1 and 2
    # onnxslim goes on to make the two Reshapes one
    slimmed = clean_onnx(src, tmp_path / "slim.onnx")
    assert [n.op_type for n in onnx.load(slimmed.dst).graph.node] == ["Reshape"]
    assert [numpy_helper.to_array(t).tolist() for t in onnx.load(slimmed.dst).graph.initializer] == [[3, -1]]
    assert slimmed.parity["y"]["max_abs"] == 0.0

    monkeypatch.setattr(clean_module, "MAX_FOLD_PASSES", 1)  # one pass, as before: the shape arithmetic stays
    once = clean_onnx(src, tmp_path / "once.onnx", passes=OWN_PASSES)
    assert once.nodes_after == 6 and "Shape" in Counter(n.op_type for n in onnx.load(once.dst).graph.node)


def test_dedup_merges_equal_initializers_only(tmp_path):
    # 2.0 as a scalar, as [2.0] twice, as [[2.0]]: same bytes, three shapes; only the two [2.0] are one tensor
    f32 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Add", ["x", c], [f"s{i}"], name=f"add{i}") for i, c in enumerate(("s", "v1", "v2", "m"))]
    nodes.append(helper.make_node("Concat", ["s0", "s1", "s2"], ["cat"], name="cat", axis=0))
    src = tmp_path / "dedup.onnx"
    onnx.save_model(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                           [helper.make_tensor_value_info("cat", TensorProto.FLOAT, [3]),
                            helper.make_tensor_value_info("s3", TensorProto.FLOAT, [1, 1])],
                           [f32("s", 2.0), f32("v1", [2.0]), f32("v2", [2.0]), f32("m", [[2.0]])]), src)
    result = clean_onnx(src, tmp_path / "out.onnx", passes=OWN_PASSES)
    step = next(p for p in result.passes if p["name"] == "dedup_initializers")
    assert step["detail"] == "merged 1 duplicate initializer(s) (4 bytes) into their first copy"
    cleaned = onnx.load(result.dst)
    shapes = sorted(tuple(t.dims) for t in cleaned.graph.initializer)
    assert shapes == [(), (1,), (1, 1)]
    assert {n.name: n.input[1] for n in cleaned.graph.node if n.op_type == "Add"} == {
        "add0": "s", "add1": "v1", "add2": "v1", "add3": "m"}
    assert result.parity["cat"]["max_abs"] == 0.0
    # onnxslim then computes Add(x, v1) once (common subexpression): one node fewer, same outputs
    slimmed = clean_onnx(src, tmp_path / "slim.onnx")
    assert slimmed.nodes_after == result.nodes_after - 1 == 4
    assert all(v["max_abs"] == 0.0 for v in slimmed.parity.values())


def test_2of4_patterns_survive_cleaning(tmp_path):
    from trt_prune.exporter import export_onnx
    from trt_prune.models.demo_detector import DemoDetector
    from trt_prune.sparsity import sparsify
    from trt_prune.sparsity.inspect import inspect_sparsity

    torch.manual_seed(0)
    sparse = sparsify(DemoDetector(), min_channels=64)
    raw, clean = tmp_path / "raw.onnx", tmp_path / "clean.onnx"
    export_onnx(sparse.model, raw, exporter="torchscript", check_parity=False)  # BN folded into the convs
    clean_onnx(raw, clean)

    def holding(path):
        return {(r.node, r.name) for r in inspect_sparsity(path) if r.holds_24}

    before, after = holding(raw), holding(clean)
    assert len(before) >= len(sparse.sparse_layers) > 10  # every sparsified conv holds 2:4 in the export
    assert before == after  # the same weights, at the same nodes, after cleaning


def test_fold_goes_around_a_node_onnxruntime_cannot_run(tmp_path):
    # a custom-domain op on a constant (a TensorRT plugin, say): the one-session fold fails, the partitioned one
    # folds what it can and keeps the custom node
    f32 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Add", ["a", "b"], ["ab"], name="const_add"),
             helper.make_node("Mul", ["x", "ab"], ["m"], name="mul"),
             helper.make_node("Foo", ["c"], ["f"], name="plugin", domain="com.example"),
             helper.make_node("Add", ["m", "f"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "plugin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [f32("a", [1, 2]), f32("b", [3, 4]), f32("c", [5, 6])])
    src = tmp_path / "plugin.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                            helper.make_opsetid("com.example", 1)]), src)
    result = clean_onnx(src, tmp_path / "out.onnx", check_parity=False)  # ORT cannot run the plugin either
    fold = next(p for p in result.passes if p["name"] == "fold_constants")
    assert fold["detail"].startswith("folded: Add 1") and "partitioned" in fold["detail"]
    assert "com.example:Foo" in fold["detail"]
    cleaned = onnx.load(result.dst)
    assert sorted(n.name for n in cleaned.graph.node) == ["add", "mul", "plugin"]
    ab = next(t for t in cleaned.graph.initializer if t.name not in ("c",))
    np.testing.assert_array_equal(numpy_helper.to_array(ab), [4, 6])


def test_merge_transposes(tmp_path):
    nodes = [
        # ViT's attention: [1, 0, 2] then [0, 2, 1] is one Transpose [1, 2, 0]
        helper.make_node("Transpose", ["x"], ["t1"], name="t1", perm=[1, 0, 2]),
        helper.make_node("Transpose", ["t1"], ["t2"], name="t2", perm=[0, 2, 1]),
        # reversing twice (no perm) is nothing, and so is an identity perm
        helper.make_node("Transpose", ["t2"], ["r1"], name="rev1"),
        helper.make_node("Transpose", ["r1"], ["r2"], name="rev2"),
        helper.make_node("Transpose", ["r2"], ["y"], name="same", perm=[0, 1, 2]),
        # a Transpose whose input Transpose has another reader: that one stays for it
        helper.make_node("Transpose", ["x"], ["s1"], name="shared", perm=[2, 1, 0]),
        helper.make_node("Transpose", ["s1"], ["z"], name="after_shared", perm=[1, 0, 2]),
        helper.make_node("Neg", ["s1"], ["w"], name="other_reader"),
        # a swap undone: nothing left between Neg and Abs
        helper.make_node("Neg", ["x"], ["n"], name="neg"),
        helper.make_node("Transpose", ["n"], ["u1"], name="swap", perm=[1, 0, 2]),
        helper.make_node("Transpose", ["u1"], ["u2"], name="unswap", perm=[1, 0, 2]),
        helper.make_node("Abs", ["u2"], ["v"], name="abs"),
    ]
    src = tmp_path / "transposes.onnx"
    onnx.save_model(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4, 2]),
                            helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 4, 2]),
                            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 2]),
                            helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 3, 4])]), src)
    result = clean_onnx(src, tmp_path / "out.onnx")
    step = next(p for p in result.passes if p["name"] == "merge_transposes")
    assert step["detail"] == "merged 6 Transpose pair(s), removed 1 identity Transpose(s)"
    assert (step["nodes_before"], step["nodes_after"]) == (12, 6)
    cleaned = onnx.load(result.dst)
    perms = {n.name: list(n.attribute[0].ints) for n in cleaned.graph.node if n.op_type == "Transpose"}
    assert perms == {"same": [1, 2, 0], "shared": [2, 1, 0], "after_shared": [1, 2, 0]}
    assert [o.name for o in cleaned.graph.output] == ["y", "z", "w", "v"]
    assert next(n for n in cleaned.graph.node if n.name == "abs").input[0] == "n"
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    out = run_onnxruntime(cleaned, {"x": x})
    np.testing.assert_array_equal(out["y"], x.transpose(1, 2, 0))
    np.testing.assert_array_equal(out["z"], x.transpose(1, 2, 0))
    assert all(v["max_abs"] == 0.0 for v in result.parity.values())


def _plugin_model() -> onnx.ModelProto:
    """x -> Mul(a + b) -> Identity -> a TensorRT plugin (an op ONNX does not define, in its default domain)."""
    f32 = lambda name, v: numpy_helper.from_array(np.asarray(v, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Add", ["a", "b"], ["ab"], name="const_add"),
             helper.make_node("Mul", ["x", "ab"], ["m"], name="mul"),
             helper.make_node("Identity", ["m"], ["mi"], name="identity"),
             helper.make_node("Relu", ["x"], ["side"], name="side_output"),
             helper.make_node("MyNMS_TRT", ["mi", "x"], ["y"], name="plugin", score_threshold=0.5)]
    graph = helper.make_graph(nodes, "plugin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2]),
                               helper.make_tensor_value_info("side", TensorProto.FLOAT, ["batch", 2])],
                              [f32("a", [1, 2]), f32("b", [3, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_tensorrt_plugin_nodes_are_checked_and_parity_stops_in_front_of_them(tmp_path):
    from trt_prune.onnx_io import check_model, is_plugin

    model = _plugin_model()
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered for MyNMS_TRT"):
        onnx.checker.check_model(model)  # what clean did before: refuse `export --nms-plugin efficient` graphs
    check_model(model)
    assert [n.name for n in model.graph.node if is_plugin(n)] == ["plugin"]
    src = tmp_path / "plugin.onnx"
    onnx.save_model(model, src)
    before = src.read_bytes()
    result = clean_onnx(src, tmp_path / "out.onnx")
    assert src.read_bytes() == before
    cleaned = onnx.load(result.dst)
    nodes = {n.op_type: n for n in cleaned.graph.node}
    assert sorted(nodes) == ["Mul", "MyNMS_TRT", "Relu"]
    plugin = nodes["MyNMS_TRT"]
    assert plugin.domain == "" and plugin.input[0] == nodes["Mul"].output[0]  # the Identity is gone
    assert plugin.attribute[0].f == 0.5
    # ONNX Runtime cannot run the plugin: the outputs in front of it and the plugin's inputs are compared
    assert set(result.parity) == {"side", "plugin:input0", "plugin:input1"}
    assert all(v["max_abs"] == 0.0 for v in result.parity.values())
