"""The TensorRT session: one deserialised engine, run, timed and profiled through the CUDA adapter.

:meth:`TensorRTSession.time_breakdown` records CUDA events around the input copies, the enqueue and the output
copies of each inference and hands the timestamps to :func:`trt_prune.profiling.stats.timing_breakdown`.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trt_prune.backends.base import LayerTime, Session, ShapeRange, TensorSpec
from trt_prune.backends.tensorrt.buildlog import log_tail
from trt_prune.backends.tensorrt.cuda_api import Buffers, CudaApi
from trt_prune.backends.tensorrt.plan import BuildPlan, cuda_graph_decision
from trt_prune.errors import BackendError, ProfileError
from trt_prune.profiling.stats import TIMELINE, timing_breakdown


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
        rows: dict[str, list[float]] = {name: [] for name in TIMELINE}
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
                for name, event in zip(TIMELINE[2:], (h2d, c0, c1, d2h), strict=True):
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
                               f"{log_tail(self._logger.lines)}")
        self.graph_captures += 1
        return graph

    def _destroy_graph(self, graph: Any) -> None:
        if graph is not None:
            with contextlib.suppress(BackendError):
                self._api.graph_destroy(graph)

    def _execute(self, context: Any) -> None:
        if not context.execute_async_v3(self._api.stream_handle(self._stream)):
            raise BackendError(f"TensorRT execute_async_v3 failed; log: {log_tail(self._logger.lines)}")

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
