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

``--scorer kernel`` scores the splits with the Triton kernel of ``trt_prune.kernels.sparse24`` (on CUDA when torch
sees a GPU; on the CPU under ``TRITON_INTERPRET=1`` the kernel in Triton's interpreter, else its torch reference;
every run records which as ``scorer_path``). The annealing schedule is then fixed to the numpy plan's length
(``rounds = planned_rounds(shape, --budget)``, per layer ``--layer-budget``) and each search may run up to
``--kernel-budget`` seconds, so the kernel search does the numpy search's schedule, move for move unless two
splits score within rounding. On the random matrices and ASP's matrix the numpy scorer is rerun with the same
schedule and seed beside it (``numpy_efficacy``, ``same_perm``). A fourth part, ``scorer_timing`` (default with
``--scorer kernel`` on CUDA), times one scoring call of all stripe pairs of a ``--timing-channels`` square layer
(2048: 256 pairs, 2048 rows): the numpy scorer against the kernel scorer.

Usage: python bench/permutation_search.py [--budget 1] [--layer-budget 1] [--seeds 10] [--asp-seeds 5]
    [--min-channels 64] [--scorer numpy|kernel] [--kernel-budget 30] [--parts random,asp,demo,timing]
    [--timing-channels 2048] [--timing-calls 20] [--json bench/results/permutation_search.json]
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
    SCORERS,
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
PARTS = ("random", "asp", "demo", "timing")


def environment() -> dict:
    from trt_prune.profiling.profile import machine_info

    env = machine_info()
    env["load_avg"] = list(os.getloadavg())
    return env


def _stats(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def _run(weight, budget: float, seed: int = 0, kernel: dict | None = None) -> dict:
    """One search; ``kernel``: None for the numpy scorer, else ``{"budget": s, "compare": bool}``."""
    plan = planned_rounds(magnitude_rows(weight).shape, budget)
    extra = {}
    if kernel is None:
        r = search_permutation(weight, time_budget_s=budget, seed=seed)
    else:
        r = search_permutation(weight, time_budget_s=kernel["budget"], seed=seed, rounds=plan, scorer="kernel")
        extra = {"scorer_path": r.scorer, "rounds_fixed": plan}
        if kernel["compare"]:
            n = search_permutation(weight, time_budget_s=kernel["budget"], seed=seed, rounds=plan)
            extra.update(numpy_efficacy=n.efficacy, numpy_seconds=n.seconds, same_perm=bool(np.array_equal(n.perm,
                                                                                                          r.perm)))
    total = float(magnitude_rows(weight).sum())
    return {"efficacy": r.efficacy, "seconds": r.seconds, "iterations": r.iterations,
            "planned_rounds": plan,
            "sort_only_efficacy": efficacy(weight, sorted_permutation(weight)),
            "kept_plain_pct": 100 * r.kept_plain / total, "kept_permuted_pct": 100 * r.kept_permuted / total,
            "kept_unstructured_pct": 100 * r.kept_unstructured / total, **extra}


def _versus_numpy(run: dict) -> str:
    if "numpy_efficacy" not in run:
        return ""
    same = "same permutation" if run["same_perm"] else "another permutation"
    return f"; numpy scorer, same schedule: {run['numpy_efficacy']:.1f} in {run['numpy_seconds']:.2f} s, {same}"


def random_part(seeds: int, budget: float, kernel: dict | None = None) -> dict:
    runs = []
    for s in range(seeds):
        w = np.random.default_rng(s).standard_normal((64, 128))
        runs.append({"matrix_seed": s, **_run(w, budget, kernel=kernel)})
        print(f"  random 64x128 seed {s}: efficacy {runs[-1]['efficacy']:.1f} in {runs[-1]['seconds']:.2f} s "
              f"(sort-only {runs[-1]['sort_only_efficacy']:.1f}){_versus_numpy(runs[-1])}", flush=True)
    return {"shape": [64, 128], "budget_s": budget, "runs": runs,
            "efficacy": _stats([r["efficacy"] for r in runs]), "seconds": _stats([r["seconds"] for r in runs]),
            "identity_efficacy": 0.0, "sort_only_efficacy": _stats([r["sort_only_efficacy"] for r in runs])}


def asp_part(seeds: int, budget: float, kernel: dict | None = None) -> dict:
    np.random.seed(1)  # ASP's permutation_test.py: np.random.seed(args.seed); np.random.rand(filters, channels)
    w = np.random.rand(128, 64)  # the legacy generator is what reproduces ASP's matrix
    plain, bound = kept_plain(w), kept_unstructured(w)
    assert abs(plain - ASP_REFERENCE["plain"]) < 5e-3 and abs(bound - ASP_REFERENCE["rows_50"]) < 5e-3, (plain, bound)
    runs = []
    for s in range(seeds):
        runs.append({"search_seed": s, **_run(w, budget, seed=s, kernel=kernel)})
        print(f"  ASP reference matrix, search seed {s}: efficacy {runs[-1]['efficacy']:.1f} in "
              f"{runs[-1]['seconds']:.2f} s{_versus_numpy(runs[-1])}", flush=True)
    return {"shape": [128, 64], "budget_s": budget, "kept_plain": plain, "kept_unstructured": bound,
            "runs": runs, "efficacy": _stats([r["efficacy"] for r in runs]),
            "seconds": _stats([r["seconds"] for r in runs]), "asp": ASP_REFERENCE}


def demo_part(budget: float, min_channels: int, kernel: dict | None = None) -> dict:
    import torch

    from trt_prune.models import load_model

    model = load_model("builtin:demo-detector").model
    layers = []
    for name, m in model.named_modules():
        if not (isinstance(m, torch.nn.Conv2d) and m.groups == 1 and m.in_channels % 4 == 0
                and m.in_channels >= min_channels):
            continue
        w = m.weight.detach().cpu().numpy()
        layers.append({"layer": name, "shape": list(w.shape), "rows": int(w.size // w.shape[1]),
                       **_run(w, budget, kernel=kernel)})
        d = layers[-1]
        print(f"  {name} {tuple(w.shape)}: efficacy {d['efficacy']:.1f} (sort-only {d['sort_only_efficacy']:.1f}) "
              f"in {d['seconds']:.2f} s", flush=True)
    eff = [d["efficacy"] for d in layers]
    if not eff:
        raise SystemExit(f"no demo-detector conv has >= {min_channels} input channels: lower --min-channels")
    return {"budget_s": budget, "min_channels": min_channels, "layers": layers,
            "efficacy": {**_stats(eff), "median": float(np.median(eff))},
            "sort_only_efficacy": _stats([d["sort_only_efficacy"] for d in layers]),
            "seconds_total": float(sum(d["seconds"] for d in layers)),
            "kept_pct_mean": {k: float(np.mean([d[k] for d in layers]))
                              for k in ("kept_plain_pct", "kept_permuted_pct", "kept_unstructured_pct")}}


def timing_part(channels: int, calls: int) -> dict:
    """One scoring call of all ``channels // 8`` stripe pairs of a ``channels`` x ``channels`` layer: numpy scorer
    against the kernel scorer, and the largest relative difference of their scores."""
    import torch

    from trt_prune.kernels.sparse24 import TorchSplitScorer, split_scores
    from trt_prune.sparsity.permutation import _SplitScorer

    w = np.random.default_rng(0).standard_normal((channels, channels))
    columns = np.ascontiguousarray(magnitude_rows(w).T, dtype=np.float32)
    cols8 = np.random.default_rng(1).permutation(channels).reshape(-1, 8)  # a random matching of the stripes
    numpy_scorer, kernel_scorer = _SplitScorer(columns, len(cols8)), TorchSplitScorer(columns, len(cols8))
    reference, got = numpy_scorer(cols8), kernel_scorer(cols8)  # the kernel's first call compiles it

    def wall_ms(fn) -> list[float]:
        out = []
        for _ in range(calls):
            t = time.perf_counter()
            fn(cols8)  # both return host arrays: the kernel call ends in a device-to-host copy, its work included
            out.append(1e3 * (time.perf_counter() - t))
        return out

    res = {"channels": channels, "rows": channels, "pairs": len(cols8), "calls": calls,
           "kernel_path": kernel_scorer.path, "max_rel_diff": float(np.max(np.abs(got / reference - 1.0))),
           "numpy_call_ms": _stats(wall_ms(numpy_scorer)), "kernel_call_ms": _stats(wall_ms(kernel_scorer))}
    if kernel_scorer.device.type == "cuda":
        # device time of the kernel and its fp64 reduction alone, ids already on the GPU (CUDA events)
        ids = torch.as_tensor(cols8, dtype=torch.int32, device=kernel_scorer.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        device_ms = []
        for _ in range(calls):
            start.record()
            split_scores(kernel_scorer.columns, ids, impl="triton")
            end.record()
            end.synchronize()
            device_ms.append(start.elapsed_time(end))
        res["kernel_device_ms"] = _stats(device_ms)
        res["gpu"] = torch.cuda.get_device_name(kernel_scorer.device)
    res["speedup_call"] = res["numpy_call_ms"]["mean"] / res["kernel_call_ms"]["mean"]
    print(f"  scoring {len(cols8)} stripe pairs of a {channels}x{channels} layer: numpy "
          f"{res['numpy_call_ms']['mean']:.2f} ms, kernel ({kernel_scorer.path}) {res['kernel_call_ms']['mean']:.3f} ms"
          f" per call; scores differ by at most {res['max_rel_diff']:.1e} (relative)", flush=True)
    return res


def _scorer_line(res: dict) -> str:
    if res.get("scorer", "numpy") == "numpy":
        return "Single-threaded numpy search (`search_permutation`)."
    return (f"Search with the kernel scorer (`search_permutation(..., scorer=\"kernel\")`, path "
            f"`{res['scorer_path']}`), schedule fixed to the numpy plan's length, at most {res['kernel_budget_s']:g} s "
            "per search; the numpy scorer is rerun with the same schedule and seed on the random and ASP matrices.")


def _random_md(rnd: dict) -> list[str]:
    out = [f"## Random 64×128 (standard normal, 64 rows × 128 input channels), seeds 0–{len(rnd['runs']) - 1}, "
           f"budget {rnd['budget_s']:g} s", "",
           "| order | efficacy mean | min | max | seconds mean | max |", "|---|---|---|---|---|---|",
           "| identity | 0.0 | 0.0 | 0.0 | – | – |",
           "| sort-only | {mean:.1f} | {min:.1f} | {max:.1f} | – | – |".format(**rnd["sort_only_efficacy"]),
           f"| search | {rnd['efficacy']['mean']:.1f} | {rnd['efficacy']['min']:.1f} | {rnd['efficacy']['max']:.1f} | "
           f"{rnd['seconds']['mean']:.2f} | {rnd['seconds']['max']:.2f} |", ""]
    if "numpy_efficacy" in rnd["runs"][0]:
        out += ["| seed | efficacy | numpy, same schedule | same permutation | sort-only | seconds | rounds |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['matrix_seed']} | {r['efficacy']:.1f} | {r['numpy_efficacy']:.1f} | "
                f"{'yes' if r['same_perm'] else 'no'} | {r['sort_only_efficacy']:.1f} | {r['seconds']:.2f} | "
                f"{r['iterations']} |" for r in rnd["runs"]]
        return out
    out += ["| seed | efficacy | sort-only | seconds | rounds |", "|---|---|---|---|---|"]
    out += [f"| {r['matrix_seed']} | {r['efficacy']:.1f} | {r['sort_only_efficacy']:.1f} | {r['seconds']:.2f} | "
            f"{r['iterations']} |" for r in rnd["runs"]]
    return out


def _asp_md(asp: dict) -> list[str]:
    where = f"`{asp['runs'][0]['scorer_path']}`" if "scorer_path" in asp["runs"][0] else "this CPU"
    out = [f"## ASP's reference matrix (uniform, 128 rows × 64 input channels), budget {asp['budget_s']:g} s",
           "", "`np.random.seed(1); np.random.rand(128, 64)`: the matrix of ASP's ChannelPermutations README "
           f"(plain 2:4 {asp['kept_plain']:.3f}, 50% rows {asp['kept_unstructured']:.3f}, as published).", "",
           "| search | device | efficacy | seconds |", "|---|---|---|---|"]
    out += [f"| ASP {p['strategy']} | V100 (published) | {p['efficacy']:.1f} | {p['seconds']:g} |"
            for p in asp["asp"]["published"]]
    out += [f"| ours, search seed {r['search_seed']} | {where} | {r['efficacy']:.1f} | {r['seconds']:.2f} |"
            for r in asp["runs"]]
    out += [f"| ours, mean (min–max) | {where} | {asp['efficacy']['mean']:.1f} ({asp['efficacy']['min']:.1f}–"
            f"{asp['efficacy']['max']:.1f}) | {asp['seconds']['mean']:.2f} |"]
    if "numpy_efficacy" in asp["runs"][0]:
        out += [f"| numpy scorer, same schedule, search seed {r['search_seed']} | this CPU | {r['numpy_efficacy']:.1f} "
                f"| {r['numpy_seconds']:.2f} |" for r in asp["runs"]]
        same = sum(r["same_perm"] for r in asp["runs"])
        out += ["", f"Kernel and numpy scorers gave the same permutation for {same} of {len(asp['runs'])} seeds."]
    return out + [""]


def _demo_md(demo: dict) -> list[str]:
    out = [f"## builtin:demo-detector convs (groups 1, ≥ {demo['min_channels']} input channels), budget "
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
    return out


def _timing_md(t: dict) -> list[str]:
    out = ["", f"## Scoring all {t['pairs']} stripe pairs of a {t['channels']}×{t['channels']} layer "
           f"({t['rows']} rows): one call, {t['calls']} calls timed", "",
           "| scorer | path | ms per call, mean | min | max |", "|---|---|---|---|---|",
           "| numpy `_SplitScorer` | this CPU | {mean:.2f} | {min:.2f} | {max:.2f} |".format(**t["numpy_call_ms"]),
           f"| kernel `TorchSplitScorer` | {t['kernel_path']} | " + "{mean:.3f} | {min:.3f} | {max:.3f} |".format(
               **t["kernel_call_ms"])]
    if "kernel_device_ms" in t:
        out.append(f"| kernel and fp64 reduction alone (CUDA events) | {t['gpu']} | "
                   + "{mean:.3f} | {min:.3f} | {max:.3f} |".format(**t["kernel_device_ms"]))
    out += ["", f"Kernel call {t['speedup_call']:.0f}× the numpy call's speed; the scores differ by at most "
            f"{t['max_rel_diff']:.1e} (relative)."]
    return out


def markdown(res: dict) -> str:
    env = res["machine"]
    out = ["# Channel-permutation search for 2:4 sparsity", "",
           f"Machine: {env['cpu']}, {env['cpu_count']} cores ({env['usable_cores']} usable), {env['platform']}; "
           f"shared, load average at start {env['load_avg'][0]:.1f}. Python {env['python']}, numpy {env['numpy']}. "
           f"{_scorer_line(res)}", "",
           "Efficacy = 100 × (kept_permuted − kept_plain) / (kept_unstructured − kept_plain); kept_unstructured = "
           "the largest half of |w| in every row (a conv `[K, C, R, S]` is `K·R·S` rows of `C`).", ""]
    if "random_64x128" in res:
        out += _random_md(res["random_64x128"])
        out += [""]
    if "asp_reference" in res:
        out += _asp_md(res["asp_reference"])
    if "demo_detector" in res:
        out += _demo_md(res["demo_detector"])
    if "scorer_timing" in res:
        out += _timing_md(res["scorer_timing"])
    return "\n".join(out) + "\n"


def _parts(text: str | None, scorer: str) -> list[str]:
    if text is None:
        import torch

        return ["random", "asp", "demo"] + (["timing"] if scorer == "kernel" and torch.cuda.is_available() else [])
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise SystemExit(f"--parts {text!r}: pick from {', '.join(PARTS)}, comma-separated")
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=1.0, help="seconds per random matrix")
    p.add_argument("--layer-budget", type=float, default=1.0, help="seconds per demo-detector layer")
    p.add_argument("--seeds", type=int, default=10, help="random 64x128 matrices (seeds 0..N-1)")
    p.add_argument("--asp-seeds", type=int, default=5, help="search seeds on ASP's reference matrix")
    p.add_argument("--min-channels", type=int, default=64)
    p.add_argument("--scorer", choices=SCORERS, default="numpy",
                   help="split scorer of the search: numpy, or the Triton kernel (CUDA, else the CPU)")
    p.add_argument("--kernel-budget", type=float, default=30.0,
                   help="with --scorer kernel: seconds per search allowed for the numpy plan's schedule")
    p.add_argument("--parts", help=f"comma-separated, from {', '.join(PARTS)} (default: random,asp,demo, and "
                   "timing with --scorer kernel on CUDA)")
    p.add_argument("--timing-channels", type=int, default=2048, help="square layer of the timing part")
    p.add_argument("--timing-calls", type=int, default=20, help="scoring calls timed per scorer")
    p.add_argument("--json", type=Path, help="result file; its Markdown goes beside it (.md)")
    args = p.parse_args()
    parts = _parts(args.parts, args.scorer)
    if "timing" in parts and (args.timing_channels < 8 or args.timing_channels % 8):
        raise SystemExit(f"--timing-channels {args.timing_channels}: need a positive multiple of 8")
    kernel = None if args.scorer == "numpy" else {"budget": args.kernel_budget, "compare": True}

    env = environment()
    print(f"# {env['cpu']}, {env['cpu_count']} cores, {env['platform']}, load average {env['load_avg'][0]:.1f}")
    start = time.perf_counter()
    res = {"machine": env}
    if args.scorer != "numpy":
        res.update(scorer=args.scorer, kernel_budget_s=args.kernel_budget)
    if "random" in parts:
        res["random_64x128"] = random_part(args.seeds, args.budget, kernel)
    if "asp" in parts:
        res["asp_reference"] = asp_part(args.asp_seeds, args.budget, kernel)
    if "demo" in parts:
        res["demo_detector"] = demo_part(args.layer_budget, args.min_channels,
                                         None if kernel is None else {**kernel, "compare": False})
    if "timing" in parts:
        res["scorer_timing"] = timing_part(args.timing_channels, args.timing_calls)
    if args.scorer != "numpy":
        runs = [r for key in ("random_64x128", "asp_reference") for r in res.get(key, {}).get("runs", [])]
        paths = {r["scorer_path"] for r in runs}
        paths |= {d["scorer_path"] for d in res.get("demo_detector", {}).get("layers", [])}
        res["scorer_path"] = ", ".join(sorted(paths)) or "none"
    res["wall_s"] = time.perf_counter() - start
    text = markdown(res)
    print()
    print(text)
    if args.json:
        from trt_prune.provenance import write_result

        write_result(args.json.stem, res, text, results_dir=args.json.parent, folder=ROOT)


if __name__ == "__main__":
    main()
