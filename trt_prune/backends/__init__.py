"""Backends: one interface to build, run, time and profile a model.

``get_backend(name).build(source, BuildConfig(...))`` returns a :class:`Session`. Each backend declares what it
builds from (``builds_from``: an ONNX file for ONNX Runtime and TensorRT, the PyTorch model for torch) and the
options it accepts (``options``, names in :data:`OPTIONS`); the CLI derives its flag checks from those
declarations, and :func:`trt_prune.stages.build` exports a model first for a backend that needs ONNX.
Importing this package imports neither ONNX Runtime, TensorRT nor torch; each backend imports its library
when it is used.
"""

# Imported for their @register_backend side effect; neither imports its library at module level.
from trt_prune.backends import onnxruntime as _onnxruntime  # noqa: E402,F401
from trt_prune.backends import tensorrt as _tensorrt  # noqa: E402,F401
from trt_prune.backends import torch_backend as _torch_backend  # noqa: E402,F401
from trt_prune.backends.base import (
    OPTIONS,
    SOURCE_KINDS,
    Backend,
    BackendOption,
    BuildConfig,
    LayerTime,
    Session,
    TensorSpec,
    available_backends,
    backend_class,
    backend_names,
    backend_status,
    backends_taking,
    check_feeds,
    get_backend,
    register_backend,
    resolve_shape_ranges,
    source_kind,
)

__all__ = ["OPTIONS", "SOURCE_KINDS", "Backend", "BackendOption", "BuildConfig", "LayerTime", "Session",
           "TensorSpec", "available_backends", "backend_class", "backend_names", "backend_status",
           "backends_taking", "check_feeds", "get_backend", "register_backend", "resolve_shape_ranges",
           "source_kind"]
