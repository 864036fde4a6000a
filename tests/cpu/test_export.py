"""ONNX export (both exporters, fallback, parity, atomic writes) and the shared helpers in trt_prune.onnx_io."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from trt_prune.errors import ExportError, OutputError, TrtPruneError
from trt_prune.exporter import DEFAULT_OPSET, export_onnx
from trt_prune.models.demo_detector import DemoDetector
from trt_prune.onnx_io import compare_outputs, external_locations, load_onnx, node_module, onnx_sha256, save_onnx


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return DemoDetector()


@pytest.fixture(scope="module")
def exported(detector, tmp_path_factory):
    """DemoDetector exported once by each exporter (dynamo is the slow one, about 4-8 s here)."""
    folder = tmp_path_factory.mktemp("export")
    return {name: export_onnx(detector, folder / f"{name}.onnx", exporter=name) for name in ("dynamo", "torchscript")}


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class Branchy(Small):
    """Data-dependent control flow: torch.export cannot trace it, TorchScript's tracer takes the branch."""

    def forward(self, x):
        y = self.conv(x)
        if y.abs().sum() >= 0:  # always true, but only known at run time
            y = y * 2
        return self.fc(y.mean((2, 3)))


def test_an_opset_dynamo_cannot_write_falls_back_to_torchscript(detector, tmp_path):
    # torch's dynamo exporter keeps opset 18 when ONNX's down-converter fails (the detector's Split), silently
    result = export_onnx(detector, tmp_path / "op13.onnx", exporter="dynamo", opset=13)
    assert result.exporter == "torchscript" and result.opset == 13
    assert "wrote opset 18 for the requested 13" in result.fallback_reason
    assert [o.version for o in onnx.load(result.path).opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert result.parity["output"]["max_abs"] < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["op13.onnx"]


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["dynamo", "torchscript"])
def test_detector_export_matches_torch(exported, name):
    result = exported[name]
    assert result.exporter == name and result.fallback_reason is None
    assert result.opset == DEFAULT_OPSET == 18
    assert result.input_names == ["images"] and result.output_names == ["output"]
    parity = result.parity["output"]
    assert parity["max_abs"] < 1e-4 and parity["max_rel"] < 1e-3
    model = onnx.load(result.path)
    # whole model in one file: weights are initializers, no external data, batch axis symbolic
    assert external_locations(model) == []
    assert not os.path.exists(result.path + ".data")
    assert sum(np.prod(t.dims) for t in model.graph.initializer) > 2_500_000
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param
    if name == "dynamo":  # TorchScript leaves the axes after its Reshape symbolic
        assert [d.dim_value for d in out_dims[1:]] == [8, 2100]
    assert json.loads(json.dumps(result.to_dict()))["input_shape"] == [1, 3, 320, 320]


@pytest.mark.parametrize("name", ["dynamo", "torchscript"])
def test_node_module_maps_every_conv_to_its_conv2d(exported, detector, name):
    modules = dict(detector.named_modules())
    model = onnx.load(exported[name].path)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    mapped = [node_module(n) for n in convs]
    assert len(convs) == 63
    assert all(isinstance(modules.get(m), torch.nn.Conv2d) for m in mapped), mapped
    # one node per Conv2d module, and the same answer with the module table given
    assert sorted(mapped) == sorted(k for k, v in modules.items() if isinstance(v, torch.nn.Conv2d))
    assert [node_module(n, modules) for n in convs] == mapped
    # every other node with a scope maps to a real module too ("" is the root)
    others = [node_module(n) for n in model.graph.node]
    assert all(m in modules for m in others if m is not None)


def test_node_module_reads_repeat_calls_and_metadata():
    def node(name, props=None):
        n = onnx.helper.make_node("Relu", ["a"], ["b"], name=name)
        for key, value in (props or {}).items():
            n.metadata_props.add(key=key, value=value)
        return n

    assert node_module(node("/backbone/stage1/stage1.0/conv/Conv")) == "backbone.stage1.0.conv"
    assert node_module(node("/backbone/stage1/stage1.1/m.0/cv1/act/Mul")) == "backbone.stage1.1.m.0.cv1.act"
    assert node_module(node("/neck/up_1/Resize")) == "neck.up"  # second call of neck.up
    assert node_module(node("/neck/up_1/Resize"), {"neck", "neck.up_1"}) == "neck.up_1"  # a module named up_1
    assert node_module(node("/Concat_3")) == ""
    assert node_module(node("Identity_62")) is None
    scopes = node("node_Conv_1", {"pkg.torch.onnx.name_scopes": "['', 'head', 'head.0', 'head.0.box.2', 'conv2d']"})
    assert node_module(scopes) == "head.0.box.2"
    namespace = node("n", {"namespace": ": M/neck: N/neck.up: torch.nn.Upsample/upsample_nearest2d: aten.up"})
    assert node_module(namespace) == "neck.up"
    fused = onnx.helper.make_node("Conv", ["x", "a.b.conv.weight"], ["y"], name="node_Conv_9")
    fused.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'a', 'a.b', 'a.b.bn', 'bn_op']")
    assert node_module(fused) == "a.b.conv"  # a Conv fused with its BatchNorm is still the Conv


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_dynamo_failure_falls_back_to_torchscript(tmp_path):
    result = export_onnx(Branchy(), tmp_path / "branchy.onnx", (1, 3, 16, 16))
    assert result.exporter == "torchscript"
    # where dynamo stopped (module, file, line, code) and the innermost error, not the generic wrapper
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1) if "only known at run" in text)
    assert result.fallback_reason.startswith(f"in the top-level module (Branchy) at test_export.py:{line} `if y.abs()")
    assert "GuardOnDataDependentSymNode" in result.fallback_reason
    assert "\x1b" not in result.fallback_reason
    # the tracer froze the branch: the report says so, with the line
    assert any(w.startswith(f"test_export.py:{line}: ") and "boolean" in w for w in result.trace_warnings)
    assert result.parity["output"]["max_abs"] < 1e-5
    assert os.listdir(tmp_path) == ["branchy.onnx"]


class BatchOne(torch.nn.Module):
    """Flattens with a constant batch of 1: torch.export fixes the batch axis without an error."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(1, -1))


def test_batch_the_exporter_fixes_is_not_written_as_dynamic(tmp_path):
    """Asked for a dynamic batch, dynamo writes batch 1 silently; the export must not pass that off: the
    TorchScript file is tried and fails its batch-2 check, naming the axis dynamo fixed, and nothing is written."""
    with pytest.raises(ExportError, match=r"at input 2x3x8x8 .*dynamo exporter fixed axis 0 \(batch\) of input "
                                          r"'images' to 1"):
        export_onnx(BatchOne().eval(), tmp_path / "one.onnx", (1, 3, 8, 8))
    assert os.listdir(tmp_path) == []
    result = export_onnx(BatchOne().eval(), tmp_path / "one.onnx", (1, 3, 8, 8), dynamic_batch=False)
    assert result.exporter == "dynamo" and result.fallback_reason is None
    dims = onnx.load(str(tmp_path / "one.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 8, 8]


def test_fallback_reason_recorded_when_dynamo_call_raises(tmp_path, monkeypatch):
    real = torch.onnx.export

    def fake(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo unavailable\nsecond line")
        return real(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", fake)
    result = export_onnx(Small(), tmp_path / "small.onnx", (2, 3, 8, 8))
    assert result.exporter == "torchscript"
    assert result.fallback_reason == "RuntimeError: dynamo unavailable second line"
    assert set(result.parity) == {"output"} and result.input_shape == (2, 3, 8, 8)


def test_parity_failure_raises_and_writes_nothing(tmp_path, monkeypatch):
    import trt_prune.exporter as export_module

    real = export_module.run_onnxruntime
    monkeypatch.setattr(export_module, "run_onnxruntime",
                        lambda model, feeds: {k: v + 0.01 for k, v in real(model, feeds).items()})
    with pytest.raises(ExportError, match=r"output: 12 element\(s\) off, max_abs 0\.01"):
        export_onnx(Small(), tmp_path / "small.onnx", (1, 3, 8, 8), exporter="torchscript")
    assert os.listdir(tmp_path) == []
    result = export_onnx(Small(), tmp_path / "small.onnx", (1, 3, 8, 8), exporter="torchscript",
                         check_parity=False)
    assert result.parity == {} and os.path.exists(tmp_path / "small.onnx")


def test_static_batch_and_mode_restored(tmp_path):
    model = Small().train()
    model.conv.eval()  # a frozen submodule stays frozen
    result = export_onnx(model, tmp_path / "s.onnx", (3, 3, 8, 8), exporter="torchscript", dynamic_batch=False,
                         input_names=("x",), output_names=("logits",))
    assert model.training and model.fc.training and not model.conv.training
    graph = onnx.load(result.path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert result.input_names == ["x"] and set(result.parity) == {"logits"}


def test_unwritable_output_raises_output_error(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OutputError, match="not_a_folder"):
        export_onnx(Small(), blocker / "m.onnx", (1, 3, 8, 8), exporter="torchscript")
    with pytest.raises(OutputError, match="is a folder"):
        export_onnx(Small(), tmp_path, (1, 3, 8, 8), exporter="torchscript")
    assert sorted(os.listdir(tmp_path)) == ["not_a_folder"]
    assert blocker.read_text() == "a file where a folder should be"


@pytest.mark.parametrize("kwargs, message", [
    ({"exporter": "tensorrt"}, "choose one of dynamo, torchscript"),
    ({"input_shape": (1, 3, -8, 8)}, "positive ints"),
    ({"input_shape": [(1, 3, 8, 8), (1, 3, 8, 8)]}, "2 input shape"),
    ({"opset": 7}, "opset 7"),
    ({"atol": -1}, "atol"),
])
def test_bad_arguments_raise_export_error(tmp_path, kwargs, message):
    shape = kwargs.pop("input_shape", (1, 3, 8, 8))
    with pytest.raises(ExportError, match=message):
        export_onnx(Small(), tmp_path / "m.onnx", shape, **kwargs)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- onnx_io
def _tiny_model(value: float = 1.0) -> onnx.ModelProto:
    # 32x32 floats: 4 KiB, above the 1 KiB under which onnx keeps a tensor inline even in external mode
    weight = onnx.numpy_helper.from_array(np.full((32, 32), value, np.float32), "w")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32])], [weight])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


def test_save_is_atomic_and_cleans_up_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    save_onnx(_tiny_model(1.0), path)
    before = onnx_sha256(path)

    def broken(model, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", broken)
    with pytest.raises(OutputError, match="No space left"):
        save_onnx(_tiny_model(2.0), path)
    assert onnx_sha256(path) == before  # the old file is intact
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_external_data_round_trip_and_escape_refused(tmp_path):
    path = tmp_path / "ext.onnx"
    model = _tiny_model(3.0)
    save_onnx(model, path, external_data=True)
    assert external_locations(model) == [] and model.graph.initializer[0].raw_data  # caller's proto intact
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]
    loaded = load_onnx(path)
    assert onnx.numpy_helper.to_array(loaded.graph.initializer[0])[0, 0] == 3.0
    first = onnx_sha256(path)
    (tmp_path / "ext.onnx.data").write_bytes(np.full(32 * 32, 5.0, np.float32).tobytes())
    assert onnx_sha256(path) != first  # the hash covers the weights too

    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../outside.data"
    evil = tmp_path / "evil.onnx"
    onnx.save_model(model, evil)
    with pytest.raises(TrtPruneError, match="outside its folder"):
        load_onnx(evil)


def test_compare_outputs_definition():
    reference = np.array([100.0, 1.0, 0.0], np.float32)
    error = compare_outputs(reference + np.array([0.0, 0.001, 0.001], np.float32), reference, atol=1e-4, rtol=1e-3)
    # the element at 0 is measured against eps = 1e-3 * 100 = 0.1, not against 0
    assert error["max_abs"] == pytest.approx(0.001, rel=1e-3)
    assert error["max_rel"] == pytest.approx(0.001 / 0.1, rel=1e-3)
    assert error["mismatched"] == 1  # 0.001 > 1e-4 + 1e-3 * 0 at the zero element only
