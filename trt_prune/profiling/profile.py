"""Profile an ONNX model on a backend: end-to-end latency statistics plus per-layer times, as one record.

Latency and per-layer times come from separate runs (per-layer instrumentation inflates the total).
Throughput is derived from the latency of sequential inference calls, one call in flight at a time:
``throughput_ips = 1000 / mean latency (ms)`` inference calls per second, and
``throughput_images_s = throughput_ips * batch``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trt_prune.backends import BuildConfig, LayerTime, Session, TensorSpec, get_backend
from trt_prune.backends.base import read_onnx_io
from trt_prune.errors import ProfileError
from trt_prune.profiling.aggregate import AGGREGATE_KEYS, ROOT, UNMAPPED, aggregate_layers, stage_of  # noqa: F401
from trt_prune.profiling.stats import cv_warning, summarize


@dataclass
class ProfileResult:
    """One profiling run. ``latency_ms`` is :func:`~trt_prune.profiling.stats.summarize` of ``samples_ms``;
    ``per_layer`` rows are ``{name, op, module, ms, members}`` sorted by ``ms`` descending;
    ``per_layer_run_ms`` is the backend's own mean run time during the per-layer run (instrumented, so
    larger than ``latency_ms``); ``env`` says where it ran. ``breakdown`` is trtexec's per-phase summary
    (latency, enqueue, H2D, GPU compute, D2H from CUDA events; :func:`~trt_prune.backends.tensorrt.timing_breakdown`)
    for backends that can time the phases apart (TensorRT), from its own run after the end-to-end one."""

    backend: str
    onnx: str
    batch: int
    input_shapes: dict[str, list[int]]
    latency_ms: dict[str, Any]
    throughput_ips: float
    throughput_images_s: float
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    per_layer_sum_ms: float | None = None
    per_layer_run_ms: float | None = None
    cv_warning: str | None = None
    env: dict[str, Any] = field(default_factory=dict)
    samples_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    breakdown: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def resolve_input_shapes(specs: Sequence[TensorSpec], batch: int,
                         input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None
                         ) -> dict[str, tuple[int, ...]]:
    """Concrete shape per input: the ONNX shape with axis 0 set to ``batch``.

    ``input_shape`` gives full shapes (batch axis included) for inputs with other dynamic axes: one shape
    when the model has one input, else a dict by input name. Its axis 0 must equal ``batch``.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ProfileError(f"batch must be a positive integer, got {batch!r}")
    if input_shape is None:
        given: dict[str, tuple[int, ...]] = {}
    elif isinstance(input_shape, Mapping):
        given = {k: tuple(int(d) for d in v) for k, v in input_shape.items()}
    else:
        if len(specs) != 1:
            raise ProfileError(f"the model has {len(specs)} inputs {[s.name for s in specs]}; give input_shape "
                               f"as a dict from input name to shape")
        given = {specs[0].name: tuple(int(d) for d in input_shape)}
    unknown = sorted(set(given) - {s.name for s in specs})
    if unknown:
        raise ProfileError(f"input_shape names {unknown}, which are not model inputs "
                           f"{[s.name for s in specs]}")
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in given:
            shape = given[spec.name]
            if len(shape) != len(spec.shape) or any(d < 1 for d in shape):
                raise ProfileError(f"input_shape for {spec.name!r} is {shape}; it must be {len(spec.shape)} "
                                   f"positive sizes matching the ONNX shape {spec.shape}")
            for axis, want in enumerate(spec.shape):
                if isinstance(want, int) and want >= 0 and axis > 0 and shape[axis] != want:
                    raise ProfileError(f"input_shape for {spec.name!r} is {shape}, but axis {axis} is fixed "
                                       f"at {want} in the ONNX shape {spec.shape}")
            if len(shape) and shape[0] != batch:
                raise ProfileError(f"input_shape for {spec.name!r} starts with {shape[0]} but batch={batch}; "
                                   f"make them agree")
        else:
            others = [a for a in spec.dynamic_axes if a != 0]
            if others:
                raise ProfileError(f"input {spec.name!r} has dynamic axes {others} besides the batch axis "
                                   f"(ONNX shape {spec.shape}); pass input_shape with its full shape")
            shape = tuple(int(d) if isinstance(d, int) and d >= 0 else batch for d in spec.shape)
            if shape and shape[0] != batch:
                raise ProfileError(f"input {spec.name!r} has a fixed batch of {shape[0]} (ONNX shape "
                                   f"{spec.shape}); profile with batch={shape[0]} or export with a dynamic "
                                   f"batch axis")
        shapes[spec.name] = shape
    return shapes


def make_feeds(specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]], seed: int = 0
               ) -> dict[str, np.ndarray]:
    """Random inputs: standard normal for float inputs (in their dtype), zeros for integer and bool ones."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        shape = tuple(shapes[spec.name])
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


GPU_QUERY = ("nvidia-smi", "--query-gpu=name,clocks.sm,clocks.mem", "--format=csv,noheader")
GPU_PROBE_TIMEOUT_S = 5.0


def parse_gpu_query(text: str) -> dict[str, str]:
    """``gpu``, ``gpu_sm_clock`` and ``gpu_mem_clock`` from the output of :data:`GPU_QUERY` (its first GPU,
    the one a session uses by default); ``{}`` when the text is not such output."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    parts = [p.strip() for p in first.split(",")]
    if len(parts) != 3 or not parts[0]:
        return {}
    return {"gpu": parts[0], "gpu_sm_clock": parts[1], "gpu_mem_clock": parts[2]}


def gpu_info() -> dict[str, str]:
    """GPU name and current clocks from ``nvidia-smi`` where it exists; ``{}`` on any failure.

    Clocks change with load and power state, so a GPU number without them is hard to compare. The probe must
    never cost a result: no binary, a hang (timeout), an error or odd output all give ``{}``.
    """
    exe = shutil.which(GPU_QUERY[0])
    if exe is None:
        return {}
    try:
        done = subprocess.run([exe, *GPU_QUERY[1:]], capture_output=True, text=True, timeout=GPU_PROBE_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_gpu_query(done.stdout) if done.returncode == 0 else {}


def _dist_version(*names: str) -> str | None:
    """Installed version of the first distribution found, read from metadata without importing it."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, OS, Python and package versions, plus the GPU and its clocks where ``nvidia-smi``
    answers: stored with every result so numbers keep their context."""
    from trt_prune import __version__

    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "usable_cores": usable, "platform": platform.platform(), "python": sys.version.split()[0],
        "numpy": np.__version__, "trt_prune": __version__}
    ort_version = _dist_version("onnxruntime", "onnxruntime-gpu")
    if ort_version:
        info["onnxruntime"] = ort_version
    return {**info, **gpu_info()}


def _module_map_for(onnx_path: Path, module_map: Any) -> Mapping[str, str | None] | None:
    if module_map is None or isinstance(module_map, Mapping):
        return module_map
    if callable(module_map):
        import onnx

        from trt_prune.profiling.layers import build_module_map

        return build_module_map(onnx.load(str(onnx_path), load_external_data=False), module_map)
    raise ProfileError(f"module_map must be a dict from ONNX node name to module path, a function of an "
                       f"ONNX node, or None; got {type(module_map).__name__}")


def profile_onnx(onnx_path: str | Path, backend: str = "onnxruntime", batch: int = 1,
                 input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
                 warmup_s: float = 1.0, iterations: int = 200, min_duration_s: float = 1.0,
                 threads: int | None = None, per_layer: bool = True, layer_runs: int = 20,
                 module_map: Mapping[str, str | None] | Callable[[Any], str | None] | None = None,
                 seed: int = 0, config: BuildConfig | None = None) -> ProfileResult:
    """Build ``onnx_path`` on ``backend`` and measure it with random inputs of the given batch.

    Timing runs at least ``iterations`` calls and at least ``min_duration_s`` seconds after ``warmup_s``
    of warm-up; per-layer times (``per_layer``) come from a separate run of ``layer_runs`` inferences.
    ``module_map`` maps ONNX node names to PyTorch module paths (a dict, or a function of an ONNX node);
    by default it comes from the node names. ``config`` supplies the other build options (precision,
    sparse weights, cache); its shapes and threads are replaced by the ones given here.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise ProfileError(f"ONNX file {str(path)!r} does not exist; export the model first")
    chosen = get_backend(backend)
    inputs, _ = read_onnx_io(path)
    shapes = resolve_input_shapes(inputs, batch, input_shape)
    base = config if config is not None else BuildConfig()
    config = dataclasses.replace(base, threads=threads if threads is not None else base.threads,
                                 batch=(batch, batch, batch), shapes={n: (s, s, s) for n, s in shapes.items()})
    mapping = _module_map_for(path, module_map)
    with chosen.build(path, config) as session:
        return _measure(session, backend, str(path), batch, shapes, warmup_s, iterations, min_duration_s,
                        per_layer, layer_runs, mapping, seed)


def profile_torch(model, batch: int = 1, input_shape: Sequence[int] | None = None, warmup_s: float = 1.0,
                  iterations: int = 200, min_duration_s: float = 1.0, threads: int | None = None,
                  per_layer: bool = True, layer_runs: int = 20, seed: int = 0,
                  config: BuildConfig | None = None) -> ProfileResult:
    """:func:`profile_onnx` for the torch backend: ``model`` is an ``nn.Module``, a model spec or a folder.

    ``input_shape`` is the full shape (its batch axis is replaced by ``batch``); by default the spec's own.
    ``config.extra`` carries the torch options (device, channels_last, cuda_graph, sparse24). Per-layer rows
    are each module's own time (see :mod:`trt_prune.backends.torch_backend`), keyed by module path.
    """
    base = config if config is not None else BuildConfig()
    shapes = dict(base.shapes)
    if input_shape is not None:
        shape = (batch, *[int(d) for d in list(input_shape)[1:]])
        shapes = {"images": (shape, shape, shape)}
    config = dataclasses.replace(base, threads=threads if threads is not None else base.threads,
                                 batch=(batch, batch, batch), shapes=shapes)
    with get_backend("torch").build(model, config) as session:
        spec = session.inputs[0]
        label = model if isinstance(model, str) else session.label
        return _measure(session, "torch", str(label), batch, {spec.name: tuple(spec.shape)}, warmup_s, iterations,
                        min_duration_s, per_layer, layer_runs, None, seed)


def _measure(session: Session, backend: str, source: str, batch: int, shapes: Mapping[str, Sequence[int]],
             warmup_s: float, iterations: int, min_duration_s: float, per_layer: bool, layer_runs: int,
             mapping: Mapping[str, str | None] | None, seed: int) -> ProfileResult:
    """Time ``session`` end to end, then profile its layers in a separate run, into one record."""
    feeds = make_feeds(session.inputs, shapes, seed)
    samples = session.time(feeds, warmup_s=warmup_s, iterations=iterations, min_duration_s=min_duration_s)
    phases = getattr(session, "time_breakdown", None)  # already warm: no second warm-up
    breakdown = phases(feeds, warmup_s=0.0, iterations=iterations) if phases is not None else None
    return profile_record(session, backend, source, batch, shapes, samples, feeds,
                          layer_runs if per_layer else 0, mapping, breakdown=breakdown)


def profile_record(session: Session, backend: str, source: str, batch: int, shapes: Mapping[str, Sequence[int]],
                   samples: Sequence[float], feeds: Mapping[str, np.ndarray], layer_runs: int,
                   mapping: Mapping[str, str | None] | None = None,
                   breakdown: Mapping[str, Any] | None = None) -> ProfileResult:
    """One :class:`ProfileResult` from latency ``samples`` already taken (by :meth:`Session.time` or an
    interleaved run) and, when ``layer_runs`` > 0, a separate per-layer run of ``session`` on ``feeds``."""
    rows: list[LayerTime] = []
    if layer_runs:
        rows = session.profile_layers(feeds, runs=layer_runs, module_map=mapping)
    latency = summarize(samples)
    ips = 1000.0 / latency["mean"] if latency["mean"] > 0 else float("inf")
    per_layer_rows = sorted((r.to_dict() for r in rows), key=lambda r: r["ms"], reverse=True)
    return ProfileResult(
        backend=backend, onnx=source, batch=batch, input_shapes={n: list(s) for n, s in shapes.items()},
        latency_ms=latency, throughput_ips=ips, throughput_images_s=ips * batch, per_layer=per_layer_rows,
        per_layer_sum_ms=sum(r.ms for r in rows) if layer_runs else None,
        per_layer_run_ms=session.profile_run_ms if layer_runs else None, cv_warning=cv_warning(latency),
        env={**machine_info(), **session.env()}, samples_ms=list(samples), notes=list(session.notes),
        breakdown=dict(breakdown) if breakdown is not None else None)


def interleaved_timings(sessions: Mapping[str, Session], feeds: Mapping[str, Mapping[str, np.ndarray]],
                        rounds: int = 10, iterations_per_round: int = 10, warmup_s: float = 0.5,
                        seed: int = 0, discard_first: int = 1) -> dict[str, list[float]]:
    """Time several sessions fairly on a noisy machine (:func:`interleaved_blocks`), samples pooled per session.
    Compare the results by their medians."""
    blocks = interleaved_blocks(sessions, feeds, rounds, iterations_per_round, warmup_s, seed, discard_first)
    return {name: [s for block in per for s in block] for name, per in blocks.items()}


def interleaved_blocks(sessions: Mapping[str, Session], feeds: Mapping[str, Mapping[str, np.ndarray]],
                       rounds: int = 10, iterations_per_round: int = 10, warmup_s: float = 0.5,
                       seed: int | random.Random = 0, discard_first: int = 1) -> dict[str, list[list[float]]]:
    """Round by round, each session runs ``iterations_per_round`` timed calls, in an order shuffled anew every
    round, so drifts in clock speed or background load spread over all variants instead of landing on one.
    Returns one block of samples (ms) per session and round. Every session is warmed up for ``warmup_s``
    first; the first ``discard_first`` calls of each turn are dropped because they pay for caches the previous
    session evicted. ``seed`` may be a ``random.Random`` to continue a sequence across calls.
    """
    names = list(sessions)
    if not names:
        raise ProfileError("interleaved timing needs at least one session")
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ProfileError(f"no feeds for session(s) {missing}; feeds must have a key per session {names}")
    for label, value in (("rounds", rounds), ("iterations_per_round", iterations_per_round)):
        if not isinstance(value, int) or value < 1:
            raise ProfileError(f"{label} must be a positive integer, got {value!r}")
    if not isinstance(discard_first, int) or discard_first < 0:
        raise ProfileError(f"discard_first must be an integer >= 0, got {discard_first!r}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    if warmup_s > 0:
        for name in names:
            sessions[name].time(feeds[name], warmup_s=warmup_s, iterations=1)
    out: dict[str, list[list[float]]] = {name: [] for name in names}
    order = list(names)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            samples = sessions[name].time(feeds[name], warmup_s=0.0,
                                          iterations=iterations_per_round + discard_first)
            out[name].append(samples[discard_first:])
    return out
