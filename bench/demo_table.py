"""The demo's report as the Markdown table the README shows, stored as a stamped result.

Usage: python bench/demo_table.py [out/demo/report.json] [--json bench/results/demo_table.json]
Run it after `make demo` (trt-prune demo --out out/demo): it prints the table and writes
``bench/results/demo_table.{json,md}`` through ``trt_prune.provenance.write_result``, stamped with the commit,
date and machine (the demo's own run date and environment are kept in the record too).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import RESULTS, save

COLUMNS = ["variant", "params", "GMACs", "2:4 layers", "2:4 kept (torch / ONNX)", "mAP50-95", "mAP50-95 ft",
           "mAP50-95 ORT", "p50 ms", "p99 ms", "inferences/s", "speed-up (p50)", "ONNX max abs err"]
ROW_KEYS = ("name", "params", "macs", "sparse_layers", "masks_intact", "onnx_24_weights", "map50_95", "map50",
            "map50_95_finetuned", "map50_finetuned", "map50_95_onnx", "map50_onnx", "latency_ms", "throughput_ips",
            "speedup_p50", "parity", "cv_warning", "derived_from")


def record(report: dict, source: str) -> dict:
    """What the table is made of: the demo's settings, environment and date, and one row per variant (without
    the latency samples and per-layer times, which stay in the report)."""
    return {"source": source, "model": report.get("model"), "demo_date": report.get("date"),
            "quick": report.get("quick"), "input_shape": report["input_shape"], "eval_images": report["eval_images"],
            "finetune_steps": report["finetune_steps"], "settings": report.get("settings"), "env": report["env"],
            "variants": [{k: v.get(k) for k in ROW_KEYS} for v in report["variants"]]}


def markdown(rec: dict) -> str:
    """The header line and the table of ``record``."""
    env = rec["env"]
    cvs = [v["latency_ms"]["cv"] for v in rec["variants"] if v["latency_ms"].get("cv") is not None]
    cv = f"; latency CV {min(cvs):.1%}–{max(cvs):.1%}" if cvs else ""
    lines = [f"Machine: {env.get('cpu')} ({env.get('cpu_count')} cores), ONNX Runtime {env.get('backend_version')}, "
             f"{env.get('threads')} threads, batch 1, input {'x'.join(map(str, rec['input_shape']))}; "
             f"{rec['eval_images']} validation images; fine-tune {rec['finetune_steps']} steps{cv}; demo run "
             f"{rec['demo_date']}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for v in rec["variants"]:
        lat = v["latency_ms"]
        intact = v.get("masks_intact")
        torch_kept = "—" if intact is None else ("yes" if intact else "NO")  # INT8 rows: no torch model, ONNX only
        kept = "—" if intact is None and not v["sparse_layers"] else (
            f"{torch_kept} / {v.get('onnx_24_weights', '?')} of {v['sparse_layers']}")
        before = "—" if v["map50_95"] is None else f"{v['map50_95']:.3f}"  # pruned while training: no 'before'
        # the INT8 rows have no torch model (no fine-tune score) and no export of their own (no parity)
        tuned = "—" if v["map50_95_finetuned"] is None else f"{v['map50_95_finetuned']:.3f}"
        err = (v.get("parity") or {}).get("max_abs")
        err = "—" if err is None else f"{err:.1e}"
        lines.append(f"| {v['name']} | {v['params'] / 1e6:.2f} M | {v['macs'] / 1e9:.3f} | {v['sparse_layers']} | "
                     f"{kept} | {before} | {tuned} | {v['map50_95_onnx']:.3f} | "
                     f"{lat['p50']:.2f} | {lat['p99']:.2f} | {v['throughput_ips']:.0f} | {v['speedup_p50']:.2f}× | "
                     f"{err} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", default="out/demo/report.json", help="the demo's report.json")
    parser.add_argument("--json", default=str(RESULTS / "demo_table.json"),
                        help="result file; the table goes beside it (.md)")
    args = parser.parse_args(argv)
    path = Path(args.report)
    if not path.is_file():
        parser.error(f"no demo report at {path}: run `make demo` first (it writes out/demo/report.json)")
    rec = record(json.loads(path.read_text()), str(args.report))
    text = markdown(rec)
    print(text)
    save(args.json, rec, text)
    return rec


if __name__ == "__main__":
    main()
