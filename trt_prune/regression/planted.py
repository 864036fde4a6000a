"""Planted slowdowns: a copy of an ONNX model that computes the same outputs plus a known amount of extra work.

The calibration of the regression verdict needs candidates that are slower by a known fraction and otherwise
identical. :func:`plant_work` appends to the graph a chain of ``MatMul`` + ``Tanh`` steps on a ``[rows, width]``
matrix sliced from the input, ending in an extra graph output ``planted_work``: every backend must
compute it, nothing can fold it away (it depends on the input), and the model's own outputs are unchanged.
:func:`calibrate_planted` finds the number of steps that slows a model down by a target fraction on this
machine, by interleaved measurement (a per-step cost times a count is not exact: caches and threads make the
first steps cost more than later ones).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from trt_prune.errors import BenchError

PLANTED_OUTPUT = "planted_work"


def plant_work(model: onnx.ModelProto, steps: int, width: int = 128, rows: int = 64, seed: int = 0
               ) -> onnx.ModelProto:
    """A copy of ``model`` with ``steps`` extra ``MatMul([rows, width] x [width, width]) -> Tanh`` steps,
    computed from its first float input, written to the extra output :data:`PLANTED_OUTPUT`."""
    if not isinstance(steps, int) or steps < 0:
        raise BenchError(f"steps must be an integer >= 0, got {steps!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if steps == 0:
        return out
    graph = out.graph
    initializers = {t.name for t in graph.initializer}
    source = next((v for v in graph.input if v.name not in initializers
                   and v.type.tensor_type.elem_type == TensorProto.FLOAT), None)
    if source is None:
        raise BenchError("planted work needs a float32 graph input to start from; this model has none")
    dims = [d.dim_value for d in source.type.tensor_type.shape.dim[1:]]
    per_item = math.prod(dims) if dims and all(d > 0 for d in dims) else 0
    rows = min(rows, per_item // width)
    if rows < 1:
        raise BenchError(f"planted work slices a [rows, {width}] matrix from input {source.name!r}, whose items "
                         f"hold {per_item or 'an unknown number of'} values; give a smaller width")
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((width, width)) / math.sqrt(width)).astype(np.float32)
    need = rows * width
    graph.initializer.extend([
        numpy_helper.from_array(weight, "planted/weight"),
        numpy_helper.from_array(np.array([-1], np.int64), "planted/flat"),
        numpy_helper.from_array(np.array([need], np.int64), "planted/need"),
        numpy_helper.from_array(np.array([0], np.int64), "planted/zero"),
        numpy_helper.from_array(np.array([rows, width], np.int64), "planted/shape"),
    ])
    nodes = [
        helper.make_node("Reshape", [source.name, "planted/flat"], ["planted/x_flat"], name="planted/flatten"),
        # the first rows * width values of the input (its first item holds at least that many)
        helper.make_node("Slice", ["planted/x_flat", "planted/zero", "planted/need"], ["planted/x_cut"],
                         name="planted/slice"),
        helper.make_node("Reshape", ["planted/x_cut", "planted/shape"], ["planted/h0"], name="planted/matrix"),
    ]
    for i in range(steps):
        nodes.append(helper.make_node("MatMul", [f"planted/h{i}", "planted/weight"], [f"planted/m{i}"],
                                      name=f"planted/matmul_{i}"))
        nodes.append(helper.make_node("Tanh", [f"planted/m{i}"], [f"planted/h{i + 1}"], name=f"planted/tanh_{i}"))
    nodes.append(helper.make_node("ReduceMean", [f"planted/h{steps}"], [PLANTED_OUTPUT], name="planted/reduce",
                                  keepdims=0))
    for node in nodes:  # one module name for the profile's layer views: "planted_work" (see onnx_io.node_module)
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=f"['', '{PLANTED_OUTPUT}', '{node.op_type}']")
    graph.node.extend(nodes)
    graph.output.append(helper.make_tensor_value_info(PLANTED_OUTPUT, TensorProto.FLOAT, []))
    return out


def calibrate_planted(model: onnx.ModelProto, target: float, measure, max_steps: int = 4096,
                      tolerance: float = 0.01, width: int = 128, rows: int = 64) -> tuple[int, float]:
    """Steps of :func:`plant_work` that make ``model`` slower by ``target`` (0.05 = 5 %) on this machine.

    ``measure(base_model, candidate_model) -> ratio`` times both (interleaved medians); the search doubles the
    step count until the ratio passes the target, then bisects to within ``tolerance``. Returns
    ``(steps, measured ratio - 1)``.
    """
    if not 0 < target < 1:
        raise BenchError(f"target slowdown must be a fraction in (0, 1), got {target!r}")
    cache: dict[int, float] = {}

    def slowdown(steps: int) -> float:
        if steps not in cache:
            cache[steps] = float(measure(model, plant_work(model, steps, width, rows))) - 1.0
        return cache[steps]

    lo, hi = 0, 1
    while slowdown(hi) < target:
        lo, hi = hi, hi * 2
        if hi > max_steps:
            raise BenchError(f"{max_steps} planted steps slow the model by only {slowdown(lo):.1%}; raise "
                             "max_steps or the width")
    while hi - lo > 1 and abs(slowdown(hi) - target) > tolerance:
        mid = (lo + hi) // 2
        if slowdown(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min((s for s in (lo, hi) if s in cache), key=lambda s: abs(cache[s] - target))
    return best, cache[best]
