"""Prune a model you only have as ONNX: convert its body to torch, prune, export, stitch the tail back.

No released pruning tool removes channels from an ONNX file; graph-level tools only zero 2:4 weights. Here the
graph goes through four steps (:func:`import_onnx`, then :func:`prune_onnx`):

1. **Prepare.** The file is loaded the safe way (:func:`trt_prune.onnx_io.load_onnx`: no external data outside
   its folder), its default-domain opset must be 11 to 18, its input gets the static shape pruning traces at,
   and a subset of ``trt-prune clean``'s passes runs in memory (shape inference, constant folding, Identity
   removal), so initializers aliased through Identity nodes (TorchScript exports have dozens) and shape
   arithmetic do not reach the converter.
2. **Cut.** The *body* is every node some layer with weights (Conv, ConvTranspose, Gemm, MatMul of an
   initializer) depends on, plus those layers; the *tail* is the rest: box decoding, TopK, NonMaxSuppression,
   TensorRT plugins, a final softmax. Post-processing ops (NonMaxSuppression, TopK, ops of other domains,
   plugins) may not sit in the body. The tail is never converted: it is copied back as it was.
3. **Convert.** onnx2torch (a maintained ONNX→torch.fx converter) builds the body module. What it lacks is
   written here and said so: converters for opset 18's Split, Resize, Reduce* and Pad (inputs that opset 18
   moved from attributes), and replacements for its Reshape and Split, whose stored sizes would break once
   channels are removed (a reshape recomputes each merged axis from its input; an equal split divides the
   axis it gets). A reshape that splits an axis into constant sizes (heads, a box distribution) cannot follow
   pruning on that axis: the module declares it (:data:`trt_prune.pruning.graph.FIXED_AXES_ATTR`), and the
   pruner keeps channels that arrive on it whole. The module is checked against ONNX Runtime on the
   body before anything is pruned.
4. **Prune, export, stitch** (:func:`prune_onnx`): the structured pruner cuts the body; the exporter writes it
   at the source's opset, checked against the pruned module; the tail's nodes and initializers are appended,
   renamed where a name would collide, and the graph keeps the source's inputs and outputs (so
   ``num_detections``/``detection_*`` survive), checked by ONNX Runtime and ``onnx.checker``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from . import onnx_io
from .errors import TrtPruneError

MIN_OPSET, MAX_OPSET = 11, 18
#: ops that end a graph's computation on features: they and everything after them form the tail
POST_PROCESSING = {"NonMaxSuppression", "TopK"}
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
ONNX_DOMAINS = ("", "ai.onnx")


class OnnxImportError(TrtPruneError):
    """An ONNX model cannot be converted to torch for pruning (opset, op, shape, external data)."""


@dataclass
class ImportedOnnx:
    """An ONNX model split into a torch body and an ONNX tail (see the module docstring)."""

    source: str
    module: nn.Module  # the body, converted
    input_name: str
    input_shape: tuple[int, ...]
    opset: int
    model: onnx.ModelProto  # the prepared source (static input, cleaned), body and tail together
    body_outputs: list[str]  # the tensors where the body ends (the tail's inputs, the graph outputs it makes)
    tail: list[onnx.NodeProto]
    dynamic_batch: bool
    parity: dict[str, float] = field(default_factory=dict)  # max |torch - ONNX Runtime| per body output
    fixed: dict[str, str] = field(default_factory=dict)  # module -> the axes it stores sizes of, and why
    own_converters: list[str] = field(default_factory=list)  # ops converted by this module, not onnx2torch
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"source": self.source, "input": self.input_name, "input_shape": list(self.input_shape),
                "opset": self.opset, "body_nodes": len(self.model.graph.node) - len(self.tail),
                "tail_nodes": len(self.tail), "tail_ops": sorted({n.op_type for n in self.tail}),
                "body_outputs": self.body_outputs, "parity_max_abs": self.parity,
                "fixed_modules": self.fixed, "own_converters": self.own_converters, "seconds": self.seconds}


# ------------------------------------------------------------------------------------------------ import
def import_onnx(path: str | Path, input_shape: Sequence[int] | None = None, *, atol: float = 1e-4,
                check: bool = True) -> ImportedOnnx:
    """Convert the ONNX file ``path`` for pruning (see the module docstring). ``input_shape``: the shape to
    trace at, needed where the graph's input has dynamic axes other than the batch. The converted body must
    match ONNX Runtime within ``atol`` on a seeded random input (``check=False`` skips that). Raises
    :class:`OnnxImportError` naming the node and op that cannot be converted, or what else is wrong."""
    started = time.perf_counter()
    source = onnx_io.load_onnx(path, error=OnnxImportError)
    opset = onnx_io.default_opset(source)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxImportError(f"{str(path)!r} uses ONNX opset {opset}; pruning converts opsets {MIN_OPSET} to "
                              f"{MAX_OPSET}. Re-export the model at opset {MAX_OPSET} or lower")
    inputs = onnx_io.graph_inputs(source)
    if len(inputs) != 1:
        raise OnnxImportError(f"{str(path)!r} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                              "pruning an ONNX model needs one image-like input")
    spec = inputs[0]
    shape = _static_shape(spec, input_shape, path)
    model = _prepare(source, spec.name, shape)
    body_nodes, tail = _cut(model, path)
    body_outputs = _body_outputs(model, body_nodes, tail)
    body = _body_model(model, body_nodes, body_outputs)
    _check_convertible(body, opset, path)
    with warnings.catch_warnings(), _converters() as own:
        warnings.simplefilter("ignore")  # onnx2torch warns on every nearest-resize mode; parity decides below
        from onnx2torch import convert

        try:
            module = convert(body)
        except Exception as exc:  # the converter raises what its op modules raise
            raise OnnxImportError(f"onnx2torch could not convert {str(path)!r} ({onnx_io.one_line(exc)}); "
                                  "simplify the graph (trt-prune clean) or export it at another opset") from exc
    module.eval()
    from .pruning.graph import FIXED_AXES_ATTR

    fixed = {name: "; ".join(axes.values()) for name, m in module.named_children()
             if (axes := getattr(m, FIXED_AXES_ATTR, None))}
    imported = ImportedOnnx(str(path), module, spec.name, shape, opset, model, body_outputs, tail,
                            dynamic_batch=not isinstance(spec.shape[0], int), fixed=fixed,
                            own_converters=sorted(own))
    imported.seconds["convert"] = time.perf_counter() - started
    if check:
        started = time.perf_counter()
        imported.parity = _check_conversion(module, body, spec.name, shape, atol, path)
        imported.seconds["check"] = time.perf_counter() - started
    return imported


def _static_shape(spec: onnx_io.InputDims, given: Sequence[int] | None, path) -> tuple[int, ...]:
    if given is not None:
        shape = tuple(int(d) for d in given)
        if len(shape) != len(spec.shape) or any(isinstance(d, int) and d != g
                                                for d, g in zip(spec.shape, shape, strict=True)):
            raise OnnxImportError(f"input shape {'x'.join(map(str, shape))} does not fit input {spec.name!r} of "
                                  f"{str(path)!r}, whose shape is {_dims_text(spec.shape)}")
        return shape
    dynamic = [i for i, d in enumerate(spec.shape) if not isinstance(d, int)]
    if any(i != 0 for i in dynamic):
        raise OnnxImportError(f"input {spec.name!r} of {str(path)!r} has dynamic axes ({_dims_text(spec.shape)}); "
                              "give the shape to prune at, e.g. --input-shape 1x3x640x640")
    return tuple(1 if not isinstance(d, int) else d for d in spec.shape)


def _dims_text(dims) -> str:
    return "x".join(str(d) if isinstance(d, int) else str(d or "?") for d in dims)


def _prepare(source: onnx.ModelProto, input_name: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    """The source with a static input shape, constant-folded, Identity-free and topologically sorted."""
    import onnx_graphsurgeon as gs

    from .cleaner import PASSES

    model = onnx.ModelProto()
    model.CopyFrom(source)
    for value in model.graph.input:
        if value.name == input_name:
            for dim, n in zip(value.type.tensor_type.shape.dim, shape, strict=True):
                dim.Clear()
                dim.dim_value = n
    del model.graph.value_info[:]
    graph = gs.import_onnx(model)
    for name in ("shape_inference", "fold_constants", "remove_identity", "cleanup", "toposort"):
        try:
            graph, _ = PASSES[name](graph)
        except TrtPruneError:
            raise
        except Exception as exc:  # a pass failing on a foreign graph: say which, keep the user's file untouched
            raise OnnxImportError(f"preparing the graph failed in pass {name!r} ({onnx_io.one_line(exc)}); "
                                  "check the file with `trt-prune clean`") from exc
    prepared = gs.export_onnx(graph)
    del prepared.opset_import[:]
    prepared.opset_import.extend(source.opset_import)
    prepared.ir_version = source.ir_version
    try:
        return onnx.shape_inference.infer_shapes(prepared, data_prop=True)
    except Exception:  # shape inference is an aid: a graph it cannot type still converts
        return prepared


def _is_post_processing(node: onnx.NodeProto) -> bool:
    return node.op_type in POST_PROCESSING or node.domain not in ONNX_DOMAINS or onnx_io.is_plugin(node)


def _cut(model: onnx.ModelProto, path) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(body, tail): the body is every layer with weights and all it depends on; the tail the rest."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    weighted = [n for n in graph.node if n.op_type in WEIGHTED and (n.op_type != "MatMul" or
                                                                    any(i in inits for i in n.input))]
    if not weighted:
        raise OnnxImportError(f"nothing can be pruned in {str(path)!r}: it has no Conv, ConvTranspose, Gemm or "
                              "MatMul with weights")
    body: set[int] = set()
    stack = list(weighted)
    while stack:
        node = stack.pop()
        if id(node) in body:
            continue
        body.add(id(node))
        stack.extend(producer[i] for i in node.input if i in producer)
    for node in graph.node:
        if id(node) in body and _is_post_processing(node):
            raise OnnxImportError(f"node {node.name!r} ({node.op_type}) is post-processing but a layer with weights "
                                  "reads its result; pruning needs the layers before any NMS, TopK or plugin")
    return [n for n in graph.node if id(n) in body], [n for n in graph.node if id(n) not in body]


def _body_outputs(model: onnx.ModelProto, body: list[onnx.NodeProto], tail: list[onnx.NodeProto]) -> list[str]:
    made = {out for node in body for out in node.output}
    wanted = [i for node in tail for i in node.input] + [o.name for o in model.graph.output]
    return list(dict.fromkeys(name for name in wanted if name in made))


def _body_model(model: onnx.ModelProto, body: list[onnx.NodeProto], outputs: list[str]) -> onnx.ModelProto:
    """The body as its own model. Every output gets its own Identity node: onnx2torch returns one value per
    producing node, so two outputs of one Split (or an output also read inside the body) would be merged."""
    graph = model.graph
    used = {i for node in body for i in node.input}
    types = {v.name: v for v in [*graph.value_info, *graph.output, *graph.input]}
    nodes = []
    renamed = {name: f"{name}__body" for name in outputs}
    for node in body:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [renamed.get(i, i) for i in copy.input]
        copy.output[:] = [renamed.get(o, o) for o in copy.output]
        nodes.append(copy)
    for name in outputs:
        nodes.append(onnx.helper.make_node("Identity", [renamed[name]], [name], name=f"{name}__out"))
    out_values = []
    for name in outputs:
        value = onnx.ValueInfoProto()
        if name in types:
            value.CopyFrom(types[name])
        else:
            value.name = name
        out_values.append(value)
    new = onnx.helper.make_graph(nodes, f"{graph.name}_body", [i for i in graph.input if i.name in used],
                                 out_values, [t for t in graph.initializer if t.name in used])
    return onnx.helper.make_model(new, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _check_convertible(body: onnx.ModelProto, opset: int, path) -> None:
    from onnx2torch.node_converters.registry import get_converter

    with _converters():
        for node in body.graph.node:
            version = next((o.version for o in body.opset_import if o.domain == node.domain), opset)
            try:
                get_converter(node.op_type, version, node.domain)
            except NotImplementedError:
                where = f"node {node.name!r}" if node.name else f"the node making {node.output[0]!r}"
                domain = f", domain {node.domain}" if node.domain else ""
                raise OnnxImportError(
                    f"{where} of {str(path)!r} is op {node.op_type} (opset {version}{domain}), which "
                    "cannot be converted to torch; it sits before the last layer with weights, so it cannot stay "
                    "in the ONNX tail either. Replace it in the exporting code, or export at another opset"
                ) from None


def _check_conversion(module: nn.Module, body: onnx.ModelProto, input_name: str, shape, atol: float,
                      path) -> dict[str, float]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    expected = onnx_io.run_onnxruntime(body, {input_name: x})
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    got = list(got) if isinstance(got, (list, tuple)) else [got]
    names = [o.name for o in body.graph.output]
    parity = {}
    for name, value in zip(names, got, strict=True):
        ref = expected[name]
        out = value.detach().numpy()
        if out.shape != ref.shape:
            raise OnnxImportError(f"the converted model's output {name!r} has shape {out.shape}, ONNX Runtime's "
                                  f"{ref.shape}; the conversion of {str(path)!r} is wrong. Please report it")
        parity[name] = float(np.abs(out.astype(np.float64) - ref).max()) if out.size else 0.0
        if parity[name] > atol + 1e-3 * float(np.abs(ref).max(initial=0.0)):
            raise OnnxImportError(f"the converted model differs from ONNX Runtime on output {name!r} of "
                                  f"{str(path)!r} (max abs {parity[name]:.3g} > atol {atol}); nothing was pruned")
    return parity


# ------------------------------------------------------------------------------------- prune and stitch
def prune_onnx(imported: ImportedOnnx, pruned: nn.Module, dst: str | Path, *, atol: float = 1e-4,
               rtol: float = 1e-3) -> tuple[str, dict[str, float], list[str]]:
    """Export the pruned body ``pruned`` of ``imported`` at the source's opset, stitch the tail back and write
    the whole graph to ``dst`` (atomically). Returns (path, export parity per body output, graph outputs)."""
    import tempfile

    from .exporter import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "body.onnx"
        # the exporter refuses some ONNX value names (TorchScript's numeric ones, '1137'): export under names of
        # our own, then give the body's outputs the names the tail reads
        back = {f"trt_prune_body_output_{i}": name for i, name in enumerate(imported.body_outputs)}
        with _export_opset_visible():
            result = export_onnx(pruned, staged, imported.input_shape, exporter="torchscript", opset=imported.opset,
                                 dynamic_batch=imported.dynamic_batch, input_names=(imported.input_name,),
                                 output_names=tuple(back), atol=atol, rtol=rtol)
        body = onnx_io.load_onnx(staged, error=OnnxImportError)
        _rename_outputs(body.graph, back)
        result.parity = {back.get(k, k): v for k, v in (result.parity or {}).items()}
    if onnx_io.default_opset(body) != imported.opset:
        raise OnnxImportError(f"the pruned body was exported at opset {onnx_io.default_opset(body)}, the tail needs "
                              f"{imported.opset}; nothing was written")
    whole = stitch(imported, body)
    try:
        onnx_io.check_model(whole)
    except Exception as exc:
        raise OnnxImportError(f"the stitched graph is not valid ONNX ({onnx_io.one_line(exc)}); nothing was "
                              "written. Please report it") from exc
    feeds = {imported.input_name: np.random.default_rng(1).standard_normal(imported.input_shape).astype(np.float32)}
    if not any(onnx_io.is_plugin(n) or n.domain not in ONNX_DOMAINS for n in whole.graph.node):
        try:
            onnx_io.run_onnxruntime(whole, feeds)
        except Exception as exc:
            raise OnnxImportError(f"ONNX Runtime cannot run the stitched graph ({onnx_io.one_line(exc)}); nothing "
                                  "was written. Please report it") from exc
    written = onnx_io.save_onnx(whole, dst)
    parity = {k: v["max_abs"] for k, v in result.parity.items()} if isinstance(result.parity, dict) else {}
    return str(written), parity, [o.name for o in whole.graph.output]


@contextlib.contextmanager
def _export_opset_visible() -> Iterator[None]:
    """onnx2torch's modules that export themselves as their ONNX op (Gather, Expand, Slice, Unsqueeze…) read the
    opset being exported from ``torch.onnx.symbolic_helper.GLOBALS``, which torch 2.9+ moved to the TorchScript
    exporter's own module; make it visible there while the body is exported."""
    from torch.onnx import symbolic_helper

    if hasattr(symbolic_helper, "GLOBALS"):
        yield
        return
    try:
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:  # a torch without it: the modules fail with their own error
        yield
        return
    symbolic_helper.GLOBALS = GLOBALS
    try:
        yield
    finally:
        del symbolic_helper.GLOBALS


def _rename_outputs(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Rename the values ``names`` maps (graph outputs of ``graph``) in place; a value of the graph that already
    has one of the new names is renamed out of the way first."""
    used = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer} | \
        {i.name for i in graph.input} | set(names)
    allocate = onnx_io.name_allocator(used | set(names.values()))
    rename = {}
    for new in names.values():
        if new in used and new not in names:
            rename[new] = allocate(new)
    rename.update(names)

    def fix(values):
        values[:] = [rename.get(v, v) for v in values]

    for node in graph.node:
        fix(node.input)
        fix(node.output)
    for collection in (graph.initializer, graph.input, graph.output, graph.value_info):
        for item in collection:
            item.name = rename.get(item.name, item.name)


def stitch(imported: ImportedOnnx, body: onnx.ModelProto) -> onnx.ModelProto:
    """The pruned ``body`` with ``imported``'s tail appended: tail tensors, initializers and nodes whose names
    the body already uses are renamed; inputs and outputs are the source's."""
    source = imported.model.graph
    taken = {n.name for n in body.graph.node} | {t.name for t in body.graph.initializer} | \
        {o for n in body.graph.node for o in n.output} | {i.name for i in body.graph.input}
    allocate = onnx_io.name_allocator(set(taken))
    body_outputs = set(imported.body_outputs)
    tail_inits = {i for node in imported.tail for i in node.input}
    rename: dict[str, str] = {}
    for node in imported.tail:
        for out in node.output:
            if out and out in taken and out not in body_outputs:
                rename[out] = allocate(out)
    initializers = []
    for tensor in source.initializer:
        if tensor.name in tail_inits and tensor.name not in body_outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            if tensor.name in taken:
                rename[tensor.name] = copy.name = allocate(tensor.name)
            initializers.append(copy)
    nodes = list(body.graph.node)
    for node in imported.tail:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename.get(i, i) for i in copy.input]
        copy.output[:] = [rename.get(o, o) for o in copy.output]
        if copy.name and copy.name in taken:
            copy.name = allocate(copy.name)
        nodes.append(copy)
    original = _source_inputs(imported)
    outputs = [onnx.ValueInfoProto() for _ in source.output]
    for value, out in zip(outputs, source.output, strict=True):
        value.CopyFrom(out)
        value.name = rename.get(out.name, out.name)
    graph = onnx.helper.make_graph(nodes, source.name, original, outputs,
                                   [*body.graph.initializer, *initializers])
    model = onnx.helper.make_model(graph, opset_imports=list(imported.model.opset_import),
                                   ir_version=imported.model.ir_version)
    return model


def _source_inputs(imported: ImportedOnnx) -> list[onnx.ValueInfoProto]:
    """The graph input as the pruned file declares it: the source's, with a symbolic batch kept symbolic."""
    value = onnx.ValueInfoProto()
    value.CopyFrom(next(i for i in imported.model.graph.input if i.name == imported.input_name))
    if imported.dynamic_batch:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "batch"
    return [value]


# ------------------------------------------------------------------------------------------- converters
@contextlib.contextmanager
def _converters() -> Iterator[set[str]]:
    """onnx2torch's registry with this module's converters in it, for the duration of a conversion (the
    registry is a module-level dict; entries are swapped in and restored so other users of onnx2torch in the
    process see its own converters). Yields the set of op types our converters handled."""
    from onnx2torch.node_converters import registry

    used: set[str] = set()
    table = registry._CONVERTER_REGISTRY  # noqa: SLF001 - no public way to override a registered converter
    saved = {}
    for (op, version), fn in _OWN.items():
        key = registry.OperationDescription(domain="", operation_type=op, version=version)
        saved[key] = table.get(key)

        def wrapped(node, graph, _fn=fn, _op=op):
            used.add(_op)
            return _fn(node, graph)
        table[key] = wrapped
    _THEIRS.update({(k.operation_type, k.version): fn for k, fn in saved.items() if fn is not None})
    try:
        yield used
    finally:
        _THEIRS.clear()
        for key, fn in saved.items():
            if fn is None:
                table.pop(key, None)
            else:
                table[key] = fn


_OWN: dict[tuple[str, int], object] = {}
_THEIRS: dict[tuple[str, int], object] = {}  # onnx2torch's converters ours replace, while _converters() runs


def _theirs(node, graph, version: int):
    """Convert ``node`` with onnx2torch's own converter for its op at ``version`` (where ours declines)."""
    from onnx2torch.node_converters.registry import get_converter

    fn = _THEIRS.get((node.operation_type, version)) or get_converter(node.operation_type, version)
    return fn(node, graph)


def _own(op: str, *versions: int):
    def deco(fn):
        for v in versions:
            _OWN[(op, v)] = fn
        return fn
    return deco


def _const(name: str, graph):
    from onnx2torch.utils.common import get_const_value

    try:
        return get_const_value(name, graph)
    except KeyError:
        return None


def _mapping(node, n_inputs: int = 1):
    from onnx2torch.utils.common import OnnxMapping

    return OnnxMapping(inputs=tuple(node.input_values[:n_inputs]), outputs=node.output_values)


def _shape_of(graph, name: str) -> tuple[int, ...] | None:
    info = graph.value_info.get(name) if hasattr(graph, "value_info") else None
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    dims = info.type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


class Reshape(nn.Module):
    """ONNX Reshape to a constant shape that follows pruning: each group of target axes that merges input axes
    (a flatten, (B, C, H, W) → (B, C, H·W)) is recomputed from the input it gets; axes that split an input axis
    keep their constant sizes, and that input axis is declared fixed (``trt_prune_fixed_axes``): channels
    that arrive on it are kept whole by the pruner."""

    def __init__(self, target: Sequence[int], in_shape: Sequence[int] | None, allowzero: bool = False):
        super().__init__()
        self.target = [int(t) for t in target]
        self.allowzero = allowzero
        self.in_shape = tuple(in_shape) if in_shape is not None else None
        self.groups = None
        self.trt_prune_fixed_axes: dict[int, str] = {}
        if self.in_shape is not None:
            resolved = _resolve(self.target, self.in_shape, allowzero)
            self.groups = _align(self.in_shape, resolved) if resolved is not None else None
            if self.groups is not None:
                self.target = resolved
                for ins, outs in self.groups:
                    if sum(1 for j in outs if resolved[j] != 1) > 1:
                        for axis in ins:
                            self.trt_prune_fixed_axes[axis] = (
                                f"reshape of {list(self.in_shape)} to the constant shape {resolved} splits axis "
                                f"{axis} (sizes stored in the ONNX graph)")

    def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
        if self.groups is None:  # shapes unknown at conversion: the ONNX semantics, as onnx2torch runs them
            return x.reshape([x.shape[i] if t == 0 and not self.allowzero else t for i, t in enumerate(self.target)])
        if tuple(x.shape) == self.in_shape:
            return x.reshape(self.target)
        out = list(self.target)
        for ins, outs in self.groups:
            free = [j for j in outs if self.target[j] != 1]
            if len(free) == 1:
                out[free[0]] = math.prod(int(x.shape[i]) for i in ins)
        return x.reshape(out)


def _resolve(target: list[int], in_shape: tuple[int, ...], allowzero: bool) -> list[int] | None:
    out = [in_shape[i] if t == 0 and not allowzero and i < len(in_shape) else t for i, t in enumerate(target)]
    if out.count(-1) > 1:
        return None
    if -1 in out:
        known = math.prod(t for t in out if t != -1)
        if known == 0:
            return None
        out[out.index(-1)] = math.prod(in_shape) // known
    return out if math.prod(out) == math.prod(in_shape) else None


def _align(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input axes with runs of output axes of equal products (how a reshape regroups axes)."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ins, outs, pa, pb = [], [], 1, 1
        if i < len(a):
            ins.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            outs.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                ins.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                outs.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        groups.append((ins, outs))
    return groups


@_own("Reshape", 5, 13, 14)
def _reshape(node, graph):
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    target = _const(node.input_values[1], graph)
    if target is None:  # a computed shape: onnx2torch's module, which reshapes to whatever it gets
        return OperationConverterResult(torch_module=OnnxReshape(), onnx_mapping=onnx_mapping_from_node(node))
    module = Reshape(torch.as_tensor(target).tolist(), _shape_of(graph, node.input_values[0]),
                     bool(node.attributes.get("allowzero", 0)))
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node))


class Split(nn.Module):
    """ONNX Split into constant sizes. Equal parts divide the axis they get (so a split that pruning shrank
    evenly still splits in the middle); unequal parts keep their sizes (the pruner keeps such channels whole)."""

    def __init__(self, sizes: Sequence[int] | None, parts: int, axis: int):
        super().__init__()
        self.sizes = [int(s) for s in sizes] if sizes is not None else None
        self.parts, self.axis = parts, axis

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if self.sizes is None or len(set(self.sizes)) == 1:
            n = int(x.shape[self.axis])
            size = -(-n // self.parts)  # ONNX (opset 18): the last part is smaller when n does not divide
            return torch.split(x, size, dim=self.axis)
        return torch.split(x, self.sizes, dim=self.axis)


@_own("Split", 2, 11)
def _split_attr(node, graph):
    from onnx2torch.utils.common import OperationConverterResult

    module = Split(node.attributes.get("split"), len(node.output_values), int(node.attributes.get("axis", 0)))
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node))


@_own("Split", 13, 18)
def _split_input(node, graph):
    from onnx2torch.utils.common import OperationConverterResult

    sizes = _const(node.input_values[1], graph) if len(node.input_values) > 1 and node.input_values[1] else None
    if len(node.input_values) > 1 and node.input_values[1] and sizes is None:
        raise NotImplementedError("Split with computed sizes")
    sizes = torch.as_tensor(sizes).tolist() if sizes is not None else None
    module = Split(sizes, len(node.output_values), int(node.attributes.get("axis", 0)))
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node))


@_own("ReduceMean", 18)
@_own("ReduceMax", 18)
@_own("ReduceMin", 18)
@_own("ReduceL1", 18)
@_own("ReduceL2", 18)
@_own("ReduceProd", 18)
@_own("ReduceSumSquare", 18)
@_own("ReduceLogSum", 18)
@_own("ReduceLogSumExp", 18)
def _reduce18(node, graph):
    """Opset 18 moved ``axes`` from an attribute to an input; a constant one maps to onnx2torch's module."""
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.utils.common import OperationConverterResult

    axes = None
    if len(node.input_values) > 1 and node.input_values[1]:
        axes = _const(node.input_values[1], graph)
        if axes is None:
            raise NotImplementedError(f"{node.operation_type} with computed axes")
        axes = torch.as_tensor(axes).tolist()
    if not axes and node.attributes.get("noop_with_empty_axes", 0):
        raise NotImplementedError(f"{node.operation_type} with noop_with_empty_axes")
    module = OnnxReduceStaticAxes(node.operation_type, axes or None, node.attributes.get("keepdims", 1))
    return OperationConverterResult(torch_module=module, onnx_mapping=_mapping(node))


@_own("Resize", 18)
def _resize18(node, graph):
    """Opset 18's Resize adds antialias, axes and keep_aspect_ratio_policy; at their defaults it is opset 13's."""
    from onnx2torch.node_converters.registry import get_converter

    attrs = node.attributes
    if attrs.get("antialias", 0) or attrs.get("axes") is not None or \
            attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NotImplementedError("Resize with antialias, axes or keep_aspect_ratio_policy")
    return get_converter("Resize", 13)(node, graph)


@_own("Pad", 18)
def _pad18(node, graph):
    """Opset 18's Pad adds an optional ``axes`` input; without it it is opset 13's."""
    from onnx2torch.node_converters.registry import get_converter

    if len(node.input_values) > 3 and node.input_values[3]:
        raise NotImplementedError("Pad with axes")
    return get_converter("Pad", 13)(node, graph)


@_own("Clip", 11, 12, 13)
def _clip(node, graph):
    """onnx2torch reads an omitted optional bound (an empty input name, as the TorchScript exporter writes
    ``clamp(min=eps)``) as a computed one and refuses it; here an empty name is no bound."""
    from onnx2torch.node_converters.clip import _create_torch_module
    from onnx2torch.utils.common import OperationConverterResult

    bounds = []
    for i in (1, 2):
        name = node.input_values[i] if len(node.input_values) > i else ""
        value = _const(name, graph) if name else None
        if name and value is None:
            raise NotImplementedError("Clip with a computed bound")
        bounds.append(None if value is None else float(value))
    return OperationConverterResult(torch_module=_create_torch_module(*bounds), onnx_mapping=_mapping(node))


def _initializer(name: str, graph) -> torch.Tensor | None:
    """The float initializer (or Constant) ``name`` as a tensor, or None when it is computed or not float."""
    value = _const(name, graph) if name else None
    return value if isinstance(value, torch.Tensor) and value.is_floating_point() else None


@_own("MatMul", 1, 9, 13)
def _matmul(node, graph):
    """A MatMul by a 2-D weight (how the TorchScript exporter writes a Linear over tokens, without Gemm) becomes
    an ``nn.Linear``, so the pruner cuts its weight like any other layer's; onnx2torch keeps the weight as a
    buffer operand, which pins the channels it meets."""
    from onnx2torch.utils.common import OperationConverterResult

    weight = _initializer(node.input_values[1], graph)
    if weight is None or weight.dim() != 2 or _initializer(node.input_values[0], graph) is not None:
        return _theirs(node, graph, 13)
    linear = nn.Linear(int(weight.shape[0]), int(weight.shape[1]), bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
    return OperationConverterResult(torch_module=linear, onnx_mapping=_mapping(node))


class ConstOperand(nn.Module):
    """An element-wise Add/Sub/Mul/Div of an activation and a constant tensor (a Linear's bias after a MatMul,
    a layer scale), the constant held as a parameter so that the pruner cuts it with the channels it meets."""

    OPS = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}

    def __init__(self, op: str, value: torch.Tensor, constant_first: bool):
        super().__init__()
        self.op = op
        self.constant_first = constant_first
        self.value = nn.Parameter(value.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self.OPS[self.op]
        return fn(self.value, x) if self.constant_first else fn(x, self.value)


@_own("Add", 7, 13, 14)
@_own("Sub", 7, 13, 14)
@_own("Mul", 7, 13, 14)
@_own("Div", 7, 13, 14)
def _binary_const(node, graph):
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    a, b = node.input_values[:2]
    ca, cb = _initializer(a, graph), _initializer(b, graph)
    if (ca is None) == (cb is None) or (ca if ca is not None else cb).numel() < 2:
        return _theirs(node, graph, 14)
    module = ConstOperand(node.operation_type, ca if ca is not None else cb, constant_first=ca is not None)
    x = b if ca is not None else a
    return OperationConverterResult(torch_module=module,
                                    onnx_mapping=OnnxMapping(inputs=(x,), outputs=node.output_values))
