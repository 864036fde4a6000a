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

from trt_prune.clean import DEFAULT_PASSES, PASSES, clean_onnx
from trt_prune.errors import CleanError, OutputError
from trt_prune.onnx_io import node_module, onnx_sha256, random_feeds, run_onnxruntime


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
    assert result.parity["y"]["max_abs"] == 0.0
    assert set(result.to_dict()) == {"src", "dst", "nodes_before", "nodes_after", "passes", "parity"}


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
    with pytest.raises(CleanError, match="valid passes: shape_inference, fold_constants"):
        clean_onnx(messy, tmp_path / "c.onnx", passes=["fold", "cleanup"])
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


def test_parity_failure_writes_nothing(messy, tmp_path, monkeypatch):
    import trt_prune.clean as clean_module

    def bad_pass(graph):  # a "cleaning" that changes the math
        graph.nodes[2].op = "Sub"
        return graph, "broke it"

    monkeypatch.setitem(clean_module.PASSES, "toposort", bad_pass)
    with pytest.raises(CleanError, match="changed what the graph computes"):
        clean_onnx(messy, tmp_path / "c.onnx", passes=["toposort"])
    assert not (tmp_path / "c.onnx").exists()


def test_detector_clean_beats_polygraphy_sanitize(tmp_path):
    from trt_prune.export import export_onnx
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
