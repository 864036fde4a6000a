"""INT8 explicit quantization for TensorRT's strongly typed builds: QDQ-format ONNX, calibrated on real data.

:func:`quantize` reads an fp32 ONNX file and writes one with ``QuantizeLinear → DequantizeLinear`` pairs where
TensorRT fuses them (:mod:`.placement`), scales from calibration (:mod:`.calibrate`): symmetric, zero point 0,
activations per tensor in [-128, 127], weights per output channel in [-127, 127] stored as INT8 initializers
behind a DequantizeLinear (a quarter of the bytes; TensorRT 10+ takes DQ-only INT8 weights), biases float.
Zeros stay zeros, so a 2:4 weight is still 2:4 after quantization (``trt-prune inspect sparsity`` follows the DQ).

The result runs in ONNX Runtime on the CPU (accuracy is measured there) and is what TensorRT 11 builds in INT8
without precision flags. ``fp16_rest`` then makes every float tensor fp16 (:func:`trt_prune.quantize.fp16.fp16_rest`,
with :mod:`trt_prune.precision`'s block list), so the strongly typed build has no fp32 layer left by accident.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trt_prune import onnx_io
from trt_prune.errors import QuantizeError
from trt_prune.quantize.calibrate import (
    METHODS,
    CalibrationSet,
    calibration_set,
    collect_ranges,
    model_digest,
    read_cache,
    write_cache,
)
from trt_prune.quantize.placement import DEFAULT_MIN_CHANNELS, QUANTIZED_OPS, WEIGHTED, Placement, place, violations

__all__ = ["METHODS", "QuantizeResult", "calibration_set", "place", "quantize", "quantize_model", "resolve_exclude",
           "violations"]

MIN_OPSET = 13  # per-axis DequantizeLinear


@dataclass
class QuantizeResult:
    """What :func:`quantize` wrote. ``placement``: quantized nodes, those kept in float with the reason, residual
    Adds and the tail (:meth:`Placement.to_dict`); ``calibration``: method, data, samples, seconds and whether
    the ranges came from the cache; ``agreement``: per output, the INT8 model's signal-to-quantization-noise
    ratio against the fp32 model (dB; 20 dB ≈ 10 % relative error) on the first calibration samples."""

    src: str
    dst: str
    method: str
    qdq_pairs: int
    weights: int
    placement: dict
    calibration: dict
    fp16_rest: dict = field(default_factory=dict)  # with fp16_rest: what trt_prune.quantize.fp16 reported
    agreement: dict = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _check_source(model: onnx.ModelProto, src: str) -> None:
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if found:
        raise QuantizeError(f"{src!r} is already quantized (it holds {', '.join(found)}); quantize the fp32 model it "
                            "came from")
    opset = onnx_io.default_opset(model)
    if opset < MIN_OPSET:
        raise QuantizeError(f"{src!r} uses opset {opset}; per-channel INT8 weights need opset {MIN_OPSET} or later: "
                            "re-export it (trt-prune export uses 18)")
    if not any(n.op_type in WEIGHTED for n in model.graph.node):
        raise QuantizeError(f"{src!r} has no Conv, ConvTranspose, Gemm or MatMul: nothing to quantize")


def resolve_exclude(model: onnx.ModelProto, exclude: Sequence[str]) -> list[str]:
    """The node names ``exclude`` means: each entry is a node name, or a PyTorch module path (``head.0.cls``)
    meaning every node exported from that module and its children. An entry matching nothing is one
    :class:`QuantizeError` naming the closest node names and module paths."""
    nodes = list(model.graph.node)
    names = {n.name for n in nodes}
    modules = {n.name: onnx_io.node_module(n) for n in nodes}
    out: list[str] = []
    missing = []
    for entry in exclude:
        if entry in names:
            out.append(entry)
            continue
        found = [n for n, m in modules.items() if m is not None and (m == entry or m.startswith(entry + "."))]
        if found:
            out += found
        else:
            missing.append(entry)
    if missing:
        known = sorted(names | {m for m in modules.values() if m})
        hints = {m: difflib.get_close_matches(m, known, n=2) for m in missing[:3]}
        said = "; ".join(f"{m!r}" + (f" (did you mean {', '.join(map(repr, h))}?)" if h else "")
                         for m, h in hints.items())
        raise QuantizeError(f"--exclude names no node or module of the graph: {said}; list them with trt-prune "
                            "inspect quantization MODEL.onnx; nothing was written")
    return list(dict.fromkeys(out))


def quantize_model(model: onnx.ModelProto, placement: Placement, ranges: dict[str, float]) -> onnx.ModelProto:
    """A copy of ``model`` with the Q/DQ pairs of ``placement`` at the scales ``ranges`` (tensor → amax)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    fresh = onnx_io.name_allocator({t for n in graph.node for t in [*n.input, *n.output]} | set(inits)
                                   | {n.name for n in graph.node})

    new_inits: list[TensorProto] = []
    emitted: dict[str, list[onnx.NodeProto]] = {}  # tensor -> the Q/DQ nodes to emit before its first reader
    replace: dict[tuple[str, int], str] = {}  # (node, input index) -> the tensor it reads instead
    for tensor, readers in placement.activation_consumers().items():
        amax = float(ranges.get(tensor, 0.0))
        scale = np.float32(max(amax, 1e-8) / 127.0)
        s, z = fresh(f"{tensor}_scale"), fresh(f"{tensor}_zero_point")
        q, dq = fresh(f"{tensor}_quantized"), fresh(f"{tensor}_dequantized")
        new_inits += [numpy_helper.from_array(np.asarray(scale, np.float32), s),
                      numpy_helper.from_array(np.asarray(0, np.int8), z)]
        emitted[tensor] = [helper.make_node("QuantizeLinear", [tensor, s, z], [q], name=fresh(f"{tensor}_Quantize")),
                           helper.make_node("DequantizeLinear", [q, s, z], [dq], name=fresh(f"{tensor}_Dequantize"))]
        for node, index in readers:
            replace[(node, index)] = dq
    weight_nodes: dict[str, list[onnx.NodeProto]] = {}
    for qn in placement.nodes:
        if qn.weight is None:
            continue
        key = f"{qn.weight}@{qn.weight_axis}"
        if key not in weight_nodes:
            w = numpy_helper.to_array(inits[qn.weight]).astype(np.float32)
            axis = qn.weight_axis
            others = tuple(i for i in range(w.ndim) if i != axis)
            amax = np.abs(w).max(axis=others) if others else np.abs(w)
            scale = (np.where(amax > 0, amax, 1.0) / 127.0).astype(np.float32)
            shape = [1] * w.ndim
            shape[axis] = -1
            q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            names = [fresh(f"{qn.weight}_int8"), fresh(f"{qn.weight}_scale"), fresh(f"{qn.weight}_zero_point")]
            new_inits += [numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1]),
                          numpy_helper.from_array(np.zeros(scale.shape, np.int8), names[2])]
            out_name = fresh(f"{qn.weight}_dequantized")
            weight_nodes[key] = [helper.make_node("DequantizeLinear", names, [out_name],
                                                  name=fresh(f"{qn.weight}_Dequantize"), axis=axis)]
        replace[(qn.name, 1)] = weight_nodes[key][0].output[0]
    weight_of = {qn.name: f"{qn.weight}@{qn.weight_axis}" for qn in placement.nodes if qn.weight is not None}
    nodes, done = [], set()
    graph_inputs = {v.name for v in graph.input}
    for tensor in list(emitted):  # graph inputs read through a pair: their Q/DQ go first
        if tensor in graph_inputs:
            nodes += emitted[tensor]
            done.add(tensor)
    for node in graph.node:
        for index, tensor in enumerate(node.input):
            if (node.name, index) in replace and tensor in emitted and tensor not in done:
                nodes += emitted[tensor]
                done.add(tensor)
        key = weight_of.get(node.name)
        if key is not None and key not in done:
            nodes += weight_nodes[key]
            done.add(key)
        for index in range(len(node.input)):
            if (node.name, index) in replace:
                node.input[index] = replace[(node.name, index)]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    # fp32 weights no node reads any more
    used = {t for n in graph.node for t in n.input} | {v.name for v in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out


def _sqnr(reference: np.ndarray, actual: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - actual) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0:
        return float("inf")
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")


def agreement(reference: onnx.ModelProto, quantized: onnx.ModelProto, data: CalibrationSet,
              samples: int = 8) -> dict[str, dict]:
    """Per output: SQNR (dB) and max |difference| of ``quantized`` against ``reference`` on the first
    ``samples`` calibration samples. Outputs whose shapes differ between the two (after NMS) are left out."""
    ref = onnx_io.ort_session(reference, quiet=True)
    cand = onnx_io.ort_session(quantized, quiet=True)
    names = [o.name for o in ref.get_outputs()]
    pairs: dict[str, list] = {n: [] for n in names}
    seen = 0
    for feeds in data.batches():
        a = ref.run(names, feeds)
        b = cand.run(names, feeds)
        for n, x, y in zip(names, a, b, strict=True):
            if x.shape == y.shape and np.issubdtype(x.dtype, np.floating):
                pairs[n].append((x, y))
        seen += len(next(iter(feeds.values())))
        if seen >= samples:
            break
    out = {}
    for n, xs in pairs.items():
        if xs:
            x = np.concatenate([p[0].ravel() for p in xs])
            y = np.concatenate([p[1].ravel() for p in xs])
            out[n] = {"sqnr_db": round(float(_sqnr(x, y)), 2), "max_abs": float(np.max(np.abs(x - y)))}
    return out


def quantize(src, dst, *, calib, method: str = "entropy", exclude: Sequence[str] = (), fp16_rest: bool = False,
             calib_size: int = 256, calib_cache=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
             min_channels: int = DEFAULT_MIN_CHANNELS,
             on_progress: Callable[[int, int], None] | None = None) -> QuantizeResult:
    """Write the INT8 (QDQ) variant of the fp32 ONNX file ``src`` to ``dst``.

    ``calib``: the calibration data (:func:`~trt_prune.quantize.calibrate.calibration_set`: a folder of images,
    a .npy/.npz, an array, or ``"builtin"``), at most ``calib_size`` samples, normalised by ``mean``/``std``
    after scaling to [0, 1] (images). ``method``: ``entropy`` (default, TensorRT's), ``minmax`` or
    ``percentile``. ``exclude``: node names or PyTorch module paths kept in float. ``calib_cache``: where the
    ranges are stored and reused when model, data and method match (default ``<dst>.calib.json``; ``False`` for
    none).
    ``on_progress(done, total)`` reports calibration samples.

    ``src`` is only read; ``dst`` is written atomically and only after onnx.checker passes and ONNX Runtime runs
    it. An fp32 model that is already quantized, an opset below 13, an empty or mismatched calibration set,
    or an ``exclude`` naming a missing node raise :class:`QuantizeError` and write nothing.
    """
    started = time.perf_counter()
    if method not in METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    src_path, dst_path, original = onnx_io.load_source(src, dst, QuantizeError, "quantization")
    from trt_prune.artifacts import check_output_file

    check_output_file(dst_path)  # before minutes of calibration
    _check_source(original, str(src_path))
    exclude = resolve_exclude(original, [str(e) for e in exclude])
    data = calibration_set(calib, original, limit=calib_size, mean=mean, std=std)
    model = onnx.ModelProto()
    model.CopyFrom(original)
    from trt_prune.precision import _constants_to_initializers, _name_nodes

    _constants_to_initializers(model.graph)
    _name_nodes(model.graph)
    placement = place(model, exclude=exclude, min_channels=min_channels)
    placement.residual = [r for r in placement.residual if r["node"] not in set(exclude)]
    if not placement.nodes:
        reasons = sorted({k["reason"] for k in placement.kept})
        raise QuantizeError(f"nothing to quantize in {str(src_path)!r}: every Conv/Gemm/MatMul stays in float "
                            f"({'; '.join(reasons)[:300]}); nothing was written")
    tensors = list(placement.activation_consumers())
    # calibration runs the fp32 model, so a tensor's range does not depend on which others get pairs: a cache
    # holding every tensor needed now (e.g. written before an --exclude) is reused
    key = {"model": model_digest(model), "data": data.fingerprint, "method": method}
    cache = None if calib_cache is False else Path(calib_cache or f"{dst_path}.calib.json")
    ranges = read_cache(cache, key) if cache is not None else None
    cached = ranges is not None and all(t in ranges for t in tensors)
    t0 = time.perf_counter()
    if not cached:
        ranges = collect_ranges(model, tensors, data, method, on_progress)
    calib_seconds = time.perf_counter() - t0
    quantized = quantize_model(model, placement, ranges)
    try:
        onnx_io.check_model(quantized)
    except Exception as exc:
        raise QuantizeError(f"the quantized graph fails onnx.checker ({onnx_io.one_line(exc)}); nothing was "
                            "written. Clean the model first (trt-prune clean) and retry") from exc
    fp16_report = {}
    if fp16_rest:
        from trt_prune.quantize.fp16 import fp16_rest as to_fp16_rest

        quantized, fp16_report = to_fp16_rest(quantized)
    try:
        agree = agreement(model, quantized, data)
    except Exception as exc:
        raise QuantizeError(f"ONNX Runtime cannot run the quantized model ({onnx_io.one_line(exc)}); nothing was "
                            "written") from exc
    written = onnx_io.save_onnx(quantized, dst_path)
    if cache is not None and not cached:
        write_cache(cache, key, ranges)
    init_names = {t.name for t in quantized.graph.initializer}
    n_weights = sum(1 for n in quantized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init_names)
    return QuantizeResult(
        src=str(src_path), dst=str(written), method=method,
        qdq_pairs=sum(1 for n in quantized.graph.node if n.op_type == "QuantizeLinear"), weights=n_weights,
        placement=placement.to_dict(), fp16_rest=fp16_report, agreement=agree,
        calibration={"source": data.source, "samples": data.count, "cached": cached,
                     "cache": None if cache is None else str(cache), "seconds": round(calib_seconds, 2),
                     "tensors": len(tensors)},
        bytes_before=src_path.stat().st_size, bytes_after=Path(written).stat().st_size,
        seconds=round(time.perf_counter() - started, 2))


def inspect_quantization(path, *, min_channels: int = DEFAULT_MIN_CHANNELS) -> dict:
    """Per weighted layer of the ONNX file ``path``: its node, PyTorch module, op and precision. For an fp32
    model, what :func:`quantize` would do (``int8`` or ``float`` with the reason); for a QDQ model, what it
    holds, and every rule of :mod:`.placement` it breaks (``violations``)."""
    from trt_prune.precision import _constants_to_initializers

    model = onnx_io.load_onnx(path, error=QuantizeError)
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    layers = []
    if has_qdq:
        producer = {o: n for n in model.graph.node for o in n.output}
        for node in model.graph.node:
            if node.op_type in WEIGHTED:
                dq = [t in producer and producer[t].op_type == "DequantizeLinear" for t in node.input[:2]]
                layers.append({"node": node.name, "module": onnx_io.node_module(node), "op": node.op_type,
                               "precision": "int8" if all(dq) else "float",
                               "reason": "" if all(dq) else "its inputs are not dequantized INT8"})
        return {"file": str(path), "quantized": True, "layers": layers,
                "qdq_pairs": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
                "violations": violations(model, min_channels=min_channels)}
    _constants_to_initializers(model.graph)
    placement = place(model, min_channels=min_channels)
    kept = {k["node"]: k["reason"] for k in placement.kept}
    for node in model.graph.node:
        if node.op_type in WEIGHTED:
            layers.append({"node": node.name, "module": onnx_io.node_module(node), "op": node.op_type,
                           "precision": "float" if node.name in kept else "int8", "reason": kept.get(node.name, "")})
    return {"file": str(path), "quantized": False, "layers": layers, "residual": placement.residual,
            "tail": placement.to_dict()["tail"]}
