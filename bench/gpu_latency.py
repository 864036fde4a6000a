"""Latency-aware pruning on a GPU: the torch backend's fp16 latency table, the planner's plan, and 2:4 where the
table says it pays (the GPU part of the latency-aware pruning issue; run by ``bench/gpu_check.sh latency``).

For ``builtin:demo-detector`` at ``--size`` (640) on the torch backend (CUDA, fp16):

1. measures (or extends) the latency table with 2:4 times beside the dense ones (``ensure_table(backend="torch",
   dtype="float16")``: every grid point timed dense and with 2:4 weights on cuSPARSELt), and plots it;
2. plans to ``--target`` (0.6) of the dense latency (``prune_then_sparsify(target_latency=…)``): channel counts
   from the knapsack, then 2:4 on exactly the layers whose measured sparse kernel is faster at the kept size;
3. times dense, the latency plan, the latency plan + its 2:4 layers, and uniform-ratio L1 at the same predicted
   latency, interleaved on the torch backend, and prints predicted against measured.

``--dry-run`` runs the same code on the CPU in fp32 at a small size (no 2:4 kernels: the planner then falls
back to the channel floor), which is how it is checked without a GPU.

    PYTHONPATH=. python3 bench/gpu_latency.py [--json OUT.json] [--size 640] [--target 0.6] [--table-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

MODEL = "builtin:demo-detector"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(models: dict, shape, config, rounds: int, iterations: int) -> dict[str, float]:
    from trt_prune import stages
    from trt_prune.latency.measure import CALIBRATION_DISCARD
    from trt_prune.profiling.profile import interleaved_blocks

    sessions, feeds = {}, {}
    try:
        for name, (model, sparse) in models.items():
            cfg = copy.deepcopy(config)
            cfg.extra["sparse24"] = sparse
            sessions[name] = stages.build(model.eval(), "torch", cfg, batch=shape[0], input_shape=shape)
            spec = sessions[name].inputs[0]
            feeds[name] = {spec.name: np.random.default_rng(0).standard_normal(shape).astype(spec.dtype)}
        blocks = interleaved_blocks(sessions, feeds, rounds=rounds, iterations_per_round=iterations, warmup_s=0.5,
                                    discard_first=CALIBRATION_DISCARD)
    finally:
        for s in sessions.values():
            s.close()
    return {n: float(np.median([x for b in bl for x in b])) for n, bl in blocks.items()}


def main(argv=None) -> int:
    import torch

    from trt_prune.backends import BuildConfig
    from trt_prune.errors import SparsifyError
    from trt_prune.latency import LatencyModel, ensure_table
    from trt_prune.latency.plot import plot_table
    from trt_prune.models import load_model
    from trt_prune.provenance import write_result
    from trt_prune.pruning import prune
    from trt_prune.pruning.graph import trace
    from trt_prune.pruning.structured import PruneConfig, _example, _plan
    from trt_prune.sparsity.combined import prune_then_sparsify

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--target", type=float, default=0.6, help="latency budget, a fraction of dense")
    p.add_argument("--points", type=int, default=4, help="grid points per channel axis")
    p.add_argument("--table-dir", default="out/latency_tables/torch-demo-detector")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--dry-run", action="store_true", help="CPU, fp32, small size: the code path without a GPU")
    p.add_argument("--json", default=None, help="write the result here (and the table beside it as .md)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA GPU: use --dry-run to exercise the code on the CPU")
    size = 64 if args.dry_run else args.size
    dtype = "float32" if args.dry_run else "float16"
    round_to = 8 if args.dry_run else 32  # REFERENCE.md §4: multiples of 32 run fastest on the GPU
    shape = (1, 3, size, size)
    model = load_model(MODEL).model.eval()
    graph = trace(model, _example(model, shape))
    t0 = time.perf_counter()
    table, info = ensure_table(model, graph, shape, backend="torch", location=args.table_dir, round_to=round_to,
                               points=args.points, threads=1, dtype=dtype,
                               on_estimate=lambda n, s: log(f"measuring {n} grid points: about {s:.0f} s"))
    log(f"table: {info}")
    plot = plot_table(table, Path(args.table_dir) / "latency_table.png")
    lm = LatencyModel(graph, table)
    rows = {"dense": {"predicted_ms": lm.predict(), "macs": 1.0}}
    config = PruneConfig(target_latency=args.target, round_to=round_to)
    try:
        combined = prune_then_sparsify(model, shape, config, latency_table=table)
        latency_model, sparse_model = combined.prune.model, combined.model
        report = combined.prune.report
        pays = combined.sparsify.sparse_layers
    except SparsifyError as exc:  # the table says 2:4 pays nowhere (or has no 2:4 times: the CPU)
        log(f"2:4: {exc}")
        result = prune(model, shape, copy.deepcopy(config), latency_table=table)
        latency_model, sparse_model, report, pays = result.model, None, result.report, []
    lat = report["latency"]
    rows["latency"] = {"predicted_ms": lat["predicted_ms"], "macs": report["macs_after"] / report["macs_before"]}
    # uniform L1 at the same predicted latency: the ratio bisected on the latency model
    def uniform_ms(ratio: float) -> float:
        plan, _, _ = _plan(graph, PruneConfig(ratio=ratio, round_to=round_to))
        return lm.predict(graph.kept_mask(plan))

    lo, hi = 0.0, 0.95
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if uniform_ms(mid) > lat["predicted_ms"] else (lo, mid)
    uniform = prune(model, shape, ratio=hi, round_to=round_to)
    rows["uniform-l1"] = {"predicted_ms": uniform_ms(hi),
                          "macs": uniform.report["macs_after"] / uniform.report["macs_before"]}
    models = {"dense": (model, False), "latency": (latency_model, False), "uniform-l1": (uniform.model, False)}
    if sparse_model is not None and not args.dry_run:
        models["latency+2:4"] = (sparse_model, True)
        rows["latency+2:4"] = {"predicted_ms": None, "macs": rows["latency"]["macs"]}
    extra = {"device": "cpu"} if args.dry_run else {"device": "cuda", "channels_last": True}
    build = BuildConfig(precision="fp32" if args.dry_run else "fp16", extra=extra)
    measured = timed(models, shape, build, args.rounds, args.iterations)
    for name, ms in measured.items():
        rows[name]["measured_ms"] = ms
        rows[name]["speedup"] = measured["dense"] / ms
    lines = ["| variant | MACs | predicted ms | measured p50 ms | speed-up |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        pred = "—" if r["predicted_ms"] is None else f"{r['predicted_ms']:.3f}"
        lines.append(f"| {name} | {r['macs']:.3f} | {pred} | {r['measured_ms']:.3f} | {r['speedup']:.2f}× |")
    md = (f"{MODEL} at {'x'.join(map(str, shape))}, torch backend ({dtype}), budget {args.target}× dense; "
          f"2:4 where the table says it pays: {', '.join(pays) or 'none'}.\n\n" + "\n".join(lines) + "\n")
    print(md)
    data = {"model": MODEL, "shape": list(shape), "dtype": dtype, "target": args.target, "round_to": round_to,
            "table": info, "plot": str(plot), "rows": rows, "sparse24_pays": pays,
            "sparse24_choice": lat.get("sparse24"), "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        write_result(Path(args.json).stem, data, md, results_dir=Path(args.json).parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
