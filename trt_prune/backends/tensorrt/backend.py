"""The TensorRT backend: ONNX -> engine (built, or loaded from the engine cache) -> :class:`TensorRTSession`.

Only TensorRT calls live here; what to build comes from :mod:`.plan`, whether a stored engine may be used from
:mod:`.cache`, which CUDA library moves the tensors from :mod:`.cuda_api`. ``tensorrt``, ``onnx`` and the CUDA
libraries are imported when an engine is built, never at import time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from trt_prune.backends.base import (
    Backend,
    BuildConfig,
    Session,
    ShapeRange,
    onnx_io_specs,
    register_backend,
    resolve_shape_ranges,
)
from trt_prune.backends.tensorrt.buildlog import log_tail, make_logger, parse_build_log, summarize_inspector
from trt_prune.backends.tensorrt.cache import (
    build_config_sha256,
    cache_paths,
    engine_cache_key,
    engine_meta,
    read_cached_engine,
    timing_cache_path,
    write_cache_entry,
)
from trt_prune.backends.tensorrt.cuda_api import (
    CUDA_MODULES,
    CudaPythonApi,
    PyCudaApi,
    choose_cuda_api,
    make_cuda_api,
)
from trt_prune.backends.tensorrt.plan import KNOWN_EXTRA, BuildPlan, onnx_op_types, plan_build, runtime_options
from trt_prune.backends.tensorrt.session import TensorRTSession
from trt_prune.errors import BackendError, BackendUnavailableError

INSTALL_HINT = ("pip install 'trt_prune[tensorrt]' (TensorRT 10 or 11 Python bindings plus cuda-python; PyCUDA, "
                "'trt_prune[pycuda]', also works); TensorRT needs an NVIDIA GPU and its driver")


def _import_error(module: str) -> str | None:
    """None when ``module`` imports, else why not (the bindings raise OSError, not ImportError, when a shared
    library is missing)."""
    try:
        __import__(module)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


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
        raise BackendError(f"TensorRT could not deserialise the engine it just built{why}; log: {log_tail(log_lines)}")
    raise BackendError(f"TensorRT could not deserialise the engine file {os.fspath(source)} ({len(data)} bytes){why}: "
                       f"it is corrupt, truncated or from another TensorRT build; delete it and its sidecars and "
                       f"build again (or pass a new cache_dir); log: {log_tail(log_lines)}")


@register_backend
class TensorRTBackend(Backend):
    """Builds engines with TensorRT's ONNX parser and runs them with ``execute_async_v3``."""

    name = "tensorrt"
    install_hint = INSTALL_HINT
    library = "tensorrt"
    builds_from = ("onnx",)
    # the BuildConfig features it reads, plus every extra key the build plan knows (one list, in plan.py)
    options = frozenset({"fp16", "sparse_weights", "cache_dir"}) | frozenset(KNOWN_EXTRA)

    def available(self) -> tuple[bool, str]:
        trt_error = _import_error("tensorrt")
        errors = {name: _import_error(module) for name, module in CUDA_MODULES.items()}
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

        model = onnx.load(str(onnx_path), load_external_data=False)
        qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
        plan = plan_build(trt.__version__, config, qdq=qdq)
        options = runtime_options(config)
        api = make_cuda_api(choose_cuda_api(_import_error(CUDA_MODULES["cuda-python"]) is None,
                                            _import_error(CUDA_MODULES["pycuda"]) is None, options["cuda_api"]))
        inputs, _ = onnx_io_specs(model)
        ranges = resolve_shape_ranges(inputs, config)
        gpu_name, cc = api.device_info()
        from trt_prune.onnx_io import onnx_sha256  # hashes external weight files too

        onnx_hash = onnx_sha256(onnx_path)
        build_config = replace(config, shapes=ranges)
        key = engine_cache_key(onnx_hash, trt.__version__, gpu_name, cc, build_config)
        logger = make_logger(trt)
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
                timing_file = timing_cache_path(cache_dir, gpu_name, trt.__version__)
            engine_bytes = _build_engine(trt, logger, onnx_path, plan, ranges, timing_file)
            sparsity = parse_build_log(logger.lines)
            if paths is not None:
                meta = engine_meta(onnx_hash, trt.__version__, gpu_name, cc, build_config, engine_bytes)
                write_cache_entry(paths, engine_bytes, logger.lines, sparsity, meta)
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
                           f"log: {log_tail(logger.lines)}")
    if timing_file is not None:
        timing_file.write_bytes(bytes(memoryview(cfg.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))
