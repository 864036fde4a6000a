"""Backends: one interface to build, run, time and profile a model.

``get_backend(name).build(onnx_path, BuildConfig(...))`` returns a :class:`Session` (ONNX Runtime, TensorRT);
the torch backend builds from the PyTorch model instead (``get_backend("torch").build(model_or_spec, ...)``).
Importing this package imports neither ONNX Runtime, TensorRT nor torch; each backend imports its library
when it is used.
"""

# Imported for their @register_backend side effect; neither imports its library at module level.
from trt_prune.backends import onnxruntime as _onnxruntime  # noqa: E402,F401
from trt_prune.backends import tensorrt as _tensorrt  # noqa: E402,F401
from trt_prune.backends import torch_backend as _torch_backend  # noqa: E402,F401
from trt_prune.backends.base import (
                                     Backend,
                                     BuildConfig,
                                     LayerTime,
                                     Session,
                                     TensorSpec,
                                     available_backends,
                                     backend_names,
                                     backend_status,
                                     check_feeds,
                                     get_backend,
                                     register_backend,
                                     resolve_shape_ranges,
)

__all__ = ["Backend", "BuildConfig", "LayerTime", "Session", "TensorSpec", "available_backends",
           "backend_names", "backend_status", "check_feeds", "get_backend", "register_backend",
           "resolve_shape_ranges"]
