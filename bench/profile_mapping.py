"""Per-layer profiles of the demo detector mapped to PyTorch modules, and their sum against end-to-end latency.

Two backends, one report API (``trt_prune.profiling``):

- ONNX Runtime (CPU, default graph optimisation level, so fused nodes appear): the detector exported with the
  dynamo exporter and cleaned; per-node times from ONNX Runtime's profiler, fused nodes mapped back to their
  ONNX members and module paths. Reported: how many profiled layers map to a module (and which do not), how
  many of the exported graph's ONNX nodes are covered by some profiled layer, and the per-layer sum against
  the mean end-to-end latency of the separate timing run;
- torch (CPU): forward hooks, each module's own time.

A sum within ±10 % of the end-to-end latency is the target; where it is not met the report says why (the
instrumented per-layer run is itself slower, and ONNX Runtime's node profiler misses the time between nodes).

    python bench/profile_mapping.py [--batch 1] [--iterations 200] [--layer-runs 50] [--json OUT.json]
Writes ``bench/results/profile_mapping.{json,md}`` (or OUT.json and OUT.md beside it), stamped with commit, date
and machine by ``trt_prune.provenance.write_result``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import RESULTS, save, stamp

from trt_prune.models import load_model
from trt_prune.profiling import aggregate_layers
from trt_prune.stages import profile, to_onnx


def _summary(result, node_names: set[str] | None = None) -> dict:
    rows = result.per_layer
    mapped = [r for r in rows if r["module"] is not None]
    mean = result.latency_ms["mean"]
    out = {
        "latency_p50_ms": result.latency_ms["p50"], "latency_mean_ms": mean, "cv": result.latency_ms["cv"],
        "layers": len(rows), "layers_mapped": len(mapped),
        "unmapped": sorted({f"{r['name']} ({r['op']})" for r in rows if r["module"] is None}),
        "per_layer_sum_ms": result.per_layer_sum_ms, "per_layer_run_ms": result.per_layer_run_ms,
        "sum_over_e2e": result.per_layer_sum_ms / mean if mean else None,
        "stages_ms": {r["key"]: round(r["ms"], 4) for r in aggregate_layers(rows, "stage")},
        "top_ops": [(r["key"], round(r["ms"], 4)) for r in aggregate_layers(rows, "op")[:6]],
    }
    if node_names is not None:
        covered = {m for r in rows for m in r.get("members") or []} & node_names
        out["onnx_nodes"] = len(node_names)
        out["onnx_nodes_covered"] = len(covered)
        out["onnx_nodes_not_run"] = sorted(node_names - covered)  # removed or folded by ONNX Runtime
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--layer-runs", type=int, default=50)
    parser.add_argument("--json", default=str(RESULTS / "profile_mapping.json"),
                        help="result file; its Markdown table goes beside it (.md)")
    args = parser.parse_args(argv)
    import onnx

    loaded = load_model("builtin:demo-detector")
    with tempfile.TemporaryDirectory() as tmp:
        cleaned = to_onnx(loaded, Path(tmp) / "demo.clean.onnx").path
        nodes = {n.name for n in onnx.load(str(cleaned), load_external_data=False).graph.node}
        ort = profile(cleaned, "onnxruntime", batch=args.batch, warmup_s=1.0, iterations=args.iterations,
                      min_duration_s=2.0, layer_runs=args.layer_runs)
    torch_result = profile(loaded, "torch", batch=args.batch, warmup_s=1.0, iterations=args.iterations,
                           min_duration_s=2.0, layer_runs=args.layer_runs)
    result = {
        "provenance": stamp(), "model": "builtin:demo-detector", "input": [args.batch, *loaded.input_shape[1:]],
        "onnxruntime": {**_summary(ort, nodes), "env": {k: ort.env.get(k) for k in ("onnxruntime", "threads",
                                                                                     "graph_optimization_level")}},
        "torch": {**_summary(torch_result), "env": {k: torch_result.env.get(k) for k in ("torch", "threads")}},
    }
    save(args.json, result, _markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    m = r["provenance"]["machine"]
    lines = ["# Per-layer profiles of the demo detector, mapped to modules\n",
             f"Machine: {m['cpu']}, {m['usable_cores']} usable cores. "
             f"Input {'x'.join(map(str, r['input']))}. Rerun: `python bench/profile_mapping.py`.\n",
             "| backend | e2e mean ms | layers | mapped to a module | ONNX nodes covered | per-layer sum ms | "
             "sum / e2e | per-layer run ms |", "|---|---|---|---|---|---|---|---|"]
    for name in ("onnxruntime", "torch"):
        s = r[name]
        covered = f"{s['onnx_nodes_covered']}/{s['onnx_nodes']}" if "onnx_nodes" in s else "–"
        lines.append(f"| {name} | {s['latency_mean_ms']:.3f} | {s['layers']} | {s['layers_mapped']} | {covered} | "
                     f"{s['per_layer_sum_ms']:.3f} | {s['sum_over_e2e']:.3f} | {s['per_layer_run_ms']:.3f} |")
    for name in ("onnxruntime", "torch"):
        if r[name]["unmapped"]:
            lines.append(f"\nUnmapped {name} layers: {', '.join(r[name]['unmapped'])}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
