"""How well the latency model predicts the real ONNX Runtime latency of pruned networks, and what it costs.

For each model (builtin:demo-detector at its own 1x3x320x320, torchvision:resnet50 and
torchvision:mobilenet_v3_large at 1x3x224x224, random weights), the latency table is built or extended in
``--table-dir`` (measuring the missing grid points and calibrating on the model: its seconds and points are the
table's *build cost* when the folder starts empty; ``--rebuild`` empties it). Then ``--plans`` random pruning
plans are drawn (a seeded keep fraction in [0.3, 1] per prunable group, counts multiples of 8, random
channels, equal counts per segment of a split group) and the latency model predicts each. The dense model,
the pruned ones, the planner's own plan at 0.6x the dense prediction and the calibration's half-width model are
exported, built on ONNX Runtime and timed end to end *interleaved* (rounds in shuffled order; p50 = median of
every sample), so a drift of the machine spreads over all of them. The predictions use the rest fitted from
this run's dense and half-width p50s (what ``calibrate`` fits), so a drift of this noisy machine between the
table's calibration and this timing is not counted as model error; the error with the calibration stored in the
table is reported beside it. The timed sessions do not let idle ONNX Runtime threads spin (``--spin``
turns spinning back on): with a dozen sessions taking turns on two cores, the threads the previous session
leaves spinning take the cores from the next one, and block medians of one model then swing by 2x.
Reported per plan: MACs vs dense, predicted ms, measured p50 ms and the signed error (predicted / measured - 1);
per model the median absolute error (goal: at most 10 %), the worst plan, and the planning time with a warm table
(LatencyModel + LatencyPlanner + plan for a 0.6x budget with L1 scores). The planner's plan is not part of the
error statistics.

Usage: python bench/latency_model.py [--models builtin:demo-detector,...] [--plans 10] [--rounds 10]
       [--iterations 15] [--table-dir DIR] [--rebuild] [--spin]
Prints a line per step and a summary table, and writes ``bench/results/latency_model.{json,md}`` through
``trt_prune.provenance.write_result`` (stamped with commit, date and machine).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, save

from trt_prune.latency.measure import CALIBRATION_DISCARD, CALIBRATION_ITERATIONS, fit_rest, half_plan

MODELS = ("builtin:demo-detector", "torchvision:resnet50", "torchvision:mobilenet_v3_large")
ROUND_TO = 8
BUDGET = 0.6
GOAL = 0.10
HALF = "calibration half"  # the second calibration model, timed beside the plans (not a plan itself)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def slug(spec: str) -> str:
    return spec.rpartition(":")[2] or spec


def random_plan(groups, rng: np.random.Generator, round_to: int = ROUND_TO) -> tuple[dict[str, list[int]], float]:
    """Kept positions per group: a keep fraction in [0.3, 1] per group, a multiple of ``round_to`` (at least
    ``round_to``) per segment, random channels. Returns the plan and the mean keep fraction drawn."""
    plan, fracs = {}, []
    for g in groups:
        frac = float(rng.uniform(0.3, 1.0))
        fracs.append(frac)
        segs = [np.asarray(s, dtype=np.int64) for s in (g.segments or [list(range(g.size))])]
        n = len(segs[0])
        if n <= round_to:
            continue
        keep = min(n, max(round_to, int(round(n * frac / round_to)) * round_to))
        if keep >= n:
            continue
        plan[g.key] = sorted(int(p) for seg in segs for p in rng.choice(seg, size=keep, replace=False))
    return plan, float(np.mean(fracs)) if fracs else 1.0


def time_interleaved(models: dict, shape, rounds: int, iterations: int, spin: bool = False) -> dict[str, dict]:
    """p50 (and p25/p75) in ms of every module, built on ONNX Runtime and timed interleaved."""
    from trt_prune import stages
    from trt_prune.backends import BuildConfig
    from trt_prune.profiling.profile import interleaved_blocks

    sessions, feeds, env = {}, {}, {}
    try:
        for name, module in models.items():
            config = BuildConfig(extra={"allow_spinning": spin})
            session = stages.build(module.eval(), "onnxruntime", config, batch=int(shape[0]),
                                   input_shape=tuple(shape))
            sessions[name] = session
            spec = session.inputs[0]
            feeds[name] = {spec.name: np.random.default_rng(0).standard_normal(tuple(shape)).astype(spec.dtype)}
        env = sessions[next(iter(sessions))].env()
        # the calibration's protocol: turns long enough to reach steady state, their first calls dropped
        blocks = interleaved_blocks(sessions, feeds, rounds=rounds, iterations_per_round=iterations, warmup_s=0.3,
                                    discard_first=CALIBRATION_DISCARD)
    finally:
        for s in sessions.values():
            s.close()
    out = {}
    for name, bl in blocks.items():
        samples = np.asarray([s for b in bl for s in b], dtype=float)
        out[name] = {"p50_ms": float(np.median(samples)), "p25_ms": float(np.percentile(samples, 25)),
                     "p75_ms": float(np.percentile(samples, 75)), "samples": int(samples.size)}
    out["_env"] = env
    return out


def run_model(spec: str, args) -> dict:
    from trt_prune.latency import LatencyModel, LatencyPlanner, budget_ms, ensure_table, table_path
    from trt_prune.models import load_model
    from trt_prune.pruning.graph import trace
    from trt_prune.pruning.importance import get_importance
    from trt_prune.pruning.structured import PruneConfig, _apply, _example, _prunable

    name = slug(spec)
    loaded = load_model(spec)
    model = loaded.model.eval()
    shape = tuple(loaded.input_shape)
    folder = Path(args.table_dir.format(model=name))
    if args.rebuild and table_path(folder).exists():
        table_path(folder).unlink()
    fresh = not table_path(folder).exists()
    log(f"[{name}] input {'x'.join(map(str, shape))}; latency table in {folder} ({'new' if fresh else 'existing'})")

    graph = trace(model, _example(model, shape))
    done = [0]

    def on_estimate(points: int, seconds: float) -> None:
        log(f"[{name}] measuring {points} grid points, about {seconds:.0f} s")

    def on_progress(n: int) -> None:
        done[0] += n
        log(f"[{name}]   {done[0]} points measured")

    table, build = ensure_table(model, graph, shape, backend="onnxruntime", location=folder, round_to=ROUND_TO,
                                on_estimate=on_estimate, on_progress=on_progress)
    log(f"[{name}] table: {build['points_measured']} points measured, calibrated={build['calibrated']}, "
        f"{build['seconds']:.1f} s ({build['key']})")

    # warm table: what a prune(..., target_latency=0.6) pays once the table exists
    t0 = time.perf_counter()
    table, warm = ensure_table(model, graph, shape, backend="onnxruntime", location=folder, round_to=ROUND_TO)
    warm_table_s = time.perf_counter() - t0
    groups, _ = _prunable(graph, PruneConfig(round_to=ROUND_TO))
    importance = get_importance("l1")
    t0 = time.perf_counter()
    scores = {g.key: importance(graph, g) for g in groups}
    scores_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lm = LatencyModel(graph, table)
    planner = LatencyPlanner(lm, groups, ROUND_TO)
    budget = budget_ms(BUDGET, planner.dense_ms)
    planned, plan_info = planner.plan(scores, budget)
    plan_s = time.perf_counter() - t0
    log(f"[{name}] warm table {warm_table_s:.2f} s; plan for {BUDGET}x dense ({budget:.2f} ms): {plan_s:.3f} s "
        f"(+ L1 scores {scores_s:.3f} s), {plan_info['groups_cut']} groups cut")

    dense_macs = graph.macs()
    rng = np.random.default_rng(args.seed)
    rows, modules = [], {"dense": model}
    variants = [(f"plan {i + 1}", *random_plan(groups, rng)) for i in range(args.plans)]
    variants.append((f"planner {BUDGET}x", planned, None))
    kept_of = {}
    for label, plan, mean_frac in variants:
        kept = kept_of[label] = graph.kept_mask(plan)
        clone = copy.deepcopy(model)
        _apply(graph, plan, clone)
        modules[label] = clone
        rows.append({"plan": label, "random": mean_frac is not None, "mean_keep_draw": mean_frac,
                     "groups_cut": len(plan), "macs_fraction": graph.macs(kept) / dense_macs,
                     "predicted_stored_ms": lm.predict(kept)})
    # the calibration's second model (every group halved), timed in the same rounds: the rest is refitted from
    # dense and it, so a drift of the machine since the table was calibrated does not count as model error
    half = copy.deepcopy(model)
    _apply(graph, half_plan(graph, ROUND_TO), half)
    modules[HALF] = half
    stored_dense_pred = lm.predict()
    log(f"[{name}] timing dense + {len(variants)} pruned models interleaved ({args.rounds} rounds x "
        f"{args.iterations})")
    t0 = time.perf_counter()
    measured = time_interleaved(modules, shape, args.rounds, args.iterations, args.spin)
    timing_s = time.perf_counter() - t0
    env = measured.pop("_env")
    dense_meas = measured["dense"]["p50_ms"]
    run_table = copy.deepcopy(table)
    run_cal = fit_rest(run_table, graph, dense_meas, measured[HALF]["p50_ms"], round_to=ROUND_TO)
    run_lm = LatencyModel(graph, run_table)
    dense_pred = run_lm.predict()
    for r in rows:
        m = measured[r["plan"]]
        r["predicted_ms"] = run_lm.predict(kept_of[r["plan"]])
        r.update(measured_ms=m["p50_ms"], measured_p25_ms=m["p25_ms"], measured_p75_ms=m["p75_ms"],
                 error=r["predicted_ms"] / m["p50_ms"] - 1.0,
                 error_stored=r["predicted_stored_ms"] / m["p50_ms"] - 1.0,
                 ratio_error=(r["predicted_stored_ms"] / stored_dense_pred) / (m["p50_ms"] / dense_meas) - 1.0)
    random_rows = [r for r in rows if r["random"]]
    errors = np.asarray([r["error"] for r in random_rows])
    worst = max(random_rows, key=lambda r: abs(r["error"]))
    summary = {"median_abs_error": float(np.median(np.abs(errors))), "mean_error": float(np.mean(errors)),
               "worst_plan": worst["plan"], "worst_error": worst["error"],
               "median_abs_ratio_error": float(np.median(np.abs([r["ratio_error"] for r in random_rows]))),
               "median_abs_error_stored": float(np.median(np.abs([r["error_stored"] for r in random_rows]))),
               "goal_met": bool(np.median(np.abs(errors)) <= GOAL)}
    cal = table.calibrations.get(lm.key, {})
    log(f"[{name}] dense predicted {dense_pred:.2f} ms, measured {dense_meas:.2f} ms; median |error| "
        f"{summary['median_abs_error']:.1%}, worst {worst['plan']} {worst['error']:+.1%} (timing {timing_s:.0f} s)")
    return {"model": spec, "name": name, "input_shape": list(shape), "table_dir": str(folder),
            "table_fresh": fresh, "table_build": build, "table_measure_seconds_total": round(table.measure_seconds, 2),
            "table_entries": len(table.entries), "warm_table_s": warm_table_s, "warm_table": warm,
            "plan_s": plan_s, "scores_s": scores_s, "planner": plan_info, "prunable_groups": len(groups),
            "covered_layers": len(lm.layers), "uncovered_layers": lm.uncovered, "calibration": cal,
            "run_calibration": run_cal, "half_measured_ms": measured[HALF]["p50_ms"],
            "dense": {"predicted_ms": dense_pred, "predicted_stored_ms": stored_dense_pred, "measured_ms": dense_meas,
                      "measured_p25_ms": measured["dense"]["p25_ms"], "measured_p75_ms": measured["dense"]["p75_ms"],
                      "error": dense_pred / dense_meas - 1.0, "macs": dense_macs},
            "plans": rows, "summary": summary, "timing_s": timing_s, "env": env}


def markdown(results: list[dict], args, env: dict) -> str:
    lines = [f"Predicted vs measured end-to-end ONNX Runtime p50 on {env.get('cpu')} ({env.get('cpu_count')} cores), "
             f"ONNX Runtime {env.get('backend_version')}, {env.get('threads')} threads, batch 1, fp32; "
             f"{args.plans} random plans per model (seed {args.seed}, keep fraction in [0.3, 1] per group, "
             f"round_to={ROUND_TO}), timed interleaved with dense ({args.rounds} rounds x {args.iterations}, "
             f"idle threads {'spinning' if args.spin else 'not spinning'}). "
             "*Predicted*: the table's layers plus the rest fitted (as `calibrate` does) from the p50s of dense "
             "and of the calibration's own half-width model, both timed in these same rounds, so a drift of the "
             "machine since the table was calibrated is not counted as model error; error = predicted / measured "
             "- 1. *Stored cal.*: the same with the calibration stored when the table was built. *Vs dense*: the "
             "stored calibration's predicted speed-up over dense against the measured one. The planner's own plan "
             f"at {BUDGET}x the dense prediction is shown below the random plans and is not in the statistics.",
             ""]
    for res in results:
        d = res["dense"]
        lines += [f"### {res['model']} ({'x'.join(map(str, res['input_shape']))})", "",
                  "| plan | MACs vs dense | predicted ms | measured p50 ms (p25–p75) | error | error, stored cal. | "
                  "error vs dense |",
                  "|---|---|---|---|---|---|---|",
                  f"| dense | 1.000 | {d['predicted_ms']:.2f} | {d['measured_ms']:.2f} ({d['measured_p25_ms']:.2f}–"
                  f"{d['measured_p75_ms']:.2f}) | {d['error']:+.1%} | "
                  f"{d['predicted_stored_ms'] / d['measured_ms'] - 1:+.1%} | — |"]
        for r in res["plans"]:
            lines.append(f"| {r['plan']} | {r['macs_fraction']:.3f} | {r['predicted_ms']:.2f} | "
                         f"{r['measured_ms']:.2f} ({r['measured_p25_ms']:.2f}–{r['measured_p75_ms']:.2f}) | "
                         f"{r['error']:+.1%} | {r['error_stored']:+.1%} | {r['ratio_error']:+.1%} |")
        s, cal, run = res["summary"], res["calibration"], res["run_calibration"]
        lines += ["", f"Median |error| {s['median_abs_error']:.1%} (mean signed {s['mean_error']:+.1%}), worst "
                  f"{s['worst_plan']} {s['worst_error']:+.1%}; with the stored calibration: median |error| "
                  f"{s['median_abs_error_stored']:.1%}; vs dense: median |error| "
                  f"{s['median_abs_ratio_error']:.1%}. Rest fitted in this run: {run['constant_ms']:.2f} ms + "
                  f"{run['per_activation_ms']:.2f} ms × activation fraction, layers × {run['layer_scale']:.2f} "
                  f"(dense {run['dense_measured_ms']:.2f} ms, half {run['half_measured_ms']:.2f} ms); stored: "
                  f"{cal.get('constant_ms', 0):.2f} ms + {cal.get('per_activation_ms', 0):.2f} ms × activation "
                  f"fraction, layers × {cal.get('layer_scale', 1):.2f} (dense {cal.get('dense_measured_ms', 0):.2f} "
                  f"ms, half {cal.get('half_measured_ms', 0):.2f} ms). {res['covered_layers']} layers covered by "
                  f"the table, {len(res['uncovered_layers'])} not.", ""]
    lines += ["### Summary", "",
              f"| model | median \\|error\\| | worst | goal ≤ {GOAL:.0%} met | table build s | points | plan s |",
              "|---|---|---|---|---|---|---|"]
    lines += [summary_row(res) for res in results]
    lines += ["", "*Table build s* and *points*: the `ensure_table` call that measured the table and calibrated "
              "(a reused table says so); *plan s*: LatencyModel + LatencyPlanner + plan for a "
              f"{BUDGET}x budget with a warm table (L1 scores not included)."]
    return "\n".join(lines) + "\n"


def summary_cells(res: dict) -> list[str]:
    s, b = res["summary"], res["table_build"]
    build = f"{b['seconds']:.1f}" if res["table_fresh"] else f"reused ({b['seconds']:.1f})"
    return [res["model"], f"{s['median_abs_error']:.1%}", f"{s['worst_error']:+.1%} ({s['worst_plan']})",
            "yes" if s["goal_met"] else "no", build, str(b["points_measured"]), f"{res['plan_s']:.3f}"]


def summary_row(res: dict) -> str:
    return "| " + " | ".join(summary_cells(res)) + " |"


def print_summary(results: list[dict]) -> None:
    headers = ["model", "median |error|", "worst", f"goal ≤ {GOAL:.0%}", "table build s", "points", "plan s"]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(" | ".join(headers))
        for res in results:
            print(" | ".join(summary_cells(res)))
        return
    table = Table(title="latency model accuracy")
    for h in headers:
        table.add_column(h)
    for res in results:
        table.add_row(*summary_cells(res))
    Console().print(table)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model specs")
    p.add_argument("--plans", type=int, default=10, help="random plans per model")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--iterations", type=int, default=CALIBRATION_ITERATIONS,
                   help="timed calls per model per round (after dropping the first few, as the calibration does)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random plans")
    p.add_argument("--table-dir", default="out/latency_tables/{model}",
                   help="latency table folder; {model} is replaced by the model's name")
    p.add_argument("--rebuild", action="store_true", help="delete an existing table first (to time its build)")
    p.add_argument("--spin", action="store_true",
                   help="let idle ONNX Runtime threads spin in the timed sessions (noisy when interleaved)")
    p.add_argument("--json", default=str(RESULTS / "latency_model.json"),
                   help="result file; the Markdown goes beside it (.md)")
    args = p.parse_args(argv)
    if args.plans < 1:
        p.error("--plans must be at least 1")

    from trt_prune.provenance import machine_info

    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    results = [run_model(spec, args) for spec in specs]
    env = {**machine_info(), **results[0]["env"]}
    md = markdown(results, args, env)
    print_summary(results)
    save(args.json, {"models": specs, "plans": args.plans, "rounds": args.rounds, "iterations": args.iterations,
                     "seed": args.seed, "spin": args.spin, "round_to": ROUND_TO, "budget": BUDGET, "goal": GOAL,
                     "env": env, "results": results}, md)
    return {"results": results}


if __name__ == "__main__":
    main()
