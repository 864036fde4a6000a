"""Channel-permutation search for 2:4 sparsity: efficacy and seconds on random matrices and on real conv weights.

Efficacy, as NVIDIA ASP reports it: ``100 * (kept_permuted - kept_plain) / (kept_unstructured - kept_plain)``,
kept = the |w| that survives the 2:4 mask, ``kept_unstructured`` = the largest half of every row (see
``trt_prune.sparsity.permutation``). Three parts:

- ``random_64x128``: ``np.random.default_rng(seed).standard_normal((64, 128))`` (64 output rows, 128 input
  channels), seeds 0..9, one search each at ``--budget``; baselines: the identity (efficacy 0 by definition)
  and the sort-only order (:func:`sorted_permutation`).
- ``asp_reference``: the exact matrix of ASP's ChannelPermutations README (``np.random.seed(1)``,
  ``np.random.rand(128, 64)``: uniform, 128 rows, 64 input channels; its default 2:4 magnitude 2852.377 and "50%
  rows" 3042.332 are checked), searched with ``--asp-seeds`` search seeds. ASP's published numbers on it, from a
  V100: 35.5 in 0.013 s (8-column stripe groups), 36.6 in 0.86 s (12-column stripe groups).
- ``demo_detector``: every Conv2d of ``builtin:demo-detector`` with groups 1, input channels divisible by 4 and
  at least ``--min-channels``; per layer the shape, sort-only and searched efficacy, seconds, rounds.

Timings are wall-clock on this machine (shared: the load average at the start is recorded).

Usage: python bench/permutation_search.py [--budget 1] [--layer-budget 1] [--seeds 10] [--asp-seeds 5]
    [--min-channels 64] [--json bench/results/permutation_search.json]
``--json`` writes the result and its Markdown beside it (``.md``), stamped with commit, date and machine by
``trt_prune.provenance.write_result``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from trt_prune.sparsity.permutation import (
    efficacy,
    kept_plain,
    kept_unstructured,
    magnitude_rows,
    planned_rounds,
    search_permutation,
    sorted_permutation,
)

ROOT = Path(__file__).resolve().parents[1]
ASP_REFERENCE = {"plain": 2852.377, "rows_50": 3042.332,
                 "published": [{"strategy": "optimize_stripe_groups,8,0", "efficacy": 35.5, "seconds": 0.013},
                               {"strategy": "optimize_stripe_groups,12,0", "efficacy": 36.6, "seconds": 0.86}],
                 "device": "V100 (ASP ChannelPermutations README)"}


def environment() -> dict:
    from trt_prune.profiling.profile import machine_info

    env = machine_info()
    env["load_avg"] = list(os.getloadavg())
    return env


def _stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def _run(weight, budget: float, seed: int = 0) -> dict:
    r = search_permutation(weight, time_budget_s=budget, seed=seed)
    total = float(magnitude_rows(weight).sum())
    return {"efficacy": r.efficacy, "seconds": r.seconds, "iterations": r.iterations,
            "planned_rounds": planned_rounds(magnitude_rows(weight).shape, budget),
            "sort_only_efficacy": efficacy(weight, sorted_permutation(weight)),
            "kept_plain_pct": 100 * r.kept_plain / total, "kept_permuted_pct": 100 * r.kept_permuted / total,
            "kept_unstructured_pct": 100 * r.kept_unstructured / total}


def random_part(seeds: int, budget: float) -> dict:
    runs = []
    for s in range(seeds):
        w = np.random.default_rng(s).standard_normal((64, 128))
        runs.append({"matrix_seed": s, **_run(w, budget)})
        print(f"  random 64x128 seed {s}: efficacy {runs[-1]['efficacy']:.1f} in {runs[-1]['seconds']:.2f} s "
              f"(sort-only {runs[-1]['sort_only_efficacy']:.1f})", flush=True)
    return {"shape": [64, 128], "budget_s": budget, "runs": runs,
            "efficacy": _stats([r["efficacy"] for r in runs]), "seconds": _stats([r["seconds"] for r in runs]),
            "identity_efficacy": 0.0, "sort_only_efficacy": _stats([r["sort_only_efficacy"] for r in runs])}


def asp_part(seeds: int, budget: float) -> dict:
    np.random.seed(1)  # ASP's permutation_test.py: np.random.seed(args.seed); np.random.rand(filters, channels)
    w = np.random.rand(128, 64)  # the legacy generator is what reproduces ASP's matrix
    plain, bound = kept_plain(w), kept_unstructured(w)
    assert abs(plain - ASP_REFERENCE["plain"]) < 5e-3 and abs(bound - ASP_REFERENCE["rows_50"]) < 5e-3, (plain, bound)
    runs = []
    for s in range(seeds):
        runs.append({"search_seed": s, **_run(w, budget, seed=s)})
        print(f"  ASP reference matrix, search seed {s}: efficacy {runs[-1]['efficacy']:.1f} in "
              f"{runs[-1]['seconds']:.2f} s", flush=True)
    return {"shape": [128, 64], "budget_s": budget, "kept_plain": plain, "kept_unstructured": bound,
            "runs": runs, "efficacy": _stats([r["efficacy"] for r in runs]),
            "seconds": _stats([r["seconds"] for r in runs]), "asp": ASP_REFERENCE}


def demo_part(budget: float, min_channels: int) -> dict:
    import torch

    from trt_prune.models import load_model

    model = load_model("builtin:demo-detector").model
    layers = []
    for name, m in model.named_modules():
        if not (isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.in_channels % 4 == 0
                and m.in_channels >= min_channels):
            continue
        w = m.weight.detach().cpu().numpy()
        layers.append({"layer": name, "shape": list(w.shape), "rows": int(w.size // w.shape[1]), **_run(w, budget)})
        d = layers[-1]
        print(f"  {name} {tuple(w.shape)}: efficacy {d['efficacy']:.1f} (sort-only {d['sort_only_efficacy']:.1f}) "
              f"in {d['seconds']:.2f} s", flush=True)
    eff = [d["efficacy"] for d in layers]
    return {"budget_s": budget, "min_channels": min_channels, "layers": layers,
            "efficacy": {**_stats(eff), "median": float(np.median(eff))},
            "sort_only_efficacy": _stats([d["sort_only_efficacy"] for d in layers]),
            "seconds_total": float(sum(d["seconds"] for d in layers)),
            "kept_pct_mean": {k: float(np.mean([d[k] for d in layers]))
                              for k in ("kept_plain_pct", "kept_permuted_pct", "kept_unstructured_pct")}}


def markdown(res: dict) -> str:
    env, rnd, asp, demo = res["machine"], res["random_64x128"], res["asp_reference"], res["demo_detector"]
    out = ["# Channel-permutation search for 2:4 sparsity", "",
           f"Machine: {env['cpu']}, {env['cpu_count']} cores ({env['usable_cores']} usable), {env['platform']}; "
           f"shared, load average at start {env['load_avg'][0]:.1f}. Python {env['python']}, numpy {env['numpy']}. "
           "Single-threaded numpy search (`search_permutation`).", "",
           "Efficacy = 100 × (kept_permuted − kept_plain) / (kept_unstructured − kept_plain); kept_unstructured = "
           "the largest half of |w| in every row (a conv `[K, C, R, S]` is `K·R·S` rows of `C`).", "",
           f"## Random 64×128 (standard normal, 64 rows × 128 input channels), seeds 0–{len(rnd['runs']) - 1}, "
           f"budget {rnd['budget_s']:g} s", "",
           "| order | efficacy mean | min | max | seconds mean | max |", "|---|---|---|---|---|---|",
           "| identity | 0.0 | 0.0 | 0.0 | – | – |",
           "| sort-only | {mean:.1f} | {min:.1f} | {max:.1f} | – | – |".format(**rnd["sort_only_efficacy"]),
           f"| search | {rnd['efficacy']['mean']:.1f} | {rnd['efficacy']['min']:.1f} | {rnd['efficacy']['max']:.1f} | "
           f"{rnd['seconds']['mean']:.2f} | {rnd['seconds']['max']:.2f} |", "",
           "| seed | efficacy | sort-only | seconds | rounds |", "|---|---|---|---|---|"]
    out += [f"| {r['matrix_seed']} | {r['efficacy']:.1f} | {r['sort_only_efficacy']:.1f} | {r['seconds']:.2f} | "
            f"{r['iterations']} |" for r in rnd["runs"]]
    out += ["", f"## ASP's reference matrix (uniform, 128 rows × 64 input channels), budget {asp['budget_s']:g} s",
            "", "`np.random.seed(1); np.random.rand(128, 64)`: the matrix of ASP's ChannelPermutations README "
            f"(plain 2:4 {asp['kept_plain']:.3f}, 50% rows {asp['kept_unstructured']:.3f}, as published).", "",
            "| search | device | efficacy | seconds |", "|---|---|---|---|"]
    out += [f"| ASP {p['strategy']} | V100 (published) | {p['efficacy']:.1f} | {p['seconds']:g} |"
            for p in asp["asp"]["published"]]
    out += [f"| ours, search seed {r['search_seed']} | this CPU | {r['efficacy']:.1f} | {r['seconds']:.2f} |"
            for r in asp["runs"]]
    out += [f"| ours, mean (min–max) | this CPU | {asp['efficacy']['mean']:.1f} ({asp['efficacy']['min']:.1f}–"
            f"{asp['efficacy']['max']:.1f}) | {asp['seconds']['mean']:.2f} |", "",
            f"## builtin:demo-detector convs (groups 1, ≥ {demo['min_channels']} input channels), budget "
            f"{demo['budget_s']:g} s per layer", "",
            f"{len(demo['layers'])} layers; efficacy {demo['efficacy']['min']:.1f}–{demo['efficacy']['max']:.1f} "
            f"(median {demo['efficacy']['median']:.1f}, mean {demo['efficacy']['mean']:.1f}); sort-only mean "
            f"{demo['sort_only_efficacy']['mean']:.1f}; {demo['seconds_total']:.1f} s in all. Kept |w|, mean over "
            f"layers: plain {demo['kept_pct_mean']['kept_plain_pct']:.1f}%, permuted "
            f"{demo['kept_pct_mean']['kept_permuted_pct']:.1f}%, unstructured bound "
            f"{demo['kept_pct_mean']['kept_unstructured_pct']:.1f}%.", "",
            "| layer | weight shape | rows × C | efficacy | sort-only | kept plain → permuted (bound) | seconds | "
            "rounds |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {d['layer']} | {'×'.join(map(str, d['shape']))} | {d['rows']}×{d['shape'][1]} | {d['efficacy']:.1f} | "
            f"{d['sort_only_efficacy']:.1f} | {d['kept_plain_pct']:.1f}% → {d['kept_permuted_pct']:.1f}% "
            f"({d['kept_unstructured_pct']:.1f}%) | {d['seconds']:.2f} | {d['iterations']} |" for d in demo["layers"]]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=1.0, help="seconds per random matrix")
    p.add_argument("--layer-budget", type=float, default=1.0, help="seconds per demo-detector layer")
    p.add_argument("--seeds", type=int, default=10, help="random 64x128 matrices (seeds 0..N-1)")
    p.add_argument("--asp-seeds", type=int, default=5, help="search seeds on ASP's reference matrix")
    p.add_argument("--min-channels", type=int, default=64)
    p.add_argument("--json", type=Path, help="result file; its Markdown goes beside it (.md)")
    args = p.parse_args()

    env = environment()
    print(f"# {env['cpu']}, {env['cpu_count']} cores, {env['platform']}, load average {env['load_avg'][0]:.1f}")
    start = time.perf_counter()
    res = {"machine": env, "random_64x128": random_part(args.seeds, args.budget),
           "asp_reference": asp_part(args.asp_seeds, args.budget),
           "demo_detector": demo_part(args.layer_budget, args.min_channels)}
    res["wall_s"] = time.perf_counter() - start
    text = markdown(res)
    print()
    print(text)
    if args.json:
        from trt_prune.provenance import write_result

        write_result(args.json.stem, res, text, results_dir=args.json.parent, folder=ROOT)


if __name__ == "__main__":
    main()
