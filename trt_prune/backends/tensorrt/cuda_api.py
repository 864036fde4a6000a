"""CUDA adapter: which CUDA library moves tensors (:func:`choose_cuda_api`) and the calls the session makes.

CUDA calls go through one small adapter, :class:`CudaApi` (device memory, streams, async copies, events,
graph capture), with two implementations: :class:`CudaPythonApi` over ``cuda.bindings.runtime`` (NVIDIA's
bindings, which TensorRT's own samples use since 10.14) and :class:`PyCudaApi` over ``pycuda.driver`` (the
fallback where cuda-python is missing; it captures no CUDA graphs). :class:`Buffers` keeps the session's
device and page-locked host allocations. Neither library is imported until an adapter is made.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from trt_prune.backends.tensorrt.plan import CUDA_APIS
from trt_prune.errors import BackendError, BackendUnavailableError

CUDA_MODULES = {"cuda-python": "cuda.bindings.runtime", "pycuda": "pycuda.driver"}


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
            raise BackendUnavailableError(f"extra['cuda_api'] asks for {prefer}, but {CUDA_MODULES[prefer]} cannot be "
                                          f"imported here: pip install {prefer}{hint}")
        return prefer
    for name in CUDA_APIS:
        if have[name]:
            return name
    raise BackendUnavailableError("the TensorRT backend needs cuda-python or PyCUDA to move tensors to and from the "
                                  "GPU, and neither cuda.bindings nor pycuda.driver can be imported: pip install "
                                  "cuda-python (preferred; or pip install 'trt_prune[tensorrt]'), or pip install "
                                  "pycuda")



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
