"""Which weights of an ONNX model hold TensorRT's 2:4 pattern, read the way TensorRT reads them.

For every Conv, Gemm and MatMul, each input that traces back to a constant gets a :class:`SparsityRecord`
with the reduction axis TensorRT checks: Conv weight axis 1; Gemm A axis 1 (0 when ``transA``), B axis 0 (1
when ``transB``, the PyTorch ``Linear`` layout); MatMul A its last axis, B its second-to-last (axis 1 and 0
of a 2-D matrix). A constant is an initializer or the tensor of a ``Constant`` node (where files from other
converters keep their weights; TensorRT's parser turns both into weights, so does this module). Between the
constant and the consumer the trace goes through Identity (TorchScript shares equal tensors through it),
Cast, QuantizeLinear/DequantizeLinear (and TensorRT's FP8 variants) unchanged, and through Transpose with the
axis permuted; any other producer ends the trace, as in TensorRT.

Verdicts agree with Polygraphy's checker (``polygraphy inspect sparsity``, ``polygraphy.tools.sparse``) on
2-D weights and on Conv weights. Where they differ, on purpose:

- Polygraphy maps an axis through ``Transpose`` with ``perm.index(axis)``, the inverse permutation; output
  axis ``i`` of a Transpose is input axis ``perm[i]``. The two agree for 2-D transposes and every
  self-inverse ``perm``, and differ for e.g. ``perm=[0, 2, 3, 1]``; this module uses ``perm[i]``.
- Polygraphy uses axis 1 for a MatMul's A and axis 0 for its B whatever their rank; for rank > 2 the
  reduction axes are the last and second-to-last, which this module uses.
- Polygraphy skips integer initializers (int8 weights before a DequantizeLinear); TensorRT's int8 weights
  are symmetric (zero point 0), so a zero stored value is a zero weight and this module checks them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from trt_prune.errors import SparsifyError
from trt_prune.onnx_io import load_onnx
from trt_prune.sparsity.pattern import GROUP, KEEP, _grouped, holds_2of4, pattern_possible

# ops whose output has its input's layout, element for element: the pattern passes straight through
_PASS_THROUGH = {"Identity", "Cast", "QuantizeLinear", "DequantizeLinear", "TRT_FP8QuantizeLinear",
                 "TRT_FP8DequantizeLinear"}


@dataclass
class SparsityRecord:
    """One weight as one consumer sees it: whether it holds 2:4 along the consumer's reduction axis."""

    name: str
    node: str
    op: str
    shape: tuple[int, ...]
    axis: int
    holds_24: bool
    eligible: bool
    reason: str

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data


def inspect_sparsity(path: str | os.PathLike) -> list[SparsityRecord]:
    """Check every Conv/Gemm/MatMul constant weight of the ONNX file ``path`` for the 2:4 pattern.

    One record per (initializer, consuming node, input) in graph order. ``eligible`` says the pattern is
    possible at all (the reduction axis divides by 4); ``holds_24`` that it is there; ``reason`` says why
    in words. A missing or unreadable file raises :class:`SparsifyError`.
    """
    model = load_onnx(path, error=SparsifyError)
    return inspect_model(model)


def inspect_model(model: onnx.ModelProto) -> list[SparsityRecord]:
    """:func:`inspect_sparsity` on a model already in memory (external data loaded)."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:  # weights held in Constant nodes (``value``, a full tensor)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
            if tensor is not None:
                initializers.setdefault(node.output[0], tensor)
    producers = {out: node for node in graph.node for out in node.output if out and out not in initializers}
    arrays: dict[str, np.ndarray] = {}
    records = []
    for node in graph.node:
        for index, axis_of in _reduction_inputs(node):
            if index >= len(node.input) or not node.input[index]:
                continue
            traced = _trace(node.input[index], axis_of, initializers, producers)
            if traced is None:
                continue
            name, axis = traced
            if name not in arrays:
                arrays[name] = _weight(name, initializers[name])
            if not 0 <= axis < arrays[name].ndim:
                raise SparsifyError(f"weight {name!r} of {node.op_type} node {node.name!r} has shape "
                                    f"{list(arrays[name].shape)}, which has no reduction axis {axis}; the file is "
                                    "damaged or not a valid model: re-export it")
            records.append(_record(name, node, arrays[name], axis))
    return records


def _weight(name: str, tensor: onnx.TensorProto) -> np.ndarray:
    """The values of a weight tensor; one :class:`SparsifyError` when its dims, type and data disagree (a damaged
    file passes the protobuf parser but not numpy)."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # onnx raises ValueError/TypeError/KeyError/ValidationError for such tensors
        text = " ".join(str(exc).split())[:200]
        raise SparsifyError(f"weight {name!r} cannot be read ({type(exc).__name__}: {text}); its shape, data type "
                            "and data disagree, so the file is damaged: re-export it") from exc


def _reduction_inputs(node: onnx.NodeProto):
    """(input index, function of the input's rank giving its reduction axis) for the ops TensorRT sparsifies."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return [(1, lambda rank: 1)]
    if node.op_type == "Gemm":
        trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)
        if not all(isinstance(t, int) and t in (0, 1) for t in (trans_a, trans_b)):
            raise SparsifyError(f"Gemm node {node.name!r} has transA={trans_a!r}, transB={trans_b!r}; ONNX "
                                "allows 0 or 1: the file is damaged, re-export it")
        return [(0, lambda rank: 0 if trans_a else 1), (1, lambda rank: 1 if trans_b else 0)]
    if node.op_type == "MatMul":
        return [(0, lambda rank: rank - 1), (1, lambda rank: max(rank - 2, 0))]
    return []


def _trace(tensor: str, axis_of, initializers, producers):
    """Follow ``tensor`` back to an initializer; returns (initializer name, its reduction axis) or None."""
    perms = []
    seen = set()
    while tensor not in initializers:
        node = producers.get(tensor)
        if node is None or tensor in seen:
            return None  # a graph input, or a weight computed at run time: TensorRT sees no constant here
        seen.add(tensor)
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            perms.append(perm)
        elif node.op_type not in _PASS_THROUGH:
            return None
        tensor = node.input[0]
    rank = len(initializers[tensor].dims)
    # the consumer's axis is on the last tensor in the chain; undo the transposes from the consumer back
    axis = axis_of(rank)
    for perm in perms:
        perm = perm if perm is not None else list(range(rank))[::-1]  # ONNX default: reverse the axes
        if len(perm) != rank or not 0 <= axis < rank:
            return None
        axis = perm[axis]
    return tensor, axis


def _record(name: str, node: onnx.NodeProto, weight: np.ndarray, axis: int) -> SparsityRecord:
    shape = tuple(int(d) for d in weight.shape)
    common = {"name": name, "node": node.name, "op": node.op_type, "shape": shape, "axis": axis}
    eligible = pattern_possible(shape, axis)
    if not eligible:
        return SparsityRecord(**common, holds_24=False, eligible=False, reason=_ineligible(node, shape, axis))
    if holds_2of4(weight, axis):
        return SparsityRecord(**common, holds_24=True, eligible=True, reason="holds 2:4")
    nonzero = np.count_nonzero(_grouped(weight, axis), axis=-1)
    dense = int((nonzero > KEEP).sum())
    return SparsityRecord(**common, holds_24=False, eligible=True,
                          reason=f"dense: {dense} of {nonzero.size} groups have more than {KEEP} non-zeros")


def _ineligible(node: onnx.NodeProto, shape: tuple[int, ...], axis: int) -> str:
    if len(shape) < 2:
        return f"rank {len(shape)} weight has no reduction axis to sparsify"
    length = shape[axis]
    if node.op_type == "Conv":
        group = next((int(a.i) for a in node.attribute if a.name == "group"), 1)
        if group > 1:
            kind = "depthwise" if length == 1 else "grouped"
            return f"{kind} conv (group={group}): {length} input channels per group, not a multiple of {GROUP}"
        return f"input channels {length} not a multiple of {GROUP}"
    return f"reduction axis {axis} has length {length}, not a multiple of {GROUP}"
