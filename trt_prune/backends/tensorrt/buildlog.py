"""What TensorRT says about a build: its log, captured and read, and the engine inspector's JSON, read.

:func:`make_logger` keeps the builder's lines (INFO and worse) and passes every message on to the
``trt_prune.tensorrt`` logger; :func:`parse_build_log` reads which layers could use and which got 2:4 sparse
kernels; :func:`summarize_inspector` reads tactic, precision and sparsity per engine layer. Only
:func:`make_logger` touches TensorRT, through the module it is handed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trt_prune.errors import BackendError

LOGGER = logging.getLogger("trt_prune.tensorrt")

_ELIGIBLE = "Layers eligible for sparse math:"
_PICKED = "picked sparse implementation for layers:"
_LAYER_LINE = re.compile(r"Layer\((?P<type>[^)]*)\):\s*(?P<name>.+?),\s*Tactic:\s*(?P<rest>.*)$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: layer names like ``PWN(a, b)`` contain commas themselves."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


def parse_build_log(lines: Iterable[str]) -> dict[str, list[str]]:
    """Which layers could use 2:4 sparse kernels and which got one, from TensorRT's builder log.

    Formats (as quoted in NVIDIA/TensorRT issues #1403, #2169 and #4056, TensorRT 8.x-10.x, INFO level):
    ``(Sparsity) Layers eligible for sparse math: Conv_619 + Relu_620, Conv_626, ...`` and
    ``(Sparsity) TRT inference plan picked sparse implementation for layers: ...`` (an empty list when none),
    each line possibly behind a ``[timestamp] [I] [TRT]`` prefix. The verbose engine-layer lines
    ``Layer(CaskConvolution): <name>, Tactic: 0x..., <in> -> <out>`` (forums, TensorRT 8.x-10.x) also count
    a layer as sparse when its type or tactic text says ``sparse``. Order is kept, duplicates dropped.
    """
    eligible: list[str] = []
    ran: list[str] = []
    for raw in lines:
        for line in str(raw).splitlines():
            if _ELIGIBLE in line:
                eligible.extend(_split_top_level(line.split(_ELIGIBLE, 1)[1]))
            elif _PICKED in line:
                ran.extend(_split_top_level(line.split(_PICKED, 1)[1]))
            else:
                m = _LAYER_LINE.search(line)
                if m and "sparse" in (m.group("type") + " " + m.group("rest")).lower():
                    ran.append(m.group("name").strip())
    return {"eligible_sparse": list(dict.fromkeys(eligible)), "ran_sparse": list(dict.fromkeys(ran))}


_FORMAT_TOKENS = (("bfloat16", "bf16"), ("bf16", "bf16"), ("fp32", "fp32"), ("float", "fp32"),
                  ("fp16", "fp16"), ("half", "fp16"), ("fp8", "fp8"), ("fp4", "fp4"), ("uint8", "uint8"),
                  ("int8", "int8"), ("int4", "int4"), ("int32", "int32"), ("int64", "int64"),
                  ("bool", "bool"))


def precision_from_format(fmt: str | None) -> str | None:
    """``"Channel major FP16 format where channel % 8 == 0"`` -> ``"fp16"``; None when no type is named."""
    if not fmt:
        return None
    words = re.findall(r"[a-z0-9]+", fmt.lower())
    for token, name in _FORMAT_TOKENS:
        if token in words:
            return name
    return None


def summarize_inspector(info: Mapping[str, Any] | str) -> list[dict[str, Any]]:
    """Per engine layer ``{name, layer_type, tactic, precision, sparse, onnx_nodes}`` from the engine
    inspector's JSON (``LayerInformationFormat.JSON``; a dict or its text).

    ``precision`` is read from the first output's ``Format/Datatype`` (the inputs' when a layer has no
    outputs), ``sparse`` from ``HasSparseWeights``, ``onnx_nodes`` from ``Metadata``. An engine built
    without DETAILED verbosity lists bare names; their other fields are None.
    """
    from trt_prune.profiling.layers import onnx_nodes_from_metadata

    if isinstance(info, str):
        try:
            info = json.loads(info)
        except ValueError as exc:
            raise BackendError(f"engine inspector output is not JSON: {exc}") from exc
    if not isinstance(info, Mapping) or not isinstance(info.get("Layers"), list):
        keys = sorted(info) if isinstance(info, Mapping) else type(info).__name__
        raise BackendError(f"engine inspector JSON must have a 'Layers' list; got {keys}")
    rows = []
    for layer in info["Layers"]:
        if isinstance(layer, str):
            rows.append({"name": layer, "layer_type": None, "tactic": None, "precision": None, "sparse": None,
                         "onnx_nodes": []})
            continue
        tensors = layer.get("Outputs") or layer.get("Inputs") or []
        fmt = tensors[0].get("Format/Datatype") if tensors else None
        rows.append({
            "name": layer.get("Name"),
            "layer_type": layer.get("LayerType"),
            "tactic": layer.get("TacticName") or None,
            "precision": precision_from_format(fmt),
            "sparse": bool(int(layer.get("HasSparseWeights", 0) or 0)),
            "onnx_nodes": onnx_nodes_from_metadata(layer.get("Metadata")),
        })
    return rows


def log_tail(lines: Sequence[str], n: int = 5) -> str:
    """The last ``n`` log lines on one line, for error messages."""
    return " | ".join(lines[-n:]) if lines else "(empty)"


def make_logger(trt: Any) -> Any:
    """An ILogger of the ``tensorrt`` module ``trt`` that keeps INFO and worse in ``lines`` (the (Sparsity)
    report is logged at INFO) and passes every message on to :data:`LOGGER` at the matching level.

    With no logging configured, Python's last-resort handler shows warnings and errors on stderr.
    """
    severity = trt.ILogger.Severity
    levels = {int(severity.INTERNAL_ERROR): logging.CRITICAL, int(severity.ERROR): logging.ERROR,
              int(severity.WARNING): logging.WARNING, int(severity.INFO): logging.INFO}
    keep = int(severity.INFO)

    class CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= keep:
                self.lines.append(str(msg))
            LOGGER.log(levels.get(int(severity), logging.DEBUG), "[TensorRT] %s", msg)

    return CapturingLogger()
