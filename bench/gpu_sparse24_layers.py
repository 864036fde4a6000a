"""2:4 (cuSPARSELt) against dense, per eligible Linear / 1×1-conv layer of a model, on a CUDA GPU.

Every Linear and 1×1 convolution (groups 1, stride 1, no padding) that :func:`trt_prune.sparsity.eligibility`
lets carry 2:4 at ``--min-channels 0`` is one GEMM ``[M, K] × [K, N]``: M = batch × output positions, K = input
channels, N = output channels. For each, at each batch size, this times ``F.linear(x, W)`` dense and with
``W = torch.sparse.to_sparse_semi_structured(W_masked)`` (fp16), both under CUDA-graph replay (eager sparse
calls carry ~0.45 ms of host overhead each, which would swamp the kernels), medians over interleaved rounds
of CUDA-event timings. The table says, per layer, whether 2:4 paid, so the eligibility floor
(``DEFAULT_MIN_CHANNELS``, 256 from NVIDIA's guidance) can be set from measurements.

Run on a GPU machine from the repo root:
    PYTHONPATH=. python3 bench/gpu_sparse24_layers.py [--model builtin:demo-detector,torchvision:resnet50]
        [--size 640] [--batches 1,8] [--json bench/results/gpu_sparse24_layers.json]
Several models (comma-separated) widen the range of channel counts: the demo detector's GEMMs stay at or under
256 channels, resnet50's reach 2048. The JSON (stamped with commit, date and machine by
``trt_prune.provenance.write_result``) is rewritten after every model and batch, so a run cut off by a
time limit keeps what it measured. ``--dry-run`` lists the layers and their GEMM shapes without a GPU (what the
CPU tests exercise).
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def gemm_layers(model: nn.Module, input_shape) -> list[dict]:
    """The model's 2:4-capable Linear / 1×1-conv layers as GEMMs at ``input_shape`` (one forward with hooks)."""
    from trt_prune.sparsity import eligibility

    rows, handles = [], []

    def hook(path):
        def fn(module, inputs, output):
            x = inputs[0]
            if isinstance(module, nn.Linear):
                m = x.numel() // x.shape[-1]
            else:
                m = output.shape[0] * output[0, 0].numel()  # batch × output positions
            rows.append({"module": path, "op": type(module).__name__, "M": int(m),
                         "K": int(module.weight.shape[1]), "N": int(module.weight.shape[0])})
        return fn

    for path, module in model.named_modules():
        is_pw = (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1
                 and module.stride == (1, 1) and module.padding in ((0, 0), "valid"))
        if not (isinstance(module, nn.Linear) or is_pw):
            continue
        kind = "linear" if isinstance(module, nn.Linear) else "conv"
        if eligibility(kind, tuple(module.weight.shape), 1, min_channels=0).eligible:
            handles.append(module.register_forward_hook(hook(path)))
    try:
        with torch.no_grad():
            first = next(model.parameters())  # the probe input follows the model's device and dtype (fp16 on GPU)
            model(torch.zeros(input_shape, device=first.device, dtype=first.dtype))
    finally:
        for h in handles:
            h.remove()
    seen, unique = set(), []
    for r in rows:  # a module called twice appears once
        if r["module"] not in seen:
            seen.add(r["module"])
            unique.append(r)
    return unique


def _graph(fn, replays: int):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run() -> float:
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / replays

    return run


def time_layer(m: int, k: int, n: int, rounds: int, replays: int) -> dict:
    from torch.sparse import to_sparse_semi_structured

    from trt_prune.sparsity.pattern import mask_2of4

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    w = (w * torch.from_numpy(mask_2of4(w.numpy(), axis=1))).half().cuda()
    x = torch.randn(m, k, generator=gen).half().cuda()
    try:
        ws = to_sparse_semi_structured(w)
    except Exception as exc:  # shape or dtype constraints of the sparse kernels: report, do not guess
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    dense_out = torch.empty(m, n, dtype=torch.half, device="cuda")
    sparse_out = torch.empty(m, n, dtype=torch.half, device="cuda")

    def dense():
        dense_out.copy_(nn.functional.linear(x, w))

    def sparse():
        sparse_out.copy_(nn.functional.linear(x, ws))

    try:
        timers = {"dense": _graph(dense, replays), "sparse": _graph(sparse, replays)}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    err = float((dense_out.float() - sparse_out.float()).abs().max())
    samples = {name: [] for name in timers}
    for _ in range(rounds):  # interleaved: clocks and neighbours drift alike for both
        for name, t in timers.items():
            samples[name].append(t())
    d, s = statistics.median(samples["dense"]), statistics.median(samples["sparse"])
    return {"dense_ms": d, "sparse_ms": s, "speedup": d / s, "max_abs_diff": err}


BINS = ((0, 128), (128, 256), (256, 512), (512, 1 << 30))


def summarize_by_channels(results: list[dict]) -> list[dict]:
    """Timed layers binned by ``min(K, N)`` (the smaller channel count, which the eligibility floor tests):
    per bin the number of layers, how many ran faster with 2:4, and the median speed-up."""
    timed = [r for r in results if "speedup" in r]
    rows = []
    for lo, hi in BINS:
        sel = [r for r in timed if lo <= min(r["K"], r["N"]) < hi]
        if sel:
            rows.append({"min_channels": lo, "below": hi if hi < 1 << 30 else None, "layers": len(sel),
                         "faster": sum(r["speedup"] > 1 for r in sel),
                         "median_speedup": statistics.median(r["speedup"] for r in sel)})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:demo-detector",
                   help="model spec, or several separated by commas")
    p.add_argument("--size", type=int, default=640)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--json", type=Path, help="result file (e.g. bench/results/gpu_sparse24_layers.json)")
    p.add_argument("--dry-run", action="store_true", help="list layers and GEMM shapes on the CPU only")
    args = p.parse_args(argv)
    from trt_prune.models import load_model
    from trt_prune.provenance import stamp, write_result

    specs = [m.strip() for m in args.model.split(",") if m.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    if not args.dry_run and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (use --dry-run to list the layers)")
    info = {"gpu": torch.cuda.get_device_name() if not args.dry_run else None, "torch": torch.__version__,
            "python": platform.python_version(), "models": specs, "size": args.size, "rounds": args.rounds,
            "replays": args.replays}
    results: list[dict] = []
    provenance = stamp(ROOT) if args.json else None
    for spec in specs:
        loaded = load_model(spec)
        model = loaded.model.eval()
        shape = (1, *loaded.input_shape[1:-2], args.size, args.size)
        if args.dry_run:
            for r in gemm_layers(model, shape):
                print(f"{spec} {r['module']:40s} {r['op']:7s} M={r['M']:7d} K={r['K']:5d} N={r['N']:5d}")
            continue
        model = model.cuda().half()
        print(f"# {info['gpu']}, torch {info['torch']}; {spec} at {args.size}×{args.size}, fp16, CUDA graphs")
        for b in batches:
            for r in gemm_layers(model, (b, *shape[1:])):
                row = {"model": spec, **r, "batch": b,
                       **time_layer(r["M"], r["K"], r["N"], args.rounds, args.replays)}
                results.append(row)
                head = f"b{b} {r['module']:36s} M={r['M']:7d} K={r['K']:5d} N={r['N']:5d}"
                if "error" in row:
                    print(f"{head}  {row['error']}")
                else:
                    print(f"{head}  dense {row['dense_ms']:.4f} ms  2:4 {row['sparse_ms']:.4f} ms  "
                          f"{row['speedup']:.2f}×", flush=True)
            if args.json:  # after every batch: a run cut off by its time limit keeps what it measured
                write_result(args.json.stem, {"provenance": provenance, "environment": info, "results": results,
                                              "by_channels": summarize_by_channels(results)},
                             results_dir=args.json.parent, folder=ROOT)
        del model
        torch.cuda.empty_cache()
    summary = summarize_by_channels(results)
    if summary:
        print("\nmin(K, N) | layers | 2:4 faster | median speed-up   (all models and batches)")
        for row in summary:
            upper = row["below"] if row["below"] is not None else "∞"
            print(f"{row['min_channels']}–{upper} | {row['layers']} | {row['faster']} | "
                  f"{row['median_speedup']:.2f}×")


if __name__ == "__main__":
    main()
