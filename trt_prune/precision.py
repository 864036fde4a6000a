"""fp16 ONNX for TensorRT 11's strongly typed builds: the model file carries the precision.

TensorRT 11 has no FP16 builder flag; a network runs in fp16 where its ONNX tensors are fp16. :func:`to_fp16`
writes such a model: weights and activations in fp16, the numerically sensitive nodes kept in fp32 with Casts
around them, graph inputs/outputs fp32 (``keep_io_types=True``) or fp16, and the result checked against the
fp32 model in ONNX Runtime.

The conversion itself is ONNX Runtime's ``onnxruntime.transformers.float16.convert_float_to_float16`` (a
maintained fork of onnxconverter-common's converter), wrapped rather than reimplemented. The wrapper adds what
the converter leaves to its caller:

- the block list: it is chosen here, per node, and reported (the converter takes op types and node names and
  says nothing about what it kept in fp32). See :data:`DEFAULT_BLOCK_OPS`, :data:`REDUCE_OPS` and the
  head-activation rule below;
- topological order: the converter appends its Casts at the end of the node list, which ``onnx.checker``
  and TensorRT's parser reject;
- Cast pairs: two blocked nodes in a row, or a graph input/output next to a blocked node, get
  ``Cast(fp32→fp16) → Cast(fp16→fp32)`` between them, which only loses precision; such pairs are removed
  (and lossless ``fp16→fp32→fp16`` pairs too), and Casts of constants are folded into fp16/fp32 initializers;
- the check: ``onnx.checker`` and parity with the fp32 model in ONNX Runtime on seeded inputs, per output,
  before anything is written (atomically, never over the source).

What stays fp32 (``blocked`` in the result names each node and why):

- every node whose op is in ``block_ops`` (default :data:`DEFAULT_BLOCK_OPS`: Softmax/LogSoftmax, the
  normalisation layers, and the index/box ops that ONNX Runtime's converter keeps in fp32 by default);
- reductions (:data:`REDUCE_OPS`) over at least ``reduce_min_elements`` elements per output value, or over a
  number unknown from the shapes; ReduceSumSquare, ReduceProd and ReduceLogSumExp always (they overflow fp16's
  65504 on few elements); and the square (``Pow(x, 2)``, ``Mul(x, x)``) that feeds a blocked reduction
  (a variance or RMS: squares overflow fp16 from ``|x| > 256``);
- with ``block_head_activations``, a Sigmoid or Softmax whose result reaches a graph output through data
  movement and selection only (Concat, Reshape, Transpose, Slice, TopK, Gather, Scatter, Where…): a detector's
  class scores, also through an NMS tail; when that output stays fp32 (``keep_io_types``), the nodes in
  between too, so the scores never pass through fp16;
- nodes that are not ONNX ops (TensorRT plugins such as ``EfficientNMS_TRT``): their inputs and outputs keep
  their types;
- the nodes named in ``block_nodes``.

Files from other converters keep weights in ``Constant`` nodes; they become initializers first (TensorRT's
parser makes both weights), so the block list, the converter and the weight statistics see one kind of
constant. Parity runs at ``input_shape`` or, for dynamic axes, at a size the graph accepts, chosen as
:func:`trt_prune.cleaner.clean_onnx` chooses it (:func:`trt_prune.onnx_io.candidate_input_shapes`).

ONNX Runtime's CPU provider runs many fp16 kernels by upcasting to fp32 internally, so its fp16 numbers are
at least as accurate as a GPU's; the check bounds the error of the fp16 *weights and storage*, and the
block list keeps TensorRT's fp16 arithmetic away from the known-sensitive ops.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from trt_prune import onnx_io
from trt_prune.errors import PrecisionError
from trt_prune.onnx_io import InputShape, is_plugin, one_line

# op type -> why it stays fp32
DEFAULT_BLOCK_OPS: dict[str, str] = {
    "Softmax": "exponentials and their sum: fp16 overflows and loses small probabilities",
    "LogSoftmax": "exponentials and their sum: fp16 overflows and loses small probabilities",
    "LayerNormalization": "mean and variance over the features",
    "BatchNormalization": "running variance below fp16 resolution (fold it into the conv: export in eval mode)",
    "InstanceNormalization": "mean and variance over the spatial axes",
    "GroupNormalization": "mean and variance over each group",
    "LpNormalization": "sum of powers",
    "MeanVarianceNormalization": "mean and variance",
    # kept in fp32 by ONNX Runtime's converter by default too: indices, box coordinates, thresholds, ranges
    "NonMaxSuppression": "box coordinates and IoU/score thresholds",
    "RoiAlign": "box coordinates",
    "TopK": "ranking of near-equal scores",
    "Range": "index arithmetic",
    "CumSum": "running sum",
}
REDUCE_OPS = ("ReduceMean", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceSumSquare", "ReduceProd",
              "ReduceLogSumExp", "GlobalAveragePool", "GlobalLpPool")
_ALWAYS_FP32_REDUCE = ("ReduceSumSquare", "ReduceProd", "ReduceLogSumExp")
DEFAULT_REDUCE_MIN_ELEMENTS = 256
HEAD_ACTIVATIONS = ("Sigmoid", "Softmax")
# ops that only move or select values, by the inputs whose values they pass on: a score activation behind
# these is the model's output (a detector's sigmoid, through decoding's reshapes or an NMS tail's TopK/Gather)
_PASS_ON: dict[str, tuple[int, ...] | None] = {
    **{op: (0,) for op in ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
                           "Gather", "Cast", "Expand", "Tile", "TopK", "GatherND", "GatherElements")},
    "Concat": None,  # every input
    "ScatterND": (0, 2), "ScatterElements": (0, 2),  # data and updates, not indices
    "Where": (1, 2),  # the two branches, not the condition
}
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
_FP16_MAX, _FP16_MIN_NORMAL = 65504.0, 6.104e-05


@dataclass
class Fp16Result:
    """What :func:`to_fp16` wrote.

    ``blocked``: one ``{"node", "op", "reason"}`` per node kept in fp32; ``block_list``: the rules that chose
    them. ``parity``: per output, ``max_abs``/``max_rel``/``mismatched`` of the fp16 model against the fp32
    one in ONNX Runtime (see :func:`trt_prune.onnx_io.compare_outputs`), worst over the parity batches; empty
    when the check was off. Outputs behind a selection op (NMS, TopK, ArgMax) or a TensorRT plugin are not
    compared, the op's inputs are, as ``"<node>:input<i>"`` (the decoded boxes and scores of a detector's NMS
    tail: a 1e-3 difference in a score may legitimately reorder the detections after it). ``input_shapes``:
    the shape of each input parity was checked at (given or chosen; with the check off, those given).
    ``initializers``:
    counts and bytes by dtype after conversion, and how many fp32 weight values
    fell outside fp16's range (``clamped``: beyond ±65504, stored as ±65504) or below its normal range
    (``subnormal``: 0 < |w| < 6.1e-5, stored with fewer significant bits). ``activations``: float tensors by
    dtype after conversion (graph inputs/outputs included).
    """

    src: str
    dst: str
    keep_io_types: bool
    nodes_before: int
    nodes_after: int
    casts_before: int
    casts_after: int
    bytes_before: int
    bytes_after: int
    block_list: dict
    blocked: list[dict] = field(default_factory=list)
    initializers: dict = field(default_factory=dict)
    activations: dict = field(default_factory=dict)
    io_types: dict = field(default_factory=dict)
    parity: dict[str, dict[str, float]] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return asdict(self)


def to_fp16(src, dst, *, input_shape: InputShape | None = None, keep_io_types: bool = True,
            block_ops: Iterable[str] | None = None,
            block_nodes: Sequence[str] = (), reduce_min_elements: int | None = DEFAULT_REDUCE_MIN_ELEMENTS,
            block_head_activations: bool = True, check_parity: bool = True, atol: float = 1e-2,
            rtol: float = 1e-2, seed: int = 0) -> Fp16Result:
    """Write an fp16 variant of the fp32 ONNX file ``src`` to ``dst`` and check it against ``src``.

    ``keep_io_types``: graph inputs and outputs stay fp32 (a Cast after each input, before each output), or
    become fp16. ``block_ops`` replaces :data:`DEFAULT_BLOCK_OPS` (op types kept fp32); ``block_nodes`` adds
    node names; ``reduce_min_elements=None`` turns the reduction rule off (see the module doc);
    ``block_head_activations`` keeps output score activations in fp32.

    Parity: seeded random inputs (batch 1, and 2 when the batch is symbolic) through both models in ONNX
    Runtime, at ``input_shape`` (one full shape when the model has one input, or ``{input name: shape}``,
    checked against the fixed axes) or, for other dynamic axes, at a size the graph's pooling/strides/resizes
    accept (:func:`trt_prune.onnx_io.candidate_input_shapes`; the fp16 model keeps its dynamic axes); an
    element fails when ``|fp16 - fp32| > atol + rtol * |fp32|``; any failure raises
    :class:`PrecisionError` and writes nothing, unless ``check_parity=False``. The defaults (1e-2, 1e-2) are
    about ten fp16 steps (fp16 resolves 1 part in 2048): rounding the weights to fp16 alone moves the outputs of
    a deep network by a few 1e-3.
    ``src`` is only read; ``dst`` is written atomically. A missing, corrupt or non-fp32 ``src``, a bad
    ``input_shape`` (or dynamic axes no size could be found for), unknown ``block_nodes``, or a conversion that
    breaks the graph raise :class:`PrecisionError`; an unwritable ``dst``
    :class:`~trt_prune.errors.OutputError`.
    """
    started = time.perf_counter()
    for label, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise PrecisionError(f"{label} must be a number >= 0, got {value!r}")
    if reduce_min_elements is not None and (isinstance(reduce_min_elements, bool)
                                            or not isinstance(reduce_min_elements, int) or reduce_min_elements < 0):
        raise PrecisionError(f"reduce_min_elements must be an int >= 0 or None, got {reduce_min_elements!r}")
    ops = dict(DEFAULT_BLOCK_OPS) if block_ops is None else {str(op): "in block_ops" for op in block_ops}
    src_path, dst_path, original = onnx_io.load_source(src, dst, PrecisionError, "fp16 conversion")
    given = onnx_io.given_input_shapes(original, input_shape, PrecisionError)
    if original.ByteSize() > onnx_io.PROTOBUF_LIMIT:
        raise PrecisionError(f"{str(src_path)!r} is over protobuf's 2 GiB; fp16 conversion of such models is not "
                             "supported (ONNX shape inference cannot run on it in memory)")
    kinds = _float_kinds(original)
    if TensorProto.FLOAT16 in kinds:
        raise PrecisionError(f"{str(src_path)!r} already holds fp16 inputs, outputs or weights; convert the fp32 "
                             "model it came from")
    if TensorProto.FLOAT not in kinds:
        raise PrecisionError(f"{str(src_path)!r} has no float32 inputs, outputs or weights: nothing to convert")

    model = onnx.ModelProto()
    model.CopyFrom(original)
    _constants_to_initializers(model.graph)
    _name_nodes(model.graph)
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise PrecisionError(f"ONNX shape inference fails on {str(src_path)!r} ({one_line(exc)}); the converter "
                             "needs every tensor's type. Clean the model first (trt-prune clean)") from exc
    names = {n.name for n in model.graph.node}
    unknown = [n for n in block_nodes if n not in names]
    if unknown:
        raise PrecisionError(f"block_nodes names {unknown[:3]} not in the graph; node names look like "
                             f"{[n.name for n in model.graph.node[:3]]}")
    fp32_outputs = [v.name for v in model.graph.output] if keep_io_types else []
    blocked = choose_blocked(model, ops, block_nodes, reduce_min_elements, block_head_activations, fp32_outputs)
    weights = _weight_ranges(model, {b["node"] for b in blocked})
    before_names = {n.name for n in model.graph.node}

    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        converted = convert_float_to_float16(
            model, keep_io_types=bool(keep_io_types), disable_shape_infer=True,
            op_block_list=[], node_block_list=[b["node"] for b in blocked])
    except Exception as exc:
        raise PrecisionError(f"ONNX Runtime's fp16 converter failed on {str(src_path)!r} ({one_line(exc)})") from exc
    converted = _tidy(converted, before_names, original)
    written, checked = onnx_io.check_and_save(original, converted, dst_path, _CHECK, parity=check_parity, atol=atol,
                                              rtol=rtol, seed=seed, given=given)

    typed = onnx.shape_inference.infer_shapes(converted)
    return Fp16Result(
        src=str(src_path), dst=str(written), keep_io_types=bool(keep_io_types),
        nodes_before=len(original.graph.node), nodes_after=len(converted.graph.node),
        casts_before=_count_op(original, "Cast"), casts_after=_count_op(converted, "Cast"),
        bytes_before=_file_bytes(src_path), bytes_after=_file_bytes(written),
        block_list={"ops": sorted(ops), "nodes": list(block_nodes), "reduce_min_elements": reduce_min_elements,
                    "reduce_always": list(_ALWAYS_FP32_REDUCE), "head_activations": block_head_activations},
        blocked=blocked, initializers={**_initializer_stats(converted), **weights},
        activations=_activation_stats(typed), io_types=_io_types(converted), parity=checked.outputs,
        tolerance={"atol": atol, "rtol": rtol} if check_parity else {}, input_shapes=checked.input_shapes,
        seconds=round(time.perf_counter() - started, 3))


# ------------------------------------------------------------------------------------------------ block list
def choose_blocked(model: onnx.ModelProto, ops: dict[str, str], nodes: Sequence[str] = (),
                   reduce_min_elements: int | None = DEFAULT_REDUCE_MIN_ELEMENTS, head_activations: bool = True,
                   fp32_outputs: Iterable[str] = ()) -> list[dict]:
    """The nodes of the shape-inferred ``model`` to keep in fp32: ``[{"node", "op", "reason"}]`` in graph order.

    ``ops`` maps op types to the reason they stay fp32; the other rules are those of :func:`to_fp16`.
    ``fp32_outputs`` names the graph outputs that stay fp32: the data movement between a score activation and
    such an output stays fp32 too (no round trip through fp16 on the way out).
    """
    fp32_outputs = set(fp32_outputs)
    graph = model.graph
    shapes = _static_shapes(model)
    consts = {t.name: t for t in graph.initializer}
    consts.update({n.output[0]: next((a.t for a in n.attribute if a.name == "value"), None)
                   for n in graph.node if n.op_type == "Constant" and n.output})
    producer = {o: n for n in graph.node for o in n.output if o}
    reasons: dict[str, str] = {}
    for node in graph.node:
        if is_plugin(node) or node.domain not in ("", "ai.onnx"):
            reasons[node.name] = "not an ONNX op (a TensorRT plugin?): its inputs and outputs stay as they were"
        elif node.op_type in ops:
            reasons[node.name] = ops[node.op_type]
        elif node.op_type in REDUCE_OPS and reduce_min_elements is not None:
            why = _reduction_reason(node, shapes, consts, reduce_min_elements)
            if why:
                reasons[node.name] = why
                square = producer.get(node.input[0]) if node.input else None
                if square is not None and _is_square(square, consts) and square.name not in reasons:
                    reasons[square.name] = f"square feeding {node.op_type} {node.name!r} (variance/RMS)"
    if head_activations:
        for node, output, activation in _head_activations(graph, producer):
            if activation:
                reasons.setdefault(node.name, f"score activation feeding graph output {output!r}")
            elif output in fp32_outputs:
                reasons.setdefault(node.name, f"carries fp32 scores to fp32 graph output {output!r}")
    for name in nodes:
        reasons.setdefault(name, "in block_nodes")
    return [{"node": n.name, "op": n.op_type, "reason": reasons[n.name]} for n in graph.node if n.name in reasons]


def _reduction_reason(node, shapes, consts, threshold: int) -> str | None:
    op = node.op_type
    if op in _ALWAYS_FP32_REDUCE:
        return "sum of squares/products/exponentials overflows fp16 on few elements"
    dims = shapes.get(node.input[0]) if node.input else None
    if dims is None:
        return "reduces a number of elements unknown from the shapes (kept fp32 to be safe)"
    if op.startswith("Global"):
        axes = list(range(2, len(dims)))
    else:
        axes = None
        if len(node.input) > 1 and node.input[1]:
            tensor = consts.get(node.input[1])
            if tensor is None:
                return "reduction axes computed at run time"
            axes = [int(a) for a in numpy_helper.to_array(tensor).reshape(-1)]
        else:
            axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if not axes:
            noop = next((a.i for a in node.attribute if a.name == "noop_with_empty_axes"), 0)
            if noop:
                return None
            axes = list(range(len(dims)))
    sizes = [dims[a % len(dims)] if dims else 1 for a in axes]
    if any(s is None for s in sizes):
        return "reduces a symbolic number of elements (kept fp32 to be safe)"
    count = int(np.prod(sizes)) if sizes else 1
    if count >= threshold:
        return f"reduces {count} elements per output (>= {threshold})"
    return None


def _is_square(node, consts) -> bool:
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]:
        return True
    if node.op_type == "Pow" and len(node.input) == 2 and node.input[1] in consts:
        tensor = consts[node.input[1]]
        return tensor is not None and np.all(numpy_helper.to_array(tensor) == 2)
    return False


def _head_activations(graph, producer) -> list[tuple[object, str, bool]]:
    """``(node, output, is_activation)``: each Sigmoid/Softmax reaching a graph output through data movement
    and selection only (:data:`_PASS_ON`), and each such node on the way."""
    found: dict[int, tuple[object, str, bool]] = {}
    memo: dict[int, bool] = {}

    def leads_to_head(tensor: str, output: str) -> bool:
        node = producer.get(tensor)
        if node is None:
            return False
        if id(node) in memo:
            return memo[id(node)]
        memo[id(node)] = False  # no cycles in a valid graph; this also stops repeated visits
        hit = False
        if node.op_type in HEAD_ACTIVATIONS:
            hit = True
            found.setdefault(id(node), (node, output, True))
        elif node.op_type in _PASS_ON or is_plugin(node):
            # only the data input(s) carry activations (not shapes, indices, starts, conditions); a TensorRT
            # plugin (EfficientNMS_TRT) is taken to pass its inputs on
            slots = None if is_plugin(node) else _PASS_ON[node.op_type]
            inputs = node.input if slots is None else [node.input[i] for i in slots if i < len(node.input)]
            hit = any([leads_to_head(t, output) for t in inputs if t])
            if hit:
                found.setdefault(id(node), (node, output, False))
        memo[id(node)] = hit
        return hit

    for value in graph.output:
        leads_to_head(value.name, value.name)
    return list(found.values())


def _static_shapes(model) -> dict[str, list[int | None]]:
    shapes = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    for tensor in model.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


# --------------------------------------------------------------------------------------------- after convert
def _tidy(model: onnx.ModelProto, before_names: set[str], original: onnx.ModelProto) -> onnx.ModelProto:
    """Order the nodes, drop Cast round trips the converter made, fold Casts of constants."""
    import onnx_graphsurgeon as gs

    from trt_prune.cleaner import _same_dtype, cleanup, remove_identity, toposort

    graph = gs.import_onnx(model)
    for node in graph.nodes:
        if node.op != "Cast" or not node.inputs:
            continue
        source = node.inputs[0]
        if isinstance(source, gs.Constant):
            values = np.asarray(source.values)
            target = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
            folded = gs.Constant(f"{node.outputs[0].name}_folded", np.asarray(values.astype(target)))
            for consumer in list(node.outputs[0].outputs):
                consumer.inputs[consumer.inputs.index(node.outputs[0])] = folded
            if node.outputs[0] not in graph.outputs:
                node.outputs.clear()
                node.inputs.clear()
            continue
        previous = source.inputs[0] if source.inputs else None
        if previous is None or previous.op != "Cast" or (node.name in before_names and
                                                          previous.name in before_names):
            continue
        origin = previous.inputs[0]
        # Cast(fp32->fp16)->Cast(fp16->fp32): the value was meant to stay fp32; fp16->fp32->fp16: lossless
        if _same_dtype(origin.dtype, node.attrs.get("to")):
            node.op, node.attrs = "Identity", {}
            node.inputs[0] = origin
    graph, _ = remove_identity(graph)
    graph, _ = cleanup(graph)
    graph, _ = toposort(graph)
    # A blocked node writes ``<name>_cast_to_fp16`` for the Cast the converter put after it; where that Cast is
    # gone (the value stays fp32 for its readers), the tensor gets its own name back.
    tensors = graph.tensors()
    for name, tensor in list(tensors.items()):
        base = name[: -len("_cast_to_fp16")] if name.endswith("_cast_to_fp16") else None
        if base and base not in tensors:
            tensor.name = base
    return onnx_io.carry_metadata(gs.export_onnx(graph), original)


# ops whose outputs are indices or a data-dependent choice of their inputs: a 1e-3 difference in a score can
# reorder or swap what comes out, so parity is checked on the values going in (by input slot)
_SELECTION: dict[str, tuple[int, ...]] = {"NonMaxSuppression": (0, 1), "TopK": (0,), "ArgMax": (0,), "ArgMin": (0,)}


def _stop(node: onnx.NodeProto) -> tuple[int, ...] | list[int] | None:
    """Parity stops at selection ops (compared on their score/box inputs) and at TensorRT plugins (all inputs)."""
    if is_plugin(node):
        return list(range(len(node.input)))
    return _SELECTION.get(node.op_type) if node.domain in ("", "ai.onnx") else None


_CHECK = onnx_io.RewriteCheck(
    error=PrecisionError, reference="the fp32 model", candidate="the fp16 model",
    changed="the fp16 model differs from the fp32 one",
    remedy="Keep more nodes in fp32 (block_nodes=[...]) or loosen atol/rtol",
    disable="pass check_parity=False to convert without it",
    invalid="Block the node it names with block_nodes=[...]", stop=_stop, cast_inputs=True)


# --------------------------------------------------------------------------------------------------- stats
def _constants_to_initializers(graph) -> None:
    """Weights held in ``Constant`` nodes (files from other converters) become initializers, as TensorRT's parser
    makes them weights: the block list, the converter and the weight statistics then see one kind of constant.

    Hand-written: onnx has no helper for it, and onnx-graphsurgeon's folding would run ONNX Runtime on the
    whole graph for what is a copy of each node's tensor. A Constant that is itself a graph output stays."""
    outputs = {v.name for v in graph.output}
    kept = []
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is None or node.domain not in ("", "ai.onnx") or node.output[0] in outputs \
                or attr.name not in ("value", "value_float", "value_floats", "value_int", "value_ints"):
            kept.append(node)
            continue
        if attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
        else:
            kind = np.float32 if attr.name.startswith("value_float") else np.int64
            tensor = numpy_helper.from_array(np.asarray(onnx.helper.get_attribute_value(attr), kind))
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    del graph.node[:]
    graph.node.extend(kept)


def _name_nodes(graph) -> None:
    """Give unnamed nodes unique names: the converter blocks nodes by name."""
    taken = {n.name for n in graph.node if n.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_fp16_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _float_kinds(model) -> set[int]:
    """Element types of the graph's inputs, outputs and initializers."""
    return ({v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
            | {t.data_type for t in model.graph.initializer})


def _weight_ranges(model, blocked: set[str]) -> dict[str, int]:
    """fp32 weight values outside fp16's range, in initializers some non-blocked node reads."""
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    clamped = subnormal = 0
    for tensor in model.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or all(r in blocked for r in readers.get(tensor.name, [])):
            continue
        magnitude = np.abs(numpy_helper.to_array(tensor))
        clamped += int((magnitude > _FP16_MAX).sum())
        subnormal += int(((magnitude > 0) & (magnitude < _FP16_MIN_NORMAL)).sum())
    return {"clamped": clamped, "subnormal": subnormal}


def _initializer_stats(model) -> dict:
    stats: dict = {}
    for tensor in model.graph.initializer:
        name = TensorProto.DataType.Name(tensor.data_type).lower()
        entry = stats.setdefault(name, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += int(numpy_helper.to_array(tensor).nbytes)
    return {"by_dtype": stats}


def _activation_stats(typed) -> dict[str, int]:
    counts: Counter = Counter()
    for value in [*typed.graph.input, *typed.graph.value_info, *typed.graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem in _FLOATS:
            counts[TensorProto.DataType.Name(elem).lower()] += 1
    return dict(counts)


def _io_types(model) -> dict[str, str]:
    return {v.name: TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
            for v in [*model.graph.input, *model.graph.output]}


def _count_op(model, op: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op)


def _file_bytes(path) -> int:
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)

