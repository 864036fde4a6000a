"""Latency-aware pruning: measured per-layer latency tables, a latency model of the network, and a planner
that meets a latency budget (``prune(..., target_latency=0.6)``, ``trt-prune latency-table``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LatencyError
from .model import LatencyModel, LayerUse, layer_uses, model_key
from .planner import LatencyPlanner
from .table import LatencyTable, LayerSig, TableKey, load_table, table_path

DEFAULT_POINTS = 6


def parse_budget(value: Any) -> tuple[str, float]:
    """``0.6`` (a fraction of the dense latency) or ``"4.5ms"`` (milliseconds) -> ``("fraction"|"ms", number)``."""
    text = str(value).strip().lower()
    try:
        if text.endswith("ms"):
            ms = float(text[:-2])
            if not ms > 0 or not np.isfinite(ms):
                raise ValueError
            return "ms", ms
        frac = float(text)
    except ValueError:
        raise LatencyError(f"target latency {str(value)[:40]!r} is neither a fraction of the dense latency in "
                           "(0, 1) (e.g. 0.6) nor milliseconds (e.g. 4.5ms)") from None
    if not 0.0 < frac < 1.0:
        raise LatencyError(f"target latency {frac} as a fraction of the dense latency must be in (0, 1); give "
                           "e.g. 0.6, or milliseconds as 4.5ms")
    return "fraction", frac


def budget_ms(value: Any, dense_ms: float) -> float:
    kind, number = parse_budget(value)
    return number * dense_ms if kind == "fraction" else number


def prunable_classes(graph, round_to: int, ignore: tuple[str, ...] = ()) -> np.ndarray:
    from ..pruning.structured import PruneConfig, _prunable

    groups, _ = _prunable(graph, PruneConfig(round_to=round_to, ignore=tuple(ignore)))
    mask = np.zeros(len(graph.root), dtype=bool)
    for g in groups:
        mask[np.asarray(g.classes, dtype=np.int64)] = True
    return mask


def ensure_table(model, graph, input_shape, *, backend: str = "onnxruntime", location: str | Path | None = None,
                 round_to: int = 8, ignore: tuple[str, ...] = (), points: int = DEFAULT_POINTS,
                 threads: int | None = None, dtype: str = "float32", lowest: float | None = None,
                 on_estimate: Callable[[int, float], Any] | None = None,
                 on_progress: Callable[[int], Any] | None = None, cache_dir: str | None = None,
                 recalibrate: bool = False, sparse: bool | None = None) -> tuple[LatencyTable, dict[str, Any]]:
    """The latency table for ``model`` on ``backend`` (read from ``location`` and extended there, or new):
    missing grid points are measured (``on_estimate(points, seconds)`` is told the work first, then
    ``on_progress(n)`` after each layer shape) and the model is calibrated once. ``sparse`` (default: fp16
    tables on backends with 2:4 kernels) also measures every point with 2:4 weights. ``cache_dir`` (default:
    ``location/engines`` on backends that cache engines) is where TensorRT keeps the timing cache every
    point's engine shares. Returns the table and what this call did (points measured, seconds)."""
    from ..backends import backend_class
    from .measure import (
        calibrate,
        environment_key,
        estimate_seconds,
        measure,
        open_table,
        plan_measurements,
        probe_speed,
        wants_sparse,
    )

    t0 = time.perf_counter()
    key = environment_key(backend, threads, dtype)
    if cache_dir is None and location is not None and "cache_dir" in backend_class(backend).options:
        # TensorRT: one engine per grid point, all sharing the timing cache kept in this folder
        cache_dir = str(Path(location) / "engines")
    table = open_table(location, key)
    uses, _ = layer_uses(graph)
    if not uses:
        raise LatencyError("the model has no conv or linear layer a latency table can cover")
    sparse = wants_sparse(key) if sparse is None else sparse
    todo = plan_measurements(table, uses, prunable_classes(graph, round_to, ignore), round_to, points, lowest,
                             sparse=sparse)
    n_points = sum(len(t.points) for t in todo)
    estimate = 0.0
    if todo:
        estimate = estimate_seconds(todo, probe_speed(backend, key, todo))
        if on_estimate is not None:
            on_estimate(n_points, estimate)
        measure(table, todo, on_point=on_progress, cache_dir=cache_dir, save_to=location)
    mkey = model_key(uses, graph.input_shape)
    calibrated = False
    if recalibrate or todo or mkey not in table.calibrations:
        calibrate(table, model, graph, input_shape, round_to=round_to, cache_dir=cache_dir)
        calibrated = True
    if location is not None:
        table.save(location)
    return table, {"points_measured": n_points, "estimate_s": round(estimate, 1), "calibrated": calibrated,
                   "seconds": round(time.perf_counter() - t0, 2), "entries": len(table.entries),
                   "key": table.key.describe()}


def sparse_choice(model: LatencyModel, kept: np.ndarray | None = None, margin: float = 0.05) -> list[dict] | None:
    """Per table-covered layer at the kept counts: its dense and 2:4 times and whether 2:4 pays (the sparse
    kernel at least ``margin`` faster). None when the table holds no 2:4 times (measured without sparse kernels:
    ONNX Runtime on the CPU), in which case the channel floor (``DEFAULT_MIN_CHANNELS``) decides instead."""
    if not any(e.sparse_ms is not None for e in model.table.entries.values()):
        return None
    rows = []
    for i, u in enumerate(model.layers):
        entry = model.entries[i]
        c_in, c_out = u.counts(kept)
        dense = model.layer_ms_at(i, c_in, c_out)
        if entry.sparse_ms is None:
            rows.append({"module": u.module, "dense_ms": round(dense, 5), "sparse_ms": None, "pays": False})
            continue
        # the calibration's layer scale applies to both grids, so the two times compare like for like
        sparse = model.scale * entry.time(c_in, c_out if not u.sig.one_axis else 0, sparse=True)
        rows.append({"module": u.module, "dense_ms": round(dense, 5), "sparse_ms": round(sparse, 5),
                     "pays": sparse <= dense * (1.0 - margin)})
    return rows


__all__ = ["LatencyModel", "LatencyPlanner", "LatencyTable", "LayerSig", "LayerUse", "TableKey", "budget_ms",
           "ensure_table", "load_table", "parse_budget", "prunable_classes", "sparse_choice", "table_path"]
