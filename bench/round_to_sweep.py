"""How channel rounding changes the speed of a pruned model on this machine's ONNX Runtime.

Prunes builtin:demo-detector to about half its MACs with counts rounded to 8, 16 and 32, exports each, and times
them interleaved with dense (randomised rounds, medians). Usage: python bench/round_to_sweep.py [--rounds 15]
Prints the table and writes ``bench/results/round_to_sweep.{json,md}`` through ``trt_prune.provenance.write_result``
(stamped with commit, date and machine).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import RESULTS, save


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iterations", type=int, default=10, help="timed calls per variant per round")
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--json", default=str(RESULTS / "round_to_sweep.json"),
                   help="result file; the table goes beside it (.md)")
    args = p.parse_args()

    from trt_prune.backends import BuildConfig, get_backend
    from trt_prune.exporter import export_onnx
    from trt_prune.models import load_model
    from trt_prune.profiling.profile import interleaved_timings, machine_info
    from trt_prune.pruning import prune
    from trt_prune.pruning.alignment import cpu_flags

    shape = (1, 3, 320, 320)
    dense = load_model("builtin:demo-detector").model
    models, macs = {"dense": dense}, {}
    for r in (8, 16, 32):
        res = prune(dense, shape, target_macs=args.target_macs, round_to=r)
        models[f"round_to={r}"] = res.model
        macs[f"round_to={r}"] = res.report["macs_after"] / res.report["macs_before"]
    macs["dense"] = 1.0
    backend = get_backend("onnxruntime")
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    sessions, feeds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"{name.replace('=', '')}.onnx"
            export_onnx(model, path, shape)
            sessions[name] = backend.build(path, BuildConfig(extra={"allow_spinning": False}))
            feeds[name] = {sessions[name].inputs[0].name: x}
        samples = interleaved_timings(sessions, feeds, rounds=args.rounds, iterations_per_round=args.iterations)
        env = {**machine_info(), **sessions["dense"].env()}
        for s in sessions.values():
            s.close()
    avx = "AVX-512" if "avx512f" in cpu_flags() else "no AVX-512"
    base = float(np.median(samples["dense"]))
    rows = [{"variant": name, "macs_ratio": macs[name], "p50_ms": float(np.median(s)),
             "speedup": base / float(np.median(s)), "samples_ms": [round(float(x), 4) for x in s]}
            for name, s in samples.items()]
    lines = [f"{env.get('cpu')} ({env.get('cpu_count')} cores, {avx}), ONNX Runtime {env.get('backend_version')}, "
             f"{env.get('threads')} threads, batch 1, {args.rounds} interleaved rounds x {args.iterations}", "",
             "| variant | MACs vs dense | p50 ms | speed-up |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['macs_ratio']:.3f} | {r['p50_ms']:.2f} | {r['speedup']:.2f}× |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    save(args.json, {"model": "builtin:demo-detector", "input_shape": list(shape), "target_macs": args.target_macs,
                     "rounds": args.rounds, "iterations": args.iterations, "simd": avx, "env": env, "rows": rows},
         table)


if __name__ == "__main__":
    main()
