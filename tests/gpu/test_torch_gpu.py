"""The torch backend on a CUDA GPU: fp16, channels_last, CUDA-graph replay, 2:4 on cuSPARSELt, CUDA-event timing
and per-module times. Skips, saying why, without a CUDA GPU; `bench/gpu_check.sh` runs it on a lent H100/H200."""

from __future__ import annotations

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch: these tests run on GPU machines (bench/gpu_check.sh); the CPU path "
                "is tested in tests/cpu/test_torch_backend.py", allow_module_level=True)

from torch import nn  # noqa: E402

from trt_prune.backends import BuildConfig, get_backend  # noqa: E402
from trt_prune.models import load_model  # noqa: E402
from trt_prune.sparsity import sparsify  # noqa: E402

SHAPE = (2, 3, 320, 320)


def _config(precision="fp16", **extra):
    return BuildConfig(precision=precision, shapes={"images": (SHAPE, SHAPE, SHAPE)}, extra={"device": "cuda", **extra})


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).random(SHAPE, dtype=np.float32)


def test_fp16_graph_replay_matches_fp32(images):
    model = load_model("builtin:demo-detector").model
    backend = get_backend("torch")
    with backend.build(model, _config("fp32")) as session:
        reference = session.run({"images": images})["output"]
    with backend.build(model, _config(channels_last=True, cuda_graph=True)) as session:
        got = session.run({"images": images})["output"]  # the graph's replay
        samples = session.time({"images": images}, warmup_s=0.2, iterations=20)
        again = session.run({"images": images[::-1].copy()})["output"]  # new input copied into the captured one
        env = session.env()
    with backend.build(model, _config("fp32")) as session:
        flipped = session.run({"images": images[::-1].copy()})["output"]
    assert env["gpu"] and env["precision"] == "fp16" and env["cuda_graph"]
    assert len(samples) >= 20 and all(0 < s < 1000 for s in samples)
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() < 0.02 * scale
    assert np.abs(again - flipped).max() < 0.02 * scale and np.abs(again - got).max() > 0.02 * scale


def test_sparse24_layers_run_on_cusparselt_with_the_same_output(images):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 1), nn.ReLU(),
                          nn.Conv2d(128, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 32)).eval()
    sparse = sparsify(model, min_channels=0).model
    backend = get_backend("torch")
    with backend.build(sparse, _config(channels_last=True)) as session:
        dense_out = session.run({"images": images})["output"]
    with backend.build(sparse, _config(channels_last=True, sparse24=True)) as session:
        sparse_out = session.run({"images": images})["output"]
        plan = {row["module"]: row["reason"] for row in session.sparse_plan}
        notes = session.notes
    assert plan["2"] is None and plan["4"] is None and plan["7"] is None and "only 1x1" in plan["0"]
    assert any("2:4 (cuSPARSELt) on 3 of 4" in n for n in notes)
    assert np.abs(sparse_out - dense_out).max() < 1e-2 * max(1.0, np.abs(dense_out).max())


def test_per_module_times_with_cuda_events(images):
    with get_backend("torch").build("builtin:demo-detector", _config()) as session:
        rows = session.profile_layers({"images": images}, runs=5)
        run_ms = session.profile_run_ms
    convs = [r for r in rows if r.op == "Conv2d"]
    assert len(convs) > 30 and all(r.ms >= 0 for r in rows)
    assert sum(r.ms for r in rows) == pytest.approx(run_ms, rel=1e-6)
