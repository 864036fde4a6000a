"""`trt-prune bench run` + `bench compare` on `bench/suites/demo.yaml`, through the command line, with exit codes.

Records the suite once into a temporary store, then compares dense against each variant: `structured`
(10 % of channels, BatchNorm re-estimated: as accurate, faster), `slowed` (planted work: same detections,
slower) and `pruned_hard` (30 % of channels, nothing re-trained: faster, inaccurate). Writes the verdicts,
exit codes, ratios, intervals, accuracy and the top changed layers to
`bench/results/regression_demo.{json,md}` (stamped with commit, date and machine by
`trt_prune.provenance.write_result`), and the comparison pages to `bench/results/regression_demo/`.

    python bench/regression_demo.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, save, stamp

CLI = [sys.executable, "-m", "trt_prune.cli"]
CANDIDATES = ("structured", "slowed", "pruned_hard")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    pages = RESULTS / "regression_demo"
    pages.mkdir(parents=True, exist_ok=True)
    out = {"provenance": stamp(), "suite": "bench/suites/demo.yaml", "comparisons": {}}
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "runs.sqlite")
        started = time.perf_counter()
        run = _cli("bench", "run", "bench/suites/demo.yaml", "--store", store, "--name", "demo", "--json")
        if run.returncode != 0:
            raise SystemExit(f"bench run failed ({run.returncode}): {run.stderr[-2000:]}")
        out["run_seconds"] = round(time.perf_counter() - started, 1)
        out["run"] = json.loads(run.stdout)["results"]
        for name in CANDIDATES:
            res = _cli("bench", "compare", "--store", store, "--baseline", "demo:dense", "--candidate",
                       f"demo:{name}", "--html", str(pages / f"dense_vs_{name}.html"), "--json")
            if res.returncode not in (0, 1):
                raise SystemExit(f"bench compare failed ({res.returncode}): {res.stderr[-2000:]}")
            data = json.loads(res.stdout)
            out["comparisons"][name] = {
                "exit_code": res.returncode, "verdict": data["verdict"], "speed_verdict": data["speed_verdict"],
                "ratio": data["ratio"], "ci": data["ci"], "p_value": data["p_value"], "p99": data["p99"],
                "accuracy": data["accuracy"], "layers": [{k: row[k] for k in ("key", "base_ms", "other_ms", "delta_ms")}
                                                         for row in data["layers"][:3]]}
        history = _cli("bench", "history", "--store", store, "--html", str(pages / "history.html"), "--json")
        if history.returncode != 0:
            raise SystemExit(f"bench history failed: {history.stderr[-2000:]}")
    for page in pages.glob("*.html"):  # pages name files by bare name only: no path of this machine
        text = page.read_text()
        for marker in ("/tmp/", str(ROOT)):
            text = text.replace(marker, "")
        page.write_text(text)
    save(RESULTS / "regression_demo.json", out, _markdown(out))
    print(_markdown(out))
    return out


def _delta(row: dict) -> float:
    """A layer's change in ms; a layer only one side has counts whole (+ appeared, - vanished)."""
    if row["delta_ms"] is not None:
        return row["delta_ms"]
    return row["other_ms"] if row["other_ms"] is not None else -row["base_ms"]


def _markdown(r: dict) -> str:
    m = r["provenance"]["machine"]
    lines = ["# `bench run` + `bench compare` on the demo suite\n",
             f"Machine: {m['cpu']}, {m['usable_cores']} usable cores. "
             f"`bench run bench/suites/demo.yaml` took {r['run_seconds']} s. "
             "Rerun: `python bench/regression_demo.py`.\n",
             "| variant | p50 ms | mAP |", "|---|---|---|"]
    for row in r["run"]:
        acc = "–" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
        lines.append(f"| {row['variant']} | {row['p50_ms']:.3f} | {acc} |")
    lines += ["", "| dense → | verdict | exit | ratio | 95 % CI | accuracy drop | top changed layers |",
              "|---|---|---|---|---|---|---|"]
    for name, c in r["comparisons"].items():
        drop = "–" if not c["accuracy"] else f"{c['accuracy']['drop']:.2f}"
        layers = ", ".join(f"{x['key']} ({_delta(x):+.3f} ms)" for x in c["layers"])
        lines.append(f"| {name} | {c['verdict']} (speed: {c['speed_verdict']}) | {c['exit_code']} | "
                     f"{c['ratio']:.3f} | [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] | {drop} | {layers} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
