"""Detector pre-processing speed: a 1920×1080 BGR uint8 frame → a 640×640 fp32 RGB NCHW input (letterbox,
bilinear, pad 114, x/255), per frame.

On the CPU: the torch reference (:func:`trt_prune.kernels.preprocess.preprocess_reference`, the definition),
a plain numpy implementation of the same transform, and OpenCV (``cv2.resize`` INTER_LINEAR + ``copyMakeBorder``
+ ``cvtColor`` + normalise; its fixed-point uint8 bilinear differs slightly, the last column says by how much).
Each row is the median over ``--frames`` distinct frames × ``--repeats`` runs, on ``--threads`` threads (torch and
OpenCV both; 1 by default: one camera stream per core, and comparable rows).

On a CUDA GPU, in addition: the Triton kernel (one launch per batch) against the same torch ops on the GPU, for
one 1920×1080 frame and for a batch of 8 frames of mixed sizes, frames already on the GPU as uint8, each call
closed by ``torch.cuda.synchronize``; the first (compiling) calls are left out.

Usage:
    python bench/preprocess_speed.py [--frames 8] [--repeats 20] [--size 640] [--frame 1080x1920] [--threads 1]
                                     [--json bench/results/preprocess_speed.json]
Writes the rows as JSON and the table beside it (``.md``), stamped with commit, date and machine by
``trt_prune.provenance.write_result``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from _common import RESULTS, save, stamp

from trt_prune.kernels.preprocess import PreprocessSpec, preprocess, preprocess_reference, triton_available

MIXED = [(1080, 1920), (720, 1280), (480, 640), (1080, 1920), (600, 800), (1536, 2048), (375, 500), (1080, 1440)]


# ------------------------------------------------------------------------------------------------ the CPU paths
def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's align_corners=False bilinear taps along one axis: near index, far index, far weight."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    near = np.minimum(src.astype(np.int64), n_in - 1)
    weight = np.clip(src - near, 0, 1).astype(np.float32)
    return near, np.minimum(near + 1, n_in - 1), weight


def numpy_preprocess(frame: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The transform of one H×W×3 uint8 frame in numpy (index arithmetic, rows then columns): 3×H×W."""
    box = spec.letterbox(*frame.shape[:2])
    (rh, rw), (top, left) = box.resized, box.pad
    H, W = spec.size
    y0, y1, wy = _taps(frame.shape[0], rh)
    x0, x1, wx = _taps(frame.shape[1], rw)
    src = frame[..., ::-1] if spec.input_order == "bgr" else frame
    a, b = src[y0].astype(np.float32), src[y1].astype(np.float32)
    rows = a * (1 - wy)[:, None, None] + b * wy[:, None, None]
    img = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
    canvas = np.full((3, H, W), spec.pad_value, dtype=np.float32)
    canvas[:, top:top + rh, left:left + rw] = img.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return ((canvas / np.float32(255) - mean) / std).astype(np.float16 if spec.dtype == "fp16" else np.float32)


def opencv_preprocess(cv2, frame: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The same transform the usual OpenCV way: resize, border, colour conversion, normalise, HWC → CHW."""
    box = spec.letterbox(*frame.shape[:2])
    (rh, rw), (top, left) = box.resized, box.pad
    H, W = spec.size
    img = cv2.resize(frame, (rw, rh), interpolation=cv2.INTER_LINEAR)
    img = cv2.copyMakeBorder(img, top, H - rh - top, left, W - rw - left, cv2.BORDER_CONSTANT,
                             value=(spec.pad_value,) * 3)
    if spec.input_order == "bgr":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    mean, std = np.asarray(spec.mean, dtype=np.float32), np.asarray(spec.std, dtype=np.float32)
    x = (img.astype(np.float32) / np.float32(255) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float16 if spec.dtype == "fp16" else np.float32)


def _opencv():
    """``(cv2, version)``, or ``(None, why not)``."""
    try:
        import cv2
    except ImportError as exc:
        return None, f"OpenCV is not installed ({exc}): pip install opencv-python-headless (in the dev extra)"
    return cv2, cv2.__version__


# ------------------------------------------------------------------------------------------------ timing
def _stats(samples_ms: list[float], frames_per_call: int) -> dict:
    arr = np.asarray(samples_ms, dtype=np.float64)
    return {"calls": len(arr), "frames_per_call": frames_per_call,
            "ms_per_call_p50": float(np.median(arr)), "ms_per_call_p90": float(np.percentile(arr, 90)),
            "ms_per_frame_p50": float(np.median(arr)) / frames_per_call}


def _time_cpu(fn, frames: list[np.ndarray], repeats: int) -> list[float]:
    fn(frames[0])  # warm-up: allocator, thread pools
    samples = []
    for _ in range(repeats):
        for frame in frames:
            t0 = time.perf_counter()
            fn(frame)
            samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _time_cuda(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):  # the first Triton call compiles
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def _max_diff(got, want: torch.Tensor) -> float:
    got = torch.as_tensor(np.asarray(got)) if not isinstance(got, torch.Tensor) else got.cpu()
    return float((got.float() - want.float()).abs().max())


def _frames(sizes: list[tuple[int, int]], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def run_cpu(frames: list[np.ndarray], spec: PreprocessSpec, repeats: int) -> tuple[list[dict], list[str]]:
    references = [preprocess_reference([f], spec)[0][0] for f in frames]
    paths = {"torch reference": lambda f: preprocess_reference([f], spec),
             "numpy": lambda f: numpy_preprocess(f, spec)}
    notes = []
    cv2, cv2_version = _opencv()
    if cv2 is None:
        notes.append(f"OpenCV row skipped: {cv2_version}")
    else:
        paths[f"OpenCV {cv2_version}"] = lambda f: opencv_preprocess(cv2, f, spec)
    rows = []
    for name, fn in paths.items():
        print(f"cpu: {name} …", file=sys.stderr, flush=True)
        diff = max(_max_diff(fn(f) if name != "torch reference" else fn(f)[0][0], ref)
                   for f, ref in zip(frames, references, strict=True))
        rows.append({"path": name, "device": "cpu", "batch": "1 frame", **_stats(_time_cpu(fn, frames, repeats), 1),
                     "max_abs_diff_vs_reference": diff})
    return rows, notes


def run_cuda(frame_hw: tuple[int, int], spec: PreprocessSpec, repeats: int) -> list[dict]:
    rows = []
    for label, sizes in ((f"1 frame {frame_hw[1]}×{frame_hw[0]}", [frame_hw]), ("8 frames, mixed sizes", MIXED)):
        host = _frames(sizes, seed=1)
        on_gpu = [torch.from_numpy(f).cuda() for f in host]
        reference, _ = preprocess_reference(host, spec)  # on the CPU: the definition
        for name, impl in (("triton", "triton"), ("torch ops", "torch")):
            print(f"cuda: {name}, {label} …", file=sys.stderr, flush=True)
            out, _ = preprocess(on_gpu, spec, impl=impl)
            samples = _time_cuda(lambda impl=impl, x=on_gpu: preprocess(x, spec, impl=impl), repeats)
            rows.append({"path": name, "device": torch.cuda.get_device_name(), "batch": label,
                         **_stats(samples, len(sizes)), "max_abs_diff_vs_reference": _max_diff(out, reference)})
    return rows


def _parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--frame takes HxW (e.g. 1080x1920), got {text!r}") from None
    return h, w


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8, help="distinct frames timed on the CPU")
    parser.add_argument("--repeats", type=int, default=20, help="runs of each frame (CPU), of each call (GPU)")
    parser.add_argument("--size", type=int, default=640, help="model input side (square; a multiple of 32)")
    parser.add_argument("--frame", type=_parse_hw, default=(1080, 1920), help="frame size HxW")
    parser.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads on the CPU")
    parser.add_argument("--json", default=str(RESULTS / "preprocess_speed.json"),
                        help="result file; its Markdown table goes beside it (.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2, _ = _opencv()
    if cv2 is not None:
        cv2.setNumThreads(args.threads)
    spec = PreprocessSpec(size=(args.size, args.size), input_order="bgr")
    rows, notes = run_cpu(_frames([args.frame] * args.frames, seed=0), spec, args.repeats)
    usable, why = triton_available("cuda")
    if usable:
        rows += run_cuda(args.frame, spec, args.repeats)
    else:
        notes.append(f"GPU rows skipped: {why}")
    result = {"provenance": stamp(), "torch": torch.__version__, "triton": _version("triton"),
              "opencv": _version("cv2"), "numpy": np.__version__, "frame_hw": list(args.frame),
              "spec": spec.to_dict(), "frames": args.frames, "repeats": args.repeats, "threads": args.threads,
              "rows": rows, "notes": notes}
    save(args.json, result, _markdown(result))
    print(_markdown(result))
    return result


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _markdown(r: dict) -> str:
    h, w = r["frame_hw"]
    size = r["spec"]["size"]
    lines = [
        "# Detector pre-processing speed\n",
        f"{w}×{h} BGR uint8 frames → {size[1]}×{size[0]} RGB NCHW {r['spec']['dtype']} (letterbox, bilinear, pad "
        f"{r['spec']['pad_value']:g}, x/255). CPU rows: median over {r['frames']} frames × {r['repeats']} runs on "
        f"{r['threads']} thread(s). GPU rows: frames already on the GPU, each call closed by "
        f"torch.cuda.synchronize, {r['repeats']} calls after 3 warm-up calls. Last column: max |Δ| against the torch "
        f"reference on the CPU (the definition). torch {r['torch']}, Triton {r['triton']}, OpenCV "
        f"{r['opencv'] or 'not installed'}, numpy {r['numpy']}. Rerun: `python bench/preprocess_speed.py`.\n",
        "| path | device | batch | ms/frame p50 | ms/call p50 | ms/call p90 | max abs Δ vs reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['path']} | {row['device']} | {row['batch']} | {row['ms_per_frame_p50']:.3f} | "
                     f"{row['ms_per_call_p50']:.3f} | {row['ms_per_call_p90']:.3f} | "
                     f"{row['max_abs_diff_vs_reference']:.2e} |")
    if r["notes"]:
        lines += ["", *(f"- {note}" for note in r["notes"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
