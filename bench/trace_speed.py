"""Tracing cost: the pre-dispatch recording (meta tensors) against torch.export, on the same models.

For each model: seconds to build the channel graph with ``trace(..., tracer="dispatch")`` and with
``tracer="export"`` (fastest of ``--repeats``, after one warm-up call each), and whether both give the same
channel groups (keys, sizes, pinned reasons, split segments, slots) and MAC count.

Usage:
    python bench/trace_speed.py [--models resnet50,swin_t] [--repeats 3] [--json bench/results/trace_speed.json]
``--json`` writes the rows and the table beside them (``.md``), stamped with commit, date and machine by
``trt_prune.provenance.write_result``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

MODELS = {  # name -> input shape
    "resnet50": (1, 3, 224, 224),
    "densenet121": (1, 3, 224, 224),
    "mobilenet_v3_large": (1, 3, 224, 224),
    "efficientnet_b0": (1, 3, 224, 224),
    "convnext_tiny": (1, 3, 224, 224),
    "regnet_y_800mf": (1, 3, 224, 224),
    "shufflenet_v2_x1_0": (1, 3, 224, 224),
    "vit_b_16": (1, 3, 224, 224),
    "swin_t": (1, 3, 224, 224),
    "maxvit_t": (1, 3, 224, 224),
    "retinanet_resnet50_fpn": (1, 3, 512, 512),
    "ssdlite320_mobilenet_v3_large": (1, 3, 320, 320),
    "builtin:demo-detector": (1, 3, 320, 320),
}


def build(name: str):
    import torchvision

    if name.startswith("builtin:"):
        from trt_prune.models import load_model

        return load_model(name).model
    from trt_prune.models.cores import CORES, detection_core

    if name in CORES:
        return detection_core(name)
    return torchvision.models.get_model(name, weights=None)


def structure(graph) -> list:
    return sorted((g.key, g.size, g.pinned, g.segments, sorted((s.module, s.kind) for s in g.slots))
                  for g in graph.groups)


def measure(name: str, shape, repeats: int) -> dict:
    from trt_prune.pruning import trace

    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.rand(shape)
    result = {"model": name, "input_shape": list(shape)}
    graphs = {}
    for tracer in ("dispatch", "export"):
        graphs[tracer] = trace(model, x, tracer=tracer)  # warm-up (first calls fill torch's caches)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            trace(model, x, tracer=tracer)
            times.append(time.perf_counter() - started)
        result[f"{tracer}_s"] = round(min(times), 4)
    result["same_groups"] = structure(graphs["dispatch"]) == structure(graphs["export"])
    result["same_macs"] = graphs["dispatch"].macs() == graphs["export"].macs()
    result["groups"] = len(graphs["dispatch"].groups)
    result["speedup"] = round(result["export_s"] / result["dispatch_s"], 1)
    return result


def markdown(rows: list[dict], env: dict) -> str:
    lines = ["# Tracing cost: pre-dispatch recording vs torch.export", "",
             f"Machine: {env['cpu']}, {env['cpu_count']} cores; torch {env['torch']}. "
             "Seconds to build the channel graph, fastest of the repeats.", "",
             "| model | input | dispatch s | export s | × | same groups | same MACs |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input_shape'][2:]))} | {r['dispatch_s']:.3f} | "
                     f"{r['export_s']:.3f} | {r['speedup']:.1f} | {'yes' if r['same_groups'] else 'NO'} | "
                     f"{'yes' if r['same_macs'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="result file; its Markdown goes beside it (.md)")
    args = p.parse_args(argv)
    names = list(MODELS) if not args.models else [m.strip() for m in args.models.split(",")]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; valid: {', '.join(MODELS)}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    from _common import save
    from prune_coverage import environment

    env = environment(provenance=False)
    env["torch"] = env["versions"]["torch"]
    torch.set_num_threads(env["usable_cores"])
    rows = []
    for name in names:
        row = measure(name, MODELS[name], args.repeats)
        rows.append(row)
        print(f"{name:32s} dispatch {row['dispatch_s']:.3f} s  export {row['export_s']:.3f} s  "
              f"{row['speedup']:.1f}×  same groups {row['same_groups']}  same MACs {row['same_macs']}", flush=True)
    text = markdown(rows, env)
    if args.json:
        save(args.json, {"environment": env, "results": rows}, text)
    print()
    print(text)


if __name__ == "__main__":
    main()
