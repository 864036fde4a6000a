"""Latency-aware pruning against uniform-ratio L1 and global MACs-target pruning, at equal latency and equal MACs.

Several parts, all on this machine's ONNX Runtime (CPU, batch 1), with L1 importance unless a row says otherwise
and counts rounded to 8:

- ``demo`` — ``builtin:demo-detector`` (its shipped weights, 1×3×320×320) pruned three ways to the same latency
  budget, 0.6× the dense latency (``--target-latency``):

  * ``latency``: ``PruneConfig(target_latency=0.6)``, the knapsack planner on the measured latency table, one
    shot (the "first try": its *measured* latency is compared with the budget as is);
  * ``latency-taylor``: the same with Taylor importance (gradients of the detection loss on 4 training batches),
    the criterion the planner was designed around (HALP) — the only row not ranked by L1;
  * ``uniform-l1``: the same ratio from every group, the ratio bisected until the latency model predicts the
    budget;
  * ``global-macs``: channels ranked across groups (``global_pruning``) to a MACs target, the target bisected
    until the latency model predicts the budget.

  Every pruned model has its BatchNorm statistics re-estimated and is fine-tuned like the one-shot rows of
  bench/accuracy_recovery.py (same steps, batch, learning rate and seed; a dense model fine-tuned alike is the
  control), then scored (mAP@[.5:.95] on the first ``--eval-images`` validation scenes). The four final models
  are exported and timed interleaved (randomised rounds, medians). A row is *within 5 %* when
  ``|measured/dense ÷ target − 1| ≤ 0.05``.

- ``resnet50`` — ``torchvision:resnet50`` (random weights, 1×3×224×224, no training) pruned to the same MACs
  (``--resnet-macs``, default half): ``uniform-l1`` (one ratio, bisected to the MACs), ``global-macs``
  (``target_macs``, ranked across groups) and ``latency`` (the latency budget bisected until its plan's MACs
  are within 1 % of the target); the three and dense timed interleaved: who is fastest at equal MACs.

- ``demo-timing`` — the ``demo`` part's models timed again at a quieter moment, without training them again
  (each pruned anew from its stored plan; CPU latency depends on shapes, not weight values).
- ``utility`` — the planner's value function (``PruneConfig(latency_utility=…)``: linear as in HALP, log,
  quadratic) × importance (L1, Taylor) on the demo detector, each pruned to the same budget, fine-tuned and scored
  like the ``demo`` rows, and timed interleaved with the dense model.

The latency tables (and their calibrations) are measured once per model and machine, into
``<table-dir>/<model>`` (default ``out/latency_tables/demo-detector`` and ``…/resnet50``), and reused: the
demo's takes about 2 minutes the first time, resnet50's several.

Usage::

    python bench/latency_vs_macs.py [--part demo|demo-timing|resnet50|utility|all] [--steps 250] [--eval-images 500]
                                    [--rounds 20] [--iterations 15] [--device cuda|cpu]
    # smoke test (tiny settings, results and table out of the way):
    python bench/latency_vs_macs.py --part demo --steps 2 --eval-images 10 --rounds 2 --iterations 2
                                    --table-dir out/smoke/tables --json out/smoke/latency_vs_macs.json

Prints the tables and writes ``bench/results/latency_vs_macs.{json,md}`` through
``trt_prune.provenance.write_result`` (stamped with commit, date and machine). Running one part keeps the other
part of an existing result file (each part carries its own stamp).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, save, stamp

DEMO = "builtin:demo-detector"
RESNET = "torchvision:resnet50"
DEMO_SHAPE = (1, 3, 320, 320)
RESNET_SHAPE = (1, 3, 224, 224)
ROUND_TO = 8
IMPORTANCE = "l1"
WITHIN = 0.05  # the first-try tolerance on the measured latency ratio
MACS_WITHIN = 0.01  # resnet50: the latency plan's MACs within this of the target


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ planning
def closest(fn: Callable[[float], float], target: float, lo: float, hi: float, steps: int, increasing: bool,
            tolerance: float = 0.0) -> tuple[float, float]:
    """Bisect ``x`` in ``[lo, hi]`` so that the monotone ``fn(x)`` meets ``target``; returns the visited
    ``(x, fn(x))`` nearest the target (plans change in steps of ``round_to`` channels, so the nearest visited
    point is as good as an exact root). Stops early once within ``tolerance`` (relative)."""
    seen: list[tuple[float, float]] = []
    for _ in range(steps):
        mid = (lo + hi) / 2
        value = fn(mid)
        seen.append((mid, value))
        if abs(value / target - 1.0) <= tolerance:
            break
        if (value < target) == increasing:
            lo = mid
        else:
            hi = mid
    return min(seen, key=lambda p: abs(p[1] - target))


def plan_of(result) -> dict[str, list[int]]:
    """The plan a pruning result carried out (group key -> kept positions), from its recipe."""
    return {g["key"]: list(g["keep"]) for g in result.recipe["groups"]}


def config_for(method: str, value: float, utility: str = "quadratic"):
    from trt_prune.pruning import PruneConfig

    if method == "latency":
        return PruneConfig(target_latency=value, round_to=ROUND_TO, importance=IMPORTANCE, latency_utility=utility)
    if method == "latency-taylor":
        return PruneConfig(target_latency=value, round_to=ROUND_TO, importance="taylor", latency_utility=utility)
    if method == "uniform-l1":
        return PruneConfig(ratio=value, round_to=ROUND_TO, importance=IMPORTANCE)
    if method == "uniform-l1@macs":
        return PruneConfig(target_macs=value, round_to=ROUND_TO, importance=IMPORTANCE)
    if method == "global-macs":
        return PruneConfig(target_macs=value, global_pruning=True, round_to=ROUND_TO, importance=IMPORTANCE)
    raise ValueError(method)


class Planner:
    """Plans without cutting, on one traced graph: predicted latency and MACs of any configuration."""

    def __init__(self, graph, lm):
        self.graph, self.lm = graph, lm
        self.dense_ms = lm.predict()
        self.dense_macs = graph.macs()

    def kept(self, config):
        from trt_prune.pruning.structured import _plan

        plan, _, _ = _plan(self.graph, config, latency=self.lm if config.target_latency is not None else None)
        return self.graph.kept_mask(plan)

    def latency_fraction(self, config) -> float:
        return self.lm.predict(self.kept(config)) / self.dense_ms

    def macs_fraction(self, config) -> float:
        return self.graph.macs(self.kept(config)) / self.dense_macs


def prune_row(method: str, dense, shape, config, table, planner: Planner, search: dict) -> dict:
    """Prune a copy of ``dense`` with ``config``; the row: model, recipe and predicted latency of what was cut.
    Taylor importance takes its gradients on a few road-scene training batches (the detector's own loss)."""
    from trt_prune.finetune import detector_taylor_inputs
    from trt_prune.pruning import prune

    t0 = time.perf_counter()
    data = dict(zip(("data", "loss_fn"), detector_taylor_inputs(dense), strict=True)) \
        if config.importance == "taylor" else {}
    result = prune(dense, shape, config, latency_table=table if config.target_latency is not None else None, **data)
    kept = planner.graph.kept_mask(plan_of(result))
    predicted = planner.lm.predict(kept)
    rep = result.report
    settings = {k: v for k, v in result.recipe["config"].items() if v not in (None, (), [], False)}
    if any(k.startswith("target_") for k in settings):
        settings.pop("ratio", None)  # the default, unused when a target is given
    row = {"method": method, "macs": rep["macs_after"] / rep["macs_before"], "params": rep["params_after"],
           "params_fraction": rep["params_after"] / rep["params_before"], "predicted_ms": predicted,
           "predicted_fraction": predicted / planner.dense_ms, "effective_ratio": rep["effective_ratio"],
           "groups_pruned": rep["groups_pruned"], "config": settings,
           "search": search, "prune_seconds": round(time.perf_counter() - t0, 2)}
    if "latency" in rep:
        row["planner"] = rep["latency"]
    return {"row": row, "model": result.model.eval(), "recipe": result.recipe}


def table_for(spec: str, model, shape, table_dir: str):
    """The latency table and calibration of ``model`` in ``table_dir/<model name>`` (measured where the folder
    lacks them), its traced graph and latency model."""
    from trt_prune.latency import LatencyModel, ensure_table
    from trt_prune.pruning import trace
    from trt_prune.pruning.structured import _example

    location = Path(table_dir) / spec.split(":")[-1]
    graph = trace(model, _example(model, shape))

    def on_estimate(points: int, seconds: float) -> None:
        log(f"   measuring {points} latency-table points for {spec} (about {seconds / 60:.1f} min) into {location}")

    table, info = ensure_table(model, graph, shape, backend="onnxruntime", location=location, round_to=ROUND_TO,
                               on_estimate=on_estimate)
    info["location"] = str(location)
    lm = LatencyModel(graph, table)
    info["calibration"] = {k: v for k, v in table.calibrations[lm.key].items() if k != "uncovered_layers"}
    return table, info, Planner(graph, lm)


# ------------------------------------------------------------------------------------------------ timing
def measure(models: dict[str, torch.nn.Module], shape, threads: int, rounds: int, iterations: int,
            spinning: bool) -> tuple[dict[str, dict], dict]:
    """ONNX Runtime p50 (and spread) of every model, exported and cleaned, all timed interleaved."""
    from trt_prune import stages
    from trt_prune.backends import BuildConfig
    from trt_prune.profiling.profile import interleaved_timings

    # the table's settings (threads; idle threads not spinning, as the table and its calibration were measured),
    # so measured and predicted compare
    config = BuildConfig(threads=threads, extra={} if spinning else {"allow_spinning": False})
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).numpy()
    sessions, feeds = {}, {}
    try:
        for name, model in models.items():  # exported and cleaned into a folder the session removes on close
            sessions[name] = stages.build(model.eval().cpu(), "onnxruntime", config, batch=shape[0],
                                          input_shape=tuple(shape))
            feeds[name] = {sessions[name].inputs[0].name: x}
        env = sessions[next(iter(sessions))].env()
        samples = interleaved_timings(sessions, feeds, rounds=rounds, iterations_per_round=iterations, warmup_s=1.0)
    finally:
        for s in sessions.values():
            s.close()
    out = {}
    for name, values in samples.items():
        v = np.asarray(values)
        out[name] = {"p50_ms": float(np.median(v)), "p10_ms": float(np.percentile(v, 10)),
                     "p90_ms": float(np.percentile(v, 90)), "samples": len(v)}
    return out, env


# ------------------------------------------------------------------------------------------------ demo detector
def finetune_and_score(model, pruned: bool, args) -> dict:
    """accuracy_recovery.py's one-shot recipe: BatchNorm re-estimated (pruned models), ``--steps`` of
    fine-tuning at the same batch, learning rate and seed, then mAP on the validation scenes."""
    from trt_prune.data import RoadScenes
    from trt_prune.detection.metrics import evaluate
    from trt_prune.finetune import finetune_detector, recalibrate_batchnorm

    img = DEMO_SHAPE[-1]
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    if pruned:
        recalibrate_batchnorm(model, img_size=img)
    stats = finetune_detector(model, args.steps, batch_size=args.batch, lr=args.lr, img_size=img, seed=args.seed,
                              workers=args.workers, device=args.device)
    model.to(args.device).eval()

    def predict(images):
        with torch.no_grad():
            return model(images.to(args.device)).float().cpu()

    scores = evaluate(predict, RoadScenes("val", size=img), batch_size=32, limit=args.eval_images)
    model.cpu()
    return {"map": scores["map50_95"], "map50": scores["map50"], "eval_images": scores["images"],
            "loss_first": stats["loss_first"], "loss_last": stats["loss_last"],
            "train_seconds": round(time.perf_counter() - t0, 1)}


def run_demo(args) -> dict:
    from trt_prune.models import load_model

    target = args.target_latency
    shape = DEMO_SHAPE
    dense = load_model(DEMO).model.eval()
    log(f"== {DEMO}: latency table")
    table, table_info, planner = table_for(DEMO, dense, shape, args.table_dir)
    goal = target  # predicted latency as a fraction of the dense prediction

    log(f"== planning to {target:g}× the dense latency (predicted dense {planner.dense_ms:.2f} ms)")
    t0 = time.perf_counter()
    r, r_pred = closest(lambda v: planner.latency_fraction(config_for("uniform-l1", v)), goal, 0.0, 0.95, 20,
                        increasing=False)
    uniform_search = {"ratio": r, "predicted_fraction": r_pred, "seconds": round(time.perf_counter() - t0, 1)}
    t0 = time.perf_counter()
    m, m_pred = closest(lambda v: planner.latency_fraction(config_for("global-macs", v)), goal, 0.02, 0.999, 16,
                        increasing=True)
    global_search = {"target_macs": m, "predicted_fraction": m_pred, "seconds": round(time.perf_counter() - t0, 1)}
    rows = {"latency": prune_row("latency", dense, shape, config_for("latency", target), table, planner,
                                 {"note": "one shot, no search"}),
            "latency-taylor": prune_row("latency-taylor", dense, shape, config_for("latency-taylor", target), table,
                                        planner, {"note": "one shot, no search"}),
            "uniform-l1": prune_row("uniform-l1", dense, shape, config_for("uniform-l1", r), table, planner,
                                    uniform_search),
            "global-macs": prune_row("global-macs", dense, shape, config_for("global-macs", m), table, planner,
                                     global_search)}
    for name, item in rows.items():
        row = item["row"]
        log(f"   {name}: MACs {row['macs']:.3f}, predicted {row['predicted_ms']:.2f} ms "
            f"({row['predicted_fraction']:.3f} of dense), pruned in {row['prune_seconds']} s")

    models = {"dense": copy.deepcopy(dense)}
    models.update({name: item["model"] for name, item in rows.items()})
    results = {"dense": {"method": "dense", "macs": 1.0, "params_fraction": 1.0, "predicted_ms": planner.dense_ms,
                         "predicted_fraction": 1.0}}
    results.update({name: item["row"] for name, item in rows.items()})
    for name, model in models.items():
        log(f"== fine-tuning {name}: {args.steps} steps × {args.batch} on {args.device}")
        results[name].update(finetune_and_score(model, name != "dense", args))
        log(f"   mAP@[.5:.95] {results[name]['map']:.3f} ({results[name]['train_seconds']} s)")

    log(f"== timing {len(models)} models interleaved: {args.rounds} rounds × {args.iterations}")
    timed, env = measure(models, shape, table.key.threads, args.rounds, args.iterations, args.spin)
    _demo_timing(results, timed, target)
    return {"model": DEMO, "input_shape": list(shape), "target_latency": target, "steps": args.steps,
            "batch": args.batch, "lr": args.lr, "seed": args.seed, "eval_images": args.eval_images,
            "train_device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "rounds": args.rounds, "iterations": args.iterations, "spinning": args.spin, "env": env,
            "table": table_info, "rows": [results[n] for n in ("dense", *rows)], "provenance": stamp()}


def _demo_timing(results: dict[str, dict], timed: dict[str, dict], target: float) -> None:
    """Fill the rows' measured latency and the comparisons that depend on it."""
    dense_ms = timed["dense"]["p50_ms"]
    for name, t in timed.items():
        row = results[name]
        row.update(t)
        row["measured_fraction"] = t["p50_ms"] / dense_ms
        row["prediction_error"] = row["predicted_ms"] / t["p50_ms"] - 1.0
        if name != "dense":
            row["budget_miss"] = row["measured_fraction"] / target - 1.0
            row["within_5pct"] = abs(row["budget_miss"]) <= WITHIN
    for name, row in results.items():
        if name == "dense":
            continue
        for ref in ("uniform-l1", "global-macs"):
            if ref != name:
                row[f"map_vs_{ref}"] = row["map"] - results[ref]["map"]
                row[f"latency_vs_{ref}"] = row["p50_ms"] / results[ref]["p50_ms"] - 1.0
        row["map_vs_dense"] = row["map"] - results["dense"]["map"]


def retime_demo(args, rec: dict) -> dict:
    """Time the demo part's models again, at a quieter moment than their training run: each is pruned anew
    from its stored configuration (the same plan: planning is deterministic) and timed interleaved with dense.
    Weights are not trained again: CPU latency does not depend on weight values, only on shapes. mAP stays the
    training run's."""
    from trt_prune.models import load_model

    target, shape = rec["target_latency"], tuple(rec["input_shape"])
    dense = load_model(DEMO).model.eval()
    table, _, planner = table_for(DEMO, dense, shape, args.table_dir)
    results = {r["method"]: r for r in rec["rows"]}
    models = {"dense": copy.deepcopy(dense)}
    for name, row in results.items():
        if name == "dense":
            continue
        value = {"uniform-l1": row["search"].get("ratio"), "global-macs": row["search"].get("target_macs")}.get(
            name, target)
        item = prune_row(name, dense, shape, config_for(name, value), table, planner, row["search"])
        if abs(item["row"]["macs"] - row["macs"]) > 1e-9:
            raise SystemExit(f"{name}: pruned again to MACs {item['row']['macs']:.4f}, the stored row has "
                             f"{row['macs']:.4f}; the plan changed since the training run: rerun --part demo")
        models[name] = item["model"]
    log(f"== timing {len(models)} models again, interleaved: {args.rounds} rounds × {args.iterations}")
    timed, env = measure(models, shape, table.key.threads, args.rounds, args.iterations, args.spin)
    _demo_timing(results, timed, target)
    return dict(rec, rounds=args.rounds, iterations=args.iterations, env=env, timing_provenance=stamp(),
                rows=[results[r["method"]] for r in rec["rows"]])


def demo_markdown(rec: dict) -> str:
    t = rec["target_latency"]
    cal = rec["table"].get("calibration", {})
    lines = [f"### {rec['model']} at {t:g}× the dense latency, then {rec['steps']} fine-tune steps",
             "",
             f"ONNX Runtime {rec['env'].get('backend_version')}, {rec['env'].get('threads')} threads, batch 1, "
             f"{'×'.join(map(str, rec['input_shape']))}; {rec['rounds']} interleaved rounds × {rec['iterations']} "
             f"runs (the {len(rec['rows'])} final models); fine-tune {rec['steps']} steps × {rec['batch']} "
             f"(lr {rec['lr']:g}, seed {rec['seed']}) on {rec['train_device']}; mAP@[.5:.95] on "
             f"{rec['rows'][0].get('eval_images')} validation scenes. Latency table: {rec['table'].get('key')}, "
             f"{rec['table'].get('entries')} layer "
             f"shapes; calibration dense {cal.get('dense_measured_ms', float('nan')):.2f} ms measured. "
             f"uniform-l1's ratio and global-macs' MACs target are bisected until the latency model predicts "
             f"{t:g}× dense; the latency rows are one shot (latency: L1 importance like the others; latency-taylor: "
             f"Taylor importance from 4 training batches; both with the planner's default quadratic utility). "
             f"*Within 5 %*: |measured/dense ÷ {t:g} − 1| ≤ 5 %."
             + (f" Timed again by `--part demo-timing` ({rec['timing_provenance'].get('date')}, commit "
                f"{rec['timing_provenance'].get('commit')}): each model pruned anew from the same plan, untrained "
                "weights (latency depends on shapes only); mAP from the training run."
                if rec.get("timing_provenance") else ""),
             "",
             "| method | MACs | predicted ms | measured p50 ms | latency / dense | within 5 %? | mAP50-95 | "
             "Δ mAP vs uniform-l1 | Δ mAP vs global-macs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        def delta(ref: str, r=r) -> str:
            v = r.get(f"map_vs_{ref}")
            return "—" if v is None else f"{v * 100:+.1f} pts"
        within = "—" if "within_5pct" not in r else (
            f"{'yes' if r['within_5pct'] else 'no'} ({r['budget_miss'] * 100:+.1f} %)")
        lines.append(f"| {r['method']} | {r['macs']:.3f} | {r['predicted_ms']:.2f} | {r['p50_ms']:.2f} | "
                     f"{r['measured_fraction']:.3f} | {within} | {r['map']:.3f} | {delta('uniform-l1')} | "
                     f"{delta('global-macs')} |")
    lines.append("")
    for lat in rec["rows"]:
        if not lat["method"].startswith("latency"):
            continue
        verdict = [f"vs {ref}: mAP {lat[f'map_vs_{ref}'] * 100:+.1f} pts, measured latency "
                   f"{lat[f'latency_vs_{ref}'] * 100:+.1f} %" for ref in ("uniform-l1", "global-macs")]
        lines.append(f"- {lat['method']}: measured {lat['measured_fraction']:.3f}× dense on the first try "
                     f"({'within' if lat['within_5pct'] else 'outside'} 5 % of {t:g}); " + "; ".join(verdict) + ".")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ resnet50
def run_resnet(args) -> dict:
    from trt_prune.errors import LatencyError
    from trt_prune.models import load_model

    shape = RESNET_SHAPE
    target = args.resnet_macs
    torch.manual_seed(0)
    dense = load_model(RESNET).model.eval()
    log(f"== {RESNET} (random weights): latency table")
    table, table_info, planner = table_for(RESNET, dense, shape, args.table_dir)

    def latency_macs(budget: float) -> float:
        try:
            return planner.macs_fraction(config_for("latency", budget))
        except LatencyError:  # below the smallest reachable latency: as good as no MACs at all
            return 0.0

    log(f"== planning to {target:g} of the MACs (predicted dense {planner.dense_ms:.2f} ms)")
    t0 = time.perf_counter()
    b, b_macs = closest(latency_macs, target, 0.02, 0.999, 14, increasing=True, tolerance=MACS_WITHIN / 4)
    search = {"budget": b, "macs": b_macs, "seconds": round(time.perf_counter() - t0, 1)}
    rows = {"latency": prune_row("latency", dense, shape, config_for("latency", b), table, planner, search),
            "uniform-l1": prune_row("uniform-l1", dense, shape, config_for("uniform-l1@macs", target), table,
                                    planner, {"note": "PruneConfig(target_macs) bisects the uniform ratio"}),
            "global-macs": prune_row("global-macs", dense, shape, config_for("global-macs", target), table,
                                     planner, {"note": "PruneConfig(target_macs, global_pruning)"})}
    for name, item in rows.items():
        row = item["row"]
        row["macs_within_1pct"] = abs(row["macs"] / target - 1.0) <= MACS_WITHIN
        log(f"   {name}: MACs {row['macs']:.3f}, predicted {row['predicted_ms']:.2f} ms "
            f"({row['predicted_fraction']:.3f} of dense), pruned in {row['prune_seconds']} s")
    models = {"dense": dense, **{name: item["model"] for name, item in rows.items()}}
    log(f"== timing {len(models)} models interleaved: {args.rounds} rounds × {args.iterations}")
    timed, env = measure(models, shape, table.key.threads, args.rounds, args.iterations, args.spin)
    results = {"dense": {"method": "dense", "macs": 1.0, "params_fraction": 1.0, "predicted_ms": planner.dense_ms,
                         "predicted_fraction": 1.0}}
    results.update({name: item["row"] for name, item in rows.items()})
    dense_ms = timed["dense"]["p50_ms"]
    for name, t in timed.items():
        row = results[name]
        row.update(t)
        row["measured_fraction"] = t["p50_ms"] / dense_ms
        row["speedup"] = dense_ms / t["p50_ms"]
        row["prediction_error"] = row["predicted_ms"] / t["p50_ms"] - 1.0
    for name in rows:
        for ref in ("uniform-l1", "global-macs"):
            if ref != name:
                results[name][f"latency_vs_{ref}"] = results[name]["p50_ms"] / results[ref]["p50_ms"] - 1.0
    return {"model": RESNET, "weights": "random (torch.manual_seed(0))", "input_shape": list(shape),
            "target_macs": target, "rounds": args.rounds, "iterations": args.iterations,
            "spinning": args.spin, "env": env, "table": table_info,
            "rows": [results[n] for n in ("dense", "latency", "uniform-l1", "global-macs")], "provenance": stamp()}


def resnet_markdown(rec: dict) -> str:
    m = rec["target_macs"]
    lines = [f"### {rec['model']} (random weights) at {m:g} of the MACs",
             "",
             f"ONNX Runtime {rec['env'].get('backend_version')}, {rec['env'].get('threads')} threads, batch 1, "
             f"{'×'.join(map(str, rec['input_shape']))}; {rec['rounds']} interleaved rounds × {rec['iterations']} "
             f"runs. Latency table: {rec['table'].get('key')}, {rec['table'].get('entries')} layer shapes. "
             f"uniform-l1 and global-macs prune to the MACs target directly; latency's budget is bisected until its "
             f"plan's MACs are within {MACS_WITHIN:.0%} of the target.",
             "",
             "| method | MACs | predicted ms | measured p50 ms | speed-up vs dense | vs uniform-l1 | vs global-macs |",
             "|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        def delta(ref: str, r=r) -> str:
            v = r.get(f"latency_vs_{ref}")
            return "—" if v is None else f"{v * 100:+.1f} % latency"
        budget = f" (budget {r['search']['budget']:.3f}×)" if r["method"] == "latency" else ""
        lines.append(f"| {r['method']}{budget} | {r['macs']:.3f} | {r['predicted_ms']:.2f} | {r['p50_ms']:.2f} | "
                     f"{r['speedup']:.2f}× | {delta('uniform-l1')} | {delta('global-macs')} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ planner utility
UTILITY_GRID = tuple((imp, util) for imp in ("l1", "taylor") for util in ("linear", "log", "quadratic"))


def run_utility(args) -> dict:
    """The planner's value function on the demo detector: each importance × utility pruned to the same budget,
    fine-tuned and scored like the demo part's rows, and all timed interleaved with the dense model."""
    from trt_prune.models import load_model

    target, shape = args.target_latency, DEMO_SHAPE
    dense = load_model(DEMO).model.eval()
    log(f"== {DEMO}: planner utilities at {target:g}× the dense latency")
    table, table_info, planner = table_for(DEMO, dense, shape, args.table_dir)
    rows, models = {}, {"dense": copy.deepcopy(dense)}
    for importance, utility in UTILITY_GRID:
        name = f"{importance}/{utility}"
        method = "latency" if importance == "l1" else "latency-taylor"
        item = prune_row(method, dense, shape, config_for(method, target, utility), table, planner,
                         {"note": "one shot, no search"})
        row = item["row"]
        row.update(method=name, importance=importance, utility=utility)
        log(f"   {name}: {row['groups_pruned']} groups cut, MACs {row['macs']:.3f}, predicted "
            f"{row['predicted_fraction']:.3f} of dense; fine-tuning {args.steps} steps")
        row.update(finetune_and_score(item["model"], True, args))
        log(f"   mAP@[.5:.95] {row['map']:.3f}")
        rows[name], models[name] = row, item["model"]
    log(f"== timing {len(models)} models interleaved: {args.rounds} rounds × {args.iterations}")
    timed, env = measure(models, shape, table.key.threads, args.rounds, args.iterations, args.spin)
    dense_ms = timed["dense"]["p50_ms"]
    for name, row in rows.items():
        row.update(timed[name])
        row["measured_fraction"] = timed[name]["p50_ms"] / dense_ms
    return {"model": DEMO, "input_shape": list(shape), "target_latency": target, "steps": args.steps,
            "batch": args.batch, "lr": args.lr, "seed": args.seed, "eval_images": args.eval_images,
            "train_device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "rounds": args.rounds, "iterations": args.iterations, "spinning": args.spin, "env": env,
            "table": table_info, "dense_p50_ms": dense_ms, "rows": list(rows.values()), "provenance": stamp()}


def utility_markdown(rec: dict) -> str:
    t = rec["target_latency"]
    lines = [f"### The planner's utility: {rec['model']} at {t:g}× the dense latency, then {rec['steps']} "
             "fine-tune steps",
             "",
             f"Each importance × utility (`PruneConfig(latency_utility=…)`) planned one shot to the same budget, "
             f"fine-tuned {rec['steps']} steps × {rec['batch']} (lr {rec['lr']:g}, seed {rec['seed']}) on "
             f"{rec['train_device']}, scored on {rec['eval_images']} validation scenes (mAP@[.5:.95]); all timed "
             f"interleaved with the dense model ({rec['rounds']} rounds × {rec['iterations']} runs, ONNX Runtime "
             f"{rec['env'].get('backend_version')}, {rec['env'].get('threads')} threads; dense "
             f"{rec['dense_p50_ms']:.2f} ms). *Groups cut*: how many coupled groups lose channels.",
             "",
             "| importance | utility | groups cut | MACs | predicted / dense | measured / dense | mAP50-95 |",
             "|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        lines.append(f"| {r['importance']} | {r['utility']} | {r['groups_pruned']} | {r['macs']:.3f} | "
                     f"{r['predicted_fraction']:.3f} | {r['measured_fraction']:.3f} | {r['map']:.3f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("demo", "demo-timing", "resnet50", "utility", "all"), default="all",
                   help="demo-timing: time the stored demo rows' models again (no training)")
    p.add_argument("--table-dir", default="out/latency_tables",
                   help="latency tables go in TABLE_DIR/demo-detector and TABLE_DIR/resnet50 (measured once, reused)")
    p.add_argument("--target-latency", type=float, default=0.6, help="demo: the budget, a fraction of dense")
    p.add_argument("--resnet-macs", type=float, default=0.5, help="resnet50: the MACs fraction to keep")
    p.add_argument("--steps", type=int, default=250, help="demo: fine-tune steps per model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="data-loader processes")
    p.add_argument("--eval-images", type=int, default=500)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--iterations", type=int, default=15, help="timed calls per model per round")
    p.add_argument("--spin", action="store_true",
                   help="time with ONNX Runtime's idle threads spinning (the tables are measured without)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to fine-tune")
    p.add_argument("--json", default=str(RESULTS / "latency_vs_macs.json"),
                   help="result file; the tables go beside it (.md)")
    args = p.parse_args(argv)
    if not 0.0 < args.target_latency < 1.0 or not 0.0 < args.resnet_macs < 1.0:
        p.error("--target-latency and --resnet-macs are fractions in (0, 1)")

    previous = {}
    path = Path(args.json)
    if path.is_file():  # keep the part this run does not redo
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
    record = {k: previous.get(k) for k in ("demo", "resnet50", "utility") if previous.get(k)}
    if args.part in ("demo", "all"):
        record["demo"] = run_demo(args)
        print(demo_markdown(record["demo"]))
    if args.part == "demo-timing":
        if "demo" not in record:
            raise SystemExit("--part demo-timing needs a demo part in --json; run --part demo first")
        record["demo"] = retime_demo(args, record["demo"])
        print(demo_markdown(record["demo"]))
    if args.part in ("resnet50", "all"):
        record["resnet50"] = run_resnet(args)
        print(resnet_markdown(record["resnet50"]))
    if args.part in ("utility", "all"):
        record["utility"] = run_utility(args)
        print(utility_markdown(record["utility"]))
    parts = []
    for key, render in (("demo", demo_markdown), ("resnet50", resnet_markdown), ("utility", utility_markdown)):
        if key in record:
            when = record[key]["provenance"]
            parts.append(f"{render(record[key])}\n(this part: commit {when.get('commit')}, {when.get('date')})\n")
    header = ("Latency-aware pruning (`PruneConfig(target_latency=…)`, knapsack on a measured latency table) "
              "against uniform-ratio L1 and global MACs-target pruning; bench/latency_vs_macs.py.\n")
    save(args.json, record, header + "\n" + "\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
