"""Detector pre-processing: uint8 camera frames in, the model's normalised NCHW input out, in one definition.

The transform, per frame (H×W×3 uint8, BGR or RGB, any size; a batch may mix sizes):

1. **Letterbox geometry** (:func:`letterbox_params`): the frame is scaled by ``min(H/h, W/w)`` into the model's
   ``H×W`` input, aspect kept; the resized size is ``max(1, round(h·scale)) × max(1, round(w·scale))`` and the
   padding is centred, ``top = (H - rh) // 2``, ``left = (W - rw) // 2`` (or 0, 0 with ``center=False``).
   The returned :class:`Letterbox` maps detections back to frame coordinates (:meth:`Letterbox.to_frame`).
2. **Bilinear resize** exactly as ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` with
   an explicit output size: source coordinate ``(dst + 0.5)·(in/out) - 0.5``, clamped at 0, the far neighbour
   clamped to the last row/column. No anti-aliasing and no rounding back to uint8.
3. **Pad** the rest of the input with ``pad_value`` (114, YOLO's grey).
4. **Channel order**: the output is always RGB; BGR frames (OpenCV, most camera drivers) are swapped.
5. **Normalise**: ``(x / 255 - mean) / std`` per channel (the defaults, mean 0 and std 1, give ``x / 255``).
6. **NCHW**, fp32 or fp16.

:class:`PreprocessSpec` holds every choice above and round-trips through a dict (``to_dict``/``from_dict``), so
``trt-prune export`` stores it in the ONNX file's provenance for models whose training transform is known
(:func:`trt_prune.profiling.pipeline.default_spec`; read back with ``exported_spec``), so the deployment reads
the transform the model was exported with. INT8 calibration on a folder of images runs
:func:`preprocess_reference` itself, and the pipeline timing (``trt-prune profile --backend torch --e2e``) runs
:func:`preprocess`.

Two implementations of the one transform:

* :func:`preprocess_reference`: torch ops (interpolate + pad + swap + normalise + permute), frame by frame. It
  *is* the definition: the tests hold the kernel to it, and it is the path on the CPU.
* The Triton kernel (:func:`preprocess` with ``impl="triton"``, or ``"auto"`` on CUDA): all frames of a batch
  packed into one flat uint8 buffer plus a per-frame table (offset, sizes, padding, scale factors), and **one
  launch per batch** that reads the uint8 pixels, interpolates, pads, swaps, normalises and writes the NCHW
  fp32/fp16 tensor directly. The torch path launches several kernels per frame and materialises a float copy
  of every full-resolution frame; the kernel reads each needed source pixel once from uint8 and writes each
  output value once, whatever the batch holds.

Triton is imported only when the kernel first runs (the kernel is created on first use), so importing this
module never needs it. ``TRITON_INTERPRET=1`` in the environment before that first use runs the same kernel
on CPU tensors through Triton's interpreter (slow; the tests use it).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trt_prune.errors import KernelError

__all__ = [
    "DTYPES", "IMPLS", "ORDERS", "PAD_VALUE", "Letterbox", "PreprocessSpec", "letterbox_params", "preprocess",
    "preprocess_reference", "triton_available",
]

PAD_VALUE = 114
ORDERS = ("bgr", "rgb")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
IMPLS = ("auto", "triton", "torch")
SPEC_FORMAT = "trt_prune.preprocess"
SPEC_VERSION = 1
_META_COLUMNS = 8  # offset, h, w, rh, rw, top, left, (unused): int64 per frame
_CUDA_BLOCK = 1024


# ------------------------------------------------------------------------------------------------ the spec
def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    try:
        h, w = value
    except (TypeError, ValueError):
        raise KernelError(f"{what} must be (H, W) or one int, got {value!r}") from None
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in (h, w)):
        raise KernelError(f"{what} must be two positive integers (H, W), got {value!r}")
    return int(h), int(w)


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise KernelError(f"{what} must be three numbers (one per RGB channel), got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise KernelError(f"{what} must be three finite numbers (one per RGB channel), got {value!r}")
    return out


def _stride_hint(size: tuple[int, int], stride: int) -> str:
    up = tuple(-(-s // stride) * stride for s in size)
    down = tuple(max(stride, s // stride * stride) for s in size)
    return f"{up}" if up == down else f"{up} or {down}"


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything the pre-processing does to a frame, as the model was exported to expect it.

    ``size`` is the model input (H, W), a multiple of ``stride`` (the detector's largest downsampling).
    ``input_order`` is the channel order of the *frames* (the output is always RGB). ``mean`` and ``std`` are
    per RGB channel, applied after scaling to [0, 1]. ``center=False`` pads only at the bottom and right.
    """

    size: tuple[int, int] = (640, 640)
    stride: int = 32
    pad_value: float = PAD_VALUE
    input_order: str = "bgr"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    dtype: str = "fp32"
    center: bool = True

    def __post_init__(self):
        if isinstance(self.stride, bool) or not isinstance(self.stride, (int, np.integer)) or self.stride < 1:
            raise KernelError(f"stride must be a positive integer (the model's largest downsampling, e.g. 32), "
                              f"got {self.stride!r}")
        size = _pair(self.size, "the target size")
        if size[0] % self.stride or size[1] % self.stride:
            raise KernelError(f"target size {size} (H, W) is not a multiple of the model stride {self.stride}; use "
                              f"{_stride_hint(size, self.stride)}, or the stride the model really has")
        if isinstance(self.pad_value, bool) or not isinstance(self.pad_value, (int, float, np.number)) \
                or not 0 <= self.pad_value <= 255:
            raise KernelError(f"pad_value is a uint8 pixel value in [0, 255] (114 is YOLO's grey), got "
                              f"{self.pad_value!r}")
        order = str(self.input_order).lower()
        if order not in ORDERS:
            raise KernelError(f"input_order {self.input_order!r} is not one of {ORDERS} (the frames' channel "
                              "order; OpenCV decodes to 'bgr')")
        mean, std = _triple(self.mean, "mean"), _triple(self.std, "std")
        if min(std) <= 0:
            raise KernelError(f"std must be positive, got {std}")
        if self.dtype not in DTYPES:
            raise KernelError(f"dtype {self.dtype!r} is not one of {tuple(DTYPES)}")
        if not isinstance(self.center, bool):
            raise KernelError(f"center must be True or False, got {self.center!r}")
        for name, value in (("size", size), ("stride", int(self.stride)), ("pad_value", float(self.pad_value)),
                            ("input_order", order), ("mean", mean), ("std", std)):
            object.__setattr__(self, name, value)

    def letterbox(self, frame_h: int, frame_w: int) -> Letterbox:
        """The letterbox geometry of an ``frame_h × frame_w`` frame under this spec (:func:`letterbox_params`)."""
        return letterbox_params(frame_h, frame_w, self.size, center=self.center)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with a format tag and version) that :meth:`from_dict` reads back."""
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "size": list(self.size), "stride": self.stride,
                "pad_value": self.pad_value, "input_order": self.input_order, "mean": list(self.mean),
                "std": list(self.std), "dtype": self.dtype, "center": self.center}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """The spec :meth:`to_dict` wrote; a wrong format, newer version or unknown key is a :class:`KernelError`."""
        if not isinstance(data, Mapping):
            raise KernelError(f"a pre-processing spec is a dict, got {type(data).__name__}")
        if data.get("format", SPEC_FORMAT) != SPEC_FORMAT:
            raise KernelError(f"not a pre-processing spec: format {data.get('format')!r}, expected {SPEC_FORMAT!r}")
        version = data.get("version", SPEC_VERSION)
        if not isinstance(version, int) or version > SPEC_VERSION:
            raise KernelError(f"pre-processing spec version {version!r} is newer than this trt_prune reads "
                              f"({SPEC_VERSION}); upgrade trt_prune")
        fields = set(cls.__dataclass_fields__)
        extra = sorted(set(data) - fields - {"format", "version"})
        if extra:
            raise KernelError(f"unknown pre-processing spec keys {extra}; known: {sorted(fields)}")
        return cls(**{k: data[k] for k in fields if k in data})


# ------------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Letterbox:
    """Where one frame went in the model input: ``frame`` (h, w) scaled by ``scale`` to ``resized`` (rh, rw)
    and placed at ``pad`` (top, left) of ``size`` (H, W).

    The pixels were resized by exactly ``rw / w`` across and ``rh / h`` down (:attr:`gain`), which differ from
    ``scale`` by the rounding of the resized size (under half an input pixel); the box mappings use the exact
    factors.
    """

    frame: tuple[int, int]
    size: tuple[int, int]
    scale: float
    resized: tuple[int, int]
    pad: tuple[int, int]

    @property
    def gain(self) -> tuple[float, float]:
        """(x, y): input pixels per frame pixel, across and down."""
        return self.resized[1] / self.frame[1], self.resized[0] / self.frame[0]

    def to_frame(self, boxes):
        """``boxes`` (…×4 xyxy in model-input pixels; a tensor or an array) in frame pixels, clipped to the
        frame. A tensor stays on its device; integer boxes come back as float32."""
        (gx, gy), (top, left) = self.gain, self.pad
        h, w = self.frame
        return _affine(boxes, (1 / gx, 1 / gy), (-left / gx, -top / gy), (w, h))

    def to_input(self, boxes):
        """``boxes`` (…×4 xyxy in frame pixels) in model-input pixels, the inverse of :meth:`to_frame`."""
        (gx, gy), (top, left) = self.gain, self.pad
        return _affine(boxes, (gx, gy), (left, top), None)

    def to_dict(self) -> dict[str, Any]:
        return {"frame": list(self.frame), "size": list(self.size), "scale": self.scale,
                "resized": list(self.resized), "pad": list(self.pad)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Letterbox:
        try:
            return cls(tuple(data["frame"]), tuple(data["size"]), float(data["scale"]), tuple(data["resized"]),
                       tuple(data["pad"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise KernelError(f"not a letterbox record ({exc}); expected keys frame, size, scale, resized, "
                              "pad") from None


def _affine(boxes, mul: tuple[float, float], add: tuple[float, float], clip: tuple[int, int] | None):
    """``boxes * mul + add`` per (x, y) column of …×4 xyxy boxes, clipped to [0, clip] when given."""
    if isinstance(boxes, torch.Tensor):
        b = boxes if boxes.is_floating_point() else boxes.float()
        m = torch.tensor(mul * 2, dtype=b.dtype, device=b.device)
        a = torch.tensor(add * 2, dtype=b.dtype, device=b.device)
    else:
        b = np.asarray(boxes)
        b = b if np.issubdtype(b.dtype, np.floating) else b.astype(np.float32)
        m, a = np.asarray(mul * 2, dtype=b.dtype), np.asarray(add * 2, dtype=b.dtype)
    if b.ndim < 1 or b.shape[-1] != 4:
        raise KernelError(f"boxes must be …×4 (x1, y1, x2, y2), got shape {tuple(b.shape)}")
    out = b * m + a
    if clip is None:
        return out
    if isinstance(out, torch.Tensor):
        hi = torch.tensor(clip * 2, dtype=out.dtype, device=out.device)
        return torch.minimum(out.clamp_min(0), hi)
    return np.clip(out, 0, np.asarray(clip * 2, dtype=out.dtype))


def letterbox_params(frame_h: int, frame_w: int, size: Sequence[int], *, center: bool = True) -> Letterbox:
    """THE letterbox geometry of a ``frame_h × frame_w`` frame in a ``size`` = (H, W) input.

    ``scale = min(H / h, W / w)``; resized ``(max(1, round(h·scale)), max(1, round(w·scale)))``; padding
    ``((H - rh) // 2, (W - rw) // 2)`` when centred, else ``(0, 0)``. Every letterbox of this project (the
    kernel, its reference, the calibration loader, the export's metadata) goes through here.
    """
    fh, fw = _pair((frame_h, frame_w), "the frame size")
    H, W = _pair(tuple(size), "the target size")
    scale = min(H / fh, W / fw)
    rh, rw = min(H, max(1, round(fh * scale))), min(W, max(1, round(fw * scale)))
    pad = ((H - rh) // 2, (W - rw) // 2) if center else (0, 0)
    return Letterbox((fh, fw), (H, W), scale, (rh, rw), pad)


# ------------------------------------------------------------------------------------------------ frames
@dataclass
class _Frames:
    """Validated frames: ``items`` (each H×W×3 uint8, an array or a tensor), and ``whole`` when they came as
    one B×H×W×3 tensor/array (packed without a copy)."""

    items: list
    whole: Any = None

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(f.shape[0]), int(f.shape[1])) for f in self.items)


def _check_frame(i: int, frame) -> None:
    if not isinstance(frame, (torch.Tensor, np.ndarray)):
        raise KernelError(f"frame {i} is a {type(frame).__name__}; frames are H×W×3 uint8 numpy arrays or torch "
                          "tensors")
    shape = tuple(frame.shape)
    dtype = str(frame.dtype).replace("torch.", "")
    if frame.ndim != 3:
        raise KernelError(f"frame {i} has shape {shape}; a frame is H×W×3 (channels last, as decoders hand it "
                          "over): pass a list of frames or one B×H×W×3 batch")
    if dtype != "uint8":
        raise KernelError(f"frame {i} is {dtype}, shape {shape}; pre-processing takes uint8 frames (0-255) as "
                          "decoded: pass the decoder's output, or convert [0, 1] floats with "
                          "(x * 255).round().clip(0, 255) cast to uint8")
    if shape[0] < 1 or shape[1] < 1:
        raise KernelError(f"frame {i} is empty (shape {shape}); every frame needs at least one row and one "
                          "column: drop empty frames before pre-processing")
    if shape[2] != 3:
        raise KernelError(f"frame {i} has {shape[2]} channels (shape {shape}); give 3-channel BGR or RGB frames "
                          "(drop alpha with frame[..., :3]; stack grey frames to 3 channels)")


def _frames(frames) -> _Frames:
    whole = None
    if isinstance(frames, (torch.Tensor, np.ndarray)):
        if frames.ndim == 4:
            whole, items = frames, list(frames)
        else:
            items = [frames]  # one H×W×3 frame (or something else: _check_frame says what)
    elif isinstance(frames, Sequence) and not isinstance(frames, (str, bytes)):
        items = list(frames)
    else:
        raise KernelError(f"frames must be a list of H×W×3 uint8 arrays/tensors or one B×H×W×3 batch, got "
                          f"{type(frames).__name__}")
    if not items:
        raise KernelError("no frames: pre-processing needs at least one H×W×3 uint8 frame")
    if whole is not None:
        _check_frame(0, items[0])
    else:
        for i, f in enumerate(items):
            _check_frame(i, f)
    return _Frames(items, whole)


def _check_spec(spec) -> None:
    if not isinstance(spec, PreprocessSpec):
        raise KernelError(f"spec must be a PreprocessSpec (PreprocessSpec.from_dict reads a stored one), got "
                          f"{type(spec).__name__}")


def _device(batch: _Frames, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for f in batch.items:
        if isinstance(f, torch.Tensor):
            return f.device
    return torch.device("cpu")


def _tensor(frame, device: torch.device) -> torch.Tensor:
    if isinstance(frame, np.ndarray):
        frame = torch.from_numpy(np.ascontiguousarray(frame))  # a negative-stride view (x[..., ::-1]) copies
    return frame.to(device)


# ------------------------------------------------------------------------------------------------ reference
def preprocess_reference(frames, spec: PreprocessSpec, *, device=None) -> tuple[torch.Tensor, list[Letterbox]]:
    """The definition of the transform (see the module doc), in torch ops, frame by frame.

    ``frames``: a list of H×W×3 uint8 arrays or tensors (sizes may differ), one B×H×W×3 batch, or one frame.
    Runs on ``device`` (default: the frames' device, the CPU for numpy arrays). Returns the B×3×H×W input in
    ``spec.dtype`` and each frame's :class:`Letterbox`.
    """
    _check_spec(spec)
    batch = _frames(frames)
    return _reference(batch, spec, _device(batch, device))


def _reference(batch: _Frames, spec: PreprocessSpec, dev: torch.device) -> tuple[torch.Tensor, list[Letterbox]]:
    H, W = spec.size
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=dev).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=dev).view(3, 1, 1)
    out = torch.empty((len(batch.items), 3, H, W), dtype=DTYPES[spec.dtype], device=dev)
    boxes = []
    for i, frame in enumerate(batch.items):
        box = spec.letterbox(int(frame.shape[0]), int(frame.shape[1]))
        (rh, rw), (top, left) = box.resized, box.pad
        x = _tensor(frame, dev).permute(2, 0, 1)
        if spec.input_order == "bgr":
            x = x.flip(0)
        x = F.interpolate(x[None].float(), size=(rh, rw), mode="bilinear", align_corners=False, antialias=False)
        x = F.pad(x, (left, W - rw - left, top, H - rh - top), value=spec.pad_value)[0]
        out[i] = (x / 255 - mean) / std
        boxes.append(box)
    return out, boxes


# ------------------------------------------------------------------------------------------------ triton
def _interpreting() -> bool:
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available(device="cuda") -> tuple[bool, str]:
    """Whether the Triton kernel can run on ``device``, and why not: Triton must import, and the device must
    be CUDA (or the CPU under ``TRITON_INTERPRET=1``, Triton's interpreter)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"Triton is not installed ({exc}); it ships with torch's Linux CUDA wheels"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to torch"
        return True, "CUDA"
    if dev.type == "cpu" and _interpreting():
        return True, "Triton interpreter (TRITON_INTERPRET=1) on the CPU"
    return False, (f"the Triton kernel runs on CUDA devices; frames are on {dev} (set TRITON_INTERPRET=1 before "
                   "the first call to run it on the CPU through Triton's interpreter, slowly, or use impl='torch')")


@functools.cache
def _kernel(interpret: bool):
    """The jitted kernel, created on first use: ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates, so
    the variable is honoured whenever it was set before the first call. Cached per interpreter setting."""
    import triton
    import triton.language as tl

    @triton.jit
    def letterbox_kernel(src, meta, scales, out, H, W, pad, m0, m1, m2, s0, s1, s2,
                         SWAP: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        row = meta + b * 8
        offset = tl.load(row)
        h = tl.load(row + 1).to(tl.int32)
        w = tl.load(row + 2).to(tl.int32)
        rh = tl.load(row + 3).to(tl.int32)
        rw = tl.load(row + 4).to(tl.int32)
        top = tl.load(row + 5).to(tl.int32)
        left = tl.load(row + 6).to(tl.int32)
        scale_y = tl.load(scales + b * 2)
        scale_x = tl.load(scales + b * 2 + 1)

        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = idx < H * W
        dy = idx // W - top
        dx = idx % W - left
        inside = valid & (dy >= 0) & (dy < rh) & (dx >= 0) & (dx < rw)
        # torch's align_corners=False source index: scale * (dst + 0.5) - 0.5, clamped at 0
        fy = tl.maximum(scale_y * (dy.to(tl.float32) + 0.5) - 0.5, 0.0)
        fx = tl.maximum(scale_x * (dx.to(tl.float32) + 0.5) - 0.5, 0.0)
        y0 = tl.minimum(fy.to(tl.int32), h - 1)  # fy >= 0: truncation is floor
        x0 = tl.minimum(fx.to(tl.int32), w - 1)
        ly = tl.minimum(tl.maximum(fy - y0.to(tl.float32), 0.0), 1.0)
        lx = tl.minimum(tl.maximum(fx - x0.to(tl.float32), 0.0), 1.0)
        y1 = tl.minimum(y0 + 1, h - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        frame = src + offset
        p00 = (y0 * w + x0) * 3
        p01 = (y0 * w + x1) * 3
        p10 = (y1 * w + x0) * 3
        p11 = (y1 * w + x1) * 3
        plane = b.to(tl.int64) * 3 * H * W + idx
        for c in tl.static_range(3):
            if SWAP:
                sc = 2 - c
            else:
                sc = c
            v00 = tl.load(frame + p00 + sc, mask=inside, other=0).to(tl.float32)
            v01 = tl.load(frame + p01 + sc, mask=inside, other=0).to(tl.float32)
            v10 = tl.load(frame + p10 + sc, mask=inside, other=0).to(tl.float32)
            v11 = tl.load(frame + p11 + sc, mask=inside, other=0).to(tl.float32)
            # torch's weight order: h-weights outside, w-weights inside
            v = (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
            v = tl.where(inside, v, pad)
            if c == 0:
                y = (v / 255.0 - m0) / s0
            elif c == 1:
                y = (v / 255.0 - m1) / s1
            else:
                y = (v / 255.0 - m2) / s2
            tl.store(out + plane + c * H * W, y.to(out.dtype.element_ty), mask=valid)

    return letterbox_kernel


@functools.lru_cache(maxsize=64)
def _tables(shapes: tuple[tuple[int, int], ...], size: tuple[int, int], center: bool, device: str):
    """Per-frame int64 (offset, h, w, rh, rw, top, left, 0) and float32 (in/out scale y, x) tables on
    ``device`` with the frames' letterboxes. Cached: a video stream's shapes repeat, so its tables are
    uploaded once."""
    boxes = tuple(letterbox_params(h, w, size, center=center) for h, w in shapes)
    meta = np.zeros((len(shapes), _META_COLUMNS), dtype=np.int64)
    scales = np.zeros((len(shapes), 2), dtype=np.float32)
    offset = 0
    for i, ((h, w), box) in enumerate(zip(shapes, boxes, strict=True)):
        (rh, rw), (top, left) = box.resized, box.pad
        meta[i, :7] = (offset, h, w, rh, rw, top, left)
        # float32 division, as torch computes the scale of an explicit output size
        scales[i] = (np.float32(h) / np.float32(rh), np.float32(w) / np.float32(rw))
        offset += h * w * 3
    dev = torch.device(device)
    return torch.from_numpy(meta).to(dev), torch.from_numpy(scales).to(dev), boxes


def _pack(batch: _Frames, dev: torch.device) -> torch.Tensor:
    """All frames as one flat uint8 buffer on ``dev``, frame after frame (the layout :func:`_tables` indexes)."""
    if batch.whole is not None:
        return _tensor(batch.whole, dev).contiguous().reshape(-1)
    if all(isinstance(f, np.ndarray) for f in batch.items):  # pack on the host: one upload
        return _tensor(np.concatenate([f.reshape(-1) for f in batch.items]), dev)
    return torch.cat([_tensor(f, dev).reshape(-1) for f in batch.items])


def _preprocess_triton(batch: _Frames, spec: PreprocessSpec, dev: torch.device):
    import triton

    interpret = _interpreting()
    H, W = spec.size
    meta, scales, boxes = _tables(batch.shapes, spec.size, spec.center, str(dev))
    src = _pack(batch, dev)
    out = torch.empty((len(batch.items), 3, H, W), dtype=DTYPES[spec.dtype], device=dev)
    # the interpreter runs programs one after another: few large blocks; on the GPU, many small ones
    block = min(triton.next_power_of_2(H * W), 1 << 14) if interpret else _CUDA_BLOCK
    grid = (len(batch.items), triton.cdiv(H * W, block))
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _kernel(interpret)[grid](src, meta, scales, out, H, W, spec.pad_value, *spec.mean, *spec.std,
                                 SWAP=spec.input_order == "bgr", BLOCK=block)
    return out, list(boxes)


# ------------------------------------------------------------------------------------------------ the stage
def preprocess(frames, spec: PreprocessSpec, *, impl: str = "auto", device=None) -> tuple[torch.Tensor,
                                                                                        list[Letterbox]]:
    """Letterbox, swap, normalise and lay out ``frames`` for the model as ``spec`` says (module doc).

    ``frames``: a list of H×W×3 uint8 arrays or tensors (sizes may differ), one B×H×W×3 batch, or one frame.
    ``device``: where the output goes (default: the frames' device, the CPU for numpy arrays; frames elsewhere
    are copied there). ``impl``: ``"triton"`` (one kernel launch per batch; CUDA, or the CPU under
    ``TRITON_INTERPRET=1``), ``"torch"`` (:func:`preprocess_reference`), or ``"auto"`` (Triton on CUDA when it is
    available, else torch). Returns the B×3×H×W input in ``spec.dtype`` and each frame's :class:`Letterbox`.
    """
    if impl not in IMPLS:
        raise KernelError(f"unknown pre-processing impl {impl!r}; choose one of {IMPLS}")
    _check_spec(spec)
    batch = _frames(frames)
    dev = _device(batch, device)
    if impl == "auto":
        impl = "triton" if dev.type == "cuda" and triton_available(dev)[0] else "torch"
    if impl == "torch":
        return _reference(batch, spec, dev)
    ok, why = triton_available(dev)
    if not ok:
        raise KernelError(f"impl='triton' cannot run: {why}")
    return _preprocess_triton(batch, spec, dev)
