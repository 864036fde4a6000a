"""Per-layer mapping, ONNX Runtime profiles of real models, trt_prune.profile, aggregation and interleaving."""

import json
import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from trt_prune import stages
from trt_prune.backends import BuildConfig, LayerTime, Session, TensorSpec, get_backend
from trt_prune.errors import BackendError, ProfileError
from trt_prune.models.demo_detector import DemoDetector
from trt_prune.profiling import aggregate_layers, interleaved_timings, make_feeds, resolve_input_shapes
from trt_prune.profiling.layers import (
    PASSIVE_OPS,
    Graph,
    GraphNode,
    attribute_nodes,
    build_module_map,
    fill_from_neighbours,
    layer_module,
    module_path_from_node_name,
    parse_ort_profile,
    resolve_ort_anchor,
    trt_layer_members,
)


def export(model, x, path, dynamic_batch=True, dynamic_axes=None):
    axes = dynamic_axes or ({"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(model.eval(), x, str(path), dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes=axes)
    return path


class ThreeConvs(nn.Module):
    """conv+relu, conv+SiLU (Sigmoid*Mul in ONNX), conv with a residual add and relu."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.act = nn.SiLU()
        self.c3 = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        y = self.r1(self.c1(x))
        return torch.relu(self.c3(self.act(self.c2(y))) + y)


@pytest.fixture(scope="module")
def three_convs(tmp_path_factory):
    torch.manual_seed(0)
    model = ThreeConvs().eval()
    path = export(model, torch.randn(1, 3, 48, 48), tmp_path_factory.mktemp("m") / "three.onnx")
    return model, path


# ---------------------------------------------------------------- ORT profile parsing (synthetic events)


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur, "ph": "X"}


def _node(name, ts, dur, op="Conv"):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "ph": "X",
            "args": {"op_name": op, "provider": "CPUExecutionProvider"}}


EVENTS = [
    {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 50},
    _run(100, 100), _node("/a/Conv", 110, 60), _node("/b/Relu", 175, 10, "Relu"),
    {"cat": "Node", "name": "/a/Conv_fence_before", "ts": 109, "dur": 0},
    _run(300, 50), _node("/a/Conv", 305, 30), _node("/b/Relu", 340, 6, "Relu"),
    _run(400, 50), _node("/a/Conv", 405, 34), _node("/b/Relu", 441, 4, "Relu"),
    _node("/stray/Node", 1000, 999),  # outside every run: ignored
]


def test_parse_ort_profile_averages_kept_runs():
    profile = parse_ort_profile(EVENTS, skip_runs=1)
    assert profile.runs == 2
    assert [n.name for n in profile.nodes] == ["/a/Conv", "/b/Relu"]
    assert profile.nodes[0].ms == pytest.approx((30 + 34) / 2 / 1000)
    assert profile.nodes[1].ms == pytest.approx((6 + 4) / 2 / 1000)
    assert profile.nodes[1].op == "Relu" and profile.nodes[0].provider == "CPUExecutionProvider"
    assert profile.run_ms == [0.05, 0.05] and profile.run_mean_ms == pytest.approx(0.05)
    everything = parse_ort_profile(EVENTS)
    assert everything.runs == 3 and everything.nodes[0].ms == pytest.approx((60 + 30 + 34) / 3 / 1000)


def test_parse_ort_profile_errors():
    with pytest.raises(ProfileError, match="drops them all"):
        parse_ort_profile(EVENTS, skip_runs=3)
    with pytest.raises(ProfileError, match="no node kernel events"):
        parse_ort_profile([_run(0, 10)])
    no_runs = [_node("/a/Conv", 1, 10), _node("/a/Conv", 20, 30)]
    assert parse_ort_profile(no_runs).nodes[0].ms == pytest.approx(0.02)
    with pytest.raises(ProfileError, match="model_run"):
        parse_ort_profile(no_runs, skip_runs=1)


# ---------------------------------------------------------------- name mapping (synthetic graph)

# ThreeConvs as the TorchScript exporter writes it, and the names ORT_ENABLE_ALL gave its nodes.
GRAPH = Graph([
    GraphNode("/c1/Conv", "Conv", ("x", "c1.weight", "c1.bias"), ("/c1/Conv_output_0",)),
    GraphNode("/r1/Relu", "Relu", ("/c1/Conv_output_0",), ("/r1/Relu_output_0",)),
    GraphNode("/c2/Conv", "Conv", ("/r1/Relu_output_0", "c2.weight", "c2.bias"), ("/c2/Conv_output_0",)),
    GraphNode("/act/Sigmoid", "Sigmoid", ("/c2/Conv_output_0",), ("/act/Sigmoid_output_0",)),
    GraphNode("/act/Mul", "Mul", ("/c2/Conv_output_0", "/act/Sigmoid_output_0"), ("/act/Mul_output_0",)),
    GraphNode("/c3/Conv", "Conv", ("/act/Mul_output_0", "c3.weight", "c3.bias"), ("/c3/Conv_output_0",)),
    GraphNode("/Add", "Add", ("/c3/Conv_output_0", "/r1/Relu_output_0"), ("/Add_output_0",)),
    GraphNode("/Relu", "Relu", ("/Add_output_0",), ("y",)),
    GraphNode("/Constant", "Constant", (), ("/Constant_output_0",)),
], inputs=("x",), outputs=("y",))
ORT_ALL = ["/r1/Relu_output_0_nchwc", "/c2/Conv_output_0_nchwc", "/act/Mul/QuickGeluFusion/",
           "/c3/Conv_output_0_nchwc", "ReorderOutput", "ReorderInput_token_3"]


@pytest.mark.parametrize("ort_name, anchor", [
    ("/c2/Conv", "/c2/Conv"),
    ("/c2/Conv_kernel_time", "/c2/Conv"),
    ("fused /c2/Conv", "/c2/Conv"),  # Gemm/Conv + activation at ORT_ENABLE_EXTENDED
    ("/r1/Relu_output_0_nchwc", "/r1/Relu"),  # NCHWc node named after the fused Conv+Relu's output
    ("/c3/Conv_output_0_nchwc", "/c3/Conv"),
    ("/act/Mul/QuickGeluFusion/", "/act/Mul"),
    ("/act/Mul/QuickGeluFusion/_token_7", "/act/Mul"),
    ("/act/Mul/SomethingNew/", "/act/Mul"),  # unknown rewrite under a node's name: /-bounded prefix
    ("ReorderOutput", None),
    ("ReorderInput_token_3", None),
    ("/nowhere/Conv", None),
])
def test_resolve_ort_anchor(ort_name, anchor):
    assert resolve_ort_anchor(ort_name, GRAPH.node_names(), GRAPH.producers()) == anchor


def test_attribute_nodes_follows_fusions():
    anchors = {n: resolve_ort_anchor(n, GRAPH.node_names(), GRAPH.producers()) for n in ORT_ALL}
    att = attribute_nodes(anchors, GRAPH)
    assert att.members["/r1/Relu_output_0_nchwc"] == ["/c1/Conv", "/r1/Relu"]  # Conv joins its Relu's layer
    assert att.members["/c2/Conv_output_0_nchwc"] == ["/c2/Conv"]
    assert att.members["/act/Mul/QuickGeluFusion/"] == ["/act/Sigmoid", "/act/Mul"]  # not the conv before it
    assert att.members["/c3/Conv_output_0_nchwc"] == ["/c3/Conv", "/Add", "/Relu"]  # residual add + relu
    assert att.members["ReorderOutput"] == [] and att.members["ReorderInput_token_3"] == []
    assert att.removed == ["/Constant"] and att.unattributed == []


def test_attribute_nodes_reports_what_it_cannot_place():
    att = attribute_nodes({"/c2/Conv": "/c2/Conv"}, GRAPH)
    placed = {m for ms in att.members.values() for m in ms}
    assert placed | set(att.removed) | set(att.unattributed) == GRAPH.node_names()
    assert "/c1/Conv" in att.unattributed  # nothing in the profile runs c1 or its relu


def test_layer_module_prefers_the_heavy_member():
    ops = {n.name: n.op for n in GRAPH.nodes}
    modules = {n.name: module_path_from_node_name(n.name) for n in GRAPH.nodes}
    assert layer_module(["/c1/Conv", "/r1/Relu"], ops, modules) == "c1"
    assert layer_module(["/r1/Relu", "/c1/Conv"], ops, modules) == "c1"
    assert layer_module(["/act/Sigmoid", "/act/Mul"], ops, modules) == "act"
    assert layer_module([], ops, modules) is None


@pytest.mark.parametrize("name, known, expected", [
    ("/backbone/stage1/stage1.0/conv/Conv", None, "backbone.stage1.0.conv"),
    ("/head.2/cls/cls.0/conv/Conv", None, "head.2.cls.0.conv"),
    ("/neck/td4/m.0/cv1/act/Mul", None, "neck.td4.m.0.cv1.act"),
    ("/backbone/stage4/stage4.2/pool_1/MaxPool", None, "backbone.stage4.2.pool_1"),
    ("/backbone/stage4/stage4.2/pool_1/MaxPool", {"backbone.stage4.2.pool"}, "backbone.stage4.2.pool"),
    ("/Concat_3", None, ""),
    ("Identity_62", None, None),
])
def test_module_path_from_node_name(name, known, expected):
    assert module_path_from_node_name(name, known) == expected


def test_trt_layer_members():
    names = GRAPH.node_names()
    assert trt_layer_members("x", ["/c1/Conv", "/r1/Relu"], names) == ["/c1/Conv", "/r1/Relu"]
    assert trt_layer_members("/c1/Conv + /r1/Relu", [], names) == ["/c1/Conv", "/r1/Relu"]
    assert trt_layer_members("PWN(/act/Sigmoid, /act/Mul)", [], names) == ["/act/Sigmoid", "/act/Mul"]
    assert trt_layer_members("/c3/Conv + PWN(/Add, /Relu)", [], names) == ["/c3/Conv", "/Add", "/Relu"]
    assert trt_layer_members("{ForeignNode[/c2/Conv.../act/Mul]}", [], names) == ["/c2/Conv", "/act/Mul"]
    assert trt_layer_members("Reformatting CopyNode for Input Tensor 0 to /c1/Conv", [], names) == []


# ---------------------------------------------------------------- real ONNX Runtime profiles


def _modules_of(model):
    return {name for name, _ in model.named_modules()}


def test_ort_profile_without_optimisation_maps_one_to_one(three_convs):
    model, path = three_convs
    graph = Graph.from_onnx(onnx.load(str(path)))
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 48, 48)).astype(np.float32)}
    with get_backend("onnxruntime").build(path, BuildConfig(threads=1, optimization_level=0)) as s:
        rows = s.profile_layers(x, runs=3)
    compute = [n.name for n in graph.nodes if n.op not in PASSIVE_OPS]
    assert [r.name for r in rows] == compute  # same names, same count, execution order
    assert all(r.members == [r.name] for r in rows)
    modules = _modules_of(model)
    assert all(r.module in modules for r in rows)
    assert {r.module for r in rows if r.op == "Conv"} == {"c1", "c2", "c3"}


def test_ort_profile_fully_optimised_maps_fused_layers(three_convs):
    model, path = three_convs
    graph = Graph.from_onnx(onnx.load(str(path)))
    x = {"x": np.random.default_rng(0).standard_normal((8, 3, 48, 48)).astype(np.float32)}  # about 1 ms
    with get_backend("onnxruntime").build(path, BuildConfig(threads=1)) as s:
        rows = s.profile_layers(x, runs=20)
        run_ms = s.profile_run_ms
        e2e = s.time(x, warmup_s=0.1, iterations=30)
    mapped = [r for r in rows if r.module is not None]
    modules = _modules_of(model)
    assert all(r.module in modules for r in mapped)
    # each conv runs in exactly one layer, and every layer with a module holds at least one ONNX node
    assert Counter(r.module for r in mapped if any(graph_op == "Conv" for graph_op in
                                                   (n.op for n in graph.nodes if n.name in r.members))) == \
        {"c1": 1, "c2": 1, "c3": 1}
    layout = ("ReorderInput", "ReorderOutput")
    assert all(r.members for r in mapped if r.op not in layout)
    # layout conversions ORT inserts hold no ONNX node; each takes the module of the layer it converts for
    for i, r in enumerate(rows):
        if r.op in layout:
            assert not r.members and r.module in modules
            step = 1 if r.op == "ReorderInput" else -1
            j = i + step
            while rows[j].op in layout:
                j += step
            assert r.module == rows[j].module
    # every ONNX compute node lands in exactly one layer
    placed = Counter(m for r in rows for m in r.members)
    assert set(placed) == {n.name for n in graph.nodes if n.op not in PASSIVE_OPS}
    assert max(placed.values()) == 1
    # Relation 1 (exact, same runs): kernels run inside model_run, so their per-run sum cannot exceed it;
    # 1 us per node covers ORT's integer-microsecond durations.
    per_layer_sum = sum(r.ms for r in rows)
    assert 0 < per_layer_sum <= run_ms + 0.001 * len(rows)
    # Relation 2 (separate runs on a noisy machine, so loose): the per-layer sum is a per-inference mean, not
    # a total over the 20 profiled runs; a missing division would put it near 20x the end-to-end median.
    assert per_layer_sum < 4 * float(np.median(e2e)) + 3.0


def test_ort_profile_of_demo_detector_maps_every_conv(tmp_path):
    torch.manual_seed(0)
    model = DemoDetector().eval()
    path = export(model, torch.randn(1, 3, 160, 160), tmp_path / "demo.onnx")
    graph = Graph.from_onnx(onnx.load(str(path)))
    conv_modules = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    x = {"x": np.zeros((1, 3, 160, 160), np.float32)}
    with get_backend("onnxruntime").build(path, BuildConfig(threads=2)) as s:
        rows = s.profile_layers(x, runs=2)
    ops = {n.name: n.op for n in graph.nodes}
    conv_rows = [r for r in rows if any(ops[m] == "Conv" for m in r.members)]
    assert Counter(r.module for r in conv_rows) == Counter({m: 1 for m in conv_modules})  # 63 convs, once each
    silu = [r for r in rows if r.op == "QuickGelu"]
    assert silu and all(sorted(ops[m] for m in r.members) == ["Mul", "Sigmoid"] for r in silu)
    assert all(r.module.endswith(".act") for r in silu)
    # every layer maps to a module: fused ones, layout conversions, and the Splits the dynamo exporter's
    # optimiser leaves without a scope
    assert [r.name for r in rows if r.module is None] == []


def test_unscoped_nodes_take_the_common_module_of_their_neighbours():
    from onnx import helper

    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
             helper.make_node("Split", ["a"], ["b", "c"], name="split", axis=1, num_outputs=2),
             helper.make_node("Relu", ["b"], ["d"], name="m0"),
             helper.make_node("Concat", ["c", "d"], ["e"], name="cat", axis=1),
             helper.make_node("Identity", ["e"], ["f"], name="id"),
             helper.make_node("Mul", ["f", "f"], ["g"], name="lonely")]
    mapping = {"conv": "backbone.s1.cv1.conv", "split": None, "m0": "backbone.s1.m.0.act", "cat": "backbone.s1",
               "id": None, "lonely": None}
    filled = fill_from_neighbours(mapping, nodes)
    assert filled["split"] == "backbone.s1"  # common ancestor of cv1.conv, m.0.act and the block's concat
    assert filled["id"] is None  # passive ops stay unmapped
    assert filled["lonely"] is None  # its only neighbour is unmapped
    assert mapping["split"] is None  # the input is not modified


def test_build_module_map_takes_a_resolver(three_convs):
    model = onnx.load(str(three_convs[1]))
    mapping = build_module_map(model, lambda node: "m:" + node.name)
    assert mapping["/c1/Conv"] == "m:/c1/Conv" and len(mapping) == len(model.graph.node)


# ---------------------------------------------------------------- trt_prune.profile


def test_profile_onnx_end_to_end(three_convs):
    path = three_convs[1]
    r = stages.profile(path, batch=2, warmup_s=0.05, iterations=15, min_duration_s=0.0, threads=1, layer_runs=3)
    assert r.backend == "onnxruntime" and r.batch == 2 and r.input_shapes == {"x": [2, 3, 48, 48]}
    assert r.latency_ms["n"] == 15 == len(r.samples_ms)
    assert r.throughput_ips == pytest.approx(1000.0 / r.latency_ms["mean"])
    assert r.throughput_images_s == pytest.approx(2 * r.throughput_ips)
    assert r.per_layer and [row["ms"] for row in r.per_layer] == sorted((row["ms"] for row in r.per_layer),
                                                                       reverse=True)
    assert set(r.per_layer[0]) >= {"name", "op", "module", "ms"}
    assert r.per_layer_sum_ms == pytest.approx(sum(row["ms"] for row in r.per_layer))
    assert r.per_layer_sum_ms <= r.per_layer_run_ms + 0.001 * len(r.per_layer)
    assert (r.cv_warning is None) == (r.latency_ms["cv"] <= 0.025)
    assert r.env["threads"] == 1 and r.env["backend_version"] and r.env["cpu"]
    json.dumps(r.to_dict())


def test_profile_onnx_without_layers_and_with_a_module_map(three_convs):
    path = three_convs[1]
    r = stages.profile(path, warmup_s=0.0, iterations=3, min_duration_s=0.0, threads=1, per_layer=False)
    assert r.per_layer == [] and r.per_layer_sum_ms is None
    r = stages.profile(path, warmup_s=0.0, iterations=3, min_duration_s=0.0, threads=1, layer_runs=2,
                     module_map=lambda node: "everything")
    assert {row["module"] for row in r.per_layer if row["members"]} == {"everything"}


def test_profile_onnx_input_errors(tmp_path, three_convs):
    with pytest.raises(ProfileError, match="does not exist"):
        stages.profile(tmp_path / "nope.onnx")
    fixed = export(ThreeConvs(), torch.randn(1, 3, 16, 16), tmp_path / "fixed.onnx", dynamic_batch=False)
    with pytest.raises(ProfileError, match="fixed batch of 1"):
        stages.profile(fixed, batch=2)
    with pytest.raises(BackendError, match="valid names: onnxruntime, tensorrt"):
        stages.profile(three_convs[1], backend="nope")


def test_profile_onnx_needs_input_shape_for_other_dynamic_axes(tmp_path):
    path = export(ThreeConvs(), torch.randn(1, 3, 16, 16), tmp_path / "dyn.onnx", dynamic_batch=False,
                  dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b", 2: "h", 3: "w"}})
    with pytest.raises(ProfileError, match=r"dynamic axes \[2, 3\].*input_shape"):
        stages.profile(path)
    r = stages.profile(path, input_shape=(1, 3, 24, 20), warmup_s=0.0, iterations=2, min_duration_s=0.0,
                     threads=1, per_layer=False)
    assert r.input_shapes == {"x": [1, 3, 24, 20]}


def test_resolve_input_shapes_and_feeds():
    specs = [TensorSpec("img", ("N", 3, 8, 8), "float32"), TensorSpec("ids", ("N", "T"), "int64")]
    with pytest.raises(ProfileError, match="dict"):
        resolve_input_shapes(specs, 1, (1, 3, 8, 8))
    shapes = resolve_input_shapes(specs, 2, {"ids": (2, 5)})
    assert shapes == {"img": (2, 3, 8, 8), "ids": (2, 5)}
    with pytest.raises(ProfileError, match="batch=3"):
        resolve_input_shapes(specs, 3, {"ids": (2, 5)})
    with pytest.raises(ProfileError, match="fixed at 3"):
        resolve_input_shapes(specs, 2, {"img": (2, 4, 8, 8), "ids": (2, 5)})
    with pytest.raises(ProfileError, match="not model inputs"):
        resolve_input_shapes(specs, 2, {"nope": (2,)})
    with pytest.raises(ProfileError, match="batch"):
        resolve_input_shapes(specs, 0)
    feeds = make_feeds(specs, shapes, seed=3)
    assert feeds["img"].dtype == np.float32 and feeds["img"].shape == (2, 3, 8, 8) and feeds["img"].std() > 0.5
    assert feeds["ids"].dtype == np.int64 and not feeds["ids"].any()
    np.testing.assert_array_equal(make_feeds(specs, shapes, seed=3)["img"], feeds["img"])


# ---------------------------------------------------------------- aggregation

ROWS = [
    LayerTime("a", "Conv", 3.0, "backbone.stage1.0.conv", ["/a"]),
    LayerTime("b", "QuickGelu", 1.0, "backbone.stage1.0.act", ["/b"]),
    {"name": "c", "op": "Conv", "module": "head.0.cls.0.conv", "ms": 2.0, "members": ["/c"]},
    LayerTime("ReorderInput", "ReorderInput", 0.5, None, []),
    LayerTime("/Concat", "Concat", 0.25, "", ["/Concat"]),
    LayerTime("a2", "Conv", 1.0, "backbone.stage1.0.conv", ["/a2"]),
]


def test_aggregate_layers():
    by_module = aggregate_layers(ROWS, by="module")
    assert [(r["key"], r["ms"], r["count"]) for r in by_module] == [
        ("backbone.stage1.0.conv", 4.0, 2), ("head.0.cls.0.conv", 2.0, 1), ("backbone.stage1.0.act", 1.0, 1),
        ("(unmapped)", 0.5, 1), ("(root)", 0.25, 1)]
    assert sum(r["share"] for r in by_module) == pytest.approx(1.0)
    assert by_module[0]["share"] == pytest.approx(4.0 / 7.75)
    by_stage = aggregate_layers(ROWS, by="stage")
    assert [(r["key"], r["ms"]) for r in by_stage] == [("backbone", 5.0), ("head", 2.0), ("(unmapped)", 0.5),
                                                       ("(root)", 0.25)]
    by_op = aggregate_layers(ROWS, by="op")
    assert by_op[0] == {"key": "Conv", "ms": 6.0, "count": 3, "share": pytest.approx(6.0 / 7.75)}
    with pytest.raises(ProfileError, match="module"):
        aggregate_layers(ROWS, by="layer")
    assert aggregate_layers([], by="op") == []


# ---------------------------------------------------------------- interleaving


class RecordingSession(Session):
    backend_name = "fake"

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    @property
    def inputs(self):
        return [TensorSpec("x", (1,), "float32")]

    @property
    def outputs(self):
        return [TensorSpec("y", (1,), "float32")]

    def _run_impl(self, feeds):
        self.log.append(self.name)
        return {"y": feeds["x"]}

    def _profile_layers_impl(self, feeds, runs, module_map):
        return []


def test_interleaved_timings_shuffles_rounds():
    log = []
    sessions = {n: RecordingSession(n, log) for n in ("dense", "pruned", "sparse")}
    feeds = {n: {"x": np.zeros(1, np.float32)} for n in sessions}
    out = interleaved_timings(sessions, feeds, rounds=12, iterations_per_round=2, warmup_s=0.0, seed=1)
    assert {n: len(v) for n, v in out.items()} == {"dense": 24, "pruned": 24, "sparse": 24}
    assert all(v > 0 for samples in out.values() for v in samples)
    turns = [log[i] for i in range(0, len(log), 3)]  # 2 kept + 1 discarded call per turn
    assert all(log[i] == log[i + 1] == log[i + 2] for i in range(0, len(log), 3))
    rounds = [tuple(turns[i:i + 3]) for i in range(0, len(turns), 3)]
    assert all(sorted(r) == ["dense", "pruned", "sparse"] for r in rounds)
    assert len(set(rounds)) > 1  # the order changes between rounds
    log2 = []
    again = {n: RecordingSession(n, log2) for n in sessions}
    interleaved_timings(again, feeds, rounds=12, iterations_per_round=2, warmup_s=0.0, seed=1)
    assert log2 == log  # same seed, same order


def test_interleaved_timings_errors():
    log = []
    sessions = {"a": RecordingSession("a", log)}
    with pytest.raises(ProfileError, match="no feeds"):
        interleaved_timings(sessions, {}, rounds=1)
    with pytest.raises(ProfileError, match="rounds"):
        interleaved_timings(sessions, {"a": {"x": np.zeros(1, np.float32)}}, rounds=0)
    with pytest.raises(ProfileError, match="at least one"):
        interleaved_timings({}, {})


def test_ort_profile_of_a_dynamo_export_maps_through_tensor_names(tmp_path):
    # torch.export names nodes node_conv2d, node_silu...; ORT's NCHWc convs are then named after tensors
    # (conv2d_nchwc) and only the tensor-producer rule finds their node. Modules come from node metadata.
    torch.manual_seed(0)
    model = ThreeConvs().eval()
    path = tmp_path / "three_dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 48, 48),), str(path), dynamo=True, opset_version=18,
                          input_names=["x"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    graph = Graph.from_onnx(onnx.load(str(path)))
    x = {"x": np.zeros((1, 3, 48, 48), np.float32)}
    with get_backend("onnxruntime").build(path, BuildConfig(threads=1)) as s:
        rows = s.profile_layers(x, runs=2)
    ops = {n.name: n.op for n in graph.nodes}
    conv_rows = [r for r in rows if any(ops[m] == "Conv" for m in r.members)]
    assert sorted(r.module for r in conv_rows) == ["c1", "c2", "c3"]
    placed = Counter(m for r in rows for m in r.members)
    assert set(placed) == {n.name for n in graph.nodes if n.op not in PASSIVE_OPS} and max(placed.values()) == 1
