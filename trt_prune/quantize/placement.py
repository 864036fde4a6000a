"""Where Q/DQ pairs go for TensorRT's explicit INT8 (its Explicit Quantization rules, ../shared/REFERENCE.md §7).

:func:`place` decides, from the fp32 graph alone (no data), which nodes run in INT8 and which tensors get a
``QuantizeLinear → DequantizeLinear`` pair; :func:`violations` checks a quantized graph against the same rules
independently (the tests run it on every model, and ``trt-prune inspect`` can too).

The rules, as TensorRT fuses:

- The weighted ops — Conv, ConvTranspose, Gemm, MatMul — get a pair on their activation input(s) (INT8, per
  tensor) and a DequantizeLinear on their weight (INT8 initializer, per output channel: Conv axis 0,
  ConvTranspose axis 1, Gemm axis 0 with ``transB=1`` else 1, MatMul the last axis). Bias stays float.
- Nothing else is quantized: no pair on the output of a weighted layer, none inside Conv → BatchNorm → activation
  (TensorRT fuses that chain itself, and a pair inside it breaks the fusion), none at Concat, Reshape, Transpose,
  Slice, Resize, Sigmoid, Softmax and the like (TensorRT moves the next weighted layer's pair across them).
- A residual Add whose one input comes straight from a quantized Conv (through BatchNorm and pointwise
  activations only) fuses into that Conv: its *other* input gets a pair (shared with any weighted layer reading
  the same tensor), so the fused kernel reads it in INT8. The Conv-side input gets none.
- Kept in higher precision, each with its reason: weighted layers with fewer than ``min_channels`` input or
  output channels (the stem conv on 3 colours, a head's 4 box outputs: too little work to gain, and the most
  sensitive), those named by the user, those whose weight is computed at run time, and the detector's tail: every
  node after the last weighted layer on the way to the outputs (decode, score activations, NMS).

Hand-written rather than taken from ONNX Runtime's ``quantize_static``: its QDQ placement serves its own CPU
kernels (it quantizes a Conv's output so that DQ → Conv → Q folds into QLinearConv), which is the opposite of
TensorRT's second rule. ModelOpt's ONNX PTQ places for TensorRT, but as a patched ``quantize_static`` whose
choices are not exposed; here the placement is data, checked by :func:`violations` and reported per node.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# ops that already compute in integers: a model holding one is quantized already
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                 "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd", "QLinearMul", "QGemm"}
# between a Conv and a residual Add, TensorRT fuses these into the Conv (BatchNorm, pointwise activations)
FUSIBLE = {"BatchNormalization", "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu",
           "Selu", "Softplus", "Mish", "Gelu", "PRelu", "Identity"}
DEFAULT_MIN_CHANNELS = 16


@dataclass
class QuantNode:
    """A weighted node that runs in INT8: the activation inputs that get a pair, and its weight."""

    name: str
    op: str
    activations: list[str]
    weight: str | None = None  # initializer name; None for an activation × activation MatMul
    weight_axis: int | None = None
    channels: tuple[int, int] = (0, 0)  # (input, output)


@dataclass
class Placement:
    """What :func:`place` decided. ``kept``: one ``{"node", "op", "reason"}`` per weighted node left in float;
    ``residual``: one ``{"node", "input", "conv"}`` per residual Add whose ``input`` gets a pair (``conv`` is the
    Conv on the other side that the Add fuses into); ``tail``: the nodes after the last weighted layer."""

    nodes: list[QuantNode] = field(default_factory=list)
    kept: list[dict] = field(default_factory=list)
    residual: list[dict] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)

    def activation_consumers(self) -> dict[str, list[tuple[str, int]]]:
        """Tensor → the (node, input index) pairs that read it through a Q/DQ pair, in placement order."""
        out: dict[str, list[tuple[str, int]]] = {}
        for q in self.nodes:
            for index, tensor in enumerate(q.activations):
                if tensor:
                    out.setdefault(tensor, []).append((q.name, index))
        for r in self.residual:
            out.setdefault(r["input"], []).append((r["node"], r["index"]))
        return out

    def to_dict(self) -> dict:
        return {"quantized": [{"node": q.name, "op": q.op, "weight_axis": q.weight_axis,
                               "channels": list(q.channels)} for q in self.nodes],
                "kept": self.kept, "residual": self.residual, "tail": {"nodes": len(self.tail),
                                                                       "first": self.tail[:5]}}


def constant_values(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node tensors by name."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            t = next((a.t for a in node.attribute if a.name == "value"), None)
            if t is not None:
                out.setdefault(node.output[0], t)
    return out


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def weight_axis(node: onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of ``node``'s weight (input 1), where its per-channel scales go."""
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1
    return 0


def _channels(node: onnx.NodeProto, shape: tuple[int, ...]) -> tuple[int, int]:
    """(input channels, output channels) of a weighted node from its weight shape."""
    if node.op_type == "Conv":
        return int(shape[1]) * int(_attr(node, "group", 1)), int(shape[0])
    if node.op_type == "ConvTranspose":
        return int(shape[0]), int(shape[1]) * int(_attr(node, "group", 1))
    if node.op_type == "Gemm":
        return (int(shape[1]), int(shape[0])) if _attr(node, "transB", 0) else (int(shape[0]), int(shape[1]))
    return int(shape[-2]) if len(shape) > 1 else int(shape[0]), int(shape[-1])


def _graph_maps(graph):
    producer = {o: n for n in graph.node for o in n.output if o}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for t in n.input:
            if t:
                consumers[t].append(n)
    return producer, consumers


def tail_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes downstream of some weighted layer from which no weighted layer is reachable: a detector's decode,
    score activations and NMS (a classifier's final Softmax/Flatten)."""
    producer, consumers = _graph_maps(graph)
    order = list(graph.node)
    feeds_weighted: dict[str, bool] = {}
    for node in reversed(order):  # graph order is topological: consumers come later
        feeds_weighted[node.name] = any(c.op_type in WEIGHTED or feeds_weighted.get(c.name, False)
                                        for o in node.output for c in consumers.get(o, []))
    below: set[str] = set()
    for node in order:
        if node.op_type in WEIGHTED or any(producer[t].name in below for t in node.input if t in producer):
            below.add(node.name)
    return [n.name for n in order if n.name in below and n.op_type not in WEIGHTED
            and not feeds_weighted[n.name]]


def _conv_side(tensor: str, producer, consumers, quantized: set[str]) -> str | None:
    """The quantized Conv that ``tensor`` comes from through fusible ops only (each read by nothing else), or None.
    SiLU written as ``x * Sigmoid(x)`` counts as one activation."""
    seen = 0
    while tensor in producer and seen < 8:
        node = producer[tensor]
        if node.op_type == "Conv":
            return node.name if node.name in quantized else None
        if len(consumers.get(tensor, [])) != 1:
            return None
        if node.op_type == "Mul" and len(node.input) == 2:  # x * Sigmoid(x)
            a, b = (producer.get(t) for t in node.input)
            if b is not None and b.op_type == "Sigmoid" and b.input[0] == node.input[0]:
                tensor = node.input[0]
            elif a is not None and a.op_type == "Sigmoid" and a.input[0] == node.input[1]:
                tensor = node.input[1]
            else:
                return None
            if len(consumers.get(tensor, [])) != 2:  # the Sigmoid and the Mul
                return None
            seen += 1
            continue
        if node.op_type not in FUSIBLE:
            return None
        tensor = node.input[0]
        seen += 1
    return None


def place(model: onnx.ModelProto, *, exclude=(), min_channels: int = DEFAULT_MIN_CHANNELS) -> Placement:
    """The placement for ``model`` (fp32, constants as initializers or Constant nodes); see the module doc."""
    graph = model.graph
    consts = constant_values(graph)
    producer, consumers = _graph_maps(graph)
    tail = set(tail_nodes(graph))
    excluded = set(exclude)
    placement = Placement(tail=[n.name for n in graph.node if n.name in tail])
    for node in graph.node:
        if node.op_type not in WEIGHTED:
            continue
        if node.name in excluded:
            placement.kept.append({"node": node.name, "op": node.op_type, "reason": "excluded by the user"})
            continue
        ins = [t for t in node.input[:2]]
        if node.op_type == "MatMul" and ins[0] not in consts and ins[1] not in consts:
            placement.nodes.append(QuantNode(node.name, node.op_type, list(ins)))  # activation × activation
            continue
        if ins[0] in consts or ins[1] not in consts:
            placement.kept.append({"node": node.name, "op": node.op_type,
                                   "reason": "its weight is not a constant (computed at run time)"})
            continue
        shape = tuple(consts[ins[1]].dims)
        c_in, c_out = _channels(node, shape)
        if min(c_in, c_out) < min_channels:
            placement.kept.append({"node": node.name, "op": node.op_type,
                                   "reason": f"{c_in} input / {c_out} output channels: fewer than {min_channels}, "
                                             "too little work to gain from INT8"})
            continue
        placement.nodes.append(QuantNode(node.name, node.op_type, [ins[0]], ins[1], weight_axis(node, len(shape)),
                                         (c_in, c_out)))
    quantized = {q.name for q in placement.nodes}
    for node in graph.node:
        if node.op_type != "Add" or node.name in tail or len(node.input) != 2:
            continue
        a, b = node.input
        if a in consts or b in consts or a == b:
            continue
        sides = [_conv_side(t, producer, consumers, quantized) for t in (a, b)]
        if sides[0] is None and sides[1] is None:
            continue
        index = 1 if sides[0] is not None else 0  # the first conv-side input fuses; the other is quantized
        placement.residual.append({"node": node.name, "input": node.input[index], "index": index,
                                   "conv": sides[1 - index]})
    return placement


# ------------------------------------------------------------------------------------------------ the check
def violations(model: onnx.ModelProto, *, min_channels: int = DEFAULT_MIN_CHANNELS) -> list[str]:
    """Every way the Q/DQ in ``model`` breaks the module's rules, in words (empty: it follows them)."""
    graph = model.graph
    consts = constant_values(graph)
    producer, consumers = _graph_maps(graph)
    problems: list[str] = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            zp = consts.get(node.input[2]) if len(node.input) > 2 else None
            scale = consts.get(node.input[1])
            if zp is None or numpy_helper.to_array(zp).dtype != np.int8 or numpy_helper.to_array(zp).any():
                problems.append(f"{node.name}: activation zero point is not INT8 0")
            if scale is None or numpy_helper.to_array(scale).size != 1:
                problems.append(f"{node.name}: activations must be quantized per tensor (one scale)")
            src = producer.get(node.input[0])
            if src is not None and src.op_type in WEIGHTED:
                users = [c for c in consumers[node.output[0]]]
                if not all(c.op_type == "DequantizeLinear" for c in users) or not any(
                        d.op_type == "Add" for c in users for d in consumers.get(c.output[0], [])):
                    problems.append(f"{node.name}: quantizes the output of weighted layer {src.name}")
            if src is not None and src.op_type in ("Conv", "BatchNormalization") and any(
                    c.op_type in FUSIBLE - {"Identity"} for c in consumers[node.input[0]]):
                problems.append(f"{node.name}: sits inside the {src.name} → BatchNorm/activation chain")
        if node.op_type != "DequantizeLinear":
            continue
        weight = consts.get(node.input[0])
        for user in consumers.get(node.output[0], []):
            if user.op_type not in WEIGHTED and user.op_type != "Add":
                problems.append(f"{node.name}: feeds {user.op_type} {user.name}; only weighted layers and residual "
                                "Adds read DequantizeLinear outputs")
            if user.op_type in ("Conv", "ConvTranspose", "Gemm") and len(user.input) > 2 \
                    and user.input[2] == node.output[0]:
                problems.append(f"{user.name}: bias is quantized")
            if weight is not None and user.op_type in WEIGHTED:
                w = numpy_helper.to_array(weight)
                axis = _attr(node, "axis", 1)
                scale = numpy_helper.to_array(consts[node.input[1]]) if node.input[1] in consts else None
                if w.dtype != np.int8 or (w == -128).any():
                    problems.append(f"{node.name}: weights must be INT8 in [-127, 127]")
                if scale is None or scale.size != w.shape[weight_axis(user, w.ndim)] \
                        or (axis % w.ndim) != weight_axis(user, w.ndim):
                    problems.append(f"{node.name}: weights of {user.op_type} {user.name} must be per output channel "
                                    f"(axis {weight_axis(user, w.ndim)})")
                c_in, c_out = _channels(user, w.shape)
                if min(c_in, c_out) < min_channels:
                    problems.append(f"{user.name}: {c_in}/{c_out} channels, fewer than {min_channels}, but INT8")
    for node in graph.node:  # a weighted layer with one input quantized must have all of them quantized
        if node.op_type not in WEIGHTED:
            continue
        dq = [t in producer and producer[t].op_type == "DequantizeLinear" for t in node.input[:2]]
        if any(dq) and not all(dq):
            problems.append(f"{node.name}: only some of its inputs are quantized")
    return problems
