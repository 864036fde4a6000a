"""Small ONNX helpers shared by the export, clean, sparsity and profiling stages.

- :func:`save_onnx` writes a model atomically: the file appears complete or not at all.
- :func:`load_onnx` refuses external-data paths that escape the model's folder.
- :func:`node_module` maps an ONNX node back to the PyTorch module that produced it, for both exporters.
- :func:`onnx_sha256` hashes a model with its external data, for cache keys.
- :func:`random_feeds`, :func:`run_onnxruntime` and :func:`compare_outputs` are the parity check used by
  export (ONNX vs torch) and clean (cleaned vs original graph).

onnx is imported at module level (it is light and needed by every function); onnxruntime is imported only
where a session is made.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

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
                 dims: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs for every graph input of ``model`` (initializers listed as inputs excluded).

    A symbolic dimension named in ``dims`` (``{"height": 352}``) takes that size; other symbolic or unknown
    dimensions become ``batch`` for the first axis and 1 elsewhere. Floats are standard normal, integers lie
    in [0, 4), booleans are fair coins.
    """
    dims = dict(dims or {})
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
        shape = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
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


def run_onnxruntime(model: onnx.ModelProto | str | os.PathLike, feeds: Mapping[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
    """Run ``model`` (a proto or a path) once in ONNX Runtime on the CPU and return outputs by name."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # parity runs should not print ORT's graph-optimisation warnings
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
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
