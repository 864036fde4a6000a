"""Measuring latency tables and calibrating them on a model, through the common backend interface.

Each grid point is one single-layer model built for the backend the network will run on: an ONNX file (one
Conv / ConvTranspose / MatMul+Add node with random weights, written with ``onnx.helper``: exporting thousands of
one-layer torch modules would take minutes for nothing) for backends that build from ONNX (ONNX Runtime,
TensorRT — TensorRT builds one engine per point and shares its timing cache through ``cache_dir``), or the
equivalent ``nn.Module`` for the torch backend. The points of one layer shape are timed together with
:func:`~trt_prune.profiling.profile.interleaved_blocks` (rounds in shuffled order, medians), so a drift of
this noisy machine spreads over the grid instead of bending it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LatencyError
from .model import LatencyModel, LayerUse, layer_uses, model_key
from .table import Entry, LatencyTable, LayerSig, TableKey, axis_points

ROUNDS = 5
ITERATIONS = 4
PROFILE_RUNS = 5
LAYER = "layer"  # the module name the single-layer models' nodes carry (their scope in profiles)
SESSION_SECONDS = 0.03  # building one small session, measured on the 2-core CI machine (ONNX Runtime)
EXPORT_SECONDS = 10.0  # one dynamo export + clean of a detector-sized model on that machine
CALIBRATION_ROUNDS = 8
CALIBRATION_ITERATIONS = 15
# calls dropped at the start of each turn of an interleaved end-to-end timing: the first calls after another
# model ran pay for its cache evictions; steady state (what a deployed model sees) comes after a few
CALIBRATION_DISCARD = 3


def environment_key(backend: str = "onnxruntime", threads: int | None = None, dtype: str = "float32",
                    device: str | None = None) -> TableKey:
    """The :class:`TableKey` of this machine for ``backend``."""
    from ..backends import get_backend
    from ..backends.onnxruntime import usable_cores
    from ..provenance import machine_info

    chosen = get_backend(backend)
    ok, reason = chosen.available()
    if not ok:
        raise LatencyError(f"backend {backend!r} is unavailable: {reason}")
    info = machine_info()
    if device is None:  # the CPU, and the GPU where there is one: a table is only good on the same pair
        device = " + ".join(d for d in (info.get("cpu") or "cpu", info.get("gpu")) if d)
    return TableKey(backend=backend, backend_version=str(chosen.version() or "unknown"), device=str(device),
                    threads=int(threads or usable_cores()), dtype=dtype)


def open_table(location: str | Path | None, key: TableKey) -> LatencyTable:
    """The table at ``location`` (refused if measured elsewhere), or a new empty one for ``key``."""
    from .table import load_table, table_path

    if location is not None and table_path(location).exists():
        return load_table(location, expect=key)
    return LatencyTable(key)


@dataclasses.dataclass
class Todo:
    sig: LayerSig
    points: list[tuple[int, int]]


def grid_for(use: LayerUse, variable_in: bool, variable_out: bool, round_to: int, points: int,
             lowest: float | None = None) -> tuple[list[int], list[int]]:
    """The grid axes one layer needs: aligned counts on each axis whose channels a plan may prune."""
    def axis(n: int, variable: bool) -> list[int]:
        if not variable:
            return [n]
        low = None if lowest is None else max(round_to, math.ceil(n * lowest / round_to) * round_to)
        return axis_points(n, round_to, points, low)
    ins = axis(use.dense_in, variable_in)
    outs = [0] if use.sig.one_axis else axis(use.dense_out, variable_out)
    return ins, outs


def sparse_option(backend: str) -> dict[str, Any] | None:
    """The build settings that let ``backend`` run 2:4 sparse kernels (from its declared options), or None."""
    from ..backends import backend_class

    options = backend_class(backend).options
    if "sparse24" in options:
        return {"extra": {"sparse24": True}}
    if "sparse_weights" in options:
        return {"sparse_weights": True}
    return None


def wants_sparse(key: TableKey) -> bool:
    """2:4 grids are measured for fp16 tables on backends with sparse kernels (the GPU paths)."""
    return key.dtype == "float16" and sparse_option(key.backend) is not None


def plan_measurements(table: LatencyTable, uses: list[LayerUse], prunable_classes: np.ndarray, round_to: int,
                      points: int = 6, lowest: float | None = None, sparse: bool = False) -> list[Todo]:
    """Extend ``table``'s grids to cover ``uses`` and list the points still to measure, per layer shape
    (``sparse``: with a 2:4 grid beside each dense one)."""
    todo: dict[str, Todo] = {}
    for u in uses:
        vin = u.in_classes is not None and bool(prunable_classes[u.in_classes].any())
        vout = u.out_classes is not None and bool(prunable_classes[u.out_classes].any())
        ins, outs = grid_for(u, vin, vout, round_to, points, lowest)
        entry = table.entries.get(u.sig.key())
        if entry is None:
            entry = Entry(u.sig, ins, outs, np.full((len(ins), len(outs)), np.nan))
            table.entries[u.sig.key()] = entry
        else:
            entry.extend(ins, outs)
        if sparse and entry.sparse_ms is None:
            entry.sparse_ms = np.full(entry.ms.shape, np.nan)
        missing = entry.missing()
        if missing and u.sig.key() not in todo:
            todo[u.sig.key()] = Todo(u.sig, missing)
    return list(todo.values())


def estimate_seconds(todo: list[Todo], ms_per_gmac: float, rounds: int = ROUNDS,
                     iterations: int = ITERATIONS, calibration: bool = True) -> float:
    """Seconds the measurement will take, from each point's MACs and a measured speed (ms per GMAC): per point
    a session, its interleaved runs and its profile (a second session and ``PROFILE_RUNS + 1`` runs); plus the
    calibration (two exports of the whole model, then its interleaved timing)."""
    total, network_ms = 0.0, 0.0
    for t in todo:
        for c_in, c_out in t.points:
            run_ms = max(0.02, layer_macs(t.sig, c_in, c_out) / 1e9 * ms_per_gmac)
            total += 2 * SESSION_SECONDS + (rounds * (iterations + 1) + PROFILE_RUNS + 3) * run_ms / 1e3 + 0.05
        dense = layer_macs(t.sig, t.sig.dense[0], t.sig.dense[1]) / 1e9 * ms_per_gmac
        network_ms += dense
    if calibration:
        total += 2 * EXPORT_SECONDS + 2 * CALIBRATION_ROUNDS * (CALIBRATION_ITERATIONS + CALIBRATION_DISCARD) \
            * network_ms / 1e3
    return total


def layer_macs(sig: LayerSig, c_in: int, c_out: int) -> float:
    spatial = math.prod(sig.spatial) if sig.spatial else 1
    if sig.op == "linear":
        return sig.batch * spatial * c_in * c_out
    k = math.prod(sig.kernel)
    out_spatial = 1
    for n, kk, s, p, d in zip(sig.spatial, sig.kernel, sig.stride, sig.padding, sig.dilation, strict=False):
        out_spatial *= max(1, (n + 2 * p - d * (kk - 1) - 1) // s + 1)
    if sig.op == "depthwise":
        return sig.batch * out_spatial * c_in * k
    if sig.op == "grouped":
        return sig.batch * out_spatial * c_in * (c_in // sig.groups) * k
    if sig.op == "conv_transpose":
        return sig.batch * spatial * c_in * c_out * k
    return sig.batch * out_spatial * c_in * c_out * k


def _input_shape(sig: LayerSig, c_in: int) -> tuple[int, ...]:
    if sig.op == "linear":
        rows = sig.spatial[0] if sig.spatial else 1
        return (sig.batch, rows, c_in) if rows > 1 else (sig.batch, c_in)
    return (sig.batch, c_in, *sig.spatial)


def _weight_shape(sig: LayerSig, c_in: int, c_out: int) -> tuple[tuple[int, ...], int, int]:
    """(weight shape, groups, output channels) of the single layer at these counts."""
    if sig.op == "depthwise":
        return (c_in, 1, *sig.kernel), c_in, c_in
    if sig.op == "grouped":
        return (c_in, c_in // sig.groups, *sig.kernel), sig.groups, c_in
    if sig.op == "conv_transpose":
        return (c_in, c_out, *sig.kernel), 1, c_out
    return (c_out, c_in, *sig.kernel), 1, c_out


def _sparse24(weight: np.ndarray, axis: int) -> np.ndarray:
    """``weight`` with a 2:4 magnitude mask along ``axis`` where the axis allows it (else unchanged)."""
    from ..sparsity.pattern import mask_2of4, pattern_possible

    if not pattern_possible(weight.shape, axis):
        return weight
    return weight * mask_2of4(weight, axis=axis)


def layer_onnx(sig: LayerSig, c_in: int, c_out: int, path: Path, dtype: str = "float32",
               sparse24: bool = False) -> Path:
    """A one-layer ONNX model at these counts (random weights; ``sparse24``: 2:4 along the input channels,
    TensorRT's axis), written to ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    x_shape = _input_shape(sig, c_in)
    if sig.op == "linear":
        weight = rng.standard_normal((c_in, c_out)) * 0.05
        weight = _sparse24(weight, 0) if sparse24 else weight
        w = numpy_helper.from_array(weight.astype(np_dtype), "W")
        inits = [w]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["mm" if sig.bias else "y"], name=f"/{LAYER}/MatMul")]
        if sig.bias:
            inits.append(numpy_helper.from_array(np.zeros(c_out, np_dtype), "B"))
            nodes.append(helper.make_node("Add", ["mm", "B"], ["y"], name=f"/{LAYER}/Add"))
        y_shape = (*x_shape[:-1], c_out)
    else:
        w_shape, groups, n_out = _weight_shape(sig, c_in, c_out)
        weight = rng.standard_normal(w_shape) * 0.05
        weight = _sparse24(weight, 0 if sig.op == "conv_transpose" else 1) if sparse24 else weight
        inits = [numpy_helper.from_array(weight.astype(np_dtype), "W")]
        ins = ["x", "W"]
        if sig.bias:
            inits.append(numpy_helper.from_array(np.zeros(n_out, np_dtype), "B"))
            ins.append("B")
        op = "ConvTranspose" if sig.op == "conv_transpose" else "Conv"
        nodes = [helper.make_node(op, ins, ["y"], kernel_shape=list(sig.kernel), strides=list(sig.stride),
                                  pads=list(sig.padding) * 2, dilations=list(sig.dilation), group=groups,
                                  name=f"/{LAYER}/{op}")]
        y_shape = None
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", elem, list(x_shape))],
                              [helper.make_tensor_value_info("y", elem, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def layer_module(sig: LayerSig, c_in: int, c_out: int, sparse24: bool = False):
    """The same single layer as a torch module (for the torch backend); ``sparse24``: 2:4 weights."""
    import torch
    from torch import nn

    if sig.op == "linear":
        module = nn.Linear(c_in, c_out, bias=sig.bias)
    else:
        _, groups, n_out = _weight_shape(sig, c_in, c_out)
        dims = len(sig.kernel)
        if sig.op == "conv_transpose":
            cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        else:
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        module = cls(c_in, n_out, sig.kernel, stride=sig.stride, padding=sig.padding, dilation=sig.dilation,
                     groups=groups, bias=sig.bias)
    if sparse24:
        with torch.no_grad():
            w = module.weight.detach().numpy()
            axis = 0 if sig.op == "conv_transpose" else 1
            module.weight.copy_(torch.from_numpy(_sparse24(w, axis).astype(w.dtype)))
    return module.eval()


def _session(backend: str, sig: LayerSig, c_in: int, c_out: int, key: TableKey, workdir: Path, config,
             sparse24: bool = False):
    from ..backends import backend_class, get_backend

    chosen = get_backend(backend)
    shape = _input_shape(sig, c_in)
    if sparse24:
        option = sparse_option(backend) or {}
        config = dataclasses.replace(config, **{k: v for k, v in option.items() if k != "extra"},
                                     extra={**config.extra, **option.get("extra", {})})
    if "onnx" in backend_class(backend).builds_from:
        name = f"l_{c_in}_{c_out}{'_s' if sparse24 else ''}.onnx"
        path = layer_onnx(sig, c_in, c_out, workdir / name, key.dtype, sparse24=sparse24)
        session = chosen.build(path, config)
        feeds = {"x": np.random.default_rng(1).standard_normal(shape).astype(
            np.float16 if key.dtype == "float16" else np.float32)}
    else:
        cfg = dataclasses.replace(config, shapes={"images": (shape, shape, shape)})
        session = chosen.build(layer_module(sig, c_in, c_out, sparse24=sparse24), cfg)
        spec = session.inputs[0]
        feeds = {spec.name: np.random.default_rng(1).standard_normal(shape).astype(spec.dtype)}
    return session, feeds


def _overhead_session(backend: str, sig: LayerSig, c_in: int, key: TableKey, workdir: Path, config):
    """A session that only copies its input through (ONNX Identity / ``nn.Identity``): the backend's per-call
    cost, which every single-layer timing includes but a whole network pays once."""
    import onnx
    from onnx import TensorProto, helper

    from ..backends import backend_class, get_backend

    chosen = get_backend(backend)
    shape = _input_shape(sig, c_in)
    dtype = np.float16 if key.dtype == "float16" else np.float32
    if "onnx" in backend_class(backend).builds_from:
        elem = TensorProto.FLOAT16 if key.dtype == "float16" else TensorProto.FLOAT
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "call",
                                  [helper.make_tensor_value_info("x", elem, list(shape))],
                                  [helper.make_tensor_value_info("y", elem, list(shape))])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = workdir / "identity.onnx"
        onnx.save(model, str(path))
        session = chosen.build(path, config)
        return session, {"x": np.zeros(shape, dtype)}
    from torch import nn

    session = chosen.build(nn.Identity(), dataclasses.replace(config, shapes={"images": (shape, shape, shape)}))
    return session, {session.inputs[0].name: np.zeros(shape, session.inputs[0].dtype)}


def _own_share(session, feeds) -> float:
    """The share of a single-layer session's time spent in the layer's own kernels, from one per-layer profile.

    Alone, a layer pays for conversions a network pays once at its edges: ONNX Runtime reorders the input to
    its blocked NCHWc layout and back (1.2 ms of 5.9 ms for a 3×3 conv of 32 channels at 160×160 here), and
    TensorRT inserts reformatting layers. Those rows carry none of the model's nodes (empty ``members``); the
    share is what the rows that run the layer's nodes take. 1.0 where the backend's profile cannot tell.
    """
    try:
        rows = session.profile_layers(feeds, runs=PROFILE_RUNS)
    except Exception:  # a backend without per-layer profiles (or one that fails at it): the whole call counts
        return 1.0
    total = sum(r.ms for r in rows)
    own = sum(r.ms for r in rows if r.members)
    return own / total if total > 0 and own > 0 else 1.0


def _build_config(backend: str, key: TableKey, cache_dir: str | None):
    from ..backends import BuildConfig, backend_class

    fp16 = key.dtype == "float16"
    options = backend_class(backend).options
    # fp16 tables are GPU tables: a backend that takes a device option is pointed at the GPU
    extra = {"device": "cuda"} if fp16 and "device" in options else {}
    if "allow_spinning" in options:
        # interleaved sessions share the cores: threads one session leaves spinning starve the next one, which
        # inflated single-layer times by half on the 2-core machine (21 ms of layers against 14.5 ms for the
        # network) and made calibrations swing between runs; tables therefore predict non-spinning latency
        extra["allow_spinning"] = False
    return BuildConfig(threads=key.threads, precision="fp16" if fp16 else "fp32",
                       cache_dir=cache_dir if "cache_dir" in backend_class(backend).options else None, extra=extra)


def probe_speed(backend: str, key: TableKey, todo: list[Todo]) -> float:
    """ms per GMAC of this backend on a mid-sized point of the largest layer: what the estimate scales by."""
    from ..profiling.profile import interleaved_blocks

    if not todo:
        return 0.0
    big = max(todo, key=lambda t: max(layer_macs(t.sig, *p) for p in t.points))
    point = sorted(big.points, key=lambda p: layer_macs(big.sig, *p))[len(big.points) // 2]
    with tempfile.TemporaryDirectory(prefix="trt_prune_latency_") as tmp:
        session, feeds = _session(backend, big.sig, *point, key, Path(tmp), _build_config(backend, key, None))
        with session:
            ms = float(np.median(interleaved_blocks({"p": session}, {"p": feeds}, rounds=2,
                                                    iterations_per_round=3, warmup_s=0.05)["p"]))
    return ms / max(1e-9, layer_macs(big.sig, *point) / 1e9)


def measure(table: LatencyTable, todo: list[Todo], *, rounds: int = ROUNDS, iterations: int = ITERATIONS,
            on_point: Callable[[int], Any] | None = None, cache_dir: str | None = None,
            save_to: str | Path | None = None) -> LatencyTable:
    """Time every point of ``todo`` on the table's backend and store the medians (ms) in ``table``.

    Points of one layer shape are timed interleaved, together with a session that only passes its (smallest)
    input through: its median, the backend's per-call cost, is subtracted from every point (a network pays it
    once, not once per layer) and kept in the entry as ``overhead_ms``. What remains is scaled by the share of
    the layer's own kernels in one per-layer profile of the point (:func:`_own_share`: layout conversions a
    network pays only at its edges are not the layer's). ``on_point(n)`` is called after each
    shape with the number of points done (for a progress bar); ``save_to`` writes the table after every shape,
    so an interrupted measurement keeps what it measured.
    """
    from ..profiling.profile import interleaved_blocks

    key = table.key
    backend = key.backend
    config = _build_config(backend, key, cache_dir)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trt_prune_latency_") as tmp:
        for t in todo:
            sessions, feeds = {}, {}
            entry = table.entries[t.sig.key()]
            kinds = (False, True) if entry.sparse_ms is not None else (False,)
            try:
                for c_in, c_out in t.points:
                    for sparse in kinds:
                        name = f"{c_in}x{c_out}{'s' if sparse else ''}"
                        workdir = Path(tmp) / name
                        workdir.mkdir(exist_ok=True)
                        sessions[name], feeds[name] = _session(backend, t.sig, c_in, c_out, key, workdir, config,
                                                               sparse24=sparse)
                smallest = min(c for c, _ in t.points)
                sessions["call"], feeds["call"] = _overhead_session(backend, t.sig, smallest, key, Path(tmp), config)
                blocks = interleaved_blocks(sessions, feeds, rounds=rounds, iterations_per_round=iterations,
                                            warmup_s=0.02)
                overhead = float(np.median([s for block in blocks["call"] for s in block]))
                entry.overhead_ms = overhead
                for (c_in, c_out) in t.points:
                    for sparse in kinds:
                        name = f"{c_in}x{c_out}{'s' if sparse else ''}"
                        samples = [s for block in blocks[name] for s in block]
                        share = _own_share(sessions[name], feeds[name])
                        entry.set(c_in, c_out, max(0.0, float(np.median(samples)) - overhead) * share,
                                  sparse=sparse)
            finally:
                for s in sessions.values():
                    s.close()
            table.measure_seconds += time.perf_counter() - start
            start = time.perf_counter()
            if save_to is not None:
                table.save(save_to)
            if on_point is not None:
                on_point(len(t.points))
    return table


def half_plan(graph, round_to: int) -> dict[str, list[int]]:
    """Every prunable group cut to about half its channels (the first ones kept): the calibration's second
    point. Which channels stay does not change the time, only how many."""
    from ..pruning.structured import PruneConfig, _aligned_keep, _prunable

    groups, _ = _prunable(graph, PruneConfig(round_to=round_to))
    plan = {}
    for g in groups:
        segs = g.segments or [list(range(g.size))]
        plan[g.key] = sorted(i for seg in segs for i in seg[:_aligned_keep(len(seg), 0.5, round_to)])
    return plan


def calibrate(table: LatencyTable, model, graph, input_shape, *, round_to: int = 8,
              rounds: int = CALIBRATION_ROUNDS, iterations: int = CALIBRATION_ITERATIONS,
              cache_dir: str | None = None) -> dict[str, Any]:
    """Time ``model`` end to end, dense and with every prunable group halved (interleaved), on the table's
    backend; store ``rest = constant + per_activation × f`` for the model in ``table`` (see
    :mod:`trt_prune.latency.model`) and return that calibration."""
    import copy

    from .. import stages
    from ..profiling.profile import interleaved_blocks
    from ..pruning.structured import _apply

    key = table.key
    config = _build_config(key.backend, key, cache_dir)
    half = half_plan(graph, round_to)
    pruned = copy.deepcopy(model)
    _apply(graph, half, pruned)
    sessions, feeds = {}, {}
    try:
        for name, m in (("dense", model), ("half", pruned)):
            session = stages.build(m.eval(), key.backend, config, batch=int(input_shape[0]),
                                   input_shape=tuple(input_shape))
            sessions[name] = session
            spec = session.inputs[0]
            feeds[name] = {spec.name: np.random.default_rng(0).standard_normal(
                tuple(input_shape)).astype(spec.dtype)}
        blocks = interleaved_blocks(sessions, feeds, rounds=rounds, iterations_per_round=iterations, warmup_s=0.3,
                                    discard_first=CALIBRATION_DISCARD)
    finally:
        for s in sessions.values():
            s.close()
    measured = {n: float(np.median([s for b in blocks[n] for s in b])) for n in blocks}
    return fit_rest(table, graph, measured["dense"], measured["half"], round_to=round_to, input_shape=input_shape)


def fit_rest(table: LatencyTable, graph, dense_ms: float, half_ms: float, *, round_to: int = 8,
             input_shape=None) -> dict[str, Any]:
    """Store in ``table`` (and return) the calibration of ``graph``'s model from its measured end-to-end p50s
    dense and under :func:`half_plan`: the rest the table does not cover, ``constant + per_activation × f``
    (or a scale on the layers, where they ran faster inside the network than alone)."""
    measured = {"dense": float(dense_ms), "half": float(half_ms)}
    input_shape = list(input_shape or graph.input_shape)
    lm = LatencyModel(graph, table, require_calibration=False)
    kept_half = graph.kept_mask(half_plan(graph, round_to))
    sum_dense, sum_half = lm.layer_sum(), lm.layer_sum(kept_half)
    f_half = lm.activation_fraction(kept_half)
    rest_dense, rest_half = measured["dense"] - sum_dense, measured["half"] - sum_half
    scale = 1.0
    if rest_dense >= 0 and rest_half >= 0:  # the usual case: the network does more than its layers
        per_act = (rest_dense - rest_half) / (1.0 - f_half) if f_half < 0.95 else 0.0
        per_act = min(max(0.0, per_act), rest_dense)  # the rest never grows as channels go, nor goes below 0
        constant = rest_dense - per_act
    else:  # the layers run faster inside the network than alone (fusions, warm caches): scale them instead
        per_act = 0.0
        scale = (measured["dense"] - measured["half"]) / max(1e-9, sum_dense - sum_half)
        constant = measured["dense"] - scale * sum_dense
        if constant < 0 or scale <= 0:
            scale, constant = measured["dense"] / sum_dense, 0.0
    cal = {"constant_ms": round(constant, 5), "per_activation_ms": round(per_act, 5), "layer_scale": round(scale, 5),
           "dense_measured_ms": round(measured["dense"], 5), "half_measured_ms": round(measured["half"], 5),
           "dense_layer_sum_ms": round(sum_dense, 5), "half_layer_sum_ms": round(sum_half, 5),
           "half_activation_fraction": round(f_half, 5), "input_shape": list(input_shape),
           "layers": len(lm.layers), "uncovered_layers": lm.uncovered}
    table.calibrations[model_key(lm.layers, graph.input_shape)] = cal
    return cal


__all__ = ["calibrate", "environment_key", "estimate_seconds", "fit_rest", "half_plan", "layer_macs", "layer_module",
           "layer_onnx", "layer_uses", "measure", "open_table", "plan_measurements", "probe_speed", "sparse_option",
           "wants_sparse"]
