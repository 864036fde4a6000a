"""Measure a built session: end-to-end latency statistics plus per-layer times, as one record
(:func:`trt_prune.stages.profile` builds the session and calls :func:`measure`).

Latency and per-layer times come from separate runs (per-layer instrumentation inflates the total).
Throughput is derived from the latency of sequential inference calls, one call in flight at a time:
``throughput_ips = 1000 / mean latency (ms)`` inference calls per second, and
``throughput_images_s = throughput_ips * batch``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trt_prune.backends import LayerTime, Session, TensorSpec
from trt_prune.errors import ProfileError
from trt_prune.profiling.aggregate import AGGREGATE_KEYS, ROOT, UNMAPPED, aggregate_layers, stage_of  # noqa: F401
from trt_prune.profiling.result import ProfileResult
from trt_prune.profiling.stats import cv_warning, summarize
from trt_prune.provenance import GPU_QUERY, gpu_info, machine_info, parse_gpu_query  # noqa: F401 (re-exported)


def resolve_input_shapes(specs: Sequence[TensorSpec], batch: int,
                         input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None
                         ) -> dict[str, tuple[int, ...]]:
    """Concrete shape per input: the ONNX shape with axis 0 set to ``batch``.

    ``input_shape`` gives full shapes (batch axis included) for inputs with other dynamic axes: one shape
    when the model has one input, else a dict by input name. Its axis 0 must equal ``batch``.
    """
    from trt_prune.onnx_io import given_input_shapes  # one set of checks for clean, fp16 and profile

    if not isinstance(batch, int) or batch < 1:
        raise ProfileError(f"batch must be a positive integer, got {batch!r}")
    given = given_input_shapes(specs, input_shape, ProfileError)
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in given:
            shape = given[spec.name]
            if len(shape) and shape[0] != batch:
                raise ProfileError(f"input_shape for {spec.name!r} starts with {shape[0]} but batch={batch}; "
                                   f"make them agree")
        else:
            others = [a for a in spec.dynamic_axes if a != 0]
            if others:
                raise ProfileError(f"input {spec.name!r} has dynamic axes {others} besides the batch axis "
                                   f"(ONNX shape {spec.shape}); pass its full shape as input_shape (CLI: "
                                   "--input-shape NxCxHxW)")
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


def module_map_for(onnx_path: Path, module_map: Any) -> Mapping[str, str | None] | None:
    """``module_map`` as a dict from ONNX node name to module path: a dict or None as given, a function of an
    ONNX node applied to every node of ``onnx_path``."""
    if module_map is None or isinstance(module_map, Mapping):
        return module_map
    if callable(module_map):
        import onnx

        from trt_prune.profiling.layers import build_module_map

        return build_module_map(onnx.load(str(onnx_path), load_external_data=False), module_map)
    raise ProfileError(f"module_map must be a dict from ONNX node name to module path, a function of an "
                       f"ONNX node, or None; got {type(module_map).__name__}")


def measure(session: Session, backend: str, source: str, batch: int, shapes: Mapping[str, Sequence[int]],
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
