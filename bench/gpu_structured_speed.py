"""Dense vs structured-pruned demo detector on a CUDA GPU, by channel rounding: torch, fp16, channels_last,
CUDA-graph replay timed with CUDA events (medians over interleaved rounds).

Run on a GPU machine from the repo root:
    PYTHONPATH=. python3 bench/gpu_structured_speed.py [--out bench/results/gpu_structured_speed.json]
``--out`` writes the rows as JSON and the table as Markdown beside it, stamped with commit, date and machine by
``trt_prune.provenance.write_result``.
It shows on the GPU what bench/round_to_sweep.py shows on the CPU: the same MACs run at different speeds
depending on whether the channel counts suit the kernels.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch


def graph_timer(model, x, replays: int):
    """Capture one forward as a CUDA graph; return a function timing ``replays`` replays (ms per replay)."""
    from trt_prune.backends.torch_backend import capture_cuda_graph

    graph, _ = capture_cuda_graph(model, x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run() -> float:
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / replays

    # the graph replays into the memory of model and x: keep them alive as long as the timer lives
    run.keep_alive = (model, x, graph)
    for _ in range(3):
        run()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="result file (.json; the table goes beside it as .md)")
    args = p.parse_args()

    from trt_prune.models import load_model
    from trt_prune.pruning import prune

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark needs one")
    torch.backends.cudnn.benchmark = True
    shape = (1, 3, 320, 320)
    dense = load_model("builtin:demo-detector").model
    variants = {"dense": (dense, 1.0)}
    for r in (1, 8, 16, 32):
        res = prune(dense, shape, target_macs=0.5, round_to=r)
        variants[f"round_to={r}"] = (res.model, res.report["macs_after"] / res.report["macs_before"])
    gpu = torch.cuda.get_device_name()
    rows = []
    for bs in (int(b) for b in args.batches.split(",")):
        timers = {}
        for name, (model, _) in variants.items():
            m = copy.deepcopy(model).cuda().half().eval().to(memory_format=torch.channels_last)
            x = torch.randn(bs, 3, 320, 320, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
            timers[name] = graph_timer(m, x, args.replays)
        samples = {name: [] for name in timers}
        for _ in range(args.rounds):
            for name, run in timers.items():
                samples[name].append(run())
        base = statistics.median(samples["dense"])
        for name, s in samples.items():
            med = statistics.median(s)
            rows.append({"batch": bs, "variant": name, "macs_ratio": variants[name][1], "ms": med,
                         "speedup": base / med, "images_per_s": bs * 1000 / med})
        del timers
        torch.cuda.empty_cache()
    lines = [f"{gpu}, torch {torch.__version__}, fp16, channels_last, CUDA-graph replay, "
             f"medians of {args.rounds} rounds x {args.replays} replays", "",
             "| batch | variant | MACs vs dense | ms | images/s | speed-up |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['variant']} | {r['macs_ratio']:.3f} | {r['ms']:.3f} | {r['images_per_s']:.0f} | "
              f"{r['speedup']:.2f}× |" for r in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        from trt_prune.provenance import write_result

        write_result(args.out.stem, {"gpu": gpu, "torch": torch.__version__, "rows": rows}, table,
                     results_dir=args.out.parent, folder=Path(__file__).resolve().parents[1])


if __name__ == "__main__":
    main()
