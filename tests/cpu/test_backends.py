"""Backend interface, ONNX Runtime backend, and the TensorRT backend's pure decisions (no TensorRT needed)."""

import dataclasses
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_cuda import FakeCudart, real_cudart  # tests/cpu/fake_cuda.py (pytest puts this folder on sys.path)
from fake_tensorrt import LAYERS, fake_tensorrt
from torch import nn

from trt_prune.backends import (
    BuildConfig,
    TensorSpec,
    available_backends,
    backend_names,
    backend_status,
    check_feeds,
    get_backend,
    resolve_shape_ranges,
)
from trt_prune.backends.tensorrt import (
    engine_cache_key,
    parse_build_log,
    parse_trt_version,
    plan_build,
    precision_from_format,
    summarize_inspector,
)
from trt_prune.errors import BackendError, BackendUnavailableError, TrtPruneError

REPO = Path(__file__).resolve().parents[2]


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated
        torch.onnx.export(model, torch.randn(1, 3, 32, 32), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return model, path


# ---------------------------------------------------------------- registry and interface


def test_registry_lists_both_backends():
    assert {"onnxruntime", "tensorrt"} <= set(backend_names())
    assert "onnxruntime" in available_backends()


def test_unknown_backend_lists_valid_names():
    with pytest.raises(BackendError) as info:
        get_backend("openvino")
    msg = str(info.value)
    assert "'openvino'" in msg and "onnxruntime" in msg and "tensorrt" in msg
    assert isinstance(info.value, TrtPruneError)


@pytest.mark.parametrize("name", backend_names())
def test_every_backend_says_whether_it_is_available(name):
    ok, reason = get_backend(name).available()
    assert isinstance(ok, bool)
    assert (reason == "") if ok else (len(reason) > 20)
    assert backend_status()[name][0] is ok


def test_importing_the_packages_loads_no_backend_library():
    code = ("import sys, trt_prune.backends, trt_prune.profiling; "
            "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'torch', 'onnx', 'cuda') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_build_without_tensorrt_says_what_is_missing(small_onnx):
    backend = get_backend("tensorrt")
    ok, reason = backend.available()
    assert not ok and "tensorrt" in reason
    with pytest.raises(BackendUnavailableError) as info:
        backend.build(small_onnx[1], BuildConfig())
    msg = str(info.value)
    assert "tensorrt" in msg and "pip install 'trt_prune[tensorrt]'" in msg and "NVIDIA GPU" in msg


@pytest.mark.parametrize("kwargs, needle", [
    ({"precision": "int8"}, "precision"),
    ({"threads": 0}, "threads"),
    ({"batch": (4, 2, 8)}, "min <= opt <= max"),
    ({"batch": (1, 2)}, "three"),
    ({"shapes": {"x": ((1, 3), (1, 3, 4), (1, 3, 4))}}, "ranks"),
    ({"shapes": {"x": ((2, 3), (1, 3), (4, 3))}}, "min <= opt <= max"),
])
def test_build_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(BackendError, match=re.escape(needle)):
        BuildConfig(**kwargs)


def test_check_feeds_names_the_problem():
    specs = [TensorSpec("x", ("batch", 3, 8, 8), "float32")]
    check_feeds(specs, {"x": np.zeros((2, 3, 8, 8), np.float32)})
    with pytest.raises(BackendError, match=r"missing \['x'\], unexpected \['y'\]"):
        check_feeds(specs, {"y": np.zeros((2, 3, 8, 8), np.float32)})
    with pytest.raises(BackendError, match="dtype float64"):
        check_feeds(specs, {"x": np.zeros((2, 3, 8, 8))})
    with pytest.raises(BackendError, match="axis 2 must be 8"):
        check_feeds(specs, {"x": np.zeros((2, 3, 9, 8), np.float32)})
    with pytest.raises(BackendError, match="rank 4"):
        check_feeds(specs, {"x": np.zeros((3, 8, 8), np.float32)})


def test_resolve_shape_ranges():
    specs = [TensorSpec("x", ("batch", 3, 64, 64), "float32"), TensorSpec("scale", (2,), "float32")]
    ranges = resolve_shape_ranges(specs, BuildConfig(batch=(1, 4, 8)))
    assert ranges["x"] == ((1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))
    assert ranges["scale"] == ((2,), (2,), (2,))
    seq = [TensorSpec("tokens", ("batch", "seq"), "int64")]
    with pytest.raises(BackendError, match=r"dynamic axes \[1\]"):
        resolve_shape_ranges(seq, BuildConfig())
    given = BuildConfig(shapes={"tokens": ((1, 16), (2, 64), (4, 128))})
    assert resolve_shape_ranges(seq, given)["tokens"] == ((1, 16), (2, 64), (4, 128))
    with pytest.raises(BackendError, match="fixed axis 1"):
        resolve_shape_ranges(specs[:1], BuildConfig(shapes={"x": ((1, 4, 64, 64),) * 3}))
    with pytest.raises(BackendError, match="not model inputs"):
        resolve_shape_ranges(specs, BuildConfig(shapes={"y": ((1,), (1,), (1,))}))


# ---------------------------------------------------------------- ONNX Runtime backend


def test_onnxruntime_matches_torch(small_onnx):
    model, path = small_onnx
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with get_backend("onnxruntime").build(path, BuildConfig(threads=1)) as session:
        assert [s.name for s in session.inputs] == ["x"]
        assert session.inputs[0].shape[1:] == (3, 32, 32) and session.inputs[0].dtype == "float32"
        out = session.run({"x": x})
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert list(out) == ["y"]
    np.testing.assert_allclose(out["y"], expected, rtol=1e-4, atol=1e-4)


def test_onnxruntime_time_counts_iterations_and_duration(small_onnx):
    x = {"x": np.zeros((1, 3, 32, 32), np.float32)}
    with get_backend("onnxruntime").build(small_onnx[1], BuildConfig(threads=1)) as session:
        samples = session.time(x, warmup_s=0.0, iterations=7)
        assert len(samples) == 7 and all(s > 0 for s in samples)
        t0 = time.perf_counter()
        longer = session.time(x, warmup_s=0.0, iterations=1, min_duration_s=0.05)
        assert time.perf_counter() - t0 >= 0.05  # kept measuring for min_duration_s, past the 1 iteration
        assert len(longer) >= 1 and all(s > 0 for s in longer)
        with pytest.raises(BackendError, match="iterations"):
            session.time(x, iterations=0)
    with pytest.raises(BackendError, match="closed"):
        session.run(x)


def test_onnxruntime_options(small_onnx, tmp_path):
    out = tmp_path / "optimized.onnx"
    config = BuildConfig(threads=1, optimization_level=2, extra={"optimized_model_path": str(out)})
    with get_backend("onnxruntime").build(small_onnx[1], config) as session:
        env = session.env()
        assert env["threads"] == 1 and env["graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
    assert out.is_file() and out.stat().st_size > 0
    # what ONNX Runtime cannot do is refused by its declaration, naming who can (not silently ignored)
    for refused, option in ((BuildConfig(precision="fp16"), "fp16"), (BuildConfig(sparse_weights=True),
                                                                        "sparse_weights")):
        with pytest.raises(BackendError, match=rf"does not take option\(s\) \['{option}'\].*{option}: tensorrt"):
            get_backend("onnxruntime").build(small_onnx[1], refused)
    with pytest.raises(BackendError, match="optimization_level 7"):
        get_backend("onnxruntime").build(small_onnx[1], BuildConfig(optimization_level=7))
    with pytest.raises(BackendError, match=r"does not take option\(s\) \['fast'\]"):
        get_backend("onnxruntime").build(small_onnx[1], BuildConfig(extra={"fast": True}))
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        get_backend("onnxruntime").build(small_onnx[1], BuildConfig(extra={"providers": ["CUDAExecutionProvider"]}))
    with pytest.raises(BackendError, match="does not exist"):
        get_backend("onnxruntime").build(tmp_path / "missing.onnx")


# ---------------------------------------------------------------- TensorRT: build plan


def test_parse_trt_version():
    assert parse_trt_version("10.9.0.34") == (10, 9, 0)
    assert parse_trt_version("11.0") == (11, 0, 0)
    with pytest.raises(BackendError):
        parse_trt_version("latest")


def test_plan_build_fp16_differs_between_10_and_11():
    config = BuildConfig(precision="fp16")
    p10 = plan_build("10.9.0", config)
    p11 = plan_build("11.0.0", config)
    assert p10.builder_flags == ("FP16",) and p10.network_flags == () and not p10.strongly_typed
    assert p10.warnings == ()  # weak typing is only deprecated from 10.12 on
    assert p11.builder_flags == () and p11.network_flags == () and p11.strongly_typed
    assert any("no FP16 flag" in w for w in p11.warnings)
    assert p10.profiling_verbosity == p11.profiling_verbosity == "DETAILED"
    assert any("deprecated since 10.12" in w for w in plan_build("10.12.0", config).warnings)


def test_plan_build_takes_a_qdq_model_strongly_typed():
    for version in ("10.9.0", "11.0.0"):  # INT8 from trt-prune quantize: the ONNX's Q/DQ decide, no precision flag
        plan = plan_build(version, BuildConfig(), qdq=True)
        assert plan.strongly_typed and plan.builder_flags == ()
    assert plan_build("10.9.0", BuildConfig(), qdq=True).network_flags == ("STRONGLY_TYPED",)
    weak = plan_build("10.9.0", BuildConfig(precision="fp16", extra={"strongly_typed": False}), qdq=True)
    assert weak.builder_flags == ("INT8", "FP16") and not weak.strongly_typed  # weak typing: both flags
    assert plan_build("11.0.0", BuildConfig(extra={"strongly_typed": False}), qdq=True).strongly_typed


def test_plan_build_strongly_typed_on_10_when_asked():
    config = BuildConfig(precision="fp16", extra={"strongly_typed": True})
    p10 = plan_build("10.9.0", config)
    assert p10.network_flags == ("STRONGLY_TYPED",) and "FP16" not in p10.builder_flags and p10.strongly_typed
    assert any("ONNX's tensor types decide" in w for w in p10.warnings)
    p11 = plan_build("11.0.0", config)
    assert p11.network_flags == ()  # deprecated and ignored on 11: not set
    fp32 = plan_build("10.9.0", BuildConfig())
    assert fp32.builder_flags == () and fp32.network_flags == () and fp32.warnings == ()


def test_plan_build_sparse_tf32_level_workspace():
    config = BuildConfig(sparse_weights=True, optimization_level=5, extra={"tf32": False, "workspace_mib": 512})
    for version in ("10.9.0", "11.0.0"):
        plan = plan_build(version, config)
        assert plan.builder_flags == ("SPARSE_WEIGHTS",)
        assert plan.cleared_flags == ("TF32",)
        assert plan.optimization_level == 5 and plan.workspace_bytes == 512 << 20
    json.dumps(plan.to_dict())


@pytest.mark.parametrize("version, config, needle", [
    ("8.6.1", BuildConfig(), "not supported"),
    ("10.9.0", BuildConfig(optimization_level=6), "0-5"),
    ("10.9.0", BuildConfig(extra={"int8": True}), "unknown tensorrt option"),
    ("10.9.0", BuildConfig(extra={"workspace_mib": 0}), "workspace_mib"),
])
def test_plan_build_rejects(version, config, needle):
    with pytest.raises(BackendError, match=needle):
        plan_build(version, config)


# ---------------------------------------------------------------- TensorRT: engine cache key

SHA = hashlib.sha256(b"model").hexdigest()
BASE = dict(onnx_sha256=SHA, trt_version="10.9.0", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
            config=BuildConfig())


def _key(**changes):
    args = dict(BASE)
    args.update(changes)
    return engine_cache_key(**args)


@pytest.mark.parametrize("changes", [
    {"onnx_sha256": hashlib.sha256(b"other").hexdigest()},
    {"trt_version": "10.9.1"},
    {"trt_version": "11.0.0"},
    {"gpu_name": "NVIDIA H200"},
    {"compute_capability": "8.9"},
    {"config": BuildConfig(optimization_level=5)},
    {"config": BuildConfig(batch=(1, 4, 8))},
    {"config": BuildConfig(shapes={"x": ((1, 3, 64, 64),) * 3})},
    {"config": BuildConfig(precision="fp16")},
    {"config": BuildConfig(sparse_weights=True)},
    {"config": BuildConfig(extra={"strongly_typed": True})},
    {"config": BuildConfig(extra={"tf32": False})},
], ids=lambda c: next(iter(c.keys())) + ":" + str(next(iter(c.values())))[:40])
def test_engine_cache_key_changes_with_every_field(changes):
    assert _key(**changes) != _key()


def test_engine_cache_key_is_stable_and_file_safe():
    key = _key()
    assert key == _key()
    assert re.fullmatch(r"[A-Za-z0-9._-]+", key)
    assert key.startswith("NVIDIA-H100-80GB-HBM3_sm90_trt10.9.0_")
    assert _key(compute_capability=(9, 0)) == key
    # host threads and the cache location do not change the engine
    assert _key(config=BuildConfig(threads=3, cache_dir="/tmp/elsewhere")) == key
    with pytest.raises(BackendError, match="64 hex"):
        _key(onnx_sha256="abc")
    with pytest.raises(BackendError, match="compute capability"):
        _key(compute_capability="nine")


# ---------------------------------------------------------------- TensorRT: build log and inspector

# Lines in the form NVIDIA/TensorRT issues #4056 and #2169 quote (trtexec --verbose, TensorRT 8.x-10.x).
BUILD_LOG = """\
[08/05/2024-12:06:53] [V] [TRT] --------------- Timing Runner: Conv_276 + Add_277 + Relu_278 (CaskConvolution)
[08/05/2024-12:06:54] [I] [TRT] (Sparsity) Layers eligible for sparse math: MatMul_401, Conv_619 + Relu_620, \
Conv_626, PWN(Conv_630, Relu_631), Conv_619 + Relu_620
[08/05/2024-12:06:54] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: \
Conv_619 + Relu_620, PWN(Conv_630, Relu_631)
[08/05/2024-12:06:55] [V] [TRT] Layer(CaskConvolution): Conv_626, Tactic: 0x3c2f, sm80_xmma_fprop_sparse_conv_\
f16f16_f32_nhwc, input[Half(1,512,28,28)] -> 12[Half(1,512,28,28)]
[08/05/2024-12:06:55] [V] [TRT] Layer(CaskConvolution): Conv_700 + Relu_701, Tactic: 0x11aa, \
x[Half(1,64,56,56)] -> y[Half(1,64,56,56)]
"""


def test_parse_build_log():
    report = parse_build_log(BUILD_LOG.splitlines())
    assert report["eligible_sparse"] == ["MatMul_401", "Conv_619 + Relu_620", "Conv_626",
                                         "PWN(Conv_630, Relu_631)"]
    assert report["ran_sparse"] == ["Conv_619 + Relu_620", "PWN(Conv_630, Relu_631)", "Conv_626"]
    assert parse_build_log([BUILD_LOG]) == report  # one multi-line message reads the same


def test_parse_build_log_with_nothing_sparse():
    lines = ["[09/16/2022-09:55:37] [I] [TRT] (Sparsity) Layers eligible for sparse math:",
             "[09/16/2022-09:55:37] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for "
             "layers:", "[I] [TRT] Total Activation Memory: 7864832"]
    assert parse_build_log(lines) == {"eligible_sparse": [], "ran_sparse": []}


# Shaped like the engine inspector JSON quoted in NVIDIA/TensorRT issues #4020 and #2418.
INSPECTOR = {
    "Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 0 to /conv1/Conv + /act1/Relu", "LayerType": "Reformat",
         "Inputs": [{"Name": "x", "Location": "Device", "Dimensions": [1, 3, 32, 32],
                     "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "Reformatted Input Tensor 0", "Location": "Device", "Dimensions": [1, 3, 32, 32],
                      "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "ParameterType": "Reformat", "Origin": "REFORMAT", "TacticValue": "0x0000000000000000",
         "StreamId": 0, "Metadata": ""},
        {"Name": "/conv1/Conv + /act1/Relu", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "Reformatted Input Tensor 0", "Format/Datatype": "Channel major FP16 format where "
                                                                              "channel % 8 == 0"}],
         "Outputs": [{"Name": "/act1/Relu_output_0", "Location": "Device", "Dimensions": [1, 8, 32, 32],
                      "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
         "ParameterType": "Convolution", "Kernel": [3, 3], "HasSparseWeights": 1, "HasBias": 1,
         "Activation": "RELU",
         "TacticName": "sm80_xmma_fprop_sparse_conv_interleaved_f16f16_f32_f16_nhwckrsc_nhwc_tilesize128x128x64",
         "TacticValue": "0xd3f592fae61c7986", "StreamId": 0,
         "Metadata": "[ONNX Layer: /conv1/Conv]\u001e[ONNX Layer: /act1/Relu]"},
        {"Name": "/conv3/Conv", "LayerType": "CaskConvolution",
         "Outputs": [{"Name": "y", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "HasSparseWeights": 0, "TacticName": "sm80_xmma_fprop_implicit_gemm_i8i8", "Metadata":
             "[ONNX Layer: /conv3/Conv]"},
    ],
    "Bindings": ["x", "y"],
}


def test_summarize_inspector():
    rows = summarize_inspector(INSPECTOR)
    assert [r["name"] for r in rows] == ["Reformatting CopyNode for Input Tensor 0 to /conv1/Conv + /act1/Relu",
                                         "/conv1/Conv + /act1/Relu", "/conv3/Conv"]
    assert [r["precision"] for r in rows] == ["fp16", "fp16", "int8"]
    assert [r["sparse"] for r in rows] == [False, True, False]
    assert rows[1]["tactic"].startswith("sm80_xmma_fprop_sparse_conv") and rows[0]["tactic"] is None
    assert rows[1]["onnx_nodes"] == ["/conv1/Conv", "/act1/Relu"] and rows[0]["onnx_nodes"] == []
    assert rows[1]["layer_type"] == "CaskConvolution"
    assert summarize_inspector(json.dumps(INSPECTOR)) == rows


def test_summarize_inspector_names_only_and_errors():
    rows = summarize_inspector({"Layers": ["a", "b"], "Bindings": []})
    assert [r["name"] for r in rows] == ["a", "b"] and rows[0]["precision"] is None and rows[0]["sparse"] is None
    with pytest.raises(BackendError, match="Layers"):
        summarize_inspector({"layers": []})
    with pytest.raises(BackendError, match="not JSON"):
        summarize_inspector("{oops")


@pytest.mark.parametrize("fmt, expected", [
    ("Row major linear FP32", "fp32"), ("Channel major FP16 format where channel % 8 == 0", "fp16"),
    ("Row major linear BFloat16", "bf16"), ("Thirty-two wide channel vectorized row major Int8 format", "int8"),
    ("Row major linear Int32", "int32"), ("Row major linear FP8", "fp8"), ("", None), ("mystery", None),
])
def test_precision_from_format(fmt, expected):
    assert precision_from_format(fmt) == expected


def test_build_config_round_trips_to_json():
    config = BuildConfig(batch=(1, 2, 4), shapes={"x": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["batch"] == [1, 2, 4] and data["shapes"]["x"][2] == [4, 3, 8, 8]
    assert dataclasses.replace(config, precision="fp16").precision == "fp16"


# ---------------------------------------------------------------- TensorRT session on an emulated TensorRT
#
# The thin layer over tensorrt and cuda.bindings runs here against stand-ins with the same call shapes
# (tests/cpu/fake_tensorrt.py): an "engine" that computes y[:, c] = 2 * x[:, c % 3] and reports two layers to the
# profiler. The CUDA side is emulated with host memory, or is the real cuda.bindings runtime where a GPU is visible.


@pytest.fixture(params=["emulated", "cuda"])
def emulated_trt(request, monkeypatch):
    if request.param == "cuda":
        cudart = real_cudart()
        if cudart is None:
            pytest.skip("no CUDA GPU visible to cuda.bindings: the real-CUDA variant runs on GPU machines")
    else:
        cudart = FakeCudart()
    trt = fake_tensorrt(cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if request.param == "emulated":
        cuda_pkg, bindings = type(sys)("cuda"), type(sys)("cuda.bindings")
        bindings.runtime, cuda_pkg.bindings = cudart, bindings
        monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return trt, cudart


def test_tensorrt_session_on_emulated_tensorrt(emulated_trt, small_onnx, tmp_path):
    trt, cudart = emulated_trt
    backend = get_backend("tensorrt")
    assert backend.available() == (True, "")
    config = BuildConfig(batch=(1, 2, 4), precision="fp16", sparse_weights=True, cache_dir=str(tmp_path),
                         extra={"tf32": False})
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with backend.build(small_onnx[1], config) as session:
        assert trt.calls[0] == "init_plugins"
        assert ("network_flags", 0) in trt.calls
        build = next(c for c in trt.calls if c[0] == "build")
        assert build[1] == ["FP16", "SPARSE_WEIGHTS"] and build[2] == ["TF32"]
        assert build[3] == {"x": ((1, 3, 32, 32), (2, 3, 32, 32), (4, 3, 32, 32))}
        assert session.sparsity == {"eligible_sparse": ["/conv2/Conv + /act2/Relu"], "ran_sparse": []}
        assert [s.name for s in session.inputs] == ["x"] and session.outputs[0].shape == (-1, 4, 32, 32)
        y = session.run({"x": x})["y"]
        np.testing.assert_array_equal(y, 2 * x[:, [0, 1, 2, 0]])
        assert len(session.time({"x": x}, warmup_s=0.0, iterations=5)) == 5
        rows = session.profile_layers({"x": x}, runs=4)
        assert [(r.name, r.module, r.members, r.ms, r.op) for r in rows] == [
            (name, members[0].split("/")[1], members, ms, "CaskConvolution") for name, members, ms in LAYERS]
        assert session.profile_run_ms > 0
        assert session.env()["gpu"] and session.env()["builder_flags"] == ["FP16", "SPARSE_WEIGHTS"]
        with pytest.raises(BackendError, match="outside the engine's profile"):
            session.run({"x": np.zeros((8, 3, 32, 32), np.float32)})
        key = session.cache_key
    for suffix in (".engine", ".log", ".sparsity.json", ".inspector.json"):
        assert (tmp_path / f"{key}{suffix}").is_file()
    assert "lots of tactic timing" not in (tmp_path / f"{key}.log").read_text()  # verbose lines are not kept
    timing = list(tmp_path.glob("timing_*.cache"))
    assert len(timing) == 1 and timing[0].read_bytes() == b"fresh+"
    if isinstance(cudart, FakeCudart):
        assert not cudart.buffers  # every device buffer freed on close
    with backend.build(small_onnx[1], config) as again:
        assert any("loaded from cache" in n for n in again.notes)
        assert again.sparsity == {"eligible_sparse": ["/conv2/Conv + /act2/Relu"], "ran_sparse": []}
        np.testing.assert_array_equal(again.run({"x": x})["y"], y)
    assert sum(1 for c in trt.calls if c[0] == "build") == 1  # the second build came from the cache
    strong = BuildConfig(precision="fp16", extra={"strongly_typed": True})
    with backend.build(small_onnx[1], strong) as s:
        assert ("network_flags", 1) in trt.calls and any("ONNX's tensor types" in n for n in s.notes)


def test_profile_cli_on_emulated_tensorrt(emulated_trt, small_onnx, tmp_path):
    """`trt-prune profile --backend tensorrt`: build options reach the engine, the engine cache is reused, and
    the JSON, terminal and HTML summaries carry trtexec's per-phase breakdown."""
    from click.testing import CliRunner

    from trt_prune.cli import cli

    trt, cudart = emulated_trt
    emulated = isinstance(cudart, FakeCudart)  # the stand-in engine synchronises, so no capture on a real GPU
    cache = tmp_path / "engines"
    args = ["profile", str(small_onnx[1]), "--backend", "tensorrt", "--batch", "2", "--fp16", "--sparse",
            "--cache-dir", str(cache), "--iterations", "6", "--duration", "0", "--warmup", "0", "--layer-runs", "3",
            *(["--cuda-graph"] if emulated else [])]
    res = CliRunner().invoke(cli, [*args, "--json", "--html", str(tmp_path / "r.html")], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    build = next(c for c in trt.calls if c[0] == "build")
    assert build[1] == ["FP16", "SPARSE_WEIGHTS"] and build[3] == {"x": ((2, 3, 32, 32),) * 3}
    assert data["env"]["cuda_graph"] is emulated and data["env"]["host_memory"] == "pinned"
    assert data["input_shapes"] == {"x": [2, 3, 32, 32]} and data["latency_ms"]["n"] == 6
    phases = data["breakdown"]
    assert phases["iterations"] == 6 and phases["cuda_graph"] is emulated
    for phase in ("latency", "enqueue", "h2d", "gpu_compute", "d2h"):
        assert 0 <= phases[phase]["min"] <= phases[phase]["median"] <= phases[phase]["max"]
    assert [(r["name"], r["ms"]) for r in data["per_layer"]] == [(n, ms) for n, _, ms in sorted(
        LAYERS, key=lambda layer: -layer[2])]
    page = (tmp_path / "r.html").read_text()
    assert "Throughput (trtexec)" in page and "GPU compute" in page and "Enqueue time" in page
    assert len(list(cache.glob("*.engine"))) == 1
    again = CliRunner().invoke(cli, args, catch_exceptions=False)  # the terminal summary, from the cache
    assert again.exit_code == 0, again.stderr
    assert sum(1 for c in trt.calls if c[0] == "build") == 1
    assert "Throughput (trtexec):" in again.stderr and "H2D: min " in again.stderr  # the summary goes to stderr
    assert "GPU compute: min " in again.stderr and "D2H: min " in again.stderr
