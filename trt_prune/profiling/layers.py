"""Per-layer profiles: parse what a backend reports and map each layer back to ONNX nodes and PyTorch modules.

Pure functions over plain data (event dicts, node lists, names); the backends feed them and nothing here
runs a model.

How ONNX Runtime names what it runs (seen on ``DemoDetector`` and small conv models exported with the
TorchScript exporter, ONNX Runtime 1.32, CPU provider):

* ``ORT_DISABLE_ALL``: one profiled node per ONNX node, same name.
* ``ORT_ENABLE_EXTENDED``: Conv+Relu becomes ``FusedConv`` under the Conv's name (``/c1/Conv``); Gemm+Relu
  becomes ``FusedGemm`` named ``"fused " + gemm name``; x*sigmoid(x) (SiLU) becomes ``QuickGelu`` named
  ``<Mul node>/QuickGeluFusion/``. The absorbed nodes (Relu, Sigmoid) disappear.
* ``ORT_ENABLE_ALL`` adds the NCHWc layout transformer: each converted node is named
  ``<its output tensor>_nchwc`` (``/backbone/stem/conv/Conv_output_0_nchwc``), where the output tensor is
  that of the last node already fused into it (``/r1/Relu_output_0_nchwc`` for a Conv+Relu), and the
  NCHWc Conv also absorbs a following Add (residual) and activation. Layout changes appear as new nodes
  ``ReorderInput``/``ReorderOutput`` (with ``_token_<n>`` when the name is taken) that map to no ONNX node.

The mapping rule (:func:`resolve_ort_anchor`, :func:`attribute_nodes`):

1. Each ORT name resolves to one *anchor* ONNX node: strip ``"fused "`` and ``_token_<n>``; an exact node
   name wins; ``<tensor>_nchwc`` resolves to the tensor's producer; ``<node>/<Name>Fusion/`` to ``<node>``;
   failing that, the longest node name that is a ``/``-bounded prefix. No anchor: the layer keeps its ORT
   name; a layout conversion (``ReorderInput``/``ReorderOutput``) takes the module of the layer it converts
   for (the next, resp. previous, layer in execution order), anything else stays with module None.
2. ONNX nodes no ORT layer is anchored on were either removed (Constant, Identity, Dropout, constant folding) or
   fused. A fused node joins the layer of a neighbour it shares an exclusive edge with: first its producer (the
   producer's output feeds only this node: activations and residual Adds fuse into the op before them; never a Conv,
   Gemm or MatMul, which no backend fuses into the layer before), else its consumer (its output feeds only that
   node: the Sigmoid of a SiLU joins the Mul's QuickGelu; a Conv joins the Relu whose output names an NCHWc conv).
   This repeats until nothing changes, so chains (Conv -> Add -> Relu) follow. Nodes that attach nowhere are
   reported unattributed.
3. A layer's module is that of its heaviest member (Conv, Gemm, MatMul... before element-wise ops), so a
   Conv+SiLU layer counts for the conv module. ONNX nodes whose metadata names no module (made by an
   exporter's optimiser) take the deepest common module of their neighbours (:func:`fill_from_neighbours`).
   In a graph where no node names a module (files from other converters: nodes named ``Conv_0``, no scopes,
   no metadata) each node stands for itself: its module is its own name.

Unnamed nodes (allowed by ONNX, written by some converters) get the name ONNX Runtime gives them,
``<op type>_<index>``, the index counting the nodes ORT keeps (``Constant`` nodes become initializers and do
not count; seen with ONNX Runtime 1.32): :func:`ort_node_names`.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trt_prune.backends.base import LayerTime
from trt_prune.errors import ProfileError

# Ops that never do the work of a layer: a node of these that ORT does not run was removed, not fused.
PASSIVE_OPS = frozenset({"Constant", "Identity", "Dropout", "ConstantOfShape"})
# Ops whose output depends on shapes only; with static shapes ORT folds them and their constant followers.
SHAPE_OPS = frozenset({"Shape", "Size"})
# When a layer holds several ONNX nodes, its module is that of the first member of the highest rank here.
HEAVY_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv",
             "QLinearMatMul", "Attention", "LSTM", "GRU", "RNN", "Einsum")

_TOKEN_SUFFIX = re.compile(r"_token_\d+$")
_FUSION_SUFFIX = re.compile(r"^(?P<anchor>.+)/[A-Za-z0-9]+Fusion/?$")
_KERNEL_SUFFIX = "_kernel_time"
_NCHWC_SUFFIX = "_nchwc"


@dataclass(frozen=True)
class GraphNode:
    """One ONNX node, reduced to what mapping needs."""

    name: str
    op: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


@dataclass
class Graph:
    """The main graph of an ONNX model: nodes in topological order plus graph inputs and outputs."""

    nodes: list[GraphNode]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    @classmethod
    def from_onnx(cls, model: Any) -> Graph:
        """Build from an ``onnx.ModelProto`` (no I/O, no onnx import needed); unnamed nodes get the names ONNX
        Runtime gives them (:func:`ort_node_names`)."""
        g = model.graph
        names = ort_node_names(g.node)
        nodes = [GraphNode(name, n.op_type, tuple(n.input), tuple(n.output)) for name, n in zip(names, g.node,
                                                                                                strict=True)]
        return cls(nodes, tuple(v.name for v in g.input), tuple(v.name for v in g.output))

    def node_names(self) -> set[str]:
        return {n.name for n in self.nodes}

    def producers(self) -> dict[str, str]:
        """tensor name -> name of the node that writes it."""
        return {t: n.name for n in self.nodes for t in n.outputs if t}

    def consumers(self) -> dict[str, list[str]]:
        """tensor name -> names of the nodes that read it (one entry per reading node)."""
        out: dict[str, list[str]] = {}
        for n in self.nodes:
            for t in dict.fromkeys(t for t in n.inputs if t):
                out.setdefault(t, []).append(n.name)
        return out


def ort_node_names(nodes: Sequence[Any]) -> list[str]:
    """The name of each ONNX node (``onnx.NodeProto`` or anything with ``name`` and ``op_type``) as ONNX Runtime
    reports it: its own, or for an unnamed node ``<op type>_<index>``, where the index counts the nodes before
    it that are not ``Constant`` (ORT turns those into initializers before it names nodes)."""
    names, index = [], 0
    for node in nodes:
        names.append(node.name or f"{node.op_type}_{index}")
        if node.op_type != "Constant":
            index += 1
    return names


# --------------------------------------------------------------------------------------------------------
# ONNX Runtime's Chrome-trace profile


@dataclass
class OrtNodeTime:
    """One ORT node's mean kernel time per kept run, in ms."""

    name: str
    op: str
    provider: str | None
    ms: float


@dataclass
class OrtProfile:
    """Parsed ORT profile: node times (execution order) and each kept run's ``model_run`` duration."""

    nodes: list[OrtNodeTime]
    runs: int
    run_ms: list[float] = field(default_factory=list)

    @property
    def run_mean_ms(self) -> float | None:
        return sum(self.run_ms) / len(self.run_ms) if self.run_ms else None

    @property
    def node_sum_ms(self) -> float:
        return sum(n.ms for n in self.nodes)


def parse_ort_profile(events: Sequence[Mapping[str, Any]], skip_runs: int = 0) -> OrtProfile:
    """Parse ONNX Runtime's profile JSON (a list of Chrome-trace events) into per-node mean times.

    Node events have ``cat == "Node"``, a name ``<node>_kernel_time``, ``dur`` in microseconds and
    ``args.op_name``/``args.provider``. Each ``model_run`` session event delimits one inference; node events
    are assigned to the run whose time window holds them, the first ``skip_runs`` runs are dropped
    (warm-up: first-run allocations), and each node's total is divided by the number of kept runs, so a
    node is averaged per inference. Without ``model_run`` events the run count is the largest number of
    times any node ran.
    """
    if skip_runs < 0:
        raise ProfileError(f"skip_runs must be >= 0, got {skip_runs}")
    runs = sorted((float(e["ts"]), float(e.get("dur", 0.0))) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    kernel_events = [e for e in events
                     if e.get("cat") == "Node" and str(e.get("name", "")).endswith(_KERNEL_SUFFIX)]
    if not kernel_events:
        raise ProfileError("the ONNX Runtime profile holds no node kernel events (cat 'Node', names ending "
                           "'_kernel_time'); was the session created with enable_profiling=True and run?")
    starts = [r[0] for r in runs]

    def run_index(ts: float) -> int | None:
        i = bisect.bisect_right(starts, ts) - 1
        if i < 0 or ts > runs[i][0] + runs[i][1]:
            return None
        return i

    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    info: dict[str, tuple[str, str | None]] = {}
    first_seen: dict[str, float] = {}
    for e in kernel_events:
        ts = float(e.get("ts", 0.0))
        if runs:
            i = run_index(ts)
            if i is None or i < skip_runs:
                continue
        name = str(e["name"])[: -len(_KERNEL_SUFFIX)]
        args = e.get("args") or {}
        totals[name] = totals.get(name, 0.0) + float(e.get("dur", 0.0))
        counts[name] = counts.get(name, 0) + 1
        info.setdefault(name, (str(args.get("op_name", "?")), args.get("provider")))
        first_seen.setdefault(name, ts)
    if runs:
        kept = len(runs) - skip_runs
        if kept < 1:
            raise ProfileError(f"the profile holds {len(runs)} runs and skip_runs={skip_runs} drops them all; "
                               f"run more inferences while profiling")
        run_ms = [d / 1000.0 for _, d in runs[skip_runs:]]
    else:
        kept = max(counts.values())
        if skip_runs:
            raise ProfileError("the profile has no 'model_run' events, so runs cannot be skipped; "
                               "pass skip_runs=0")
        run_ms = []
    order = sorted(totals, key=lambda n: first_seen[n])
    nodes = [OrtNodeTime(n, info[n][0], info[n][1], totals[n] / kept / 1000.0) for n in order]
    return OrtProfile(nodes, kept, run_ms)


def resolve_ort_anchor(ort_name: str, node_names: set[str], producers: Mapping[str, str]) -> str | None:
    """The ONNX node an ONNX Runtime node name stands for, or None (see the module docstring, rule 1)."""
    name = ort_name
    if name.endswith(_KERNEL_SUFFIX):
        name = name[: -len(_KERNEL_SUFFIX)]
    seen: set[str] = set()
    while name and name not in seen:
        seen.add(name)
        if name in node_names:
            return name
        if name.startswith("fused "):  # Gemm+activation: "fused " + the Gemm's name
            name = name[len("fused "):]
            continue
        stripped = _TOKEN_SUFFIX.sub("", name)
        if stripped != name:
            name = stripped
            continue
        if name.endswith(_NCHWC_SUFFIX):
            tensor = name[: -len(_NCHWC_SUFFIX)]
            if tensor in producers:
                return producers[tensor]
            name = tensor
            continue
        m = _FUSION_SUFFIX.match(name)
        if m:
            name = m.group("anchor")
            continue
        break
    # Last resort for fusions named "<node>/<anything>": the longest node name that is a /-bounded prefix.
    best = None
    for i, ch in enumerate(ort_name):
        if ch == "/" and i > 0 and ort_name[:i] in node_names:
            best = ort_name[:i]
    return best


@dataclass
class NodeAttribution:
    """Which ONNX nodes each backend layer covers, and which nodes no layer covers."""

    members: dict[str, list[str]]  # layer name -> ONNX node names in topological order
    removed: list[str]  # passive or constant-folded nodes that no layer runs
    unattributed: list[str]  # nodes that did work before optimisation but could not be placed


def foldable_nodes(graph: Graph) -> set[str]:
    """Nodes whose outputs depend on constants and tensor shapes only (a static-shape backend folds them)."""
    produced = graph.producers()
    graph_inputs = set(graph.inputs)
    folded: set[str] = set()
    folded_tensors: set[str] = set()
    for n in graph.nodes:
        ins = [t for t in n.inputs if t]
        const_in = all((t not in produced and t not in graph_inputs) or t in folded_tensors for t in ins)
        if n.op == "Constant" or n.op in SHAPE_OPS or const_in:
            folded.add(n.name)
            folded_tensors.update(t for t in n.outputs if t)
    return folded


def attribute_nodes(anchors: Mapping[str, str | None], graph: Graph) -> NodeAttribution:
    """Place every ONNX node in the backend layer that runs it (module docstring, rule 2).

    ``anchors`` maps each backend layer name to its anchor ONNX node (or None).
    """
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    by_name = {n.name: n for n in graph.nodes}
    group: dict[str, str] = {}
    for layer, anchor in anchors.items():
        if anchor is not None and anchor in by_name:
            group.setdefault(anchor, layer)
    producers = graph.producers()
    consumers = graph.consumers()
    graph_outputs = set(graph.outputs)
    folded = foldable_nodes(graph)
    removed = [n.name for n in graph.nodes
               if n.name not in group and (n.op in PASSIVE_OPS or n.name in folded)]
    removed_set = set(removed)
    pending = [n for n in graph.nodes if n.name not in group and n.name not in removed_set]

    def from_producer(node: GraphNode) -> str | None:
        if node.op in HEAVY_OPS:  # a backend fuses followers (activations, adds) into a conv, never a conv
            return None
        for t in node.inputs:
            p = producers.get(t)
            if p in group and consumers.get(t) == [node.name] and t not in graph_outputs:
                return group[p]
        return None

    def from_consumer(node: GraphNode) -> str | None:
        for t in node.outputs:
            users = consumers.get(t, [])
            if len(users) == 1 and users[0] in group and t not in graph_outputs:
                return group[users[0]]
        return None

    changed = True
    while changed and pending:
        changed = False
        for node in pending:  # topological order, so producer chains resolve in one pass
            layer = from_producer(node)
            if layer is not None:
                group[node.name] = layer
                changed = True
        pending = [n for n in pending if n.name not in group]
        if changed:
            continue
        for node in reversed(pending):
            layer = from_consumer(node)
            if layer is not None:
                group[node.name] = layer
                changed = True
                break  # one consumer attachment, then producers again: they take precedence
        pending = [n for n in pending if n.name not in group]

    members: dict[str, list[str]] = {layer: [] for layer in anchors}
    for node_name in sorted(group, key=index.__getitem__):
        members[group[node_name]].append(node_name)
    return NodeAttribution(members, removed, [n.name for n in pending])


def layer_module(members: Sequence[str], ops: Mapping[str, str],
                 module_map: Mapping[str, str | None]) -> str | None:
    """Module of a layer made of ``members`` (ONNX node names): that of its heaviest member (rule 3)."""
    rank = {op: i for i, op in enumerate(HEAVY_OPS)}
    ordered = sorted(members, key=lambda m: rank.get(ops.get(m, ""), len(rank)))  # stable: keeps topo order
    for m in ordered:
        module = module_map.get(m)
        if module is not None:
            return module
    return None


def ort_layer_times(profile: OrtProfile, graph: Graph,
                    module_map: Mapping[str, str | None]) -> tuple[list[LayerTime], NodeAttribution]:
    """Turn a parsed ORT profile into :class:`LayerTime` rows (execution order) plus the attribution."""
    node_names = graph.node_names()
    producers = graph.producers()
    anchors = {n.name: resolve_ort_anchor(n.name, node_names, producers) for n in profile.nodes}
    attribution = attribute_nodes(anchors, graph)
    ops = {n.name: n.op for n in graph.nodes}
    rows = []
    for n in profile.nodes:
        members = attribution.members.get(n.name, [])
        rows.append(LayerTime(n.name, n.op, n.ms, layer_module(members, ops, module_map), list(members)))
    _attribute_layout_changes(rows)
    return rows, attribution


_LAYOUT_OPS = ("ReorderInput", "ReorderOutput")


def _attribute_layout_changes(rows: list[LayerTime]) -> None:
    """Layout conversions ONNX Runtime inserts (``ReorderInput`` / ``ReorderOutput``) map to no ONNX node;
    they exist for one layer: a ``ReorderInput`` converts the input of the next layer that runs, a
    ``ReorderOutput`` the output of the previous one. Rows are in execution order; each takes that layer's
    module (and keeps no ONNX members). Other nodes ORT makes itself and names after their op (``Reshape``,
    ``Reshape_token_12``: the NCHWc transformer reshapes the blocked inputs and output of a broadcasting Add)
    serve the next layer that runs, like a ``ReorderInput``."""
    for i, row in enumerate(rows):
        if row.module is not None or row.members:
            continue
        if row.op in _LAYOUT_OPS or _TOKEN_SUFFIX.sub("", row.name) == row.op:
            span = range(i - 1, -1, -1) if row.op == "ReorderOutput" else range(i + 1, len(rows))
            owner = next((rows[j] for j in span if rows[j].members and rows[j].module is not None), None)
            if owner is not None:
                row.module = owner.module


# --------------------------------------------------------------------------------------------------------
# TensorRT layer names

_ONNX_LAYER = re.compile(r"\[ONNX Layer: (.*?)\]")
_FOREIGN = re.compile(r"ForeignNode\[(.+?)\.\.\.(.+?)\]")


def onnx_nodes_from_metadata(metadata: str | None) -> list[str]:
    """ONNX node names in an engine-inspector ``Metadata`` string.

    TensorRT writes one ``[ONNX Layer: <name>]`` per fused ONNX node, separated by the ASCII record
    separator ``\\x1e`` (seen in NVIDIA/TensorRT issue #4020's engine-inspector output).
    """
    return _ONNX_LAYER.findall(metadata or "")


def trt_layer_members(layer_name: str, metadata_nodes: Sequence[str], node_names: set[str]) -> list[str]:
    """ONNX nodes an engine layer covers: from the inspector's metadata when present, else from the layer
    name, which TensorRT builds by joining fused node names with ``" + "`` (``"Conv_6 + Relu_7"``), wrapping
    point-wise fusions as ``PWN(a, b)`` and Myelin regions as ``{ForeignNode[first...last]}`` (of those only
    the two named ends are known). Layers TensorRT inserts (``Reformatting CopyNode ...``) cover none."""
    if metadata_nodes:
        return [n for n in dict.fromkeys(metadata_nodes) if n in node_names] or list(dict.fromkeys(metadata_nodes))
    if layer_name.startswith("Reformatting CopyNode") or layer_name.startswith("Reformat"):
        return []
    if layer_name in node_names:
        return [layer_name]
    found: list[str] = []
    for m in _FOREIGN.finditer(layer_name):
        found.extend(x for x in (m.group(1), m.group(2)) if x in node_names)
    rest = _FOREIGN.sub(" ", layer_name)
    for token in re.split(r" \+ |, |PWN\(|\)|\{|\}", rest):
        token = token.strip()
        if token in node_names:
            found.append(token)
    return list(dict.fromkeys(found))


# --------------------------------------------------------------------------------------------------------
# ONNX node -> PyTorch module


def module_path_from_node_name(name: str, known_modules: Iterable[str] | None = None) -> str | None:
    """PyTorch module path from a TorchScript-exporter node name, or None when the name carries none.

    ``/backbone/stage1/stage1.0/conv/Conv`` -> ``backbone.stage1.0.conv``: the scopes are attribute names,
    and a container child repeats its parent's name (``stage1.0`` under ``stage1``), so that prefix is
    dropped. Top-level nodes (``/Concat_3``) give ``""``, the root module. A module called more than once
    gets ``_<n>`` scopes (``pool_1``); with ``known_modules`` (``dict(model.named_modules())``) such a suffix
    is removed when only the stripped path exists. This is the fallback; ``trt_prune.onnx_io.node_module``
    knows more exporters.
    """
    if not name.startswith("/"):
        return None
    scopes = name.strip("/").split("/")[:-1]
    known = set(known_modules) if known_modules is not None else None
    path: list[str] = []
    prev = ""
    for scope in scopes:
        part = scope[len(prev) + 1:] if prev and scope.startswith(prev + ".") else scope
        candidate = ".".join(path + [part])
        if known is not None and candidate not in known:
            base = re.sub(r"_\d+$", "", part)
            if ".".join(path + [base]) in known:
                part = base
        path.append(part)
        prev = scope
    return ".".join(path)


def default_node_module() -> Callable[[Any], str | None]:
    """The project's ONNX-node-to-module function when it exists, else the name-based fallback."""
    try:
        from trt_prune.onnx_io import node_module  # type: ignore[attr-defined]
    except ImportError:
        return lambda node: module_path_from_node_name(node.name)
    return node_module


def build_module_map(model: Any, node_module: Callable[[Any], str | None] | None = None) -> dict[str, str | None]:
    """ONNX node name -> PyTorch module path for every node of ``model`` (an ``onnx.ModelProto``).

    ``node_module`` takes an ONNX node and returns its module path or None; by default
    :func:`default_node_module`. Unnamed nodes are keyed by the name ONNX Runtime gives them
    (:func:`ort_node_names`). When no node names a module at all (a file from another converter: ``Conv_0``,
    no scopes), every node maps to its own name, so that each profiled layer still says where it ran.
    """
    resolve = node_module or default_node_module()
    nodes = model.graph.node
    names = ort_node_names(nodes)
    mapping = {name: resolve(n) for name, n in zip(names, nodes, strict=True)}
    if not any(module is not None for module in mapping.values()):
        return {name: name for name in names}
    return fill_from_neighbours(mapping, nodes, names)


def fill_from_neighbours(mapping: dict[str, str | None], nodes: Sequence[Any],
                         names: Sequence[str] | None = None) -> dict[str, str | None]:
    """Give a node that names no module the deepest module around all its mapped neighbours.

    Exporters' graph optimisers create nodes without the metadata that names their module (the dynamo
    exporter's optimiser turns a ``chunk`` into a ``Split`` with no scope). The module that ran such a node
    called both its producer's module and its consumers' modules, so it is their deepest common ancestor: the
    ``Split`` of ``backbone.stage1.1.cv1``'s output feeding ``backbone.stage1.1.m.0`` and the block's ``Concat``
    lands in ``backbone.stage1.1``. Repeats until nothing changes (chains of unnamed nodes); passive ops
    (Constant, Identity…) are left alone. ``names`` are the nodes' keys in ``mapping`` when they are not the
    nodes' own names (unnamed nodes: :func:`ort_node_names`).
    """
    keys = list(names) if names is not None else [n.name for n in nodes]
    producer: dict[str, str] = {}
    users: dict[str, list[str]] = {}
    for key, n in zip(keys, nodes, strict=True):
        for t in n.output:
            producer[t] = key
        for t in n.input:
            users.setdefault(t, []).append(key)
    out = dict(mapping)
    changed = True
    while changed:
        changed = False
        for key, n in zip(keys, nodes, strict=True):
            if out.get(key) is not None or n.op_type in PASSIVE_OPS:
                continue
            around = [producer.get(t) for t in n.input] + [u for t in n.output for u in users.get(t, [])]
            modules = [out[m] for m in around if m is not None and out.get(m) is not None]
            if modules:
                out[key] = _common_ancestor(modules)
                changed = True
    return out


def _common_ancestor(paths: Sequence[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)
