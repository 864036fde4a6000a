"""Small ONNX helpers shared by the export, clean, sparsity and profiling stages.

- :func:`save_onnx` writes a model atomically: the file appears complete or not at all.
- :func:`load_onnx` refuses external-data paths that escape the model's folder.
- :func:`node_module` maps an ONNX node back to the PyTorch module that produced it, for both exporters.
- :func:`onnx_sha256` hashes a model with its external data, for cache keys.
- :func:`load_source` and :func:`check_model` read and check the input of a stage that turns one ONNX file
  into another (clean, fp16); :func:`is_plugin` tells TensorRT plugin nodes, which ``onnx.checker`` and ONNX
  Runtime do not know.
- :func:`one_line` makes any exception one short line for an error message.
- :func:`graph_inputs`, :func:`given_input_shapes` and :func:`candidate_input_shapes`: the shape each graph
  input takes in a check, given by the user (validated against the fixed axes) or chosen so that every
  pooling, stride and resize of the graph accepts it (:func:`spatial_hints`).
- :func:`random_feeds`, :func:`run_onnxruntime` and :func:`compare_outputs` are the parity check used by
  export (ONNX vs torch); :func:`check_parity` runs two versions of one graph on the same seeded inputs
  (clean: cleaned vs source, fp16: fp16 vs fp32), and :func:`check_and_save` writes a rewritten graph only
  once it passes the checker and that check; each stage says its words and error class in a
  :class:`RewriteCheck`. :func:`carry_metadata` gives a graph rebuilt by onnx-graphsurgeon back the producer
  and the node scopes graphsurgeon drops.

onnx is imported at module level (it is light and needed by every function); onnxruntime is imported only
where a session is made.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx

from trt_prune.errors import OutputError, TrtPruneError

# protobuf cannot serialise a message of 2 GiB or more: bigger models must keep weights in external data.
PROTOBUF_LIMIT = 2**31 - 1

# Metadata keys the dynamo exporter writes on each node (as of torch 2.14). ``name_scopes`` is a Python list
# literal of module paths, ``['', 'backbone', 'backbone.stem', 'backbone.stem.bn', '<fx op>']``;
# ``namespace`` holds the same chain as ``'<path>: <class>/<path>: <class>/...'``.
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
NAMESPACE_KEY = "namespace"

# TorchScript appends ``_<n>`` to the scope of a module called for the n+1-th time (``/neck/up_1/Resize``).
_REPEAT_SUFFIX = re.compile(r"^(.*)_(\d+)$")


# --------------------------------------------------------------------------------------------- save / load
def save_onnx(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically and return the resolved path.

    Everything is written into a temporary folder beside ``path`` (same file system, so ``os.replace`` is
    atomic), then moved into place, the external data file first and the ``.onnx`` file last. On any failure
    the temporary folder is removed and nothing new is left behind. ``external_data=None`` keeps the weights
    inside the file unless the model is too big for protobuf (2 GiB); the data file is then
    ``<name>.onnx.data`` next to the model.

    Raises :class:`OutputError` when the folder cannot be created or written.
    """
    dst = Path(path)
    if external_data is None:
        external_data = model.ByteSize() > PROTOBUF_LIMIT
    with staging_folder(dst) as tmp:
        try:
            staged = tmp / dst.name
            if external_data:
                data_name = dst.name + ".data"
                onnx.save_model(model, staged, save_as_external_data=True, all_tensors_to_one_file=True,
                                location=data_name, size_threshold=1024)
                # onnx moved the weights out of the caller's proto while saving; read them back into it
                onnx.external_data_helper.load_external_data_for_model(model, str(tmp))
                if (tmp / data_name).exists():
                    os.replace(tmp / data_name, dst.parent / data_name)
            else:
                onnx.save_model(model, staged)
            os.replace(staged, dst)
        except OSError as exc:
            raise OutputError(f"cannot write {str(dst)!r}: {exc.strerror or exc}; "
                              "check free space and permissions of the folder") from exc
    return dst.resolve()


def load_onnx(path: str | os.PathLike, *, load_external_data: bool = True,
              error: type[TrtPruneError] = TrtPruneError) -> onnx.ModelProto:
    """Load an ONNX model, refusing external data that points outside the model's folder.

    A model file can name any path as the location of its weights (``../../etc/passwd``, an absolute path);
    loading such a file from an untrusted source would read, and later copy into outputs, files it has no
    business with. ``error`` is the exception class raised (each stage passes its own, e.g. ``CleanError``).
    """
    src = Path(path)
    if not src.exists():
        raise error(f"ONNX file {str(src)!r} does not exist; check the path (export one with `trt-prune export`)")
    if not src.is_file():
        raise error(f"ONNX path {str(src)!r} is not a file; give the path of a .onnx file")
    try:
        model = onnx.load_model(str(src), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx may raise others: all mean "not ONNX"
        raise error(f"{str(src)!r} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                    "re-export it or check that the file is complete") from exc
    if not model.HasField("graph") or not model.opset_import:
        # protobuf parses many byte strings (an empty file, some text) as an empty message without error
        raise error(f"{str(src)!r} is not an ONNX model (no graph or opset in it); re-export it")
    base = src.resolve().parent
    locations = external_locations(model)
    for location in locations:
        target = (base / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(base):
            raise error(f"{str(src)!r} names external data {location!r} outside its folder {str(base)!r}; "
                        "refusing to read it. Keep weight files next to the model")
        if not target.is_file():
            raise error(f"{str(src)!r} needs external data {location!r}, which is missing from {str(base)!r}; "
                        "copy the .data file next to the model")
    if load_external_data and locations:
        onnx.external_data_helper.load_external_data_for_model(model, str(base))
    return model


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from _tensors(attr.g)
        for g in attr.graphs:
            yield from _tensors(g)


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The distinct external-data file locations ``model`` refers to, in first-use order."""
    found: dict[str, None] = {}
    tensors = list(_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors.extend(_node_tensors(node))
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.setdefault(entry.value)
    return list(found)


def onnx_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of an ONNX file and of the external data files it names, if any.

    The weights are part of what an engine is built from, so a cache keyed by this hash changes when
    only an external ``.data`` file changes.
    """
    src = Path(path)
    if not src.is_file():
        raise TrtPruneError(f"cannot hash {str(src)!r}: no such file; give the path of a .onnx file")
    digest = hashlib.sha256()
    with src.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    try:
        model = onnx.load_model(str(src), load_external_data=False)
        locations = external_locations(model)
    except Exception:  # not parseable: the bytes alone are the identity
        locations = []
    base = src.resolve().parent
    for location in sorted(locations):
        target = (base / location).resolve()
        digest.update(b"\0" + location.encode() + b"\0")
        if target.is_relative_to(base) and target.is_file():
            with target.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------- errors and checks
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException, limit: int = 300, *, with_type: bool = False) -> str:
    """``exc`` as one line of at most ``limit`` characters for an error message: colour codes dropped, white
    space folded, the class name when there is no text (or always, ``with_type=True``)."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    if with_type or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# TensorRT plugins (``EfficientNMS_TRT`` from ``export --nms --nms-plugin efficient``) sit in ONNX's default
# domain, where TensorRT's parser looks them up, but ONNX does not define them: onnx.checker refuses them and
# ONNX Runtime cannot run them. The checker sees them in this domain instead; parity stops in front of them.
PLUGIN_CHECK_DOMAIN = "trt.plugins"


def name_allocator(taken: set[str]) -> Callable[[str], str]:
    """``fresh(base)``: ``base``, or ``base_1``, ``base_2``… — the first name not in ``taken`` (which it joins),
    for tensors and nodes a graph rewrite adds."""

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    return fresh


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports; 0 when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def is_plugin(node: onnx.NodeProto) -> bool:
    """A node in ONNX's default domain whose op ONNX does not define: a TensorRT plugin."""
    return node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model``, with TensorRT plugin nodes (:func:`is_plugin`) checked as custom ops."""
    if any(is_plugin(n) for n in model.graph.node):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        for node in copy.graph.node:
            if is_plugin(node):
                node.domain = PLUGIN_CHECK_DOMAIN
        copy.opset_import.append(onnx.helper.make_opsetid(PLUGIN_CHECK_DOMAIN, 1))
        model = copy
    onnx.checker.check_model(model)


def load_source(src, dst, error: type[TrtPruneError], stage: str) -> tuple[Path, Path, onnx.ModelProto]:
    """The checked input model of a stage that reads ONNX file ``src`` and writes ``dst``: ``dst`` may not be
    ``src`` itself (inputs are never overwritten), and ``src`` must load and pass the ONNX checker; each
    failure is one ``error`` saying what to do."""
    src_path, dst_path = Path(src), Path(dst)
    if dst_path.exists() and src_path.exists() and dst_path.resolve() == src_path.resolve():
        raise error(f"dst {str(dst_path)!r} is the source file itself; {stage} never overwrites its input, "
                    "give another output path")
    model = load_onnx(src_path, error=error)
    try:
        check_model(model)
    except Exception as exc:  # ValidationError, and the C++ checker's other complaints (bad opset, IR version)
        raise error(f"{str(src_path)!r} is not a valid ONNX model ({one_line(exc)}); re-export it") from exc
    return src_path, dst_path, model


# ------------------------------------------------------------------------------------------- input shapes
class InputDims(NamedTuple):
    """A graph input as the shape checks see it: ``shape`` holds an int for a fixed axis and the dimension's
    name (or None) for a dynamic one."""

    name: str
    shape: tuple[int | str | None, ...]


InputShape = Sequence[int] | Mapping[str, Sequence[int]]


def graph_inputs(model: onnx.ModelProto) -> list[InputDims]:
    """The real inputs of ``model`` (initializers listed as inputs left out), in order. A dimension without a
    value, or with a negative one (some converters write -1 for "any"), is dynamic."""
    initializers = {t.name for t in model.graph.initializer}
    found = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims: list[int | str | None] = []
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value >= 0:
                dims.append(int(dim.dim_value))
            else:
                dims.append(dim.dim_param or None)
        found.append(InputDims(value.name, tuple(dims)))
    return found


def _fixed(dim) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0


def _shape_text(shape: Sequence) -> str:
    return "[" + ", ".join(repr(d) if isinstance(d, str) or d is None else str(d) for d in shape) + "]"


def given_input_shapes(inputs: onnx.ModelProto | Sequence[Any], input_shape: InputShape | None,
                       error: type[TrtPruneError] = TrtPruneError) -> dict[str, tuple[int, ...]]:
    """The user's ``input_shape`` as ``{input name: shape}``, checked against the graph's ``inputs``: a model
    (its :func:`graph_inputs`) or items with ``.name`` and ``.shape`` (:class:`InputDims`, the backends'
    ``TensorSpec``).

    ``input_shape`` is one full shape (batch axis included) when the model has one input, or a dict by input
    name; inputs left out are not in the result. Each shape needs the input's rank, positive integer sizes,
    and the value of every fixed axis. Any violation is one ``error`` naming the input, the value given and
    the ONNX shape.
    """
    if isinstance(inputs, onnx.ModelProto):
        inputs = graph_inputs(inputs)
    names = [i.name for i in inputs]
    if input_shape is None:
        return {}
    if isinstance(input_shape, Mapping):
        raw = dict(input_shape)
    elif isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise error(f"input_shape must be a shape (a sequence of ints) or a dict from input name to shape, got "
                    f"{input_shape!r}")
    else:
        if len(inputs) != 1:
            raise error(f"the model has {len(inputs)} inputs {names}; give input_shape as a dict from input name "
                        "to shape")
        raw = {names[0]: input_shape}
    unknown = sorted(str(k) for k in raw if k not in names)
    if unknown:
        raise error(f"input_shape names {unknown}, which are not model inputs {names}")
    given: dict[str, tuple[int, ...]] = {}
    for spec in inputs:
        if spec.name not in raw:
            continue
        value = raw[spec.name]
        sizes = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else None
        if sizes is None or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in sizes) \
                or len(sizes) != len(spec.shape) or any(d < 1 for d in sizes):
            raise error(f"input_shape for {spec.name!r} is {value!r}; it must be {len(spec.shape)} positive "
                        f"integer sizes matching the ONNX shape {_shape_text(spec.shape)}")
        shape = tuple(int(d) for d in sizes)
        for axis, want in enumerate(spec.shape):
            if _fixed(want) and shape[axis] != want:
                raise error(f"input_shape for {spec.name!r} is {list(shape)}, but axis {axis} is fixed at {want} "
                            f"in the ONNX shape {_shape_text(spec.shape)}")
        given[spec.name] = shape
    return given


# Ops whose output has the spatial layout of their input (element-wise, normalisation, concatenation,
# padding, permutation): the downsampling factor of a tensor passes through them. Any other op (Flatten,
# Reshape, Gemm, global pooling, reductions) ends the trace.
_SPATIAL_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Relu", "LeakyRelu", "PRelu", "Sigmoid",
    "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Exp", "Log",
    "Sqrt", "Reciprocal", "Neg", "Abs", "Erf", "Gelu", "Mish", "ThresholdedRelu", "Identity", "Dropout", "Cast",
    "BatchNormalization", "InstanceNormalization", "LRN", "Concat", "Pad", "Split", "Where", "Transpose",
    "Softmax", "LogSoftmax", "QuantizeLinear", "DequantizeLinear", "Sign", "Floor", "Ceil", "Round",
})
_STRIDED_OPS = frozenset({"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"})
_MAX_STRIDE = 1024


def spatial_hints(model: onnx.ModelProto) -> tuple[int, int]:
    """``(stride, minimum)`` for the dynamic spatial axes of ``model``'s inputs: a size that is a multiple of
    ``stride`` and at least ``minimum`` suits every pooling, strided convolution and resize in the graph.

    Each tensor computed from an input carries its downsampling factor (input pixels per pixel): a Conv or
    pooling multiplies it by its stride, a ConvTranspose or a Resize with constant scales divides it. The
    stride is the least common multiple of the integer factors met (a U-Net's skip connection only adds up
    when the input divides by its deepest stride); the minimum is the largest ``factor * window`` among the
    windowed ops, the window being the kernel's extent less its padding (a 3x3 pooling without padding needs
    3 pixels at its level). Approximate by design: :func:`candidate_input_shapes` tries the sizes in ONNX
    Runtime.
    """
    constants = _constant_tensors(model)
    dynamic = {i.name for i in graph_inputs(model) if any(not _fixed(d) for d in i.shape[1:])}
    factor: dict[str, float] = dict.fromkeys(dynamic, 1.0)
    stride, minimum = 1, 1
    for node in model.graph.node:
        traced = [factor[t] for t in node.input if t in factor]
        if not traced or (node.op_type in _STRIDED_OPS and node.input[0] not in factor):
            continue
        base = factor[node.input[0]] if node.input[0] in factor else max(traced)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        out: float | None = base
        if node.op_type in _STRIDED_OPS:
            kernel = list(attrs.get("kernel_shape") or [])
            if not kernel and len(node.input) > 1 and node.input[1] in constants:
                kernel = list(_tensor_dims(constants[node.input[1]])[2:])
            rank = len(kernel)
            strides = list(attrs.get("strides") or [1] * rank)
            dilations = list(attrs.get("dilations") or [1] * rank)
            pads = list(attrs.get("pads") or [0] * (2 * rank))
            auto_pad = attrs.get("auto_pad", b"NOTSET")
            auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
            for axis, k in enumerate(kernel):
                extent = dilations[axis] * (int(k) - 1) + 1 if axis < len(dilations) else int(k)
                if auto_pad.startswith("SAME"):
                    extent = 1
                elif auto_pad != "VALID" and len(pads) == 2 * rank:
                    extent -= int(pads[axis]) + int(pads[axis + rank])
                minimum = max(minimum, math.ceil(base * extent))
            out = base * max([int(s) for s in strides] or [1])
        elif node.op_type == "ConvTranspose":
            out = base / max([int(s) for s in attrs.get("strides") or [1]])
        elif node.op_type in ("Resize", "Upsample"):
            slot = 2 if node.op_type == "Resize" else 1
            scales = _small_array(constants.get(node.input[slot])) if len(node.input) > slot else None
            if scales is None or scales.size < 3 or not np.all(scales > 0):
                out = None  # resized to a computed size: its factor is not known here
            else:
                out = base / float(np.max(scales.reshape(-1)[2:]))
        elif node.op_type not in _SPATIAL_OPS:
            out = None
        if out is None:
            continue
        if abs(out - round(out)) < 1e-6 and round(out) >= 1:
            grown = math.lcm(stride, int(round(out)))
            stride = grown if grown <= _MAX_STRIDE else max(stride, int(round(out)))
        for name in node.output:
            if name:
                factor[name] = out
    return stride, max(minimum, 1)


def _constant_tensors(model: onnx.ModelProto) -> dict[str, Any]:
    """Initializers and ``Constant`` node values of the main graph by name, as they are in the proto (a
    ``TensorProto``, or an ``AttributeProto`` for the ``value_float(s)``/``value_int(s)`` forms): nothing is
    decoded until :func:`_tensor_dims` or :func:`_small_array` asks."""
    found: dict[str, Any] = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.domain in ("", "ai.onnx") and node.attribute:
            attr = node.attribute[0]
            found[node.output[0]] = attr.t if attr.name == "value" else attr
    return found


def _tensor_dims(value) -> tuple[int, ...]:
    if isinstance(value, onnx.TensorProto):
        return tuple(int(d) for d in value.dims)
    return np.shape(onnx.helper.get_attribute_value(value))


def _small_array(value, limit: int = 64) -> np.ndarray | None:
    """The values of a small constant (Resize scales), or None when it is missing, large or unreadable."""
    from onnx import numpy_helper

    if value is None or int(np.prod(_tensor_dims(value), dtype=np.int64)) > limit:
        return None
    try:
        if isinstance(value, onnx.TensorProto):
            return numpy_helper.to_array(value)
        return np.asarray(onnx.helper.get_attribute_value(value))
    except Exception:  # external data, sparse tensors, strings: not a size hint
        return None


DEFAULT_SPATIAL_SIZES = (224, 320)


def candidate_input_shapes(model: onnx.ModelProto, given: Mapping[str, Sequence[int]] | None = None
                           ) -> tuple[list[dict[str, tuple[int, ...]]], list[str]]:
    """Shapes to try for the graph inputs, best first, and the inputs whose non-batch sizes were chosen here.

    Inputs in ``given`` keep their shape. For the others: the fixed axes as they are, a dynamic axis 0 (the
    batch) 1, and the other dynamic axes a size from this list: the smallest multiple of the graph's stride
    that is at least its minimum (:func:`spatial_hints`), twice that, then the multiples of the stride nearest
    above 224 and 320. The first candidate gives two dynamic axes of one input different sizes (the smallest,
    then one stride more, ...), so that a pass that mixes up height and width shows in a parity check; the
    others are square. Without dynamic non-batch axes there is one candidate.
    """
    given = {k: tuple(int(d) for d in v) for k, v in (given or {}).items()}
    inputs = graph_inputs(model)
    chosen = [i.name for i in inputs if i.name not in given and any(not _fixed(d) for d in i.shape[1:])]
    stride, sizes = 1, [1]
    if chosen:
        stride, minimum = spatial_hints(model)
        first = max(stride, math.ceil(minimum / stride) * stride)
        sizes = list(dict.fromkeys([first, 2 * first,
                                    *(max(first, math.ceil(s / stride) * stride) for s in DEFAULT_SPATIAL_SIZES)]))

    def shapes_at(size: int, step: int) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for spec in inputs:
            if spec.name in given:
                shapes[spec.name] = given[spec.name]
                continue
            dims, grown = [], 0
            for axis, d in enumerate(spec.shape):
                if _fixed(d):
                    dims.append(int(d))
                elif axis == 0:
                    dims.append(1)
                else:
                    dims.append(size + grown * step)
                    grown += 1
            shapes[spec.name] = tuple(dims)
        return shapes

    candidates = [shapes_at(size, 0) for size in sizes]
    if any(sum(not _fixed(d) for d in i.shape[1:]) > 1 for i in inputs if i.name in chosen):
        candidates.insert(0, shapes_at(sizes[0], stride))
    return candidates, chosen


# ------------------------------------------------------------------------------------------ module scopes
def node_module(node, modules: Collection[str] | Mapping[str, object] | None = None) -> str | None:
    """The dotted PyTorch module path (as in ``model.named_modules()``) an ONNX node came from.

    ``node`` is an ``onnx.NodeProto`` or an onnx-graphsurgeon node. Returns ``""`` for ops at the top level
    of the model (the root module's name), ``None`` when the node carries no scope (nodes made by graph
    optimisers, TorchScript nodes named ``Identity_62``).

    - dynamo exporter: the node's ``pkg.torch.onnx.name_scopes`` metadata (fallback ``namespace``). A Conv that
      the exporter fused with its BatchNorm carries the BatchNorm's scope; when the Conv's weight is named
      ``<module>.weight`` inside the same scope the weight's module is returned, which is the Conv.
    - TorchScript exporter: the node name, ``/backbone/stage1/stage1.0/conv/Conv`` → ``backbone.stage1.0.conv``.
      A module called repeatedly gets scopes ``up``, ``up_1``, ...; the ``_<n>`` suffix is dropped. Pass
      ``modules`` (``dict(model.named_modules())`` or its keys) to decide exactly when a module's own name
      ends in ``_<n>``.
    """
    props = _metadata(node)
    scopes = _dynamo_scopes(props)
    if scopes is not None:
        return _from_scopes(scopes, _input_names(node))
    name = node.name or ""
    if not name.startswith("/"):
        return None
    parts = name.split("/")[1:-1]  # the last part is the op (``Conv``, ``Slice_1``)
    return _from_torchscript(parts, modules)


def _metadata(node) -> dict[str, str]:
    if isinstance(node, onnx.NodeProto):
        return {p.key: p.value for p in node.metadata_props}
    meta = getattr(node, "metadata_props", None)  # onnx-graphsurgeon keeps none today; future versions may
    return dict(meta) if isinstance(meta, Mapping) else {}


def _input_names(node) -> list[str]:
    if isinstance(node, onnx.NodeProto):
        return list(node.input)
    return [getattr(t, "name", "") for t in getattr(node, "inputs", [])]


def _dynamo_scopes(props: Mapping[str, str]) -> list[str] | None:
    if SCOPES_KEY in props:
        try:
            scopes = ast.literal_eval(props[SCOPES_KEY])
        except (ValueError, SyntaxError):
            scopes = None
        if isinstance(scopes, list) and all(isinstance(s, str) for s in scopes):
            return scopes
    if NAMESPACE_KEY in props:
        # '<path>: <class>/<path>: <class>/.../<fx op>: <aten op>'; module paths never contain ': ' or '/'
        return [part.split(": ", 1)[0] for part in props[NAMESPACE_KEY].split("/")]
    return None


def _from_scopes(scopes: list[str], inputs: list[str]) -> str:
    chain = scopes[:-1]  # the last entry names the fx op (``silu``, ``conv2d_47``), not a module
    deepest = chain[-1] if chain else ""
    for name in inputs[1:]:
        if name.endswith(".weight"):
            owner = name[: -len(".weight")]
            parent = owner.rsplit(".", 1)[0] if "." in owner else ""
            if owner != deepest and parent in chain:
                return owner
    return deepest


def _from_torchscript(parts: list[str], modules: Collection[str] | Mapping[str, object] | None) -> str:
    path, last = "", None
    for part in parts:
        options = [part]
        repeat = _REPEAT_SUFFIX.match(part)
        if repeat:
            # without the model, read ``_<n>`` as torch's repeat counter; with it, prefer what exists
            options = [part, repeat.group(1)] if modules is not None else [repeat.group(1)]
        joined = [_join_scope(path, last, option) for option in options]
        pick = next((i for i, full in enumerate(joined) if modules is None or full in modules), len(options) - 1)
        path, last = joined[pick], options[pick]
    return path


def _join_scope(path: str, last: str | None, part: str) -> str:
    # Each part is the module's name relative to the last *called* ancestor, so a container's child repeats
    # the container's name: ``stage1/stage1.0`` is ``stage1.0``, not ``stage1.stage1.0``.
    if last is not None and part.startswith(last + "."):
        path = path[: len(path) - len(last)].rstrip(".")
    return f"{path}.{part}" if path else part


# ------------------------------------------------------------------------------------------------ parity
_NUMPY_OF_ONNX = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


def random_feeds(model: onnx.ModelProto, *, batch: int = 1, seed: int = 0,
                 dims: Mapping[str, int] | None = None,
                 shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input of ``model`` (initializers listed as inputs excluded).

    An input named in ``shapes`` takes that shape. Otherwise a symbolic dimension named in ``dims``
    (``{"height": 352}``) takes that size; other symbolic or unknown dimensions become ``batch`` for the first
    axis and 1 elsewhere. Floats are standard normal, integers lie in [0, 4), booleans are fair coins.
    """
    dims = dict(dims or {})
    shapes = dict(shapes or {})
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = _NUMPY_OF_ONNX.get(tensor_type.elem_type)
        if dtype is None:
            raise TrtPruneError(f"input {value.name!r} has ONNX element type {tensor_type.elem_type}, which the "
                                f"parity check cannot generate; supported: {sorted(_NUMPY_OF_ONNX)}")
        if value.name in shapes:
            shape = [int(d) for d in shapes[value.name]]
        else:
            shape = []
            for axis, dim in enumerate(tensor_type.shape.dim):
                if dim.HasField("dim_value") and dim.dim_value >= 0:  # -1: "any", as some converters write
                    shape.append(dim.dim_value)
                elif dim.HasField("dim_param") and dim.dim_param in dims:
                    shape.append(int(dims[dim.dim_param]))
                else:
                    shape.append(batch if axis == 0 else 1)
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def ort_session(model: onnx.ModelProto | str | os.PathLike, *, quiet: bool = False):
    """An ONNX Runtime CPU session of ``model`` (a proto or a path). ``quiet`` also silences ONNX Runtime's own
    log line for a failing run (the exception carries the same text)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3  # parity runs should not print graph-optimisation warnings
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnxruntime(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
    """Run ``model`` (a proto or a path) once in ONNX Runtime on the CPU and return outputs by name."""
    return _run(ort_session(model), feeds)


def _run(session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def compare_outputs(actual: np.ndarray, expected: np.ndarray, *, atol: float, rtol: float) -> dict[str, float]:
    """Error of ``actual`` against the reference ``expected``: ``max_abs``, ``max_rel`` and ``mismatched``.

    ``max_rel = max |a - b| / (|b| + eps)`` with ``eps = 1e-3 * max |b|`` (plus the smallest normal float):
    relative to each element, but never to less than 0.1% of the output's largest magnitude, so an element
    that happens to be near zero does not make a tiny absolute error look huge. ``mismatched`` counts the
    elements failing ``|a - b| <= atol + rtol * |b|`` (the numpy/torch ``allclose`` rule), which is what
    pass/fail is decided on. Shapes must match; NaN or inf differences count as mismatches.
    """
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape:
        raise TrtPruneError(f"output shapes differ: {a.shape} vs reference {b.shape}")
    if a.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "mismatched": 0}
    # NaN where the reference has NaN, or the same infinity, is parity (inf - inf would be NaN)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    diff = np.where(same, 0.0, np.abs(a - b))
    magnitude = np.abs(b)
    finite = magnitude[np.isfinite(magnitude)]
    eps = 1e-3 * (float(finite.max()) if finite.size else 0.0) + np.finfo(np.float32).tiny
    rel = diff / (magnitude + eps)
    bad = ~(diff <= atol + rtol * magnitude)
    return {"max_abs": float(np.nanmax(np.where(np.isnan(diff), np.inf, diff))),
            "max_rel": float(np.nanmax(np.where(np.isnan(rel), np.inf, rel))),
            "mismatched": int(bad.sum())}


def plugin_inputs(node: onnx.NodeProto) -> list[int] | None:
    """Where cleaning's parity stops: at a TensorRT plugin, compared on all its inputs (ORT cannot run it)."""
    return list(range(len(node.input))) if is_plugin(node) else None


def parity_points(model: onnx.ModelProto, stop: Callable[[onnx.NodeProto], Sequence[int] | None]
                  ) -> tuple[list[str], list[tuple[str, int]]]:
    """Where two versions of ``model`` are compared: ``(graph outputs, [(node name, input slot)])``.

    ``stop(node)`` gives the input slots of a node to compare instead of what it and everything after it
    compute (None for an ordinary node). Graph outputs not behind such a node are compared directly.
    """
    constants = {t.name for t in model.graph.initializer}
    after: set[str] = set()
    probes: list[tuple[str, int]] = []
    for node in model.graph.node:  # topological order
        slots = stop(node)
        if slots is not None:
            probes += [(node.name, i) for i in slots if i < len(node.input) and node.input[i]
                       and node.input[i] not in after and node.input[i] not in constants]
            after.update(o for o in node.output if o)
        elif any(t in after for t in node.input):
            after.update(o for o in node.output if o)
    return [v.name for v in model.graph.output if v.name not in after], probes


def probe_model(model: onnx.ModelProto, outputs: list[str], probes: list[tuple[str, int]]
                ) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that computes only ``outputs`` and the probed node inputs (what comes after them is
    dropped), and the names of those tensors in order."""
    import onnx_graphsurgeon as gs

    nodes = {n.name: n for n in model.graph.node}
    names = [nodes[name].input[slot] for name, slot in probes]
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    graph.outputs = [tensors[name] for name in dict.fromkeys([*outputs, *names])]
    graph.cleanup()
    return gs.export_onnx(graph, do_type_check=False), [*outputs, *names]


@dataclass(frozen=True)
class RewriteCheck:
    """How a stage that rewrites a graph (clean, fp16) checks the result before writing it
    (:func:`check_and_save`, :func:`check_parity`): the error class it raises, the words for the two graphs
    and for what to do, where the comparison stops, and whether the inputs are cast to the rewritten graph's
    own input types (fp16 inputs)."""

    error: type[TrtPruneError]
    reference: str  # "the source graph"
    candidate: str  # "the cleaned graph"
    changed: str  # what a mismatch means: "cleaning changed what the graph computes"
    remedy: str  # what to do about a mismatch or a candidate ORT cannot run
    disable: str  # how to go without the check: "pass check_parity=False to clean without it"
    invalid: str  # what to do when the result fails onnx.checker
    stop: Callable[[onnx.NodeProto], Sequence[int] | None] = plugin_inputs
    cast_inputs: bool = False


def carry_metadata(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """Give ``model``, rebuilt from ``original`` by onnx-graphsurgeon, back what graphsurgeon does not carry: IR
    version, producer, doc string, model metadata, and each node's ``metadata_props`` (the dynamo exporter's
    module scopes), matched by node name. Returns ``model``."""
    model.ir_version = original.ir_version
    model.producer_name, model.producer_version = original.producer_name, original.producer_version
    model.doc_string = original.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    scopes = {n.name: n.metadata_props for n in original.graph.node if n.name and n.metadata_props}
    for node in model.graph.node:
        if node.name in scopes and not node.metadata_props:
            node.metadata_props.extend(scopes[node.name])
    return model


def check_and_save(reference: onnx.ModelProto, candidate: onnx.ModelProto, dst: str | os.PathLike,
                   check: RewriteCheck, *, parity: bool = True, atol: float, rtol: float, seed: int = 0,
                   given: Mapping[str, Sequence[int]] | None = None) -> tuple[Path, Parity]:
    """Write ``candidate`` (rewritten from ``reference``) to ``dst`` once it passes ``onnx.checker`` and, with
    ``parity``, :func:`check_parity`; nothing is written otherwise. Returns the written path and the parity
    (empty, with the shapes in ``given``, when ``parity`` is off)."""
    try:
        check_model(candidate)
    except Exception as exc:  # onnx.checker's ValidationError, and its C++ complaints
        raise check.error(f"{check.candidate} fails onnx.checker ({one_line(exc)}); nothing was written. "
                          f"{check.invalid}") from exc
    result = Parity({}, {name: list(shape) for name, shape in (given or {}).items()})
    if parity:
        result = check_parity(reference, candidate, check, atol=atol, rtol=rtol, seed=seed, given=given)
    return save_onnx(candidate, dst), result


@dataclass
class Parity:
    """The result of :func:`check_parity`: per compared tensor ``{"max_abs", "max_rel", "mismatched"}`` (worst
    over the runs), and the input shapes of the first run."""

    outputs: dict[str, dict[str, float]]
    input_shapes: dict[str, list[int]]


def check_parity(reference: onnx.ModelProto, candidate: onnx.ModelProto, check: RewriteCheck, *, atol: float,
                 rtol: float, seed: int = 0, given: Mapping[str, Sequence[int]] | None = None) -> Parity:
    """Run ``reference`` and ``candidate`` in ONNX Runtime on the same seeded inputs and compare what they
    compute, output by output; any difference beyond ``|candidate - reference| <= atol + rtol * |reference|``
    is one ``check.error``.

    Inputs take the shapes in ``given`` (see :func:`given_input_shapes`); the others are chosen by
    :func:`candidate_input_shapes`, the first that the reference runs at winning. When the reference runs at
    none, the error names the input and asks for its shape. A second run at batch 2 follows when axis 0 of an
    input is dynamic (a wrongly copied batch dimension goes unnoticed at batch 1), unless the reference itself
    refuses batch 2. ``check.stop`` names nodes that are compared on their inputs instead of on what follows
    them (TensorRT plugins, which ONNX Runtime cannot run; selection ops whose output may legitimately reorder).
    A failure of the check's own machinery is a ``check.error`` too.
    """
    try:
        return _check_parity(reference, candidate, check, atol, rtol, seed, given or {})
    except TrtPruneError:
        raise
    except Exception as exc:
        raise check.error(f"the parity check failed ({one_line(exc)}); nothing was written. {check.disable}") from exc


def _check_parity(reference: onnx.ModelProto, candidate: onnx.ModelProto, check: RewriteCheck, atol: float,
                  rtol: float, seed: int, given: Mapping[str, Sequence[int]]) -> Parity:
    outputs, probes = parity_points(reference, check.stop)
    reference_model, reference_names = reference, outputs
    candidate_model, candidate_names = candidate, outputs
    if probes:
        present = {n.name for n in candidate.graph.node}
        missing = [name for name, _ in probes if name not in present]
        if missing:
            raise check.error(f"node(s) {missing}, whose inputs parity compares, disappeared from {check.candidate}; "
                              f"nothing was written. {check.remedy}")
        reference_model, reference_names = probe_model(reference, outputs, probes)
        candidate_model, candidate_names = probe_model(candidate, outputs, probes)
    labels = [*outputs, *(f"{name}:input{slot}" for name, slot in probes)]
    try:
        reference_session = ort_session(reference_model, quiet=True)
    except Exception as exc:
        raise check.error(f"ONNX Runtime cannot load {check.reference} ({one_line(exc)}), so parity cannot be "
                          f"checked; {check.disable}") from exc
    shapes, expected = _first_runnable(reference, reference_session, given, seed, check)
    try:
        candidate_session = ort_session(candidate_model, quiet=True)
    except Exception as exc:
        raise check.error(f"ONNX Runtime cannot load {check.candidate} ({one_line(exc)}); nothing was written. "
                          f"{check.remedy}") from exc
    runs = [(shapes, expected)]
    batch_two = _batch_two(reference, shapes)
    if batch_two is not None:
        try:
            runs.append((batch_two, _run(reference_session, random_feeds(reference, shapes=batch_two, seed=seed + 2))))
        except Exception:  # the graph is dynamic in name only (a Reshape to batch 1 inside): batch 1 it is
            pass
    types = {v.name: v.type.tensor_type.elem_type for v in candidate.graph.input}
    parity: dict[str, dict[str, float]] = {}
    failing = []
    for index, (run_shapes, expected) in enumerate(runs):
        feeds = random_feeds(reference, shapes=run_shapes, seed=seed + index + 1)
        if check.cast_inputs:
            feeds = {k: v.astype(_NUMPY_OF_ONNX[types[k]]) if types.get(k) in _NUMPY_OF_ONNX else v
                     for k, v in feeds.items()}
        batch = next(iter(run_shapes.values()), (1,))[:1] or (1,)
        where = f"batch {batch[0]}"
        try:
            got = _run(candidate_session, feeds)
        except Exception as exc:
            raise check.error(f"ONNX Runtime cannot run {check.candidate} at {where} ({one_line(exc)}); nothing was "
                              f"written. {check.remedy}") from exc
        for label, reference_name, name in zip(labels, reference_names, candidate_names, strict=True):
            if name not in got:
                raise check.error(f"output {label!r} disappeared from {check.candidate}; nothing was written")
            reference_value = expected[reference_name]
            try:
                error = compare_outputs(got[name], reference_value, atol=atol, rtol=rtol)
            except TrtPruneError as exc:
                raise check.error(f"output {label!r} at {where}: {exc}; nothing was written") from exc
            entry = parity.setdefault(label, {"max_abs": 0.0, "max_rel": 0.0, "mismatched": 0})
            entry["max_abs"] = max(entry["max_abs"], error["max_abs"])
            entry["max_rel"] = max(entry["max_rel"], error["max_rel"])
            entry["mismatched"] += error["mismatched"]
            if error["mismatched"]:
                failing.append(f"{label} at {where}: {error['mismatched']} of {np.size(reference_value)} element(s) "
                               f"off, max_abs {error['max_abs']:.3g}, max_rel {error['max_rel']:.3g}")
    if failing:
        raise check.error(f"{check.changed} beyond atol={atol}, rtol={rtol} ({'; '.join(failing)}); nothing was "
                          f"written. {check.remedy}")
    return Parity(parity, {name: list(shape) for name, shape in shapes.items()})


def _first_runnable(model: onnx.ModelProto, session, given: Mapping[str, Sequence[int]], seed: int,
                    check: RewriteCheck) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """The first candidate input shapes (:func:`candidate_input_shapes`) ``session`` runs at, and its outputs."""
    candidates, chosen = candidate_input_shapes(model, given)
    failures = []
    for shapes in candidates:
        try:
            return shapes, _run(session, random_feeds(model, shapes=shapes, seed=seed + 1))
        except Exception as exc:
            failures.append((shapes, exc))
    shapes, last = failures[-1]
    if not chosen:
        hint = "give an input_shape the model accepts, or " if given else ""
        raise check.error(f"ONNX Runtime cannot run {check.reference} at input shape "
                          f"{ {k: list(v) for k, v in shapes.items()} } ({one_line(last)}), so parity cannot be "
                          f"checked; {hint}{check.disable}") from last
    inputs = {i.name: i for i in graph_inputs(model)}
    described = ", ".join(f"{name!r} (ONNX shape {_shape_text(inputs[name].shape)})" for name in chosen)
    example = [1 if axis == 0 and not _fixed(d) else (d if _fixed(d) else f"<{d or f'axis {axis}'}>")
               for axis, d in enumerate(inputs[chosen[0]].shape)]
    tried = ", ".join(str(_chosen_size(s, inputs[chosen[0]])) for s, _ in failures)
    raise check.error(f"cannot choose a size for the dynamic axes of input {described}: ONNX Runtime fails at every "
                      f"size tried ({tried}; last: {one_line(last, 200)}); pass input_shape (CLI: --input-shape) "
                      f"with the full shape the model takes, e.g. [{', '.join(str(d) for d in example)}]") from last


def _chosen_size(shapes: Mapping[str, Sequence[int]], spec: InputDims) -> str:
    return "x".join(str(shapes[spec.name][axis]) for axis, d in enumerate(spec.shape) if axis > 0 and not _fixed(d))


def _batch_two(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]] | None:
    """``shapes`` at batch 2 for every input whose axis 0 is dynamic and now 1; None when there is none."""
    inputs = {i.name: i for i in graph_inputs(model)}
    grown = {}
    for name, shape in shapes.items():
        spec = inputs.get(name)
        if spec is not None and spec.shape and not _fixed(spec.shape[0]) and shape and shape[0] == 1:
            grown[name] = (2, *shape[1:])
    return {**shapes, **grown} if grown else None


@contextlib.contextmanager
def staging_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` (for tools that must write a file themselves), removed on exit.

    Raises :class:`OutputError` naming ``path`` when its folder cannot be created or written.
    """
    dst = Path(path)
    if dst.is_dir():
        raise OutputError(f"output path {str(dst)!r} is a folder; give a file name such as {str(dst / 'model.onnx')!r}")
    folder = dst.parent if str(dst.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {str(folder)!r} (for {str(dst)!r}): "
                          f"{exc.strerror or exc}; choose a folder you can write to") from exc
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
