"""Print the demo's report as the Markdown table the README shows.

Usage: python bench/demo_table.py [out/demo/report.json]
The README's demo numbers are this script's output after `make demo` (trt-prune demo --out out/demo).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str = "out/demo/report.json") -> None:
    report = json.loads(Path(path).read_text())
    env = report["env"]
    print(f"Machine: {env.get('cpu')} ({env.get('cpu_count')} cores), ONNX Runtime {env.get('backend_version')}, "
          f"{env.get('threads')} threads, batch 1, input {'x'.join(map(str, report['input_shape']))}; "
          f"{report['eval_images']} validation images; fine-tune {report['finetune_steps']} steps; "
          f"{report['date']}.\n")
    cols = ["variant", "params", "GMACs", "2:4 layers", "2:4 kept (torch / ONNX)", "mAP50-95", "mAP50-95 ft",
            "mAP50-95 ORT", "p50 ms", "p99 ms", "inferences/s", "speed-up (p50)", "ONNX max abs err"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for v in report["variants"]:
        lat = v["latency_ms"]
        intact = v.get("masks_intact")
        kept = "—" if intact is None else (f"{'yes' if intact else 'NO'} / {v.get('onnx_24_weights', '?')} of "
                                           f"{v['sparse_layers']}")
        print(f"| {v['name']} | {v['params'] / 1e6:.2f} M | {v['macs'] / 1e9:.3f} | {v['sparse_layers']} | {kept} | "
              f"{v['map50_95']:.3f} | {v['map50_95_finetuned']:.3f} | {v['map50_95_onnx']:.3f} | {lat['p50']:.2f} | "
              f"{lat['p99']:.2f} | {v['throughput_ips']:.0f} | {v['speedup_p50']:.2f}× | "
              f"{v['parity']['max_abs']:.1e} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
