"""The torch backend on the CPU: same Session interface, per-module own times that add up, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trt_prune.backends import BuildConfig, get_backend
from trt_prune.backends.torch_backend import sparse24_plan, sparse24_reason
from trt_prune.errors import BackendError, BackendUnavailableError
from trt_prune.models import load_model
from trt_prune.profiling import aggregate_layers
from trt_prune.sparsity.pattern import mask_2of4
from trt_prune.stages import profile


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 32)

    def forward(self, x):
        y = self.act(self.conv(x))
        y = torch.cat([y, y], 1)[:, :16] + 1.0  # functional ops the parent runs itself
        return self.head(y.mean((2, 3)))


SHAPE = (2, 3, 16, 16)


def _config(**extra):
    return BuildConfig(shapes={"images": (SHAPE, SHAPE, SHAPE)}, extra=extra)


def test_session_runs_the_model_and_leaves_it_alone():
    torch.manual_seed(0)
    model = Block().train()
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    with get_backend("torch").build(model, _config(device="cpu")) as session:
        assert [s.name for s in session.inputs] == ["images"] and session.inputs[0].shape == SHAPE
        assert session.outputs[0].shape == (2, 32)
        out = session.run({"images": x})["output"]
        assert session.env()["device"] == "cpu" and session.env()["precision"] == "fp32"
        samples = session.time({"images": x}, warmup_s=0, iterations=5)
        assert len(samples) == 5 and all(s > 0 for s in samples)
    assert model.training  # the session put its own copy in eval mode, not the caller's model
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(BackendError, match="closed"):
        session.run({"images": x})


def test_module_own_times_add_up_to_the_forward_pass():
    model = Block()
    x = np.zeros(SHAPE, np.float32)
    with get_backend("torch").build(model, _config(device="cpu")) as session:
        rows = session.profile_layers({"images": x}, runs=4)
        run_ms = session.profile_run_ms
    by_path = {r.module: r for r in rows}
    # every module that ran, the root included (its own time: the cat, slice, add and mean it runs itself)
    assert set(by_path) == {"", "conv", "act", "head"}
    assert by_path["conv"].op == "Conv2d" and by_path[""].op == "Block" and by_path[""].name == "(root)"
    assert all(r.ms >= 0 for r in rows) and by_path[""].ms > 0
    # own times partition the root's inclusive time exactly (no hook-time lost or counted twice)
    assert sum(r.ms for r in rows) == pytest.approx(run_ms, rel=1e-9)
    stages = {row["key"] for row in aggregate_layers([r.to_dict() for r in rows], by="stage")}
    assert stages == {"(root)", "conv", "act", "head"}


def test_profile_torch_on_a_spec_gives_the_common_record():
    result = profile("builtin:demo-detector", "torch", batch=2, input_shape=(1, 3, 128, 128), warmup_s=0,
                     iterations=3, min_duration_s=0, layer_runs=2)
    assert result.backend == "torch" and result.onnx == "builtin:demo-detector"
    assert result.input_shapes == {"images": [2, 3, 128, 128]} and result.latency_ms["n"] == 3
    assert result.throughput_images_s == pytest.approx(2 * result.throughput_ips)
    modules = {row["module"] for row in result.per_layer}
    detector = load_model("builtin:demo-detector").model
    convs = {p for p, m in detector.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs <= modules  # every convolution has its own row, under its module path
    assert result.per_layer_sum_ms == pytest.approx(result.per_layer_run_ms, rel=1e-9)
    assert {"backbone", "neck", "head"} <= {row["key"] for row in aggregate_layers(result.per_layer, "stage")}
    assert result.env["backend"] == "torch" and result.env["cpu"]


@pytest.mark.parametrize("config, error, message", [
    (BuildConfig(precision="fp16", extra={"device": "cpu"}), BackendError, "fp16 .* needs a CUDA GPU"),
    (_config(device="cpu", cuda_graph=True), BackendError, "cuda_graph needs device 'cuda'"),
    (_config(device="cpu", sparse24=True), BackendError, "sparse24 .* needs device 'cuda' and precision fp16"),
    (_config(device="tpu"), BackendError, "device must be 'cuda' or 'cpu'"),
    (_config(fancy=True), BackendError, r"backend 'torch' does not take option\(s\) \['fancy'\]"),
])
def test_bad_configs_are_refused(config, error, message):
    with pytest.raises(error, match=message):
        get_backend("torch").build(Block(), config)


def test_cuda_without_a_gpu_and_onnx_sources_are_refused():
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="torch sees no CUDA GPU"):
            get_backend("torch").build(Block(), _config(device="cuda"))
    with pytest.raises(BackendError, match="builds from a PyTorch model .*, not an ONNX file 'model.onnx'"):
        get_backend("torch").build("model.onnx")
    with pytest.raises(BackendError, match="no input shape"):
        get_backend("torch").build(Block(), BuildConfig(extra={"device": "cpu"}))


@pytest.mark.parametrize("kind, shape, kwargs, needle", [
    ("linear", (64, 128), {}, None),
    ("conv", (64, 128, 1, 1), {}, None),
    ("linear", (64, 120), {}, "multiples of 16"),
    ("conv", (64, 128, 3, 3), {"kernel": (3, 3), "padding": (1, 1)}, "only 1x1"),
    ("conv", (64, 32, 1, 1), {"groups": 4}, "grouped"),
    ("linear", (64, 128), {"holds_24": False}, "sparsify first"),
    ("embedding", (64, 128), {}, "no GEMM form"),
])
def test_sparse24_reason(kind, shape, kwargs, needle):
    reason = sparse24_reason(kind, shape, **kwargs)
    assert reason is None if needle is None else needle in reason


def test_sparse24_plan_reads_the_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.Conv2d(48, 32, 1))
    with torch.no_grad():
        weight = model[0].weight
        weight.mul_(torch.from_numpy(mask_2of4(weight.numpy(), axis=1)).to(weight.dtype))
    plan = {row["module"]: row["reason"] for row in sparse24_plan(model)}
    assert plan["0"] is None  # masked to 2:4, 64x32
    assert "sparsify first" in plan["2"]  # dense weights are not silently pruned
    assert "sparsify first" in plan["3"]


def test_cli_profiles_a_model_on_the_torch_backend(tmp_path):
    import json

    from click.testing import CliRunner

    from trt_prune.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["profile", "builtin:demo-detector", "--backend", "torch", "--input-shape",
                              "1x3x128x128", "--iterations", "3", "--warmup", "0", "--duration", "0",
                              "--layer-runs", "2", "--html", str(tmp_path / "r.html"), "--json"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output + res.stderr
    data = json.loads(res.stdout)
    assert data["backend"] == "torch" and data["env"]["device"] == "cpu" and data["latency_ms"]["n"] == 3
    assert any(row["module"] == "backbone.stem.conv" for row in data["per_layer"])
    stages = {row["key"]: row["ms"] for row in data["aggregates"]["stage"]}
    assert {"backbone", "neck", "head"} <= set(stages)
    assert sum(stages.values()) == pytest.approx(data["per_layer_sum_ms"])
    assert data["aggregates"]["op"][0]["key"] == "Conv2d"  # convolutions dominate the detector
    assert (tmp_path / "r.html").read_text().count("backbone.stem.conv") >= 1
    for args, needle in ((["m.onnx", "--backend", "onnxruntime", "--fp16"],
                          "--fp16 does not apply to --backend onnxruntime (--fp16 to --backend tensorrt or torch "
                          "only)"),
                         (["m.onnx", "--backend", "tensorrt", "--channels-last", "--sparse"],
                          "--channels-last does not apply to --backend tensorrt (--channels-last to --backend torch "
                          "only)"),
                         (["builtin:demo-detector", "--backend", "torch", "--cache-dir", "c"],
                          "--cache-dir to --backend tensorrt only"),
                         (["m.onnx", "--backend", "openvino"], "unknown backend 'openvino'"),
                         (["missing.onnx"], "does not exist")):
        res = runner.invoke(cli, ["profile", *args], catch_exceptions=False)
        assert res.exit_code == 2 and needle in res.stderr, res.stderr
