"""An emulated ``cuda.bindings.runtime`` for the TensorRT backend tests (``test_backends.py``,
``test_tensorrt_logic.py``).

Device memory is host memory; work queued while a stream captures is recorded and replayed at graph launch,
as CUDA does, so capture bugs (work run at capture instead of at launch) show.
"""

from __future__ import annotations

import ctypes
import time
from collections import Counter

import numpy as np


class FakeCudart:
    """The cuda.bindings.runtime calls the backend makes."""

    class cudaMemcpyKind:  # noqa: N801 - mirrors the real name
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    class cudaStreamCaptureMode:  # noqa: N801
        cudaStreamCaptureModeThreadLocal = 1

    class _Props:
        name = b"Emulated GPU 80GB\x00\x00"
        major, minor = 9, 0

    class Handle:  # streams, events, graphs
        def __init__(self, value):
            self.value, self.t, self.ops = value, None, None

        def __int__(self):
            return self.value

    def __init__(self, fail_capture=False):
        self.buffers, self.live_graphs = {}, set()
        self.capturing = None
        self.fail_capture = fail_capture
        self.counts = Counter()
        self._next = 1000

    def _handle(self):
        self._next += 1
        return self.Handle(self._next)

    def run(self, op):
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            op()

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetDevice(self):
        return 0, 0

    def cudaGetDeviceProperties(self, device):
        return 0, self._Props()

    def cudaGetErrorString(self, err):
        return 0, b"emulated error"

    def cudaMalloc(self, nbytes):
        buf = np.zeros(nbytes, np.uint8)
        self.buffers[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def cudaFree(self, ptr):
        if ptr not in self.buffers:
            return (1,)
        del self.buffers[ptr]
        return (0,)

    def cudaStreamCreate(self):
        return 0, self._handle()

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaDeviceSynchronize(self):
        return (0,)

    def cudaMemcpy(self, dst, src, count, kind):
        return self.cudaMemcpyAsync(dst, src, count, kind, None)

    def cudaStreamSynchronize(self, stream):
        assert self.capturing is None, "synchronising a capturing stream invalidates the capture"
        return (0,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        self.run(lambda: ctypes.memmove(dst, src, count))
        return (0,)

    def cudaEventCreate(self):
        return 0, self._handle()

    def cudaEventRecord(self, event, stream):
        def record():
            event.t = time.perf_counter()

        self.run(record)
        return (0,)

    def cudaEventSynchronize(self, event):
        return (0,)

    def cudaEventElapsedTime(self, start, end):
        return 0, (end.t - start.t) * 1e3

    def cudaEventDestroy(self, event):
        self.counts["events_destroyed"] += 1
        return (0,)

    def cudaStreamBeginCapture(self, stream, mode):
        assert self.capturing is None and mode == 1
        self.capturing = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        ops, self.capturing = self.capturing, None
        self.counts["end_capture"] += 1
        if self.fail_capture:
            return 901, None  # cudaErrorStreamCaptureInvalidated
        graph = self._handle()
        graph.ops = ops
        return 0, graph

    def cudaGraphInstantiate(self, graph, flags):
        executable = self._handle()
        executable.ops = list(graph.ops)
        self.live_graphs.add(executable.value)
        return 0, executable

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaGraphLaunch(self, executable, stream):
        self.counts["launch"] += 1
        for op in executable.ops:
            op()
        return (0,)

    def cudaGraphExecDestroy(self, executable):
        self.live_graphs.discard(executable.value)
        return (0,)
