"""fp16 for everything an INT8 QDQ model leaves in float, for TensorRT 11's strongly typed builds.

:func:`fp16_rest` runs ONNX Runtime's ``convert_float_to_float16`` with :mod:`trt_prune.precision`'s block list
and tidying, as :func:`~trt_prune.precision.to_fp16` does, after raising the opset to 19 (the first with fp16
Q/DQ scales). Hand-written around it, because that converter treats Q/DQ as any node: it rounds each scale to the
nearest fp16 (clamping tiny ones) without the INT8 weights it scales, and puts Casts between Q/DQ and fp32
neighbours. Here scales are rounded *up* to fp16 (weights re-rounded where that moves them: subnormal scales
only), a Q at an fp32 tensor reads it with an fp32 scale, and a DQ read only by fp32 nodes writes fp32.
ModelOpt's AutoCast (../shared/REFERENCE.md §6) is not installed here (its extra pins ``onnx~=1.21``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from trt_prune.errors import QuantizeError
from trt_prune.onnx_io import check_model, default_opset, is_plugin, name_allocator, one_line
from trt_prune.precision import (
    DEFAULT_BLOCK_OPS,
    DEFAULT_REDUCE_MIN_ELEMENTS,
    _constants_to_initializers,
    _name_nodes,
    _tidy,
    choose_blocked,
)

QDQ = ("QuantizeLinear", "DequantizeLinear")
FP16_QDQ_OPSET = 19  # QuantizeLinear-19 / DequantizeLinear-19: scales (and Q's input, DQ's output) may be fp16
_IR_FOR_19 = 9
# The opset-19 revision of each op that has one, and what it changed: only new types or new attribute values whose
# defaults keep the opset-18 meaning. A model at opset <= 18 whose ops changed in (opset, 19] only here is
# opset 19 as it stands; see _upgrade.
_WIDENED_AT_19 = {
    "AveragePool": "new attribute dilations, default 1",
    "Cast": "float8 types; saturate applies to float8 only", "CastLike": "float8 types; saturate for float8 only",
    "Constant": "float8 types", "Equal": "string type", "Identity": "float8 types", "If": "float8 types",
    "Loop": "float8 types", "Scan": "float8 types", "Reshape": "float8 types", "Shape": "float8 types",
    "Size": "float8 types", "Pad": "new mode 'wrap'",
    "Resize": "new coordinate_transformation_mode 'half_pixel_symmetric'",
    "QuantizeLinear": "fp16/bf16 input and scale, float8 outputs; saturate for float8 only",
    "DequantizeLinear": "fp16/bf16 scale and output, float8 inputs",
}
_FP16_TINY = np.float16(2.0**-24)  # smallest fp16 subnormal


def fp16_rest(model: onnx.ModelProto, *, block_ops: Iterable[str] | None = None, block_nodes: Sequence[str] = (),
              reduce_min_elements: int | None = DEFAULT_REDUCE_MIN_ELEMENTS,
              block_head_activations: bool = True) -> tuple[onnx.ModelProto, dict]:
    """A copy of the INT8 QDQ ``model`` (from :func:`~trt_prune.quantize.quantize_model`) in which every float
    tensor is fp16 except graph inputs/outputs (Casts at the boundary) and the nodes the block list of
    :func:`trt_prune.precision.to_fp16` keeps in fp32 (same arguments). Q/DQ work in fp16 (opset raised to 19
    where lower); zero points stay INT8; a Q/DQ named in ``block_nodes`` is ignored (its precision follows its
    neighbours'). ``model`` is not modified.

    The report: ``opset`` (before, after, how), ``blocked`` (``{"node", "op", "reason"}`` per fp32 node),
    ``casts`` (before/after), ``qdq`` (Q/DQ counts, those working in fp32 at fp32 neighbours, scales below fp16's
    normal range, INT8 weight values re-rounded to their fp16 scale), ``fp32_initializers`` (name → readers),
    ``tensors`` (float tensors by dtype) and ``stray_fp32`` (fp32 tensors that are neither graph I/O nor written
    by a blocked node, a Cast or an fp32 DQ: empty unless something went wrong).
    A model already holding fp16, with a Q/DQ scale that is not a constant or beyond fp16's range, or one shape
    inference, the opset upgrade or onnx.checker reject raises :class:`QuantizeError`.
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    graph = work.graph
    if any(v.type.tensor_type.elem_type == TensorProto.FLOAT16 for v in [*graph.input, *graph.output]) \
            or any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer):
        raise QuantizeError("the model already holds fp16 tensors; fp16_rest converts the fp32 QDQ model")
    opset_before = default_opset(work)
    work, how = _upgrade(work)
    graph = work.graph
    _constants_to_initializers(graph)
    _name_nodes(graph)
    inits = {t.name: t for t in graph.initializer}
    scales: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type in QDQ:
            if len(node.input) < 2 or node.input[1] not in inits:
                raise QuantizeError(f"{node.op_type} {node.name!r} has no constant scale; fp16_rest needs them")
            scales[node.input[1]] = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    try:
        work = onnx.shape_inference.infer_shapes(work, data_prop=True)
    except Exception as exc:
        raise QuantizeError(f"ONNX shape inference fails on the QDQ model ({one_line(exc)})") from exc
    unknown = [n for n in block_nodes if n not in {node.name for node in work.graph.node}]
    if unknown:
        raise QuantizeError(f"block_nodes names {unknown[:3]} not in the graph")
    ops = dict(DEFAULT_BLOCK_OPS) if block_ops is None else {str(op): "in block_ops" for op in block_ops}
    blocked = [b for b in choose_blocked(work, ops, block_nodes, reduce_min_elements, block_head_activations,
                                         [v.name for v in work.graph.output]) if b["op"] not in QDQ]
    before_names = {n.name for n in work.graph.node}
    casts_before = sum(n.op_type == "Cast" for n in work.graph.node)

    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        converted = convert_float_to_float16(work, keep_io_types=True, disable_shape_infer=True, op_block_list=[],
                                             node_block_list=[b["node"] for b in blocked])
    except Exception as exc:
        raise QuantizeError(f"ONNX Runtime's fp16 converter failed on the QDQ model ({one_line(exc)})") from exc
    converted = _tidy(converted, before_names, work)
    qdq = _qdq_in_fp16(converted, scales)
    try:
        check_model(converted)
        typed = onnx.shape_inference.infer_shapes(converted, strict_mode=not any(map(is_plugin, converted.graph.node)))
    except Exception as exc:
        raise QuantizeError(f"the fp16 QDQ model fails onnx.checker or type inference ({one_line(exc)})") from exc
    return typed, {
        "opset": {"before": opset_before, "after": default_opset(converted), "how": how},
        "blocked": blocked,
        "casts": {"before": casts_before, "after": sum(n.op_type == "Cast" for n in converted.graph.node)},
        "qdq": qdq,
        "fp32_initializers": _fp32_initializers(converted),
        "tensors": _tensor_dtypes(typed),
        "stray_fp32": _stray_fp32(typed, {b["node"] for b in blocked}),
        "io_types": {v.name: TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
                     for v in [*typed.graph.input, *typed.graph.output]},
    }


# ------------------------------------------------------------------------------------------------------ opset
def _op_types(graph: onnx.GraphProto) -> set[str]:
    out = set()
    for node in graph.node:
        if node.domain in ("", "ai.onnx"):
            out.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                out |= _op_types(sub)
    return out


def _upgrade(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """``model`` at opset >= 19, and how it got there.

    Where every op of the graph whose schema changed after the model's opset changed only in its opset-19
    revision, and that revision is one of :data:`_WIDENED_AT_19` (new types, new attribute values with
    meaning-preserving defaults), the graph means the same at 19: only ``opset_import`` (and the IR version 19
    needs) is raised. That is the exporter's opset-18 case, and it spares onnx.version_converter, whose adapters
    rebuild nodes and fail on some graphs. Anything older (e.g. Reduce*'s ``axes`` moved to an input at 18, Split's
    at 13) goes through onnx.version_converter.
    """
    current = default_opset(model)
    if current >= FP16_QDQ_OPSET:
        return model, "none: already >= 19"
    changed = set()
    for op in _op_types(model.graph):
        try:
            if onnx.defs.get_schema(op, FP16_QDQ_OPSET).since_version > current:
                changed.add(op)
        except onnx.defs.SchemaError:
            continue  # not a standard op: left to the checker
    safe = all(op in _WIDENED_AT_19 and onnx.defs.get_schema(op, FP16_QDQ_OPSET - 1).since_version <= current
               for op in changed)
    if safe:
        for entry in model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = FP16_QDQ_OPSET
        model.ir_version = max(model.ir_version, _IR_FOR_19)
        return model, (f"opset_import raised {current} -> 19: its ops changed at 19 only by widening "
                       f"({', '.join(sorted(changed)) or 'none'})")
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, FP16_QDQ_OPSET)
    except Exception as exc:
        raise QuantizeError(f"onnx.version_converter cannot raise opset {current} to 19 ({one_line(exc)}); "
                            "re-export the model at opset 19 or later") from exc
    upgraded.ir_version = max(upgraded.ir_version, _IR_FOR_19)
    return upgraded, (f"onnx.version_converter {current} -> 19 (ops changed since {current}: "
                      f"{', '.join(sorted(changed))})")


# -------------------------------------------------------------------------------------------------- Q/DQ
def _fp16_at_least(values: np.ndarray) -> np.ndarray:
    """The smallest fp16 >= each value (and > 0): a scale rounded up clips nothing the fp32 scale kept."""
    values = np.asarray(values, np.float32)
    if not np.all(np.isfinite(values)) or (values > np.finfo(np.float16).max).any():
        raise QuantizeError(f"a Q/DQ scale of {float(values.max()):g} is beyond fp16's range")
    half = values.astype(np.float16)
    half = np.where(half.astype(np.float32) < values, np.nextafter(half, np.float16(np.inf)), half)
    return np.maximum(half, _FP16_TINY).astype(np.float16)


def _qdq_in_fp16(model: onnx.ModelProto, fp32_scales: dict[str, np.ndarray]) -> dict:
    """Give the converted ``model``'s Q/DQ exact fp16 scales, and drop the Casts the converter put between them
    and fp32 neighbours: a Q reading an fp32 tensor through a Cast reads it directly with an fp32 scale (same
    value as its DQ's fp16 one), a DQ all of whose readers Cast it to fp32 writes fp32 (a weight DQ then keeps
    its original scale and weights). In place; returns the ``qdq`` part of the report."""
    graph = model.graph
    typed = onnx.shape_inference.infer_shapes(model)
    elem = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.input, *typed.graph.value_info,
                                                           *typed.graph.output]}
    inits = {t.name: t for t in graph.initializer}
    elem.update({name: t.data_type for name, t in inits.items()})
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {v.name for v in graph.output}
    fresh = name_allocator(set(inits) | {t for n in graph.node for t in [*n.input, *n.output]})
    new_inits: list[TensorProto] = []
    dropped: set[int] = set()

    def fp32_copy(scale: str, values: np.ndarray) -> str:
        name = fresh(f"{scale}_fp32")
        new_inits.append(numpy_helper.from_array(np.asarray(values, np.float32), name))
        return name

    fp32_q, fp32_dq = [], []
    for node in graph.node:  # Q at an fp32 tensor: read it, not its fp16 Cast
        cast = producer.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if cast is None or cast.op_type != "Cast" or _attr_int(cast, "to") != TensorProto.FLOAT16 \
                or elem.get(cast.input[0]) != TensorProto.FLOAT:
            continue
        node.input[0] = cast.input[0]
        node.input[1] = fp32_copy(node.input[1], _fp16_at_least(fp32_scales[node.input[1]]).astype(np.float32))
        readers[cast.output[0]].remove(node)
        if not readers[cast.output[0]] and cast.output[0] not in outputs:
            dropped.add(id(cast))
        fp32_q.append(node.name)
    for node in graph.node:  # DQ read only through Casts to fp32: write fp32
        if node.op_type != "DequantizeLinear" or node.output[0] in outputs:
            continue
        users = readers.get(node.output[0], [])
        if not users or not all(u.op_type == "Cast" and _attr_int(u, "to") == TensorProto.FLOAT
                                and u.output[0] not in outputs for u in users):
            continue
        is_weight = node.input[0] in inits
        scale = fp32_scales[node.input[1]]
        node.input[1] = fp32_copy(node.input[1], scale if is_weight else _fp16_at_least(scale).astype(np.float32))
        for cast in users:
            for reader in readers.get(cast.output[0], []):
                reader.input[:] = [node.output[0] if t == cast.output[0] else t for t in reader.input]
            dropped.add(id(cast))
        fp32_dq.append(node.name)
    # the fp16 scales still read: rounded up from the fp32 originals, INT8 weights re-rounded where that moved them
    subnormal = requantized = 0
    weight_of = {n.input[1]: n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    for name, s32 in fp32_scales.items():
        tensor = inits.get(name)
        if tensor is None or tensor.data_type != TensorProto.FLOAT16:
            continue
        s16 = _fp16_at_least(s32)
        subnormal += int((s16 < np.finfo(np.float16).tiny).sum())
        tensor.CopyFrom(numpy_helper.from_array(s16, name))
        dq = weight_of.get(name)
        if dq is None or np.array_equal(s16.astype(np.float32), s32):
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        shape = [1] * q.ndim
        if s32.ndim:
            shape[_attr_int(dq, "axis", 1) % q.ndim] = -1
        ratio = (s32 / s16.astype(np.float32)).reshape(shape)
        q2 = np.clip(np.rint(q.astype(np.float32) * ratio), -127, 127).astype(q.dtype)
        if not np.array_equal(q, q2):
            requantized += int((q != q2).sum())
            if len(readers.get(dq.input[0], [])) > 1:
                dq.input[0] = fresh(f"{dq.input[0]}_fp16scale")
                new_inits.append(numpy_helper.from_array(q2, dq.input[0]))
            else:
                inits[dq.input[0]].CopyFrom(numpy_helper.from_array(q2, dq.input[0]))
    kept = [n for n in graph.node if id(n) not in dropped]
    # as in precision._tidy: a blocked node's ``<name>_cast_to_fp16`` whose Cast is gone gets its own name back
    names = {t for n in kept for t in [*n.input, *n.output]} | {v.name for v in [*graph.input, *graph.output]}
    renamed = {t: t[: -len("_cast_to_fp16")] for n in kept for t in n.output
               if t.endswith("_cast_to_fp16") and t[: -len("_cast_to_fp16")] not in names}
    for node in kept:
        node.input[:] = [renamed.get(t, t) for t in node.input]
        node.output[:] = [renamed.get(t, t) for t in node.output]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    used = {t for n in graph.node for t in n.input}
    live = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    del graph.value_info[:]  # some types changed with the rewires: inferred again by the caller
    return {"quantize": sum(n.op_type == "QuantizeLinear" for n in graph.node),
            "dequantize": sum(n.op_type == "DequantizeLinear" for n in graph.node),
            "fp32_quantize": fp32_q, "fp32_dequantize": fp32_dq, "subnormal_scales": subnormal,
            "requantized_weights": requantized}


def _attr_int(node: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    return next((a.i for a in node.attribute if a.name == name), default)


# ------------------------------------------------------------------------------------------------------ report
def _fp32_initializers(model: onnx.ModelProto) -> dict[str, list[str]]:
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    return {t.name: readers.get(t.name, []) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}


def _tensor_dtypes(typed: onnx.ModelProto) -> dict[str, int]:
    counts: Counter = Counter()
    for value in [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16):
            counts[TensorProto.DataType.Name(elem).lower()] += 1
    return dict(counts)


def _stray_fp32(typed: onnx.ModelProto, blocked: set[str]) -> list[str]:
    graph = typed.graph
    fp32 = {v.name for v in [*graph.value_info, *graph.output] if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    io = {v.name for v in [*graph.input, *graph.output]}
    out = []
    for node in graph.node:
        if node.name in blocked or node.op_type == "Cast":
            continue
        if node.op_type == "DequantizeLinear":  # fp32 by choice where only fp32 nodes read it
            continue
        out += [t for t in node.output if t in fp32 and t not in io]
    return out
