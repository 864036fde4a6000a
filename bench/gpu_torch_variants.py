"""Dense vs structured vs 2:4 vs structured+2:4, on the torch backend of a CUDA GPU (the GPU truth we can
measure without TensorRT).

For ``builtin:demo-detector`` and ``torchvision:resnet50`` at 640×640, batch 1 and 8: each variant is built by
the torch backend in fp16, channels_last, replayed from a CUDA graph, and timed with CUDA events per replay
(``trt_prune.profile`` on the torch backend; warm-up by time, then a duration). The variants:

- ``dense``: the model as built (the demo with its shipped weights, resnet50 random);
- ``structured``: ``trt_prune.prune(ratio=0.3, round_to=16)`` (channel counts kept multiples of 16);
- ``2:4``: ``trt_prune.sparsify(min_channels=0)`` magnitude masks, then every layer the torch path accepts
  (``sparse24_reason``: Linear and 1×1 conv with dims multiples of 16) runs on cuSPARSELt;
- ``structured+2:4``: both, structured first.

Per variant: p50 / p99 latency, images/s, speed-up against dense, and (batch 1) the per-stage split of the
per-module profile with its sum against the end-to-end latency. Prints a short table last.

On a machine without CUDA, ``--dry-run`` runs the same code path on the CPU in fp32 at a small size without
CUDA graphs or 2:4 (what ``tests/cpu`` exercises).

    PYTHONPATH=. python3 bench/gpu_torch_variants.py [--json OUT.json] [--size 640] [--batches 1,8] [--seconds 2]

``--json`` writes the result (stamped with commit, date and machine by ``trt_prune.provenance.write_result``)
and the table beside it as ``OUT.md``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = ("builtin:demo-detector", "torchvision:resnet50")
VARIANTS = ("dense", "structured", "2:4", "structured+2:4")


def variants(spec: str, size: int) -> dict:
    """The four variants of ``spec`` as models (on the CPU, fp32)."""
    from trt_prune import load_model, prune, sparsify

    model = load_model(spec).model
    shape = (1, 3, size, size)
    structured = prune(model, shape, ratio=0.3, round_to=16).model
    return {"dense": model, "structured": structured,
            "2:4": sparsify(model, min_channels=0).model,
            "structured+2:4": sparsify(structured, min_channels=0).model}


def measure(model, batch: int, size: int, seconds: float, sparse: bool, dry_run: bool, per_layer: bool) -> dict:
    from trt_prune.backends import BuildConfig
    from trt_prune.profiling import aggregate_layers
    from trt_prune.stages import profile

    shape = (batch, 3, size, size)
    extra = {"device": "cpu"} if dry_run else {"device": "cuda", "channels_last": True, "cuda_graph": True,
                                               "sparse24": sparse}
    config = BuildConfig(precision="fp32" if dry_run else "fp16", shapes={"images": (shape, shape, shape)},
                         extra=extra)
    result = profile(model, "torch", batch=batch, warmup_s=min(1.0, seconds), iterations=3 if dry_run else 50,
                     min_duration_s=seconds, per_layer=per_layer, layer_runs=3 if dry_run else 20, config=config)
    row = {"p50_ms": result.latency_ms["p50"], "p99_ms": result.latency_ms["p99"],
           "cv": result.latency_ms["cv"], "images_s": result.throughput_images_s, "notes": result.notes,
           "env": result.env}
    if per_layer:
        row["stages_ms"] = {r["key"]: r["ms"] for r in aggregate_layers(result.per_layer, "stage")}
        row["per_layer_sum_ms"] = result.per_layer_sum_ms
        row["per_layer_run_ms"] = result.per_layer_run_ms
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per variant and batch")
    parser.add_argument("--dry-run", action="store_true", help="CPU, fp32, small: checks the code path only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible to torch; use --dry-run to check the code path on the CPU")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for spec in args.models.split(","):
        print(f"{spec}: building variants …", file=sys.stderr, flush=True)
        models = variants(spec, args.size)
        for batch in batches:
            for name in VARIANTS:
                started = time.perf_counter()
                row = measure(models[name], batch, args.size, args.seconds, "2:4" in name, args.dry_run,
                              per_layer=batch == batches[0])
                row.update(model=spec, variant=name, batch=batch, seconds=round(time.perf_counter() - started, 1))
                rows.append(row)
                print(f"  {name:>15} b{batch}: p50 {row['p50_ms']:.3f} ms", file=sys.stderr, flush=True)
    for row in rows:
        dense = next(r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"]
                     and r["variant"] == "dense")
        row["speedup"] = dense["p50_ms"] / row["p50_ms"]
    env = rows[0]["env"] if rows else {}
    result = {"gpu": env.get("gpu", "none (dry run)"), "torch": torch.__version__, "python": platform.python_version(),
              "size": args.size, "dry_run": args.dry_run, "rows": rows}
    if args.json:
        from trt_prune.provenance import write_result

        write_result(Path(args.json).stem, result, "```\n" + table(result) + "\n```",
                     results_dir=Path(args.json).parent, folder=ROOT)
    print(table(result))
    return result


def table(result: dict) -> str:
    lines = [f"torch backend on {result['gpu']} (torch {result['torch']}), {result['size']}x{result['size']}, "
             "fp16, channels_last, CUDA graph" if not result["dry_run"] else "dry run on the CPU, fp32",
             f"{'model':<24}{'variant':>16}{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}{'img/s':>10}{'speed-up':>10}"]
    for r in result["rows"]:
        lines.append(f"{r['model']:<24}{r['variant']:>16}{r['batch']:>6}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}"
                     f"{r['images_s']:>10.1f}{r['speedup']:>9.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
