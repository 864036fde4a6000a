"""The 2:4 kernels of ``trt_prune.kernels.sparse24`` in Triton's interpreter on the CPU: masks equal the numpy
2:4 masks, split scores equal the numpy permutation search's, a search with the kernel scorer makes the numpy
search's moves, and bad inputs give one KernelError each. The same checks at model scale on CUDA are in
tests/gpu/test_kernels_sparse24_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trt_prune.errors import KernelError
from trt_prune.kernels import sparse24
from trt_prune.sparsity.pattern import mask_2of4 as numpy_mask
from trt_prune.sparsity.permutation import _SplitScorer, efficacy, search_permutation


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's interpreter for every test: the kernels are made at first use, so setting it here is enough."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sparse24.interpreting()


def _both(weight: np.ndarray, axis: int, dtype=torch.float32):
    t = torch.from_numpy(weight).to(dtype)
    return sparse24.mask_2of4(t, axis, impl="triton"), sparse24.mask_2of4_reference(t, axis)


@pytest.mark.parametrize(("shape", "axis"), [((32, 16, 3, 3), 1), ((24, 40), 1), ((12, 5), 0), ((3, 4), 1),
                                             ((7, 20, 1, 1), 1), ((4, 3, 8), -1), ((8, 6, 2), 0)])
def test_masks_equal_the_numpy_masks(shape, axis):
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    kernel, reference = _both(w, axis)
    expected = numpy_mask(w, axis)
    assert kernel.dtype == torch.bool and kernel.shape == w.shape
    np.testing.assert_array_equal(kernel.numpy(), expected)
    np.testing.assert_array_equal(reference.numpy(), expected)
    moved = np.moveaxis(kernel.numpy(), axis, -1)
    assert (moved.reshape(*moved.shape[:-1], -1, 4).sum(-1) == 2).all()


def test_ties_keep_the_lower_index_like_numpy():
    # integer magnitudes with many repeats: ties inside most runs of 4, signs mixed
    w = np.random.default_rng(0).integers(-2, 3, (16, 32, 3)).astype(np.float32)
    for axis in (0, 1):
        kernel, reference = _both(w, axis)
        np.testing.assert_array_equal(kernel.numpy(), numpy_mask(w, axis))
        np.testing.assert_array_equal(reference.numpy(), numpy_mask(w, axis))
    run = np.array([[3.0, -3.0, 3.0, 1.0, 0.0, -0.0, 0.0, 0.0]])
    kernel, _ = _both(run, 1)
    assert kernel.numpy().tolist() == [[True, True, False, False, True, True, False, False]]


def test_nan_and_inf_rank_like_numpy():
    w = np.array([[np.nan, 1.0, np.nan, 2.0, np.inf, np.nan, -np.inf, 5.0, np.nan, np.nan, np.nan, 0.0]])
    kernel, reference = _both(w, 1)
    np.testing.assert_array_equal(kernel.numpy(), numpy_mask(w, 1))
    np.testing.assert_array_equal(reference.numpy(), numpy_mask(w, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_masks_in_other_float_types(dtype):
    t = torch.randn(8, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    expected = numpy_mask(t.to(torch.float64).numpy(), 1)  # fp16/bf16 -> fp64 keeps order and ties
    np.testing.assert_array_equal(sparse24.mask_2of4(t, 1, impl="triton").numpy(), expected)
    np.testing.assert_array_equal(sparse24.mask_2of4_reference(t, 1).numpy(), expected)


def test_auto_runs_the_reference_on_cpu_and_triton_needs_the_interpreter(monkeypatch):
    w = torch.randn(4, 8)
    np.testing.assert_array_equal(sparse24.mask_2of4(w).numpy(), numpy_mask(w.numpy(), 1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        sparse24.mask_2of4(w, impl="triton")
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        sparse24.split_scores(torch.rand(8, 4), torch.arange(8).reshape(1, 8), impl="triton")
    np.testing.assert_array_equal(sparse24.mask_2of4(w, impl="torch").numpy(), numpy_mask(w.numpy(), 1))
    assert sparse24.TorchSplitScorer(np.ones((8, 2), np.float32), 1).path == "torch:cpu"


def _pairs(rng, channels: int, n: int) -> np.ndarray:
    return np.stack([rng.permutation(channels)[:8] for _ in range(n)])


# rows: one, below a row block, between blocks, above the 512 rows of one program (two chunks, summed in fp64)
@pytest.mark.parametrize(("channels", "rows", "pairs"), [(8, 1, 1), (16, 37, 2), (32, 130, 5), (24, 600, 3)])
def test_split_scores_equal_the_numpy_scorer(channels, rows, pairs):
    rng = np.random.default_rng(rows)
    columns = np.abs(rng.standard_normal((channels, rows))).astype(np.float32)
    cols8 = _pairs(rng, channels, pairs)
    expected = _SplitScorer(columns, pairs)(cols8)
    kernel = sparse24.split_scores(torch.from_numpy(columns), torch.from_numpy(cols8), impl="triton")
    reference = sparse24.split_scores_reference(torch.from_numpy(columns), torch.from_numpy(cols8))
    assert kernel.shape == (pairs, 35) and kernel.dtype == torch.float64
    np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(reference.numpy(), expected, rtol=1e-5)
    # split 0 is the stripes as given: the plain 2:4 kept magnitude of those 8 columns
    top2 = np.sort(columns[cols8].reshape(pairs, 2, 4, rows), axis=2)[:, :, 2:].sum(axis=(1, 2, 3))
    np.testing.assert_allclose(kernel.numpy()[:, 0], top2, rtol=1e-5)
    scorer = sparse24.TorchSplitScorer(columns, pairs)
    assert scorer.path == "triton-interpreter:cpu"
    got = scorer(cols8)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_search_with_the_kernel_scorer_matches_the_numpy_search():
    # Same seed and schedule: the kernel's scores equal numpy's to ~1e-7 relative (another summation order), so the
    # greedy and annealing choices are the same unless two splits score within rounding of each other; on this
    # matrix none do and the permutations are identical. (Were they to differ, efficacy would still agree closely.)
    w = np.random.default_rng(3).standard_normal((24, 32))
    numpy_result = search_permutation(w, time_budget_s=300.0, seed=2, rounds=60)
    kernel_result = search_permutation(w, time_budget_s=300.0, seed=2, rounds=60, scorer="kernel")
    assert kernel_result.scorer == "kernel:triton-interpreter:cpu" and numpy_result.scorer == "numpy"
    np.testing.assert_array_equal(kernel_result.perm, numpy_result.perm)
    assert kernel_result.iterations == numpy_result.iterations
    assert kernel_result.efficacy == pytest.approx(numpy_result.efficacy, abs=1e-9)
    assert kernel_result.efficacy == pytest.approx(efficacy(w, kernel_result.perm)) and kernel_result.efficacy > 20
    with pytest.raises(ValueError, match="not one of numpy, kernel"):
        search_permutation(w, scorer="gpu")
    with pytest.raises(ValueError, match="scorer='kernel'"):
        search_permutation(w, device="cpu")


@pytest.mark.parametrize(("call", "message"), [
    (lambda: sparse24.mask_2of4(torch.ones(4, 8, dtype=torch.int32)), "floating-point weight, got dtype torch.int32"),
    (lambda: sparse24.mask_2of4(torch.ones(4, 6)), "has length 6, not a positive multiple of 4"),
    (lambda: sparse24.mask_2of4(torch.ones(4, 0)), "has length 0, not a positive multiple of 4"),
    (lambda: sparse24.mask_2of4(torch.ones(8)), r"at least 2 dimensions, got shape \(8,\)"),
    (lambda: sparse24.mask_2of4(torch.ones(4, 8), axis=2), r"axis 2 is not an axis of shape \(4, 8\)"),
    (lambda: sparse24.mask_2of4(np.ones((4, 8))), "takes a torch.Tensor, got ndarray"),
    (lambda: sparse24.mask_2of4(torch.ones(4, 8), impl="cuda"), "impl 'cuda' is not one of auto, triton, torch"),
    (lambda: sparse24.split_scores(torch.rand(16, 4), torch.zeros(2, 7, dtype=torch.int64)),
     r"\[pairs, 8\] column ids .* got shape \(2, 7\)"),
    (lambda: sparse24.split_scores(torch.rand(16, 4), torch.full((1, 8), 16)), "column id 16, outside \\[0, 15\\]"),
    (lambda: sparse24.split_scores(torch.rand(16, 4), torch.full((1, 8), -1)), "column id -1, outside"),
    (lambda: sparse24.split_scores(torch.rand(16, 4), torch.zeros(1, 8)), "integer column ids, got dtype"),
    (lambda: sparse24.split_scores(torch.rand(16, 4, dtype=torch.float64), torch.zeros(1, 8, dtype=torch.int64)),
     "2-D float32 tensor .* dtype torch.float64"),
    (lambda: sparse24.split_scores(torch.rand(4, 4), torch.zeros(1, 8, dtype=torch.int64)), "has 4 channels"),
    (lambda: sparse24.TorchSplitScorer(np.ones((8, 2), np.float32), 1)(np.zeros((2, 8), np.int64)),
     "2 stripe pairs scored at once, more than max_pairs=1"),
    (lambda: sparse24.TorchSplitScorer(np.ones((8, 2), np.float32), 1, device="tpu"), "not a torch device"),
])
def test_bad_inputs_say_what_and_how(call, message):
    with pytest.raises(KernelError, match=message):
        call()


def test_the_kernels_run_when_triton_was_imported_before_the_interpreter_was_switched_on():
    # pytest workers import triton early (torch imports it); triton.language's own jitted helpers are then
    # compiled-mode functions, and a kernel calling one fails only in that order: run it in a fresh process
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os
        import triton  # noqa: F401  (imported before TRITON_INTERPRET is set)
        import torch
        os.environ["TRITON_INTERPRET"] = "1"
        from trt_prune.kernels import sparse24
        columns = torch.rand(16, 37)
        cols8 = torch.arange(16).reshape(2, 8)
        got = sparse24.split_scores(columns, cols8, impl="triton")
        want = sparse24.split_scores_reference(columns, cols8)
        torch.testing.assert_close(got, want)
        print("ok", tuple(got.shape))
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "ok"
