"""The profile report on the built-in demo detector: dense as the baseline, structurally pruned beside it.

``builtin:demo-detector`` (shipped weights) and ``trt_prune.prune(model, (1, 3, 320, 320), ratio=0.3,
round_to=8)`` of it are exported with ``export_onnx`` and cleaned with ``clean_onnx`` into a temporary folder,
then profiled with ``trt_prune.profile`` on ONNX Runtime (CPU, batch 1). The report is the pruned model's profile
with the dense one as ``compare``, the same page ``trt-prune profile pruned.onnx --compare dense.json --html``
writes. Outputs:

* ``bench/results/profile_report.html``: the self-contained page;
* ``bench/results/profile_report/``: its PNG plots, both profile JSONs (no samples) and, when a Chromium is on
  PATH (``chromium``, ``chromium-browser``, ``google-chrome`` or ``headless_shell``), ``screenshot.png`` of the
  page rendered headless;
* ``bench/results/profile_report.{json,md}``: the dense-against-pruned totals (latency, per-layer sums, CV,
  layers matched), stamped with commit, date and machine by ``trt_prune.provenance.write_result``.

The ONNX paths inside the profiles are cut to bare file names, and the script refuses to finish if any output
still names a folder of this machine. The commit is recorded in the profiles' notes, so the page shows it.

Usage:
    python bench/render_profile_report.py [--threads 2] [--duration 3] [--layer-runs 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, find_browser, save, stamp

HTML = RESULTS / "profile_report.html"
PNG_DIR = RESULTS / "profile_report"
SHAPE = (1, 3, 320, 320)
LOCAL_PATHS = ("/tmp", "/work", "/root", "/home")


def _export(model, folder: Path, name: str, exporter: str) -> Path:
    from trt_prune.stages import to_onnx

    return to_onnx(model, folder / f"{name}.onnx", input_shape=SHAPE, name=name, exporter=exporter).path


def _profile(path: Path, args: argparse.Namespace, note: str) -> dict:
    from trt_prune.stages import profile

    result = profile(path, "onnxruntime", batch=1, warmup_s=args.warmup, iterations=args.iterations,
                     min_duration_s=args.duration, threads=args.threads, layer_runs=args.layer_runs).to_dict()
    result["onnx"] = path.name  # the temporary folder means nothing anywhere else
    result["notes"] = [*result["notes"], note]
    return result


def _screenshot(page: Path, shot: Path) -> str:
    browser = find_browser()
    if browser is None:
        return "no screenshot: no chromium, chromium-browser, google-chrome or headless_shell on PATH"
    with tempfile.TemporaryDirectory(prefix="chromium-") as user_dir:
        done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--no-first-run", f"--user-data-dir={user_dir}", f"--screenshot={shot}",
                               "--window-size=1200,2400", page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=180, check=False)
    if done.returncode != 0 or not shot.is_file():
        return f"chromium failed (exit {done.returncode}): {done.stderr.strip()[-300:]}"
    return f"screenshot {shot.relative_to(ROOT)} ({shot.stat().st_size} bytes)"


def _check_no_local_paths(paths: list[Path]) -> None:
    for path in paths:
        data = path.read_bytes()
        if path.suffix == ".png":
            continue  # pixels (and no text chunks naming files); the plots are checked via the page's text
        hits = [p for p in LOCAL_PATHS if p.encode() in data]
        if hits:
            raise SystemExit(f"{path.relative_to(ROOT)} names local folders {hits}; scrub them before writing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--layer-runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    args = parser.parse_args()

    import trt_prune
    from trt_prune.artifacts import write_json
    from trt_prune.models import load_model
    from trt_prune.profiling.compare import compare_totals
    from trt_prune.profiling.html import write_profile_html

    started = time.perf_counter()
    provenance = stamp()
    note = f"bench/render_profile_report.py at commit {provenance['commit']}, {provenance['date']}"
    dense = load_model("builtin:demo-detector").model
    pruned = trt_prune.prune(dense, SHAPE, ratio=0.3, round_to=8).model
    with tempfile.TemporaryDirectory(prefix="profile-report-") as tmp:
        folder = Path(tmp)
        dense_onnx = _export(dense, folder, "dense", args.exporter)
        pruned_onnx = _export(pruned, folder, "pruned", args.exporter)
        print(f"exported and cleaned dense and pruned (ratio 0.3, round_to 8) with {args.exporter}")
        base = _profile(dense_onnx, args, note)
        other = _profile(pruned_onnx, args, note)
    PNG_DIR.mkdir(parents=True, exist_ok=True)
    page = write_profile_html(other, HTML, compare=base, top=args.top, png_dir=PNG_DIR)
    for name, prof in (("dense", base), ("pruned", other)):
        write_json(PNG_DIR / f"{name}.json", {k: v for k, v in prof.items() if k != "samples_ms"})
    print(f"wrote {page.relative_to(ROOT)} ({page.stat().st_size} bytes) and "
          f"{', '.join(sorted(p.name for p in PNG_DIR.iterdir()))} in {PNG_DIR.relative_to(ROOT)}/")
    print(_screenshot(page, PNG_DIR / "screenshot.png"))
    _check_no_local_paths([page, *PNG_DIR.iterdir()])

    totals = compare_totals(base, other)
    env = other["env"]
    print(f"machine: {env['cpu']}, {env['usable_cores']} usable cores, onnxruntime {env['backend_version']}, "
          f"{env['threads']} threads")
    for key in ("latency_mean_ms", "latency_p50_ms", "latency_p99_ms", "per_layer_sum_ms"):
        t = totals[key]
        print(f"  {key:18s} dense {t['base']:.3f}  pruned {t['other']:.3f}  ratio {t['ratio']:.2f}")
    print(f"  layers: {json.dumps(totals['layers'])}; CV dense {base['latency_ms']['cv']:.1%}, "
          f"pruned {other['latency_ms']['cv']:.1%}")
    lines = [f"Demo detector, dense (baseline) against `prune(ratio=0.3, round_to=8)`, ONNX Runtime "
             f"{env['backend_version']}, {env['threads']} threads, batch 1; page `bench/results/profile_report.html`.",
             "", "| | dense | pruned | ratio |", "|---|---|---|---|"]
    lines += ["| " + " | ".join([key, *("–" if totals[key][k] is None else f"{totals[key][k]:.3f}"
                                        for k in ("base", "other", "ratio"))]) + " |"
              for key in ("latency_mean_ms", "latency_p50_ms", "latency_p99_ms", "per_layer_sum_ms")]
    lines += [f"| latency CV | {base['latency_ms']['cv']:.1%} | {other['latency_ms']['cv']:.1%} | |", "",
              f"Layers: {json.dumps(totals['layers'])}."]
    save(RESULTS / "profile_report.json",
         {"provenance": provenance, "model": "builtin:demo-detector", "pruned": {"ratio": 0.3, "round_to": 8},
          "exporter": args.exporter, "env": env, "totals": totals,
          "cv": {"dense": base["latency_ms"]["cv"], "pruned": other["latency_ms"]["cv"]}},
         "\n".join(lines))
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
