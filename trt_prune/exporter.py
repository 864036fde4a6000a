"""Export a PyTorch model to ONNX for TensorRT, with a parity check in ONNX Runtime.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, torch's default since 2.9) is tried first:
its graph is smaller (BatchNorm fused, SiLU kept as Sigmoid·Mul, no shape arithmetic for the batch axis)
and every node carries its module scope in metadata. When it raises, the TorchScript exporter
(``dynamo=False``) is used and the reason is kept in :attr:`ExportResult.fallback_reason`.

Default opset: 18. It is the lowest opset the dynamo exporter implements natively in torch 2.14; asking it
for 17 makes it convert the finished model down with ONNX's version converter, which drops the node
metadata that maps nodes to modules, and where that conversion fails torch keeps opset 18 without an
error (the demo detector at 13): a file whose opset is not the one asked for is re-exported by TorchScript,
with the reason in ``fallback_reason``. TorchScript exports 18 cleanly too, ONNX Runtime supports it, and it
lies inside the parser range of TensorRT 10.x (opset 9 to 20 and later) and 11.x (up to 25).
"""

from __future__ import annotations

import contextlib
import io
import linecache
import re
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trt_prune.errors import ExportError, TrtPruneError
from trt_prune.onnx_io import (
    PROTOBUF_LIMIT,
    compare_outputs,
    default_opset,
    load_onnx,
    one_line,
    random_feeds,
    run_onnxruntime,
    save_onnx,
    staging_folder,
)

DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how well it matches torch.

    ``parity`` maps each output name to ``{"max_abs", "max_rel"}`` over all parity batches (see
    :func:`trt_prune.onnx_io.compare_outputs` for the definition of ``max_rel``); it is empty when the check
    was turned off. ``exporter`` is the exporter that produced the file; ``fallback_reason`` says why dynamo
    was not it (with the module and source line where it failed, when found), or is ``None``.
    ``dynamic_axes`` names the symbolic input axes (``batch``, ``height``, ``width``). ``trace_warnings``
    holds what the TorchScript tracer warned about (a data-dependent branch or a Python number it froze into
    the graph: the file may then be right only for inputs like the example), with the source line.
    """

    path: str
    exporter: str
    fallback_reason: str | None
    opset: int
    input_names: list[str]
    output_names: list[str]
    input_shape: tuple[int, ...] | list[tuple[int, ...]]
    parity: dict[str, dict[str, float]] = field(default_factory=dict)
    export_seconds: float = 0.0
    dynamic_axes: list[str] = field(default_factory=list)
    trace_warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        data = asdict(self)
        shape = self.input_shape
        data["input_shape"] = list(shape) if _is_shape(shape) else [list(s) for s in shape]
        return data


def export_onnx(model, path, input_shape=(1, 3, 320, 320), *, exporter: str = "dynamo", opset: int | None = None,
                dynamic_batch: bool = True, dynamic_hw: bool = False, input_names: Sequence[str] = ("images",),
                output_names: Sequence[str] = ("output",), check_parity: bool = True, atol: float = 1e-4,
                rtol: float = 1e-3, seed: int = 0) -> ExportResult:
    """Export ``model`` to the ONNX file ``path`` and check it against torch in ONNX Runtime.

    ``input_shape`` is one shape, or one shape per name in ``input_names`` (float32 inputs). With
    ``exporter="dynamo"`` the TorchScript exporter is the fallback when dynamo raises. ``dynamic_batch`` makes
    axis 0 of every input and output symbolic (``batch``). The model runs in eval mode (its mode is restored
    afterwards). Parity: seeded random inputs at the given batch and, when the batch is dynamic, at batch+1;
    an element fails when ``|onnx - torch| > atol + rtol * |torch|``; any failure raises
    :class:`ExportError` and writes nothing, unless ``check_parity=False``.

    The file holds the whole model with weights as initializers (external ``<name>.data`` only past protobuf's
    2 GiB), and is written atomically. Unwritable ``path`` raises :class:`OutputError`.
    """
    import torch

    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"export needs a torch.nn.Module, got {type(model).__name__}")
    names = [str(n) for n in input_names]
    shapes = _shapes(input_shape, names)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if not 9 <= opset <= 25:
        raise ExportError(f"opset {opset} is outside what TensorRT parses (9 to 25); use {DEFAULT_OPSET}")
    for label, value in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ExportError(f"{label} must be a number >= 0, got {value!r}")
    if dynamic_hw and not all(len(s) == 4 for s in shapes):
        raise ExportError(f"dynamic height and width need [B, C, H, W] inputs, got shapes {shapes}; export "
                          "with a fixed size")
    axes = {0: "batch"} if dynamic_batch else {}
    if dynamic_hw:
        axes.update({2: "height", 3: "width"})

    generator = torch.Generator().manual_seed(seed)
    device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
    example = tuple(torch.randn(s, generator=generator).to(device) for s in shapes)
    big = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) > PROTOBUF_LIMIT
    # per module: model.train(True) afterwards would also unfreeze submodules the caller kept in eval
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        from trt_prune.models import check_runs

        check_runs(model, [tuple(t.shape) for t in example], ExportError)
        with staging_folder(path) as tmp:
            staged = tmp / Path(path).name
            started = time.perf_counter()
            used, fallback_reason, trace_warnings = _export(model, example, staged, exporter, opset, axes, names,
                                                            list(output_names), big)
            seconds = time.perf_counter() - started
            onnx_model = load_onnx(staged, error=ExportError)
            _check(staged)
            parity = {}
            if check_parity:
                try:
                    parity = _parity(model, onnx_model, staged, axes, names, atol, rtol, seed, device, shapes[0])
                except ExportError as exc:
                    if fallback_reason:  # a frozen branch is the likely cause: say where dynamo stopped
                        raise ExportError(f"{exc}. The file came from TorchScript because dynamo failed "
                                          f"({fallback_reason})") from exc
                    raise
            written = save_onnx(onnx_model, path, external_data=big or None)
    finally:
        for module, training in modes.items():
            module.training = training

    return ExportResult(
        path=str(written), exporter=used, fallback_reason=fallback_reason,
        opset=default_opset(onnx_model) or opset,
        input_names=[v.name for v in onnx_model.graph.input if v.name not in _initializer_names(onnx_model)],
        output_names=[v.name for v in onnx_model.graph.output],
        input_shape=tuple(shapes[0]) if len(shapes) == 1 else [tuple(s) for s in shapes],
        parity=parity, export_seconds=round(seconds, 3), dynamic_axes=list(axes.values()),
        trace_warnings=trace_warnings,
    )


def _fixed_dynamic_axes(model, input_names: list[str], axes: dict[int, str]) -> str | None:
    """The first requested dynamic axis the exported ``model`` has as a fixed size, as text, or None."""
    for value in model.graph.input:
        if value.name not in input_names:
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.items():
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                return f"axis {axis} ({name}) of input '{value.name}' to {dims[axis].dim_value}"
    return None


def _is_shape(value) -> bool:
    return isinstance(value, Sequence) and all(isinstance(d, int) and not isinstance(d, bool) for d in value)


def _shapes(input_shape, names: list[str]) -> list[tuple[int, ...]]:
    if _is_shape(input_shape):
        shapes = [input_shape]
    else:
        shapes = list(input_shape) if isinstance(input_shape, Sequence) else None
    if not shapes or not all(_is_shape(s) and s and all(d > 0 for d in s) for s in shapes):
        raise ExportError(f"input_shape must be a shape of positive ints like (1, 3, 320, 320), or one per input; "
                          f"got {input_shape!r}")
    if len(shapes) != len(names):
        raise ExportError(f"{len(shapes)} input shape(s) for {len(names)} input name(s) {names}; give one shape "
                          "per name")
    return [tuple(int(d) for d in s) for s in shapes]


def _initializer_names(model) -> set[str]:
    return {t.name for t in model.graph.initializer}


def _export(model, example, staged: Path, exporter: str, opset: int, axes: dict[int, str], input_names: list[str],
            output_names: list[str], big: bool) -> tuple[str, str | None, list[str]]:
    """Run the exporter(s); returns (exporter used, why dynamo was not used or None, TorchScript's warnings)."""
    import torch

    fallback_reason = None
    if exporter == "dynamo":
        try:
            dims = {axis: torch.export.Dim(name) for axis, name in axes.items()}
            dynamic_shapes = tuple({a: d for a, d in dims.items() if a < t.dim()} for t in example) if dims else None
            # torch.export dumps the traced graph to stderr when it fails; the reason is reported instead
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                torch.onnx.export(model, example, str(staged), dynamo=True, opset_version=opset,
                                  input_names=input_names, output_names=output_names, dynamic_shapes=dynamic_shapes,
                                  external_data=big, optimize=True, verbose=False)
            exported = load_onnx(staged, load_external_data=False)
            written = default_opset(exported)
            fixed = _fixed_dynamic_axes(exported, input_names, axes)
            if written == opset and not fixed:
                return "dynamo", None, []
            if fixed:
                # torch.export specialises an axis the model's code fixes (a reshape to a constant batch) without
                # an error: the file would not take the sizes asked for
                fallback_reason = (f"the dynamo exporter fixed {fixed} (the model's code specialises it, e.g. a "
                                   "reshape to a constant batch)")
            else:
                # below 18 torch's dynamo exporter may keep its native opset when ONNX's down-conversion fails,
                # without an error: the file would not be what was asked for, so TorchScript writes it instead
                fallback_reason = (f"the dynamo exporter wrote opset {written} for the requested {opset} (it "
                                   "converts down only where ONNX's version converter can)")
        except Exception as exc:  # any dynamo failure is a reason to try TorchScript, whatever its type
            fallback_reason = _reason(model, exc, example)
        for leftover in staged.parent.iterdir():
            leftover.unlink()
    dynamic_axes = None
    if axes:
        dynamic_axes = {name: dict(axes) for name in input_names}
        dynamic_axes.update({name: {0: "batch"} for name in output_names if 0 in axes})
    try:
        with warnings.catch_warnings(record=True) as caught:
            # TorchScript export is deprecated in torch 2.9+; choosing it (or falling back to it) is deliberate
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("always", torch.jit.TracerWarning)
            torch.onnx.export(model, example, str(staged), dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes,
                              do_constant_folding=True)
    except Exception as exc:
        tried = f"dynamo failed ({fallback_reason}); " if fallback_reason else ""
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {tried}TorchScript failed "
                          f"({_reason(model, exc, example)}); change the model code there (see the export "
                          "section of the README), or export a part of the model that avoids it") from exc
    trace_warnings = []
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            text = f"{Path(w.filename).name}:{w.lineno}: {one_line(w.message, 200, with_type=True)}"
            if text not in trace_warnings:
                trace_warnings.append(text)
    return "torchscript", fallback_reason, trace_warnings


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


_ATEN_OP = re.compile(r"aten(?:::|\.)(\w+)")


def locate_failure(model, exc: BaseException, example=None) -> str | None:
    """Where in ``model`` the failure ``exc`` happened, in words, or ``None`` when it cannot tell.

    Python-level failures (a data-dependent branch, ``.item()``, a shape error) pass through the
    ``forward`` of the module that failed: the innermost traceback frame whose ``self`` is a submodule of
    ``model`` gives its path, class and source line. Failures to translate an op (no ONNX function for an
    ATen op) happen after tracing, so no frame points at the model: the op is read from the message and,
    given ``example``, one recorded forward pass finds the first module that calls it.
    """
    paths = {id(m): (name, type(m).__name__) for name, m in model.named_modules()}
    found = None
    for link in _chain(exc):
        for frame, lineno in traceback.walk_tb(link.__traceback__):
            owner = paths.get(id(frame.f_locals.get("self")))
            if owner is not None:
                found = (owner, frame.f_code.co_filename, lineno)
    if found is not None:
        (path, kind), filename, lineno = found
        code = linecache.getline(filename, lineno).strip()
        code = code if len(code) <= 100 else code[:97] + "..."
        return f"in {_module_words(path, kind)} at {Path(filename).name}:{lineno}" + (f" `{code}`" if code else "")
    ops = [m.group(1) for link in _chain(exc) for m in _ATEN_OP.finditer(str(link))]
    if not ops:
        return None
    op = ops[-1]  # the innermost message names the op most precisely
    module = _first_caller(model, op, example) if example is not None else None
    return f"at op aten::{op}" + (f" in {_module_words(*module)}" if module else "")


def _module_words(path: str, kind: str) -> str:
    return f"module '{path}' ({kind})" if path else f"the top-level module ({kind})"


def _first_caller(model, op: str, example) -> tuple[str, str] | None:
    """``(path, class)`` of the innermost module around the first call of ATen ``op`` in a forward pass."""
    from trt_prune.pruning.record import available, record

    if not available() or len(example) != 1:
        return None
    try:
        recording = record(model, example[0], meta=False)
    except Exception:  # the model already failed once; finding the module is best effort
        return None
    want = op.lstrip("_")
    for node in recording.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        name = schema.name.split("::")[-1] if schema is not None else ""
        if name and name.lstrip("_") == want:
            stack = node.meta.get("nn_module_stack") or {}
            if not stack:
                return "", type(model).__name__
            path, kind = next(reversed(stack.values()))
            return path, kind.rsplit(".", 1)[-1]  # the recorder keeps qualified class names
    return None


def _reason(model, exc: BaseException, example) -> str:
    """Where and why an exporter failed, on one line: the innermost error of the chain (the outer ones are
    generic wrappers such as "Failed to export the model with torch.export") and :func:`locate_failure`."""
    root = _chain(exc)[-1]
    where = locate_failure(model, exc, example)
    return f"{where}: {one_line(root, 300, with_type=True)}" if where else one_line(root, 400, with_type=True)


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))  # by path: works past protobuf's 2 GiB too
    except onnx.checker.ValidationError as exc:
        reason = one_line(exc, 400, with_type=True)
        raise ExportError(f"the exported model fails onnx.checker ({reason}); try the other exporter or another "
                          "opset") from exc


def _parity(model, onnx_model, staged: Path, axes: dict[int, str], input_names: list[str], atol: float,
            rtol: float, seed: int, device, shape: tuple[int, ...]) -> dict[str, dict[str, float]]:
    import torch

    cases = [{name: shape[axis] for axis, name in axes.items()}]  # the example's shape, then every dynamic axis
    if axes:  # grown together
        cases.append({name: shape[axis] + (1 if axis == 0 else 32) for axis, name in axes.items()})
    worst: dict[str, dict[str, float]] = {}
    for index, dims in enumerate(cases):
        batch = dims.get("batch", shape[0])
        feeds = random_feeds(onnx_model, batch=batch, seed=seed + index, dims=dims)
        label = "x".join(map(str, next(iter(feeds.values())).shape)) if feeds else f"batch {batch}"
        try:
            got = run_onnxruntime(staged, feeds)  # from the file: a proto past 2 GiB cannot be serialised
        except Exception as exc:
            reason = one_line(exc, 400, with_type=True)
            raise ExportError(f"ONNX Runtime cannot run the exported model at input {label} ({reason}); check the "
                              "export with check_parity=False and inspect the file") from exc
        with torch.no_grad():
            reference = model(*(torch.from_numpy(feeds[name]).to(device) for name in input_names))
        expected = _flatten(reference)
        if len(expected) != len(got):
            raise ExportError(f"torch returned {len(expected)} output tensor(s), the ONNX model {len(got)} "
                              f"({list(got)}); give one output name per output")
        for (name, actual), ref in zip(got.items(), expected, strict=True):
            try:
                error = compare_outputs(actual, ref, atol=atol, rtol=rtol)
            except TrtPruneError as exc:
                raise ExportError(f"output {name!r} at input {label}: {exc}") from exc
            entry = worst.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "mismatched": 0})
            entry["max_abs"] = max(entry["max_abs"], error["max_abs"])
            entry["max_rel"] = max(entry["max_rel"], error["max_rel"])
            entry["mismatched"] += error["mismatched"]
    failing = {n: e for n, e in worst.items() if e["mismatched"]}
    if failing:
        detail = "; ".join(f"{n}: {e['mismatched']} element(s) off, max_abs {e['max_abs']:.3g}, "
                           f"max_rel {e['max_rel']:.3g}" for n, e in failing.items())
        raise ExportError(f"ONNX Runtime output differs from torch beyond atol={atol}, rtol={rtol} ({detail}); "
                          "nothing was written. Try the other exporter, or pass check_parity=False to write "
                          "the file for inspection")
    return {n: {"max_abs": e["max_abs"], "max_rel": e["max_rel"]} for n, e in worst.items()}


def _flatten(output) -> list[np.ndarray]:
    import torch

    if isinstance(output, torch.Tensor):
        tensor = output.detach().cpu()
        return [(tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()]  # numpy has no bf16
    if isinstance(output, (list, tuple)):
        return [array for item in output for array in _flatten(item)]
    if isinstance(output, dict):
        return [array for item in output.values() for array in _flatten(item)]
    raise ExportError(f"cannot compare a model output of type {type(output).__name__}; return tensors, or "
                      "tuples/lists/dicts of tensors")
