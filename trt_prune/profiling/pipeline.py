"""What a user sees per camera frame: pre-processing + model + decode/NMS, each part timed, on the torch backend.

An engine's latency is not the frame's latency. Between the camera and the boxes a deployment also letterboxes
and normalises the frames (:mod:`trt_prune.kernels.preprocess`: one Triton launch per batch on a GPU, its torch
reference on the CPU), and after the network it decodes the boxes, runs NMS and maps the boxes back to frame
coordinates. :func:`time_pipeline` times the three parts back to back on a built torch session, each part
closed by a device synchronisation so its time is its own (the parts of one frame run in sequence anyway), and
reports per-part and total statistics per batch and per frame.

Frames enter as host uint8 HWC arrays, as a camera hands them over: the upload to the device is part of
pre-processing. Decode/NMS is the demo detector's own (:func:`trt_prune.detection.decode.postprocess`) for
``builtin:demo-detector`` and the folders pruned from it; for other models the third part is left out and the
result says so.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from trt_prune.errors import ProfileError

PARTS = ("preprocess", "model", "postprocess")


def builtin_frames(count: int = 8, size: tuple[int, int] = (1080, 1920), seed: int = 0) -> list[np.ndarray]:
    """``count`` road scenes rendered at a camera's ``size`` (H, W) as uint8 BGR HWC frames (what OpenCV and most
    camera drivers hand over)."""
    from trt_prune.data.roads import SPLITS, render_scene

    if count < 1:
        raise ProfileError(f"the number of frames must be positive, got {count}")
    frames = []
    for i in range(count):  # the validation scenes' generator, at any frame size (RoadScenes wants multiples of 32)
        rgb, _boxes, _labels = render_scene(np.random.default_rng((seed, SPLITS["val"], i)), *size)
        frames.append(np.ascontiguousarray(rgb[..., ::-1]))
    return frames


def folder_frames(folder, count: int = 8) -> list[np.ndarray]:
    """Up to ``count`` images of ``folder`` (sorted by name) as uint8 BGR HWC frames."""
    from pathlib import Path

    from PIL import Image

    from trt_prune.quantize.calibrate import IMAGE_SUFFIXES

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ProfileError(f"--frames {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); give "
                           "a folder of camera frames, or 'builtin' for rendered road scenes")
    frames = []
    for path in files[:count]:
        try:
            with Image.open(path) as image:
                frames.append(np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1]))
        except OSError as exc:
            raise ProfileError(f"--frames: {path} is not a readable image ({exc}); remove it or convert it") from exc
    return frames


def default_spec(model, input_hw: tuple[int, int]):
    """The pre-processing ``model`` was trained with at ``input_hw``, or None where this tool does not know it.

    ``builtin:demo-detector`` (and folders pruned from it): letterbox with pad 114, RGB scaled to [0, 1], no
    mean/std, stride 32; the frames are taken as BGR, as cameras and OpenCV hand them over (``input_order`` is a
    property of the frames, not of the model). :func:`trt_prune.stages.export` stores it in the ONNX file's
    provenance, so the deployment reads the transform the export assumed instead of guessing it.
    """
    from trt_prune.kernels.preprocess import PreprocessSpec
    from trt_prune.models.demo_detector import DemoDetector

    if not isinstance(model, DemoDetector):
        return None
    return PreprocessSpec(size=tuple(int(v) for v in input_hw), stride=int(max(model.strides)))


def exported_spec(onnx_path):
    """The pre-processing stored by :func:`trt_prune.stages.export` in an ONNX file's provenance (the latest
    step that has one), or None for a file without it."""
    from trt_prune.artifacts import OnnxArtifact
    from trt_prune.kernels.preprocess import PreprocessSpec

    found = [s["preprocess"] for s in OnnxArtifact.read(onnx_path).steps if isinstance(s.get("preprocess"), dict)]
    return PreprocessSpec.from_dict(found[-1]) if found else None


def _decoder(model, input_hw: tuple[int, int], score_threshold: float, iou_threshold: float):
    """The model's decode + NMS as ``raw -> per-image detections``, or None when this tool has none for it."""
    from trt_prune.models.demo_detector import DemoDetector

    if not isinstance(model, DemoDetector):
        return None
    from trt_prune.detection.decode import postprocess

    strides = tuple(model.strides)

    def run(raw):
        return postprocess(raw, input_hw, score_threshold=score_threshold, iou_threshold=iou_threshold,
                           strides=strides)

    return run


def _summary(samples: Sequence[float], frames: int) -> dict[str, float]:
    arr = np.asarray(samples, dtype=np.float64)
    return {"p50_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90)), "mean_ms": float(arr.mean()),
            "p50_ms_per_frame": float(np.median(arr)) / frames}


def time_pipeline(session, frames: Sequence[np.ndarray], spec=None, *, iterations: int = 50, warmup_s: float = 0.5,
                  impl: str = "auto", score_threshold: float = 0.25, iou_threshold: float = 0.6) -> dict[str, Any]:
    """Time pre-processing, the model and decode/NMS for one batch of ``frames`` on a torch ``session``.

    ``spec`` (a :class:`~trt_prune.kernels.preprocess.PreprocessSpec`) defaults to the model's own
    (:func:`default_spec`), else a letterbox to the session's input with BGR frames and 1/255 scaling.
    ``impl`` picks the pre-processing path (``auto``: the Triton kernel on CUDA, the torch reference on the
    CPU). Returns the per-part statistics (``parts``), the total, frames per second and what ran
    (``preprocess_impl``, ``device``).
    """
    import torch

    from trt_prune.kernels.preprocess import PreprocessSpec, preprocess

    model = getattr(session, "model", None)
    if model is None or not hasattr(session, "device"):
        raise ProfileError("the pre-processing + model + decode/NMS timing runs on the torch backend "
                           "(--backend torch); this session is not a torch session")
    if getattr(session, "cuda_graph", False):
        raise ProfileError("the pipeline timing runs the model eagerly; drop --cuda-graph for --e2e")
    if not frames:
        raise ProfileError("no frames to time: give at least one")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ProfileError(f"iterations must be a positive integer, got {iterations!r}")
    shape = session.inputs[0].shape
    input_hw = (int(shape[2]), int(shape[3]))
    if spec is None:
        spec = default_spec(model, input_hw) or PreprocessSpec(size=input_hw, stride=1)
    if tuple(spec.size) != input_hw:
        raise ProfileError(f"the pre-processing writes {tuple(spec.size)} but the model takes {input_hw}; give a "
                           "spec of the model's input size")
    device = torch.device(session.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if session.fp16 else torch.float32
    decode = _decoder(model, input_hw, score_threshold, iou_threshold)
    path = impl if impl != "auto" else ("triton" if cuda else "torch")

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def once(record: dict[str, list[float]] | None):
        t0 = time.perf_counter()
        on_device = [torch.from_numpy(f).to(device, non_blocking=False) for f in frames]  # the camera's upload
        x, boxes = preprocess(on_device, spec, impl=path)
        x = x.to(dtype)
        if session.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        sync()
        t1 = time.perf_counter()
        with torch.inference_mode():
            raw = model(x)
        sync()
        t2 = time.perf_counter()
        if decode is not None:
            with torch.inference_mode():
                detections = decode(raw.float())
                for det, letterbox in zip(detections, boxes, strict=True):
                    det["boxes"] = letterbox.to_frame(det["boxes"])
            sync()
        t3 = time.perf_counter()
        if record is not None:
            record["preprocess"].append((t1 - t0) * 1e3)
            record["model"].append((t2 - t1) * 1e3)
            if decode is not None:
                record["postprocess"].append((t3 - t2) * 1e3)
            record["total"].append((t3 - t0) * 1e3)

    end = time.perf_counter() + max(0.0, float(warmup_s))
    once(None)
    while time.perf_counter() < end:
        once(None)
    record: dict[str, list[float]] = {k: [] for k in (*PARTS, "total")}
    for _ in range(iterations):
        once(record)
    n = len(frames)
    parts = {k: _summary(v, n) for k, v in record.items() if v and k != "total"}
    total = _summary(record["total"], n)
    sizes = sorted({f"{f.shape[1]}x{f.shape[0]}" for f in frames})
    notes = [] if decode is not None else [f"{type(model).__name__} has no decoder here: decode/NMS not timed "
                                           "(it has one for builtin:demo-detector and folders pruned from it)"]
    return {"frames": n, "frame_sizes": sizes, "input_hw": list(input_hw), "device": str(device),
            "precision": "fp16" if session.fp16 else "fp32", "preprocess_impl": path, "spec": spec.to_dict(),
            "iterations": iterations, "parts": parts, "total": total,
            "frames_per_s": n / (total["p50_ms"] / 1e3), "notes": notes}
