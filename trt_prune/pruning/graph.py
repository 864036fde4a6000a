"""Channel dependency graph, from one recorded forward pass (:mod:`.record`) or ``torch.export``.

Every channel of every activation is an *element*. Convolutions and Linear layers create fresh elements for
their output channels; ops that keep channels in place (BatchNorm, activations, pooling, upsampling) pass
them through; ops that add tensors (residuals) *unify* elements position by position; ``cat`` concatenates
element lists and ``split``/``chunk`` slice them. After the trace, each connected class of elements is one
prunable channel, and classes sharing a producer layer form one :class:`ChannelGroup` that is pruned
together. Every parameter axis that indexes channels is recorded as a :class:`Slot` (a list of elements), so
surgery only has to keep the slot positions whose class survives.

Every ATen op that touches a tracked channel needs an explicit rule in :data:`CHANNEL_RULES`; an op without one
is an error naming the op and the module, never a silent pass-through. Users add rules with
:func:`register_channel_rule`.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import PruneError
from ..registry import Registry
from . import record


class KeepWhole(PruneError):
    """A rule met a use of tracked channels it cannot prune through (a conv over another axis, a softmax over the
    channels, a matmul with a fixed tensor…). :func:`trace` keeps every channel the op reads whole, with this
    message as the reason, and goes on (``strict=True``: it is the error instead)."""


@dataclass
class KeptWhole:
    """One op whose channels :func:`trace` kept whole: where, which op, why."""

    module: str
    op: str
    reason: str


@dataclass
class Channels:
    """The tracked channel axis of one activation: which dim it is and the element at each index."""

    dim: int
    elements: list[int]


@dataclass
class Multi:
    """Channels spread over several dims after a reshape split the channel axis (heads, shuffle groups):
    ``emap[i, j, …]`` is the element at position ``i`` of ``dims[0]``, ``j`` of ``dims[1]``…, dims ascending."""

    dims: tuple[int, ...]
    emap: np.ndarray

    @property
    def elements(self) -> list[int]:
        return self.emap.ravel().tolist()


@dataclass
class ParamRef:
    """A parameter or buffer used directly in the graph (a layer scale, a class token, a position embedding), or
    a view of one that only adds or broadcasts axes: its name and, per axis of the current value, the axis of
    the parameter it comes from (None for an added axis)."""

    name: str
    axes: tuple[int | None, ...]


@dataclass
class Slot:
    """One parameter axis of a module that indexes channels.

    ``kind``: ``out`` (a producer's output channels), ``in`` (a consumer's input channels), ``norm`` (per-channel
    parameters and buffers such as BatchNorm's), ``depthwise`` (a depthwise conv: its output channels are its
    input channels), ``grouped`` (a grouped conv coupling output channel i with input channel i) or
    ``param:NAME:AXIS`` (axis AXIS of the module's tensor NAME, whatever the module type).

    ``producer``: the slot holds channels the module creates (``out`` always; a ``param:`` slot where a layer's
    output channels are not axis 0 of its weight: a transposed conv's, an embedding's). A module with a producer
    slot is a producer of its channel group.
    """

    module: str
    kind: str
    elements: list[int]
    classes: np.ndarray | None = None  # class id per position, filled when the graph is built
    producer: bool = False


@dataclass
class ComputeNode:
    """A conv or linear call, kept to count MACs before and after pruning without re-tracing."""

    module: str
    macs: int
    in_elements: list[int] | None  # None: input channels not tracked (fixed)
    out_elements: list[int] | None  # None: output channels follow the input (depthwise)
    in_classes: np.ndarray | None = None  # filled when the graph is built
    out_classes: np.ndarray | None = None
    in_shape: tuple[int, ...] = ()  # the input activation's shape (latency tables key layers by it)


@dataclass
class SplitRecord:
    module: str
    segments: list[list[int]]


@dataclass
class ChannelGroup:
    """Channels that must be pruned together: every class here shares producer layers."""

    key: str
    producers: list[str]
    classes: list[int]
    slots: list[Slot] = field(default_factory=list)
    segments: list[list[int]] | None = None  # positions into ``classes`` that must keep equal counts
    pinned: str | None = None

    @property
    def size(self) -> int:
        return len(self.classes)


class TraceState:
    """What the channel rules read and write while walking the exported graph."""

    def __init__(self, model: nn.Module, param_names: dict[str, str]):
        self.model = model
        self.modules = dict(model.named_modules())
        self.param_names = param_names
        self.n_elements = 0
        self.links: list[tuple[np.ndarray, np.ndarray]] = []  # element pairs that are one channel
        self.slots: dict[tuple[str, str], Slot] = {}
        self.pinned: dict[int, str] = {}
        self.splits: list[SplitRecord] = []
        self.compute: list[ComputeNode] = []
        self.env: dict = {}  # fx node -> Channels | ParamRef | Opaque | None, filled by trace()
        self.kept_whole: list[KeptWhole] = []

    # -- helpers the rules use -------------------------------------------------------------------------
    def module_of_param(self, node) -> tuple[str, nn.Module]:
        """Module path and module owning the parameter placeholder ``node``."""
        name = self.param_names.get(getattr(node, "name", None))
        if name is None:
            raise KeepWhole(f"weight input {node} of a layer is not a parameter of the model; "
                             "computed or shared weights cannot be pruned yet")
        path = name.rsplit(".", 1)[0] if "." in name else ""
        return path, self.modules[path]

    def bind_fixed(self, node, other_node, ref, out_dim: int, elements: list[int]) -> None:
        """A tracked tensor meets a fixed one in ``node`` (add, mul, cat…): fine when the fixed one broadcasts
        over the channel axis; a parameter with the full channel extent is recorded as a slot and pruned too."""
        shape = _shape(other_node)
        axis = out_dim - (len(_shape(node)) - len(shape))
        if not 0 <= axis < len(shape) or shape[axis] == 1:
            return
        produced = self.env.get(other_node)
        if isinstance(produced, Opaque):
            for e in elements:
                self.pinned.setdefault(e, produced.why)
            return
        if isinstance(ref, ParamRef) and shape[axis] == len(elements) and ref.axes[axis] is not None:
            path, _, attr = ref.name.rpartition(".")
            self.record_slot(path, f"param:{attr}:{ref.axes[axis]}", elements)
            return
        raise KeepWhole(f"'{node.target}' in '{_module_path(node)}' combines pruned channels with a fixed tensor "
                         f"of shape {shape} that is not a parameter")

    def fresh(self, n: int) -> list[int]:
        start = self.n_elements
        self.n_elements += n
        return list(range(start, start + n))

    def unify(self, a: list[int], b: list[int], where: str) -> None:
        """Elements ``a[i]`` and ``b[i]`` are the same channel. Recorded now, resolved once after the walk
        (:func:`_components`): no rule needs the classes while the graph is walked."""
        if len(a) != len(b):
            raise KeepWhole(f"{where}: cannot couple {len(a)} channels with {len(b)}")
        self.links.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def record_slot(self, module: str, kind: str, elements: list[int], producer: bool = False) -> None:
        """``producer``: ``elements`` are channels ``module`` creates (implied for ``out``), see :class:`Slot`."""
        key = (module, kind)
        old = self.slots.get(key)
        if old is None:
            self.slots[key] = Slot(module, kind, list(elements), producer=producer or kind == "out")
        else:
            # the same module called twice (shared weights): its channels are the same parameters
            self.unify(old.elements, elements, f"module '{module}' called twice")


_NODE_TYPES = (torch.fx.Node, record.Node)  # torch.export's graph or the dispatch recording's
ChannelRule = Callable[[TraceState, "torch.fx.Node", list], object]
CHANNEL_RULES: Registry[str, ChannelRule] = Registry("channel rule", PruneError)


def register_channel_rule(*op_names: str, replace: bool = False):
    """Register how an ATen op (by overload-packet name, e.g. ``"conv2d"``) maps channels in to out.

    The rule gets ``(state, node, args)`` where ``args`` mirrors ``node.args`` with every tensor replaced by its
    :class:`Channels` (or None when it carries no tracked channel axis) and returns the output's channels:
    a :class:`Channels`, a list of them for multi-output ops, or None. An op that already has a rule needs
    ``replace=True`` (see :mod:`trt_prune.registry`).
    """
    return CHANNEL_RULES.decorator(*op_names, replace=replace)


def _shape(node) -> tuple[int, ...]:
    val = node.meta.get("val")
    return tuple(int(s) for s in val.shape)


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top level>"
    return list(stack.values())[-1][0] or "<top level>"


# ----------------------------------------------------------------------------------------------------------
# rules
# ----------------------------------------------------------------------------------------------------------

def _arg(node, index: int, name: str, default):
    """Argument ``index`` of ``node`` (or keyword ``name``, or ``default``)."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


@register_channel_rule("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                       "conv_transpose3d")
def _conv(state: TraceState, node, args):
    inp = args[0]
    module, conv = state.module_of_param(node.args[1])
    op = node.target._overloadpacket.__name__
    if op == "convolution":
        transposed, groups = bool(_arg(node, 6, "transposed", False)), int(_arg(node, 8, "groups", 1))
    else:
        transposed, groups = op.startswith("conv_transpose"), int(_arg(node, 6, "groups", 1))
    if transposed:
        return _conv_transpose(state, node, inp, module, conv, groups)
    weight_shape = tuple(conv.weight.shape)
    out_shape = _shape(node)
    kernel = math.prod(weight_shape[2:])
    c_in = weight_shape[1] * groups
    k_out = weight_shape[0]
    macs = math.prod(out_shape[2:]) * k_out * weight_shape[1] * kernel
    if inp is not None and inp.dim != 1:
        raise KeepWhole(f"convolution '{module}' reads channels from dim {inp.dim}, expected 1")
    if groups == 1:
        out = state.fresh(k_out)
        if inp is not None:
            state.record_slot(module, "in", inp.elements)
        state.record_slot(module, "out", out)
        state.compute.append(ComputeNode(module, macs, inp.elements if inp else None, out,
                                         in_shape=_shape(node.args[0])))
        return Channels(1, out)
    if inp is None:  # output channel i is input channel i (or a multiple of it): as fixed as the input
        return None
    if c_in == k_out:
        return _grouped_in_place(state, module, inp, groups, macs, _shape(node.args[0]))
    if groups == c_in and k_out % c_in == 0:
        # depthwise with a channel multiplier (MobileOne/FastViT downsampling): outputs m·c … m·c+m-1 are
        # computed from input c alone, so they are that channel m times over and go with it
        m = k_out // c_in
        out = [e for e in inp.elements for _ in range(m)]
        state.record_slot(module, "multiplier", out)
        state.compute.append(ComputeNode(module, macs, inp.elements, None, in_shape=_shape(node.args[0])))
        return Channels(1, out)
    raise KeepWhole(f"grouped convolution '{module}' (groups={groups}, in={c_in}, out={k_out}) has no pruning "
                     "rule yet")


def _grouped_in_place(state: TraceState, module: str, inp: Channels, groups: int, macs: int,
                      in_shape: tuple[int, ...] = ()) -> Channels:
    """A grouped conv (plain or transposed) with as many outputs as inputs: output channel i is input channel i.
    Depthwise (one channel per group) prunes freely; otherwise (ResNeXt, RegNet) every group keeps the same
    count, so the layer stays a grouped conv with ``groups`` groups of a smaller width."""
    if groups == len(inp.elements):
        state.record_slot(module, "depthwise", inp.elements)
        state.compute.append(ComputeNode(module, macs, inp.elements, None, in_shape=in_shape))
        return Channels(1, list(inp.elements))
    width = len(inp.elements) // groups
    state.record_slot(module, "grouped", inp.elements)
    state.splits.append(SplitRecord(module, [inp.elements[j * width:(j + 1) * width] for j in range(groups)]))
    state.compute.append(ComputeNode(module, macs, inp.elements, inp.elements, in_shape=in_shape))
    return Channels(1, list(inp.elements))


_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _conv_transpose(state: TraceState, node, inp: Channels | None, module: str, conv: nn.Module, groups: int):
    """A transposed conv's weight is ``[in, out/groups, *kernel]``: input channels on axis 0, output channels on
    axis 1, so groups=1 records ``param:`` slots on those axes (the output one as the producer) and the bias as
    its own slot; the module's stored sizes follow from the tensors (surgery's fix-up)."""
    weight_shape = _shape(node.args[1])
    c_in, k_out = weight_shape[0], weight_shape[1] * groups
    # every input position scatters a [in, out/groups, *kernel] block: MACs follow the input's spatial size
    macs = math.prod(_shape(node.args[0])[2:]) * c_in * weight_shape[1] * math.prod(weight_shape[2:])
    if inp is not None and inp.dim != 1:
        raise KeepWhole(f"transposed convolution '{module}' reads channels from dim {inp.dim}, expected 1")
    weight = state.param_names[node.args[1].name].rpartition(".")[2]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if groups == 1:
        out = state.fresh(k_out)
        if inp is not None:
            state.record_slot(module, f"param:{weight}:0", inp.elements)
        state.record_slot(module, f"param:{weight}:1", out, producer=True)
        if isinstance(bias, _NODE_TYPES) and bias.name in state.param_names:
            state.record_slot(module, f"param:{state.param_names[bias.name].rpartition('.')[2]}:0", out)
        state.compute.append(ComputeNode(module, macs, inp.elements if inp else None, out,
                                         in_shape=_shape(node.args[0])))
        return Channels(1, out)
    if inp is not None and c_in == k_out and isinstance(conv, _CONV_TRANSPOSE) and weight == "weight":
        return _grouped_in_place(state, module, inp, groups, macs, _shape(node.args[0]))
    raise KeepWhole(f"grouped transposed convolution '{module}' (groups={groups}, in={c_in}, out={k_out}) has no "
                     "pruning rule yet")


@register_channel_rule("embedding")
def _embedding(state: TraceState, node, args):
    """A lookup table ``weight[num, dim]``: the output's last dim holds ``dim`` fresh channels (weight axis 1);
    the indices carry no channels (whatever the trace tracked on them is dropped)."""
    module, _ = state.module_of_param(node.args[0])
    weight = state.param_names[node.args[0].name].rpartition(".")[2]
    out_shape = _shape(node)
    out = state.fresh(_shape(node.args[0])[1])
    state.record_slot(module, f"param:{weight}:1", out, producer=True)
    state.compute.append(ComputeNode(module, 0, None, out))  # a lookup: no MACs, listed in the layer report
    return Channels(len(out_shape) - 1, out)


@register_channel_rule("prelu", "_prelu_kernel")
def _prelu(state: TraceState, node, args):
    """PReLU: one slope per channel of dim 1 (dim 0 for a 1-D input), or a single slope (a pass-through)."""
    inp = args[0]
    if inp is None:
        return None
    slope = node.args[1]
    n = math.prod(_shape(slope))
    channel_dim = 1 if len(_shape(node.args[0])) >= 2 else 0
    if n > 1 and inp.dim == channel_dim:
        module, mod = state.module_of_param(slope)
        attr = state.param_names[slope.name].rpartition(".")[2]
        if len(_shape(slope)) != 1 or n != len(inp.elements):
            raise KeepWhole(f"prelu in '{module}' has {n} slopes for {len(inp.elements)} channels")
        state.record_slot(module, "norm" if isinstance(mod, nn.PReLU) and attr == "weight" else f"param:{attr}:0",
                          inp.elements)
    return Channels(inp.dim, list(inp.elements))


@register_channel_rule("linear")
def _linear(state: TraceState, node, args):
    inp = args[0]
    module, lin = state.module_of_param(node.args[1])
    attr = state.param_names[node.args[1].name].rpartition(".")[2]
    n_out, n_in = _shape(node.args[1])
    out_shape = _shape(node)
    if inp is not None and inp.dim != len(_shape(node.args[0])) - 1:
        raise KeepWhole(f"linear '{module}' reads features from dim {inp.dim}, expected the last dim")
    out = state.fresh(n_out)
    if attr == "weight":
        in_kind, out_kind = "in", "out"
    else:
        # a weight under another name (MultiheadAttention's in_proj_weight): cut that tensor directly
        in_kind, out_kind = f"param:{attr}:1", f"param:{attr}:0"
        bias = node.args[2] if len(node.args) > 2 else None
        if isinstance(bias, _NODE_TYPES) and bias.name in state.param_names:
            state.record_slot(module, f"param:{state.param_names[bias.name].rpartition('.')[2]}:0", out)
    if isinstance(lin, nn.MultiheadAttention) and inp is not None and n_out == 3 * len(inp.elements):
        # self-attention: nn.MultiheadAttention requires q, k and v to be as wide as its input
        for part in range(3):
            state.unify(out[part * n_in:(part + 1) * n_in], inp.elements, f"attention in '{module}'")
    if inp is not None:
        state.record_slot(module, in_kind, inp.elements)
    state.record_slot(module, out_kind, out)
    state.compute.append(ComputeNode(module, math.prod(out_shape) // out_shape[0] * n_in,
                                     inp.elements if inp else None, out, in_shape=_shape(node.args[0])))
    return Channels(len(out_shape) - 1, out)


@register_channel_rule("unsqueeze", "squeeze")
def _unsqueeze(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    if node.target._overloadpacket.__name__ == "unsqueeze":
        d = _norm_dim(node.args[1], len(out_shape))
        return Channels(inp.dim + (1 if d <= inp.dim else 0), list(inp.elements))
    if len(node.args) > 1:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        gone = [d for d in (_norm_dim(d, len(in_shape)) for d in dims) if in_shape[d] == 1]
    else:
        gone = [i for i, n in enumerate(in_shape) if n == 1]
    if len(out_shape) == len(in_shape):
        return Channels(inp.dim, list(inp.elements))
    if inp.dim in gone:
        raise KeepWhole(f"squeeze removes the channel dim in '{_module_path(node)}'")
    return Channels(inp.dim - sum(1 for i in gone if i < inp.dim), list(inp.elements))


@register_channel_rule("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
                       "native_batch_norm")
def _batch_norm(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    module, _ = state.module_of_param(node.args[1])
    state.record_slot(module, "norm", inp.elements)
    out = Channels(inp.dim, list(inp.elements))
    # the decomposed variants return (out, mean, rstd)
    return [out, None, None] if node.target._overloadpacket.__name__.startswith(("_native", "native")) else out


@register_channel_rule("layer_norm", "native_layer_norm")
def _layer_norm(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    rank = len(_shape(node.args[0]))
    normalized = list(node.args[1])
    if len(normalized) != 1 or inp.dim != rank - 1:
        raise KeepWhole(f"layer_norm in '{_module_path(node)}' normalises over {normalized} while channels sit on "
                         f"dim {inp.dim} of {rank}; only a norm over the channel dim alone has a rule")
    weight = node.args[2] if len(node.args) > 2 else None
    if weight is not None:
        module, _ = state.module_of_param(weight)
        state.record_slot(module, "norm", inp.elements)
    out = Channels(inp.dim, list(inp.elements))
    return [out, None, None] if node.target._overloadpacket.__name__ == "native_layer_norm" else out


@register_channel_rule("group_norm")
def _group_norm(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    if inp.dim != 1:
        raise KeepWhole(f"group_norm in '{_module_path(node)}' reads channels from dim {inp.dim}, expected 1")
    groups = int(node.args[1])
    weight = node.args[2] if len(node.args) > 2 else None
    if weight is not None:
        module, _ = state.module_of_param(weight)
        state.record_slot(module, "norm", inp.elements)
    else:
        module = _module_path(node)
    width = len(inp.elements) // groups
    # every group keeps the same number of channels, so num_groups still divides them
    state.splits.append(SplitRecord(module, [inp.elements[j * width:(j + 1) * width] for j in range(groups)]))
    return Channels(1, list(inp.elements))


@register_channel_rule("instance_norm")
def _instance_norm(state: TraceState, node, args):
    """Each (sample, dim-1 slice) normalised over the other axes: channels on dim 1 pass through with the
    affine parameters cut with them; channels on another axis (GroupNorm(1) as ONNX writes it, a reshape to
    (B, 1, C·H·W) first) are part of the statistic, taken over the kept ones as a LayerNorm's is."""
    inp = args[0]
    if inp is None or isinstance(inp, Multi) or inp.dim != 1:
        return inp
    given = {idx: a for idx, a in enumerate(node.args[1:5], 1) if isinstance(a, _NODE_TYPES)}
    if 3 in given or 4 in given:  # running statistics stored per channel: nothing cuts them
        raise KeepWhole(f"instance_norm in '{_module_path(node)}' uses stored running statistics")
    for arg in given.values():  # weight, bias
        ref = state.env.get(arg)
        if not isinstance(ref, ParamRef):
            raise KeepWhole(f"instance_norm in '{_module_path(node)}' has a computed affine parameter")
        path, _, attr = ref.name.rpartition(".")
        state.record_slot(path, f"param:{attr}:0", inp.elements)
    return Channels(1, list(inp.elements))


_UNARY = ("silu", "silu_", "relu", "relu_", "sigmoid", "sigmoid_", "hardswish", "hardswish_", "hardsigmoid",
          "hardsigmoid_", "gelu", "tanh", "tanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "relu6",
          "hardtanh", "hardtanh_", "mish", "mish_", "dropout", "dropout_", "clone", "contiguous", "alias",
          "detach", "neg", "exp", "abs", "softplus", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
          "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
          "adaptive_max_pool2d", "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
          "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_nearest_exact2d", "_to_copy", "to",
          "type_as", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "clip_", "pow", "sqrt", "rsqrt", "square",
          "erf", "reciprocal", "log", "log1p", "sign", "floor", "ceil", "round", "sin", "cos")


@register_channel_rule(*_UNARY)
def _pass_through(state: TraceState, node, args):
    inp = args[0]
    if inp is None or isinstance(inp, Multi):
        return inp
    return Channels(inp.dim, list(inp.elements))


@register_channel_rule("max_pool2d_with_indices", "max_pool3d_with_indices")
def _pool_with_indices(state: TraceState, node, args):
    inp = args[0]
    return [Channels(inp.dim, list(inp.elements)) if inp else None] * 2


@register_channel_rule("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum")
def _binary(state: TraceState, node, args):
    a, b = args[0], args[1] if len(args) > 1 else None
    rank = len(_shape(node))
    if not isinstance(a, Channels) or not isinstance(b, Channels):
        i = 0 if isinstance(a, Channels) else 1
        ch = (a, b)[i]
        out_dim = ch.dim + (rank - len(_shape(node.args[i])))
        other = node.args[1 - i] if len(node.args) > 1 - i else None
        if isinstance(other, _NODE_TYPES):
            state.bind_fixed(node, other, (a, b)[1 - i], out_dim, ch.elements)
        return Channels(out_dim, list(ch.elements))
    if (len(a.elements) == 1) != (len(b.elements) == 1):
        # one side has a single channel (a per-position gate computed by a 1-wide conv): it broadcasts
        wide, i = (a, 0) if len(a.elements) > 1 else (b, 1)
        return Channels(wide.dim + (rank - len(_shape(node.args[i]))), list(wide.elements))
    ra, rb = len(_shape(node.args[0])), len(_shape(node.args[1]))
    if a.dim + (rank - ra) != b.dim + (rank - rb):
        raise KeepWhole(f"'{node.target}' in '{_module_path(node)}' adds tensors whose channels sit on different "
                         "dims")
    state.unify(a.elements, b.elements, f"'{node.target}' in '{_module_path(node)}'")
    return Channels(a.dim + (rank - ra), list(a.elements))


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


@register_channel_rule("cat", "concat")
def _cat(state: TraceState, node, args):
    tensors = args[0]
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(_shape(node)))
    tracked = [t for t in tensors if isinstance(t, Channels)]
    if not tracked:
        return None
    if len(tracked) != len(tensors):
        if all(t.dim == dim for t in tracked):
            # fixed parts (a constant, an ignored module's output) keep their channels at their offsets: they get
            # elements no producer owns, pinned in case a later op couples them to prunable ones
            why = f"joined by cat in '{_module_path(node)}' with channels that are not pruned"
            elements = []
            for t_node, t in zip(node.args[0], tensors, strict=True):
                if isinstance(t, Channels):
                    elements.extend(t.elements)
                else:
                    fixed = state.fresh(_shape(t_node)[dim])
                    for e in fixed:
                        state.pinned[e] = why
                    elements.extend(fixed)
            return Channels(dim, elements)
        if any(t.dim == dim for t in tracked):
            raise KeepWhole(f"cat in '{_module_path(node)}' joins channels on the cat dim with others on another dim")
        for t_node, t in zip(node.args[0], tensors, strict=True):
            if not isinstance(t, Channels):  # e.g. a class token concatenated to the patch tokens
                state.bind_fixed(node, t_node, t, tracked[0].dim, tracked[0].elements)
        return Channels(tracked[0].dim, list(tracked[0].elements))
    if tracked[0].dim == dim:
        if any(t.dim != dim for t in tracked):
            raise KeepWhole(f"cat in '{_module_path(node)}' joins tensors with channels on different dims")
        return Channels(dim, list(itertools.chain.from_iterable(t.elements for t in tracked)))
    for t in tracked[1:]:
        state.unify(tracked[0].elements, t.elements, f"cat in '{_module_path(node)}'")
    return Channels(tracked[0].dim, list(tracked[0].elements))


@register_channel_rule("chunk", "split", "split_with_sizes", "tensor_split", "unsafe_split")
def _split(state: TraceState, node, args):
    inp = args[0]
    vals = node.meta["val"]
    if inp is None:
        return [None] * len(vals)
    rank = len(_shape(node.args[0]))
    dim = _norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), rank)
    if dim != inp.dim:
        return [Channels(inp.dim, list(inp.elements)) for _ in vals]
    pieces, start = [], 0
    for v in vals:
        n = int(v.shape[dim])
        pieces.append(inp.elements[start:start + n])
        start += n
    state.splits.append(SplitRecord(_module_path(node), pieces))
    return [Channels(dim, p) for p in pieces]


@register_channel_rule("constant_pad_nd", "pad", "reflection_pad2d", "replication_pad2d", "roll")
def _spatial_only(state: TraceState, node, args):
    """Padding and rolling: fine as long as they leave the channel axis alone."""
    inp = args[0]
    if inp is None:
        return None
    rank = len(_shape(node.args[0]))
    if node.target._overloadpacket.__name__ == "roll":
        dims = node.args[2] if len(node.args) > 2 else []
        touched = {_norm_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])} or {inp.dim}
    else:
        pads = list(node.args[1])
        touched = {rank - 1 - i // 2 for i, p in enumerate(pads) if p}
    if inp.dim in touched:
        name = node.target._overloadpacket.__name__
        constant = name == "constant_pad_nd" or (name == "pad" and _arg(node, 2, "mode", "constant") == "constant")
        i = 2 * (rank - 1 - inp.dim)
        before, after = (int(p) for p in list(node.args[1])[i:i + 2]) if constant else (-1, -1)
        if min(before, after) < 0:  # a roll, a reflecting pad, a crop
            raise KeepWhole(f"'{node.target}' in '{_module_path(node)}' pads or rolls the channel axis")
        # constant channels appended (EfficientViT's linear attention pads v with a ones channel): like a cat
        # with a fixed tensor, they stay at their offsets and the others prune
        why = f"constant channels padded in '{_module_path(node)}'"
        added = state.fresh(before + after)
        for e in added:
            state.pinned[e] = why
        return Channels(inp.dim, added[:before] + list(inp.elements) + added[before:])
    return Channels(inp.dim, list(inp.elements))


@register_channel_rule("einsum")
def _einsum(state: TraceState, node, args):
    """Channels follow their subscript letter; a letter shared by two tracked operands and summed away couples
    them (attention's q·k), a letter kept in the output carries them there."""
    equation = node.args[0].replace(" ", "")
    inputs, _, output = equation.partition("->")
    if "..." in equation or not output:
        raise KeepWhole(f"einsum '{equation}' in '{_module_path(node)}' needs explicit subscripts for pruning")
    operands = args[1]
    letters: dict[str, list[int]] = {}
    for subs, op in zip(inputs.split(","), operands, strict=True):
        if isinstance(op, Channels):
            letter = subs[op.dim]
            if letter in letters:
                state.unify(letters[letter], op.elements, f"einsum in '{_module_path(node)}'")
            else:
                letters[letter] = list(op.elements)
    carried = [(output.index(k), v) for k, v in letters.items() if k in output]
    if len(carried) > 1:
        raise KeepWhole(f"einsum '{equation}' in '{_module_path(node)}' carries two channel axes to its output")
    return Channels(carried[0][0], carried[0][1]) if carried else None


@register_channel_rule("new_zeros", "new_ones", "new_full", "new_empty", "zeros_like", "ones_like", "full_like",
                       "empty_like", "rand_like", "randn_like")
def _fresh_values(state: TraceState, node, args):
    """Tensors made from another's shape only (masks, buffers): they carry no channels of their own."""
    return None


@register_channel_rule("unbind")
def _unbind(state: TraceState, node, args):
    inp = args[0]
    n = len(node.meta["val"])
    if inp is None:
        return [None] * n
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(_shape(node.args[0])))
    if dim == inp.dim:
        raise KeepWhole(f"unbind over the channel dim in '{_module_path(node)}' picks fixed channels")
    return [Channels(inp.dim - (1 if dim < inp.dim else 0), list(inp.elements)) for _ in range(n)]


@register_channel_rule("select")
def _select(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    dim = _norm_dim(node.args[1], len(_shape(node.args[0])))
    if dim == inp.dim:
        raise KeepWhole(f"select on the channel dim in '{_module_path(node)}' picks a fixed channel")
    return Channels(inp.dim - (1 if dim < inp.dim else 0), list(inp.elements))


@register_channel_rule("slice")
def _slice(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(_shape(node.args[0])))
    if dim != inp.dim:
        return Channels(inp.dim, list(inp.elements))
    # constant channel indices in the model's code would point at the wrong channels after pruning
    for e in inp.elements:
        state.pinned.setdefault(e, f"sliced by fixed indices in '{_module_path(node)}'")
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    n = _shape(node)[dim]
    start = _norm_dim(start, len(inp.elements)) if start < 0 else min(start, len(inp.elements))
    step = node.args[4] if len(node.args) > 4 else 1
    return Channels(dim, list(inp.elements[start:start + n * step:step]))


def _element_map(value: Channels | Multi, shape: tuple[int, ...]) -> np.ndarray:
    """The element id at every position of a tensor of ``shape`` (broadcast over the non-channel dims)."""
    dims = (value.dim,) if isinstance(value, Channels) else value.dims
    arr = np.asarray(value.elements if isinstance(value, Channels) else value.emap, dtype=np.int64)
    view = [1] * len(shape)
    for d, n in zip(dims, arr.shape if arr.ndim else (arr.size,), strict=True):
        view[d] = n
    return np.broadcast_to(arr.reshape(view), shape)


def _from_map(emap: np.ndarray, node) -> Channels | Multi:
    varying = [a for a in range(emap.ndim)
               if emap.shape[a] > 1 and not (emap == np.take(emap, [0], axis=a)).all()]
    if not varying:
        raise KeepWhole(f"reshape to {emap.shape} in '{_module_path(node)}' loses the channel axis")
    sub = emap[tuple(slice(None) if a in varying else 0 for a in range(emap.ndim))]
    if len(varying) == 1:
        return Channels(varying[0], sub.tolist())
    return Multi(tuple(varying), np.ascontiguousarray(sub))


def collapse(state: TraceState, value: Multi, node) -> Channels:
    """Make split channels one axis again for an op that needs one (a linear layer, attention): every part
    (head) keeps the same positions, and the channels continue along the last dim."""
    rows = _distinct_rows(value.emap)
    for row in rows[1:]:
        state.unify(rows[0], row, f"'{node.target}' in '{_module_path(node)}'")
    return Channels(value.dims[-1], rows[0])


def _distinct_rows(emap: np.ndarray) -> list[list[int]]:
    """The rows of ``emap`` along its last dim, each distinct row once, in first-seen order. A detector head's
    ``view(N, anchors, classes, H, W)`` followed by a permute repeats every row H×W times; coupling or
    recording the repeats changes nothing and costs millions of linking steps."""
    rows = emap.reshape(-1, emap.shape[-1])
    # hash each row to one number (sorting whole rows is 30× slower on a head), then confirm the rows that
    # share a hash are equal, falling back to the exact row sort on a collision
    weights = np.random.default_rng(0).random(rows.shape[1])
    _, first, inverse = np.unique(rows @ weights, return_index=True, return_inverse=True)
    if not (rows[first[inverse.ravel()]] == rows).all():
        _, first = np.unique(rows, axis=0, return_index=True)
    return rows[np.sort(first)].tolist()


@register_channel_rule("flatten", "unflatten", "view", "reshape", "_unsafe_view", "reshape_as", "view_as")
def _reshape(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    if isinstance(inp, Channels):
        prefix = math.prod(in_shape[:inp.dim])
        for j in range(len(out_shape)):  # the common case: the channel axis survives whole
            if math.prod(out_shape[:j]) == prefix and out_shape[j] == in_shape[inp.dim]:
                return Channels(j, list(inp.elements))
    # otherwise reshape a map of element ids with the tensor: merging the channel axis with others repeats
    # each element (flatten before a classifier); splitting it spreads the channels over several dims
    out = _from_map(_element_map(inp, in_shape).reshape(out_shape), node)
    if isinstance(out, Multi):
        # the model's code splits at fixed proportions (heads, shuffle groups): every part must keep as many
        # channels as the others, or the split lands in the wrong place after pruning
        state.splits.append(SplitRecord(_module_path(node), _distinct_rows(out.emap)))
    return out


@register_channel_rule("matmul", "bmm", "mm")
def _matmul(state: TraceState, node, args):
    a, b = args[0], args[1]
    ra, rb, ro = len(_shape(node.args[0])), len(_shape(node.args[1])), len(_shape(node))
    contracted_a = isinstance(a, Channels) and a.dim == ra - 1
    contracted_b = isinstance(b, Channels) and b.dim == rb - 2
    if contracted_a and contracted_b:  # q @ k^T: the two sides' channels meet in the reduction
        state.unify(a.elements, b.elements, f"matmul in '{_module_path(node)}'")
        return None
    if isinstance(a, Channels) and a.dim == ra - 2 and not isinstance(b, Channels):
        return Channels(ro - 2, list(a.elements))
    if isinstance(b, Channels) and b.dim == rb - 1 and not isinstance(a, Channels):
        return Channels(ro - 1, list(b.elements))
    if isinstance(a, Channels) and isinstance(b, Channels) and not contracted_a and not contracted_b:
        raise KeepWhole(f"matmul in '{_module_path(node)}' puts channels of both operands on its result's axes "
                         "(a channel-by-channel map, as cross-covariance attention's q·kᵀ) and has no rule for it")
    raise KeepWhole(f"matmul in '{_module_path(node)}' contracts pruned channels with a fixed tensor")


@register_channel_rule("softmax", "_softmax", "log_softmax", "_log_softmax")
def _softmax(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    if _norm_dim(node.args[1], len(_shape(node))) == inp.dim:
        raise KeepWhole(f"softmax over the channel axis in '{_module_path(node)}' has no pruning rule")
    return Channels(inp.dim, list(inp.elements))


@register_channel_rule("scaled_dot_product_attention")
def _sdpa(state: TraceState, node, args):
    q, k, v = args[0], args[1], args[2]
    last = len(_shape(node)) - 1
    if any(not isinstance(t, Channels) or t.dim != len(_shape(n)) - 1 for t, n in zip((q, k, v), node.args[:3],
                                                                                        strict=True)):
        raise KeepWhole(f"attention in '{_module_path(node)}' needs q, k and v with channels on their last dim")
    state.unify(q.elements, k.elements, f"attention in '{_module_path(node)}'")
    return Channels(last, list(v.elements))


@register_channel_rule("permute")
def _permute(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    dims = [_norm_dim(d, len(node.args[1])) for d in node.args[1]]
    if isinstance(inp, Multi):
        return _from_map(np.transpose(_element_map(inp, _shape(node.args[0])), dims), node)
    return Channels(dims.index(inp.dim), list(inp.elements))


@register_channel_rule("transpose", "transpose_", "swapaxes", "swapdims")
def _transpose(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    rank = len(_shape(node))
    a, b = _norm_dim(node.args[1], rank), _norm_dim(node.args[2], rank)
    if isinstance(inp, Multi):
        return _from_map(np.swapaxes(_element_map(inp, _shape(node.args[0])), a, b), node)
    dim = b if inp.dim == a else a if inp.dim == b else inp.dim
    return Channels(dim, list(inp.elements))


@register_channel_rule("linalg_vector_norm", "norm")
def _channel_norm(state: TraceState, node, args):
    """An L2 norm over the channel dim (SSD's L2Norm) yields one value per position: no channels left, and
    the division that follows broadcasts it."""
    inp = args[0]
    if inp is None:
        return None
    rank = len(_shape(node.args[0]))
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    dims = [_norm_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])] if dims is not None \
        else list(range(rank))
    keepdim = bool(node.args[3]) if len(node.args) > 3 else bool(node.kwargs.get("keepdim", False))
    if inp.dim in dims:
        return None
    return Channels(inp.dim - (0 if keepdim else sum(1 for d in dims if d < inp.dim)), list(inp.elements))


@register_channel_rule("mean", "sum", "amax", "amin")
def _reduce(state: TraceState, node, args):
    inp = args[0]
    if inp is None:
        return None
    rank = len(_shape(node.args[0]))
    dims = node.args[1] if len(node.args) > 1 else None
    keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
    if dims is None:  # to one number (a statistic, a value for control flow): no channel axis is left
        return None
    dims = [_norm_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if inp.dim in dims:
        # a statistic over the channels (GRN's channel mean, CBAM's channel max): one value per position, taken
        # over the kept channels after pruning, the way a LayerNorm's mean is; nothing to couple
        return None
    shift = 0 if keepdim else sum(1 for d in dims if d < inp.dim)
    return Channels(inp.dim - shift, list(inp.elements))


@register_channel_rule("addcmul", "addcmul_", "addcdiv", "addcdiv_", "lerp", "lerp_", "where")
def _ternary(state: TraceState, node, args):
    """Element-wise ops of three tensors (``input + value·t1·t2``, ``lerp``, ``where``): every operand with the
    full channel extent is the same channel; fixed operands broadcast or are parameters pruned with them
    (GRN's ``addcmul(bias, weight, x)``)."""
    rank = len(_shape(node))
    operands = [(i, n) for i, n in enumerate(node.args[:3]) if isinstance(n, _NODE_TYPES)]
    wide = [(i, args[i]) for i, _ in operands
            if isinstance(args[i], Channels) and len(args[i].elements) > 1]
    if not wide:  # at most one-wide tracked operands (a per-position gate): they broadcast
        i = next((i for i, _ in operands if isinstance(args[i], Channels)), None)
        return None if i is None else Channels(args[i].dim + rank - len(_shape(node.args[i])),
                                               list(args[i].elements))
    i0, first = wide[0]
    out_dim = first.dim + rank - len(_shape(node.args[i0]))
    for i, ch in wide[1:]:
        if ch.dim + rank - len(_shape(node.args[i])) != out_dim:
            raise KeepWhole(f"'{node.target}' in '{_module_path(node)}' combines tensors whose channels sit on "
                             "different dims")
        state.unify(first.elements, ch.elements, f"'{node.target}' in '{_module_path(node)}'")
    for i, n in operands:
        if not isinstance(args[i], Channels):
            state.bind_fixed(node, n, state.env.get(n), out_dim, first.elements)
    return Channels(out_dim, list(first.elements))


@register_channel_rule("repeat")
def _repeat(state: TraceState, node, args):
    """Tiling that leaves the channel axis alone (a position embedding repeated over the batch) passes the
    channels through; tiling the channels themselves would repeat pruned ones."""
    inp = args[0]
    if inp is None:
        return None
    if isinstance(inp, Multi):
        raise KeepWhole(f"repeat in '{_module_path(node)}' tiles a tensor whose channels span several dims")
    repeats = list(node.args[1])
    out_dim = inp.dim + len(repeats) - len(_shape(node.args[0]))
    if repeats[out_dim] != 1:
        raise KeepWhole(f"repeat in '{_module_path(node)}' tiles the channel axis {repeats[out_dim]} times")
    return Channels(out_dim, list(inp.elements))


# ----------------------------------------------------------------------------------------------------------
# tracing
# ----------------------------------------------------------------------------------------------------------

def _param_view(node, ref: ParamRef) -> ParamRef | None:
    """Follow a parameter through ops that only add or broadcast axes; anything else loses the link."""
    name = node.target._overloadpacket.__name__ if hasattr(node.target, "_overloadpacket") else ""
    if not hasattr(node.meta.get("val"), "shape"):  # a split of a parameter into a list, a size: the link ends
        return None
    out_rank = len(_shape(node))
    if name in ("clone", "to", "_to_copy", "alias", "detach", "contiguous", "type_as"):
        return ref
    if name == "expand":
        return ParamRef(ref.name, (None,) * (out_rank - len(ref.axes)) + ref.axes)
    if name == "expand_as":
        return ParamRef(ref.name, (None,) * (out_rank - len(ref.axes)) + ref.axes)
    if name == "repeat":
        # tiling axes of size 1 (a position embedding repeated over the batch) is a broadcast; tiling a
        # parameter's own axis is not a view of it
        reps = list(node.args[1])
        src = (1,) * (len(reps) - len(ref.axes)) + _shape(node.args[0])
        axes = (None,) * (len(reps) - len(ref.axes)) + ref.axes
        if any(r != 1 and n != 1 for r, n in zip(reps, src, strict=True)):
            return None
        return ParamRef(ref.name, tuple(None if r != 1 else a for r, a in zip(reps, axes, strict=True)))
    if name == "unsqueeze":
        d = _norm_dim(node.args[1], out_rank)
        return ParamRef(ref.name, ref.axes[:d] + (None,) + ref.axes[d:])
    if name in ("view", "reshape", "_unsafe_view"):
        # only size-1 axes added or removed (weight.view(1, -1, 1, 1)): the other axes keep their order
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        big_in = [a for a, n in enumerate(in_shape) if n != 1]
        if [in_shape[a] for a in big_in] != [n for n in out_shape if n != 1]:
            return None
        it = iter(big_in)
        return ParamRef(ref.name, tuple(None if n == 1 else ref.axes[next(it)] for n in out_shape))
    return None


@register_channel_rule("expand", "expand_as")
def _expand(state: TraceState, node, args):
    inp = args[0]
    if isinstance(inp, Channels):
        if len(inp.elements) != _shape(node)[inp.dim + len(_shape(node)) - len(_shape(node.args[0]))]:
            raise PruneError(f"expand in '{_module_path(node)}' broadcasts the channel axis")
        return Channels(inp.dim + len(_shape(node)) - len(_shape(node.args[0])), list(inp.elements))
    ref = state.env.get(node.args[0])
    if isinstance(ref, ParamRef):
        return _param_view(node, ref)
    target = args[1] if len(args) > 1 else None
    if isinstance(target, Channels):
        src = _shape(node.args[0])
        axis = target.dim - (len(_shape(node)) - len(src))
        if 0 <= axis < len(src) and src[axis] == 1:
            # one value per position broadcast over the channels (a norm): it follows the target's channels
            return Channels(target.dim, list(target.elements))
    return None


def _map_args(args, env):
    if isinstance(args, (list, tuple)):
        return [_map_args(a, env) for a in args]
    if isinstance(args, _NODE_TYPES):
        value = env.get(args)
        return None if isinstance(value, Opaque) else value
    return None


_NON_TENSOR_OPS = {"sym_size", "sym_numel", "sym_stride", "_assert_tensor_metadata", "_assert_scalar"}


class ChannelGraph:
    """The traced channel structure of a model for one example input.

    After the trace the element links are resolved into one array, ``class of element``; slots and compute nodes keep
    their class ids as arrays, so planning, counting MACs and cutting are vector operations. A *kept mask* is a
    boolean array indexed by class id (see :meth:`kept_mask`)."""

    def __init__(self, model: nn.Module, state: TraceState, input_shape: tuple[int, ...]):
        self.model = model
        self.input_shape = input_shape
        self.outputs = None  # the model's outputs on the example, when the tracer ran it for real
        self.kept_whole: list[KeptWhole] = []  # ops whose channels the trace kept whole (see trace)
        self.modules = state.modules
        self.root = _components(state.n_elements, state.links)
        self.slots = state.slots
        self.compute = state.compute
        self.splits = state.splits
        for slot in self.slots.values():
            slot.classes = self.classes_of(slot.elements)
        for node in self.compute:
            node.in_classes = None if node.in_elements is None else self.classes_of(node.in_elements)
            node.out_classes = None if node.out_elements is None else self.classes_of(node.out_elements)
        self.pinned = {self.cls(e): why for e, why in state.pinned.items()}
        self.groups = self._build_groups()

    def cls(self, element: int) -> int:
        return int(self.root[element])

    def classes_of(self, elements) -> np.ndarray:
        return self.root[np.asarray(elements, dtype=np.int64)]

    def _build_groups(self) -> list[ChannelGroup]:
        # producers that share any class must be pruned together: link producers through shared classes
        produced: dict[str, np.ndarray] = {}  # module -> the classes of its producer slots, in slot order
        for (m, _), slot in self.slots.items():
            if slot.producer:
                prev = produced.get(m)
                produced[m] = slot.classes if prev is None else np.concatenate([prev, slot.classes])
        outs = list(produced.items())
        if outs:
            cls = np.concatenate([c for _, c in outs])
            mod = np.concatenate([np.full(len(c), i, dtype=np.int64) for i, (_, c) in enumerate(outs)])
            order = np.argsort(cls, kind="stable")
            cls, mod = cls[order], mod[order]
            same = cls[1:] == cls[:-1]
            module_root = _components(len(outs), [(mod[1:][same], mod[:-1][same])])
        else:
            module_root = np.zeros(0, dtype=np.int64)
        by_root: dict[int, list[str]] = {}
        for i, (m, _) in enumerate(outs):
            by_root.setdefault(int(module_root[i]), []).append(m)

        groups = []
        group_of_class = np.full(len(self.root), -1, dtype=np.int64)  # class id -> index into groups
        for mods in by_root.values():
            mods = sorted(mods)
            classes = list(dict.fromkeys(itertools.chain.from_iterable(produced[m].tolist() for m in mods)))
            g = ChannelGroup(key="+".join(mods), producers=mods, classes=classes)
            pinned = sorted({self.pinned[c] for c in classes if c in self.pinned})
            if pinned:
                g.pinned = "; ".join(pinned)
            group_of_class[classes] = len(groups)
            groups.append(g)
        for slot in self.slots.values():
            touched = np.unique(group_of_class[slot.classes])
            for i in touched[touched >= 0].tolist():
                groups[i].slots.append(slot)
        for split in self.splits:
            seg_classes = [self.classes_of(seg) for seg in split.segments]
            owners = {int(x) for sc in seg_classes for x in np.unique(group_of_class[sc])}
            if len(owners) != 1 or -1 in owners:
                for i in owners - {-1}:
                    if groups[i].pinned is None:
                        groups[i].pinned = f"split in '{split.module}' spans several channel groups (no rule yet)"
                continue
            g = groups[owners.pop()]
            pos = {c: i for i, c in enumerate(g.classes)}
            segs = []
            for sc in seg_classes:  # parts made identical by coupling (heads kept alike) constrain nothing
                ids = list(dict.fromkeys(pos[c] for c in sc.tolist()))
                if ids not in segs:
                    segs.append(ids)
            if len(segs) == 1:
                continue
            if len({len(s) for s in segs}) != 1:
                g.pinned = g.pinned or f"split in '{split.module}' has unequal parts (sizes would not follow)"
                continue
            covered = sorted(itertools.chain.from_iterable(segs))
            if covered != list(range(g.size)) or (g.segments is not None and g.segments != segs):
                g.pinned = g.pinned or f"split in '{split.module}' covers only part of its group (no rule yet)"
                continue
            g.segments = segs
        return groups

    def kept_mask(self, plan: dict[str, list[int]] | None = None) -> np.ndarray:
        """Boolean array over class ids: False for the channels ``plan`` (group key -> kept positions) drops."""
        mask = np.ones(len(self.root), dtype=bool)
        for g in self.groups:
            keep = plan.get(g.key) if plan else None
            if keep is not None:
                drop = np.ones(g.size, dtype=bool)
                drop[keep] = False
                mask[np.asarray(g.classes, dtype=np.int64)[drop]] = False
        return mask

    def macs(self, kept: np.ndarray | None = None) -> int:
        """MACs per image at the traced shape, with only the ``kept`` mask's channels left (None: unpruned)."""
        total = 0.0
        for node in self.compute:
            frac = 1.0
            if kept is not None:
                if node.in_classes is not None and len(node.in_classes):
                    frac *= kept[node.in_classes].mean()
                if node.out_classes is not None and len(node.out_classes):
                    frac *= kept[node.out_classes].mean()
            total += node.macs * frac
        return int(round(total))


def _components(n: int, links: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The class of every element: the smallest element it is linked to, directly or not (so class ids are
    stable across traces of the same model). Vectorised label propagation with pointer jumping; a Python
    union-find made 40 000 calls on ResNet-50 alone."""
    label = np.arange(n, dtype=np.int64)
    if not links:
        return label
    a = np.concatenate([x for x, _ in links])
    b = np.concatenate([y for _, y in links])
    while True:
        low = np.minimum(label[a], label[b])
        before = label.copy()
        np.minimum.at(label, a, low)
        np.minimum.at(label, b, low)
        while True:  # point every element at its label's label until stable
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            return label


def _ignored_scope(node, ignore: tuple[str, ...]) -> str | None:
    """The ignored module (by path prefix) that ``node`` runs inside, if any."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        for pattern in ignore:
            if path == pattern or path.startswith(pattern + "."):
                return pattern
    return None


@dataclass
class Opaque:
    """A value computed inside an ignored module, or by an op kept whole: its channels are unknown and must not be
    pruned; ``why`` is the reason given for every channel it meets."""

    scope: str
    why: str = ""


def _opaque(state: TraceState, tracked: list[Channels], scope: str, why: str | None = None) -> Opaque:
    """An op inside an ignored module (or one kept whole): the channels it reads are pinned; what it produces is
    opaque, and whatever it is later combined with (a residual add, say) is pinned in turn."""
    why = why or f"read or written by ignored module '{scope}'"
    for ch in tracked:
        for e in ch.elements:
            state.pinned.setdefault(e, why)
    return Opaque(scope, why)


TRACERS = ("auto", "dispatch", "export")
#: A module attribute ``{input axis: reason}``: axes whose size the module stores (see :func:`trace`).
FIXED_AXES_ATTR = "trt_prune_fixed_axes"


def _check_fixed_axes(state: TraceState, node, args) -> None:
    module = state.modules.get(_module_path(node))
    axes = getattr(module, FIXED_AXES_ATTR, None) if module is not None else None
    first = args[0] if args else None
    if not axes or not isinstance(first, (Channels, Multi)):
        return
    dims = (first.dim,) if isinstance(first, Channels) else first.dims
    hit = next((d for d in dims if d in axes), None)
    if hit is not None:
        raise KeepWhole(axes[hit])


def _export_graph(model: nn.Module, example: torch.Tensor):
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (example,), strict=False)
    except Exception as exc:  # torch.export raises many types; the user needs one clear message
        raise PruneError(f"torch.export could not trace the model ({type(exc).__name__}: {str(exc)[:300]}); "
                         "prune a traceable sub-module instead") from exc
    sig = ep.graph_signature
    param_names = dict(sig.inputs_to_parameters)
    param_names.update(sig.inputs_to_buffers)
    return ep.graph, param_names, set(sig.user_inputs), None


def _recorded_graph(model: nn.Module, example: torch.Tensor):
    try:
        rec = record.record(model, example, meta=True)
    except Exception:  # a forward that needs real values (a data-dependent branch): record a real run instead
        rec = record.record(model, example, meta=False)
    return rec.graph, rec.param_names, rec.user_inputs, rec.outputs


def trace(model: nn.Module, example: torch.Tensor, ignore: tuple[str, ...] = (),
          tracer: str = "auto", *, strict: bool = False) -> ChannelGraph:
    """Trace ``model`` on ``example`` (batch of 1 is enough) and build its channel graph.

    Modules in ``ignore`` (paths; a container covers everything below it) are opaque: no rule runs inside
    them, and every channel they read or write is pinned, with that reason in the report.

    An op whose rule cannot prune through it (:class:`KeepWhole`) keeps every channel it reads whole and
    makes its output opaque; each such op is listed in ``ChannelGraph.kept_whole``. So does an op of a module
    that declares, in its attribute ``trt_prune_fixed_axes`` (``{input axis: reason}``), input axes whose size it
    stores (the ONNX importer's reshapes to constant shapes) when the channels arrive on one of them.
    ``strict=True`` makes the first of them an error instead. An op with no rule at all is always an error.

    ``tracer``: ``dispatch`` records the ATen ops of one eager forward pass (fast, see :mod:`.record`),
    ``export`` uses ``torch.export`` (non-strict); both give the same op sequence on models export can trace.
    ``auto`` picks ``dispatch`` where this torch supports it.
    """
    if tracer not in TRACERS:
        raise PruneError(f"tracer must be one of {TRACERS}, got '{tracer}'")
    if tracer == "auto":
        tracer = "dispatch" if record.available() else "export"
    was_training = model.training
    model.eval()
    try:
        if tracer == "dispatch":
            graph, param_names, user_inputs, outputs = _recorded_graph(model, example)
        else:
            graph, param_names, user_inputs, outputs = _export_graph(model, example)
    finally:
        model.train(was_training)
    state = TraceState(model, param_names)
    env = state.env
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in param_names:
                env[node] = ParamRef(param_names[node.name], tuple(range(len(_shape(node)))))
            elif node.name in user_inputs:
                shape = _shape(node)
                if len(shape) >= 2:
                    elems = state.fresh(shape[1])
                    for e in elems:
                        state.pinned[e] = "input channels"
                    env[node] = Channels(1, elems)
            continue
        if node.op == "output":
            for a in node.all_input_nodes:
                ch = env.get(a)
                if isinstance(ch, (Channels, Multi)):
                    for e in ch.elements:
                        state.pinned.setdefault(e, "coupled to a model output")
            continue
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            src = env.get(node.args[0])
            env[node] = src[node.args[1]] if isinstance(src, list) else src if isinstance(src, Opaque) else None
            continue
        args = _map_args(list(node.args), env)
        flat_tracked = [a for a in _flatten_list(args) if isinstance(a, (Channels, Multi))]
        packet = getattr(node.target, "_overloadpacket", None)
        name = packet.__name__ if packet is not None else getattr(node.target, "__name__", str(node.target))
        if name in _NON_TENSOR_OPS:
            continue
        scope = _ignored_scope(node, ignore) if ignore else None
        if scope is not None:
            env[node] = _opaque(state, flat_tracked, scope)
            continue
        if not flat_tracked and name in _PRODUCERS:
            env[node] = CHANNEL_RULES[name](state, node, args)  # fresh channels, even from fixed inputs
            if env[node] is not None:
                continue
        if not flat_tracked:
            opaque = next((env[n] for n in node.all_input_nodes if isinstance(env.get(n), Opaque)), None)
            ref = args[0] if args and isinstance(args[0], ParamRef) else None
            env[node] = opaque or (_param_view(node, ref) if ref is not None else None)
            continue
        rule = CHANNEL_RULES.get(name)
        if rule is None:
            raise PruneError(f"no channel rule for op '{node.target}' in module '{_module_path(node)}': "
                             f"ignore that module (ignore=['{_module_path(node)}'], CLI --ignore) or register a "
                             "rule with trt_prune.pruning.register_channel_rule")
        try:
            _check_fixed_axes(state, node, args)
            if name not in _MULTI_AWARE and any(isinstance(a, Multi) for a in _flatten_list(args)):
                args = _collapse_args(state, args, node)
            env[node] = rule(state, node, args)
        except KeepWhole as exc:
            where = _module_path(node)
            if strict:
                raise PruneError(f"{exc} (strict: this would keep the channels of '{where}' whole; drop --strict "
                                 "to prune the rest, or register a rule with "
                                 "trt_prune.pruning.register_channel_rule)") from exc
            state.kept_whole.append(KeptWhole(where, name, str(exc)))
            env[node] = _opaque(state, flat_tracked, where, f"{name} in '{where}': {exc}")
    result = ChannelGraph(model, state, tuple(example.shape))
    result.outputs = outputs
    result.kept_whole = state.kept_whole
    return result


_PRODUCERS = {"conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
              "conv_transpose3d", "linear", "embedding"}
_MULTI_AWARE = {"flatten", "unflatten", "view", "reshape", "_unsafe_view", "reshape_as", "view_as", "permute",
                "transpose", "transpose_", "swapaxes", "swapdims", "instance_norm", *_UNARY}


def _collapse_args(state: TraceState, args, node):
    if isinstance(args, list):
        return [_collapse_args(state, a, node) for a in args]
    return collapse(state, args, node) if isinstance(args, Multi) else args


def _flatten_list(args):
    for a in args:
        if isinstance(a, list):
            yield from _flatten_list(a)
        else:
            yield a
