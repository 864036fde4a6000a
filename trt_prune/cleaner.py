"""Clean an exported ONNX graph for TensorRT: a pipeline of named passes over onnx-graphsurgeon.

Passes, in the default order (each is a function ``(graph) -> (graph, detail)`` in :data:`PASSES`):

- ``shape_inference``: ONNX shape inference with data propagation, so that ``fold_constants`` can fold
  ``Shape`` nodes of static axes (on a YOLO-style head this is the difference between 10 and 7 nodes).
- ``fold_constants``: onnx-graphsurgeon's folding (evaluates constant subgraphs in ONNX Runtime), repeated with
  shape inference in between until nothing more folds (as Polygraphy's ``sanitize --fold-constants`` does).
- ``simplify_reshape``: a Reshape whose target shape is computed from its own input's dynamic shape
  (``x.flatten(2)``, ``x.view(x.size(0), -1)`` under a dynamic batch) gets a constant shape with ``0``
  ("copy this dimension") in place of the Shape/Slice/Gather/Concat arithmetic, which folding cannot remove
  because the batch is unknown.
- ``remove_identity``: Identity, inference Dropout, Cast to the type it already has, Reshape to the shape it
  already has.
- ``merge_transposes``: a Transpose of a Transpose becomes one (permutations composed; the MultiheadAttention
  of a dynamo-exported ViT-B/16 has 12 such pairs), an identity Transpose goes.
- ``dedup_initializers``: identical initializers (dtype, shape and bytes) become one.
- ``onnxslim``: onnxslim's optimiser, for what it does and the passes above do not: BatchNormalization folded
  into the Conv before it, Pad into a Conv, Mul/Add by a constant into a Conv or Gemm, MatMul+Add into Gemm,
  common subexpressions (files from other exporters keep BatchNorm as its own node: a TorchScript ResNet-18
  exported with ``do_constant_folding=False`` goes from 69 nodes to 49 with it, Polygraphy's sanitize stops
  at 69).
- ``cleanup``: nodes and tensors that no output depends on.
- ``toposort``: nodes in dependency order.

The passes live in the registry :data:`PASSES` (``@PASSES.decorator("name")`` adds one). The result is checked
with ``onnx.checker`` and, by default, against the input graph in ONNX Runtime
(:func:`trt_prune.onnx_io.check_parity`) at the input shapes given (``input_shape``) or, for dynamic axes,
at a size every pooling, stride and resize of the graph accepts (batch 1, then 2).
TensorRT plugin nodes (ops ONNX does not define, left in its default domain for TensorRT's parser, such as
``EfficientNMS_TRT``) are checked as custom ops, kept as they are, and, since ONNX Runtime cannot run them,
parity is checked on their inputs instead of on what comes after them.
onnx-graphsurgeon drops the nodes' ``metadata_props`` (where the dynamo exporter keeps module scopes); they
are copied back by node name so :func:`trt_prune.onnx_io.node_module` still works on cleaned graphs.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from trt_prune import onnx_io
from trt_prune.errors import CleanError, TrtPruneError
from trt_prune.onnx_io import InputShape, one_line
from trt_prune.registry import Registry

DEFAULT_PASSES = ("shape_inference", "fold_constants", "simplify_reshape", "remove_identity", "merge_transposes",
                  "dedup_initializers", "onnxslim", "cleanup", "toposort")

#: Every clean pass by name: a function ``(onnx-graphsurgeon graph) -> (graph, detail text)``.
PASSES: Registry[str, Callable] = Registry("clean pass", CleanError)

_CHECK = onnx_io.RewriteCheck(
    error=CleanError, reference="the source graph", candidate="the cleaned graph",
    changed="cleaning changed what the graph computes", remedy="Leave out passes to find the one at fault",
    disable="pass check_parity=False to clean without it", invalid="Leave out passes to find the one at fault")


@dataclass
class CleanResult:
    """What :func:`clean_onnx` did: node counts overall and per pass, and the parity of the result.

    ``passes`` holds ``{"name", "nodes_before", "nodes_after", "detail"}`` per pass, in order. ``parity``
    maps each output to ``{"max_abs", "max_rel", "mismatched"}`` of the cleaned graph against the input graph
    in ONNX Runtime (empty when the check was off); in a graph with TensorRT plugin nodes, the outputs in front
    of them and ``"<plugin node>:input<i>"`` for the plugins' inputs. ``input_shapes``: the shape of each
    input parity was checked at (given or chosen; with the check off, those given).
    """

    src: str
    dst: str
    nodes_before: int
    nodes_after: int
    passes: list[dict] = field(default_factory=list)
    parity: dict[str, dict[str, float]] = field(default_factory=dict)
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return asdict(self)


def clean_onnx(src, dst, *, input_shape: InputShape | None = None, passes: Sequence[str] | None = None,
               check_parity: bool = True, atol: float = 1e-4, rtol: float = 1e-3, seed: int = 0) -> CleanResult:
    """Run the cleaning ``passes`` (default :data:`DEFAULT_PASSES`) on the ONNX file ``src``, write ``dst``.

    ``src`` is only read. ``dst`` is written atomically, and only once the result passes ``onnx.checker``
    and (unless ``check_parity=False``) matches ``src`` in ONNX Runtime on seeded random inputs within
    ``|clean - src| <= atol + rtol * |src|``. ``input_shape`` sets the shapes parity runs at: one full shape
    when the model has one input, or ``{input name: shape}``; it must agree with the graph's fixed axes.
    Inputs without one get batch 1 and, for other dynamic axes, a size the graph's pooling/strides/resizes
    accept (:func:`trt_prune.onnx_io.candidate_input_shapes`); the cleaned graph keeps its dynamic axes
    either way. Raises :class:`CleanError` for a missing or invalid ``src``, a bad ``input_shape``, dynamic
    axes no size could be found for, an unknown pass, a failing check; :class:`OutputError` when ``dst``
    cannot be written.
    """
    try:
        import onnx_graphsurgeon as gs
    except ImportError as exc:
        raise CleanError("clean needs onnx-graphsurgeon; install it with `pip install onnx-graphsurgeon`") from exc

    names = DEFAULT_PASSES if passes is None else [passes] if isinstance(passes, str) else passes
    steps = [(name, PASSES.lookup(name)) for name in names]
    src_path, dst_path, original = onnx_io.load_source(src, dst, CleanError, "clean")
    given = onnx_io.given_input_shapes(original, input_shape, CleanError)

    try:
        graph = gs.import_onnx(original)
    except Exception as exc:
        raise CleanError(f"onnx-graphsurgeon cannot import {str(src_path)!r} ({one_line(exc)})") from exc
    nodes_before = len(graph.nodes)
    records = []
    for name, step in steps:
        before = len(graph.nodes)
        try:
            graph, detail = step(graph)
        except TrtPruneError:
            raise
        except Exception as exc:
            raise CleanError(f"clean pass {name!r} failed on {str(src_path)!r} ({one_line(exc)}); leave it out "
                             f"with passes=[...] (valid: {', '.join(PASSES.names())})") from exc
        records.append({"name": name, "nodes_before": before, "nodes_after": len(graph.nodes), "detail": detail})

    try:
        cleaned = onnx_io.carry_metadata(gs.export_onnx(graph), original)
    except Exception as exc:
        raise CleanError(f"onnx-graphsurgeon cannot export the cleaned graph ({one_line(exc)}); nothing was "
                         "written. Leave out passes to find the one at fault") from exc
    written, checked = onnx_io.check_and_save(original, cleaned, dst_path, _CHECK, parity=check_parity, atol=atol,
                                              rtol=rtol, seed=seed, given=given)
    return CleanResult(src=str(src_path), dst=str(written), nodes_before=nodes_before,
                       nodes_after=len(cleaned.graph.node), passes=records, parity=checked.outputs,
                       input_shapes=checked.input_shapes)


# ------------------------------------------------------------------------------------------------ passes
@PASSES.decorator("shape_inference")
def shape_inference(graph):
    """ONNX shape inference (with data propagation) on the whole graph."""
    known_before = _known_shapes(graph)
    inferred = _infer_shapes(graph)
    if inferred is None:
        return graph, "skipped: the model is over protobuf's 2 GiB, in-memory shape inference cannot run"
    return inferred, (f"shapes known for {_known_shapes(inferred)} of {len(inferred.tensors())} tensors "
                      f"(was {known_before})")


def _infer_shapes(graph):
    """The graph after ONNX shape inference with data propagation; None when it is too big to infer in memory."""
    import onnx_graphsurgeon as gs

    model = gs.export_onnx(graph, do_type_check=False)
    if model.ByteSize() > 2**31 - 1:
        return None
    return gs.import_onnx(onnx.shape_inference.infer_shapes(model, data_prop=True))


def _known_shapes(graph) -> int:
    return sum(1 for t in graph.tensors().values() if t.shape is not None)


MAX_FOLD_PASSES = 10


@PASSES.decorator("fold_constants")
def fold_constants(graph):
    """Fold constant subgraphs with onnx-graphsurgeon (ONNX Runtime evaluates them); dead nodes go at once.

    Repeated, with shape inference in between, until a pass folds nothing (at most :data:`MAX_FOLD_PASSES`):
    folding one shape computation makes the shapes after it static, which makes the next one foldable. On a
    TorchScript Swin-T export (dynamic batch, window attention) one pass leaves 2786 of 6285 nodes, six passes (the
    last one folding nothing) leave 810.
    """
    import onnx_graphsurgeon as gs

    before = Counter(n.op for n in graph.nodes)
    passes, notes = 0, []
    while passes < MAX_FOLD_PASSES:
        count = len(graph.nodes)
        # fold_constants needs a topological order; cleanup right after makes the node count show its effect
        graph.toposort()
        try:
            # the whole constant subgraph in one ONNX Runtime session: Swin-T's first pass takes 0.5 s so, 12 s
            # with graphsurgeon's "basic" partitioning (one session per output), which also folds less
            with gs.logger.G_LOGGER.suppress(gs.logger.G_LOGGER.ERROR):  # a failure is reported in the detail
                graph.fold_constants(partitioning=None, error_ok=False)
        except Exception as exc:
            # Some node cannot be evaluated: fold around it, peeling failing nodes off each output's subgraph
            # ("basic" partitioning retries a failing partition unchanged, forever, in graphsurgeon 0.6). What
            # graphsurgeon folded in place before the failure (shape subgraphs, Casts of constants) is exact.
            notes.append(f"pass {passes + 1} partitioned ({one_line(exc, 120)})")
            try:
                with gs.logger.G_LOGGER.suppress():  # one warning per failing node; the detail says it once
                    graph.fold_constants(partitioning="recursive")
            except Exception as inner:  # RecursionError included: graphsurgeon's partitioning recurses
                notes.append(f"stopped: {one_line(inner, 120)}")
                graph.cleanup()
                passes += 1
                break
        graph.cleanup()
        passes += 1
        if len(graph.nodes) == count:
            break
        inferred = _infer_shapes(graph)
        if inferred is None:
            break
        graph = inferred
    removed = before - Counter(n.op for n in graph.nodes)
    folded = ", ".join(f"{op} {n}" for op, n in removed.most_common()) or "nothing"
    return graph, f"folded: {folded} ({passes} pass{'es' if passes > 1 else ''})" + "".join(f"; {n}" for n in notes)


@PASSES.decorator("simplify_reshape")
def simplify_reshape(graph):
    """Replace shape arithmetic on a Reshape's own input by ``0`` entries (copy the input's dimension).

    Hand-written because neither onnx-graphsurgeon's folding nor Polygraphy's sanitize does it: with a dynamic
    batch, ``Concat(Slice(Shape(x), 0, 2), [-1])`` is not a constant, but ``Reshape(x, [0, 0, -1])`` (with
    ``allowzero=0``) means exactly the same, and TensorRT then needs no shape tensors for it.
    """
    import onnx_graphsurgeon as gs

    changed = 0
    for node in graph.nodes:
        if node.op != "Reshape" or node.attrs.get("allowzero", 0) or len(node.inputs) < 2:
            continue
        data, shape = node.inputs[0], node.inputs[1]
        if isinstance(shape, gs.Constant) or not shape.inputs or data.shape is None:
            continue
        concat = shape.inputs[0]
        if concat.op != "Concat" or concat.attrs.get("axis") not in (0, -1):
            continue
        values = _copy_shape(concat.inputs, data, len(data.shape))
        if values is None or values.count(-1) > 1:
            continue
        node.inputs[1] = gs.Constant(f"{node.name or 'reshape'}_shape_{changed}", np.array(values, np.int64))
        changed += 1
    graph.cleanup()
    return graph, f"constant shape for {changed} Reshape(s)"


def _copy_shape(parts, data, rank: int) -> list[int] | None:
    """The target shape with copied dimensions as 0, or None when some part is not understood."""
    import onnx_graphsurgeon as gs

    values: list[int] = []
    for part in parts:
        if isinstance(part, gs.Constant):
            array = np.asarray(part.values).reshape(-1)
            if array.dtype.kind != "i":
                return None
            values.extend(int(v) for v in array)  # a constant 0 already means "copy" here
            continue
        span = _shape_span(part, data, rank)
        # dimension i of the input may only be copied into position i of the output
        if span is None or span[0] != len(values):
            return None
        values.extend([0] * (span[1] - span[0]))
    return values


def _shape_span(tensor, data, rank: int) -> tuple[int, int] | None:
    """(start, end) when ``tensor`` is ``Shape(data)[start:end]`` (via Shape, Slice or Unsqueeze(Gather))."""
    import onnx_graphsurgeon as gs

    if not tensor.inputs:
        return None
    producer = tensor.inputs[0]

    def ints(t):
        return [int(v) for v in np.asarray(t.values).reshape(-1)] if isinstance(t, gs.Constant) else None

    def clip(index):
        return min(max(index + rank if index < 0 else index, 0), rank)

    if producer.op == "Shape" and producer.inputs[0] is data:
        start, end = clip(producer.attrs.get("start", 0)), clip(producer.attrs.get("end", rank))
        return (start, end) if end > start else None
    if producer.op == "Slice":
        full = _shape_span(producer.inputs[0], data, rank)
        starts, ends = ints(producer.inputs[1]), ints(producer.inputs[2])
        axes = ints(producer.inputs[3]) if len(producer.inputs) > 3 else [0]
        steps = ints(producer.inputs[4]) if len(producer.inputs) > 4 else [1]
        if full != (0, rank) or not starts or not ends or axes not in ([0], [-1]) or steps != [1]:
            return None
        start, end = clip(starts[0]), clip(ends[0])
        return (start, end) if end > start else None
    if producer.op == "Unsqueeze":
        axes = ints(producer.inputs[1]) if len(producer.inputs) > 1 else producer.attrs.get("axes")
        gather = producer.inputs[0].inputs[0] if producer.inputs[0].inputs else None
        if list(axes or []) != [0] or gather is None or gather.op != "Gather" or gather.attrs.get("axis", 0) != 0:
            return None
        index = ints(gather.inputs[1])
        if _shape_span(gather.inputs[0], data, rank) != (0, rank) or index is None or len(index) != 1 \
                or np.asarray(gather.inputs[1].values).ndim != 0:
            return None
        start = clip(index[0])
        return (start, start + 1) if start < rank else None
    return None


@PASSES.decorator("remove_identity")
def remove_identity(graph):
    """Remove nodes that pass their input through: Identity, inference Dropout, no-op Cast and Reshape."""
    removed = Counter()
    for node in list(graph.nodes):
        if _is_passthrough(node) and _bypass(graph, node):
            removed[node.op] += 1
    graph.cleanup()
    return graph, "removed: " + (", ".join(f"{op} {n}" for op, n in removed.most_common()) or "nothing")


def _is_passthrough(node) -> bool:
    import onnx_graphsurgeon as gs

    if not node.inputs or not node.outputs:
        return False
    if node.op == "Identity":
        return True
    if node.op == "Dropout":
        # an inference Dropout copies its input; keep it when the mask is used or training_mode may be true
        mask_used = len(node.outputs) > 1 and bool(node.outputs[1].outputs)
        training = node.inputs[2] if len(node.inputs) > 2 else None
        training_off = training is None or training.name == "" or (
            isinstance(training, gs.Constant) and not bool(np.asarray(training.values).any()))
        return not mask_used and training_off
    if node.op == "Cast":
        return _same_dtype(node.inputs[0].dtype, node.attrs.get("to"))
    if node.op == "Reshape":
        return _noop_reshape(node)
    return False


def _same_dtype(dtype, to) -> bool:
    if dtype is None or to is None:
        return False
    try:
        source = dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        target = to if isinstance(to, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(to))
    except (TypeError, KeyError, ValueError):
        return False
    return int(source) == int(target)


def _noop_reshape(node) -> bool:
    import onnx_graphsurgeon as gs

    data, shape = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(shape, gs.Constant) or data.shape is None:
        return False
    dims = list(data.shape)
    if not all(isinstance(d, (int, np.integer)) for d in dims):
        return False
    target = [int(v) for v in np.asarray(shape.values).reshape(-1)]
    if len(target) != len(dims):
        return False
    allow_zero = bool(node.attrs.get("allowzero", 0))
    resolved = [dims[i] if (t == 0 and not allow_zero) else t for i, t in enumerate(target)]
    if resolved.count(-1) == 1:
        known = int(np.prod([d for d in resolved if d != -1]))
        total = int(np.prod(dims))
        if known == 0 or total % known:
            return False
        resolved[resolved.index(-1)] = total // known
    return resolved == [int(d) for d in dims]


def _bypass(graph, node) -> bool:
    """Wire the node's consumers to its input; returns False when the node must stay."""
    import onnx_graphsurgeon as gs

    source, result = node.inputs[0], node.outputs[0]
    if result in graph.outputs:
        # A graph output keeps its name: let the input's producer write the output tensor directly. Not
        # possible when the input is a graph input, a constant, or itself an output.
        if (isinstance(source, gs.Constant) or source in graph.inputs or source in graph.outputs
                or not source.inputs):
            return False
        for consumer in list(source.outputs):
            if consumer is not node:
                _replace_input(consumer, source, result)
        producer = source.inputs[0]
        producer.outputs[producer.outputs.index(source)] = result
        node.inputs.clear()
        node.outputs.clear()
        if result.dtype is None:
            result.dtype = source.dtype
        if result.shape is None:
            result.shape = source.shape
        return True
    for consumer in list(result.outputs):
        _replace_input(consumer, result, source)
    node.inputs.clear()
    node.outputs.clear()
    return True


def _replace_input(node, old, new) -> None:
    for index, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[index] = new


@PASSES.decorator("merge_transposes")
def merge_transposes(graph):
    """A Transpose of a Transpose becomes one Transpose of the first one's input (permutations composed); a
    Transpose whose permutation is the identity is removed. Exact: both only move data."""
    merged, removed = 0, 0
    for node in graph.nodes:  # in topological order, so a chain of three composes into one
        if node.op != "Transpose" or not node.inputs:
            continue
        source = node.inputs[0]
        first = source.inputs[0] if source.inputs else None
        if first is None or first.op != "Transpose" or not first.inputs:
            continue
        outer, inner = _perm(node, source), _perm(first, first.inputs[0])
        if outer is None or inner is None or len(outer) != len(inner):
            continue
        node.inputs[0] = first.inputs[0]
        node.attrs["perm"] = [inner[axis] for axis in outer]  # output axis i is input axis inner[outer[i]]
        merged += 1
    for node in list(graph.nodes):
        perm = _perm(node, node.inputs[0]) if node.op == "Transpose" and node.inputs else None
        if perm is not None and perm == list(range(len(perm))) and _bypass(graph, node):
            removed += 1
    graph.cleanup()
    return graph, f"merged {merged} Transpose pair(s), removed {removed} identity Transpose(s)"


def _perm(node, data) -> list[int] | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return [int(p) for p in perm]
    # no perm: the axes reversed, which needs the rank
    return list(range(len(data.shape)))[::-1] if getattr(data, "shape", None) is not None else None


@PASSES.decorator("onnxslim")
def slim(graph):
    """onnxslim's optimiser (``onnxslim.slim``): pattern fusions, common subexpressions, dead nodes.

    Called rather than rewritten: onnxslim is maintained, and it does jobs the passes above leave alone, which
    matter most on files from other tools (BatchNormalization kept as its own node after each Conv:
    a TorchScript ResNet-18 exported without constant folding has 69 nodes after the passes above and after
    Polygraphy's sanitize, 49 after onnxslim). Its result is checked like every pass's, by the parity check of
    :func:`clean_onnx`. Nodes onnxslim rebuilds are named after their output tensor; they get back the name of
    the node they replace, so that module scopes (node names, or the metadata copied back by name) survive.
    Skipped, with the reason in the detail, when onnxslim is not installed, the model is over protobuf's 2 GiB,
    onnxslim fails on it, or its result is not a valid graph with the same inputs and outputs (the passes before
    it have done their part).
    """
    import onnx_graphsurgeon as gs

    try:
        import onnxslim
    except ImportError:
        return graph, "skipped: onnxslim is not installed (pip install onnxslim)"
    model = gs.export_onnx(graph, do_type_check=False)
    if model.ByteSize() > onnx_io.PROTOBUF_LIMIT:
        return graph, "skipped: the model is over protobuf's 2 GiB, onnxslim cannot hold it in memory"
    before = Counter(n.op_type for n in model.graph.node)
    names = {n.name for n in model.graph.node}
    producers = {o: n.name for n in model.graph.node for o in n.output if o}
    io = ([v.name for v in model.graph.input], [v.name for v in model.graph.output])
    try:
        slimmed = onnxslim.slim(model)
        if slimmed is None:
            raise RuntimeError("onnxslim returned no model")
    except Exception as exc:  # anything onnxslim cannot handle: keep the graph as the passes before left it
        return graph, f"skipped: onnxslim failed ({one_line(exc, 160)})"
    # onnxslim 0.1.98 can break a graph (it drops a Dropout whose mask is still read): keep its result only when
    # it is a valid graph with the same inputs and outputs; the numbers are checked by clean_onnx's parity
    try:
        onnx_io.check_model(slimmed)
    except Exception as exc:
        return graph, f"skipped: onnxslim's result fails onnx.checker ({one_line(exc, 160)})"
    if ([v.name for v in slimmed.graph.input], [v.name for v in slimmed.graph.output]) != io:
        return graph, "skipped: onnxslim changed the graph's inputs or outputs"
    _restore_names(slimmed, names, producers)
    result = gs.import_onnx(slimmed)
    after = Counter(n.op_type for n in slimmed.graph.node)
    removed = ", ".join(f"{op} {n}" for op, n in (before - after).most_common()) or "nothing"
    added = ", ".join(f"{op} {n}" for op, n in (after - before).most_common())
    return result, f"removed: {removed}" + (f"; added: {added}" if added else "")


def _restore_names(model: onnx.ModelProto, names: set[str], producers: dict[str, str]) -> None:
    """A node onnxslim made in place of another is named after that node's output tensor: give it the old
    node's name back when that name is free."""
    taken = {n.name for n in model.graph.node}
    for node in model.graph.node:
        if node.name in names:
            continue
        old = producers.get(node.name)
        if old is not None and old not in taken:
            taken.discard(node.name)
            node.name = old
            taken.add(old)


@PASSES.decorator("dedup_initializers")
def dedup_initializers(graph):
    """Make identical initializers (same dtype, shape and bytes) one tensor used by all their consumers."""
    import onnx_graphsurgeon as gs

    keep: dict[tuple, object] = {}
    merged = saved = 0
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    for tensor in constants:
        values = np.asarray(tensor.values)  # not ascontiguousarray: it makes a 0-d scalar 1-d, merging 7 with [7]
        key = (str(values.dtype), values.shape, hashlib.sha256(values.tobytes()).digest())
        first = keep.setdefault(key, tensor)
        if first is tensor or tensor in graph.outputs:
            continue
        for consumer in list(tensor.outputs):
            _replace_input(consumer, tensor, first)
        merged += 1
        saved += values.nbytes
    graph.cleanup()
    return graph, f"merged {merged} duplicate initializer(s) ({saved} bytes) into their first copy"


@PASSES.decorator("cleanup")
def cleanup(graph):
    """Remove nodes and tensors that no graph output depends on (graph inputs are kept)."""
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False)
    return graph, f"removed {before - len(graph.nodes)} dead node(s)"


@PASSES.decorator("toposort")
def toposort(graph):
    """Sort nodes topologically (TensorRT's parser and ORT both require it)."""
    graph.toposort()
    return graph, "nodes sorted"
