"""An emulated ``tensorrt`` module for the TensorRT backend tests (``test_backends.py``, ``test_tensorrt_logic.py``).

It has the call shapes the backend uses (builder, config, parser, runtime, engine, context, inspector, profiler).
Its engine computes ``y[:, c] = 2 * x[:, c % 3]`` for ``x [batch, 3, H, W]`` and reports ``layers`` to an
attached profiler. On an emulated CUDA library (one with a ``run`` method: :class:`fake_cuda.FakeCudart`,
:func:`fake_cuda.fake_pycuda_driver`) the engine works on the host memory behind the device pointers and queues
that work through ``run``, so a CUDA-graph capture records it; on the real ``cuda.bindings.runtime`` it copies
through ``cudaMemcpy``.

``trt.calls`` lists what was built and how (``init_plugins``, ``("network_flags", flags)``, ``("build", flags,
cleared flags, profile shapes)``, ``deserialize``); ``trt.counts`` counts builds, deserialisations and
executions.
"""

from __future__ import annotations

import ctypes
import json
import types
from collections import Counter
from pathlib import Path

import numpy as np

# (TensorRT layer name, the ONNX nodes it fused, milliseconds it reports to a profiler)
LAYERS = [("/conv1/Conv + /act1/Relu", ["/conv1/Conv", "/act1/Relu"], 0.25),
          ("/conv2/Conv + /act2/Relu + /conv3/Conv", ["/conv2/Conv", "/act2/Relu", "/conv3/Conv"], 0.5)]
ELIGIBLE = "/conv2/Conv + /act2/Relu"  # what the build log calls eligible for sparse math


class _Enum:
    def __init__(self, **members):
        self.__dict__.update(members)


def fake_tensorrt(device, version="10.9.0", layers=LAYERS, eligible=ELIGIBLE):
    """A ``tensorrt`` module over the CUDA library ``device`` (emulated or real)."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls, trt.counts = [], Counter()
    emulated = hasattr(device, "run")
    severity = _Enum(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

    class ILogger:
        Severity = severity

        def __init__(self):
            pass

    class IProfiler:
        def __init__(self):
            pass

    trt.ILogger, trt.IProfiler = ILogger, IProfiler
    trt.BuilderFlag = _Enum(FP16="FP16", SPARSE_WEIGHTS="SPARSE_WEIGHTS", TF32="TF32")
    trt.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=0)
    trt.ProfilingVerbosity = _Enum(DETAILED="DETAILED")
    trt.MemoryPoolType = _Enum(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = _Enum(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.LayerInformationFormat = _Enum(JSON="JSON")
    trt.nptype = lambda dtype: np.float32
    trt.init_libnvinfer_plugins = lambda logger, namespace: trt.calls.append("init_plugins")

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data) or b"fresh"

        def serialize(self):
            return self.data + b"+"

    class Config:
        def __init__(self):
            self.flags, self.cleared, self.profiles = set(), set(), []
            self.timing = None

        def set_flag(self, flag):
            self.flags.add(flag)

        def clear_flag(self, flag):
            self.cleared.add(flag)

        def set_memory_pool_limit(self, pool, size):
            self.workspace = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing = cache

        def get_timing_cache(self):
            return self.timing

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            trt.calls.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.counts["build"] += 1
            trt.calls.append(("build", sorted(config.flags), sorted(config.cleared), config.profiles[0].shapes))
            self.logger.log(severity.INFO, f"(Sparsity) Layers eligible for sparse math: {eligible}")
            self.logger.log(severity.INFO, "(Sparsity) TRT inference plan picked sparse implementation for layers:")
            self.logger.log(severity.VERBOSE, "lots of tactic timing")
            return memoryview(json.dumps({"shapes": config.profiles[0].shapes}).encode())

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return Path(path).is_file()

    class Context:
        def __init__(self):
            self.shapes, self.addresses, self.profiler = {}, {}, None

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def get_tensor_shape(self, name):
            b, _, h, w = self.shapes["x"]
            return (b, 4, h, w)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int)
            trt.counts["execute"] += 1
            shape, x_ptr, y_ptr = self.shapes["x"], self.addresses["x"], self.addresses["y"]
            if emulated:
                def compute():
                    x = np.frombuffer(ctypes.string_at(x_ptr, int(np.prod(shape)) * 4), np.float32).reshape(shape)
                    y = np.ascontiguousarray(2 * x[:, [0, 1, 2, 0]])
                    ctypes.memmove(y_ptr, y.ctypes.data, y.nbytes)

                device.run(compute)
            else:  # real device memory: round-trip through the host (no CUDA graph capture here)
                device.cudaDeviceSynchronize()  # the backend's copies went to its own stream
                kind = device.cudaMemcpyKind
                x = np.empty(shape, np.float32)
                assert device.cudaMemcpy(x.ctypes.data, x_ptr, x.nbytes, kind.cudaMemcpyDeviceToHost)[0] == 0
                y = np.ascontiguousarray(2 * x[:, [0, 1, 2, 0]])
                assert device.cudaMemcpy(y_ptr, y.ctypes.data, y.nbytes, kind.cudaMemcpyHostToDevice)[0] == 0
            if self.profiler is not None:
                for name, _, ms in layers:
                    self.profiler.report_layer_time(name, ms)
            return True

    class Inspector:
        def get_engine_information(self, fmt):
            return json.dumps({"Layers": [
                {"Name": name, "LayerType": "CaskConvolution", "TacticName": "sm90_xmma_fprop",
                 "HasSparseWeights": 0, "Outputs": [{"Format/Datatype": "Row major linear FP32"}],
                 "Metadata": "\u001e".join(f"[ONNX Layer: {m}]" for m in members)}
                for name, members, _ in layers], "Bindings": ["x", "y"]})

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["x", "y"][i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "x" else trt.TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return (-1, 3 if name == "x" else 4, 32, 32)

        def get_tensor_dtype(self, name):
            return "FLOAT"

        def create_execution_context(self):
            return Context()

        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            trt.calls.append("deserialize")
            trt.counts["deserialize"] += 1
            return Engine() if json.loads(bytes(data)) else None  # a truncated engine does not parse

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt
