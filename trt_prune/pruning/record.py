"""Record a model's ATen ops in one forward pass, as a light graph with the metadata the channel rules read.

Why not ``torch.export`` alone: export runs every op through fake tensors and proxies and builds a verified
program; on a 2-core CPU that is 0.3 s for ResNet-50 and 0.4 s for a RetinaNet core before any channel is
looked at, several times the cost of running the model. The channel rules only need the op sequence as export
would show it (the *pre-dispatch* ATen ops: ``conv2d``, ``linear``, ``batch_norm``, ``layer_norm``…, not their
autograd decompositions), the shapes, which parameter each weight is, and which module each op ran in. One
forward pass under a pre-dispatch dispatch mode sees exactly those ops. It runs on meta (shape-only) copies
of the input, parameters and buffers, so no arithmetic is done and the cost does not grow with the input
size; a model whose forward needs values (``.item()``, a data-dependent branch, an op without a meta kernel)
is recorded from a real run instead. The result is a light graph in export's layout (parameter and input
placeholders, ``call_function`` nodes with the op overloads and their arguments, ``getitem`` nodes for
multi-output ops, ``val`` and ``nn_module_stack`` metadata), so the same rules walk either.

The pre-dispatch mode hooks use private torch APIs (the same ones ``make_fx(pre_dispatch=True)`` uses);
:func:`available` says whether this torch has them, and :func:`trace <trt_prune.pruning.graph.trace>` falls back
to ``torch.export`` where it does not.

Differences from export, on purpose: control flow follows the example (a data-dependent branch is recorded
as taken instead of failing to trace).
"""

from __future__ import annotations

import functools
import itertools
import operator
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class Val:
    """What the rules read from ``node.meta['val']``: the shape (and dtype) of a tensor, without holding it."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class Node:
    """The part of :class:`torch.fx.Node` the channel rules read. Building real fx nodes (unique names, arg
    maps) cost more than the rest of the recording on ResNet-50."""

    __slots__ = ("op", "target", "args", "kwargs", "name", "meta")

    def __init__(self, op: str, target, args: tuple = (), kwargs: dict | None = None, name: str = ""):
        self.op, self.target, self.args, self.kwargs = op, target, args, kwargs or {}
        self.name = name or f"{op}_{id(self):x}"
        self.meta: dict = {}

    @property
    def all_input_nodes(self) -> list[Node]:
        found: list[Node] = []
        _collect_nodes(self.args, found)
        _collect_nodes(tuple(self.kwargs.values()), found)
        return list(dict.fromkeys(found))

    def __repr__(self) -> str:
        return self.name


def _collect_nodes(value, found: list[Node]) -> None:
    if isinstance(value, Node):
        found.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect_nodes(v, found)


class Graph:
    """Nodes in execution order (the ``nodes`` attribute is all the walk uses)."""

    def __init__(self):
        self.nodes: list[Node] = []

    def add(self, op: str, target, args: tuple = (), kwargs: dict | None = None, name: str = "") -> Node:
        node = Node(op, target, args, kwargs, name or f"n{len(self.nodes)}")
        self.nodes.append(node)
        return node


@dataclass
class Recording:
    graph: Graph
    param_names: dict[str, str]  # placeholder name -> parameter or buffer name in the model
    user_inputs: set[str]  # placeholder names of the example inputs
    outputs: object  # the model's real outputs on the example


def _mode_class():
    """A dispatch mode that runs at the PreDispatch key (None where this torch lacks the hooks)."""
    try:
        from torch._dispatch.python import enable_python_dispatcher  # noqa: F401
        from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
        from torch.utils._python_dispatch import TorchDispatchMode
        key = torch._C.DispatchKey.PreDispatch
        mode_key = torch._C._TorchDispatchModeKey.PROXY
    except (ImportError, AttributeError):
        return None

    class _Recorder(ProxyTorchDispatchMode):
        # torch only allows its own mode types at PreDispatch; this subclass keeps ProxyTorchDispatchMode's
        # enter/exit but replaces its tracing with a plain callback
        def __init__(self, on_op, meta: bool):
            TorchDispatchMode.__init__(self, key)
            self._mode_key = mode_key
            self.enter_stack = []
            self.on_op = on_op
            self.meta = meta

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if self.meta and func in _SAME_SHAPE:
                out = torch.empty_like(args[0])
            elif self.meta and func in _IN_PLACE:
                out = args[0]
            else:
                out = func(*args, **kwargs)
            self.on_op(func, args, kwargs, out)
            return out

    return _Recorder


# Ops whose output has their first input's shape and dtype. On meta tensors several of them (batch_norm above
# all) run Python decompositions that cost more than the rest of a ResNet-50 trace; the recording makes their
# outputs directly. Only the dense model is traced this way, and it is known to run.
_A = torch.ops.aten
_SAME_SHAPE = {_A.batch_norm.default, _A.layer_norm.default, _A.group_norm.default, _A.relu.default,
               _A.gelu.default, _A.silu.default, _A.sigmoid.default, _A.hardswish.default,
               _A.hardsigmoid.default, _A.dropout.default, _A.relu6.default, _A.hardtanh.default,
               _A.leaky_relu.default, _A.mish.default, _A.elu.default, _A.tanh.default}
_IN_PLACE = {_A.relu_.default, _A.silu_.default, _A.hardswish_.default, _A.hardsigmoid_.default,
             _A.hardtanh_.default, _A.leaky_relu_.default, _A.sigmoid_.default, _A.mish_.default}

_RECORDER = _mode_class()


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether this torch supports the recording: the hooks exist *and* a one-layer model records as
    ``aten.linear`` (a torch whose private dispatch internals changed fails here, and export is used)."""
    if _RECORDER is None:
        return False
    try:
        rec = record(nn.Linear(2, 2), torch.zeros(1, 2), meta=False)
    except Exception:  # any failure of the private hooks means: do not use them
        return False
    ops = [n.target for n in rec.graph.nodes if n.op == "call_function"]
    return ops == [torch.ops.aten.linear.default]


class _Builder:
    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor] | None):
        self.graph = Graph()
        self.param_names: dict[str, str] = {}
        self.user_inputs: set[str] = set()
        self.known: dict[int, tuple[weakref.ref, Node]] = {}
        self.stack: list[tuple[str, str]] = []
        self.paths = {id(m): (name, f"{type(m).__module__}.{type(m).__qualname__}")
                      for name, m in model.named_modules() if name}
        self.named = {}  # id -> (name, tensor) of every parameter and buffer as the forward will see them
        if state is not None:
            for name, t in state.items():
                self.named[id(t)] = (name, t)
        else:
            for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
                self.named.setdefault(id(t), (name, t))
        self.n_const = 0

    # -- tensors to nodes -------------------------------------------------------------------------------
    def _lookup(self, t: torch.Tensor) -> Node | None:
        hit = self.known.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        return None

    def _bind(self, t: torch.Tensor, node: Node) -> None:
        self.known[id(t)] = (weakref.ref(t), node)

    def node_for(self, t: torch.Tensor) -> Node:
        node = self._lookup(t)
        if node is not None:
            return node
        named = self.named.get(id(t))
        if named is not None and named[1] is t:
            node = self.graph.add("placeholder", None, name="p_" + named[0].replace(".", "_"))
            self.param_names[node.name] = named[0]
        else:  # a tensor made outside the recorded ops (a plain attribute, a constant): fixed, like export's
            self.n_const += 1
            node = self.graph.add("placeholder", None, name=f"c_const_{self.n_const}")
        node.meta["val"] = Val(tuple(t.shape), t.dtype)
        self._bind(t, node)
        return node

    def _arg(self, a):
        if isinstance(a, torch.Tensor):
            return self.node_for(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self._arg(x) for x in a) if isinstance(a, list) else tuple(self._arg(x) for x in a)
        return a

    # -- the dispatch callback --------------------------------------------------------------------------
    def on_op(self, func, args, kwargs, out) -> None:
        node = self.graph.add("call_function", func, self._arg(args),
                              {k: self._arg(v) for k, v in kwargs.items()} if kwargs else None)
        if self.stack:
            node.meta["nn_module_stack"] = {path: (path, kind) for path, kind in self.stack}
        if isinstance(out, torch.Tensor):
            node.meta["val"] = Val(tuple(out.shape), out.dtype)
            self._bind(out, node)
        elif isinstance(out, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in out):
            node.meta["val"] = [Val(tuple(o.shape), o.dtype) if isinstance(o, torch.Tensor) else None
                                for o in out]
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    item = self.graph.add("call_function", operator.getitem, (node, i))
                    item.meta["val"] = node.meta["val"][i]
                    item.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
                    self._bind(o, item)

    def pre_hook(self, module, _args):
        entry = self.paths.get(id(module))
        if entry is not None:
            self.stack.append(entry)

    def post_hook(self, module, _args, _out):
        entry = self.paths.get(id(module))
        if entry is not None and self.stack and self.stack[-1] == entry:
            self.stack.pop()


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Shape-only (meta) stand-ins for every parameter and buffer, one per tensor (tied weights stay tied)."""
    state = {}
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        state[name] = torch.empty_like(t, device="meta")
    return state


def run(model: nn.Module, example: torch.Tensor, meta: bool):
    """``model(example)`` in eval mode without grad; on shape-only meta tensors when ``meta`` (no arithmetic:
    the forward costs only its Python overhead, and shape errors are raised as in a real run)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if meta:
                return functional_call(model, _meta_state(model), (example.to("meta"),))
            return model(example)
    finally:
        model.train(was_training)


def record(model: nn.Module, example: torch.Tensor, meta: bool = True) -> Recording:
    """Run ``model(example)`` once (eval mode, no grad) and record its pre-dispatch ATen ops as an fx graph.

    ``meta``: run on meta tensors (shapes only). Models whose forward needs values (data-dependent control
    flow, ``.item()``, ops without a meta kernel) raise there; :func:`trace` then records a real run.
    """
    if _RECORDER is None:
        raise RuntimeError("this torch has no pre-dispatch mode hooks; use torch.export")
    from torch._dispatch.python import enable_python_dispatcher

    state = _meta_state(model) if meta else None
    builder = _Builder(model, state)
    x = example.to("meta") if meta else example
    inp = builder.graph.add("placeholder", None, name="x")
    inp.meta["val"] = Val(tuple(x.shape), x.dtype)
    builder.user_inputs.add(inp.name)
    builder._bind(x, inp)
    was_training = model.training
    model.eval()
    pre = nn.modules.module.register_module_forward_pre_hook(builder.pre_hook)
    post = nn.modules.module.register_module_forward_hook(builder.post_hook, always_call=True)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # attention's fused inference path (_native_multi_head_attention) hides the projections export shows
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), enable_python_dispatcher(), _RECORDER(builder.on_op, meta):
            out = functional_call(model, state, (x,)) if meta else model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        pre.remove()
        post.remove()
        model.train(was_training)
    leaves, _ = pytree.tree_flatten(out)
    result = tuple(builder._lookup(t) for t in leaves if isinstance(t, torch.Tensor))
    builder.graph.add("output", None, (tuple(n for n in result if n is not None),))
    return Recording(builder.graph, builder.param_names, builder.user_inputs, out)
