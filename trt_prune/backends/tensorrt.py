"""TensorRT backend (10.x and 11.x): ONNX -> engine -> timed execution through cuda-python.

Every decision is a pure function tested without TensorRT: :func:`plan_build` (flags per TensorRT major
version), :func:`engine_cache_key`, :func:`parse_build_log` (what the builder said about 2:4 sparsity) and
:func:`summarize_inspector` (tactic, precision and sparsity per engine layer). The classes below only
translate those into TensorRT and CUDA calls.

``BuildConfig.extra`` keys: ``strongly_typed`` (bool; on TensorRT 10 create the network STRONGLY_TYPED so
the ONNX's own types decide precision; TensorRT 11 is always strongly typed), ``tf32`` (bool, default True;
False clears the TF32 flag for bit-faithful fp32, e.g. when comparing against ONNX Runtime),
``workspace_mib`` (int; workspace memory-pool limit).

With ``cache_dir`` set, the engine is stored under :func:`engine_cache_key` together with its build log
(``.log``), parsed sparsity report (``.sparsity.json``) and engine-inspector JSON (``.inspector.json``); the
timing cache is shared per TensorRT version and GPU.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
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
    read_onnx_io,
    register_backend,
    resolve_shape_ranges,
)
from trt_prune.errors import BackendError, ProfileError

INSTALL_HINT = ("pip install 'trt_prune[tensorrt]' (TensorRT 10 or 11 Python bindings plus cuda-python); "
                "TensorRT needs an NVIDIA GPU and its driver")
_KNOWN_EXTRA = {"strongly_typed", "tf32", "workspace_mib"}


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
    (host threads) and ``cache_dir`` (where the engine lives) do not change the engine and are left out.
    """
    if not re.fullmatch(r"[0-9a-fA-F]{64}", onnx_sha256 or ""):
        raise BackendError(f"onnx_sha256 must be 64 hex digits (hashlib.sha256(...).hexdigest()), "
                           f"got {onnx_sha256!r}")
    if not gpu_name:
        raise BackendError("gpu_name must be a non-empty string, e.g. 'NVIDIA H100 80GB HBM3'")
    cc = _cc_string(compute_capability)
    build = {"optimization_level": config.optimization_level, "batch": list(config.batch),
             "shapes": _shape_key(config.shapes), "precision": config.precision,
             "sparse_weights": bool(config.sparse_weights), "extra": config.extra}
    payload = {"onnx": onnx_sha256.lower(), "tensorrt": str(trt_version), "gpu": gpu_name, "cc": cc,
               "build": build}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-")
    version = re.sub(r"[^0-9.]+", "", str(trt_version))
    return f"{slug}_sm{cc.replace('.', '')}_trt{version}_{digest[:24]}"


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
# Thin layer over tensorrt and cuda.bindings


@register_backend
class TensorRTBackend(Backend):
    """Builds engines with TensorRT's ONNX parser and runs them with ``execute_async_v3``."""

    name = "tensorrt"
    install_hint = INSTALL_HINT

    def available(self) -> tuple[bool, str]:
        missing = []
        try:
            import tensorrt  # noqa: F401
        except Exception as exc:  # the bindings raise OSError, not ImportError, when libnvinfer is missing
            missing.append(f"the tensorrt package ({type(exc).__name__}: {exc})")
        try:
            from cuda.bindings import runtime  # noqa: F401
        except Exception as exc:
            missing.append(f"cuda-python's cuda.bindings ({type(exc).__name__}: {exc})")
        if missing:
            return False, f"cannot import {' and '.join(missing)}; {INSTALL_HINT}"
        from cuda.bindings import runtime as cudart

        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or count < 1:
            return False, (f"no CUDA GPU is visible (cudaGetDeviceCount: {err}, count {count}); TensorRT needs "
                           f"an NVIDIA GPU and driver")
        return True, ""

    def version(self) -> str | None:
        try:
            import tensorrt
        except Exception:
            return None
        return tensorrt.__version__

    def _build_impl(self, onnx_path: Path, config: BuildConfig) -> Session:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        plan = plan_build(trt.__version__, config)
        inputs, _ = read_onnx_io(onnx_path)
        ranges = resolve_shape_ranges(inputs, config)
        gpu_name, cc = _device_info(cudart)
        from trt_prune.onnx_io import onnx_sha256  # hashes external weight files too

        key = engine_cache_key(onnx_sha256(onnx_path), trt.__version__, gpu_name, cc,
                               replace(config, shapes=ranges))
        logger = _make_logger(trt)
        trt.init_libnvinfer_plugins(logger, "")  # engines that use plugins cannot deserialise without it
        notes = list(plan.warnings)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        engine_file = cache_dir / f"{key}.engine" if cache_dir else None
        sparsity = None
        if engine_file is not None and engine_file.is_file():
            engine_bytes = engine_file.read_bytes()
            notes.append(f"engine loaded from cache {engine_file}")
            report = engine_file.with_suffix(".sparsity.json")
            if report.is_file():  # what the builder said when this engine was built
                sparsity = json.loads(report.read_text(encoding="utf-8"))
        else:
            timing_file = None
            if cache_dir is not None:
                cache_dir.mkdir(parents=True, exist_ok=True)
                timing_file = cache_dir / f"timing_{re.sub(r'[^A-Za-z0-9]+', '-', gpu_name)}_trt{trt.__version__}.cache"
            engine_bytes = _build_engine(trt, logger, onnx_path, plan, ranges, timing_file)
            sparsity = parse_build_log(logger.lines)
            if engine_file is not None:
                engine_file.write_bytes(engine_bytes)
                engine_file.with_suffix(".log").write_text("\n".join(logger.lines) + "\n", encoding="utf-8")
                engine_file.with_suffix(".sparsity.json").write_text(json.dumps(sparsity, indent=1),
                                                                     encoding="utf-8")
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise BackendError(f"TensorRT could not deserialise the engine for {str(onnx_path)!r}; "
                               f"log: {_tail(logger.lines)}")
        inspector_json = json.loads(engine.create_engine_inspector().get_engine_information(
            trt.LayerInformationFormat.JSON))
        if engine_file is not None:
            engine_file.with_suffix(".inspector.json").write_text(json.dumps(inspector_json, indent=1),
                                                                  encoding="utf-8")
        session = TensorRTSession(trt, cudart, runtime, engine, logger, onnx_path, ranges)
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


def _cuda(result: Any, what: str, cudart: Any) -> Any:
    """Unwrap a cuda.bindings result tuple ``(err, *values)``, raising on error."""
    err = result[0]
    if int(err) != 0:
        _, text = cudart.cudaGetErrorString(err)
        raise BackendError(f"CUDA {what} failed: {err} ({text.decode() if isinstance(text, bytes) else text})")
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def _device_info(cudart: Any) -> tuple[str, str]:
    device = _cuda(cudart.cudaGetDevice(), "cudaGetDevice", cudart)
    props = _cuda(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties", cudart)
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


class DeviceBuffers:
    """Named device allocations through ``cuda.bindings.runtime``, grown on demand and freed on close."""

    def __init__(self, cudart: Any) -> None:
        self._cudart = cudart
        self._ptrs: dict[str, tuple[int, int]] = {}

    def get(self, name: str, nbytes: int) -> int:
        """Device pointer for ``name`` with room for ``nbytes`` (reallocated only when too small)."""
        ptr, size = self._ptrs.get(name, (0, 0))
        if size < max(nbytes, 1):
            if ptr:
                _cuda(self._cudart.cudaFree(ptr), "cudaFree", self._cudart)
            ptr = int(_cuda(self._cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc", self._cudart))
            self._ptrs[name] = (ptr, max(nbytes, 1))
        return ptr

    def free(self) -> None:
        for ptr, _ in self._ptrs.values():
            self._cudart.cudaFree(ptr)
        self._ptrs.clear()


@dataclass
class _Prepared:
    context: Any
    host_inputs: dict[str, np.ndarray]
    host_outputs: dict[str, np.ndarray]
    device: dict[str, int]


class TensorRTSession(Session):
    """A deserialised engine with one execution context and one CUDA stream."""

    backend_name = "tensorrt"

    def __init__(self, trt: Any, cudart: Any, runtime: Any, engine: Any, logger: Any, onnx_path: Path,
                 ranges: Mapping[str, ShapeRange]) -> None:
        super().__init__()
        self._trt, self._cudart = trt, cudart
        self._runtime, self._engine, self._logger = runtime, engine, logger
        self.onnx_path = Path(onnx_path)
        self.ranges = dict(ranges)
        self.plan: BuildPlan | None = None
        self.cache_key: str | None = None
        self.sparsity: dict[str, list[str]] | None = None
        self.inspector: list[dict[str, Any]] = []  # summarize_inspector() rows
        self.inspector_json: dict[str, Any] = {}  # the engine inspector's JSON as TensorRT wrote it
        self.device: dict[str, str] = {}
        self._context = engine.create_execution_context()
        self._stream = _cuda(cudart.cudaStreamCreate(), "cudaStreamCreate", cudart)
        self._buffers = DeviceBuffers(cudart)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        specs = {n: TensorSpec(n, tuple(int(d) for d in engine.get_tensor_shape(n)),
                               np.dtype(trt.nptype(engine.get_tensor_dtype(n))).name) for n in names}
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs = [specs[n] for n in names if is_input[n]]
        self._outputs = [specs[n] for n in names if not is_input[n]]

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def env(self) -> dict[str, Any]:
        return {"backend": self.backend_name, "backend_version": self._trt.__version__, **self.device,
                "strongly_typed": self.plan.strongly_typed if self.plan else None,
                "builder_flags": list(self.plan.builder_flags) if self.plan else None}

    def _prepare_on(self, context: Any, feeds: dict[str, np.ndarray], tag: str) -> _Prepared:
        for spec in self._inputs:
            shape = feeds[spec.name].shape
            lo, _, hi = self.ranges[spec.name]
            if not all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)):
                raise BackendError(f"input {spec.name!r} has shape {shape}, outside the engine's profile "
                                   f"min {lo} / max {hi}; rebuild with BuildConfig.shapes or batch covering it")
            context.set_input_shape(spec.name, shape)
        host_inputs = {n: np.ascontiguousarray(a) for n, a in feeds.items()}
        host_outputs = {}
        device = {}
        for spec in self._inputs:
            device[spec.name] = self._buffers.get(f"{tag}:{spec.name}", host_inputs[spec.name].nbytes)
        for spec in self._outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise BackendError(f"output {spec.name!r} has a data-dependent shape {shape}; this backend "
                                   f"needs output shapes known from the input shapes")
            host_outputs[spec.name] = np.empty(shape, dtype=np.dtype(spec.dtype))
            device[spec.name] = self._buffers.get(f"{tag}:{spec.name}", host_outputs[spec.name].nbytes)
        for name, ptr in device.items():
            context.set_tensor_address(name, ptr)
        return _Prepared(context, host_inputs, host_outputs, device)

    def _prepare(self, feeds: dict[str, np.ndarray]) -> _Prepared:
        return self._prepare_on(self._context, feeds, "main")

    def _infer(self, prepared: _Prepared) -> None:
        cudart, stream = self._cudart, self._stream
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in prepared.host_inputs.items():
            _cuda(cudart.cudaMemcpyAsync(prepared.device[name], arr.ctypes.data, arr.nbytes, h2d, stream),
                  "cudaMemcpyAsync (host to device)", cudart)
        if not prepared.context.execute_async_v3(int(stream)):
            raise BackendError(f"TensorRT execute_async_v3 failed; log: {_tail(self._logger.lines)}")
        for name, arr in prepared.host_outputs.items():
            _cuda(cudart.cudaMemcpyAsync(arr.ctypes.data, prepared.device[name], arr.nbytes, d2h, stream),
                  "cudaMemcpyAsync (device to host)", cudart)
        _cuda(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize", cudart)

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
            prepared = self._prepare_on(context, feeds, "profile")
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
        self._buffers.free()
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
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
