"""Pruning models that exist only as ONNX (issue 18, must show 1).

Four source files, each written here the way a user would receive it: ResNet-50 and MobileNetV3-Large from
torchvision through the TorchScript exporter at opset 13, the built-in demo detector with box decoding and
NonMaxSuppression in the graph (``trt-prune export --nms``, dynamo, opset 18), and a network written node by node
at opset 11 (``tests/cpu/onnx_handbuilt.py``). For each: convert (``trt_prune.onnx_import.import_onnx``, the
converted body against ONNX Runtime on a seeded input), prune to half the MACs (``target_macs=0.5``, L1, round
to 8), re-export at the source's opset with the tail stitched back, and check: the pruned file against the
pruned torch module (the exporter's parity check), the graph's outputs against the source's, ONNX Runtime
running the whole pruned graph. Seconds are wall time on this machine for each step.

Usage: python bench/onnx_import.py [--json bench/results/onnx_import.json] [--models resnet50,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
from _common import RESULTS, ROOT, ort_session, save

MODELS = ("resnet50", "mobilenet_v3_large", "demo-detector-nms", "handbuilt-opset11")


def _source(name: str, folder: Path) -> tuple[Path, str]:
    """Write the source ONNX file; returns (path, how it was made)."""
    path = folder / f"{name}.onnx"
    if name in ("resnet50", "mobilenet_v3_large"):
        import torch

        from trt_prune.stages import export

        torch.manual_seed(0)  # the same random weights every run
        export(f"torchvision:{name}", path, exporter="torchscript", opset=13, dynamic_batch=False)
        return path, "torchvision, random weights (seed 0), TorchScript exporter, opset 13"
    if name == "demo-detector-nms":
        from trt_prune.stages import export_nms

        export_nms("builtin:demo-detector", path, dynamic_batch=False)
        return path, "builtin:demo-detector (shipped weights), export --nms, dynamo, opset 18"
    sys.path.insert(0, str(ROOT / "tests" / "cpu"))
    from onnx_handbuilt import opset11_net

    onnx.save(opset11_net(), path)
    return path, "written with onnx.helper, opset 11 (Split and ReduceMean with attributes, Resize with roi)"


def run(name: str, folder: Path) -> dict:
    from trt_prune.onnx_import import import_onnx
    from trt_prune.stages import prune

    path, made = _source(name, folder)
    source = onnx.load(str(path))
    record = {"model": name, "source": made, "opset": onnx_opset(source),
              "nodes": len(source.graph.node), "outputs": [o.name for o in source.graph.output]}
    started = time.perf_counter()
    imported = import_onnx(path)
    record["seconds_convert"] = time.perf_counter() - started
    record.update(body_nodes=len(imported.model.graph.node) - len(imported.tail), tail_nodes=len(imported.tail),
                  tail_ops=sorted({n.op_type for n in imported.tail}), own_converters=imported.own_converters,
                  convert_parity=max(imported.parity.values()), fixed_modules=len(imported.fixed))
    started = time.perf_counter()
    result = prune(path, target_macs=0.5, out=folder / f"{name}_pruned")
    record["seconds_prune_export"] = time.perf_counter() - started
    report = result.report
    record.update(macs_before=report["macs_before"], macs_after=report["macs_after"],
                  macs_ratio=report["macs_after"] / report["macs_before"],
                  params_ratio=report["params_after"] / report["params_before"],
                  groups_pruned=report["groups_pruned"], groups_total=report["groups_total"],
                  kept_whole_ops=len(report["kept_whole"]),
                  export_parity=max(report["onnx"]["export_parity_max_abs"].values()),
                  pruned_outputs=report["onnx"]["outputs"])
    pruned = onnx.load(report["onnx"]["path"])
    x = np.random.default_rng(0).random(imported.input_shape).astype(np.float32)
    got = ort_session(pruned).run(None, {imported.input_name: x})
    ref = ort_session(source).run(None, {imported.input_name: x})
    record["outputs_match_source"] = record["pruned_outputs"] == record["outputs"] and all(
        g.shape == r.shape and g.dtype == r.dtype for g, r in zip(got, ref, strict=True))
    record["pruned_opset"] = onnx_opset(pruned)
    record["seconds_total"] = record["seconds_convert"] + record["seconds_prune_export"]
    return record


def onnx_opset(model: onnx.ModelProto) -> int:
    from trt_prune.onnx_io import default_opset

    return default_opset(model)


def markdown(records: list[dict]) -> str:
    lines = ["# ONNX-only pruning: convert, prune to half the MACs, stitch the tail back", "",
             "Each source file is converted to torch (onnx2torch plus trt_prune's own converters), checked against "
             "ONNX Runtime, pruned with `target_macs=0.5` (L1, round to 8, no ignore list), re-exported at the "
             "source's opset, and its post-processing tail (ops after the last layer with weights) stitched back. "
             "convert max abs: converted torch body vs ONNX Runtime on the source's body; export max abs: the "
             "pruned ONNX body vs the pruned torch module (the exporter's check, seeded random input); outputs: "
             "the pruned graph has the source's outputs with the same shapes and types, run in ONNX Runtime. "
             "Command: `python bench/onnx_import.py`.", "",
             "| model | source | opset | tail | own converters | convert max abs | MACs× | params× | groups pruned "
             "| export max abs | outputs | s convert | s prune+export |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | ✗ {r['error']} |" + " |" * 11)
            continue
        tail = f"{r['tail_nodes']} nodes ({', '.join(r['tail_ops'])})" if r["tail_nodes"] else "—"
        outputs = ("✓ " if r["outputs_match_source"] else "✗ ") + ", ".join(r["pruned_outputs"])
        lines.append(f"| {r['model']} | {r['source']} | {r['opset']} | {tail} | "
                     f"{', '.join(r['own_converters']) or '—'} | {r['convert_parity']:.1e} | {r['macs_ratio']:.3f} | "
                     f"{r['params_ratio']:.3f} | {r['groups_pruned']}/{r['groups_total']} | "
                     f"{r['export_parity']:.1e} | {outputs} | {r['seconds_convert']:.1f} | "
                     f"{r['seconds_prune_export']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(RESULTS / "onnx_import.json"))
    p.add_argument("--models", default=",".join(MODELS))
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            try:
                records.append(run(name, Path(tmp)))
            except Exception as exc:  # a benchmark records a failure and goes on to the next model
                records.append({"model": name, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
            print(records[-1], file=sys.stderr, flush=True)
    save(args.json, {"models": records}, markdown(records))


if __name__ == "__main__":
    main()
