"""The one backend boundary: cleaned ONNX in, timed session out.

A :class:`Backend` says whether it can run here (and why not), and builds a :class:`Session` from an ONNX
file and a :class:`BuildConfig`. Every session runs, times end to end, and reports per-layer times as
:class:`LayerTime` records, whatever library is behind it, so comparison and report code never asks which
backend it holds.

Nothing here imports ONNX Runtime or TensorRT: the concrete backends import them inside their methods, so
``import trt_prune.backends`` works on a machine that has neither.
"""

from __future__ import annotations

import importlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from trt_prune.errors import BackendError, BackendUnavailableError
from trt_prune.registry import Registry

PRECISIONS = ("fp32", "fp16")

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max), the order TensorRT's optimisation profiles use


@dataclass
class BuildConfig:
    """What a backend needs to build a session; every backend reads the same fields.

    ``threads``: CPU threads for the backend (None: all cores this process may use).
    ``optimization_level``: backend-specific scale (ONNX Runtime 0-3: disable, basic, extended, all;
    TensorRT builder optimisation level 0-5); None keeps the backend's default.
    ``batch``: ``(min, opt, max)`` batch size for every input whose first axis is dynamic.
    ``shapes``: per input name, full ``(min, opt, max)`` shapes; they override ``batch`` for that input.
    ``precision``: ``"fp32"`` or ``"fp16"`` (TensorRT 10 sets its FP16 flag; TensorRT 11 and ONNX Runtime
    run what the ONNX carries).
    ``sparse_weights``: let TensorRT pick 2:4 sparse kernels where they are faster.
    ``cache_dir``: where engines, timing caches and build logs are kept (None: no caching).
    ``extra``: backend-specific options, documented by each backend.
    """

    threads: int | None = None
    optimization_level: int | None = None
    batch: tuple[int, int, int] = (1, 1, 1)
    shapes: dict[str, ShapeRange] = field(default_factory=dict)
    precision: str = "fp32"
    sparse_weights: bool = False
    cache_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BackendError(f"precision {self.precision!r} is not supported; use one of {list(PRECISIONS)}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise BackendError(f"threads must be a positive integer or None, got {self.threads!r}")
        batch = tuple(self.batch)
        if len(batch) != 3 or not all(isinstance(b, int) and b >= 1 for b in batch):
            raise BackendError(f"batch must be three positive integers (min, opt, max), got {self.batch!r}")
        if not batch[0] <= batch[1] <= batch[2]:
            raise BackendError(f"batch must satisfy min <= opt <= max, got {self.batch!r}")
        self.batch = batch  # type: ignore[assignment]
        self.shapes = {name: _check_range(name, rng) for name, rng in dict(self.shapes).items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (tuples become lists)."""
        return asdict(self)


def _check_range(name: str, rng: Sequence[Sequence[int]]) -> ShapeRange:
    if len(rng) != 3:
        raise BackendError(f"shapes[{name!r}] must be (min, opt, max) shapes, got {rng!r}")
    lo, opt, hi = (tuple(int(d) for d in s) for s in rng)
    if not len(lo) == len(opt) == len(hi):
        raise BackendError(f"shapes[{name!r}]: min, opt and max have different ranks: {lo}, {opt}, {hi}")
    if any(d < 1 for d in lo) or not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
        raise BackendError(f"shapes[{name!r}] must be positive with min <= opt <= max per axis, "
                           f"got {lo}, {opt}, {hi}")
    return lo, opt, hi


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output. ``shape`` holds ints for fixed axes and a name or None for dynamic ones."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str  # numpy dtype name, e.g. "float32"

    @property
    def dynamic_axes(self) -> list[int]:
        return [i for i, d in enumerate(self.shape) if not isinstance(d, int) or d < 0]


@dataclass
class LayerTime:
    """Mean time of one executed layer per inference, in the same record for every backend.

    ``name`` is the backend's layer name, ``op`` its operator or layer type, ``module`` the PyTorch module
    path it came from (None when it maps to none, e.g. a layout conversion the backend inserted), and
    ``members`` the ONNX node names fused into it.
    """

    name: str
    op: str
    ms: float
    module: str | None = None
    members: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "module": self.module, "ms": self.ms,
                "members": list(self.members)}


def check_feeds(specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`BackendError` unless ``feeds`` has exactly the inputs in ``specs``, each of the right
    dtype and rank and matching every fixed axis."""
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in feeds]
    extra = [n for n in feeds if n not in expected]
    if missing or extra:
        raise BackendError(f"feeds must name exactly the model inputs {expected}; "
                           f"missing {missing}, unexpected {extra}")
    for spec in specs:
        arr = feeds[spec.name]
        if not isinstance(arr, np.ndarray):
            raise BackendError(f"feed {spec.name!r} must be a numpy array, got {type(arr).__name__}")
        if arr.dtype != np.dtype(spec.dtype):
            raise BackendError(f"feed {spec.name!r} has dtype {arr.dtype}, the model wants {spec.dtype}; "
                               f"convert it with .astype(np.{spec.dtype})")
        if arr.ndim != len(spec.shape):
            raise BackendError(f"feed {spec.name!r} has shape {arr.shape}, the model wants rank "
                               f"{len(spec.shape)} {spec.shape}")
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
            if isinstance(want, int) and want >= 0 and got != want:
                raise BackendError(f"feed {spec.name!r} has shape {arr.shape}; axis {axis} must be {want} "
                                   f"(model input shape {spec.shape})")


def resolve_shape_ranges(specs: Sequence[TensorSpec], config: BuildConfig) -> dict[str, ShapeRange]:
    """``(min, opt, max)`` shape per input: ``config.shapes`` where given, else the fixed axes with a dynamic
    first axis taken from ``config.batch``. Any other dynamic axis needs an explicit entry in ``config.shapes``.
    """
    out: dict[str, ShapeRange] = {}
    names = {s.name for s in specs}
    unknown = sorted(set(config.shapes) - names)
    if unknown:
        raise BackendError(f"config.shapes names {unknown}, which are not model inputs; inputs are "
                           f"{sorted(names)}")
    for spec in specs:
        if spec.name in config.shapes:
            lo, opt, hi = config.shapes[spec.name]
            if len(lo) != len(spec.shape):
                raise BackendError(f"config.shapes[{spec.name!r}] has rank {len(lo)}, the input is "
                                   f"{spec.shape}")
            for axis, want in enumerate(spec.shape):
                if isinstance(want, int) and want >= 0 and not lo[axis] == opt[axis] == hi[axis] == want:
                    raise BackendError(f"config.shapes[{spec.name!r}] sets fixed axis {axis} of {spec.shape} "
                                       f"to {lo[axis]}/{opt[axis]}/{hi[axis]}; it must stay {want}")
            out[spec.name] = (lo, opt, hi)
            continue
        other_dynamic = [a for a in spec.dynamic_axes if a != 0]
        if other_dynamic:
            raise BackendError(f"input {spec.name!r} has dynamic axes {other_dynamic} besides the batch axis "
                               f"(shape {spec.shape}); give its (min, opt, max) shapes in "
                               f"BuildConfig.shapes[{spec.name!r}]")
        ranges = []
        for b in config.batch:
            ranges.append(tuple(b if (axis == 0 and axis in spec.dynamic_axes) else int(d)
                                for axis, d in enumerate(spec.shape)))
        out[spec.name] = (ranges[0], ranges[1], ranges[2])  # type: ignore[assignment]
    return out


class Session(ABC):
    """A built model, ready to run. Use it as a context manager or call :meth:`close`.

    Subclasses fill ``self._inputs`` and ``self._outputs`` and implement ``_run_impl`` and
    ``_profile_layers_impl``; the public methods check their arguments first. Timing calls ``_prepare`` once
    and ``_infer`` per iteration, so a backend can keep host-side conversion out of the timed loop.
    """

    backend_name: ClassVar[str] = "?"

    def __init__(self) -> None:
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self.notes: list[str] = []  # what the build decided that a user should know
        self.profile_run_ms: float | None = None  # backend-measured mean run time of the last profile_layers
        self.artifact: Any = None  # the OnnxArtifact it was built from (trt_prune.stages.build sets it)
        self._closed = False
        self._cleanups: list[Callable[[], Any]] = []

    @property
    def inputs(self) -> list[TensorSpec]:
        """Model inputs, in the model's order (a subclass fills ``self._inputs`` when it builds)."""
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        """Model outputs, in the model's order (``self._outputs``)."""
        return list(self._outputs)

    def env(self) -> dict[str, Any]:
        """Backend facts worth storing with a result (versions, providers, device, threads)."""
        return {"backend": self.backend_name}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference: input name -> array in, output name -> array out."""
        self._check_open()
        check_feeds(self.inputs, feeds)
        return self._run_impl(dict(feeds))

    def time(self, feeds: Mapping[str, np.ndarray], warmup_s: float = 1.0, iterations: int = 100,
             min_duration_s: float = 0.0) -> list[float]:
        """End-to-end latency of each inference call, in ms, measured with ``time.perf_counter_ns``.

        Warm-up runs until ``warmup_s`` seconds have passed (none when 0). Measurement then runs at least
        ``iterations`` calls and keeps going until ``min_duration_s`` seconds have passed, as trtexec's
        ``--iterations`` and ``--duration`` do. A call returns when its outputs are in host memory.
        """
        prepared = self._start_timing(feeds, warmup_s, iterations, min_duration_s)
        clock = time.perf_counter_ns
        end = clock() + int(warmup_s * 1e9)
        while warmup_s > 0 and clock() < end:
            self._infer(prepared)
        samples: list[float] = []
        until = clock() + int(min_duration_s * 1e9)
        while len(samples) < iterations or clock() < until:
            samples.append(self._timed_call(prepared))
        return samples

    def _start_timing(self, feeds: Mapping[str, np.ndarray], warmup_s: float, iterations: int,
                      min_duration_s: float) -> Any:
        """Check the arguments of a timing run (any backend's) and prepare the inputs once."""
        self._check_open()
        if not isinstance(iterations, int) or iterations < 1:
            raise BackendError(f"iterations must be a positive integer, got {iterations!r}")
        if warmup_s < 0 or min_duration_s < 0 or not math.isfinite(warmup_s + min_duration_s):
            raise BackendError(f"warmup_s and min_duration_s must be finite and >= 0, got {warmup_s!r} and "
                               f"{min_duration_s!r}")
        check_feeds(self.inputs, feeds)
        return self._prepare(dict(feeds))

    def _timed_call(self, prepared: Any) -> float:
        """One timed inference, in ms: a host timer around :meth:`_infer` (GPU backends use device events)."""
        t0 = time.perf_counter_ns()
        self._infer(prepared)
        return (time.perf_counter_ns() - t0) / 1e6

    def profile_layers(self, feeds: Mapping[str, np.ndarray], runs: int = 20,
                       module_map: Mapping[str, str | None] | None = None) -> list[LayerTime]:
        """Per-layer mean times over ``runs`` inferences, in execution order.

        This is a separate run from :meth:`time`: per-layer instrumentation slows the whole inference down,
        so its numbers explain where time goes, not how long an inference takes. ``module_map`` maps ONNX
        node names to PyTorch module paths; by default it is derived from the ONNX node names.
        """
        self._check_open()
        if not isinstance(runs, int) or runs < 1:
            raise BackendError(f"runs must be a positive integer, got {runs!r}")
        check_feeds(self.inputs, feeds)
        return self._profile_layers_impl(dict(feeds), runs, module_map)

    def own(self, cleanup: Callable[[], Any]) -> None:
        """Call ``cleanup`` when the session closes (a temporary folder its model was exported to)."""
        self._cleanups.append(cleanup)

    def close(self) -> None:
        """Release the backend's resources; the session cannot be used afterwards."""
        if not self._closed:
            self._closed = True
            try:
                self._close_impl()
            finally:
                for cleanup in reversed(self._cleanups):
                    cleanup()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"this {self.backend_name} session is closed; build a new one")

    def _prepare(self, feeds: dict[str, np.ndarray]) -> Any:
        return feeds

    def _infer(self, prepared: Any) -> None:
        self._run_impl(prepared)

    @abstractmethod
    def _run_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _profile_layers_impl(self, feeds: dict[str, np.ndarray], runs: int,
                             module_map: Mapping[str, str | None] | None) -> list[LayerTime]: ...

    def _close_impl(self) -> None:
        return None


# What a backend builds from: an ONNX file, or the PyTorch model itself (an nn.Module, a model spec or a folder).
SOURCE_KINDS = ("onnx", "model")


@dataclass(frozen=True)
class BackendOption:
    """One build option a backend may accept: where it lands in :class:`BuildConfig` and its CLI flag.

    ``field`` is ``"precision"`` (the option means ``precision="fp16"``), ``"sparse_weights"``, ``"cache_dir"``
    or ``"extra"`` (the value goes to ``config.extra[name]``). The CLI derives its checks from these: a flag
    given to a backend whose :attr:`Backend.options` lacks it is refused, naming the backends that take it.
    """

    name: str
    field: str
    flag: str
    help: str


# Every option any backend knows; a backend lists the names it accepts in ``Backend.options``.
OPTIONS: dict[str, BackendOption] = {o.name: o for o in (
    BackendOption("fp16", "precision", "--fp16", "half precision"),
    BackendOption("sparse_weights", "sparse_weights", "--sparse", "2:4 sparse kernels where faster (TensorRT)"),
    BackendOption("cache_dir", "cache_dir", "--cache-dir", "engine cache folder"),
    BackendOption("cuda_graph", "extra", "--cuda-graph", "run by CUDA-graph replay"),
    BackendOption("device", "extra", "--device", "cuda or cpu"),
    BackendOption("channels_last", "extra", "--channels-last", "channels_last memory format"),
    BackendOption("sparse24", "extra", "--sparse24", "2:4 layers on cuSPARSELt"),
    BackendOption("providers", "extra", "", "ONNX Runtime execution providers"),
    BackendOption("optimized_model_path", "extra", "", "write the graph ONNX Runtime optimised"),
    BackendOption("allow_spinning", "extra", "", "ONNX Runtime's idle threads spin"),
    BackendOption("cuda_api", "extra", "", "cuda-python or pycuda"),
    BackendOption("pinned_host", "extra", "", "page-locked host staging"),
    BackendOption("strongly_typed", "extra", "", "strongly typed TensorRT network"),
    BackendOption("workspace_mib", "extra", "", "TensorRT workspace limit"),
    BackendOption("tf32", "extra", "", "allow TF32 in TensorRT"),
)}


def options_in(config: BuildConfig) -> list[str]:
    """Names of the :data:`OPTIONS` that ``config`` sets away from their defaults (unknown extra keys too)."""
    used = []
    if config.precision == "fp16":
        used.append("fp16")
    if config.sparse_weights:
        used.append("sparse_weights")
    if config.cache_dir:
        used.append("cache_dir")
    used += [key for key in config.extra]
    return used


def source_kind(source: Any) -> str:
    """``"onnx"`` for an ONNX file (a path ending in ``.onnx``), ``"model"`` for an ``nn.Module``, a loaded
    model, a model spec or a model folder."""
    if isinstance(source, (str, Path)):
        return "onnx" if str(source).lower().endswith(".onnx") else "model"
    if hasattr(source, "model") and hasattr(source, "input_shape"):  # a LoadedModel
        return "model"
    try:
        from torch import nn
    except ImportError:  # no torch: nothing here can be a module
        return "unknown"
    return "model" if isinstance(source, nn.Module) else "unknown"


class Backend(ABC):
    """Builds sessions. Subclasses set ``name``, ``install_hint``, ``library`` (the module whose import makes
    the backend available), ``builds_from`` (which :data:`SOURCE_KINDS` it takes) and ``options`` (the
    :data:`OPTIONS` it accepts), and implement :meth:`_build_impl`; one that needs more than an import
    overrides :meth:`available`."""

    name: ClassVar[str] = ""
    install_hint: ClassVar[str] = ""
    library: ClassVar[str] = ""
    builds_from: ClassVar[tuple[str, ...]] = ("onnx",)
    options: ClassVar[frozenset[str]] = frozenset()

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when this backend can build here, else ``(False, what is missing and how to fix it)``."""
        try:
            importlib.import_module(self.library)
        except (ImportError, OSError) as exc:  # OSError: the package is there but a shared library is not
            return False, f"the {self.library} package cannot be imported ({exc}); {self.install_hint}"
        return True, ""

    def version(self) -> str | None:
        """Version of the library behind the backend, None when it is not installed."""
        try:
            return importlib.import_module(self.library).__version__
        except Exception:  # a half-installed library may fail to import in many ways; it has no version then
            return None

    def check_config(self, config: BuildConfig | None) -> BuildConfig:
        """``config`` (default ``BuildConfig()``) if every option it sets is one this backend accepts."""
        if config is None:
            return BuildConfig()
        if not isinstance(config, BuildConfig):
            raise BackendError(f"config must be a BuildConfig, got {type(config).__name__}")
        refused = [o for o in options_in(config) if o not in self.options]
        if refused:
            raise BackendError(f"backend {self.name!r} does not take option(s) {refused}; it accepts "
                               f"{sorted(self.options) or 'none'}" + _who_takes(refused))
        return config

    def build(self, source: Any, config: BuildConfig | None = None) -> Session:
        """Build a session for ``source`` (see :attr:`builds_from`); raises :class:`BackendUnavailableError`
        when the backend cannot run here and :class:`BackendError` when the source or configuration is wrong."""
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {reason}")
        config = self.check_config(config)
        kind = source_kind(source)
        if kind not in self.builds_from:
            takes = " or ".join(_KIND_WORDS[k] for k in self.builds_from)
            given = _KIND_WORDS.get(kind, type(source).__name__)
            raise BackendError(f"backend {self.name!r} builds from {takes}, not {given} {_label(source)}; "
                               + ("export it first (trt-prune export, or trt_prune.stages.build does it for you)"
                                  if kind == "model" else "give the model spec or folder it was exported from"))
        if kind == "onnx":
            path = Path(source)
            if not path.is_file():
                raise BackendError(f"ONNX file {str(path)!r} does not exist; export the model first")
            # one readable check before any backend parses it: a truncated or foreign file, or weights named
            # outside the model's folder, get the same error whichever backend was asked for
            from trt_prune.onnx_io import load_onnx

            load_onnx(path, load_external_data=False, error=BackendError)
            source = path
        return self._build_impl(source, config)

    @abstractmethod
    def _build_impl(self, source: Any, config: BuildConfig) -> Session: ...


_KIND_WORDS = {"onnx": "an ONNX file", "model": "a PyTorch model (module, spec or folder)"}


def _label(source: Any) -> str:
    return repr(str(source)) if isinstance(source, (str, Path)) else f"({type(source).__name__})"


def _who_takes(options: Sequence[str]) -> str:
    parts = []
    for option in options:
        takers = backends_taking(option)
        parts.append(f"{option}: {' or '.join(takers)}" if takers else f"{option}: no backend")
    return f" (which backends take them: {'; '.join(parts)})"


def backends_taking(option: str) -> list[str]:
    """Names of the registered backends whose :attr:`Backend.options` include ``option``."""
    return [name for name in backend_names() if option in _REGISTRY.lookup(name).options]


def backend_class(name: str) -> type[Backend]:
    """The registered class for ``name``; an unknown name lists the valid ones."""
    return _REGISTRY.lookup(name)


_REGISTRY: Registry[str, type[Backend]] = Registry("backend", BackendError)


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` reachable as ``get_backend(cls.name)``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a non-empty class attribute 'name' to be registered")
    unknown = sorted(set(cls.options) - set(OPTIONS)) + sorted(set(cls.builds_from) - set(SOURCE_KINDS))
    if unknown:
        raise TypeError(f"{cls.__name__} declares unknown option(s) or source kind(s) {unknown}; options: "
                        f"{sorted(OPTIONS)}, source kinds: {list(SOURCE_KINDS)}")
    return _REGISTRY.register(cls.name, cls)


def backend_names() -> list[str]:
    """Every registered backend name, available here or not."""
    return _REGISTRY.names()


def get_backend(name: str) -> Backend:
    """A new instance of the backend registered as ``name``."""
    return _REGISTRY.lookup(name)()


def backend_status() -> dict[str, tuple[bool, str]]:
    """For every registered backend: whether it can run here, and why not."""
    return {name: _REGISTRY[name]().available() for name in backend_names()}


def available_backends() -> list[str]:
    """Names of the registered backends that can run on this machine."""
    return [name for name, (ok, _) in backend_status().items() if ok]


def numpy_dtype_name(onnx_elem_type: int) -> str:
    """numpy dtype name for an ONNX ``TensorProto`` element type number."""
    # ONNX's TensorProto.DataType numbering, fixed by the ONNX spec.
    table = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
             9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}
    if onnx_elem_type not in table:
        raise BackendError(f"ONNX element type {onnx_elem_type} has no numpy equivalent here "
                           f"(supported: {sorted(table)})")
    return table[onnx_elem_type]


def onnx_io_specs(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ``onnx.ModelProto`` (initializers listed as inputs are left out)."""
    initializers = {t.name for t in model.graph.initializer}

    def spec(value_info: Any) -> TensorSpec:
        tensor_type = value_info.type.tensor_type
        dims: list[int | str | None] = []
        for d in tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        return TensorSpec(value_info.name, tuple(dims), numpy_dtype_name(tensor_type.elem_type))

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs



def read_onnx_io(onnx_path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file, read without loading external weights."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends from protobuf
        raise BackendError(f"{str(onnx_path)!r} is not a readable ONNX model: {exc}") from exc
    return onnx_io_specs(model)
