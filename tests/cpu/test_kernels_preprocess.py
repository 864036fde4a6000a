"""Detector pre-processing (:mod:`trt_prune.kernels.preprocess`) on the CPU: the Triton kernel under Triton's
interpreter against the torch reference (odd sizes, a mixed batch, both channel orders, fp32 and fp16), the
letterbox geometry and its box mappings, the calibration loader's agreement with it, the spec's dict round trip
and bad inputs. The same kernel compiled for a GPU is tested in tests/gpu/test_kernels_preprocess_gpu.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from trt_prune.errors import KernelError
from trt_prune.kernels.preprocess import (
    Letterbox,
    PreprocessSpec,
    letterbox_params,
    preprocess,
    preprocess_reference,
    triton_available,
)

ODD_SIZES = [(37, 53), (1, 1), (481, 271), (64, 96), (2, 300)]
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@pytest.fixture
def interpret(monkeypatch):
    """Triton's interpreter for this test: the kernel reads the variable at its first use, not at import."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _frames(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _fp16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of fp16 at each |x| (as fp32): one least significant bit at that magnitude."""
    a = x.abs().half()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).float()


# ------------------------------------------------------------------------------------------------ kernel = reference
@pytest.mark.parametrize("order", ["bgr", "rgb"])
def test_kernel_equals_the_reference_in_fp32_for_a_mixed_batch_of_odd_sizes(interpret, order):
    frames = _frames(ODD_SIZES)
    spec = PreprocessSpec(size=(64, 96), input_order=order, **IMAGENET)
    got, boxes = preprocess(frames, spec, impl="triton")
    want, want_boxes = preprocess_reference(frames, spec)
    assert got.shape == (len(frames), 3, 64, 96) and got.dtype == torch.float32
    assert boxes == want_boxes
    assert float((got - want).abs().max()) <= 1e-3


@pytest.mark.parametrize("order", ["bgr", "rgb"])
def test_kernel_is_within_one_fp16_lsb_of_the_reference(interpret, order):
    frames = _frames([(37, 53), (1, 1), (481, 271)], seed=1)
    got, _ = preprocess(frames, PreprocessSpec(size=(64, 64), input_order=order, dtype="fp16"), impl="triton")
    want, _ = preprocess_reference(frames, PreprocessSpec(size=(64, 64), input_order=order))
    assert got.dtype == torch.float16
    err = (got.float() - want.half().float()).abs()
    assert bool((err <= _fp16_ulp(want)).all()), float(err.max())


def test_one_batch_tensor_and_tensors_give_what_arrays_give(interpret):
    frames = _frames([(50, 70)] * 3, seed=2)
    spec = PreprocessSpec(size=(32, 64), input_order="rgb", center=False)
    stacked = torch.from_numpy(np.stack(frames))
    from_arrays, _ = preprocess(frames, spec, impl="triton")
    from_batch, _ = preprocess(stacked, spec, impl="triton")
    from_tensors, _ = preprocess(list(stacked), spec, impl="triton")
    reference, _ = preprocess_reference(stacked, spec)
    assert torch.equal(from_arrays, from_batch) and torch.equal(from_arrays, from_tensors)
    assert float((from_batch - reference).abs().max()) <= 1e-3


def test_auto_on_the_cpu_is_the_reference():
    frames = _frames([(37, 53)])
    spec = PreprocessSpec(size=(64, 64))
    got, _ = preprocess(frames, spec)
    assert torch.equal(got, preprocess_reference(frames, spec)[0])


# ------------------------------------------------------------------------------------------------ the reference
def test_reference_letterboxes_swaps_and_normalises():
    blue = np.zeros((100, 200, 3), dtype=np.uint8)
    blue[..., 0] = 255  # BGR: pure blue
    x, (box,) = preprocess_reference([blue], PreprocessSpec(size=(64, 64), **IMAGENET))
    assert box.resized == (32, 64) and box.pad == (16, 0)
    mean, std = torch.tensor(IMAGENET["mean"]), torch.tensor(IMAGENET["std"])
    pad = (114 / 255 - mean) / std
    inside = (torch.tensor([0.0, 0.0, 1.0]) - mean) / std  # RGB out: the blue is channel 2
    assert torch.allclose(x[0, :, :16], pad.view(3, 1, 1).expand(3, 16, 64), atol=1e-6)
    assert torch.allclose(x[0, :, 48:], pad.view(3, 1, 1).expand(3, 16, 64), atol=1e-6)
    assert torch.allclose(x[0, :, 16:48], inside.view(3, 1, 1).expand(3, 32, 64), atol=1e-6)


def test_a_frame_of_the_input_size_passes_through_unscaled():
    frame = _frames([(32, 64)])[0]
    x, (box,) = preprocess_reference([frame], PreprocessSpec(size=(32, 64), input_order="rgb"))
    assert box.scale == 1 and box.pad == (0, 0)
    assert torch.allclose(x[0], torch.from_numpy(frame).permute(2, 0, 1).float() / 255, atol=1e-7)


# ------------------------------------------------------------------------------------------------ geometry
def test_letterbox_params_of_a_1080p_frame():
    box = letterbox_params(1080, 1920, (640, 640))
    assert box.resized == (360, 640) and box.pad == (140, 0) and box.scale == pytest.approx(1 / 3)
    assert letterbox_params(1080, 1920, (640, 640), center=False).pad == (0, 0)
    assert letterbox_params(1, 5000, (64, 64)).resized == (1, 64)  # never below one pixel


@pytest.mark.parametrize("frame", [(1080, 1920), (481, 271), (37, 53)])
def test_boxes_round_trip_through_the_input(frame):
    box = letterbox_params(*frame, (640, 640))
    h, w = frame
    boxes = np.array([[0, 0, w, h], [w * 0.25, h * 0.1, w * 0.5, h * 0.9]], dtype=np.float64)
    assert np.allclose(box.to_frame(box.to_input(boxes)), boxes, atol=1e-9)
    as_tensor = box.to_frame(box.to_input(torch.tensor(boxes, dtype=torch.float32)))
    assert isinstance(as_tensor, torch.Tensor) and torch.allclose(as_tensor, torch.tensor(boxes).float(), atol=1e-3)
    # the full frame maps onto the resized region of the input, exactly
    (rh, rw), (top, left) = box.resized, box.pad
    assert np.allclose(box.to_input(np.array([0, 0, w, h])), [left, top, left + rw, top + rh])


def test_to_frame_clips_to_the_frame_and_keeps_empty_batches():
    box = letterbox_params(1080, 1920, (640, 640))
    out = box.to_frame(torch.tensor([[-10.0, 0.0, 700.0, 640.0]]))
    assert out.tolist() == [[0.0, 0.0, 1920.0, 1080.0]]
    assert box.to_frame(torch.zeros((0, 4))).shape == (0, 4)
    assert box.to_frame(np.array([[3, 150, 6, 160]])).dtype == np.float32  # integer boxes come back as float
    with pytest.raises(KernelError, match=r"…×4.*\(5,\)"):
        box.to_frame(np.zeros(5))
    assert Letterbox.from_dict(json.loads(json.dumps(box.to_dict()))) == box


@pytest.mark.parametrize(("size", "target"), [((300, 500), (320, 320)), ((97, 61), (64, 96)), ((1, 1), (32, 32))])
def test_the_calibration_letterbox_has_the_same_geometry(size, target):
    from PIL import Image

    from trt_prune.quantize.calibrate import letterbox

    h, w = size
    image = Image.new("RGB", (w, h), (200, 10, 60))
    got = letterbox(image, *target)
    box = letterbox_params(h, w, target)
    (rh, rw), (top, left) = box.resized, box.pad
    assert got.shape == (*target, 3) and got.dtype == np.uint8
    inside = np.zeros(target, dtype=bool)
    inside[top:top + rh, left:left + rw] = True
    assert (got[inside] == [200, 10, 60]).all() and (got[~inside] == 114).all()


def test_the_calibration_letterbox_is_close_to_the_reference_pixels():
    from PIL import Image

    from trt_prune.quantize.calibrate import letterbox

    yy, xx = np.mgrid[0:300, 0:500]  # smooth content: PIL's anti-aliased shrink and torch's bilinear agree there
    rgb = np.stack([xx * 255 / 499, yy * 255 / 299, 128 + 60 * np.sin(xx / 40) * np.cos(yy / 30)], -1)
    rgb = rgb.round().astype(np.uint8)
    pil = letterbox(Image.fromarray(rgb), 192, 192).astype(np.float32)
    x, _ = preprocess_reference([rgb], PreprocessSpec(size=(192, 192), input_order="rgb"))
    ref = x[0].permute(1, 2, 0).numpy() * 255
    diff = np.abs(pil - ref)
    assert diff.mean() < 0.5 and diff.max() < 3, (diff.mean(), diff.max())


# ------------------------------------------------------------------------------------------------ the spec
def test_the_spec_round_trips_through_json():
    spec = PreprocessSpec(size=(384, 640), pad_value=0, input_order="RGB", dtype="fp16", center=False, **IMAGENET)
    back = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert back == spec and back.input_order == "rgb" and back.size == (384, 640)
    assert PreprocessSpec(size=640).size == (640, 640)
    with pytest.raises(KernelError, match="unknown pre-processing spec keys.*'scale'"):
        PreprocessSpec.from_dict({**spec.to_dict(), "scale": 2})
    with pytest.raises(KernelError, match="version 99 is newer"):
        PreprocessSpec.from_dict({**spec.to_dict(), "version": 99})


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(("frame", "match"), [
    (np.zeros((8, 8, 3), dtype=np.float32), r"frame 0 is float32, shape \(8, 8, 3\); .*uint8"),
    (np.zeros((0, 640, 3), dtype=np.uint8), r"frame 0 is empty \(shape \(0, 640, 3\)\)"),
    (np.zeros((8, 8, 4), dtype=np.uint8), r"frame 0 has 4 channels .*frame\[\.\.\., :3\]"),
    (np.zeros((8, 8), dtype=np.uint8), r"frame 0 has shape \(8, 8\); a frame is H×W×3"),
])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_bad_frames_are_one_clear_error(interpret, frame, match, impl):
    with pytest.raises(KernelError, match=match):
        preprocess([frame], PreprocessSpec(size=(64, 64)), impl=impl)


def test_a_bad_frame_is_named_by_its_index():
    frames = [np.zeros((8, 8, 3), np.uint8), torch.zeros((8, 8, 3), dtype=torch.int16)]
    with pytest.raises(KernelError, match=r"frame 1 is int16"):
        preprocess_reference(frames, PreprocessSpec(size=(64, 64)))
    with pytest.raises(KernelError, match="no frames"):
        preprocess([], PreprocessSpec(size=(64, 64)))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"size": (650, 640)}, r"target size \(650, 640\) .* not a multiple of the model stride 32; use \(672, 640\) "
                           r"or \(640, 640\)"),
    ({"size": (100, 100), "stride": 64}, r"stride 64; use \(128, 128\) or \(64, 64\)"),
    ({"input_order": "bgra"}, r"input_order 'bgra' is not one of \('bgr', 'rgb'\)"),
    ({"std": (1, 0, 1)}, r"std must be positive, got \(1.0, 0.0, 1.0\)"),
    ({"mean": (0.5, 0.5)}, r"mean must be three finite numbers"),
    ({"dtype": "bf16"}, r"dtype 'bf16' is not one of \('fp32', 'fp16'\)"),
    ({"pad_value": 300}, r"pad_value .* \[0, 255\].* got 300"),
])
def test_bad_specs_are_one_clear_error(kwargs, match):
    with pytest.raises(KernelError, match=match):
        PreprocessSpec(**kwargs)


def test_unknown_impls_and_triton_without_a_gpu_are_clear_errors(monkeypatch):
    frames = _frames([(8, 8)])
    with pytest.raises(KernelError, match=r"unknown pre-processing impl 'cuda'; choose one of \('auto'"):
        preprocess(frames, PreprocessSpec(size=(32, 32)), impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_available("cpu")[0]
    with pytest.raises(KernelError, match="impl='triton' cannot run: .*frames are on cpu .*TRITON_INTERPRET=1"):
        preprocess(frames, PreprocessSpec(size=(32, 32)), impl="triton")


def test_importing_the_module_does_not_import_triton():
    code = "import sys, trt_prune.kernels.preprocess; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
