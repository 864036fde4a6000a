"""Calibration for INT8: the data, the activation ranges, and the cache that spares a rebuild the work.

Data (:func:`calibration_set`): a folder of images (letterboxed to the model's input the way detectors are
exported: aspect kept, grey padding 114, RGB scaled to [0, 1], then ``(x - mean) / std``), a ``.npy`` (N×C×H×W,
or C×H×W for one sample), a ``.npz`` (one such array, or one per model input by name), or ``builtin``: the
road scenes of :class:`trt_prune.data.RoadScenes` (training split, so calibration never sees the validation
scenes a benchmark scores on).

Ranges (:func:`collect_ranges`): every tensor a Q/DQ pair will quantize is made a graph output of a copy of the
model, ONNX Runtime runs the samples, and each tensor's ``amax`` (its scale is ``amax / 127``) is computed by
the chosen method: ``minmax`` (the largest |value| seen), ``entropy`` (TensorRT's default: the threshold whose
128-level histogram loses the least information, KL divergence) or ``percentile`` (99.99th percentile of
|value|). The histogram methods are ONNX Runtime's ``HistogramCollector`` (the same code its
``quantize_static`` uses), fed one batch at a time so memory stays flat; only the choice of tensors and the
data loading are ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from trt_prune.errors import QuantizeError

METHODS = ("entropy", "minmax", "percentile")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
CACHE_FORMAT = "trt_prune.int8_calibration"
CACHE_VERSION = 1
# entropy: 2048 histogram bins over [-t, t] (1024 a side) searched for the best 128-level quantization a side,
# as TensorRT's entropy calibrator does; ORT's defaults (128 bins) would leave nothing to search
ENTROPY_BINS, ENTROPY_QUANT_BINS = 2048, 256
PERCENTILE, PERCENTILE_BINS = 99.99, 2048
PAD_VALUE = 114


@dataclass
class CalibrationSet:
    """Samples for one model input: ``batches()`` yields ``{input name: float32 N×C×H×W}``."""

    source: str
    fingerprint: str
    input_name: str
    count: int
    _load: Callable[[int, int], np.ndarray]
    batch: int = 8
    fixed: bool = False  # the model takes exactly ``batch`` samples a run: a last partial batch is left out

    def __post_init__(self):
        if self.fixed:
            self.count -= self.count % self.batch
            if self.count == 0:
                raise QuantizeError(f"the model's batch is fixed at {self.batch}; {self.source} has fewer samples")

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.count, self.batch):
            yield {self.input_name: self._load(start, min(self.count, start + self.batch))}


def letterbox(image, height: int, width: int) -> np.ndarray:
    """``image`` (PIL) resized into ``height × width`` with its aspect kept and grey (114) padding centred, as
    HWC uint8 RGB (the grey-input path of calibration). The geometry (resized size, padding) is the deployment's
    own, :func:`trt_prune.kernels.preprocess.letterbox_params`; the pixels are PIL's bilinear resize, which
    anti-aliases when it shrinks. Three-channel calibration images go through the kernel's torch reference
    instead, the deployed transform itself."""
    from PIL import Image

    from trt_prune.kernels.preprocess import letterbox_params

    image = image.convert("RGB")
    box = letterbox_params(image.height, image.width, (height, width))
    (h, w), (top, left) = box.resized, box.pad
    canvas = Image.new("RGB", (width, height), (PAD_VALUE,) * 3)
    canvas.paste(image.resize((w, h), Image.BILINEAR), (left, top))
    return np.asarray(canvas)


def _model_input(model: onnx.ModelProto) -> tuple[str, tuple[int, int, int], int | None]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise QuantizeError(f"calibration feeds models with one input; this one has {len(inputs)} "
                            f"({[v.name for v in inputs]}); pass a .npz with one array per input name")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        raise QuantizeError(f"input {inputs[0].name!r} has shape {dims}; calibration needs N×C×H×W with fixed C, H "
                            "and W (export at the deployment size)")
    return inputs[0].name, (int(dims[1]), int(dims[2]), int(dims[3])), dims[0] or None


def calibration_set(spec: str | os.PathLike | np.ndarray, model: onnx.ModelProto, *, limit: int = 256,
                    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), batch: int = 8) -> CalibrationSet:
    """The calibration samples ``spec`` names for ``model``'s input (see the module doc), at most ``limit``.
    An empty set, or samples whose shape does not match the input, is one :class:`QuantizeError`."""
    name, (c, h, w), fixed_batch = _model_input(model)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise QuantizeError(f"the calibration size must be a positive number of samples, got {limit!r}")
    if fixed_batch is not None:  # the model takes exactly this many samples a run
        batch = fixed_batch
        if limit < batch:
            raise QuantizeError(f"the model's batch is fixed at {batch}; calibrate on at least {batch} samples")
        limit -= limit % batch
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    if (s <= 0).any():
        raise QuantizeError(f"std must be positive, got {list(np.ravel(s))}")
    if isinstance(spec, np.ndarray):
        return _array_set(spec, "array", _digest(spec), name, (c, h, w), limit, batch, fixed_batch is not None)
    text = str(spec)
    if text == "builtin":
        from trt_prune.data import RoadScenes

        if c != 3 or h % 32 or w % 32:
            raise QuantizeError(f"--calib builtin draws 3×H×W road scenes (H, W multiples of 32); the model takes "
                                f"{c}×{h}×{w}: give a folder of images or a .npy instead")
        scenes = RoadScenes("train", length=limit, size=(h, w))

        def load_scenes(i: int, j: int) -> np.ndarray:
            return np.stack([((scenes[k][0].numpy() - m) / s) for k in range(i, j)]).astype(np.float32)

        return CalibrationSet(f"builtin road scenes (train, {h}×{w})", f"builtin:roadscenes:train:{h}x{w}:{limit}",
                              name, limit, load_scenes, batch, fixed_batch is not None)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise QuantizeError(f"calibration folder {text!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                                "point --calib at the images the model will see")
        files = files[:limit]
        if c not in (1, 3):
            raise QuantizeError(f"the model's input has {c} channels; images give 1 or 3: pass a .npy instead")
        stamp = hashlib.sha256("\n".join(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                         for p in files).encode()).hexdigest()[:16]

        def load_images(i: int, j: int) -> np.ndarray:
            from PIL import Image, UnidentifiedImageError

            from trt_prune.kernels.preprocess import PreprocessSpec, preprocess_reference

            # 3-channel inputs get exactly the deployed transform (the kernel's torch reference: letterbox,
            # bilinear without anti-aliasing, pad 114, /255, mean/std); grey inputs the PIL letterbox, averaged
            spec = PreprocessSpec(size=(h, w), stride=1, input_order="rgb",
                                  mean=tuple(np.broadcast_to(m.ravel(), (3,)).tolist()),
                                  std=tuple(np.broadcast_to(s.ravel(), (3,)).tolist())) if c == 3 else None
            out = []
            for p in files[i:j]:
                try:
                    with Image.open(p) as im:
                        if spec is not None:
                            rgb = np.asarray(im.convert("RGB"))
                        else:
                            grey = letterbox(im, h, w).astype(np.float32).mean(2, keepdims=True) / 255.0
                except (OSError, UnidentifiedImageError) as exc:
                    raise QuantizeError(f"calibration image {str(p)!r} cannot be read ({exc}); remove it or "
                                        "replace it") from exc
                if spec is not None:
                    out.append(preprocess_reference([rgb], spec)[0][0].numpy())
                else:
                    out.append((grey.transpose(2, 0, 1) - m[:1]) / s[:1])
            return np.stack(out).astype(np.float32)

        return CalibrationSet(f"{len(files)} images in {text}", f"images:{stamp}:{len(files)}:{h}x{w}", name,
                              len(files), load_images, batch, fixed_batch is not None)
    if not path.is_file():
        raise QuantizeError(f"calibration data {text!r} does not exist; give a folder of images, a .npy/.npz, or "
                            "'builtin' (the demo detector's road scenes)")
    if path.suffix.lower() not in (".npy", ".npz"):
        raise QuantizeError(f"calibration data {text!r} is not a folder, .npy or .npz")
    try:
        loaded = np.load(path, allow_pickle=False)  # never a pickle from a data file
    except (OSError, ValueError) as exc:
        raise QuantizeError(f"calibration data {text!r} cannot be read as {path.suffix} ({exc}); it may hold "
                            "pickled objects, which are never loaded: save plain arrays with np.save") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            key = name if name in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise QuantizeError(f"{text!r} holds arrays {keys}; name one {name!r} (the model's input) or keep one")
            loaded = loaded[key]
    return _array_set(loaded, text, hashlib.sha256(path.read_bytes()).hexdigest()[:16], name, (c, h, w), limit,
                      batch, fixed_batch is not None)


def _array_set(array: np.ndarray, source: str, digest: str, name: str, chw, limit: int, batch: int,
               fixed: bool) -> CalibrationSet:
    a = np.asarray(array)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or tuple(a.shape[1:]) != tuple(chw):
        raise QuantizeError(f"calibration data {source!r} has shape {list(np.shape(array))}; the model's input "
                            f"{name!r} takes N×{chw[0]}×{chw[1]}×{chw[2]}")
    if a.shape[0] == 0:
        raise QuantizeError(f"calibration data {source!r} is empty (0 samples)")
    if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
        raise QuantizeError(f"calibration data {source!r} must be finite floats, got {a.dtype}"
                            f"{'' if not np.issubdtype(a.dtype, np.floating) else ' with NaN/inf'}")
    a = a[:limit].astype(np.float32)
    return CalibrationSet(f"{len(a)} samples from {source}", f"array:{digest}:{len(a)}", name, len(a),
                          lambda i, j: a[i:j], batch, fixed)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def model_digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ ranges
def collect_ranges(model: onnx.ModelProto, tensors: list[str], data: CalibrationSet, method: str,
                   on_progress: Callable[[int, int], None] | None = None, threads: int = 0) -> dict[str, float]:
    """``amax`` of each of ``tensors`` over ``data``, by ``method`` (see the module doc)."""
    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import HistogramCollector

    if method not in METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {v.name for v in probe.graph.output}
    for t in tensors:
        if t not in known:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise QuantizeError(f"ONNX Runtime cannot run the model for calibration ({' '.join(str(exc).split())[:300]})"
                            "; check it with trt-prune clean first") from exc
    if method == "entropy":
        collector = HistogramCollector("entropy", True, ENTROPY_BINS, ENTROPY_QUANT_BINS, None, None)
    elif method == "percentile":
        collector = HistogramCollector("percentile", True, PERCENTILE_BINS, None, PERCENTILE, None)
    amax = dict.fromkeys(tensors, 0.0)
    done = 0
    for feeds in data.batches():
        try:
            values = session.run(tensors, feeds)
        except Exception as exc:
            raise QuantizeError(f"calibration batch {done}..{done + len(next(iter(feeds.values())))} failed in ONNX "
                                f"Runtime ({' '.join(str(exc).split())[:300]})") from exc
        for t, v in zip(tensors, values, strict=True):
            if v.size:
                amax[t] = max(amax[t], float(np.abs(v).max()))
        if method != "minmax":
            with contextlib.redirect_stdout(io.StringIO()):  # the collector prints a line per call
                collector.collect({t: v.astype(np.float32) for t, v in zip(tensors, values, strict=True)})
        done += len(next(iter(feeds.values())))
        if on_progress:
            on_progress(done, data.count)
    if method == "minmax":
        return amax
    with contextlib.redirect_stdout(io.StringIO()):
        result = collector.compute_collection_result()
    out = {}
    for t in tensors:
        lo, hi = (float(np.asarray(x)) for x in result[t][:2])
        out[t] = min(max(abs(lo), abs(hi)), amax[t]) if amax[t] > 0 else 0.0
    return out


# ------------------------------------------------------------------------------------------------ cache
def read_cache(path: Path, key: dict) -> dict[str, float] | None:
    """The ranges stored at ``path`` when they were computed for ``key`` (model, data, method), else None."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise QuantizeError(f"calibration cache {str(path)!r} is not readable JSON ({exc}); delete it to "
                            "recalibrate") from exc
    if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT or not isinstance(doc.get("ranges"), dict):
        raise QuantizeError(f"{str(path)!r} is not a trt_prune INT8 calibration cache; give another --calib-cache "
                            "path or delete the file")
    if doc.get("key") != key:
        return None
    return {str(k): float(v) for k, v in doc["ranges"].items()}


def write_cache(path: Path, key: dict, ranges: dict[str, float]) -> None:
    from trt_prune.artifacts import write_json

    write_json(path, {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "ranges": ranges})
