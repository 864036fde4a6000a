"""TensorRT backend without TensorRT: engine-cache checks, the CUDA adapter choice and adapters, trtexec's timing
summary and the CUDA-graph decision as pure functions; then the whole backend on an emulated TensorRT and CUDA
(cache entries written, reused and refused, time_breakdown, CUDA graphs). The CUDA adapters also run against the
real libraries where a GPU is visible; elsewhere those variants skip and say why."""

import ctypes
import hashlib
import json
import logging
import re
import sys
import types
from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import pytest
from fake_cuda import FakeCudart, fake_pycuda_driver, real_cudart  # tests/cpu/ is on sys.path under pytest
from fake_tensorrt import fake_tensorrt
from onnx import TensorProto, helper, numpy_helper

from trt_prune.backends import BuildConfig, get_backend
from trt_prune.backends.tensorrt import (
    CudaPythonApi,
    PyCudaApi,
    build_config_sha256,
    cache_paths,
    check_engine_bytes,
    check_engine_meta,
    choose_cuda_api,
    cuda_graph_decision,
    deserialize_engine,
    engine_cache_key,
    engine_meta,
    onnx_op_types,
    plan_build,
    read_cached_engine,
    runtime_options,
    timing_breakdown,
)
from trt_prune.backends.tensorrt.buildlog import make_logger
from trt_prune.errors import BackendError, BackendUnavailableError, ProfileError
from trt_prune.onnx_io import onnx_sha256

SHA = hashlib.sha256(b"model").hexdigest()
OTHER_SHA = hashlib.sha256(b"another model").hexdigest()
REBUILD = "rebuild it (delete the cache entry or pass a new cache_dir)"


def _meta(**changes):
    meta = engine_meta(SHA, "10.3.0", "NVIDIA A100", "8.0", BuildConfig())
    meta.update(changes)
    return meta


# ---------------------------------------------------------------- engine meta sidecar


def test_engine_meta_records_what_the_engine_was_built_from():
    data = b"serialised engine"
    config = BuildConfig(batch=(1, 2, 4), extra={"tf32": False, "cuda_graph": True})
    meta = engine_meta(SHA, "10.3.0", "NVIDIA A100", (8, 0), config, data)
    assert {k: meta[k] for k in ("format", "tensorrt", "gpu", "compute_capability", "hardware_compatibility",
                                 "onnx_sha256", "engine_bytes")} == {
        "format": 1, "tensorrt": "10.3.0", "gpu": "NVIDIA A100", "compute_capability": "8.0",
        "hardware_compatibility": "NONE", "onnx_sha256": SHA, "engine_bytes": 17}
    assert meta["engine_sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["build"]["batch"] == [1, 2, 4] and meta["build"]["extra"] == {"tf32": False}  # no run-time keys
    assert meta["build_config_sha256"] == build_config_sha256(BuildConfig(batch=(1, 2, 4), extra={"tf32": False}))
    assert json.loads(json.dumps(meta)) == meta
    assert "engine_bytes" not in engine_meta(SHA, "10.3.0", "NVIDIA A100", "8.0", BuildConfig())
    with pytest.raises(BackendError, match="hardware_compatibility 'ANY'"):
        engine_meta(SHA, "10.3.0", "NVIDIA A100", "8.0", BuildConfig(), hardware_compatibility="ANY")


def test_run_time_options_change_neither_cache_key_nor_build_hash():
    plain = BuildConfig()
    graphed = BuildConfig(extra={"cuda_graph": True, "cuda_api": "pycuda", "pinned_host": False})
    assert build_config_sha256(graphed) == build_config_sha256(plain)
    assert (engine_cache_key(SHA, "10.9.0", "GPU", "9.0", graphed)
            == engine_cache_key(SHA, "10.9.0", "GPU", "9.0", plain))
    assert build_config_sha256(BuildConfig(extra={"tf32": False})) != build_config_sha256(plain)
    assert build_config_sha256(BuildConfig(precision="fp16")) != build_config_sha256(plain)


def test_cache_paths():
    paths = cache_paths("/c", "KEY")
    assert {k: str(v) for k, v in paths.items()} == {
        "engine": "/c/KEY.engine", "meta": "/c/KEY.meta.json", "log": "/c/KEY.log",
        "sparsity": "/c/KEY.sparsity.json", "inspector": "/c/KEY.inspector.json"}


def test_check_engine_meta_accepts_the_machine_and_build_it_names():
    check_engine_meta(_meta(), "10.3.0", "NVIDIA A100", (8, 0), onnx_sha256=SHA,
                      build_sha256=build_config_sha256(BuildConfig()))
    check_engine_meta(_meta(), " 10.3.0", "NVIDIA A100 ", " 8.0 ")  # surrounding spaces are not a difference


def test_check_engine_meta_names_both_sides():
    with pytest.raises(BackendError) as info:
        check_engine_meta(_meta(), "10.8.0", "NVIDIA H100", "9.0", engine="cache/x.engine")
    assert str(info.value) == (
        "engine cache/x.engine was built with TensorRT 10.3.0 on NVIDIA A100 (sm_80); this machine has TensorRT "
        f"10.8.0 on NVIDIA H100 (sm_90), so the TensorRT version and the GPU differ: {REBUILD}")


@pytest.mark.parametrize("machine, differs", [
    (("10.3.1", "NVIDIA A100", "8.0"), "the TensorRT version differs"),  # a patch release is another TensorRT
    (("10.3.0", "NVIDIA A30", "8.0"), "the GPU differs"),  # same compute capability, another GPU model
    (("10.3.0", "NVIDIA A100", "8.6"), "the GPU differs"),
])
def test_check_engine_meta_refuses_each_mismatch(machine, differs):
    with pytest.raises(BackendError, match=re.escape(f"{differs}: {REBUILD}")):
        check_engine_meta(_meta(), *machine)


def test_check_engine_meta_hardware_compatibility_modes():
    ampere = _meta(hardware_compatibility="AMPERE_PLUS")
    check_engine_meta(ampere, "10.3.0", "NVIDIA H100", "9.0")  # any GPU from sm_80 on
    with pytest.raises(BackendError, match=r"\(hardware compatibility AMPERE_PLUS\); this machine has TensorRT "
                                           r"10\.3\.0 on Tesla T4 \(sm_75\), so the GPU differs"):
        check_engine_meta(ampere, "10.3.0", "Tesla T4", "7.5")
    with pytest.raises(BackendError, match="the TensorRT version differs"):  # the version rule still holds
        check_engine_meta(ampere, "10.4.0", "NVIDIA H100", "9.0")
    same_cc = _meta(hardware_compatibility="SAME_COMPUTE_CAPABILITY")
    check_engine_meta(same_cc, "10.3.0", "NVIDIA A30", "8.0")
    with pytest.raises(BackendError, match="the GPU differs"):
        check_engine_meta(same_cc, "10.3.0", "NVIDIA H100", "9.0")


def test_check_engine_meta_refuses_another_model_or_build():
    with pytest.raises(BackendError, match=rf"sha256 {SHA[:16]}\.\.\., not from this model \(sha256 "
                                           rf"{OTHER_SHA[:16]}\.\.\.\): rebuild it"):
        check_engine_meta(_meta(), "10.3.0", "NVIDIA A100", "8.0", onnx_sha256=OTHER_SHA)
    fp16 = build_config_sha256(BuildConfig(precision="fp16"))
    with pytest.raises(BackendError, match=r"another build configuration .*'precision': 'fp32'.* than the one "
                                           rf"asked for \(sha256 {fp16[:16]}"):
        check_engine_meta(_meta(), "10.3.0", "NVIDIA A100", "8.0", build_sha256=fp16)


@pytest.mark.parametrize("meta, needle", [
    ([], "must be a JSON object, got list"),
    ({"tensorrt": "10.3.0"}, "lacks ['gpu', 'compute_capability'] (it has ['tensorrt'])"),
    (_meta(compute_capability="nine"), "has compute_capability 'nine', not of the form '9.0'"),
    (_meta(hardware_compatibility="ANY"), "has hardware_compatibility 'ANY', not one of"),
])
def test_check_engine_meta_refuses_a_malformed_sidecar(meta, needle):
    with pytest.raises(BackendError) as info:
        check_engine_meta(meta, "10.3.0", "NVIDIA A100", "8.0", engine="e.engine")
    assert needle in str(info.value) and "the meta sidecar of e.engine" in str(info.value)
    assert str(info.value).endswith(REBUILD)


def test_check_engine_bytes():
    data = b"0123456789ab"
    meta = engine_meta(SHA, "10.3.0", "NVIDIA A100", "8.0", BuildConfig(), data)
    check_engine_bytes(meta, data)
    check_engine_bytes(_meta(), b"anything")  # a sidecar without size and hash: nothing to compare
    with pytest.raises(BackendError, match=r"engine file c/k\.engine is 6 bytes, but its meta sidecar recorded 12: "
                                           r"the file is truncated"):
        check_engine_bytes(meta, data[:6], "c/k.engine")
    with pytest.raises(BackendError, match=r"does not match the sha256 .* corrupt or was replaced; delete it"):
        check_engine_bytes(meta, b"0123456789AB", "c/k.engine")


# ---------------------------------------------------------------- reading a cache entry (files, no TensorRT)

MACHINE = ("10.3.0", "NVIDIA A100", "8.0")


KEY = "GPU_sm90_trt10.3.0_0123abcd"  # keys hold dots


def _entry(folder, data=b'{"engine": 1}', sparsity=None, **meta_changes):
    paths = cache_paths(folder, KEY)
    paths["engine"].write_bytes(data)
    meta = engine_meta(SHA, *MACHINE, BuildConfig(), data)
    meta.update(meta_changes)
    paths["meta"].write_text(json.dumps(meta))
    if sparsity is not None:
        paths["sparsity"].write_text(json.dumps(sparsity))
    return paths


def _read(paths, notes):
    return read_cached_engine(paths, *MACHINE, SHA, build_config_sha256(BuildConfig()), notes)


def test_read_cached_engine_returns_a_sound_entry(tmp_path):
    paths = _entry(tmp_path, sparsity={"eligible_sparse": ["c1"], "ran_sparse": []})
    notes = []
    assert _read(paths, notes) == (b'{"engine": 1}', {"eligible_sparse": ["c1"], "ran_sparse": []})
    assert notes == [f"engine loaded from cache {paths['engine']}"]


def test_read_cached_engine_without_engine_or_sidecar(tmp_path):
    notes = []
    assert _read(cache_paths(tmp_path, KEY), notes) == (None, None) and notes == []
    paths = _entry(tmp_path)
    paths["meta"].unlink()
    assert _read(paths, notes) == (None, None)
    assert notes == [f"cached engine {paths['engine']} has no {KEY}.meta.json (stored by an older trt_prune, or its "
                     f"build was cut off); rebuilding it"]


def test_read_cached_engine_refuses_damaged_or_foreign_entries(tmp_path):
    paths = _entry(tmp_path, gpu="NVIDIA H100")
    with pytest.raises(BackendError, match=re.escape(f"engine {paths['engine']} was built with TensorRT 10.3.0 on "
                                                     f"NVIDIA H100 (sm_80); this machine has TensorRT 10.3.0 on "
                                                     f"NVIDIA A100 (sm_80)")):
        _read(paths, [])
    paths = _entry(tmp_path)
    paths["engine"].write_bytes(b'{"eng')
    with pytest.raises(BackendError, match=re.escape(f"engine file {paths['engine']} is 5 bytes, but its meta "
                                                     f"sidecar recorded 13: the file is truncated")):
        _read(paths, [])
    paths = _entry(tmp_path)
    paths["meta"].write_text('{"tensorrt": ')
    with pytest.raises(BackendError, match=re.escape(f"cannot read the engine meta sidecar {paths['meta']}: "
                                                     f"JSONDecodeError")) as info:
        _read(paths, [])
    assert f"delete it and the other files of its cache entry ({KEY}.*) and build again" in str(info.value)


class _Runtime:
    def __init__(self, result):
        self.result = result

    def deserialize_cuda_engine(self, data):
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_deserialize_engine_names_the_file_and_what_to_do():
    engine = object()
    assert deserialize_engine(_Runtime(engine), b"x", "c/k.engine") is engine
    with pytest.raises(BackendError) as info:
        deserialize_engine(_Runtime(None), b"12345", "c/k.engine", ["a", "Serialization assertion failed"])
    assert str(info.value) == (
        "TensorRT could not deserialise the engine file c/k.engine (5 bytes): it is corrupt, truncated or from "
        "another TensorRT build; delete it and its sidecars and build again (or pass a new cache_dir); log: a | "
        "Serialization assertion failed")
    with pytest.raises(BackendError, match=r"engine file c/k\.engine \(2 bytes\) \(RuntimeError: bad magic\): it is "
                                           r"corrupt"):
        deserialize_engine(_Runtime(RuntimeError("bad magic")), b"xx", "c/k.engine")
    with pytest.raises(BackendError, match=r"could not deserialise the engine it just built; log: \(empty\)"):
        deserialize_engine(_Runtime(None), b"xx", None)


# ---------------------------------------------------------------- choosing and validating run-time options


@pytest.mark.parametrize("have_cuda_python, have_pycuda, prefer, expected", [
    (True, True, None, "cuda-python"),
    (True, False, None, "cuda-python"),
    (False, True, None, "pycuda"),
    (True, True, "pycuda", "pycuda"),
    (True, True, "cuda-python", "cuda-python"),
])
def test_choose_cuda_api(have_cuda_python, have_pycuda, prefer, expected):
    assert choose_cuda_api(have_cuda_python, have_pycuda, prefer) == expected


def test_choose_cuda_api_says_what_to_install():
    with pytest.raises(BackendUnavailableError) as info:
        choose_cuda_api(False, False)
    msg = str(info.value)
    assert "pip install cuda-python" in msg and "pip install pycuda" in msg and "neither" in msg
    with pytest.raises(BackendUnavailableError, match=r"asks for pycuda, but pycuda\.driver cannot be imported here: "
                                                      r"pip install pycuda, or drop extra\['cuda_api'\] to use "
                                                      r"cuda-python, which is installed"):
        choose_cuda_api(True, False, "pycuda")
    with pytest.raises(BackendUnavailableError, match=r"cuda\.bindings\.runtime cannot be imported here: pip install "
                                                      r"cuda-python$"):
        choose_cuda_api(False, False, "cuda-python")
    with pytest.raises(BackendError, match=r"must be one of \['cuda-python', 'pycuda'\] or None, got 'cupy'"):
        choose_cuda_api(True, True, "cupy")


@pytest.mark.parametrize("extra, needle", [
    ({"cuda_graph": "yes"}, "extra['cuda_graph'] must be True or False, got 'yes'"),
    ({"cuda_api": "cupy"}, "extra['cuda_api'] must be one of ['cuda-python', 'pycuda'] or None"),
    ({"pinned_host": 1}, "extra['pinned_host'] must be True or False, got 1"),
    ({"cuda_graphs": True}, "unknown tensorrt option(s) ['cuda_graphs']"),
])
def test_plan_build_checks_run_time_options(extra, needle):
    with pytest.raises(BackendError, match=re.escape(needle)):
        plan_build("10.9.0", BuildConfig(extra=extra))
    plan_build("10.9.0", BuildConfig(extra={"cuda_graph": True, "cuda_api": "pycuda", "pinned_host": False}))
    assert runtime_options(BuildConfig()) == {"cuda_graph": False, "pinned_host": True, "cuda_api": None}


# ---------------------------------------------------------------- trtexec's timing summary

# Four iterations 10 ms apart: H2D 1 ms, GPU compute 2/4/6/8 ms, D2H 0.5 ms; enqueue 0.25 ms.
H2D_START = [0.0, 10.0, 20.0, 30.0]
COMPUTE = [2.0, 4.0, 6.0, 8.0]


def _timeline(compute=COMPUTE, enqueue=0.25):
    h2d = np.array(H2D_START)
    c0 = h2d + 1.0
    c1 = c0 + np.array(compute)
    return dict(enqueue_start=(c0 + 0.1).tolist(), enqueue_end=(c0 + 0.1 + enqueue).tolist(),
                h2d_start=h2d.tolist(), compute_start=c0.tolist(), compute_end=c1.tolist(),
                d2h_end=(c1 + 0.5).tolist())


def test_timing_breakdown_known_answers():
    out = timing_breakdown(**_timeline(), host_wall_ms=50.0)
    assert out["iterations"] == 4 and out["throughput_basis"] == "host wall time"
    assert out["throughput_qps"] == pytest.approx(80.0)  # 4 inferences in 50 ms
    gpu = out["gpu_compute"]
    assert (gpu["min"], gpu["max"], gpu["mean"], gpu["median"]) == (2.0, 8.0, 5.0, 5.0)
    # numpy's linear percentile of [2, 4, 6, 8]: position 3p/100
    assert (gpu["p90"], gpu["p95"], gpu["p99"]) == pytest.approx((7.4, 7.7, 7.94))
    assert out["latency"]["min"] == pytest.approx(3.5) and out["latency"]["max"] == pytest.approx(9.5)
    assert out["latency"]["mean"] == pytest.approx(6.5)
    assert out["h2d"]["mean"] == pytest.approx(1.0) and out["h2d"]["max"] == pytest.approx(1.0)
    assert out["d2h"]["median"] == pytest.approx(0.5) and out["enqueue"]["p99"] == pytest.approx(0.25)
    assert out["total_gpu_compute_ms"] == pytest.approx(20.0) and out["host_wall_ms"] == 50.0
    # GPU compute std = sqrt(20/3) = 2.58 ms on a 5 ms mean: unstable; enqueue is far below compute
    assert len(out["warnings"]) == 1 and out["warnings"][0].startswith("GPU compute time: latency is unstable: "
                                                                       "coefficient of variation 51.6%")
    assert gpu["cv"] == pytest.approx((20 / 3) ** 0.5 / 5)
    json.dumps(out)


def test_timing_breakdown_throughput_from_device_span_and_warnings():
    steady = timing_breakdown(**_timeline(compute=[5.0] * 4))
    assert steady["throughput_basis"] == "device span" and steady["host_wall_ms"] is None
    assert steady["throughput_qps"] == pytest.approx(4 / 0.0365)  # first H2D start 0 to last D2H end 36.5 ms
    assert steady["warnings"] == []
    assert timing_breakdown(**_timeline(compute=[5.0] * 4), cv_threshold=0.0)["warnings"] == []  # cv is 0
    assert len(timing_breakdown(**_timeline(), cv_threshold=0.6)["warnings"]) == 0  # 51.6% under 60%
    bound = timing_breakdown(**_timeline(compute=[5.0] * 4, enqueue=5.0))
    assert bound["warnings"] == ["enqueue time (mean 5 ms) is at least the GPU compute time (mean 5 ms): the host, "
                                 "not the GPU, bounds throughput; try extra['cuda_graph']=True"]


@pytest.mark.parametrize("change, needle", [
    ({"h2d_start": []}, "one value per iteration"),
    ({"d2h_end": [40.0]}, "got lengths"),
    ({"compute_end": [3.0, float("nan"), 17.0, 39.0]}, "compute_end holds values that are not finite: [nan]"),
    ({"compute_end": [3.0, 10.5, 27.0, 39.0]}, "iteration 1: compute_end (10.5 ms) is before compute_start (11.0 ms)"),
    ({"enqueue_end": [0.0, 0.0, 0.0, 0.0]}, "iteration 0: enqueue_end (0.0 ms) is before enqueue_start"),
    ({"host_wall_ms": 0.0}, "host_wall_ms must be a finite time > 0, got 0.0"),
])
def test_timing_breakdown_refuses_bad_timestamps(change, needle):
    args = {**_timeline(), **change}
    if "h2d_start" in change:
        args = {k: [] for k in args}
    with pytest.raises(ProfileError, match=re.escape(needle)):
        timing_breakdown(**args)


# ---------------------------------------------------------------- CUDA graph decision


STATIC_IN = {"x": (2, 3, 32, 32)}
STATIC_OUT = {"y": (2, 4, 32, 32)}


def test_cuda_graph_decision_allows_a_static_plain_run():
    assert cuda_graph_decision("10.9.0", STATIC_IN, STATIC_OUT, {"Conv", "Relu"}) == (True, "")
    assert cuda_graph_decision("8.6.1", STATIC_IN, STATIC_OUT) == (True, "")


@pytest.mark.parametrize("args, needle", [
    (("7.2.3", STATIC_IN, STATIC_OUT), "TensorRT 7.2.3 is older than 8.0"),
    (("10.9.0", {"x": (-1, 3, 32, 32)}, STATIC_OUT), "input 'x' has shape (-1, 3, 32, 32), which is not set"),
    (("10.9.0", STATIC_IN, {"boxes": (2, -1, 4)}), "output 'boxes' has shape (2, -1, 4), which depends on the input"),
    (("10.9.0", STATIC_IN, STATIC_OUT, {"Conv", "NonMaxSuppression", "NonZero"}),
     "the model has NonMaxSuppression, NonZero node(s), whose output sizes depend on the data"),
    (("10.9.0", STATIC_IN, STATIC_OUT, {"Conv", "Loop"}), "the model has Loop node(s)"),
    (("10.9.0", STATIC_IN, STATIC_OUT, (), False), "the PyCUDA adapter does not capture CUDA graphs"),
])
def test_cuda_graph_decision_says_why_not(args, needle):
    ok, why = cuda_graph_decision(*args)
    assert not ok and needle in why


def test_onnx_op_types_looks_inside_subgraphs():
    then_graph = helper.make_graph([helper.make_node("NonZero", ["a"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.INT64, None)])
    else_graph = helper.make_graph([helper.make_node("Identity", ["a"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.INT64, None)])
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
                                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    model = helper.make_model(graph)
    assert onnx_op_types(model) == {"Relu", "If", "NonZero", "Identity"}
    assert not cuda_graph_decision("10.9.0", STATIC_IN, STATIC_OUT, onnx_op_types(model))[0]


# ---------------------------------------------------------------- the CUDA adapters (emulated: tests/cpu/fake_cuda.py)


@pytest.fixture(params=["emulated", "cuda"])
def cudart(request):
    if request.param == "emulated":
        return FakeCudart()
    runtime = real_cudart()
    if runtime is None:
        pytest.skip("no CUDA GPU visible to cuda.bindings: the real-CUDA variant runs on GPU machines")
    return runtime


def _pinned_round_trip(api, stream, device_ptr, x):
    """Copy ``x`` host -> page-locked buffer -> device -> host through ``api``, check it, free the buffer; returns
    the freed pointer."""
    pinned_ptr = api.host_alloc(x.nbytes)
    pinned = np.frombuffer((ctypes.c_uint8 * x.nbytes).from_address(pinned_ptr), x.dtype)
    pinned[:] = x
    back = np.zeros_like(x)
    api.copy_htod_async(device_ptr, pinned, stream)
    api.copy_dtoh_async(back, device_ptr, stream)
    api.stream_sync(stream)
    np.testing.assert_array_equal(back, x)
    api.host_free(pinned_ptr)
    return pinned_ptr


def test_cuda_python_adapter(cudart):
    api = CudaPythonApi(cudart)
    name, cc = api.device_info()
    assert name and re.fullmatch(r"\d+\.\d+", cc) and api.supports_graphs
    stream = api.stream_create()
    assert isinstance(api.stream_handle(stream), int)
    x = np.arange(1024, dtype=np.float32)
    zeros = np.zeros_like(x)
    a, b = api.alloc(x.nbytes), api.alloc(x.nbytes)
    start, end = api.event_create(), api.event_create()
    api.event_record(start, stream)
    api.copy_htod_async(a, x, stream)
    api.copy_htod_async(b, zeros, stream)
    api.event_record(end, stream)
    back = np.full_like(x, -1)
    api.copy_dtoh_async(back, a, stream)
    api.stream_sync(stream)
    np.testing.assert_array_equal(back, x)
    assert api.event_elapsed_ms(start, end) >= 0
    # capture a device-to-device copy a -> b: nothing runs until the graph is launched
    api.begin_capture(stream)
    cudart.cudaMemcpyAsync(b, a, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)
    graph = api.end_capture(stream)
    api.copy_dtoh_async(back, b, stream)
    api.stream_sync(stream)
    np.testing.assert_array_equal(back, zeros)
    api.graph_launch(graph, stream)
    api.copy_dtoh_async(back, b, stream)
    api.stream_sync(stream)
    np.testing.assert_array_equal(back, x)
    api.graph_destroy(graph)
    for event in (start, end):
        api.event_destroy(event)
    pinned_ptr = _pinned_round_trip(api, stream, b, x[::-1])
    api.free(a)
    api.free(b)
    api.stream_destroy(stream)
    with pytest.raises(BackendError, match=r"^CUDA cudaFree failed: "):
        api.free(a)  # already freed
    if isinstance(cudart, FakeCudart):  # a real driver is not asked to free page-locked memory twice
        with pytest.raises(BackendError, match=r"^CUDA cudaFreeHost failed: "):
            api.host_free(pinned_ptr)


@pytest.fixture(params=["emulated", "pycuda"])
def pycuda_api(request):
    if request.param == "emulated":
        return PyCudaApi(fake_pycuda_driver())
    try:
        import pycuda.driver as driver

        driver.init()
        if driver.Device.count() < 1:
            raise RuntimeError("no device")
    except Exception as exc:
        pytest.skip(f"PyCUDA with a visible GPU is needed for the real-PyCUDA variant ({type(exc).__name__}: {exc})")
    return PyCudaApi()


def test_pycuda_adapter(pycuda_api):
    api = pycuda_api
    name, cc = api.device_info()
    assert name and re.fullmatch(r"\d+\.\d+", cc) and not api.supports_graphs
    stream = api.stream_create()
    assert isinstance(api.stream_handle(stream), int)
    x = np.arange(256, dtype=np.float32)
    ptr = api.alloc(x.nbytes)
    start, end = api.event_create(), api.event_create()
    api.event_record(start, stream)
    api.copy_htod_async(ptr, x, stream)
    api.event_record(end, stream)
    back = np.zeros_like(x)
    api.copy_dtoh_async(back, ptr, stream)
    api.stream_sync(stream)
    np.testing.assert_array_equal(back, x)
    assert api.event_elapsed_ms(start, end) >= 0
    _pinned_round_trip(api, stream, ptr, x[::-1])
    api.free(ptr)
    with pytest.raises(BackendError, match="the pycuda adapter does not capture CUDA graphs; install cuda-python"):
        api.begin_capture(stream)
    if isinstance(getattr(api.driver, "counts", None), Counter):  # the emulated driver
        assert api.driver.counts["free"] == 1 and api.driver.counts["host_free"] == 1
        with pytest.raises(BackendError, match=r"^PyCUDA mem_alloc failed: Error: cuMemAlloc failed: out of memory$"):
            api.alloc(2 << 30)


# ---------------------------------------------------------------- the backend on an emulated TensorRT


def _install(monkeypatch, cudart=None, pycuda_driver=None, version="10.9.0"):
    """Put an emulated tensorrt and CUDA library (or None: not importable) in sys.modules."""
    trt = fake_tensorrt(cudart or pycuda_driver, version, eligible="/conv/Conv")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    if cudart is None:
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    else:
        cuda_pkg, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
        bindings.runtime, cuda_pkg.bindings = cudart, bindings
        for name, module in (("cuda", cuda_pkg), ("cuda.bindings", bindings), ("cuda.bindings.runtime", cudart)):
            monkeypatch.setitem(sys.modules, name, module)
    if pycuda_driver is None:
        monkeypatch.setitem(sys.modules, "pycuda", None)
        monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    else:
        pkg = types.ModuleType("pycuda")
        pkg.driver = pycuda_driver
        for name, module in (("pycuda", pkg), ("pycuda.driver", pycuda_driver),
                             ("pycuda.autoprimaryctx", types.ModuleType("pycuda.autoprimaryctx"))):
            monkeypatch.setitem(sys.modules, name, module)
    return trt


def _write_onnx(path, nonzero=False):
    """x [batch, 3, 32, 32] -> 1x1 Conv -> y [batch, 4, 32, 32]; with ``nonzero``, a NonZero node beside it."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="/conv/Conv")]
    if nonzero:
        nodes.append(helper.make_node("NonZero", ["x"], ["nz"], name="/nz/NonZero"))
    graph = helper.make_graph(
        nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 32, 32])],
        [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture
def model_path(tmp_path):
    return _write_onnx(tmp_path / "small.onnx")


def _images(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def _expected(x):
    return 2 * x[:, [0, 1, 2, 0]]


CONFIG = dict(batch=(1, 2, 4))


def test_cache_entry_is_written_then_reused(monkeypatch, model_path, tmp_path):
    cudart = FakeCudart()
    trt = _install(monkeypatch, cudart=cudart)
    backend = get_backend("tensorrt")
    config = BuildConfig(cache_dir=str(tmp_path / "cache"), **CONFIG)
    x = _images(2)
    with backend.build(model_path, config) as session:
        np.testing.assert_array_equal(session.run({"x": x})["y"], _expected(x))
        key, ranges = session.cache_key, session.ranges
        assert session.env()["cuda_api"] == "cuda-python" and session.env()["cuda_graph"] is False
    paths = cache_paths(tmp_path / "cache", key)
    assert all(p.is_file() for p in paths.values())
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # atomic writes leave no temporary file behind
    meta = json.loads(paths["meta"].read_text())
    engine_bytes = paths["engine"].read_bytes()
    assert meta == engine_meta(onnx_sha256(model_path), "10.9.0", "Emulated GPU 80GB", "9.0",
                               replace(config, shapes=ranges), engine_bytes)
    assert trt.counts["build"] == 1
    with backend.build(model_path, config) as again:
        assert f"engine loaded from cache {paths['engine']}" in again.notes
        assert again.sparsity == {"eligible_sparse": ["/conv/Conv"], "ran_sparse": []}
        np.testing.assert_array_equal(again.run({"x": x})["y"], _expected(x))
    graphed = BuildConfig(cache_dir=str(tmp_path / "cache"), extra={"cuda_graph": True}, **CONFIG)
    with backend.build(model_path, graphed) as third:  # a run-time option: the same engine
        assert third.cache_key == key and any("loaded from cache" in n for n in third.notes)
    assert trt.counts["build"] == 1 and trt.counts["deserialize"] == 3
    assert not cudart.buffers  # every device buffer freed on close


def test_tensorrt_messages_go_to_logging_and_the_build_log(monkeypatch, model_path, caplog, capsys):
    """Each TensorRT message reaches the ``trt_prune.tensorrt`` logger at the matching level; INFO and worse are
    also kept as the build log; nothing is printed."""
    trt = _install(monkeypatch, cudart=FakeCudart())
    caplog.set_level(logging.DEBUG, logger="trt_prune.tensorrt")
    severity = trt.ILogger.Severity
    logger = make_logger(trt)
    for level, msg in ((severity.INTERNAL_ERROR, "a"), (severity.ERROR, "b"), (severity.WARNING, "c"),
                       (severity.INFO, "d"), (severity.VERBOSE, "e")):
        logger.log(level, msg)
    assert logger.lines == ["a", "b", "c", "d"]
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("trt_prune.tensorrt", logging.CRITICAL, "[TensorRT] a"), ("trt_prune.tensorrt", logging.ERROR, "[TensorRT] b"),
        ("trt_prune.tensorrt", logging.WARNING, "[TensorRT] c"), ("trt_prune.tensorrt", logging.INFO, "[TensorRT] d"),
        ("trt_prune.tensorrt", logging.DEBUG, "[TensorRT] e")]
    caplog.clear()
    with get_backend("tensorrt").build(model_path, BuildConfig(**CONFIG)) as session:
        assert session.sparsity == {"eligible_sparse": ["/conv/Conv"], "ran_sparse": []}
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    eligible = "[TensorRT] (Sparsity) Layers eligible for sparse math: /conv/Conv"
    assert ("trt_prune.tensorrt", logging.INFO, eligible) in records
    assert capsys.readouterr() == ("", "")


def _built_cache(monkeypatch, model_path, tmp_path):
    trt = _install(monkeypatch, cudart=FakeCudart())
    config = BuildConfig(cache_dir=str(tmp_path / "cache"), **CONFIG)
    with get_backend("tensorrt").build(model_path, config) as session:
        key = session.cache_key
    return trt, config, cache_paths(tmp_path / "cache", key)


def test_tampered_meta_sidecar_is_refused(monkeypatch, model_path, tmp_path):
    trt, config, paths = _built_cache(monkeypatch, model_path, tmp_path)
    meta = json.loads(paths["meta"].read_text())
    paths["meta"].write_text(json.dumps({**meta, "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}))
    with pytest.raises(BackendError) as info:
        get_backend("tensorrt").build(model_path, config)
    assert str(info.value) == (
        f"engine {paths['engine']} was built with TensorRT 10.9.0 on NVIDIA A100-SXM4-80GB (sm_80); this machine "
        f"has TensorRT 10.9.0 on Emulated GPU 80GB (sm_90), so the GPU differs: {REBUILD}")
    paths["meta"].write_text(json.dumps({**meta, "tensorrt": "10.3.0"}))
    with pytest.raises(BackendError, match=r"built with TensorRT 10\.3\.0 on Emulated GPU 80GB \(sm_90\); this "
                                           r"machine has TensorRT 10\.9\.0 .* so the TensorRT version differs"):
        get_backend("tensorrt").build(model_path, config)
    assert trt.counts["deserialize"] == 1  # refused before TensorRT saw the file


def test_truncated_or_undeserialisable_engine_is_refused(monkeypatch, model_path, tmp_path):
    trt, config, paths = _built_cache(monkeypatch, model_path, tmp_path)
    data = paths["engine"].read_bytes()
    paths["engine"].write_bytes(data[:10])
    with pytest.raises(BackendError, match=re.escape(f"engine file {paths['engine']} is 10 bytes, but its meta "
                                                     f"sidecar recorded {len(data)}: the file is truncated")):
        get_backend("tensorrt").build(model_path, config)
    assert trt.counts["deserialize"] == 1
    # a sidecar that matches the damaged bytes: TensorRT itself refuses them
    meta = json.loads(paths["meta"].read_text())
    meta.update(engine_bytes=10, engine_sha256=hashlib.sha256(data[:10]).hexdigest())
    paths["meta"].write_text(json.dumps(meta))
    with pytest.raises(BackendError, match=re.escape(f"could not deserialise the engine file {paths['engine']} "
                                                     f"(10 bytes) (JSONDecodeError")) as info:
        get_backend("tensorrt").build(model_path, config)
    assert "delete it and its sidecars and build again" in str(info.value)


def test_engine_without_sidecar_is_rebuilt(monkeypatch, model_path, tmp_path):
    trt, config, paths = _built_cache(monkeypatch, model_path, tmp_path)
    paths["meta"].unlink()
    with get_backend("tensorrt").build(model_path, config) as session:
        assert any("has no" in n and "rebuilding it" in n for n in session.notes)
    assert trt.counts["build"] == 2 and paths["meta"].is_file()
    with get_backend("tensorrt").build(model_path, config) as session:
        assert any("loaded from cache" in n for n in session.notes)


def test_time_breakdown_on_emulated_cuda(monkeypatch, model_path):
    cudart = FakeCudart()
    _install(monkeypatch, cudart=cudart)
    with get_backend("tensorrt").build(model_path, BuildConfig(**CONFIG)) as session:
        out = session.time_breakdown({"x": _images(2)}, warmup_s=0.0, iterations=7)
        assert out["iterations"] == 7 and out["cuda_graph"] is False
        assert out["throughput_basis"] == "host wall time" and out["throughput_qps"] > 0
        for phase in ("latency", "enqueue", "h2d", "gpu_compute", "d2h"):
            assert {"min", "max", "mean", "median", "p90", "p95", "p99"} <= set(out[phase])
            assert 0 <= out[phase]["min"] <= out[phase]["median"] <= out[phase]["max"]
        assert out["latency"]["min"] >= out["gpu_compute"]["min"]
        with pytest.raises(BackendError, match="iterations must be a positive integer, got 0"):
            session.time_breakdown({"x": _images(2)}, iterations=0)
        with pytest.raises(BackendError, match="feed 'x' has dtype float64"):
            session.time_breakdown({"x": _images(2).astype(np.float64)})
    assert cudart.counts["events_destroyed"] == 5


def test_cuda_graph_is_captured_once_per_shape_and_buffer_layout(monkeypatch, model_path):
    cudart = FakeCudart()
    trt = _install(monkeypatch, cudart=cudart)
    config = BuildConfig(extra={"cuda_graph": True}, **CONFIG)
    with get_backend("tensorrt").build(model_path, config) as session:
        captures = []
        for seed, batch in enumerate([2, 2, 4, 2, 4]):
            x = _images(batch, seed)
            np.testing.assert_array_equal(session.run({"x": x})["y"], _expected(x))  # the replay reads new inputs
            captures.append(session.graph_captures)
        # batch 4 outgrows the batch-2 buffers: the batch-2 graph held their addresses and is captured again
        assert captures == [1, 1, 2, 3, 3]
        assert cudart.counts["launch"] == 5
        assert trt.counts["execute"] == 2 * 3  # per capture: one plain enqueue, then the captured one
        out = session.time_breakdown({"x": _images(4)}, warmup_s=0.0, iterations=3)
        assert out["cuda_graph"] is True and session.graph_captures == 3 and cudart.counts["launch"] == 8
        assert len(session.time({"x": _images(4)}, warmup_s=0.0, iterations=4)) == 4
        assert session.env()["cuda_graph"] is True and len(cudart.live_graphs) == 2
    assert not cudart.live_graphs and not cudart.buffers  # graphs and buffers released on close


def test_cuda_graph_falls_back_and_says_why(monkeypatch, tmp_path):
    cudart = FakeCudart()
    _install(monkeypatch, cudart=cudart)
    path = _write_onnx(tmp_path / "nonzero.onnx", nonzero=True)
    with get_backend("tensorrt").build(path, BuildConfig(extra={"cuda_graph": True}, **CONFIG)) as session:
        x = _images(2)
        np.testing.assert_array_equal(session.run({"x": x})["y"], _expected(x))
        session.run({"x": x})
        assert session.graph_captures == 0 and cudart.counts["end_capture"] == 0
        assert [n for n in session.notes if n.startswith("CUDA graph")] == [
            "CUDA graph not used: the model has NonZero node(s), whose output sizes depend on the data; TensorRT "
            "reads them back to the host mid-run, which a CUDA graph cannot replay"]


def test_failed_capture_runs_without_a_graph(monkeypatch, model_path):
    cudart = FakeCudart(fail_capture=True)
    _install(monkeypatch, cudart=cudart)
    with get_backend("tensorrt").build(model_path, BuildConfig(extra={"cuda_graph": True}, **CONFIG)) as session:
        for seed in range(3):
            x = _images(2, seed)
            np.testing.assert_array_equal(session.run({"x": x})["y"], _expected(x))
        assert session.graph_captures == 0 and cudart.counts["end_capture"] == 1  # not retried per run
        assert [n for n in session.notes if n.startswith("CUDA graph")] == [
            "CUDA graph capture failed (CUDA cudaStreamEndCapture failed: 901 (emulated error)); running without a "
            "graph"]


def test_backend_runs_on_pycuda_when_cuda_python_is_missing(monkeypatch, model_path):
    driver = fake_pycuda_driver()
    _install(monkeypatch, pycuda_driver=driver)
    backend = get_backend("tensorrt")
    assert backend.available() == (True, "")
    with backend.build(model_path, BuildConfig(extra={"cuda_graph": True}, **CONFIG)) as session:
        x = _images(3)
        np.testing.assert_array_equal(session.run({"x": x})["y"], _expected(x))
        assert session.env()["cuda_api"] == "pycuda" and session.graph_captures == 0
        assert any("the PyCUDA adapter does not capture CUDA graphs" in n for n in session.notes)
        assert session.time_breakdown({"x": x}, warmup_s=0.0, iterations=3)["iterations"] == 3
    assert driver.counts["free"] == 2  # input and output buffers


def test_backend_without_any_cuda_library_says_what_to_install(monkeypatch, model_path):
    _install(monkeypatch)
    backend = get_backend("tensorrt")
    ok, reason = backend.available()
    assert not ok and "cuda-python's cuda.bindings (ModuleNotFoundError" in reason
    assert "PyCUDA's pycuda.driver (ModuleNotFoundError" in reason and "pip install 'trt_prune[tensorrt]'" in reason
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt' is unavailable: cannot import"):
        backend.build(model_path, BuildConfig())


def test_asking_for_a_missing_cuda_library(monkeypatch, model_path):
    _install(monkeypatch, cudart=FakeCudart())
    with pytest.raises(BackendUnavailableError, match=r"asks for pycuda, but pycuda\.driver cannot be imported here: "
                                                      r"pip install pycuda, or drop extra\['cuda_api'\]"):
        get_backend("tensorrt").build(model_path, BuildConfig(extra={"cuda_api": "pycuda"}, **CONFIG))


# ---------------------------------------------------------------- page-locked host staging


def test_copies_go_through_page_locked_host_buffers(monkeypatch, model_path):
    cudart = FakeCudart()
    _install(monkeypatch, cudart=cudart)
    with get_backend("tensorrt").build(model_path, BuildConfig(**CONFIG)) as session:
        assert session.env()["host_memory"] == "pinned"
        x1, x2 = _images(2, 1), _images(2, 2)
        y1 = session.run({"x": x1})["y"]
        y2 = session.run({"x": x2})["y"]
        # the staging buffers are reused, but what run() returns is the caller's own copy
        np.testing.assert_array_equal(y1, _expected(x1))
        np.testing.assert_array_equal(y2, _expected(x2))
        assert cudart.counts["host_alloc"] == 2  # x and y, allocated once for batch 2
        assert cudart.counts["h2d_pinned"] == 2 and cudart.counts["d2h_pinned"] == 2
        assert cudart.counts["h2d_pageable"] == cudart.counts["d2h_pageable"] == 0
        session.run({"x": _images(4)})  # a larger batch grows both staging buffers
        assert cudart.counts["host_alloc"] == 4 and len(cudart.host_buffers) == 2
        session.time_breakdown({"x": _images(4)}, warmup_s=0.0, iterations=3)
        assert cudart.counts["h2d_pageable"] == 0 and cudart.counts["h2d_pinned"] == 2 + 1 + 3
    assert not cudart.host_buffers and not cudart.buffers  # all freed on close


def test_pageable_host_memory_when_asked_or_when_pinning_fails(monkeypatch, model_path):
    cudart = FakeCudart()
    _install(monkeypatch, cudart=cudart)
    config = BuildConfig(extra={"pinned_host": False}, **CONFIG)
    with get_backend("tensorrt").build(model_path, config) as session:
        x = _images(2)
        np.testing.assert_array_equal(session.run({"x": x})["y"], _expected(x))
        assert session.env()["host_memory"] == "pageable" and cudart.counts["host_alloc"] == 0
        assert cudart.counts["h2d_pageable"] == 1 and cudart.counts["h2d_pinned"] == 0
        assert not any("page-locked" in n for n in session.notes)  # asked for: nothing to explain

    cudart = FakeCudart(fail_host_alloc=True)
    _install(monkeypatch, cudart=cudart)
    with get_backend("tensorrt").build(model_path, BuildConfig(**CONFIG)) as session:
        for seed in range(2):
            x = _images(2, seed)
            np.testing.assert_array_equal(session.run({"x": x})["y"], _expected(x))
        assert session.env()["host_memory"] == "pageable"
        assert [n for n in session.notes if "page-locked" in n] == [
            "page-locked host memory unavailable (CUDA cudaMallocHost failed: 2 (emulated error)); inputs and "
            "outputs use pageable memory, so H2D/D2H times are slower than trtexec's"]
        assert cudart.counts["h2d_pageable"] == 2 and cudart.counts["d2h_pageable"] == 2


def test_pycuda_stages_in_page_locked_arrays(monkeypatch, model_path):
    driver = fake_pycuda_driver()
    _install(monkeypatch, pycuda_driver=driver)
    with get_backend("tensorrt").build(model_path, BuildConfig(**CONFIG)) as session:
        x = _images(2)
        np.testing.assert_array_equal(session.run({"x": x})["y"], _expected(x))
        assert session.env()["host_memory"] == "pinned"
    assert driver.counts["host_free"] == 2 and driver.counts["free"] == 2

    driver = fake_pycuda_driver(fail_host_alloc=True)
    _install(monkeypatch, pycuda_driver=driver)
    with get_backend("tensorrt").build(model_path, BuildConfig(**CONFIG)) as session:
        np.testing.assert_array_equal(session.run({"x": x})["y"], _expected(x))
        assert session.env()["host_memory"] == "pageable"
        assert any("PyCUDA pagelocked_empty failed: Error: cuMemHostAlloc failed" in n for n in session.notes)
