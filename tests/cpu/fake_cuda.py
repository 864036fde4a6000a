"""Emulated CUDA libraries for the TensorRT backend tests (``test_backends.py``, ``test_tensorrt_logic.py``):
``cuda.bindings.runtime`` (:class:`FakeCudart`) and ``pycuda.driver`` (:func:`fake_pycuda_driver`), plus
:func:`real_cudart` for the variants that run on a GPU machine.

Device memory is host memory; work queued while a stream captures is recorded and replayed at graph launch,
as CUDA does, so capture bugs (work run at capture instead of at launch) show. Page-locked host buffers are
tracked apart from device buffers, so a test sees which kind each copy used.
"""

from __future__ import annotations

import ctypes
import time
import types
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

    def __init__(self, fail_capture=False, fail_host_alloc=False):
        self.buffers, self.host_buffers, self.live_graphs = {}, {}, set()
        # Freed device memory stays reserved, so no address is handed out twice: a reallocation always moves
        # the buffer, and tests that count CUDA-graph captures do not depend on the host allocator's reuse.
        self._freed: list[np.ndarray] = []
        self.capturing = None
        self.fail_capture, self.fail_host_alloc = fail_capture, fail_host_alloc
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
        self._freed.append(self.buffers.pop(ptr))
        return (0,)

    def cudaMallocHost(self, nbytes):
        if self.fail_host_alloc:
            return 2, 0  # cudaErrorMemoryAllocation
        buf = np.zeros(nbytes, np.uint8)
        self.host_buffers[buf.ctypes.data] = buf
        self.counts["host_alloc"] += 1
        return 0, buf.ctypes.data

    def cudaFreeHost(self, ptr):
        if ptr not in self.host_buffers:
            return (1,)
        del self.host_buffers[ptr]
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
        host = {self.cudaMemcpyKind.cudaMemcpyHostToDevice: ("h2d", src),
                self.cudaMemcpyKind.cudaMemcpyDeviceToHost: ("d2h", dst)}.get(kind)
        if host is not None:  # counts h2d_pinned, h2d_pageable, d2h_pinned, d2h_pageable
            pinned = any(p <= host[1] < p + b.nbytes for p, b in self.host_buffers.items())
            self.counts[f"{host[0]}_{'pinned' if pinned else 'pageable'}"] += 1
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


def fake_pycuda_driver(fail_host_alloc=False):
    """pycuda.driver as the adapter uses it, on host memory."""
    driver = types.ModuleType("pycuda.driver")
    driver.counts = Counter()

    class Error(Exception):
        pass

    class DeviceAllocation:
        def __init__(self, nbytes):
            self.buf = np.zeros(nbytes, np.uint8)

        def __int__(self):
            return self.buf.ctypes.data

        def free(self):
            driver.counts["free"] += 1

    class HostAllocation:  # the .base of pagelocked_empty's array, as in PyCUDA
        def __init__(self, shape, dtype):
            self.data = np.zeros(shape, dtype)
            self.__array_interface__ = self.data.__array_interface__

        def free(self):
            driver.counts["host_free"] += 1

    class Device:
        @staticmethod
        def count():
            return 1

        def name(self):
            return "Emulated GPU 80GB"

        def compute_capability(self):
            return 9, 0

    class Context:
        @staticmethod
        def get_device():
            return Device()

    class Stream:
        handle = 4321

        def synchronize(self):
            pass

    class Event:
        def record(self, stream=None):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def time_till(self, end):
            return (end.t - self.t) * 1e3

    def mem_alloc(nbytes):
        if nbytes > 1 << 30:
            raise Error("cuMemAlloc failed: out of memory")
        return DeviceAllocation(nbytes)

    def pagelocked_empty(shape, dtype):
        if fail_host_alloc:
            raise Error("cuMemHostAlloc failed: out of memory")
        return np.asarray(HostAllocation(shape, dtype))

    driver.Error, driver.Device, driver.Context, driver.Stream, driver.Event = Error, Device, Context, Stream, Event
    driver.init = lambda: None
    driver.mem_alloc = mem_alloc
    driver.pagelocked_empty = pagelocked_empty
    driver.memcpy_htod_async = lambda dst, src, stream: ctypes.memmove(dst, src.ctypes.data, src.nbytes)
    driver.memcpy_dtoh_async = lambda dst, src, stream: ctypes.memmove(dst.ctypes.data, src, dst.nbytes)
    driver.run = lambda op: op()  # no capture: work runs when queued
    return driver


def real_cudart():
    """cuda-python's runtime where it imports and sees a GPU, else None."""
    try:
        from cuda.bindings import runtime
    except Exception:
        return None
    err, count = runtime.cudaGetDeviceCount()
    return runtime if int(err) == 0 and count > 0 else None
