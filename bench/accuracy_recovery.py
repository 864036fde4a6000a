"""Accuracy at equal training budget: dense control vs one-shot vs Torch-Pruning vs gradual pruning variants.

Every row trains ``builtin:demo-detector`` (from its shipped weights) for the same number of steps at the same
batch size and learning rate on the road scenes, then scores mAP@[.5:.95] on the validation scenes:

- ``dense``: no pruning (the control),
- ``oneshot``: one-shot L1 pruning to the MACs target, BatchNorm re-estimated, then fine-tuned (today's demo),
- ``torch-pruning``: Torch-Pruning 1.6's MetaPruner with its group L2-magnitude importance to the same target
  (the ratio searched for), then fine-tuned; where it cannot prune the model the row records its error,
- ``gradual``: :class:`trt_prune.pruning.gradual.ChannelPruner`, accumulated Taylor on BN γ/β, masks tightening
  along the cubic schedule over the first 60 % of the steps,
- ``gradual+distill``: the same with the dense model as teacher (:class:`~trt_prune.pruning.DetectorDistillLoss`),
- ``sparse+gradual``: BN-γ L1 sparse training for the first 10 % of the steps, then as ``gradual``.

Two phases, so training can run where it is fast and speed is measured where it counts::

    python bench/accuracy_recovery.py train --rows all --target-macs 0.5 --steps 1000 --out DIR [--device cuda]
    python bench/accuracy_recovery.py merge DIR [DIR …]     # CPU: ONNX Runtime p50, interleaved; tables; plot

``train`` writes one JSON per row (``METHOD@TARGET.json``: mAP, MACs, the recipe, the training record, the
device); rows may run as separate invocations. ``merge`` rebuilds each row's architecture from its recipe (p50
depends on the architecture only), exports and cleans it, times all rows of a target interleaved with ONNX
Runtime on this machine, and writes ``bench/results/accuracy_recovery.{json,md}`` (the 50 % rows) and
``accuracy_pareto.{json,md,png}`` (every target).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path

import torch

METHODS = ("dense", "oneshot", "torch-pruning", "gradual", "gradual+distill", "sparse+gradual", "oneshot+distill",
           "oneshot-global", "gradual-fixed+distill", "gradual-global+distill")
# the variants after the first six came from the first run's lessons: one-shot with the teacher; global ranking
# (no group loses more than 80 %); masks that never come back, settled by 40 % of the steps
SPEC = "builtin:demo-detector"
IMG = 320


def _predict(model, device):
    model.eval()

    def predict(images):
        with torch.no_grad():
            return model(images.to(device)).float().cpu()

    return predict


def _tp_prune(model, target_macs: float, round_to: int) -> dict:
    """Torch-Pruning's MetaPruner (group L2 magnitude), its ratio bisected to the MACs target; raises on failure."""
    import torch_pruning as tp

    example = torch.rand(1, 3, IMG, IMG)
    dense_macs, _ = tp.utils.count_ops_and_params(model, example)
    heads = [m for n, m in model.named_modules() if n.endswith(("cls.2", "box.2"))]

    def attempt(ratio: float, target):
        pruner = tp.pruner.MetaPruner(target, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, round_to=round_to,
                                      ignored_layers=[dict(target.named_modules())[n] for n, m in
                                                      model.named_modules() if m in heads])
        pruner.step()
        return tp.utils.count_ops_and_params(target, example)[0] / dense_macs

    lo, hi = 0.0, 0.9
    for _ in range(8):
        mid = (lo + hi) / 2
        if attempt(mid, copy.deepcopy(model)) > target_macs:
            lo = mid
        else:
            hi = mid
    attempt(hi, model)
    return {"ratio": hi}


def run_row(method: str, target_macs: float, steps: int, batch: int, lr: float, device: str, workers: int,
            eval_images: int, seed: int = 1) -> dict:
    from trt_prune.data import RoadScenes
    from trt_prune.detection.metrics import evaluate
    from trt_prune.finetune import finetune_detector, gradual_prune_detector, recalibrate_batchnorm
    from trt_prune.models import load_model
    from trt_prune.pruning import count_params, macs_of
    from trt_prune.stages import prune

    torch.manual_seed(seed)
    loaded = load_model(SPEC)
    model = loaded.model
    shape = (1, 3, IMG, IMG)
    dense_macs = macs_of(model, shape)
    row = {"method": method, "target_macs": target_macs, "steps": steps, "batch": batch, "lr": lr,
           "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
           "torch": torch.__version__}
    started = time.perf_counter()
    recipe, history = None, None
    if method == "dense":
        stats = finetune_detector(model, steps, batch_size=batch, lr=lr, img_size=IMG, seed=seed, workers=workers,
                                  device=device)
    elif method.startswith(("oneshot", "torch-pruning")):
        teacher = copy.deepcopy(model).eval() if method.endswith("distill") else None
        if method.startswith("oneshot"):
            options = {"global_pruning": True, "max_ratio": 0.8} if "global" in method else {}
            result = prune(loaded, shape, importance="l1", target_macs=target_macs, round_to=8, **options)
            model, recipe = result.model, result.recipe
        else:
            row["torch_pruning"] = _tp_prune(model, target_macs, 8)
        recalibrate_batchnorm(model, img_size=IMG)
        stats = finetune_detector(model, steps, batch_size=batch, lr=lr, img_size=IMG, seed=seed, workers=workers,
                                  device=device, teacher=teacher)
    else:
        options = {"gradual": {}, "gradual+distill": {"distill": True},
                   "sparse+gradual": {"sparsity": "bn_l1", "sparsity_weight": 1e-4},
                   "gradual-fixed+distill": {"distill": True, "regrow": False, "prune_share": 0.4},
                   "gradual-global+distill": {"distill": True, "global_pruning": True, "max_ratio": 0.8}}[method]
        result, stats = gradual_prune_detector(model, target_macs, steps, batch_size=batch, lr=lr, img_size=IMG,
                                               seed=seed, workers=workers, device=device, **options)
        recipe, history = result.recipe, stats.pop("history")
    model.to(device)
    scores = evaluate(_predict(model, device), RoadScenes("val", size=IMG), batch_size=32, limit=eval_images)
    model.cpu()
    row.update(map=scores["map50_95"], map50=scores["map50"], eval_images=scores["images"],
               macs=macs_of(model, shape) / dense_macs, params=count_params(model),
               seconds=round(time.perf_counter() - started, 1), loss_first=stats["loss_first"],
               loss_last=stats["loss_last"], recipe=recipe, history=history)
    return row


def cmd_train(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = METHODS if args.rows == "all" else tuple(r.strip() for r in args.rows.split(","))
    unknown = [r for r in rows if r not in METHODS]
    if unknown:
        print(f"error: unknown row(s) {unknown}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    for method in rows:
        if method == "dense" and args.target_macs != 0.5 and not args.dense_everywhere:
            continue  # one dense control serves every target
        name = f"{method}@{args.target_macs:g}" + ("" if args.steps == 1000 else f"_{args.steps}") + ".json"
        print(f"== {method} at {args.target_macs:g} of the MACs, {args.steps} steps", flush=True)
        try:
            row = run_row(method, args.target_macs, args.steps, args.batch, args.lr, args.device, args.workers,
                          args.eval_images)
        except Exception as exc:  # a row that cannot run says why; the others still run
            row = {"method": method, "target_macs": args.target_macs, "steps": args.steps,
                   "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            traceback.print_exc()
        tmp = out / (name + ".tmp")
        tmp.write_text(json.dumps(row, indent=1))
        tmp.replace(out / name)
        print(json.dumps({k: row.get(k) for k in ("method", "macs", "map", "seconds", "error")}), flush=True)
    return 0


def _key(row: dict) -> str:
    """A row's name: METHOD@TARGET, with _STEPS for a budget other than the standard 1,000 steps."""
    return f"{row['method']}@{row['target_macs']:g}" + ("" if row.get("steps", 1000) == 1000 else f"_{row['steps']}")


def _p50s(rows: list[dict], rounds: int, iterations: int) -> dict[str, float]:
    """ONNX Runtime CPU p50 of each row's architecture, all rows of one call timed interleaved."""
    import tempfile

    import numpy as np

    from trt_prune.backends import BuildConfig
    from trt_prune.models import load_model
    from trt_prune.profiling.profile import interleaved_timings
    from trt_prune.pruning import apply_recipe
    from trt_prune.stages import build, to_onnx

    dense = load_model(SPEC).model.eval()
    shape = (1, 3, IMG, IMG)
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0)).numpy()
    sessions, feeds = {}, {}
    with tempfile.TemporaryDirectory(prefix="accuracy_recovery_") as tmp:
        for row in rows:
            key = _key(row)
            model = dense if row["method"] == "dense" else apply_recipe(dense, row["recipe"]).eval()
            path = Path(tmp) / (key.replace("+", "_").replace("@", "_") + ".onnx")
            to_onnx(model, path, workdir=tmp, input_shape=shape, name=key)
            sessions[key] = build(path, "onnxruntime", BuildConfig(extra={"allow_spinning": False}))
            feeds[key] = {sessions[key].inputs[0].name: image}
        samples = interleaved_timings(sessions, feeds, rounds=rounds, iterations_per_round=iterations, warmup_s=1.0)
    return {k: float(np.median(v)) for k, v in samples.items()}


def cmd_merge(args) -> int:
    from trt_prune.provenance import write_result

    rows = []
    for folder in args.dirs:
        for path in sorted(Path(folder).glob("*@*.json")):
            rows.append(json.loads(path.read_text()))
    if not rows:
        print(f"error: no row files (METHOD@TARGET.json) in {args.dirs}", file=sys.stderr)
        return 2
    timed = [r for r in rows if "error" not in r and (r["method"] == "dense" or r.get("recipe"))]
    p50 = _p50s(timed, args.rounds, args.iterations)
    controls = {r.get("steps"): r for r in rows if r["method"] == "dense" and "error" not in r}
    for r in rows:
        r["p50_ms"] = p50.get(_key(r))
        dense = controls.get(r.get("steps")) or controls.get(1000)
        if dense is not None and r.get("p50_ms"):
            r["speedup"] = p50[_key(dense)] / r["p50_ms"]
            r["map_vs_dense"] = r["map"] - dense["map"]  # against the control with the same budget

    def table(selected: list[dict]) -> str:
        lines = ["| method | MACs | params | p50 ms (ORT CPU) | speed-up | mAP50-95 | vs dense | trained on |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in selected:
            if "error" in r:
                lines.append(f"| {r['method']} | — | — | — | — | — | — | could not run: {r['error'][:120]} |")
                continue
            lines.append(f"| {r['method']} | {r['macs']:.3f} | {r['params'] / 1e6:.2f} M | "
                         f"{r['p50_ms']:.2f} | {r.get('speedup', 0):.2f}× | {r['map']:.3f} | "
                         f"{r.get('map_vs_dense', 0) * 100:+.1f} pts | {r['device']}, {r['steps']} steps × "
                         f"{r['batch']} |")
        return "\n".join(lines)

    order = {m: i for i, m in enumerate(METHODS)}
    half = sorted([r for r in rows if r["target_macs"] == 0.5], key=lambda r: order.get(r["method"], 99))
    for r in rows:  # a longer (or shorter) budget is an extra row, named so
        if r.get("steps", 1000) != 1000:
            r["method"] = f"{r['method']} ({r['steps']} steps)"
    compact = [{k: r.get(k) for k in ("method", "target_macs", "macs", "p50_ms", "speedup", "map", "map50",
                                      "map_vs_dense", "params", "steps", "batch", "lr", "device", "seconds",
                                      "error", "history")} for r in rows]
    note = (f"Training: the `device` column; ONNX Runtime p50 on this machine, {args.rounds} interleaved rounds × "
            f"{args.iterations} runs, batch 1, {IMG}×{IMG}; mAP@[.5:.95] on the first "
            f"{half[0].get('eval_images', 500) if half else 500} validation scenes.")
    results = Path(args.results)
    write_result("accuracy_recovery", {"rows": [c for c in compact if c["target_macs"] == 0.5], "note": note},
                 f"{note}\n\n{table(half)}\n", results_dir=results)
    targets = sorted({r["target_macs"] for r in rows})
    pareto = sorted(rows, key=lambda r: (-r["target_macs"], order.get(r["method"], 99)))
    write_result("accuracy_pareto", {"rows": compact, "targets": targets, "note": note},
                 f"{note}\n\n{table(pareto)}\n", results_dir=results)
    _plot(rows, results / "accuracy_pareto.png")
    print(table(pareto))
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        pts = sorted((r["p50_ms"], r["map"]) for r in rows
                     if r["method"] == method and "error" not in r and r.get("p50_ms"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if len(pts) > 1 else "o", label=method)
    ax.set_xlabel("ONNX Runtime CPU p50 (ms), batch 1")
    ax.set_ylabel("mAP@[.5:.95]")
    ax.set_title("demo detector: accuracy vs latency at equal training steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and score rows; one JSON per row in --out")
    t.add_argument("--rows", default="all", help=f"comma-separated from {', '.join(METHODS)}, or all")
    t.add_argument("--target-macs", type=float, default=0.5)
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--workers", type=int, default=0, help="data-loader processes per row")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--eval-images", type=int, default=500)
    t.add_argument("--dense-everywhere", action="store_true", help="train a dense control at every target")
    t.add_argument("--out", required=True)
    m = sub.add_parser("merge", help="time the rows' architectures here and write bench/results")
    m.add_argument("dirs", nargs="+")
    m.add_argument("--rounds", type=int, default=20)
    m.add_argument("--iterations", type=int, default=15)
    m.add_argument("--results", default="bench/results", help="where the tables and the plot go")
    args = parser.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_merge(args)


if __name__ == "__main__":
    sys.exit(main())
