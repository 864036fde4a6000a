"""Graph cleaning against Polygraphy's sanitize and onnxslim, on the pruning coverage list and on TorchScript
exports that keep BatchNorm.

Two kinds of model:

- every model of ``bench/prune_coverage.py``'s registry (35: torchvision classifiers and detectors, detector
  cores, timm families, the demo detector), random weights (seed 0) except the demo detector's shipped ones:
  pruned with ours (``prune(model, shape, ratio=0.5, round_to=8)``) and exported with ``export_onnx`` (default
  exporter, parity with torch checked);
- ``ts11:<name>`` and ``ts13:<name>`` for torchvision ``resnet50`` and ``mobilenet_v3_large`` (weights=None,
  seed 0, not pruned): ``torch.onnx.export(..., dynamo=False, opset_version=11/13, do_constant_folding=False)``
  with a dynamic batch, height and width, the way files from other tools come: BatchNorm as its own node,
  shared weights behind Identity nodes.

The exported file is then cleaned three ways:

- ours: ``clean_onnx`` (its default passes, onnxslim among them, and its own parity check against the
  exported graph, at the input shape it chooses for dynamic axes);
- Polygraphy: ``polygraphy surgeon sanitize <exported> --fold-constants -o <out>`` (the CLI, in a subprocess);
- onnxslim: ``onnxslim.slim(model)`` (the Python API, in the worker process).

Recorded: node counts (exported / ours / Polygraphy's / onnxslim's) and the op types ours has more of than
each; whether the three graphs give the same outputs as the export in ONNX Runtime (seeded random inputs at
batch 1, and 2 when the batch is dynamic, at the input size ``clean_onnx`` would choose;
``|x - exported| <= 1e-4 + 1e-3 * |exported|``, max abs shown), and seconds: ours with and without its parity
check (in the worker process, libraries already imported), Polygraphy's CLI wall time (a new process: about
0.2 s of it is start-up), onnxslim's call. The target is ours <= both node counts on every model, with
identical outputs.

Every model runs in its own subprocess under a wall-clock timeout and an address-space cap, so one failure is
recorded and the run goes on. Results go through :func:`trt_prune.provenance.write_result` (stamped with
commit, date and machine) as ``<results-dir>/clean_vs_polygraphy.{json,md}``.

Usage:
    python bench/clean_vs_polygraphy.py [--models resnet18,ts11:resnet50] [--timeout 600] [--mem-gib 12]
        [--results-dir DIR] [--keep DIR] [--update]

``--keep DIR`` keeps each model's exported/ours/polygraphy/onnxslim ONNX files under ``DIR/<model>/``.
``--update`` starts from the records already in the results folder and replaces the models run now.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import prune_coverage  # the coverage list lives there (bench/ is on sys.path when this file runs)

ROOT = Path(__file__).resolve().parents[1]
NAME = "clean_vs_polygraphy"
RATIO, ROUND_TO = 0.5, 8
ATOL, RTOL = 1e-4, 1e-3
TORCHSCRIPT = {f"ts{opset}:{model}": (model, opset) for model in ("resnet50", "mobilenet_v3_large")
               for opset in (11, 13)}
CLEANERS = ("ours", "polygraphy", "onnxslim")


def _models() -> list[str]:
    return [*prune_coverage._registry(), *TORCHSCRIPT]


def _ops(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _polygraphy(src: Path, dst: Path, timeout: float) -> dict:
    exe = Path(sys.executable).with_name("polygraphy")
    cmd = [str(exe) if exe.exists() else "polygraphy", "surgeon", "sanitize", str(src), "--fold-constants",
           "-o", str(dst)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    seconds = round(time.perf_counter() - started, 2)
    if proc.returncode != 0 or not dst.exists():
        tail = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()][-2:]
        return {"ok": False, "error": f"exit {proc.returncode}: " + " | ".join(tail)[:300], "seconds": seconds}
    return {"ok": True, "seconds": seconds}


def _onnxslim(src: Path, dst: Path) -> dict:
    import onnx
    import onnxslim

    from trt_prune.onnx_io import one_line, save_onnx

    started = time.perf_counter()
    try:
        slimmed = onnxslim.slim(onnx.load(str(src)))
        if slimmed is None:
            raise RuntimeError("onnxslim returned no model")
    except Exception as exc:  # its failure is a result
        return {"ok": False, "error": one_line(exc, with_type=True)}
    seconds = round(time.perf_counter() - started, 2)
    save_onnx(slimmed, dst)
    return {"ok": True, "seconds": seconds}


def _parity(paths: dict[str, Path]) -> dict:
    """Outputs of each cleaned graph against the exported one, on the same seeded inputs, at the input shape
    ``clean_onnx`` chooses (batch 1), and at batch 2 when the batch is dynamic."""
    import onnx

    from trt_prune.onnx_io import candidate_input_shapes, compare_outputs, one_line, random_feeds, run_onnxruntime

    exported = onnx.load(str(paths["exported"]))
    shapes = candidate_input_shapes(exported)[0][0]
    runs = [shapes]
    dynamic = [v.name for v in exported.graph.input if v.type.tensor_type.shape.dim
               and not v.type.tensor_type.shape.dim[0].HasField("dim_value")]
    if dynamic:
        runs.append({k: (2, *s[1:]) if k in dynamic else s for k, s in shapes.items()})
    result = {name: {"max_abs": 0.0, "mismatched": 0, "error": None} for name in paths if name != "exported"}
    for index, run in enumerate(runs):
        feeds = random_feeds(exported, shapes=run, seed=11 + index)
        reference = run_onnxruntime(paths["exported"], feeds)
        for name, entry in result.items():
            if entry["error"]:
                continue
            try:
                got = run_onnxruntime(paths[name], feeds)
                if sorted(got) != sorted(reference):
                    entry["error"] = f"outputs {sorted(got)} != exported {sorted(reference)}"
                    continue
                for out, ref in reference.items():
                    err = compare_outputs(got[out], ref, atol=ATOL, rtol=RTOL)
                    entry["max_abs"] = max(entry["max_abs"], err["max_abs"])
                    entry["mismatched"] += err["mismatched"]
            except Exception as exc:  # one graph failing to run is a result, not a crash
                entry["error"] = one_line(exc, with_type=True)
    for entry in result.values():
        entry["identical"] = entry["error"] is None and entry["mismatched"] == 0
    return {"input_shapes": {k: list(v) for k, v in shapes.items()}, **result}


def _export_coverage(name: str, path: Path, record: dict, save) -> None:
    """Prune a coverage model with ours and export it with ``export_onnx``."""
    import torch

    from trt_prune.exporter import export_onnx
    from trt_prune.pruning import prune

    torch.manual_seed(0)
    entry = prune_coverage._registry()[name]
    model = entry.build().eval()
    example = torch.rand(entry.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        n_out = len(prune_coverage._flat_shapes(model(example)))
    record.update(family=entry.family, input_shape=list(entry.shape), stage="prune")
    save()
    pruned = prune(model, entry.shape, ratio=RATIO, round_to=ROUND_TO).model.eval()
    record["stage"] = "export"
    save()
    names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
    started = time.perf_counter()
    exported = export_onnx(pruned, path, entry.shape, output_names=names)
    record["export"] = {"exporter": exported.exporter, "seconds": round(time.perf_counter() - started, 1),
                        "fallback_reason": exported.fallback_reason}


def _export_torchscript(name: str, path: Path, record: dict) -> None:
    """torchvision ``model`` through the TorchScript exporter at ``opset``, BatchNorm kept, dynamic N/H/W."""
    import warnings

    import torch
    import torchvision

    model_name, opset = TORCHSCRIPT[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    record.update(family=f"torchscript opset {opset}, BatchNorm kept", input_shape=[1, 3, 224, 224],
                  stage="export")
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=opset,
                          do_constant_folding=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch"}})
    record["export"] = {"exporter": f"torchscript (opset {opset})", "seconds": round(time.perf_counter() - started, 1),
                        "fallback_reason": None}


def run_model(name: str, result_path: Path, mem_gib: float, keep: Path | None, pg_timeout: float) -> None:
    """Worker: export (pruned, or TorchScript), clean three ways, compare; writes ``result_path`` after every
    stage."""
    cap = int(mem_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    record: dict = {"model": name, "stage": "build"}

    def save():
        result_path.write_text(json.dumps(record, indent=1))

    save()
    from trt_prune.cleaner import clean_onnx
    from trt_prune.onnx_io import one_line

    with tempfile.TemporaryDirectory(prefix="clean_vs_pg_") as tmp:
        folder = Path(tmp)
        paths = {"exported": folder / "exported.onnx", **{k: folder / f"{k}.onnx" for k in CLEANERS}}
        if name in TORCHSCRIPT:
            _export_torchscript(name, paths["exported"], record)
        else:
            _export_coverage(name, paths["exported"], record, save)
        record["nodes"] = {"exported": sum(_ops(paths["exported"]).values())}
        record["stage"] = "clean"
        save()

        try:
            started = time.perf_counter()
            clean_onnx(paths["exported"], folder / "ours_noparity.onnx", check_parity=False)
            passes_s = time.perf_counter() - started
            started = time.perf_counter()
            ours = clean_onnx(paths["exported"], paths["ours"])
            record["ours"] = {"ok": True, "seconds": round(passes_s, 2),
                              "seconds_with_parity": round(time.perf_counter() - started, 2),
                              "input_shapes": ours.input_shapes,
                              "passes": [{k: p[k] for k in ("name", "nodes_before", "nodes_after", "detail")}
                                         for p in ours.passes]}
        except Exception as exc:
            record["ours"] = {"ok": False, "error": one_line(exc, with_type=True)}
        record["stage"] = "polygraphy"
        save()
        record["polygraphy"] = _polygraphy(paths["exported"], paths["polygraphy"], pg_timeout)
        record["stage"] = "onnxslim"
        save()
        record["onnxslim"] = _onnxslim(paths["exported"], paths["onnxslim"])
        record["stage"] = "parity"
        save()

        for key in CLEANERS:
            if record[key]["ok"]:
                record["nodes"][key] = sum(_ops(paths[key]).values())
            else:
                paths.pop(key)
        if "ours" in paths:
            mine = _ops(paths["ours"])
            record["more_in_ours"] = {k: dict(mine - _ops(paths[k])) for k in ("polygraphy", "onnxslim") if k in paths}
        record["parity"] = _parity(paths)
        if name in TORCHSCRIPT:  # a file another exporter wrote: profile it as a user would, before and after
            record["stage"] = "profile"
            save()
            record["profile"] = {key: _profile(paths[key]) for key in ("exported", "ours") if key in paths}
        if keep is not None:
            target = keep / name.replace(":", "_")
            target.mkdir(parents=True, exist_ok=True)
            for key, path in paths.items():
                shutil.copy2(path, target / f"{key}.onnx")
    record["stage"] = "done"
    save()


def _profile(path: Path) -> dict:
    """``trt_prune.profile`` of ``path`` on ONNX Runtime (1 thread, 1x3x224x224, a short run): latency and how
    many profiled layers map to a module path (the top-level module, for an op its forward runs itself)."""
    from trt_prune.onnx_io import one_line
    from trt_prune.stages import profile

    try:
        result = profile(path, "onnxruntime", input_shape=(1, 3, 224, 224), warmup_s=0.5, iterations=20,
                         min_duration_s=0.0, threads=1, layer_runs=5)
    except Exception as exc:
        return {"ok": False, "error": one_line(exc, with_type=True)}
    rows = result.per_layer
    return {"ok": True, "p50_ms": round(result.latency_ms["p50"], 3), "layers": len(rows),
            "mapped": sum(1 for r in rows if r.get("module") is not None)}


# ---------------------------------------------------------------------------------------------------- driver
def _spawn(name: str, timeout: float, mem_gib: float, tmp: Path, keep: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(tmp / "result.json"),
           "--mem-gib", str(mem_gib), "--timeout", str(timeout)]
    if keep is not None:
        cmd += ["--keep", str(keep)]
    return prune_coverage.spawn_worker(cmd, {"model": name}, timeout, tmp, tail_chars=250)


def verdict(r: dict) -> str:
    """``ok`` (ours <= Polygraphy's and onnxslim's nodes, all identical to the export), ``worse``, or
    ``failed``."""
    nodes, parity = r.get("nodes", {}), r.get("parity", {})
    if r.get("stage") != "done" or any(k not in nodes for k in CLEANERS):
        return "failed"
    if not all(parity.get(k, {}).get("identical") for k in CLEANERS):
        return "failed"
    return "ok" if nodes["ours"] <= min(nodes["polygraphy"], nodes["onnxslim"]) else "worse"


def _cell_parity(p: dict | None) -> str:
    if not p:
        return "—"
    if p.get("error"):
        return "✗ " + p["error"][:60].replace("|", "/")
    return ("✓ " if p["identical"] else f"✗ {p['mismatched']} off, ") + f"{p['max_abs']:.1e}"


def _diff(ops: dict | None) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted((ops or {}).items())) or "—"


def _error(r: dict) -> str:
    for key in ("error", *CLEANERS):
        value = r.get(key)
        text = value.get("error") if isinstance(value, dict) else value
        if text:
            return (key + ": " if key != "error" else "") + text
    return "parity"


def markdown(results: dict, env: dict, command: str) -> str:
    v = env["versions"]
    lines = [
        "# Graph cleaning: trt_prune clean vs Polygraphy sanitize --fold-constants vs onnxslim",
        "",
        f"Load average at start {env['load_avg'][0]:.1f}. torch {v['torch']}, torchvision {v['torchvision']}, onnx "
        f"{v['onnx']}, onnxruntime {v['onnxruntime']}, onnx-graphsurgeon {v['onnx_graphsurgeon']}, polygraphy "
        f"{v['polygraphy']}, onnxslim {v['onnxslim']}.",
        "",
        f"Coverage models: pruned with ours (ratio {RATIO}, round_to {ROUND_TO}, random weights), exported "
        "(`export_onnx`, default exporter). `ts11:`/`ts13:` models: torchvision, random weights, not pruned, "
        "TorchScript exporter at opset 11/13 without constant folding (BatchNorm kept), dynamic batch, height and "
        "width. Each export cleaned by `clean_onnx` (default passes), by `polygraphy surgeon sanitize "
        "--fold-constants` and by `onnxslim.slim`. Nodes: exported / ours / Polygraphy's / onnxslim's. Outputs: "
        "each cleaned graph against the export in ONNX Runtime (seeded inputs at the size `clean_onnx` chooses, "
        f"batch 1 and 2; atol {ATOL}, rtol {RTOL}; ✓ = identical within that, max abs shown). Seconds: ours = the "
        "passes (no parity check), ours+check = with `clean_onnx`'s own parity check, Polygraphy = CLI wall time "
        f"(a new process), onnxslim = its Python call. Command: `{command}`",
        "",
        "| model | exporter | exported | ours | polygraphy | onnxslim | ours ≤ both | ours outputs | pg outputs | "
        "slim outputs | more in ours than pg | more in ours than slim | ours s | ours+check s | pg s | slim s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        nodes, parity, more = r.get("nodes", {}), r.get("parity", {}), r.get("more_in_ours", {})
        cell = {"ok": "yes", "worse": "**no**", "failed": "✗ " + _error(r)[:120]}[verdict(r)]
        lines.append("| " + " | ".join([
            name, (r.get("export") or {}).get("exporter", "—"),
            *(str(nodes.get(k, "—")) for k in ("exported", *CLEANERS)), cell.replace("|", "/"),
            *(_cell_parity(parity.get(k)) for k in CLEANERS), *(_diff(more.get(k)) for k in ("polygraphy", "onnxslim")),
            str((r.get("ours") or {}).get("seconds", "—")), str((r.get("ours") or {}).get("seconds_with_parity", "—")),
            str((r.get("polygraphy") or {}).get("seconds", "—")), str((r.get("onnxslim") or {}).get("seconds", "—"))])
            + " |")
    profiled = {name: r["profile"] for name, r in results.items() if r.get("profile")}
    if profiled:
        lines += ["", "`trt-prune profile` on the TorchScript files as exported and as cleaned (ONNX Runtime, "
                  "1 thread, 1×3×224×224, 20 timed runs): p50 ms, and profiled layers mapped to a module path (the "
                  "top-level module counts, for an op its own forward runs).", "",
                  "| model | exported p50 ms | exported layers mapped | cleaned p50 ms | cleaned layers mapped |",
                  "|---|---|---|---|---|"]
        for name, prof in profiled.items():
            cells = []
            for key in ("exported", "ours"):
                p = prof.get(key) or {}
                cells += ([f"{p['p50_ms']:.2f}", f"{p['mapped']}/{p['layers']}"] if p.get("ok")
                          else ["✗ " + str(p.get("error", "not run"))[:80], "—"])
            lines.append("| " + " | ".join([name, *cells]) + " |")
    lines += ["", summary(results)]
    return "\n".join(lines) + "\n"


def summary(results: dict) -> str:
    verdicts = Counter(verdict(r) for r in results.values())
    compared = [r for r in results.values() if verdict(r) != "failed"]
    total = {k: sum(r["nodes"][k] for r in compared) for k in ("exported", *CLEANERS)}
    parts = [f"{len(results)} models; ours ≤ Polygraphy and ≤ onnxslim on {verdicts['ok']} of {len(compared)} "
             f"compared ({sum(r['nodes']['ours'] < r['nodes']['polygraphy'] for r in compared)} fewer nodes than "
             f"Polygraphy, {sum(r['nodes']['ours'] < r['nodes']['onnxslim'] for r in compared)} fewer than "
             "onnxslim), outputs identical for all compared",
             f"nodes over the compared models: exported {total['exported']}, ours {total['ours']}, Polygraphy "
             f"{total['polygraphy']}, onnxslim {total['onnxslim']}"]
    worse = [f"{r['model']} ({r['nodes']['ours']} vs {r['nodes']['polygraphy']} / {r['nodes']['onnxslim']})"
             for r in compared if verdict(r) == "worse"]
    failed = [r["model"] for r in results.values() if verdict(r) == "failed"]
    if worse:
        parts.append("ours more nodes: " + ", ".join(worse))
    if failed:
        parts.append("failed: " + ", ".join(failed))
    return "Summary: " + "; ".join(parts) + "."


def versions() -> dict:
    """Versions of the libraries the numbers depend on, and the load average (the stamp has the machine)."""
    from importlib import metadata

    found = {}
    for dist in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnx_graphsurgeon", "polygraphy", "onnxslim"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return {"versions": found, "load_avg": list(os.getloadavg())}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        p = argparse.ArgumentParser()
        p.add_argument("--worker", nargs=2, metavar=("MODEL", "RESULT"))
        p.add_argument("--mem-gib", type=float, default=12.0)
        p.add_argument("--timeout", type=float, default=600.0)
        p.add_argument("--keep", type=Path)
        a = p.parse_args(argv)
        run_model(a.worker[0], Path(a.worker[1]), a.mem_gib, a.keep, a.timeout)
        return

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated subset (default: all 39); e.g. resnet50,ts11:resnet50")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    p.add_argument("--mem-gib", type=float, default=12.0, help="address-space cap per model, GiB")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results",
                   help=f"where {NAME}.json and {NAME}.md go")
    p.add_argument("--keep", type=Path, help="keep each model's ONNX files under this folder")
    p.add_argument("--update", action="store_true", help="keep the stored records, replace the models run now")
    args = p.parse_args(argv)
    known = _models()
    names = known if not args.models else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown model(s) {unknown}; valid: {', '.join(known)}")

    from trt_prune.provenance import write_result

    env = versions()
    command = "python bench/clean_vs_polygraphy.py " + " ".join(argv)
    results: dict[str, dict] = {}
    stored = args.results_dir / f"{NAME}.json"
    if args.update:
        try:
            results = json.loads(stored.read_text())["results"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            p.error(f"--update: cannot read results from {stored} ({exc})")
    keep = args.keep.resolve() if args.keep else None

    def data() -> dict:
        return {**env, "command": command, "results": results,
                "settings": {"ratio": RATIO, "round_to": ROUND_TO, "atol": ATOL, "rtol": RTOL,
                             "timeout_s": args.timeout, "mem_gib": args.mem_gib}}

    with tempfile.TemporaryDirectory(prefix="clean_vs_pg_") as tmp:
        for name in names:
            record = _spawn(name, args.timeout, args.mem_gib, Path(tmp), keep)
            record["run_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            results[name] = record
            nodes = record.get("nodes", {})
            print(f"{name:32s} {verdict(record):6s} nodes " + " / ".join(str(nodes.get(k, "—")) for k in
                                                                         ("exported", *CLEANERS))
                  + f"  [{record['wall_s']} s] {record.get('error', '')}", flush=True)
            write_result(NAME, data(), results_dir=args.results_dir, folder=ROOT)  # a cut-short run keeps its rows
    text = markdown(results, env, command)
    write_result(NAME, data(), text, results_dir=args.results_dir, folder=ROOT)
    print()
    print(text)


if __name__ == "__main__":
    main()
