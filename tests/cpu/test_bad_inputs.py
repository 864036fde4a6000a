"""Bad inputs to export and to every command that reads ONNX: one clear error, exit 2, the input untouched,
nothing written. (Issue "export and clean", must show 4.)"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from trt_prune.cli import cli
from trt_prune.errors import ExportError
from trt_prune.exporter import export_onnx, locate_failure

MODEL_FILE = '''
import torch
from torch import nn


class Svd(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x.flatten(2)).S  # no exporter translates SVD to ONNX


class Counting(nn.Module):
    def forward(self, x):
        positive = sum(1 for v in x.flatten().tolist() if v > 0)  # Python numbers from the data
        return x * positive


class Net(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), inner)

    def forward(self, x):
        return self.block(self.conv(x))


def svd():
    return Net(Svd())


def counting():
    return Net(Counting())
'''


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _error(result, *needles):
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: "), result.stderr
    assert result.stderr.count("error: ") == 1, result.stderr  # one error, not a cascade
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result.stderr


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "untraceable.py"
    path.write_text(MODEL_FILE)
    return path


# ------------------------------------------------------------------------------------- untraceable models
def test_op_no_exporter_translates_is_named_with_its_module(model_file, tmp_path):
    before = _snapshot(tmp_path)
    res = run("export", f"{model_file}:svd", "--input-shape", "1x3x8x8", "-o", tmp_path / "svd.onnx")
    text = _error(res, "dynamo failed", "TorchScript failed", "linalg_svd", "module 'block.1' (Svd)")
    assert "Traceback" not in text
    assert _snapshot(tmp_path) == before  # no file, no staging folder left


def test_data_dependent_python_is_named_with_its_line(model_file, tmp_path):
    # dynamo stops at .tolist(); TorchScript freezes the count into the graph, so parity fails at another input:
    # the error says both, with the module and the line where dynamo stopped
    res = run("export", f"{model_file}:counting", "--input-shape", "1x3x8x8", "-o", tmp_path / "c.onnx")
    line = next(i for i, text in enumerate(MODEL_FILE.splitlines(), 1) if ".tolist()" in text)
    _error(res, "differs from torch", "dynamo failed", f"module 'block.1' (Counting) at untraceable.py:{line}",
           "x.flatten().tolist()")
    assert list(tmp_path.iterdir()) == []


def test_locate_failure_reads_frames_and_op_names():
    class Inner(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Identity(), Inner())
    try:
        model(torch.zeros(1))
    except RuntimeError as exc:
        assert locate_failure(model, exc).startswith("in module '1' (Inner) at test_bad_inputs.py:")
    svd = nn.Sequential(nn.Flatten(1), nn.Sequential(nn.ReLU()))
    svd[1].forward = lambda x: torch.linalg.svd(x.reshape(1, 2, -1)).S  # an op called inside module '1'
    exc = RuntimeError("No ONNX function found for <OpOverload(op='aten._linalg_svd', overload='default')>")
    assert locate_failure(svd, exc) == "at op aten::_linalg_svd"
    assert locate_failure(svd, exc, (torch.randn(1, 8),)) == "at op aten::_linalg_svd in module '1' (Sequential)"
    assert locate_failure(svd, ValueError("nothing to go on")) is None


# ------------------------------------------------------------------------------------ wrong input shapes
@pytest.mark.parametrize("shape, needles", [
    ("1x4x64x64", ["does not run on input shape 1x4x64x64", "module 'backbone.stem.conv' (Conv2d)",
                   "expected input[1, 4, 64, 64] to have 3 channels"]),
    ("1x3x64", ["does not run on input shape 1x3x64", "--input-shape"]),
])
def test_wrong_input_shape(tmp_path, shape, needles):
    res = run("export", "builtin:demo-detector", "--input-shape", shape, "-o", tmp_path / "d.onnx")
    _error(res, *needles)
    assert list(tmp_path.iterdir()) == []


def test_wrong_input_shape_in_the_api(tmp_path):
    with pytest.raises(ExportError, match=r"module '0' \(Linear\)"):
        export_onnx(nn.Sequential(nn.Linear(8, 4)), tmp_path / "l.onnx", (2, 5), input_names=("x",))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- dynamic height and width
def test_dynamic_hw_exports_symbolic_axes_checked_at_another_size(tmp_path):
    res = run("export", "builtin:demo-detector", "--input-shape", "1x3x128x160", "--dynamic-hw",
              "-o", tmp_path / "d.onnx", "--json")
    assert res.exit_code == 0, res.output + res.stderr
    data = json.loads(res.stdout)
    assert data["dynamic_axes"] == ["batch", "height", "width"] and data["exporter"] == "dynamo"
    dims = onnx.load(tmp_path / "d.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    assert data["parity"]["max_abs"] < 1e-3
    # the file runs at a size it was never traced at, and agrees with torch there
    from trt_prune.models import load_model
    from trt_prune.onnx_io import run_onnxruntime

    x = torch.rand(2, 3, 224, 288)
    got = run_onnxruntime(tmp_path / "d.onnx", {"images": x.numpy()})["output"]
    with torch.no_grad():
        expected = load_model("builtin:demo-detector").model(x).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-3
    _error(run("export", "builtin:demo-detector", "--dynamic-hw", "--nms", "-o", tmp_path / "n.onnx"),
           "--dynamic-hw does not combine with --nms")


# --------------------------------------------------------------------------------- broken ONNX inputs
@pytest.fixture(scope="module")
def good_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    export_onnx(model, folder / "m.onnx", (1, 3, 16, 16), exporter="torchscript")
    return (folder / "m.onnx").read_bytes()


def _commands(src, out):
    return {
        "clean": ["clean", src, "-o", out],
        "fp16": ["fp16", src, "-o", out],
        "build": ["build", src, "--backend", "onnxruntime", "-o", out],
        "profile": ["profile", src, "--iterations", "1", "--warmup", "0", "--duration", "0", "-o", out],
        "inspect": ["inspect", "sparsity", src, "--json"],
    }


def _broken(good: bytes, kind: str) -> bytes:
    cuts = {"truncated_10": 0.1, "truncated_50": 0.5, "truncated_90": 0.9}
    if kind in cuts:
        return good[: int(len(good) * cuts[kind])]
    if kind == "truncated_last_byte":
        return good[:-1]
    if kind == "empty":
        return b""
    if kind == "text":
        return b"this is not a model\n"
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()  # noise


@pytest.mark.parametrize("command", ["clean", "fp16", "build", "profile", "inspect"])
@pytest.mark.parametrize("kind", ["truncated_10", "truncated_50", "truncated_90", "truncated_last_byte", "empty",
                                  "text", "noise"])
def test_malformed_onnx_is_one_clear_error(good_onnx, tmp_path, command, kind):
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    src.write_bytes(_broken(good_onnx, kind))
    before = _snapshot(tmp_path)
    text = _error(run(*_commands(src, tmp_path / "out.onnx")[command]), "m.onnx")
    assert any(w in text for w in ("not a readable ONNX model", "is not an ONNX model")), text
    assert _snapshot(tmp_path) == before  # input untouched, no output, nothing half-written


@pytest.mark.parametrize("command", ["clean", "fp16", "build", "profile", "inspect"])
def test_external_data_outside_the_folder_is_refused(good_onnx, tmp_path, command):
    model = onnx.load_from_string(good_onnx)
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(model, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    evil = onnx.load_model(folder / "m.onnx", load_external_data=False)
    for tensor in evil.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    onnx.save_model(evil, folder / "evil.onnx")
    (tmp_path / "secret.data").write_bytes((folder / "m.data").read_bytes())  # readable, and must not be read
    before = _snapshot(tmp_path)
    _error(run(*_commands(folder / "evil.onnx", tmp_path / "out.onnx")[command]), "outside its folder",
           "../secret.data")
    assert _snapshot(tmp_path) == before
