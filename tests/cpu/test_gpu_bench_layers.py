"""The layer selection of bench/gpu_sparse24_layers.py (the GPU timing itself needs a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch import nn

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_sparse24_layers.py"


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_sparse24_layers", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gemm_shapes_of_linear_and_pointwise_convs():
    model = nn.Sequential(nn.Conv2d(8, 64, 3, padding=1), nn.Conv2d(64, 128, 1), nn.Conv2d(128, 128, 1, stride=2),
                          nn.Conv2d(128, 128, 3, padding=1, groups=128), nn.Conv2d(128, 30, 1), nn.Flatten(),
                          nn.Linear(30 * 4 * 4, 64))
    rows = _bench().gemm_layers(model, (2, 8, 8, 8))
    assert [(r["module"], r["M"], r["K"], r["N"]) for r in rows] == [
        ("1", 2 * 8 * 8, 64, 128),  # 1×1 conv: M = batch × positions
        ("4", 2 * 4 * 4, 128, 30),
        ("6", 2, 480, 64),  # Linear: M = batch
    ]  # 3×3, strided and depthwise convs are not plain GEMMs; the 8-channel input conv is not either


def test_summary_bins_layers_by_their_smaller_channel_count():
    rows = [{"K": 64, "N": 256, "speedup": 0.5}, {"K": 256, "N": 64, "speedup": 0.7},
            {"K": 256, "N": 1024, "speedup": 1.2}, {"K": 1024, "N": 256, "speedup": 0.9},
            {"K": 512, "N": 2048, "speedup": 1.4}, {"K": 2048, "N": 512, "error": "RuntimeError: shape"}]
    assert _bench().summarize_by_channels(rows) == [
        {"min_channels": 0, "below": 128, "layers": 2, "faster": 0, "median_speedup": 0.6},
        {"min_channels": 256, "below": 512, "layers": 2, "faster": 1, "median_speedup": 1.05},
        {"min_channels": 512, "below": None, "layers": 1, "faster": 1, "median_speedup": 1.4},
    ]  # layers that failed to convert are not timed, so not counted


def test_torch_variants_bench_dry_run_on_the_cpu():
    """bench/gpu_torch_variants.py's code path, on the CPU (fp32, no graphs, no 2:4 kernels)."""
    path = BENCH.with_name("gpu_torch_variants.py")
    spec = importlib.util.spec_from_file_location("gpu_torch_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--dry-run", "--size", "64", "--batches", "1,2", "--seconds", "0",
                          "--models", "builtin:demo-detector"])
    rows = result["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for b in (1, 2) for v in module.VARIANTS]
    assert all(r["speedup"] == 1.0 for r in rows if r["variant"] == "dense")
    first = [r for r in rows if r["batch"] == 1]
    assert all({"backbone", "neck", "head"} <= set(r["stages_ms"]) for r in first)  # per-module split, batch 1
    assert all(r["env"]["device"] == "cpu" for r in rows)
