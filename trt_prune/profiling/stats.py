"""Latency statistics: pure functions over lists of milliseconds, no I/O and no backend.

Percentiles use numpy's default ``linear`` method: the p-th percentile of ``n`` sorted samples sits at
position ``(n - 1) * p / 100``, interpolating linearly between neighbours (so the p50 of an even count is
the mean of the middle two). ``std`` is the sample standard deviation (``ddof=1``; 0 for a single sample)
and ``cv`` is ``std / mean``, the coefficient of variation trtexec warns about. :func:`timing_breakdown`
builds trtexec's performance summary (latency, enqueue, H2D, GPU compute, D2H) from per-iteration timestamps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from trt_prune.errors import ProfileError

PERCENTILES = (50, 90, 95, 99)
CV_THRESHOLD = 0.025  # trtexec's: it warns when the coefficient of variation exceeds 2.5 %


def summarize(samples_ms: Sequence[float]) -> dict[str, Any]:
    """``p50, p90, p95, p99, mean, std, min, max, cv, n`` of latency samples in ms."""
    values = np.asarray(list(samples_ms), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ProfileError(f"need at least one latency sample, got {values.size}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        bad = values[~np.isfinite(values) | (values < 0)][:5].tolist()
        raise ProfileError(f"latency samples must be finite and >= 0; found {bad}")
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    out: dict[str, Any] = {f"p{p}": float(np.percentile(values, p, method="linear")) for p in PERCENTILES}
    out.update(mean=mean, std=std, min=float(values.min()), max=float(values.max()),
               cv=(std / mean) if mean > 0 else 0.0, n=int(values.size))
    return out


def cv_warning(summary: dict[str, Any], threshold: float = CV_THRESHOLD) -> str | None:
    """A warning when the samples vary more than ``threshold`` (coefficient of variation), else None."""
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ProfileError(f"threshold must be a finite fraction >= 0, got {threshold!r}")
    cv = summary.get("cv")
    if cv is None:
        raise ProfileError(f"summary has no 'cv'; pass the dict summarize() returns (keys: {sorted(summary)})")
    if cv <= threshold:
        return None
    return (f"latency is unstable: coefficient of variation {cv:.1%} over {summary.get('n', '?')} samples "
            f"exceeds {threshold:.1%}. Close other programs, fix the thread count, run longer, or compare "
            f"variants with interleaved runs and medians (p50) rather than means.")


# timing_breakdown's timestamp arguments, in the order it takes them
TIMELINE = ("enqueue_start", "enqueue_end", "h2d_start", "compute_start", "compute_end", "d2h_end")


def timing_breakdown(enqueue_start: Sequence[float], enqueue_end: Sequence[float], h2d_start: Sequence[float],
                     compute_start: Sequence[float], compute_end: Sequence[float], d2h_end: Sequence[float], *,
                     host_wall_ms: float | None = None, cv_threshold: float | None = None) -> dict[str, Any]:
    """trtexec's performance summary from per-iteration timestamps, all in ms.

    ``enqueue_start``/``enqueue_end`` are host times around the enqueue call (``execute_async_v3`` or the
    graph launch); ``h2d_start``, ``compute_start``, ``compute_end`` and ``d2h_end`` are CUDA event times on one
    stream, relative to one reference event. Per iteration: Latency = D2H end - H2D start, Enqueue time =
    enqueue end - enqueue start, H2D = compute start - H2D start, GPU compute = compute end - compute start,
    D2H = D2H end - compute end. Each gets ``min, max, mean, median, p90, p95, p99`` (plus ``p50, std, cv, n``
    from :func:`summarize`).

    ``throughput_qps`` is iterations per second of ``host_wall_ms`` (trtexec's "Total Host Walltime"), or, where
    that is not given, of the device span from the first H2D start to the last D2H end (``throughput_basis``
    says which). ``warnings`` holds trtexec's two: GPU compute time varying more than ``cv_threshold``
    (default :data:`CV_THRESHOLD`), and an enqueue time as long as the GPU compute time (the host, not the GPU,
    bounds throughput; CUDA graphs help). Raises :class:`ProfileError` on timestamps that are empty, of unequal
    lengths, not finite, or out of order.
    """
    columns = {}
    for name, values in zip(TIMELINE, (enqueue_start, enqueue_end, h2d_start, compute_start, compute_end,
                                       d2h_end), strict=True):
        arr = np.asarray(list(values), dtype=np.float64)
        if arr.ndim != 1:
            raise ProfileError(f"{name} must be a flat list of ms per iteration, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ProfileError(f"{name} holds values that are not finite: {arr[~np.isfinite(arr)][:5].tolist()}")
        columns[name] = arr
    lengths = {name: len(arr) for name, arr in columns.items()}
    if len(set(lengths.values())) != 1 or lengths["h2d_start"] == 0:
        raise ProfileError(f"every timestamp list needs one value per iteration, at least one; got lengths {lengths}")
    order = (("enqueue_start", "enqueue_end"), ("h2d_start", "compute_start"), ("compute_start", "compute_end"),
             ("compute_end", "d2h_end"))
    for first, then in order:
        bad = np.nonzero(columns[then] < columns[first])[0]
        if bad.size:
            i = int(bad[0])
            raise ProfileError(f"iteration {i}: {then} ({columns[then][i]} ms) is before {first} "
                               f"({columns[first][i]} ms); record the events in stream order and read them against "
                               f"one reference event")
    n = lengths["h2d_start"]
    c = columns
    phases = {"latency": c["d2h_end"] - c["h2d_start"], "enqueue": c["enqueue_end"] - c["enqueue_start"],
              "h2d": c["compute_start"] - c["h2d_start"], "gpu_compute": c["compute_end"] - c["compute_start"],
              "d2h": c["d2h_end"] - c["compute_end"]}
    summaries = {}
    for name, values in phases.items():
        summary = summarize(values.tolist())
        summary["median"] = summary["p50"]
        summaries[name] = summary
    if host_wall_ms is not None:
        if not (isinstance(host_wall_ms, (int, float)) and math.isfinite(host_wall_ms) and host_wall_ms > 0):
            raise ProfileError(f"host_wall_ms must be a finite time > 0, got {host_wall_ms!r}")
        span, basis = float(host_wall_ms), "host wall time"
    else:
        span, basis = float(c["d2h_end"].max() - c["h2d_start"].min()), "device span"
        if span <= 0:
            raise ProfileError(f"the {n} iterations span no device time (first H2D start = last D2H end); pass "
                               f"host_wall_ms")
    warnings = []
    unstable = cv_warning(summaries["gpu_compute"], CV_THRESHOLD if cv_threshold is None else cv_threshold)
    if unstable:
        warnings.append(f"GPU compute time: {unstable}")
    if summaries["enqueue"]["mean"] >= summaries["gpu_compute"]["mean"]:
        warnings.append(f"enqueue time (mean {summaries['enqueue']['mean']:.4g} ms) is at least the GPU compute "
                        f"time (mean {summaries['gpu_compute']['mean']:.4g} ms): the host, not the GPU, bounds "
                        f"throughput; try extra['cuda_graph']=True")
    return {"iterations": n, "throughput_qps": n / (span / 1000.0), "throughput_basis": basis,
            "host_wall_ms": None if host_wall_ms is None else float(host_wall_ms),
            "total_gpu_compute_ms": float(phases["gpu_compute"].sum()), **summaries, "warnings": warnings}
