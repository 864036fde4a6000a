"""TensorRT backend on a real GPU. Skips, saying why, where TensorRT or a GPU is missing; the decisions it
relies on (build plan, cache key, log and inspector parsing) are tested on the CPU in tests/cpu."""

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
    for suffix in (".engine", ".inspector.json", ".log", ".sparsity.json"):
        assert (cache / f"{key}{suffix}").is_file(), suffix
    assert list(cache.glob("timing_*.cache"))
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
