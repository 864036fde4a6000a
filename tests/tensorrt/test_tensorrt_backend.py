"""TensorRT backend on a real GPU. Skips, saying why, where TensorRT or a GPU is missing; the decisions it
relies on (build plan, cache key and meta checks, log and inspector parsing, timing summary, CUDA-graph decision)
are tested on the CPU in tests/cpu."""

import hashlib
import json
import shutil
import warnings

import numpy as np
import pytest

pytest.importorskip("tensorrt", exc_type=ImportError,
                    reason="TensorRT is not installed: it needs NVIDIA's package index and an NVIDIA GPU "
                           "(pip install 'trt_prune[tensorrt]'); its pure logic is tested in tests/cpu")

import onnx  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from trt_prune.backends import BuildConfig, get_backend  # noqa: E402
from trt_prune.backends.tensorrt import cache_paths  # noqa: E402
from trt_prune.errors import BackendError  # noqa: E402
from trt_prune.models.demo_detector import DemoDetector  # noqa: E402
from trt_prune.profiling.layers import Graph  # noqa: E402

_OK, _WHY = get_backend("tensorrt").available()
if not _OK:
    pytest.skip(f"the tensorrt backend cannot run here: {_WHY}", allow_module_level=True)

SIZE = 320
# fp32 with TF32 off, so TensorRT and ONNX Runtime compute the same thing; level 2 keeps builds short
FP32 = dict(batch=(1, 2, 4), optimization_level=2, extra={"tf32": False})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.manual_seed(0)
    model = DemoDetector().eval()
    folder = tmp_path_factory.mktemp("trt")
    path = folder / "demo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, torch.randn(1, 3, SIZE, SIZE), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["preds"],
                          dynamic_axes={"images": {0: "batch"}, "preds": {0: "batch"}})
    return model, path, folder


@pytest.fixture(scope="module")
def session(demo):
    _, path, folder = demo
    s = get_backend("tensorrt").build(path, BuildConfig(cache_dir=str(folder / "cache"), **FP32))
    yield s
    s.close()


def _images(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)


@pytest.mark.parametrize("batch", [1, 4])
def test_outputs_match_onnxruntime_in_fp32(demo, session, batch):
    _, path, _ = demo
    x = _images(batch)
    with get_backend("onnxruntime").build(path, BuildConfig(threads=4)) as ort_session:
        expected = ort_session.run({"images": x})["preds"]
    got = session.run({"images": x})["preds"]
    assert got.shape == expected.shape == (batch, 8, expected.shape[2])
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_timing_and_inputs(session):
    assert [s.name for s in session.inputs] == ["images"] and session.inputs[0].dtype == "float32"
    samples = session.time({"images": _images(2)}, warmup_s=0.2, iterations=20)
    assert len(samples) == 20 and all(s > 0 for s in samples)
    env = session.env()
    assert env["backend_version"] and env["gpu"] and env["compute_capability"]


def test_batch_outside_the_profile_is_refused(session):
    with pytest.raises(BackendError, match="outside the engine's profile"):
        session.run({"images": _images(8)})


def test_per_layer_profile_maps_to_modules(demo, session):
    model, path, _ = demo
    rows = session.profile_layers({"images": _images(1)}, runs=10)
    assert rows
    modules = {name for name, _ in model.named_modules()}
    assert all(r.module in modules for r in rows if r.module is not None)
    graph = Graph.from_onnx(onnx.load(str(path)))
    ops = {n.name: n.op for n in graph.nodes}
    conv_modules = {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    covered = {m for r in rows for m in r.members if ops.get(m) == "Conv"}
    assert len(covered) >= 0.9 * len(conv_modules)  # nearly every conv is named by some layer's metadata
    # GPU layer times happen inside the host-timed profiled runs (which add the copies and the sync)
    assert 0 < sum(r.ms for r in rows) <= session.profile_run_ms * 1.05 + 0.05
    names = {row["name"] for row in session.inspector}
    assert sum(r.name in names for r in rows) >= 0.9 * len(rows)


def test_inspector_and_cache(demo, session):
    _, path, folder = demo
    assert session.inspector and all(row["precision"] in (None, "fp32", "fp16", "int32", "int64", "bool")
                                     for row in session.inspector)
    cache = folder / "cache"
    key = session.cache_key
    for suffix in (".engine", ".meta.json", ".inspector.json", ".log", ".sparsity.json"):
        assert (cache / f"{key}{suffix}").is_file(), suffix
    assert list(cache.glob("timing_*.cache"))
    import tensorrt as trt

    meta = json.loads((cache / f"{key}.meta.json").read_text())
    engine = (cache / f"{key}.engine").read_bytes()
    env = session.env()
    assert (meta["tensorrt"], meta["gpu"], meta["compute_capability"]) == (trt.__version__, env["gpu"],
                                                                           env["compute_capability"])
    assert meta["engine_bytes"] == len(engine) and meta["engine_sha256"] == hashlib.sha256(engine).hexdigest()
    with get_backend("tensorrt").build(path, BuildConfig(cache_dir=str(cache), **FP32)) as again:
        assert again.cache_key == key
        assert any("loaded from cache" in n for n in again.notes)
        np.testing.assert_allclose(again.run({"images": _images(1)})["preds"],
                                   session.run({"images": _images(1)})["preds"], rtol=1e-5, atol=1e-5)


def test_sparse_build_reports_sparsity(tmp_path):
    # fp16 in the ONNX (strongly typed on 10 and 11) and channels above 256: where sparse kernels can win.
    # Whether TensorRT picks one is its choice; that both convs are eligible is not.
    net = nn.Sequential(nn.Conv2d(256, 512, 3, padding=1), nn.ReLU(), nn.Conv2d(512, 512, 3, padding=1)).eval()
    with torch.no_grad():
        for conv in (net[0], net[2]):
            w = conv.weight.view(conv.weight.shape[0], -1, 4, *conv.weight.shape[2:])
            w[:, :, 2:] = 0  # 2 zeros in every 4 input channels: the 2:4 pattern TensorRT accepts
    path = tmp_path / "sparse.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net.half(), torch.randn(1, 256, 28, 28).half(), str(path), dynamo=False,
                          opset_version=17, input_names=["x"], output_names=["y"])
    config = BuildConfig(sparse_weights=True, precision="fp16", optimization_level=2,
                         cache_dir=str(tmp_path / "cache"), extra={"strongly_typed": True})
    with get_backend("tensorrt").build(path, config) as s:
        assert "SPARSE_WEIGHTS" in s.plan.builder_flags and s.plan.strongly_typed
        eligible, ran = s.sparsity["eligible_sparse"], s.sparsity["ran_sparse"]
        assert eligible, "the build log named no layer eligible for sparse math"
        assert all("Conv" in name for name in eligible)
        assert set(ran) <= set(eligible)
        assert all(isinstance(row["sparse"], bool) for row in s.inspector)
        assert s.run({"x": np.zeros((1, 256, 28, 28), np.float16)})["y"].dtype == np.float16


def test_int8_qdq_builds_strongly_typed_and_runs_int8(demo, tmp_path):
    # trt-prune quantize's output: Q/DQ decide precision; no precision flag on 10 or 11
    from trt_prune.quantize import quantize

    _, path, _ = demo
    calib = np.random.default_rng(0).random((8, 3, SIZE, SIZE), dtype=np.float32)
    q = quantize(path, tmp_path / "demo.int8.onnx", calib=calib, method="minmax", calib_cache=False)
    config = BuildConfig(batch=(1, 1, 1), optimization_level=2, cache_dir=str(tmp_path / "cache"))
    with get_backend("tensorrt").build(q.dst, config) as s:
        assert s.plan.strongly_typed and "INT8" not in s.plan.builder_flags
        assert any(row["precision"] == "int8" for row in s.inspector), "the engine inspector shows no INT8 layer"
        x = calib[:1]
        with get_backend("onnxruntime").build(q.dst, BuildConfig(threads=4)) as ref:
            expected = ref.run({"images": x})["preds"]
        got = s.run({"images": x})["preds"]
        assert np.abs(got - expected).max() <= 0.1 * np.abs(expected).max()  # same Q/DQ math, other kernels


def _copy_entry(session, folder, dst):
    """The session's cache entry, copied to ``dst`` so that it can be damaged without harming the shared one."""
    dst.mkdir()
    for path in cache_paths(folder / "cache", session.cache_key).values():
        shutil.copy(path, dst / path.name)
    return cache_paths(dst, session.cache_key)


def test_meta_sidecar_for_another_gpu_is_refused(demo, session, tmp_path):
    _, path, folder = demo
    paths = _copy_entry(session, folder, tmp_path / "cache")
    meta = json.loads(paths["meta"].read_text())
    paths["meta"].write_text(json.dumps({**meta, "gpu": "Some Other GPU"}))
    with pytest.raises(BackendError) as info:
        get_backend("tensorrt").build(path, BuildConfig(cache_dir=str(tmp_path / "cache"), **FP32))
    msg = str(info.value)
    assert f"engine {paths['engine']} was built with TensorRT {meta['tensorrt']} on Some Other GPU" in msg
    assert f"this machine has TensorRT {meta['tensorrt']} on {session.env()['gpu']}" in msg
    assert "so the GPU differs: rebuild it (delete the cache entry or pass a new cache_dir)" in msg


def test_truncated_engine_is_refused(demo, session, tmp_path):
    _, path, folder = demo
    paths = _copy_entry(session, folder, tmp_path / "cache")
    config = BuildConfig(cache_dir=str(tmp_path / "cache"), **FP32)
    data = paths["engine"].read_bytes()
    half = data[:len(data) // 2]
    paths["engine"].write_bytes(half)
    with pytest.raises(BackendError, match=f"is {len(half)} bytes, but its meta sidecar recorded {len(data)}: the "
                                           f"file is truncated"):
        get_backend("tensorrt").build(path, config)
    # with a sidecar that matches the truncated bytes, TensorRT's own deserialiser is what refuses them
    meta = json.loads(paths["meta"].read_text())
    meta.update(engine_bytes=len(half), engine_sha256=hashlib.sha256(half).hexdigest())
    paths["meta"].write_text(json.dumps(meta))
    with pytest.raises(BackendError, match="could not deserialise the engine file .* delete it and its sidecars"):
        get_backend("tensorrt").build(path, config)


def test_time_breakdown(session):
    out = session.time_breakdown({"images": _images(2)}, warmup_s=0.2, iterations=30)
    assert out["iterations"] == 30 and out["throughput_qps"] > 0 and out["cuda_graph"] is False
    for phase in ("latency", "enqueue", "h2d", "gpu_compute", "d2h"):
        assert 0 <= out[phase]["min"] <= out[phase]["median"] <= out[phase]["p99"] <= out[phase]["max"]
    assert out["h2d"]["min"] > 0 and out["gpu_compute"]["min"] > 0 and out["d2h"]["min"] > 0
    # latency spans the copies and the compute of the same iteration
    assert out["latency"]["mean"] == pytest.approx(out["h2d"]["mean"] + out["gpu_compute"]["mean"]
                                                   + out["d2h"]["mean"], rel=1e-6)
    # one inference in flight at a time: the host wall time covers every device latency
    assert out["host_wall_ms"] >= 30 * out["latency"]["mean"] * 0.99


def test_cuda_graph_replays_the_same_outputs(demo, session):
    _, path, folder = demo
    config = BuildConfig(cache_dir=str(folder / "cache"), **{**FP32, "extra": {**FP32["extra"], "cuda_graph": True}})
    with get_backend("tensorrt").build(path, config) as graphed:
        assert graphed.cache_key == session.cache_key  # a run-time option: the same engine
        assert any("loaded from cache" in n for n in graphed.notes)
        for seed, batch in enumerate([2, 2, 1]):
            x = _images(batch, seed)
            np.testing.assert_allclose(graphed.run({"images": x})["preds"], session.run({"images": x})["preds"],
                                       rtol=1e-5, atol=1e-5)
        assert graphed.graph_captures == 2, graphed.notes  # batch 2 once, batch 1 once
        assert graphed.time_breakdown({"images": _images(2)}, warmup_s=0.1, iterations=20)["cuda_graph"] is True
        assert graphed.graph_captures == 2 and graphed.env()["cuda_graph"] is True


def test_pinned_and_pageable_staging_agree(demo, session):
    _, path, folder = demo
    assert session.env()["host_memory"] == "pinned", session.notes
    config = BuildConfig(cache_dir=str(folder / "cache"), **{**FP32, "extra": {**FP32["extra"], "pinned_host": False}})
    with get_backend("tensorrt").build(path, config) as pageable:
        assert pageable.cache_key == session.cache_key and pageable.env()["host_memory"] == "pageable"
        for seed, batch in enumerate([2, 4]):
            x = _images(batch, seed)
            np.testing.assert_allclose(pageable.run({"images": x})["preds"], session.run({"images": x})["preds"],
                                       rtol=1e-5, atol=1e-5)


def test_profile_cli_prints_trtexec_phases(demo, tmp_path):
    from click.testing import CliRunner

    from trt_prune.cli import cli

    _, path, folder = demo
    res = CliRunner().invoke(cli, ["profile", str(path), "--backend", "tensorrt", "--batch", "2", "--cache-dir",
                                   str(folder / "cache-cli"), "--iterations", "20", "--duration", "0", "--warmup",
                                   "0.2", "--layer-runs", "3", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["breakdown"]["iterations"] == 20 and data["breakdown"]["gpu_compute"]["min"] > 0
    assert data["env"]["host_memory"] == "pinned" and data["env"]["gpu"]
    assert data["per_layer"] and all(row["module"] for row in data["per_layer"][:5])
