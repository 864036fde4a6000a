"""ONNX Runtime backend: the CPU reference every machine here can run.

``BuildConfig`` fields: ``threads`` sets intra-op threads (default: every core this process may use);
``optimization_level`` 0-3 picks ORT_DISABLE_ALL, ORT_ENABLE_BASIC, ORT_ENABLE_EXTENDED, ORT_ENABLE_ALL
(default ALL). ``precision="fp16"`` and ``sparse_weights`` are refused (not in :attr:`OnnxRuntimeBackend.options`):
ONNX Runtime runs the precision the ONNX carries (convert it with ``trt-prune fp16``) and has no 2:4 kernels.

``extra`` keys: ``providers`` (list, default ``["CPUExecutionProvider"]``; CUDA or TensorRT providers need
the ``onnxruntime-gpu`` distribution), ``optimized_model_path`` (write the graph ORT optimised, for
inspection), ``allow_spinning`` (bool, default True: ORT's idle intra-op threads spin briefly, which is
faster but steals cores from whatever runs next; turn it off when interleaving sessions on few cores).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from trt_prune.backends.base import (
    Backend,
    BuildConfig,
    LayerTime,
    Session,
    TensorSpec,
    register_backend,
)
from trt_prune.errors import BackendError, BackendUnavailableError, ProfileError

_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(int16)": "int16",
              "tensor(uint16)": "uint16"}


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ort_level_name(level: int | None) -> str:
    """Name of the ``GraphOptimizationLevel`` member for ``BuildConfig.optimization_level``."""
    if level is None:
        return "ORT_ENABLE_ALL"
    if not isinstance(level, int) or not 0 <= level < len(_LEVELS):
        raise BackendError(f"optimization_level {level!r} is not valid for onnxruntime; use 0 (disable all), "
                           f"1 (basic), 2 (extended), 3 (all) or None (all)")
    return _LEVELS[level]


@register_backend
class OnnxRuntimeBackend(Backend):
    """Builds :class:`OnnxRuntimeSession` objects with ``onnxruntime.InferenceSession``."""

    name = "onnxruntime"
    install_hint = "pip install onnxruntime (or onnxruntime-gpu for the CUDA and TensorRT providers)"
    library = "onnxruntime"
    builds_from = ("onnx",)
    options = frozenset({"providers", "optimized_model_path", "allow_spinning"})

    def _build_impl(self, onnx_path: Path, config: BuildConfig) -> Session:
        import onnxruntime as ort

        providers = list(config.extra.get("providers") or ["CPUExecutionProvider"])
        have = ort.get_available_providers()
        missing = [p for p in providers if p not in have]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime provider(s) {missing} are not in this onnxruntime build (it has {have}); "
                f"the CUDA and TensorRT providers need `pip install onnxruntime-gpu` in place of onnxruntime "
                f"and an NVIDIA GPU")
        return OnnxRuntimeSession(onnx_path, config, providers, [])


class OnnxRuntimeSession(Session):
    """An ``onnxruntime.InferenceSession`` behind the common :class:`Session` interface."""

    backend_name = "onnxruntime"

    def __init__(self, onnx_path: Path, config: BuildConfig, providers: list[str], notes: list[str]):
        super().__init__()
        self.onnx_path = Path(onnx_path)
        self.config = config
        self.providers = providers
        self.notes.extend(notes)
        self.threads = config.threads or usable_cores()
        self._graph = None
        self._module_map: dict[str, str | None] | None = None
        self._sess = self._create(profiling_dir=None)
        self._inputs = [TensorSpec(i.name, tuple(_dim(d) for d in i.shape), _ort_dtype(i.type))
                        for i in self._sess.get_inputs()]
        self._outputs = [TensorSpec(o.name, tuple(_dim(d) for d in o.shape), _ort_dtype(o.type))
                         for o in self._sess.get_outputs()]

    def _options(self) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                              ort_level_name(self.config.optimization_level))
        so.log_severity_level = 3  # errors only: ORT warns on every saved optimised model
        if not self.config.extra.get("allow_spinning", True):
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def _create(self, profiling_dir: str | None) -> Any:
        import onnxruntime as ort

        so = self._options()
        if profiling_dir is not None:
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(profiling_dir, "ort_profile")
        elif self.config.extra.get("optimized_model_path"):
            so.optimized_model_filepath = str(self.config.extra["optimized_model_path"])
        try:
            return ort.InferenceSession(str(self.onnx_path), so, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types, not importable without ORT
            raise BackendError(f"ONNX Runtime could not load {str(self.onnx_path)!r}: {exc}") from exc

    def env(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {"backend": self.backend_name, "backend_version": ort.__version__,
                "providers": self._sess.get_providers(), "threads": self.threads,
                "graph_optimization_level": ort_level_name(self.config.optimization_level)}

    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self._sess.run(None, feeds)
        return {spec.name: value for spec, value in zip(self._outputs, values, strict=True)}

    def _infer(self, prepared: Any) -> None:
        self._sess.run(None, prepared)

    def _profile_layers_impl(self, feeds: dict[str, np.ndarray], runs: int,
                             module_map: Mapping[str, str | None] | None) -> list[LayerTime]:
        from trt_prune.profiling.layers import ort_layer_times, parse_ort_profile

        # A second session: profiling is fixed at creation and its per-node bookkeeping would slow the
        # session that time() uses. Its files go into a private temporary folder that is always removed.
        tmp = tempfile.mkdtemp(prefix="trt_prune_ort_")
        try:
            sess = self._create(profiling_dir=tmp)
            for _ in range(runs + 1):  # the first run allocates buffers; it is dropped below
                sess.run(None, feeds)
            path = sess.end_profiling()
            try:
                with open(path, encoding="utf-8") as f:
                    events = json.load(f)
            except (OSError, ValueError) as exc:
                raise ProfileError(f"could not read ONNX Runtime's profile {path!r}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        profile = parse_ort_profile(events, skip_runs=1)
        graph, default_map = self._graph_and_modules()
        rows, _ = ort_layer_times(profile, graph, module_map if module_map is not None else default_map)
        self.profile_run_ms = profile.run_mean_ms
        return rows

    def _graph_and_modules(self) -> tuple[Any, dict[str, str | None]]:
        if self._graph is None:
            import onnx

            from trt_prune.profiling.layers import Graph, build_module_map

            model = onnx.load(str(self.onnx_path), load_external_data=False)
            self._graph = Graph.from_onnx(model)
            self._module_map = build_module_map(model)
        return self._graph, self._module_map or {}

    def _close_impl(self) -> None:
        self._sess = None


def _dim(d: Any) -> int | str | None:
    return d if isinstance(d, int) else (d or None)


def _ort_dtype(type_str: str) -> str:
    if type_str not in _ORT_TYPES:
        raise BackendError(f"ONNX Runtime reports tensor type {type_str!r}, which this backend cannot feed; "
                           f"supported: {sorted(_ORT_TYPES)}")
    return _ORT_TYPES[type_str]

