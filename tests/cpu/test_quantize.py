"""INT8 Q/DQ placement (TensorRT's rules), calibration, the cache, bad inputs and the CLI, on real exports."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from torch import nn

from trt_prune.cli import cli
from trt_prune.errors import QuantizeError
from trt_prune.exporter import export_onnx
from trt_prune.quantize import calibration_set, inspect_quantization, place, quantize, violations
from trt_prune.quantize.calibrate import collect_ranges
from trt_prune.quantize.placement import WEIGHTED


def _consumers(graph):
    out = {}
    for n in graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def _producers(graph):
    return {o: n for n in graph.node for o in n.output}


def _random_calib(path, shape, n=4, seed=0):
    np.save(path, np.random.default_rng(seed).random((n, *shape), dtype=np.float32))
    return path


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    from trt_prune.models import load_model

    path = tmp_path_factory.mktemp("demo") / "demo.onnx"
    export_onnx(load_model("builtin:demo-detector").model.eval(), path, (1, 3, 320, 320))
    return path


@pytest.fixture(scope="module")
def demo_int8(demo_onnx, tmp_path_factory):
    dst = tmp_path_factory.mktemp("demo_int8") / "demo.int8.onnx"
    return quantize(demo_onnx, dst, calib="builtin", calib_size=8, method="minmax")


@pytest.fixture(scope="module")
def resnet50_int8(tmp_path_factory):
    from trt_prune.models import load_model

    folder = tmp_path_factory.mktemp("r50")
    torch.manual_seed(0)
    export_onnx(load_model("torchvision:resnet50").model.eval(), folder / "r50.onnx", (1, 3, 224, 224))
    calib = _random_calib(folder / "calib.npy", (3, 224, 224))
    return quantize(folder / "r50.onnx", folder / "r50.int8.onnx", calib=str(calib), method="minmax")


class Block(nn.Module):
    """One pre-norm transformer encoder block on 16 tokens of width 64."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=True)

    def forward(self, x):
        return self.layer(x)


# ------------------------------------------------------------------------------------------------ placement
def test_demo_detector_placement_follows_tensorrts_rules(demo_int8):
    model = onnx.load(demo_int8.dst)
    assert violations(model) == []
    p = demo_int8.placement
    kept = {k["node"]: k["reason"] for k in p["kept"]}
    # the stem (3 colours in) and the six 4-channel box/class output convs stay float, with the reason
    assert len(kept) == 7 and sum("3 input / 16 output" in r for r in kept.values()) == 1
    assert sum("64 input / 4 output channels: fewer than 16" in r for r in kept.values()) == 6
    assert len(p["quantized"]) == 56 and demo_int8.weights == 56
    assert len(p["residual"]) == 6  # the bottleneck shortcuts of the C2f-style blocks
    assert p["tail"]["nodes"] > 0  # the head's Concat/Reshape tail
    producers = _producers(model.graph)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.name not in kept:
            act, weight = producers[node.input[0]], producers[node.input[1]]
            assert act.op_type == weight.op_type == "DequantizeLinear"
            w = numpy_helper.to_array(inits[weight.input[0]])
            assert w.dtype == np.int8 and w.min() >= -127
            assert numpy_helper.to_array(inits[weight.input[1]]).shape == (w.shape[0],)  # per output channel
            assert len(node.input) < 3 or node.input[2] in inits  # the bias stays a float initializer
        if node.op_type in ("Concat", "Reshape", "Resize", "Sigmoid", "Split", "MaxPool"):
            assert all(producers.get(t) is None or producers[t].op_type != "DequantizeLinear" for t in node.input)
        if node.op_type == "QuantizeLinear":  # never right after a conv: that output goes through BN/SiLU first
            assert producers[node.input[0]].op_type not in WEIGHTED
    # each residual Add reads exactly one input through a pair; the other comes straight from a conv's chain
    for r in p["residual"]:
        add = next(n for n in model.graph.node if n.name == r["node"])
        from_dq = [producers[t].op_type == "DequantizeLinear" for t in add.input]
        assert sorted(from_dq) == [False, True]
    assert demo_int8.agreement["output"]["sqnr_db"] > 20


def test_resnet50_residual_adds_quantize_the_shortcut_only(resnet50_int8):
    model = onnx.load(resnet50_int8.dst)
    assert violations(model) == []
    producers = _producers(model.graph)
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert len(adds) == 16 and len(resnet50_int8.placement["residual"]) == 16
    for add in adds:
        sides = [producers[t] for t in add.input]
        dq = [s for s in sides if s.op_type == "DequantizeLinear"]
        assert len(dq) == 1  # the shortcut (block input, or the downsample conv's output) is INT8
        conv_side = next(s for s in sides if s.op_type != "DequantizeLinear")
        assert conv_side.op_type in ("Conv", "BatchNormalization")  # fused into the add: no pair on its side
    kept = resnet50_int8.placement["kept"]
    assert [k["reason"] for k in kept] == ["3 input / 64 output channels: fewer than 16, too little work to gain "
                                           "from INT8"]
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert producers[fc.input[1]].op_type == "DequantizeLinear"  # the classifier is INT8 too, per channel


def test_transformer_block_quantizes_its_matmuls_and_leaves_softmax_and_norms(tmp_path):
    torch.manual_seed(0)
    export_onnx(Block().eval(), tmp_path / "block.onnx", (1, 16, 64))
    calib = _random_calib(tmp_path / "calib.npy", (16, 64), n=8)
    # a 3-D input: calibration_set wants N×C×H×W images, so feed the ranges directly through the lower level
    model = onnx.load(tmp_path / "block.onnx")
    p = place(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert {ops[q.name] for q in p.nodes} <= {"MatMul", "Gemm"} and len(p.nodes) >= 4
    act_act = [q for q in p.nodes if q.weight is None]
    assert len(act_act) == 2  # Q·Kᵀ and attention·V: both inputs per tensor
    # the file has the dynamic batch asked for (dynamo fixes this block's batch to 1, so TorchScript writes it)
    with pytest.raises(QuantizeError, match=r"shape \[None, 16, 64\]; calibration needs N×C×H×W"):
        quantize(tmp_path / "block.onnx", tmp_path / "block.int8.onnx", calib=str(calib))
    assert not (tmp_path / "block.int8.onnx").exists()
    from trt_prune.quantize import quantize_model

    data = np.load(calib)
    tensors = list(p.activation_consumers())

    class Feed:  # the CalibrationSet protocol: batches of {input: array} (the export's batch is 1)
        count = len(data)

        def batches(self):
            for i in range(len(data)):
                yield {model.graph.input[0].name: data[i:i + 1]}

    ranges = collect_ranges(model, tensors, Feed(), "minmax")
    q = quantize_model(model, p, ranges)
    onnx.checker.check_model(q)
    assert violations(q) == []
    producers = _producers(q.graph)
    for node in q.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization"):
            assert all(producers.get(t) is None or producers[t].op_type != "DequantizeLinear" for t in node.input)
    out = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {q.graph.input[0].name: data[:1]})[0]
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {model.graph.input[0].name: data[:1]})[0]
    assert np.abs(out - ref).max() < 0.25 * np.abs(ref).max()


# ------------------------------------------------------------------------------------------------ calibration
def test_histogram_methods_clip_below_the_maximum(demo_onnx):
    model = onnx.load(demo_onnx)
    p = place(model)
    tensors = list(p.activation_consumers())[:6]
    data = calibration_set("builtin", model, limit=4)
    ranges = {m: collect_ranges(model, tensors, data, m) for m in ("minmax", "entropy", "percentile")}
    for t in tensors:
        assert 0 < ranges["entropy"][t] <= ranges["minmax"][t] + 1e-6
        assert 0 < ranges["percentile"][t] <= ranges["minmax"][t] + 1e-6
    assert any(ranges["entropy"][t] < 0.99 * ranges["minmax"][t] for t in tensors)


def test_image_folders_are_letterboxed_to_the_input(tmp_path, demo_onnx):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (640, 320), (255, 0, 0)).save(tmp_path / "imgs" / "wide.png")
    Image.new("L", (100, 100), 255).save(tmp_path / "imgs" / "grey.jpg")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    data = calibration_set(str(tmp_path / "imgs"), onnx.load(demo_onnx))
    assert data.count == 2
    batch = np.concatenate([b[data.input_name] for b in data.batches()])
    assert batch.shape == (2, 3, 320, 320)
    grey, wide = batch  # sorted by name
    assert np.allclose(grey, 1.0, atol=1e-6)
    assert np.allclose(wide[:, 0, :], 114 / 255)  # 640×320 → 320×160, padded above and below
    assert np.allclose(wide[:, 160, :], [[1.0], [0.0], [0.0]])


def test_the_cache_spares_a_rebuild_and_follows_the_method(demo_onnx, tmp_path):
    dst = tmp_path / "a.onnx"
    first = quantize(demo_onnx, dst, calib="builtin", calib_size=4, method="minmax")
    cache = json.loads((tmp_path / "a.onnx.calib.json").read_text())
    assert not first.calibration["cached"] and len(cache["ranges"]) == first.calibration["tensors"]
    before = dst.read_bytes()
    second = quantize(demo_onnx, dst, calib="builtin", calib_size=4, method="minmax")
    assert second.calibration["cached"] and dst.read_bytes() == before
    # an --exclude needs a subset of the same ranges (calibration runs the fp32 model): no recalibration
    fewer = quantize(demo_onnx, tmp_path / "b.onnx", calib="builtin", calib_size=4, method="minmax",
                     exclude=["backbone.stage2"], calib_cache=tmp_path / "a.onnx.calib.json")
    assert fewer.calibration["cached"] and fewer.calibration["tensors"] < first.calibration["tensors"]
    third = quantize(demo_onnx, dst, calib="builtin", calib_size=4, method="percentile")
    assert not third.calibration["cached"]  # another method: calibrated again, and the cache rewritten
    assert json.loads((tmp_path / "a.onnx.calib.json").read_text())["key"]["method"] == "percentile"


# ------------------------------------------------------------------------------------------------ 2:4
def test_24_survives_quantization(tmp_path):
    from trt_prune.sparsity.inspect import inspect_sparsity
    from trt_prune.sparsity.sparsify import sparsify

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(64, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 32))
    net = sparsify(net, min_channels=16).model
    export_onnx(net.eval(), tmp_path / "s.onnx", (1, 3, 32, 32))
    before = {r.node: r.holds_24 for r in inspect_sparsity(tmp_path / "s.onnx")}
    assert sum(before.values()) == 3
    calib = _random_calib(tmp_path / "c.npy", (3, 32, 32))
    result = quantize(tmp_path / "s.onnx", tmp_path / "s.int8.onnx", calib=str(calib), method="minmax")
    after = {r.node: r.holds_24 for r in inspect_sparsity(result.dst)}
    assert after == before  # every 2:4 weight is still found through its DequantizeLinear, and still 2:4


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("array, message", [
    (np.zeros((0, 3, 320, 320), np.float32), "is empty"),
    (np.zeros((4, 1, 320, 320), np.float32), r"has shape \[4, 1, 320, 320\]; the model's input 'images' takes "
                                             r"N×3×320×320"),
    (np.zeros((4, 3, 224, 224), np.float32), r"takes N×3×320×320"),
])
def test_bad_calibration_sets_are_one_clear_error(demo_onnx, tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(QuantizeError, match=message):
        quantize(demo_onnx, tmp_path / "out.onnx", calib=str(tmp_path / "bad.npy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy"]


def test_other_bad_inputs_write_nothing(demo_onnx, demo_int8, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [({"src": demo_onnx, "calib": str(tmp_path / "empty")}, "holds no images"),
             ({"src": demo_int8.dst, "calib": "builtin"}, "is already quantized .*quantize the fp32 model"),
             ({"src": demo_onnx, "calib": "builtin", "exclude": ["node_conv2d_4"]},
              "names no node or module of the graph: 'node_conv2d_4' \\(did you mean"),
             ({"src": demo_onnx, "calib": "builtin", "method": "kl"}, "unknown calibration method 'kl'"),
             ({"src": demo_onnx, "calib": str(tmp_path / "missing.npy")}, "does not exist")]
    for kwargs, message in cases:
        src = kwargs.pop("src")
        with pytest.raises(QuantizeError, match=message):
            quantize(src, tmp_path / "out.onnx", calib_size=2, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_exclude_takes_node_names_and_module_paths(demo_onnx, tmp_path):
    result = quantize(demo_onnx, tmp_path / "x.onnx", calib="builtin", calib_size=2, method="minmax",
                      exclude=["backbone.stage4", "node_Conv_933"], calib_cache=False)
    kept = [k for k in result.placement["kept"] if k["reason"] == "excluded by the user"]
    modules = {r["node"]: r["module"] for r in inspect_quantization(demo_onnx)["layers"]}
    assert {modules[k["node"]] for k in kept} >= {"backbone.stage1.0.conv", "backbone.stage4.0.conv"}
    assert all(modules[k["node"]].startswith("backbone.stage4") or k["node"] == "node_Conv_933" for k in kept)
    assert not (tmp_path / "x.onnx.calib.json").exists()


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_quantizes_inspects_and_refuses(demo_onnx, tmp_path):
    runner = CliRunner()
    out = tmp_path / "q.onnx"
    res = runner.invoke(cli, ["quantize", str(demo_onnx), "-o", str(out), "--calib", "builtin", "--calib-size", "2",
                              "--method", "minmax", "--fp16-rest", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["qdq_pairs"] == 51 and data["calibration"]["samples"] == 2 and out.exists()
    assert data["fp16_rest"]["stray_fp32"] == [] and data["agreement"]["output"]["sqnr_db"] > 20
    written = onnx.load(out)
    weights = {t.data_type for t in written.graph.initializer if len(t.dims) == 4}  # conv weights
    assert weights == {onnx.TensorProto.INT8, onnx.TensorProto.FLOAT16}  # INT8 where quantized, else fp16
    inits = {t.name: t for t in written.graph.initializer}
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in written.graph.node
               if n.op_type == "QuantizeLinear")
    res = runner.invoke(cli, ["inspect", "quantization", str(out), "--json"])
    assert res.exit_code == 0
    info = json.loads(res.output)
    assert info["quantized"] and info["violations"] == []
    assert sum(r["precision"] == "int8" for r in info["layers"]) == 56
    res = runner.invoke(cli, ["quantize", str(out), "-o", str(tmp_path / "again.onnx"), "--calib", "builtin"])
    assert res.exit_code == 2 and "already quantized" in res.output
    res = runner.invoke(cli, ["quantize", str(demo_onnx), "-o", str(tmp_path / "m.onnx"), "--calib", "builtin",
                              "--mean", "0.5,0.5"])
    assert res.exit_code == 2 and "--mean takes one number or three" in res.output
    assert not (tmp_path / "again.onnx").exists() and not (tmp_path / "m.onnx").exists()
