"""Calibrate the regression verdict on this machine: A/A false alarms and planted-slowdown detection rates.

The demo detector is exported and cleaned once, then built in ONNX Runtime (CPU, 1 thread: the default of
``trt-prune bench compare``). Three experiments, each a series of independent live comparisons with the
default settings (min effect 5 %, 95 % interval, 8 to 40 interleaved blocks of 10 calls, a new seed each):

1. A/A: the model against a second session of the same file, ``--aa`` times: how often is it called a
   regression (target: at most 1 in 20) or an improvement?
2. Planted 5 % and 10 %: the candidate is the same graph plus planted work (``trt_prune.regression.planted``), its
   size found by bisection so that the candidate is 5 % / 10 % slower in long interleaved measurements
   (reported: the measured slowdown); ``--planted`` comparisons each: how often is it called a regression
   (target at 10 %: at least 19 in 20)?

Sessions are built once per experiment; per-layer profiles and accuracy are off (they do not enter the timing
verdict). Results go to ``bench/results/regression_calibration.{json,md}``, stamped with commit, date and machine.

    python bench/calibrate_regression.py [--aa 30] [--planted 20] [--json OUT.json]  # OUT.md goes beside it
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from _common import RESULTS, save, stamp

from trt_prune.profiling.profile import interleaved_blocks
from trt_prune.regression.live import Settings, compare_arms, prepare_arm
from trt_prune.regression.planted import calibrate_planted, plant_work
from trt_prune.stages import to_onnx


def _series(base, cand, settings: Settings, n: int, label: str) -> dict:
    verdicts, ratios, blocks = [], [], []
    started = time.perf_counter()
    for i in range(n):
        result = compare_arms(base, cand, dataclasses.replace(settings, seed=1000 + i))
        verdicts.append(result["verdict"])
        ratios.append(result["ratio"])
        blocks.append(result["blocks"])
        print(f"  {label} {i + 1}/{n}: {result['verdict']} ratio {result['ratio']:.3f} "
              f"[{result['ci'][0]:.3f}, {result['ci'][1]:.3f}] in {result['blocks']} blocks",
              file=sys.stderr, flush=True)
    counts = collections.Counter(verdicts)
    return {"n": n, "verdicts": dict(counts), "regression_rate": counts["regression"] / n,
            "median_ratio": float(np.median(ratios)), "mean_blocks": float(np.mean(blocks)),
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aa", type=int, default=30)
    parser.add_argument("--planted", type=int, default=20)
    parser.add_argument("--json", default=str(RESULTS / "regression_calibration.json"),
                        help="result file; its Markdown table goes beside it (.md)")
    args = parser.parse_args(argv)
    settings = Settings(threads=1, layer_runs=0, accuracy_images=0)
    out = {"provenance": stamp(), "model": "builtin:demo-detector", "backend": "onnxruntime", "threads": 1,
           "settings": {k: getattr(settings, k) for k in ("min_effect", "alpha", "level", "min_blocks", "max_blocks",
                                                          "step_blocks", "per_block")}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_path = to_onnx("builtin:demo-detector", workdir=work).path
        model = onnx.load(str(base_path))
        print("A/A …", file=sys.stderr, flush=True)
        a1 = prepare_arm(str(base_path), "A", "onnxruntime", settings, work, accuracy="none")
        a2 = prepare_arm(str(base_path), "A'", "onnxruntime", settings, work, accuracy="none")
        out["aa"] = _series(a1, a2, settings, args.aa, "A/A")
        a2.session.close()

        rng = random.Random(7)

        def measure(base_model, cand_model) -> float:
            cand_path = work / "probe.onnx"
            onnx.save(cand_model, str(cand_path))
            probe = prepare_arm(str(cand_path), "probe", "onnxruntime", settings, work, accuracy="none")
            try:
                blocks = interleaved_blocks({"a": a1.session, "b": probe.session}, {"a": a1.feeds, "b": probe.feeds},
                                            20, 10, 0.3, rng)
            finally:
                probe.session.close()
            return float(np.median(np.concatenate(blocks["b"])) / np.median(np.concatenate(blocks["a"])))

        out["planted"] = {}
        for target in (0.05, 0.10):
            print(f"planted {target:.0%}: calibrating …", file=sys.stderr, flush=True)
            steps, measured = calibrate_planted(model, target, measure, tolerance=0.005)
            path = work / f"planted_{int(target * 100)}.onnx"
            onnx.save(plant_work(model, steps), str(path))
            cand = prepare_arm(str(path), f"+{target:.0%}", "onnxruntime", settings, work, accuracy="none")
            series = _series(a1, cand, settings, args.planted, f"+{target:.0%}")
            cand.session.close()
            out["planted"][f"{target:.2f}"] = {"steps": steps, "measured_slowdown": measured, **series}
        a1.session.close()
    save(args.json, out, _markdown(out))
    print(_markdown(out))
    return out


def _markdown(r: dict) -> str:
    m, s = r["provenance"]["machine"], r["settings"]
    lines = ["# Calibration of the regression verdict\n",
             f"Machine: {m['cpu']}, {m['usable_cores']} usable cores; ONNX Runtime, 1 thread; {r['model']}. "
             f"Settings: min effect {s['min_effect']:.0%}, {s['level']:.0%} interval, "
             f"{s['min_blocks']}–{s['max_blocks']} interleaved blocks of {s['per_block']} calls. Rerun: "
             "`python bench/calibrate_regression.py`.\n",
             "| experiment | true slowdown | comparisons | regression | improvement | no change | inconclusive | "
             "median ratio | mean blocks |", "|---|---|---|---|---|---|---|---|---|"]

    def row(name, truth, e):
        v = e["verdicts"]
        lines.append(f"| {name} | {truth} | {e['n']} | {v.get('regression', 0)} | {v.get('improvement', 0)} | "
                     f"{v.get('no change', 0)} | {v.get('inconclusive', 0)} | {e['median_ratio']:.3f} | "
                     f"{e['mean_blocks']:.1f} |")

    row("A/A", "0", r["aa"])
    for key, e in r["planted"].items():
        row(f"planted {float(key):.0%} ({e['steps']} steps)", f"{e['measured_slowdown']:+.1%} (measured)", e)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
