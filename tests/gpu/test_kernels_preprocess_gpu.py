"""The pre-processing kernel compiled by Triton for a CUDA GPU (not the interpreter): equal to the torch reference
on mixed odd sizes, both channel orders, fp32 and fp16, one launch per batch. Skips, saying why, without a CUDA
GPU; the same kernel runs under Triton's interpreter in tests/cpu/test_kernels_preprocess.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch: these tests run on GPU machines (bench/gpu_check.sh); the kernel is "
                "tested under Triton's interpreter in tests/cpu/test_kernels_preprocess.py", allow_module_level=True)

from trt_prune.kernels import preprocess as pp  # noqa: E402
from trt_prune.kernels.preprocess import PreprocessSpec, preprocess, preprocess_reference  # noqa: E402

MIXED = [(1080, 1920), (37, 53), (1, 1), (481, 271), (720, 1280), (2, 300), (1536, 2048), (375, 500)]
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.fixture(autouse=True)
def compiled(monkeypatch):
    """The compiled kernel, whatever the shell says: the interpreter is the CPU tests' business."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _frames(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize("order", ["bgr", "rgb"])
def test_triton_equals_the_reference_in_fp32(order):
    frames = _frames(MIXED)
    spec = PreprocessSpec(size=(384, 640), input_order=order, **IMAGENET)
    got, boxes = preprocess(frames, spec, impl="triton", device="cuda")
    want, want_boxes = preprocess_reference(frames, spec)  # on the CPU
    assert got.is_cuda and got.shape == (len(MIXED), 3, 384, 640) and boxes == want_boxes
    assert float((got.cpu() - want).abs().max()) <= 1e-3


@pytest.mark.parametrize("order", ["bgr", "rgb"])
def test_triton_is_within_one_fp16_lsb_of_the_reference(order):
    frames = _frames(MIXED, seed=1)
    got, _ = preprocess(frames, PreprocessSpec(size=(640, 640), input_order=order, dtype="fp16"), impl="triton",
                        device="cuda")
    want, _ = preprocess_reference(frames, PreprocessSpec(size=(640, 640), input_order=order))
    a = want.abs().half()
    ulp = (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).float()
    err = (got.cpu().float() - want.half().float()).abs()
    assert got.dtype == torch.float16 and bool((err <= ulp).all()), float(err.max())


def test_auto_runs_triton_on_cuda_frames_and_matches_torch_ops_there(monkeypatch):
    frames = torch.from_numpy(np.stack(_frames([(1080, 1920)] * 4, seed=2))).cuda()
    spec = PreprocessSpec(size=(640, 640))
    ran = []
    real = pp._preprocess_triton
    monkeypatch.setattr(pp, "_preprocess_triton", lambda *a: ran.append(1) or real(*a))
    got, _ = preprocess(frames, spec)
    want, _ = preprocess_reference(frames, spec)  # torch ops on the GPU
    assert ran == [1] and got.is_cuda and want.is_cuda
    assert float((got - want).abs().max()) <= 1e-3


def test_one_launch_per_batch():
    from torch.profiler import ProfilerActivity, profile

    frames = [torch.from_numpy(f).cuda() for f in _frames(MIXED, seed=3)]
    spec = PreprocessSpec(size=(640, 640), dtype="fp16")
    preprocess(frames, spec, impl="triton")  # compiles
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        preprocess(frames, spec, impl="triton")
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if "letterbox_kernel" in e.name]
    assert len(launches) == 1, [e.name for e in prof.events()]
