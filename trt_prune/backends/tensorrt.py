"""TensorRT backend (10.x and 11.x): ONNX -> engine -> timed execution through cuda-python or PyCUDA.

Every decision is a pure function tested without TensorRT: :func:`plan_build` (flags per TensorRT major
version), :func:`engine_cache_key` and :func:`engine_meta` / :func:`check_engine_meta` /
:func:`check_engine_bytes` (whether a stored engine may be loaded here), :func:`parse_build_log` (what the
builder said about 2:4 sparsity), :func:`summarize_inspector` (tactic, precision and sparsity per engine layer),
:func:`choose_cuda_api` (which CUDA library moves the tensors), :func:`timing_breakdown` (trtexec's summary
from per-iteration timestamps) and :func:`cuda_graph_decision` (whether a run can be replayed from a CUDA
graph). The classes below only translate those into TensorRT and CUDA calls.

``BuildConfig.extra`` keys: ``strongly_typed`` (bool; on TensorRT 10 create the network STRONGLY_TYPED so
the ONNX's own types decide precision; TensorRT 11 is always strongly typed), ``tf32`` (bool, default True;
False clears the TF32 flag for bit-faithful fp32, e.g. when comparing against ONNX Runtime),
``workspace_mib`` (int; workspace memory-pool limit). Three more only change how the engine is run, so they
are not part of the cache key: ``cuda_graph`` (bool, default False; capture ``execute_async_v3`` into a CUDA
graph once per input shape and replay it, as trtexec's ``--useCudaGraph``; where
:func:`cuda_graph_decision` says a run cannot be captured, or capture fails, the session runs without a
graph and says why in ``Session.notes``), ``cuda_api`` (``"cuda-python"`` or ``"pycuda"``; default: the
first of them that imports) and ``pinned_host`` (bool, default True; stage inputs and outputs in page-locked
host buffers, as trtexec does, so H2D and D2H run at full bus speed and truly asynchronously; where the driver
refuses page-locked memory the session falls back to ordinary arrays and says so in ``Session.notes``).

Cache layout, with ``cache_dir`` set (see :func:`cache_paths`): per engine, ``<key>.engine`` (the serialised
engine), ``<key>.meta.json`` (its sidecar: TensorRT version, GPU name, compute capability, hardware
compatibility level, build-configuration hash and fields, ONNX sha256, engine size and sha256),
``<key>.log`` (builder log, INFO and worse), ``<key>.sparsity.json`` (parsed sparsity report) and
``<key>.inspector.json`` (engine-inspector JSON); one ``timing_<gpu>_trt<version>.cache`` per TensorRT
version and GPU. The engine is written first and the meta sidecar last, each atomically, so a sidecar marks
a complete entry. Before a stored engine is deserialised its sidecar is checked against this machine and
this build (:func:`check_engine_meta`) and its bytes against the sidecar (:func:`check_engine_bytes`): an
engine for another TensorRT version or GPU, a truncated file, or one TensorRT cannot deserialise is refused
with a :class:`BackendError` that names the file and says to delete the entry or use a new ``cache_dir``.
An engine without a sidecar (stored by an older trt_prune, or a build that was cut off) is rebuilt.

CUDA calls go through one small adapter, :class:`CudaApi` (device memory, streams, async copies, events,
graph capture), with two implementations: :class:`CudaPythonApi` over ``cuda.bindings.runtime`` (NVIDIA's
bindings, which TensorRT's own samples use since 10.14) and :class:`PyCudaApi` over ``pycuda.driver`` (the
fallback where cuda-python is missing; it captures no CUDA graphs). :meth:`TensorRTSession.time_breakdown`
records CUDA events around the input copies, the enqueue and the output copies of each inference and hands the
timestamps to :func:`timing_breakdown`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from trt_prune.backends.base import (
    Backend,
    BuildConfig,
    LayerTime,
    Session,
    ShapeRange,
    TensorSpec,
    onnx_io_specs,
    register_backend,
    resolve_shape_ranges,
)
from trt_prune.errors import BackendError, BackendUnavailableError, ProfileError

INSTALL_HINT = ("pip install 'trt_prune[tensorrt]' (TensorRT 10 or 11 Python bindings plus cuda-python; PyCUDA, "
                "'trt_prune[pycuda]', also works); TensorRT needs an NVIDIA GPU and its driver")
_BUILD_EXTRA = {"strongly_typed", "tf32", "workspace_mib"}
# how an engine is run, not what is built: not in the cache key
_RUNTIME_EXTRA = {"cuda_graph", "cuda_api", "pinned_host"}
_KNOWN_EXTRA = _BUILD_EXTRA | _RUNTIME_EXTRA
CUDA_APIS = ("cuda-python", "pycuda")
_MODULES = {"cuda-python": "cuda.bindings.runtime", "pycuda": "pycuda.driver"}


# --------------------------------------------------------------------------------------------------------
# Pure decisions


def parse_trt_version(version: str) -> tuple[int, int, int]:
    """``"10.9.0.34"`` -> ``(10, 9, 0)``."""
    m = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
    if not m:
        raise BackendError(f"cannot read a TensorRT version from {version!r}; expected e.g. '10.9.0'")
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


@dataclass(frozen=True)
class BuildPlan:
    """What to ask TensorRT for: flag names as spelled in ``trt.BuilderFlag`` and
    ``trt.NetworkDefinitionCreationFlag``, plus anything the user should hear about (``warnings``)."""

    trt_version: str
    major: int
    strongly_typed: bool
    network_flags: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()
    cleared_flags: tuple[str, ...] = ()
    profiling_verbosity: str = "DETAILED"
    optimization_level: int | None = None
    workspace_bytes: int | None = None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_build(trt_version: str, config: BuildConfig) -> BuildPlan:
    """Decide builder and network flags for ``config`` on TensorRT ``trt_version``.

    TensorRT 10 is weakly typed by default: fp16 is asked for with the FP16 builder flag, unless the user
    asks for a strongly typed network (``extra["strongly_typed"]``), where the ONNX's types decide and no
    precision flag may be set. TensorRT 11 builds strongly typed networks only: FP16/INT8/BF16 flags are
    gone and STRONGLY_TYPED is ignored, so fp16 must already be in the ONNX. SPARSE_WEIGHTS exists in both.
    Engines always carry DETAILED profiling verbosity so the inspector can name tactics and ONNX nodes.
    """
    major, minor, _ = parse_trt_version(trt_version)
    if major < 10:
        raise BackendError(f"TensorRT {trt_version} is not supported: this backend uses the 10.x/11.x API "
                           f"(named I/O tensors, execute_async_v3); install TensorRT 10 or 11")
    unknown = sorted(set(config.extra) - _KNOWN_EXTRA)
    if unknown:
        raise BackendError(f"unknown tensorrt option(s) {unknown} in BuildConfig.extra; known: "
                           f"{sorted(_KNOWN_EXTRA)}")
    level = config.optimization_level
    if level is not None and (not isinstance(level, int) or not 0 <= level <= 5):
        raise BackendError(f"optimization_level {level!r} is not valid for TensorRT; use 0-5 (default 3) or None")
    workspace = config.extra.get("workspace_mib")
    if workspace is not None and (not isinstance(workspace, int) or workspace < 1):
        raise BackendError(f"extra['workspace_mib'] must be a positive integer, got {workspace!r}")
    runtime_options(config)  # refuse a bad run-time option before minutes of building

    warnings: list[str] = []
    network_flags: list[str] = []
    builder_flags: list[str] = []
    cleared: list[str] = []
    asked_strong = bool(config.extra.get("strongly_typed", False))
    if major == 10:
        strongly_typed = asked_strong
        if strongly_typed:
            network_flags.append("STRONGLY_TYPED")
            if config.precision == "fp16":
                warnings.append("strongly typed network: the ONNX's tensor types decide precision, so the FP16 "
                                "flag is not set; the model must already carry fp16 tensors")
        elif config.precision == "fp16":
            builder_flags.append("FP16")
            if minor >= 12:
                warnings.append(f"TensorRT {trt_version}: weak typing (the FP16 flag) is deprecated since 10.12 "
                                f"and gone in 11; convert the ONNX to fp16 and build strongly typed")
    else:
        strongly_typed = True
        if major > 11:
            warnings.append(f"TensorRT {trt_version} is newer than the 11.x this backend was written for; "
                            f"building as for 11")
        if config.precision == "fp16":
            warnings.append(f"TensorRT {trt_version} builds strongly typed networks only and has no FP16 flag: "
                            f"the engine runs the types the ONNX carries; convert it to fp16 first "
                            f"(e.g. ModelOpt AutoCast) to get fp16")
    if config.sparse_weights:
        builder_flags.append("SPARSE_WEIGHTS")
    if not config.extra.get("tf32", True):
        cleared.append("TF32")
    return BuildPlan(trt_version=str(trt_version), major=major, strongly_typed=strongly_typed,
                     network_flags=tuple(network_flags), builder_flags=tuple(builder_flags),
                     cleared_flags=tuple(cleared), optimization_level=level,
                     workspace_bytes=workspace * (1 << 20) if workspace else None, warnings=tuple(warnings))


def _cc_string(compute_capability: str | Sequence[int]) -> str:
    if isinstance(compute_capability, str):
        m = re.fullmatch(r"(?:sm_?)?(\d+)\.(\d+)", compute_capability.strip())
        if not m:
            raise BackendError(f"compute capability {compute_capability!r} is not of the form '9.0'")
        return f"{int(m.group(1))}.{int(m.group(2))}"
    parts = tuple(compute_capability)
    if len(parts) != 2 or not all(isinstance(p, int) and p >= 0 for p in parts):
        raise BackendError(f"compute capability must be (major, minor) integers, got {compute_capability!r}")
    return f"{parts[0]}.{parts[1]}"


def _shape_key(shapes: Mapping[str, ShapeRange]) -> dict[str, list[list[int]]]:
    return {name: [list(s) for s in rng] for name, rng in sorted(shapes.items())}


def engine_cache_key(onnx_sha256: str, trt_version: str, gpu_name: str,
                     compute_capability: str | Sequence[int], config: BuildConfig) -> str:
    """File-name-safe key for a built engine, readable at the front and unique by a hash at the back.

    Engines do not move between GPU models or TensorRT versions, so the key covers the ONNX content hash,
    the TensorRT version, GPU name and compute capability, and every ``BuildConfig`` field that changes the
    engine: optimisation level, batch and shapes, precision, sparse weights and ``extra``. ``threads``
    (host threads), ``cache_dir`` (where the engine lives) and the run-time ``extra`` keys (``cuda_graph``,
    ``cuda_api``, ``pinned_host``) do not change the engine and are left out.
    """
    if not re.fullmatch(r"[0-9a-fA-F]{64}", onnx_sha256 or ""):
        raise BackendError(f"onnx_sha256 must be 64 hex digits (hashlib.sha256(...).hexdigest()), "
                           f"got {onnx_sha256!r}")
    if not gpu_name:
        raise BackendError("gpu_name must be a non-empty string, e.g. 'NVIDIA H100 80GB HBM3'")
    cc = _cc_string(compute_capability)
    payload = {"onnx": onnx_sha256.lower(), "tensorrt": str(trt_version), "gpu": gpu_name, "cc": cc,
               "build": build_fields(config)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-")
    version = re.sub(r"[^0-9.]+", "", str(trt_version))
    return f"{slug}_sm{cc.replace('.', '')}_trt{version}_{digest[:24]}"


def runtime_options(config: BuildConfig) -> dict[str, Any]:
    """The run-time ``extra`` keys, checked: ``{"cuda_graph": bool, "cuda_api": str | None,
    "pinned_host": bool}``. ``pinned_host`` (default True) stages inputs and outputs in page-locked host memory,
    as trtexec does, so the H2D/D2H times are what a deployment with pinned buffers sees."""
    flags = {"cuda_graph": False, "pinned_host": True}
    for key, default in flags.items():
        value = config.extra.get(key, default)
        if not isinstance(value, bool):
            raise BackendError(f"extra[{key!r}] must be True or False, got {value!r}")
        flags[key] = value
    api = config.extra.get("cuda_api")
    if api is not None and api not in CUDA_APIS:
        raise BackendError(f"extra['cuda_api'] must be one of {list(CUDA_APIS)} or None (pick whichever imports), "
                           f"got {api!r}")
    return {**flags, "cuda_api": api}


def build_fields(config: BuildConfig) -> dict[str, Any]:
    """The ``BuildConfig`` fields that change the engine, JSON-ready (what the cache key and meta hash cover)."""
    extra = {k: v for k, v in config.extra.items() if k not in _RUNTIME_EXTRA}
    return {"optimization_level": config.optimization_level, "batch": list(config.batch),
            "shapes": _shape_key(config.shapes), "precision": config.precision,
            "sparse_weights": bool(config.sparse_weights), "extra": extra}


def build_config_sha256(config: BuildConfig) -> str:
    """SHA-256 of :func:`build_fields`: equal exactly when two configurations build the same engine."""
    return hashlib.sha256(json.dumps(build_fields(config), sort_keys=True, default=repr).encode()).hexdigest()


def cache_paths(cache_dir: str | os.PathLike, key: str) -> dict[str, Path]:
    """Where one cache entry's files live: ``engine``, ``meta``, ``log``, ``sparsity``, ``inspector``."""
    folder = Path(cache_dir)
    return {"engine": folder / f"{key}.engine", "meta": folder / f"{key}.meta.json",
            "log": folder / f"{key}.log", "sparsity": folder / f"{key}.sparsity.json",
            "inspector": folder / f"{key}.inspector.json"}


META_FORMAT = 1
_META_KEYS = ("tensorrt", "gpu", "compute_capability")
# trt.HardwareCompatibilityLevel names. This backend builds with NONE; the others are honoured when reading a
# sidecar so that an engine built elsewhere in a compatibility mode is judged by that mode's rule.
HARDWARE_COMPATIBILITY = ("NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY")
_REBUILD = "rebuild it (delete the cache entry or pass a new cache_dir)"


def engine_meta(onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability: str | Sequence[int],
                config: BuildConfig, engine_bytes: bytes | None = None,
                hardware_compatibility: str = "NONE") -> dict[str, Any]:
    """The sidecar stored next to a cached engine: what it was built from, with and for.

    With ``engine_bytes``, also its size and SHA-256, so that a truncated or overwritten file is caught
    before TensorRT reads it.
    """
    if hardware_compatibility not in HARDWARE_COMPATIBILITY:
        raise BackendError(f"hardware_compatibility {hardware_compatibility!r} is not one of "
                           f"{list(HARDWARE_COMPATIBILITY)}")
    meta: dict[str, Any] = {
        "format": META_FORMAT, "tensorrt": str(trt_version), "gpu": gpu_name,
        "compute_capability": _cc_string(compute_capability), "hardware_compatibility": hardware_compatibility,
        "onnx_sha256": onnx_sha256.lower(), "build_config_sha256": build_config_sha256(config),
        "build": build_fields(config)}
    if engine_bytes is not None:
        meta["engine_bytes"] = len(engine_bytes)
        meta["engine_sha256"] = hashlib.sha256(engine_bytes).hexdigest()
    return meta


def _sm(cc: str) -> str:
    return "sm_" + cc.replace(".", "")


def check_engine_meta(meta: Mapping[str, Any], trt_version: str, gpu_name: str,
                      compute_capability: str | Sequence[int], *, onnx_sha256: str | None = None,
                      build_sha256: str | None = None, engine: str | os.PathLike = "the engine") -> None:
    """Raise :class:`BackendError` unless the engine ``meta`` describes can be loaded here.

    TensorRT engines load only under the TensorRT version that built them and, unless built in a hardware
    compatibility mode, on the GPU model they were built for: a mismatch names both sides. ``AMPERE_PLUS``
    engines load on any GPU of compute capability 8.0 or newer, ``SAME_COMPUTE_CAPABILITY`` ones on any GPU
    of the same compute capability. Given ``onnx_sha256`` or ``build_sha256`` (:func:`build_config_sha256`),
    the engine must also have been built from that ONNX and that build configuration.
    """
    name = os.fspath(engine)
    if not isinstance(meta, Mapping):
        raise BackendError(f"the meta sidecar of {name} must be a JSON object, got {type(meta).__name__}; "
                           f"{_REBUILD}")
    missing = [k for k in _META_KEYS if not meta.get(k)]
    if missing:
        raise BackendError(f"the meta sidecar of {name} lacks {missing} (it has {sorted(meta)}); {_REBUILD}")
    here_cc = _cc_string(compute_capability)
    try:
        built_cc = _cc_string(str(meta["compute_capability"]))
    except BackendError:
        raise BackendError(f"the meta sidecar of {name} has compute_capability {meta['compute_capability']!r}, "
                           f"not of the form '9.0'; {_REBUILD}") from None
    mode = meta.get("hardware_compatibility", "NONE")
    if mode not in HARDWARE_COMPATIBILITY:
        raise BackendError(f"the meta sidecar of {name} has hardware_compatibility {mode!r}, not one of "
                           f"{list(HARDWARE_COMPATIBILITY)}; {_REBUILD}")
    built_trt, built_gpu = str(meta["tensorrt"]).strip(), str(meta["gpu"]).strip()
    same_trt = built_trt == str(trt_version).strip()
    if mode == "AMPERE_PLUS":
        same_gpu = tuple(map(int, here_cc.split("."))) >= (8, 0)
    elif mode == "SAME_COMPUTE_CAPABILITY":
        same_gpu = built_cc == here_cc
    else:
        same_gpu = built_gpu == gpu_name.strip() and built_cc == here_cc
    if not (same_trt and same_gpu):
        differs = [what for what, same in (("TensorRT version", same_trt), ("GPU", same_gpu)) if not same]
        verb = "differs" if len(differs) == 1 else "differ"
        rule = "" if mode == "NONE" else f" (hardware compatibility {mode})"
        raise BackendError(f"engine {name} was built with TensorRT {built_trt} on {built_gpu} ({_sm(built_cc)})"
                           f"{rule}; this machine has TensorRT {trt_version} on {gpu_name} ({_sm(here_cc)}), so "
                           f"the {' and the '.join(differs)} {verb}: {_REBUILD}")
    if onnx_sha256 is not None and str(meta.get("onnx_sha256", "")).lower() != onnx_sha256.lower():
        raise BackendError(f"engine {name} was built from an ONNX with sha256 "
                           f"{str(meta.get('onnx_sha256'))[:16]}..., not from this model (sha256 "
                           f"{onnx_sha256[:16]}...): {_REBUILD}")
    if build_sha256 is not None and meta.get("build_config_sha256") != build_sha256:
        raise BackendError(f"engine {name} was built with another build configuration (sha256 "
                           f"{str(meta.get('build_config_sha256'))[:16]}..., fields {meta.get('build')}) than the "
                           f"one asked for (sha256 {build_sha256[:16]}...): {_REBUILD}")


def check_engine_bytes(meta: Mapping[str, Any], data: bytes, engine: str | os.PathLike = "the engine") -> None:
    """Raise :class:`BackendError` when ``data`` is not the engine the sidecar ``meta`` recorded: a different
    size (a truncated or partly written file) or a different SHA-256. Sidecars without the fields pass."""
    name = os.fspath(engine)
    size = meta.get("engine_bytes")
    if size is not None and size != len(data):
        raise BackendError(f"engine file {name} is {len(data)} bytes, but its meta sidecar recorded {size}: the "
                           f"file is truncated or was overwritten; delete it and its sidecars and build again "
                           f"(or pass a new cache_dir)")
    digest = meta.get("engine_sha256")
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise BackendError(f"engine file {name} does not match the sha256 its meta sidecar recorded "
                           f"({str(digest)[:16]}...): the file is corrupt or was replaced; delete it and its "
                           f"sidecars and build again (or pass a new cache_dir)")


def choose_cuda_api(have_cuda_python: bool, have_pycuda: bool, prefer: str | None = None) -> str:
    """Which library moves tensors to and from the GPU: ``"cuda-python"`` (NVIDIA's ``cuda.bindings``, used by
    TensorRT's own samples since 10.14) where it imports, else ``"pycuda"``. ``prefer`` (``extra["cuda_api"]``)
    names one of them; it must then be importable. Raises :class:`BackendUnavailableError` naming both pip
    packages when neither is there."""
    have = {"cuda-python": bool(have_cuda_python), "pycuda": bool(have_pycuda)}
    if prefer is not None:
        if prefer not in CUDA_APIS:
            raise BackendError(f"extra['cuda_api'] must be one of {list(CUDA_APIS)} or None, got {prefer!r}")
        if not have[prefer]:
            other = next(name for name in CUDA_APIS if name != prefer)
            hint = f", or drop extra['cuda_api'] to use {other}, which is installed" if have[other] else ""
            raise BackendUnavailableError(f"extra['cuda_api'] asks for {prefer}, but {_MODULES[prefer]} cannot be "
                                          f"imported here: pip install {prefer}{hint}")
        return prefer
    for name in CUDA_APIS:
        if have[name]:
            return name
    raise BackendUnavailableError("the TensorRT backend needs cuda-python or PyCUDA to move tensors to and from the "
                                  "GPU, and neither cuda.bindings nor pycuda.driver can be imported: pip install "
                                  "cuda-python (preferred; or pip install 'trt_prune[tensorrt]'), or pip install "
                                  "pycuda")


_TIMELINE = ("enqueue_start", "enqueue_end", "h2d_start", "compute_start", "compute_end", "d2h_end")


def timing_breakdown(enqueue_start: Sequence[float], enqueue_end: Sequence[float], h2d_start: Sequence[float],
                     compute_start: Sequence[float], compute_end: Sequence[float], d2h_end: Sequence[float], *,
                     host_wall_ms: float | None = None, cv_threshold: float | None = None) -> dict[str, Any]:
    """trtexec's performance summary from per-iteration timestamps, all in ms.

    ``enqueue_start``/``enqueue_end`` are host times around the enqueue call (``execute_async_v3`` or the
    graph launch); ``h2d_start``, ``compute_start``, ``compute_end`` and ``d2h_end`` are CUDA event times on one
    stream, relative to one reference event. Per iteration: Latency = D2H end - H2D start, Enqueue time =
    enqueue end - enqueue start, H2D = compute start - H2D start, GPU compute = compute end - compute start,
    D2H = D2H end - compute end. Each gets ``min, max, mean, median, p90, p95, p99`` (plus ``p50, std, cv, n``
    from :func:`trt_prune.profiling.stats.summarize`).

    ``throughput_qps`` is iterations per second of ``host_wall_ms`` (trtexec's "Total Host Walltime"), or, where
    that is not given, of the device span from the first H2D start to the last D2H end (``throughput_basis``
    says which). ``warnings`` holds trtexec's two: GPU compute time varying more than ``cv_threshold``
    (default :data:`trt_prune.profiling.stats.CV_THRESHOLD`), and an enqueue time as long as the GPU compute
    time (the host, not the GPU, bounds throughput; CUDA graphs help). Raises :class:`ProfileError` on
    timestamps that are empty, of unequal lengths, not finite, or out of order.
    """
    from trt_prune.profiling.stats import CV_THRESHOLD, cv_warning, summarize

    columns = {}
    for name, values in zip(_TIMELINE, (enqueue_start, enqueue_end, h2d_start, compute_start, compute_end,
                                        d2h_end), strict=True):
        arr = np.asarray(list(values), dtype=np.float64)
        if arr.ndim != 1:
            raise ProfileError(f"{name} must be a flat list of ms per iteration, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ProfileError(f"{name} holds values that are not finite: {arr[~np.isfinite(arr)][:5].tolist()}")
        columns[name] = arr
    lengths = {name: len(arr) for name, arr in columns.items()}
    if len(set(lengths.values())) != 1 or lengths["h2d_start"] == 0:
        raise ProfileError(f"every timestamp list needs one value per iteration, at least one; got lengths {lengths}")
    order = (("enqueue_start", "enqueue_end"), ("h2d_start", "compute_start"), ("compute_start", "compute_end"),
             ("compute_end", "d2h_end"))
    for first, then in order:
        bad = np.nonzero(columns[then] < columns[first])[0]
        if bad.size:
            i = int(bad[0])
            raise ProfileError(f"iteration {i}: {then} ({columns[then][i]} ms) is before {first} "
                               f"({columns[first][i]} ms); record the events in stream order and read them against "
                               f"one reference event")
    n = lengths["h2d_start"]
    c = columns
    phases = {"latency": c["d2h_end"] - c["h2d_start"], "enqueue": c["enqueue_end"] - c["enqueue_start"],
              "h2d": c["compute_start"] - c["h2d_start"], "gpu_compute": c["compute_end"] - c["compute_start"],
              "d2h": c["d2h_end"] - c["compute_end"]}
    summaries = {}
    for name, values in phases.items():
        summary = summarize(values.tolist())
        summary["median"] = summary["p50"]
        summaries[name] = summary
    if host_wall_ms is not None:
        if not (isinstance(host_wall_ms, (int, float)) and math.isfinite(host_wall_ms) and host_wall_ms > 0):
            raise ProfileError(f"host_wall_ms must be a finite time > 0, got {host_wall_ms!r}")
        span, basis = float(host_wall_ms), "host wall time"
    else:
        span, basis = float(c["d2h_end"].max() - c["h2d_start"].min()), "device span"
        if span <= 0:
            raise ProfileError(f"the {n} iterations span no device time (first H2D start = last D2H end); pass "
                               f"host_wall_ms")
    warnings = []
    unstable = cv_warning(summaries["gpu_compute"], CV_THRESHOLD if cv_threshold is None else cv_threshold)
    if unstable:
        warnings.append(f"GPU compute time: {unstable}")
    if summaries["enqueue"]["mean"] >= summaries["gpu_compute"]["mean"]:
        warnings.append(f"enqueue time (mean {summaries['enqueue']['mean']:.4g} ms) is at least the GPU compute "
                        f"time (mean {summaries['gpu_compute']['mean']:.4g} ms): the host, not the GPU, bounds "
                        f"throughput; try extra['cuda_graph']=True")
    return {"iterations": n, "throughput_qps": n / (span / 1000.0), "throughput_basis": basis,
            "host_wall_ms": None if host_wall_ms is None else float(host_wall_ms),
            "total_gpu_compute_ms": float(phases["gpu_compute"].sum()), **summaries, "warnings": warnings}


# Ops whose output size depends on the input values: TensorRT sizes their outputs at run time, after a device
# to host synchronisation that a CUDA graph cannot hold. Loops and conditionals may also synchronise.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})
CONTROL_FLOW_OPS = frozenset({"Loop", "If", "Scan"})


def onnx_op_types(model: Any) -> set[str]:
    """Every ``op_type`` in an ``onnx.ModelProto``, including those inside If/Loop/Scan subgraphs."""
    found: set[str] = set()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            found.add(node.op_type)
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return found


def cuda_graph_decision(trt_version: str, input_shapes: Mapping[str, Sequence[int]],
                        output_shapes: Mapping[str, Sequence[int]], onnx_ops: Iterable[str] = (),
                        api_supports_graphs: bool = True) -> tuple[bool, str]:
    """Whether this run (these input shapes) can be captured into a CUDA graph and replayed: ``(True, "")`` or
    ``(False, why not)``.

    It can when TensorRT is 8.0 or newer, every input and output shape of the run is known (a graph replays
    fixed sizes and addresses: one graph per input shape), no op has a data-dependent output size
    (:data:`DATA_DEPENDENT_OPS`) or control flow (:data:`CONTROL_FLOW_OPS`), and the CUDA adapter can capture.
    """
    major, _, _ = parse_trt_version(trt_version)
    if major < 8:
        return False, f"TensorRT {trt_version} is older than 8.0, whose enqueue can be captured into a CUDA graph"
    if not api_supports_graphs:
        return False, "the PyCUDA adapter does not capture CUDA graphs; install cuda-python (pip install cuda-python)"
    for kind, shapes in (("input", input_shapes), ("output", output_shapes)):
        for name, shape in shapes.items():
            if any(int(d) < 0 for d in shape):
                why = ("is not set for this run" if kind == "input"
                       else "depends on the input values (a data-dependent shape)")
                return False, (f"{kind} {name!r} has shape {tuple(int(d) for d in shape)}, which {why}; a CUDA "
                               f"graph replays fixed shapes")
    ops = set(onnx_ops)
    dds = sorted(ops & DATA_DEPENDENT_OPS)
    if dds:
        return False, (f"the model has {', '.join(dds)} node(s), whose output sizes depend on the data; TensorRT "
                       f"reads them back to the host mid-run, which a CUDA graph cannot replay")
    flow = sorted(ops & CONTROL_FLOW_OPS)
    if flow:
        return False, (f"the model has {', '.join(flow)} node(s); TensorRT may synchronise with the host to run "
                       f"control flow, which a CUDA graph cannot replay")
    return True, ""


_ELIGIBLE = "Layers eligible for sparse math:"
_PICKED = "picked sparse implementation for layers:"
_LAYER_LINE = re.compile(r"Layer\((?P<type>[^)]*)\):\s*(?P<name>.+?),\s*Tactic:\s*(?P<rest>.*)$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: layer names like ``PWN(a, b)`` contain commas themselves."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def parse_build_log(lines: Iterable[str]) -> dict[str, list[str]]:
    """Which layers could use 2:4 sparse kernels and which got one, from TensorRT's builder log.

    Formats (as quoted in NVIDIA/TensorRT issues #1403, #2169 and #4056, TensorRT 8.x-10.x, INFO level):
    ``(Sparsity) Layers eligible for sparse math: Conv_619 + Relu_620, Conv_626, ...`` and
    ``(Sparsity) TRT inference plan picked sparse implementation for layers: ...`` (an empty list when none),
    each line possibly behind a ``[timestamp] [I] [TRT]`` prefix. The verbose engine-layer lines
    ``Layer(CaskConvolution): <name>, Tactic: 0x..., <in> -> <out>`` (forums, TensorRT 8.x-10.x) also count
    a layer as sparse when its type or tactic text says ``sparse``. Order is kept, duplicates dropped.
    """
    eligible: list[str] = []
    ran: list[str] = []
    for raw in lines:
        for line in str(raw).splitlines():
            if _ELIGIBLE in line:
                eligible.extend(_split_top_level(line.split(_ELIGIBLE, 1)[1]))
            elif _PICKED in line:
                ran.extend(_split_top_level(line.split(_PICKED, 1)[1]))
            else:
                m = _LAYER_LINE.search(line)
                if m and "sparse" in (m.group("type") + " " + m.group("rest")).lower():
                    ran.append(m.group("name").strip())
    return {"eligible_sparse": list(dict.fromkeys(eligible)), "ran_sparse": list(dict.fromkeys(ran))}


_FORMAT_TOKENS = (("bfloat16", "bf16"), ("bf16", "bf16"), ("fp32", "fp32"), ("float", "fp32"),
                  ("fp16", "fp16"), ("half", "fp16"), ("fp8", "fp8"), ("fp4", "fp4"), ("uint8", "uint8"),
                  ("int8", "int8"), ("int4", "int4"), ("int32", "int32"), ("int64", "int64"),
                  ("bool", "bool"))


def precision_from_format(fmt: str | None) -> str | None:
    """``"Channel major FP16 format where channel % 8 == 0"`` -> ``"fp16"``; None when no type is named."""
    if not fmt:
        return None
    words = re.findall(r"[a-z0-9]+", fmt.lower())
    for token, name in _FORMAT_TOKENS:
        if token in words:
            return name
    return None


def summarize_inspector(info: Mapping[str, Any] | str) -> list[dict[str, Any]]:
    """Per engine layer ``{name, layer_type, tactic, precision, sparse, onnx_nodes}`` from the engine
    inspector's JSON (``LayerInformationFormat.JSON``; a dict or its text).

    ``precision`` is read from the first output's ``Format/Datatype`` (the inputs' when a layer has no
    outputs), ``sparse`` from ``HasSparseWeights``, ``onnx_nodes`` from ``Metadata``. An engine built
    without DETAILED verbosity lists bare names; their other fields are None.
    """
    from trt_prune.profiling.layers import onnx_nodes_from_metadata

    if isinstance(info, str):
        try:
            info = json.loads(info)
        except ValueError as exc:
            raise BackendError(f"engine inspector output is not JSON: {exc}") from exc
    if not isinstance(info, Mapping) or not isinstance(info.get("Layers"), list):
        keys = sorted(info) if isinstance(info, Mapping) else type(info).__name__
        raise BackendError(f"engine inspector JSON must have a 'Layers' list; got {keys}")
    rows = []
    for layer in info["Layers"]:
        if isinstance(layer, str):
            rows.append({"name": layer, "layer_type": None, "tactic": None, "precision": None, "sparse": None,
                         "onnx_nodes": []})
            continue
        tensors = layer.get("Outputs") or layer.get("Inputs") or []
        fmt = tensors[0].get("Format/Datatype") if tensors else None
        rows.append({
            "name": layer.get("Name"),
            "layer_type": layer.get("LayerType"),
            "tactic": layer.get("TacticName") or None,
            "precision": precision_from_format(fmt),
            "sparse": bool(int(layer.get("HasSparseWeights", 0) or 0)),
            "onnx_nodes": onnx_nodes_from_metadata(layer.get("Metadata")),
        })
    return rows


# --------------------------------------------------------------------------------------------------------
# Thin layer over tensorrt and the CUDA libraries


def _import_error(module: str) -> str | None:
    """None when ``module`` imports, else why not (the bindings raise OSError, not ImportError, when a shared
    library is missing)."""
    try:
        __import__(module)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _cuda(result: Any, what: str, cudart: Any) -> Any:
    """Unwrap a cuda.bindings result tuple ``(err, *values)``, raising on error."""
    err = result[0]
    if int(err) != 0:
        _, text = cudart.cudaGetErrorString(err)
        raise BackendError(f"CUDA {what} failed: {err} ({text.decode() if isinstance(text, bytes) else text})")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


class CudaApi(ABC):
    """The CUDA calls the session makes: device memory, streams, async copies, timing events, graph capture.

    Pointers are ints; streams, events and graphs are whatever the library hands out. Every failing call
    raises :class:`BackendError` naming the call.
    """

    name: str = ""
    supports_graphs: bool = False

    @abstractmethod
    def device_info(self) -> tuple[str, str]:
        """``(GPU name, "major.minor" compute capability)`` of the current device."""

    @abstractmethod
    def alloc(self, nbytes: int) -> int: ...

    @abstractmethod
    def free(self, ptr: int) -> None: ...

    def host_alloc(self, nbytes: int) -> int:
        """Page-locked host memory of ``nbytes`` bytes, as a pointer. Copies from it run at full bus speed and
        truly asynchronously; from pageable memory the driver stages them through a pinned bounce buffer."""
        raise BackendError(f"the {self.name} adapter does not allocate page-locked host memory")

    def host_free(self, ptr: int) -> None:
        return None

    @abstractmethod
    def stream_create(self) -> Any: ...

    @abstractmethod
    def stream_handle(self, stream: Any) -> int:
        """The ``cudaStream_t`` as an int, what ``execute_async_v3`` takes."""

    @abstractmethod
    def stream_sync(self, stream: Any) -> None: ...

    @abstractmethod
    def stream_destroy(self, stream: Any) -> None: ...

    @abstractmethod
    def copy_htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        """Queue a copy of the contiguous host array ``src`` to device pointer ``dst``."""

    @abstractmethod
    def copy_dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        """Queue a copy of ``dst.nbytes`` bytes from device pointer ``src`` into the contiguous array ``dst``."""

    @abstractmethod
    def event_create(self) -> Any: ...

    @abstractmethod
    def event_record(self, event: Any, stream: Any) -> None: ...

    @abstractmethod
    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        """Milliseconds from ``start`` to ``end``, waiting for ``end`` to complete."""

    @abstractmethod
    def event_destroy(self, event: Any) -> None: ...

    def begin_capture(self, stream: Any) -> None:
        raise BackendError(f"the {self.name} adapter does not capture CUDA graphs; install cuda-python")

    def end_capture(self, stream: Any) -> Any:
        """End the capture begun on ``stream`` and return the instantiated (executable) graph."""
        raise BackendError(f"the {self.name} adapter does not capture CUDA graphs; install cuda-python")

    def graph_launch(self, graph: Any, stream: Any) -> None:
        raise BackendError(f"the {self.name} adapter does not launch CUDA graphs; install cuda-python")

    def graph_destroy(self, graph: Any) -> None:
        return None


class CudaPythonApi(CudaApi):
    """:class:`CudaApi` over cuda-python's ``cuda.bindings.runtime``."""

    name = "cuda-python"
    supports_graphs = True

    def __init__(self, cudart: Any = None) -> None:
        if cudart is None:
            from cuda.bindings import runtime as cudart
        self.cudart = cudart

    @staticmethod
    def device_count() -> tuple[int, str]:
        """``(visible GPUs, "" or why none)``."""
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        return (count, "") if int(err) == 0 else (0, f"cudaGetDeviceCount: {err}")

    def device_info(self) -> tuple[str, str]:
        rt = self.cudart
        device = _cuda(rt.cudaGetDevice(), "cudaGetDevice", rt)
        props = _cuda(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties", rt)
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"

    def alloc(self, nbytes: int) -> int:
        return int(_cuda(self.cudart.cudaMalloc(nbytes), "cudaMalloc", self.cudart))

    def free(self, ptr: int) -> None:
        _cuda(self.cudart.cudaFree(ptr), "cudaFree", self.cudart)

    def host_alloc(self, nbytes: int) -> int:
        return int(_cuda(self.cudart.cudaMallocHost(nbytes), "cudaMallocHost", self.cudart))

    def host_free(self, ptr: int) -> None:
        _cuda(self.cudart.cudaFreeHost(ptr), "cudaFreeHost", self.cudart)

    def stream_create(self) -> Any:
        return _cuda(self.cudart.cudaStreamCreate(), "cudaStreamCreate", self.cudart)

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def stream_sync(self, stream: Any) -> None:
        _cuda(self.cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize", self.cudart)

    def stream_destroy(self, stream: Any) -> None:
        _cuda(self.cudart.cudaStreamDestroy(stream), "cudaStreamDestroy", self.cudart)

    def copy_htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        _cuda(self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream),
              "cudaMemcpyAsync (host to device)", self.cudart)

    def copy_dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda(self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream),
              "cudaMemcpyAsync (device to host)", self.cudart)

    def event_create(self) -> Any:
        return _cuda(self.cudart.cudaEventCreate(), "cudaEventCreate", self.cudart)

    def event_record(self, event: Any, stream: Any) -> None:
        _cuda(self.cudart.cudaEventRecord(event, stream), "cudaEventRecord", self.cudart)

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        _cuda(self.cudart.cudaEventSynchronize(end), "cudaEventSynchronize", self.cudart)
        return float(_cuda(self.cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime", self.cudart))

    def event_destroy(self, event: Any) -> None:
        _cuda(self.cudart.cudaEventDestroy(event), "cudaEventDestroy", self.cudart)

    def begin_capture(self, stream: Any) -> None:
        # thread-local: calls other threads make (another session, a data loader) do not invalidate the capture
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _cuda(self.cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture", self.cudart)

    def end_capture(self, stream: Any) -> Any:
        graph = _cuda(self.cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture", self.cudart)
        try:
            return _cuda(self.cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate", self.cudart)
        finally:  # the executable graph keeps what it needs
            self.cudart.cudaGraphDestroy(graph)

    def graph_launch(self, graph: Any, stream: Any) -> None:
        _cuda(self.cudart.cudaGraphLaunch(graph, stream), "cudaGraphLaunch", self.cudart)

    def graph_destroy(self, graph: Any) -> None:
        _cuda(self.cudart.cudaGraphExecDestroy(graph), "cudaGraphExecDestroy", self.cudart)


class PyCudaApi(CudaApi):
    """:class:`CudaApi` over ``pycuda.driver``, on the device's primary context (the one TensorRT, which uses
    the CUDA runtime, works in). It captures no CUDA graphs."""

    name = "pycuda"
    supports_graphs = False

    def __init__(self, driver: Any = None) -> None:
        if driver is None:
            import pycuda.driver as driver

            try:
                import pycuda.autoprimaryctx  # noqa: F401  (retains and activates the primary context)
            except ImportError:  # PyCUDA before 2021.1
                import pycuda.autoinit  # noqa: F401
        self.driver = driver
        self._allocations: dict[int, Any] = {}  # a DeviceAllocation frees its memory when collected
        self._host: dict[int, np.ndarray] = {}  # page-locked arrays; their base frees the memory

    @staticmethod
    def device_count() -> tuple[int, str]:
        import pycuda.driver as driver

        try:
            driver.init()
            return driver.Device.count(), ""
        except Exception as exc:
            return 0, f"pycuda.driver: {type(exc).__name__}: {exc}"

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # pycuda.driver.Error and subclasses
            raise BackendError(f"PyCUDA {what} failed: {type(exc).__name__}: {exc}") from exc

    def device_info(self) -> tuple[str, str]:
        device = self._call("Context.get_device", self.driver.Context.get_device)
        major, minor = device.compute_capability()
        return str(device.name()).strip(), f"{major}.{minor}"

    def alloc(self, nbytes: int) -> int:
        allocation = self._call("mem_alloc", self.driver.mem_alloc, nbytes)
        ptr = int(allocation)
        self._allocations[ptr] = allocation
        return ptr

    def free(self, ptr: int) -> None:
        allocation = self._allocations.pop(ptr, None)
        if allocation is not None:
            self._call("DeviceAllocation.free", allocation.free)

    def host_alloc(self, nbytes: int) -> int:
        array = self._call("pagelocked_empty", self.driver.pagelocked_empty, (nbytes,), np.uint8)
        self._host[array.ctypes.data] = array
        return array.ctypes.data

    def host_free(self, ptr: int) -> None:
        array = self._host.pop(ptr, None)
        free = getattr(getattr(array, "base", None), "free", None)  # PyCUDA's HostAllocation; else GC frees it
        if free is not None:
            self._call("HostAllocation.free", free)

    def stream_create(self) -> Any:
        return self._call("Stream", self.driver.Stream)

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def stream_sync(self, stream: Any) -> None:
        self._call("Stream.synchronize", stream.synchronize)

    def stream_destroy(self, stream: Any) -> None:
        return None  # PyCUDA destroys a stream when the object is collected

    def copy_htod_async(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._call("memcpy_htod_async", self.driver.memcpy_htod_async, dst, src, stream)

    def copy_dtoh_async(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._call("memcpy_dtoh_async", self.driver.memcpy_dtoh_async, dst, src, stream)

    def event_create(self) -> Any:
        return self._call("Event", self.driver.Event)

    def event_record(self, event: Any, stream: Any) -> None:
        self._call("Event.record", event.record, stream)

    def event_elapsed_ms(self, start: Any, end: Any) -> float:
        self._call("Event.synchronize", end.synchronize)
        return float(self._call("Event.time_till", start.time_till, end))

    def event_destroy(self, event: Any) -> None:
        return None


def make_cuda_api(name: str) -> CudaApi:
    """The adapter :func:`choose_cuda_api` named."""
    if name == "cuda-python":
        return CudaPythonApi()
    if name == "pycuda":
        return PyCudaApi()
    raise BackendError(f"unknown CUDA API {name!r}; use one of {list(CUDA_APIS)}")


def _read_json(path: Path, what: str, entry: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BackendError(f"cannot read the {what} {path}: {type(exc).__name__}: {exc}; delete it and the other "
                           f"files of its cache entry ({entry}) and build again, or pass a new cache_dir") from exc


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either complete or absent, even if the process dies mid-write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_cached_engine(paths: Mapping[str, Path], trt_version: str, gpu_name: str, compute_capability: str,
                       onnx_sha256: str, build_sha256: str, notes: list[str]) -> tuple[bytes | None, Any]:
    """The engine bytes and stored sparsity report of a cache entry, or ``(None, None)`` when there is none to
    use. Raises :class:`BackendError` when the entry is for another machine or build, or is damaged."""
    engine_file, meta_file = paths["engine"], paths["meta"]
    if not engine_file.is_file():
        return None, None
    if not meta_file.is_file():
        notes.append(f"cached engine {engine_file} has no {meta_file.name} (stored by an older trt_prune, or its "
                     f"build was cut off); rebuilding it")
        return None, None
    entry = f"{engine_file.stem}.*"  # keys hold dots (the TensorRT version): strip only ".engine"
    meta = _read_json(meta_file, "engine meta sidecar", entry)
    check_engine_meta(meta, trt_version, gpu_name, compute_capability, onnx_sha256=onnx_sha256,
                      build_sha256=build_sha256, engine=engine_file)
    data = engine_file.read_bytes()
    check_engine_bytes(meta, data, engine_file)
    sparsity = _read_json(paths["sparsity"], "sparsity report", entry) if paths["sparsity"].is_file() else None
    notes.append(f"engine loaded from cache {engine_file}")
    return data, sparsity


def deserialize_engine(runtime: Any, data: bytes, source: str | os.PathLike | None,
                       log_lines: Sequence[str] = ()) -> Any:
    """``runtime.deserialize_cuda_engine(data)``, raising one :class:`BackendError` when it returns None or
    raises. ``source`` is the engine file it came from (None: built just now)."""
    try:
        engine = runtime.deserialize_cuda_engine(data)
        why = ""
    except Exception as exc:
        engine, why = None, f" ({type(exc).__name__}: {exc})"
    if engine is not None:
        return engine
    if source is None:
        raise BackendError(f"TensorRT could not deserialise the engine it just built{why}; log: {_tail(log_lines)}")
    raise BackendError(f"TensorRT could not deserialise the engine file {os.fspath(source)} ({len(data)} bytes){why}: "
                       f"it is corrupt, truncated or from another TensorRT build; delete it and its sidecars and "
                       f"build again (or pass a new cache_dir); log: {_tail(log_lines)}")


@register_backend
class TensorRTBackend(Backend):
    """Builds engines with TensorRT's ONNX parser and runs them with ``execute_async_v3``."""

    name = "tensorrt"
    install_hint = INSTALL_HINT
    library = "tensorrt"

    def available(self) -> tuple[bool, str]:
        trt_error = _import_error("tensorrt")
        errors = {name: _import_error(module) for name, module in _MODULES.items()}
        missing = [f"the tensorrt package ({trt_error})"] if trt_error else []
        try:
            api = choose_cuda_api(errors["cuda-python"] is None, errors["pycuda"] is None)
        except BackendUnavailableError:
            missing.append(f"cuda-python's cuda.bindings ({errors['cuda-python']}) or PyCUDA's pycuda.driver "
                           f"({errors['pycuda']})")
            api = None
        if missing:
            return False, f"cannot import {' and '.join(missing)}; {INSTALL_HINT}"
        count, why = (CudaPythonApi if api == "cuda-python" else PyCudaApi).device_count()
        if count < 1:
            return False, (f"no CUDA GPU is visible ({why or 'device count 0'}); TensorRT needs an NVIDIA GPU "
                           f"and driver")
        return True, ""

    def _build_impl(self, onnx_path: Path, config: BuildConfig) -> Session:
        import onnx
        import tensorrt as trt

        plan = plan_build(trt.__version__, config)
        options = runtime_options(config)
        api = make_cuda_api(choose_cuda_api(_import_error(_MODULES["cuda-python"]) is None,
                                            _import_error(_MODULES["pycuda"]) is None, options["cuda_api"]))
        model = onnx.load(str(onnx_path), load_external_data=False)
        inputs, _ = onnx_io_specs(model)
        ranges = resolve_shape_ranges(inputs, config)
        gpu_name, cc = api.device_info()
        from trt_prune.onnx_io import onnx_sha256  # hashes external weight files too

        onnx_hash = onnx_sha256(onnx_path)
        build_config = replace(config, shapes=ranges)
        key = engine_cache_key(onnx_hash, trt.__version__, gpu_name, cc, build_config)
        logger = _make_logger(trt)
        trt.init_libnvinfer_plugins(logger, "")  # engines that use plugins cannot deserialise without it
        notes = list(plan.warnings)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        paths = cache_paths(cache_dir, key) if cache_dir else None
        engine_bytes, sparsity, source = None, None, None
        if paths is not None:
            engine_bytes, sparsity = read_cached_engine(paths, trt.__version__, gpu_name, cc, onnx_hash,
                                                        build_config_sha256(build_config), notes)
            source = paths["engine"] if engine_bytes is not None else None
        if engine_bytes is None:
            timing_file = None
            if cache_dir is not None:
                cache_dir.mkdir(parents=True, exist_ok=True)
                timing_file = cache_dir / f"timing_{re.sub(r'[^A-Za-z0-9]+', '-', gpu_name)}_trt{trt.__version__}.cache"
            engine_bytes = _build_engine(trt, logger, onnx_path, plan, ranges, timing_file)
            sparsity = parse_build_log(logger.lines)
            if paths is not None:
                _write_atomic(paths["engine"], engine_bytes)
                paths["log"].write_text("\n".join(logger.lines) + "\n", encoding="utf-8")
                paths["sparsity"].write_text(json.dumps(sparsity, indent=1), encoding="utf-8")
                meta = engine_meta(onnx_hash, trt.__version__, gpu_name, cc, build_config, engine_bytes)
                _write_atomic(paths["meta"], json.dumps(meta, indent=1).encode())  # last: the entry is complete
        runtime = trt.Runtime(logger)
        engine = deserialize_engine(runtime, engine_bytes, source, logger.lines)
        inspector_json = json.loads(engine.create_engine_inspector().get_engine_information(
            trt.LayerInformationFormat.JSON))
        if paths is not None:
            paths["inspector"].write_text(json.dumps(inspector_json, indent=1), encoding="utf-8")
        session = TensorRTSession(trt, api, runtime, engine, logger, onnx_path, ranges,
                                  cuda_graph=options["cuda_graph"], onnx_ops=onnx_op_types(model),
                                  pinned_host=options["pinned_host"])
        session.notes.extend(notes)
        session.plan = plan
        session.cache_key = key
        session.sparsity = sparsity
        session.inspector = summarize_inspector(inspector_json)
        session.inspector_json = inspector_json
        session.device = {"gpu": gpu_name, "compute_capability": cc}
        return session


def _tail(lines: Sequence[str], n: int = 5) -> str:
    return " | ".join(lines[-n:]) if lines else "(empty)"


def _make_logger(trt: Any) -> Any:
    """An ILogger that keeps INFO and worse: the (Sparsity) report is logged at INFO."""

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.INFO):
                self.lines.append(str(msg))
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return CapturingLogger()


def _build_engine(trt: Any, logger: Any, onnx_path: Path, plan: BuildPlan, ranges: Mapping[str, ShapeRange],
                  timing_file: Path | None) -> bytes:
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from file, so external weights next to it are found
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError(f"TensorRT's ONNX parser rejected {str(onnx_path)!r}: {'; '.join(errors)}")
    cfg = builder.create_builder_config()
    for name in plan.builder_flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise BackendError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}; the build plan asked "
                               f"for it ({plan.builder_flags})")
        cfg.set_flag(flag)
    for name in plan.cleared_flags:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is not None:
            cfg.clear_flag(flag)
    cfg.profiling_verbosity = getattr(trt.ProfilingVerbosity, plan.profiling_verbosity)
    if plan.optimization_level is not None:
        cfg.builder_optimization_level = plan.optimization_level
    if plan.workspace_bytes:
        cfg.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in ranges.items():
        profile.set_shape(name, lo, opt, hi)
    cfg.add_optimization_profile(profile)
    cache_bytes = timing_file.read_bytes() if timing_file is not None and timing_file.is_file() else b""
    timing_cache = cfg.create_timing_cache(cache_bytes)
    cfg.set_timing_cache(timing_cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, cfg)
    if serialized is None:
        raise BackendError(f"TensorRT could not build an engine for {str(onnx_path)!r}; "
                           f"log: {_tail(logger.lines)}")
    if timing_file is not None:
        timing_file.write_bytes(bytes(memoryview(cfg.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


class Buffers:
    """Named allocations (device memory, or page-locked host memory), grown on demand and freed on close."""

    def __init__(self, alloc: Callable[[int], int], free: Callable[[int], None]) -> None:
        self._alloc, self._free = alloc, free
        self._ptrs: dict[str, tuple[int, int]] = {}

    def get(self, name: str, nbytes: int) -> int:
        """Pointer for ``name`` with room for ``nbytes`` (reallocated only when too small)."""
        ptr, size = self._ptrs.get(name, (0, 0))
        if size < max(nbytes, 1):
            if ptr:
                self._free(ptr)
                del self._ptrs[name]
            ptr = self._alloc(max(nbytes, 1))
            self._ptrs[name] = (ptr, max(nbytes, 1))
        return ptr

    def free(self) -> None:
        for ptr, _ in self._ptrs.values():
            with contextlib.suppress(BackendError):  # closing after a CUDA error must still release the rest
                self._free(ptr)
        self._ptrs.clear()


class _PinnedUnavailable(BackendError):
    """The CUDA library refused page-locked host memory (the session falls back to pageable arrays)."""


@dataclass
class _Prepared:
    context: Any
    host_inputs: dict[str, np.ndarray]
    host_outputs: dict[str, np.ndarray]
    device: dict[str, int]
    graph: Any = None  # the executable CUDA graph replacing execute_async_v3, when one is used


class TensorRTSession(Session):
    """A deserialised engine with one execution context and one CUDA stream.

    With ``cuda_graph``, :meth:`run`, :meth:`time` and :meth:`time_breakdown` replay ``execute_async_v3``
    from a CUDA graph captured once per input shape (the copies stay outside the graph, as in trtexec);
    :meth:`profile_layers` always runs without one. With ``pinned_host`` (the default) inputs and outputs are
    staged in page-locked host buffers, as trtexec's are; where the driver refuses page-locked memory the
    session says so in :attr:`notes` and uses ordinary (pageable) arrays.
    """

    backend_name = "tensorrt"

    def __init__(self, trt: Any, api: CudaApi, runtime: Any, engine: Any, logger: Any, onnx_path: Path,
                 ranges: Mapping[str, ShapeRange], cuda_graph: bool = False,
                 onnx_ops: Iterable[str] = (), pinned_host: bool = True) -> None:
        super().__init__()
        self._trt, self._api = trt, api
        self._runtime, self._engine, self._logger = runtime, engine, logger
        self.onnx_path = Path(onnx_path)
        self.ranges = dict(ranges)
        self.cuda_graph = bool(cuda_graph)
        self.pinned_host = bool(pinned_host)
        self._onnx_ops = frozenset(onnx_ops)
        self.plan: BuildPlan | None = None
        self.cache_key: str | None = None
        self.sparsity: dict[str, list[str]] | None = None
        self.inspector: list[dict[str, Any]] = []  # summarize_inspector() rows
        self.inspector_json: dict[str, Any] = {}  # the engine inspector's JSON as TensorRT wrote it
        self.device: dict[str, str] = {}
        self.graph_captures = 0  # CUDA graphs captured so far (one per input shape and buffer layout)
        self._graphs: dict[tuple[Any, ...], Any] = {}  # (input shapes, device addresses) -> graph or None
        self._context = engine.create_execution_context()
        self._stream = api.stream_create()
        self._buffers = Buffers(api.alloc, api.free)
        self._host = Buffers(api.host_alloc, api.host_free)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        specs = {n: TensorSpec(n, tuple(int(d) for d in engine.get_tensor_shape(n)),
                               np.dtype(trt.nptype(engine.get_tensor_dtype(n))).name) for n in names}
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [specs[n] for n in names if is_input[n]]
        self._outputs = [specs[n] for n in names if not is_input[n]]

    def env(self) -> dict[str, Any]:
        return {"backend": self.backend_name, "backend_version": self._trt.__version__, **self.device,
                "strongly_typed": self.plan.strongly_typed if self.plan else None,
                "builder_flags": list(self.plan.builder_flags) if self.plan else None,
                "cuda_api": self._api.name, "cuda_graph": self.cuda_graph,
                "host_memory": "pinned" if self.pinned_host else "pageable"}

    def time_breakdown(self, feeds: Mapping[str, np.ndarray], warmup_s: float = 1.0, iterations: int = 100,
                       min_duration_s: float = 0.0) -> dict[str, Any]:
        """trtexec's performance summary (:func:`timing_breakdown`) from CUDA events around the input copies,
        the enqueue and the output copies of each inference, one inference in flight at a time.

        Warm-up, ``iterations`` and ``min_duration_s`` work as in :meth:`time`. The result also says whether
        a CUDA graph was replayed (``cuda_graph``).
        """
        prepared = self._start_timing(feeds, warmup_s, iterations, min_duration_s)
        api, stream = self._api, self._stream
        clock = time.perf_counter_ns
        end = clock() + int(warmup_s * 1e9)
        while warmup_s > 0 and clock() < end:
            self._infer(prepared)
        events = [api.event_create() for _ in range(5)]
        ref, h2d, c0, c1, d2h = events
        rows: dict[str, list[float]] = {name: [] for name in _TIMELINE}
        try:
            api.event_record(ref, stream)
            t0 = clock()
            until = t0 + int(min_duration_s * 1e9)
            while len(rows["h2d_start"]) < iterations or clock() < until:
                api.event_record(h2d, stream)
                self._copy_inputs(prepared)
                api.event_record(c0, stream)
                e0 = clock()
                self._enqueue(prepared)
                e1 = clock()
                api.event_record(c1, stream)
                self._copy_outputs(prepared)
                api.event_record(d2h, stream)
                api.stream_sync(stream)
                rows["enqueue_start"].append((e0 - t0) / 1e6)
                rows["enqueue_end"].append((e1 - t0) / 1e6)
                for name, event in zip(_TIMELINE[2:], (h2d, c0, c1, d2h), strict=True):
                    rows[name].append(api.event_elapsed_ms(ref, event))
            wall_ms = (clock() - t0) / 1e6
        finally:
            for event in events:
                with contextlib.suppress(BackendError):
                    api.event_destroy(event)
        result = timing_breakdown(**rows, host_wall_ms=wall_ms)
        result["cuda_graph"] = prepared.graph is not None
        return result

    def _prepare_on(self, context: Any, feeds: dict[str, np.ndarray], tag: str) -> _Prepared:
        try:
            return self._stage(context, feeds, tag)
        except _PinnedUnavailable as exc:
            why = str(exc)
        # The driver refused page-locked memory: drop every pinned buffer (none is in use between calls) and
        # stage in pageable arrays from now on.
        self.pinned_host = False
        self._host.free()
        self._note_once(f"page-locked host memory unavailable ({why}); inputs and outputs use pageable memory, "
                        f"so H2D/D2H times are slower than trtexec's")
        return self._stage(context, feeds, tag)

    def _stage(self, context: Any, feeds: dict[str, np.ndarray], tag: str) -> _Prepared:
        for spec in self._inputs:
            shape = feeds[spec.name].shape
            lo, _, hi = self.ranges[spec.name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                raise BackendError(f"input {spec.name!r} has shape {shape}, outside the engine's profile "
                                   f"min {lo} / max {hi}; rebuild with BuildConfig.shapes or batch covering it")
            context.set_input_shape(spec.name, shape)
        host_inputs, host_outputs, device = {}, {}, {}
        for spec in self._inputs:
            feed = feeds[spec.name]
            staged = self._host_array(f"{tag}:{spec.name}", feed.shape, feed.dtype)
            if staged is None:
                host_inputs[spec.name] = np.ascontiguousarray(feed)
            else:
                np.copyto(staged, feed)
                host_inputs[spec.name] = staged
            device[spec.name] = self._buffers.get(f"{tag}:{spec.name}", host_inputs[spec.name].nbytes)
        for spec in self._outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise BackendError(f"output {spec.name!r} has a data-dependent shape {shape}; this backend "
                                   f"needs output shapes known from the input shapes")
            dtype = np.dtype(spec.dtype)
            staged = self._host_array(f"{tag}:{spec.name}", shape, dtype)
            host_outputs[spec.name] = np.empty(shape, dtype=dtype) if staged is None else staged
            device[spec.name] = self._buffers.get(f"{tag}:{spec.name}", host_outputs[spec.name].nbytes)
        for name, ptr in device.items():
            context.set_tensor_address(name, ptr)
        return _Prepared(context, host_inputs, host_outputs, device)

    def _host_array(self, name: str, shape: Sequence[int], dtype: np.dtype) -> np.ndarray | None:
        """A page-locked host array for ``name``, or None when this session uses pageable memory."""
        if not self.pinned_host:
            return None
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        try:
            ptr = self._host.get(name, count * dtype.itemsize)
        except BackendError as exc:
            raise _PinnedUnavailable(str(exc)) from exc
        # a writable view over the buffer, which self._host keeps alive until close or regrowth
        memory = (ctypes.c_uint8 * max(count * dtype.itemsize, 1)).from_address(ptr)
        return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)

    def _prepare(self, feeds: dict[str, np.ndarray]) -> _Prepared:
        prepared = self._prepare_on(self._context, feeds, "main")
        if self.cuda_graph:
            prepared.graph = self._graph_for(prepared)
        return prepared

    def _note_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def _graph_for(self, prepared: _Prepared) -> Any:
        """The CUDA graph for this run's input shapes, captured on first use; None where none can be used."""
        shapes = {n: tuple(a.shape) for n, a in prepared.host_inputs.items()}
        ok, why = cuda_graph_decision(self._trt.__version__, shapes,
                                      {n: a.shape for n, a in prepared.host_outputs.items()}, self._onnx_ops,
                                      self._api.supports_graphs)
        if not ok:
            self._note_once(f"CUDA graph not used: {why}")
            return None
        # A graph replays the addresses it was captured with; buffers only grow, so a graph captured before a
        # reallocation points at freed memory and is dropped.
        addresses = tuple(sorted(prepared.device.items()))
        for key in [k for k in self._graphs if k[1] != addresses]:
            self._destroy_graph(self._graphs.pop(key))
        key = (tuple(sorted(shapes.items())), addresses)
        if key not in self._graphs:
            self._graphs[key] = self._capture(prepared)
        return self._graphs[key]

    def _capture(self, prepared: _Prepared) -> Any:
        api, stream = self._api, self._stream
        # One plain enqueue first: after a shape change TensorRT may do set-up work on the first enqueue that
        # must not end up inside the graph.
        self._execute(prepared.context)
        api.stream_sync(stream)
        api.begin_capture(stream)
        try:
            ok = prepared.context.execute_async_v3(api.stream_handle(stream))
        except Exception:
            with contextlib.suppress(Exception):
                api.graph_destroy(api.end_capture(stream))
            raise
        try:
            graph = api.end_capture(stream)
        except BackendError as exc:  # e.g. the engine synchronised mid-run and invalidated the capture
            self._note_once(f"CUDA graph capture failed ({exc}); running without a graph")
            return None
        if not ok:
            self._destroy_graph(graph)
            raise BackendError(f"TensorRT execute_async_v3 failed while capturing a CUDA graph; log: "
                               f"{_tail(self._logger.lines)}")
        self.graph_captures += 1
        return graph

    def _destroy_graph(self, graph: Any) -> None:
        if graph is not None:
            with contextlib.suppress(BackendError):
                self._api.graph_destroy(graph)

    def _execute(self, context: Any) -> None:
        if not context.execute_async_v3(self._api.stream_handle(self._stream)):
            raise BackendError(f"TensorRT execute_async_v3 failed; log: {_tail(self._logger.lines)}")

    def _copy_inputs(self, prepared: _Prepared) -> None:
        for name, arr in prepared.host_inputs.items():
            self._api.copy_htod_async(prepared.device[name], arr, self._stream)

    def _enqueue(self, prepared: _Prepared) -> None:
        if prepared.graph is not None:
            self._api.graph_launch(prepared.graph, self._stream)
        else:
            self._execute(prepared.context)

    def _copy_outputs(self, prepared: _Prepared) -> None:
        for name, arr in prepared.host_outputs.items():
            self._api.copy_dtoh_async(arr, prepared.device[name], self._stream)

    def _infer(self, prepared: _Prepared) -> None:
        self._copy_inputs(prepared)
        self._enqueue(prepared)
        self._copy_outputs(prepared)
        self._api.stream_sync(self._stream)

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = self._prepare(feeds)
        self._infer(prepared)
        return {n: a.copy() for n, a in prepared.host_outputs.items()}

    def _profile_layers_impl(self, feeds: dict[str, np.ndarray], runs: int,
                             module_map: Mapping[str, str | None] | None) -> list[LayerTime]:
        import onnx

        from trt_prune.profiling.layers import Graph, build_module_map, layer_module, trt_layer_members

        # A second execution context carries the profiler, so the context time() uses is never instrumented.
        context = self._engine.create_execution_context()
        profiler = _make_profiler(self._trt)
        context.profiler = profiler
        try:
            prepared = self._prepare_on(context, feeds, "profile")  # never a CUDA graph: the profiler needs layers
            self._infer(prepared)  # first run: lazy initialisation, not counted
            profiler.reset()
            host_ms = []
            for _ in range(runs):
                t0 = time.perf_counter_ns()
                self._infer(prepared)
                host_ms.append((time.perf_counter_ns() - t0) / 1e6)
        finally:
            del context
        if not profiler.order:
            raise ProfileError("TensorRT's profiler reported no layers; was the engine built with profiling "
                               "verbosity NONE?")
        model = onnx.load(str(self.onnx_path), load_external_data=False)
        graph = Graph.from_onnx(model)
        mapping = module_map if module_map is not None else build_module_map(model)
        ops = {n.name: n.op for n in graph.nodes}
        node_names = graph.node_names()
        by_name = {row["name"]: row for row in self.inspector}
        rows = []
        for name in profiler.order:
            info = by_name.get(name, {})
            members = trt_layer_members(name, info.get("onnx_nodes") or [], node_names)
            rows.append(LayerTime(name, info.get("layer_type") or "?", profiler.totals[name] / runs,
                                  layer_module(members, ops, mapping), members))
        self.profile_run_ms = sum(host_ms) / len(host_ms)
        return rows

    def _close_impl(self) -> None:
        for graph in self._graphs.values():
            self._destroy_graph(graph)
        self._graphs.clear()
        self._buffers.free()
        self._host.free()
        if self._stream is not None:
            with contextlib.suppress(BackendError):
                self._api.stream_destroy(self._stream)
            self._stream = None
        self._context = None
        self._engine = None
        self._runtime = None


def _make_profiler(trt: Any) -> Any:
    """An IProfiler that sums each layer's reported milliseconds."""

    class SummingProfiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.reset()

        def reset(self) -> None:
            self.totals: dict[str, float] = {}
            self.order: list[str] = []

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            if layer_name not in self.totals:
                self.totals[layer_name] = 0.0
                self.order.append(layer_name)
            self.totals[layer_name] += float(ms)

    return SummingProfiler()
