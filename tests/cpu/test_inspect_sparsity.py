"""2:4 inspection of ONNX weights, checked against Polygraphy's own sparsity checker."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from trt_prune.errors import SparsifyError
from trt_prune.sparsity.inspect import inspect_sparsity
from trt_prune.sparsity.pattern import holds_2of4, mask_2of4

RNG = np.random.default_rng(0)


def _dense(*shape):
    # magnitudes in [0.5, 1.5): no zero by chance, so "dense" really is dense
    return (RNG.uniform(0.5, 1.5, shape) * RNG.choice([-1, 1], shape)).astype(np.float32)


def _masked(*shape, axis):
    weight = _dense(*shape)
    return weight * mask_2of4(weight, axis)


def layers_model() -> onnx.ModelProto:
    """x[1,3,8,8] → conv(3 in) → conv 2:4 → conv dense → depthwise → flatten → Linear 2:4 → Linear dense → MatMul 2:4,
    plus weights reached through Transpose, Cast and Q/DQ."""
    inits = {
        "conv_c3.weight": _dense(8, 3, 3, 3),
        "conv_sparse.weight": _masked(8, 8, 3, 3, axis=1),
        "conv_dense.weight": _dense(8, 8, 3, 3),
        "conv_dw.weight": _dense(8, 1, 3, 3),
        "fc_sparse.weight": _masked(16, 512, axis=1),     # Linear: Gemm transB=1, weight [out, in]
        "fc_dense.weight": _dense(16, 16),
        "mm.B": _masked(16, 8, axis=0),                    # MatMul B [K, N]: reduction axis 0
        "fc_t.weight_t": _masked(8, 8, axis=1).T.copy(),   # stored [in, out], Transposed to [out, in]
        "conv_fp16.weight": _masked(8, 8, 1, 1, axis=1).astype(np.float16),
        "conv_q.weight": _masked(8, 8, 1, 1, axis=1),
        "conv_q.scale": np.array(0.05, np.float32),
        "conv_q.zero": np.array(0, np.int8),
        "flat_shape": np.array([1, 512], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv_c3.weight"], ["c1"], name="conv_c3", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "conv_sparse.weight"], ["c2"], name="conv_sparse", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c2", "conv_dense.weight"], ["c3"], name="conv_dense", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c3", "conv_dw.weight"], ["c4"], name="conv_dw", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Cast", ["conv_fp16.weight"], ["w16"], name="cast_w", to=TensorProto.FLOAT),
        helper.make_node("Conv", ["c4", "w16"], ["c5"], name="conv_fp16"),
        helper.make_node("QuantizeLinear", ["conv_q.weight", "conv_q.scale", "conv_q.zero"], ["wq"], name="q"),
        helper.make_node("DequantizeLinear", ["wq", "conv_q.scale", "conv_q.zero"], ["wdq"], name="dq"),
        helper.make_node("Conv", ["c5", "wdq"], ["c6"], name="conv_q"),
        helper.make_node("Reshape", ["c6", "flat_shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_sparse.weight"], ["g1"], name="fc_sparse", transB=1),
        helper.make_node("Gemm", ["g1", "fc_dense.weight"], ["g2"], name="fc_dense", transB=1),
        helper.make_node("MatMul", ["g2", "mm.B"], ["m"], name="mm"),
        helper.make_node("Transpose", ["fc_t.weight_t"], ["wt"], name="transpose_w", perm=[1, 0]),
        helper.make_node("Gemm", ["m", "wt"], ["y"], name="fc_t", transB=1),
    ]
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    path = tmp_path_factory.mktemp("sparsity") / "layers.onnx"
    onnx.save_model(layers_model(), path)
    return path


def test_verdicts_and_reasons(layers):
    records = {r.name: r for r in inspect_sparsity(layers)}
    expected = {  # name: (op, axis, holds_24, eligible)
        "conv_c3.weight": ("Conv", 1, False, False),
        "conv_sparse.weight": ("Conv", 1, True, True),
        "conv_dense.weight": ("Conv", 1, False, True),
        "conv_dw.weight": ("Conv", 1, False, False),
        "conv_fp16.weight": ("Conv", 1, True, True),
        "conv_q.weight": ("Conv", 1, True, True),
        "fc_sparse.weight": ("Gemm", 1, True, True),
        "fc_dense.weight": ("Gemm", 1, False, True),
        "mm.B": ("MatMul", 0, True, True),
        "fc_t.weight_t": ("Gemm", 0, True, True),  # axis 1 of the Transposed view is axis 0 of the store
    }
    assert {k: (r.op, r.axis, r.holds_24, r.eligible) for k, r in records.items()} == expected
    assert records["conv_c3.weight"].reason == "input channels 3 not a multiple of 4"
    assert records["conv_dw.weight"].reason.startswith("depthwise conv (group=8): 1 input channels per group")
    assert records["conv_sparse.weight"].reason == "holds 2:4"
    assert records["conv_dense.weight"].reason == "dense: 144 of 144 groups have more than 2 non-zeros"
    assert records["fc_dense.weight"].reason == "dense: 64 of 64 groups have more than 2 non-zeros"
    assert records["conv_sparse.weight"].node == "conv_sparse" and records["mm.B"].shape == (16, 8)
    assert json.loads(json.dumps(records["mm.B"].to_dict()))["shape"] == [16, 8]


def test_partly_dense_weight_counts_groups(tmp_path):
    weight = _masked(4, 8, axis=1)
    weight[0, :4] = 1.0  # one group of 4 fully dense, 7 others fine
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    [record] = inspect_sparsity(path)
    assert record.reason == "dense: 1 of 8 groups have more than 2 non-zeros" and not record.holds_24


def _polygraphy_verdicts(model):
    """Polygraphy's checker (what `polygraphy inspect sparsity` runs): eligible names and sparse names."""
    from polygraphy.tools.sparse import SparsityPruner

    checker = SparsityPruner(model)
    checker.check()
    # _walk_nodes is the step check() runs first; a fresh instance gives its eligibility list on its own
    eligible = {info.name for info in SparsityPruner(model)._walk_nodes()}
    return eligible, set(checker.sparse_tensors)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # inside Polygraphy, on fp16
def test_agrees_with_polygraphy_checker(layers):
    model = onnx.load(layers)
    eligible, sparse = _polygraphy_verdicts(model)
    records = inspect_sparsity(layers)
    # Polygraphy skips integer weights; every weight here is float, so it judges all of them
    assert {r.name for r in records if r.eligible} == eligible
    assert {r.name for r in records if r.holds_24} == sparse
    assert {"conv_sparse.weight", "fc_sparse.weight", "mm.B", "fc_t.weight_t"} <= sparse
    assert "conv_dense.weight" not in sparse and "conv_c3.weight" not in eligible


def test_transpose_axis_uses_perm_not_its_inverse(tmp_path):
    # weight stored [K, R, S, C], given to the Conv as [K, C, R, S] by perm [0, 3, 1, 2]:
    # the Conv's axis 1 is axis perm[1] = 3 of the store (C). Polygraphy takes perm.index(1) = 2 (S).
    stored = np.moveaxis(_masked(8, 4, 3, 3, axis=1), 1, 3).copy()   # [8, 3, 3, 4]
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w_khwc"], ["w"], name="to_kcrs", perm=[0, 3, 1, 2]),
         helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 3, 3])],
        [numpy_helper.from_array(stored, "w_khwc")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "t.onnx"
    onnx.save_model(model, path)
    [record] = inspect_sparsity(path)
    assert (record.axis, record.eligible, record.holds_24) == (3, True, True)
    assert holds_2of4(np.transpose(stored, (0, 3, 1, 2)), axis=1)  # what the Conv really sees
    eligible, _ = _polygraphy_verdicts(model)
    assert eligible == set()  # Polygraphy looks at the length-3 axis and gives up: the known discrepancy


def test_masked_detector_export_end_to_end(tmp_path):
    """2:4 masks on chosen DemoDetector convs survive BatchNorm folding and map back to the modules."""
    from trt_prune.exporter import export_onnx
    from trt_prune.models.demo_detector import DemoDetector
    from trt_prune.onnx_io import node_module

    torch.manual_seed(0)
    model = DemoDetector()
    chosen = {"backbone.stage2.0.conv", "neck.td3.cv2.conv", "head.1.cls.1.conv"}
    with torch.no_grad():
        for name in chosen:
            weight = model.get_submodule(name).weight
            weight.mul_(torch.from_numpy(mask_2of4(weight.numpy(), axis=1)))
    result = export_onnx(model, tmp_path / "det.onnx", exporter="torchscript", check_parity=False)
    records = inspect_sparsity(result.path)
    graph = onnx.load(result.path).graph
    module_of = {n.name: node_module(n) for n in graph.node}
    assert len(records) == 63
    assert {module_of[r.node] for r in records if r.holds_24} == chosen
    assert [module_of[r.node] for r in records if not r.eligible] == ["backbone.stem.conv"]  # 3 input channels


def test_missing_or_corrupt_file_raises(tmp_path):
    with pytest.raises(SparsifyError, match="does not exist"):
        inspect_sparsity(tmp_path / "none.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(SparsifyError, match="bad.onnx"):
        inspect_sparsity(tmp_path / "bad.onnx")


class _ConvBNLinear(torch.nn.Module):
    """Conv+BN (folded at export), a 1×1 conv, and Linear layers (exported as Gemm or as MatMul on a
    transposed weight, depending on the exporter): the places where export could move the 2:4 axis."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.conv = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.pw = nn.Conv2d(32, 32, 1)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 16)

    def forward(self, x):
        x = self.pw(self.conv(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_sparsify_export_clean_keeps_every_eligible_layer_24(tmp_path, exporter):
    """Every layer sparsify made 2:4 still holds the pattern on TensorRT's axis after export (BatchNorm folded
    into the conv, Linear weights possibly transposed) and clean; ours and Polygraphy's checker agree."""
    from trt_prune.cleaner import clean_onnx
    from trt_prune.exporter import export_onnx
    from trt_prune.onnx_io import node_module
    from trt_prune.sparsity import sparsify

    torch.manual_seed(0)
    model = _ConvBNLinear().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, so folding really rescales
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    result = sparsify(model, min_channels=16)
    assert set(result.sparse_layers) == {"conv.0", "pw", "fc1", "fc2"}
    exported = export_onnx(result.model, tmp_path / "m.onnx", input_shape=(1, 16, 8, 8), exporter=exporter)
    cleaned = tmp_path / "m.clean.onnx"
    clean_onnx(exported.path, cleaned)
    records = inspect_sparsity(cleaned)
    graph = onnx.load(cleaned).graph
    module_of = {n.name: node_module(n) for n in graph.node}
    assert {module_of[r.node] for r in records if r.holds_24} == {"conv.0", "pw", "fc1", "fc2"}
    eligible, sparse = _polygraphy_verdicts(onnx.load(cleaned))
    assert {r.name for r in records if r.holds_24} == sparse
    assert {r.name for r in records if r.eligible} == eligible
