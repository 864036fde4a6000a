"""Build plan: what to ask TensorRT for and how to run the engine, decided without TensorRT or a GPU.

:func:`plan_build` turns a :class:`~trt_prune.backends.base.BuildConfig` into flags per TensorRT major version,
:func:`runtime_options` reads the options that only change how an engine is run, :func:`build_fields` names
the fields that change the engine (what the cache key and the meta sidecar cover) and
:func:`cuda_graph_decision` says whether a run can be replayed from a CUDA graph.

``BuildConfig.extra`` keys: ``strongly_typed`` (bool; on TensorRT 10 create the network STRONGLY_TYPED so
the ONNX's own types decide precision; TensorRT 11 is always strongly typed), ``tf32`` (bool, default True;
False clears the TF32 flag for bit-faithful fp32, e.g. when comparing against ONNX Runtime),
``workspace_mib`` (int; workspace memory-pool limit). Three more only change how the engine is run, so they
are not part of the cache key: ``cuda_graph`` (bool, default False; capture ``execute_async_v3`` into a CUDA
graph once per input shape and replay it, as trtexec's ``--useCudaGraph``; where
:func:`cuda_graph_decision` says a run cannot be captured, or capture fails, the session runs without a
graph and says why in ``Session.notes``), ``cuda_api`` (``"cuda-python"`` or ``"pycuda"``; default: the
first of them that imports) and ``pinned_host`` (bool, default True; stage inputs and outputs in page-locked
host buffers, as trtexec does, so H2D and D2H run at full bus speed and truly asynchronously; where the driver
refuses page-locked memory the session falls back to ordinary arrays and says so in ``Session.notes``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from trt_prune.backends.base import BuildConfig, ShapeRange
from trt_prune.errors import BackendError

_BUILD_EXTRA = {"strongly_typed", "tf32", "workspace_mib"}
# how an engine is run, not what is built: not in the cache key
_RUNTIME_EXTRA = {"cuda_graph", "cuda_api", "pinned_host"}
KNOWN_EXTRA = _BUILD_EXTRA | _RUNTIME_EXTRA
CUDA_APIS = ("cuda-python", "pycuda")


def parse_trt_version(version: str) -> tuple[int, int, int]:
    """``"10.9.0.34"`` -> ``(10, 9, 0)``."""
    m = re.match(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(version))
    if not m:
        raise BackendError(f"cannot read a TensorRT version from {version!r}; expected e.g. '10.9.0'")
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


@dataclass(frozen=True)
class BuildPlan:
    """What to ask TensorRT for: flag names as spelled in ``trt.BuilderFlag`` and
    ``trt.NetworkDefinitionCreationFlag``, plus anything the user should hear about (``warnings``)."""

    trt_version: str
    major: int
    strongly_typed: bool
    network_flags: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()
    cleared_flags: tuple[str, ...] = ()
    profiling_verbosity: str = "DETAILED"
    optimization_level: int | None = None
    workspace_bytes: int | None = None
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_build(trt_version: str, config: BuildConfig, qdq: bool = False) -> BuildPlan:
    """Decide builder and network flags for ``config`` on TensorRT ``trt_version``.

    TensorRT 10 is weakly typed by default: fp16 is asked for with the FP16 builder flag, unless the user
    asks for a strongly typed network (``extra["strongly_typed"]``), where the ONNX's types decide and no
    precision flag may be set. TensorRT 11 builds strongly typed networks only: FP16/INT8/BF16 flags are
    gone and STRONGLY_TYPED is ignored, so fp16 must already be in the ONNX. SPARSE_WEIGHTS exists in both.
    ``qdq``: the ONNX carries Q/DQ pairs (``trt-prune quantize``): on TensorRT 10 it is then built strongly typed
    too, unless ``extra["strongly_typed"]`` is False, where weak typing needs the INT8 flag for its Q/DQ layers.
    Engines always carry DETAILED profiling verbosity so the inspector can name tactics and ONNX nodes.
    """
    major, minor, _ = parse_trt_version(trt_version)
    if major < 10:
        raise BackendError(f"TensorRT {trt_version} is not supported: this backend uses the 10.x/11.x API "
                           f"(named I/O tensors, execute_async_v3); install TensorRT 10 or 11")
    unknown = sorted(set(config.extra) - KNOWN_EXTRA)
    if unknown:
        raise BackendError(f"unknown tensorrt option(s) {unknown} in BuildConfig.extra; known: "
                           f"{sorted(KNOWN_EXTRA)}")
    level = config.optimization_level
    if level is not None and (not isinstance(level, int) or not 0 <= level <= 5):
        raise BackendError(f"optimization_level {level!r} is not valid for TensorRT; use 0-5 (default 3) or None")
    workspace = config.extra.get("workspace_mib")
    if workspace is not None and (not isinstance(workspace, int) or workspace < 1):
        raise BackendError(f"extra['workspace_mib'] must be a positive integer, got {workspace!r}")
    runtime_options(config)  # refuse a bad run-time option before minutes of building

    warnings: list[str] = []
    network_flags: list[str] = []
    builder_flags: list[str] = []
    cleared: list[str] = []
    asked_strong = bool(config.extra.get("strongly_typed", qdq))
    if major == 10:
        strongly_typed = asked_strong
        if qdq and not strongly_typed:
            builder_flags.append("INT8")  # weak typing: Q/DQ layers are refused without it
        if strongly_typed:
            network_flags.append("STRONGLY_TYPED")
            if config.precision == "fp16":
                warnings.append("strongly typed network: the ONNX's tensor types decide precision, so the FP16 "
                                "flag is not set; the model must already carry fp16 tensors")
        elif config.precision == "fp16":
            builder_flags.append("FP16")
            if minor >= 12:
                warnings.append(f"TensorRT {trt_version}: weak typing (the FP16 flag) is deprecated since 10.12 "
                                f"and gone in 11; convert the ONNX to fp16 and build strongly typed")
    else:
        strongly_typed = True
        if major > 11:
            warnings.append(f"TensorRT {trt_version} is newer than the 11.x this backend was written for; "
                            f"building as for 11")
        if config.precision == "fp16":
            warnings.append(f"TensorRT {trt_version} builds strongly typed networks only and has no FP16 flag: "
                            f"the engine runs the types the ONNX carries; convert it to fp16 first "
                            f"(e.g. ModelOpt AutoCast) to get fp16")
    if config.sparse_weights:
        builder_flags.append("SPARSE_WEIGHTS")
    if not config.extra.get("tf32", True):
        cleared.append("TF32")
    return BuildPlan(trt_version=str(trt_version), major=major, strongly_typed=strongly_typed,
                     network_flags=tuple(network_flags), builder_flags=tuple(builder_flags),
                     cleared_flags=tuple(cleared), optimization_level=level,
                     workspace_bytes=workspace * (1 << 20) if workspace else None, warnings=tuple(warnings))



def _shape_key(shapes: Mapping[str, ShapeRange]) -> dict[str, list[list[int]]]:
    return {name: [list(s) for s in rng] for name, rng in sorted(shapes.items())}


def runtime_options(config: BuildConfig) -> dict[str, Any]:
    """The run-time ``extra`` keys, checked: ``{"cuda_graph": bool, "cuda_api": str | None,
    "pinned_host": bool}``. ``pinned_host`` (default True) stages inputs and outputs in page-locked host memory,
    as trtexec does, so the H2D/D2H times are what a deployment with pinned buffers sees."""
    flags = {"cuda_graph": False, "pinned_host": True}
    for key, default in flags.items():
        value = config.extra.get(key, default)
        if not isinstance(value, bool):
            raise BackendError(f"extra[{key!r}] must be True or False, got {value!r}")
        flags[key] = value
    api = config.extra.get("cuda_api")
    if api is not None and api not in CUDA_APIS:
        raise BackendError(f"extra['cuda_api'] must be one of {list(CUDA_APIS)} or None (pick whichever imports), "
                           f"got {api!r}")
    return {**flags, "cuda_api": api}


def build_fields(config: BuildConfig) -> dict[str, Any]:
    """The ``BuildConfig`` fields that change the engine, JSON-ready (what the cache key and meta hash cover)."""
    extra = {k: v for k, v in config.extra.items() if k not in _RUNTIME_EXTRA}
    return {"optimization_level": config.optimization_level, "batch": list(config.batch),
            "shapes": _shape_key(config.shapes), "precision": config.precision,
            "sparse_weights": bool(config.sparse_weights), "extra": extra}


# Ops whose output size depends on the input values: TensorRT sizes their outputs at run time, after a device
# to host synchronisation that a CUDA graph cannot hold. Loops and conditionals may also synchronise.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})
CONTROL_FLOW_OPS = frozenset({"Loop", "If", "Scan"})


def onnx_op_types(model: Any) -> set[str]:
    """Every ``op_type`` in an ``onnx.ModelProto``, including those inside If/Loop/Scan subgraphs."""
    found: set[str] = set()
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        for node in graph.node:
            found.add(node.op_type)
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return found


def cuda_graph_decision(trt_version: str, input_shapes: Mapping[str, Sequence[int]],
                        output_shapes: Mapping[str, Sequence[int]], onnx_ops: Iterable[str] = (),
                        api_supports_graphs: bool = True) -> tuple[bool, str]:
    """Whether this run (these input shapes) can be captured into a CUDA graph and replayed: ``(True, "")`` or
    ``(False, why not)``.

    It can when TensorRT is 8.0 or newer, every input and output shape of the run is known (a graph replays
    fixed sizes and addresses: one graph per input shape), no op has a data-dependent output size
    (:data:`DATA_DEPENDENT_OPS`) or control flow (:data:`CONTROL_FLOW_OPS`), and the CUDA adapter can capture.
    """
    major, _, _ = parse_trt_version(trt_version)
    if major < 8:
        return False, f"TensorRT {trt_version} is older than 8.0, whose enqueue can be captured into a CUDA graph"
    if not api_supports_graphs:
        return False, "the PyCUDA adapter does not capture CUDA graphs; install cuda-python (pip install cuda-python)"
    for kind, shapes in (("input", input_shapes), ("output", output_shapes)):
        for name, shape in shapes.items():
            if any(int(d) < 0 for d in shape):
                why = ("is not set for this run" if kind == "input"
                       else "depends on the input values (a data-dependent shape)")
                return False, (f"{kind} {name!r} has shape {tuple(int(d) for d in shape)}, which {why}; a CUDA "
                               f"graph replays fixed shapes")
    ops = set(onnx_ops)
    dds = sorted(ops & DATA_DEPENDENT_OPS)
    if dds:
        return False, (f"the model has {', '.join(dds)} node(s), whose output sizes depend on the data; TensorRT "
                       f"reads them back to the host mid-run, which a CUDA graph cannot replay")
    flow = sorted(ops & CONTROL_FLOW_OPS)
    if flow:
        return False, (f"the model has {', '.join(flow)} node(s); TensorRT may synchronise with the host to run "
                       f"control flow, which a CUDA graph cannot replay")
    return True, ""
