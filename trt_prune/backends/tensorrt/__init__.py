"""TensorRT backend (10.x and 11.x): ONNX -> engine -> timed execution through cuda-python or PyCUDA.

Every decision is a pure function tested without TensorRT: :func:`plan_build` (flags per TensorRT major
version), :func:`engine_cache_key` and :func:`engine_meta` / :func:`check_engine_meta` /
:func:`check_engine_bytes` (whether a stored engine may be loaded here), :func:`parse_build_log` (what the
builder said about 2:4 sparsity), :func:`summarize_inspector` (tactic, precision and sparsity per engine layer),
:func:`choose_cuda_api` (which CUDA library moves the tensors), :func:`timing_breakdown` (trtexec's summary
from per-iteration timestamps) and :func:`cuda_graph_decision` (whether a run can be replayed from a CUDA
graph). The classes only translate those into TensorRT and CUDA calls.

One module per concern: :mod:`.plan` (what to build and how to run it), :mod:`.cache` (the engine cache),
:mod:`.cuda_api` (the CUDA adapter), :mod:`.buildlog` (TensorRT's log and engine inspector, read),
:mod:`.backend` (:class:`TensorRTBackend`: build or load an engine) and :mod:`.session`
(:class:`TensorRTSession`: run, time and profile it). :func:`timing_breakdown` lives in
:mod:`trt_prune.profiling.stats` and is re-exported here. Importing this package imports neither tensorrt nor
a CUDA library; messages TensorRT logs go to the ``trt_prune.tensorrt`` logger.
"""

from trt_prune.backends.tensorrt.backend import INSTALL_HINT, TensorRTBackend, deserialize_engine
from trt_prune.backends.tensorrt.buildlog import parse_build_log, precision_from_format, summarize_inspector
from trt_prune.backends.tensorrt.cache import (
    HARDWARE_COMPATIBILITY,
    META_FORMAT,
    build_config_sha256,
    cache_paths,
    check_engine_bytes,
    check_engine_meta,
    engine_cache_key,
    engine_meta,
    read_cached_engine,
)
from trt_prune.backends.tensorrt.cuda_api import (
    Buffers,
    CudaApi,
    CudaPythonApi,
    PyCudaApi,
    choose_cuda_api,
    make_cuda_api,
)
from trt_prune.backends.tensorrt.plan import (
    CONTROL_FLOW_OPS,
    CUDA_APIS,
    DATA_DEPENDENT_OPS,
    BuildPlan,
    build_fields,
    cuda_graph_decision,
    onnx_op_types,
    parse_trt_version,
    plan_build,
    runtime_options,
)
from trt_prune.backends.tensorrt.session import TensorRTSession
from trt_prune.profiling.stats import timing_breakdown

__all__ = [
    "CONTROL_FLOW_OPS", "CUDA_APIS", "DATA_DEPENDENT_OPS", "HARDWARE_COMPATIBILITY", "INSTALL_HINT", "META_FORMAT",
    "Buffers", "BuildPlan", "CudaApi", "CudaPythonApi", "PyCudaApi", "TensorRTBackend", "TensorRTSession",
    "build_config_sha256", "build_fields", "cache_paths", "check_engine_bytes", "check_engine_meta",
    "choose_cuda_api", "cuda_graph_decision", "deserialize_engine", "engine_cache_key", "engine_meta",
    "make_cuda_api", "onnx_op_types", "parse_build_log", "parse_trt_version", "plan_build", "precision_from_format",
    "read_cached_engine", "runtime_options", "summarize_inspector", "timing_breakdown",
]
