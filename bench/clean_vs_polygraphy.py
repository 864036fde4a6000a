"""Graph cleaning against Polygraphy's sanitize, on every model of the pruning coverage list.

For each model of ``bench/prune_coverage.py``'s registry (35 models: torchvision classifiers and detectors,
detector cores, timm families, the demo detector), random weights (seed 0) except the demo detector's shipped
ones: prune it with ours (``prune(model, shape, ratio=0.5, round_to=8)``), export it with ``export_onnx``
(default exporter, parity with torch checked), then clean the same exported file twice:

- ours: ``clean_onnx`` (its default passes, and its own parity check against the exported graph);
- Polygraphy: ``polygraphy surgeon sanitize <exported> --fold-constants -o <out>`` (the CLI, in a subprocess).

Recorded: node counts (exported / ours / Polygraphy's) and the op types each has more of, whether the three
graphs give the same outputs in ONNX Runtime (seeded random inputs at batch 1, and 2 when the batch is
dynamic; ``|x - exported| <= 1e-4 + 1e-3 * |exported|``, max abs shown), and seconds: ours with and without
its parity check (in the worker process, libraries already imported), Polygraphy's CLI wall time (a new
process: about 0.2 s of it is start-up). The target is ours <= Polygraphy's node count on every model, with
identical outputs.

Every model runs in its own subprocess under a wall-clock timeout and an address-space cap, so one failure is
recorded and the run goes on.

Usage:
    python bench/clean_vs_polygraphy.py [--models resnet18,timm:dla34] [--timeout 600] [--mem-gib 12]
        [--json OUT.json] [--markdown OUT.md] [--keep DIR] [--update]

``--keep DIR`` keeps each model's exported/ours/polygraphy ONNX files under ``DIR/<model>/``. ``--update``
starts from the records in ``--json`` and replaces the models run now.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import prune_coverage  # noqa: E402  (the coverage list lives there)

RATIO, ROUND_TO = 0.5, 8
ATOL, RTOL = 1e-4, 1e-3


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def _parity(paths: dict[str, Path]) -> dict:
    """Outputs of each cleaned graph against the exported one, on the same seeded inputs."""
    import onnx

    from trt_prune.onnx_io import compare_outputs, random_feeds, run_onnxruntime

    exported = onnx.load(str(paths["exported"]))
    dynamic = any(v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
                  for v in exported.graph.input)
    result = {name: {"max_abs": 0.0, "mismatched": 0, "error": None} for name in paths if name != "exported"}
    for batch in (1, 2) if dynamic else (1,):
        feeds = random_feeds(exported, batch=batch, seed=10 + batch)
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
                entry["error"] = _one_line(exc)
    for entry in result.values():
        entry["identical"] = entry["error"] is None and entry["mismatched"] == 0
    return result


def run_model(name: str, result_path: Path, mem_gib: float, keep: Path | None, pg_timeout: float) -> None:
    """Worker: prune, export, clean both ways, compare; writes ``result_path`` after every stage."""
    cap = int(mem_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    record: dict = {"model": name, "stage": "build"}

    def save():
        result_path.write_text(json.dumps(record, indent=1))

    save()
    import torch

    from trt_prune.cleaner import clean_onnx
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

    with tempfile.TemporaryDirectory(prefix="clean_vs_pg_") as tmp:
        folder = Path(tmp)
        paths = {"exported": folder / "exported.onnx", "ours": folder / "ours.onnx",
                 "polygraphy": folder / "polygraphy.onnx"}
        names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
        started = time.perf_counter()
        exported = export_onnx(pruned, paths["exported"], entry.shape, output_names=names)
        record["export"] = {"exporter": exported.exporter, "seconds": round(time.perf_counter() - started, 1),
                            "fallback_reason": exported.fallback_reason}
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
                              "passes": [{k: p[k] for k in ("name", "nodes_before", "nodes_after", "detail")}
                                         for p in ours.passes]}
            record["nodes"]["ours"] = ours.nodes_after
        except Exception as exc:
            record["ours"] = {"ok": False, "error": _one_line(exc)}
            paths.pop("ours")
        record["stage"] = "polygraphy"
        save()

        record["polygraphy"] = _polygraphy(paths["exported"], paths["polygraphy"], pg_timeout)
        if record["polygraphy"]["ok"]:
            record["nodes"]["polygraphy"] = sum(_ops(paths["polygraphy"]).values())
        else:
            paths.pop("polygraphy")
        record["stage"] = "parity"
        save()

        if "ours" in paths and "polygraphy" in paths:
            mine, theirs = _ops(paths["ours"]), _ops(paths["polygraphy"])
            record["ops_only_more_in_ours"] = dict(mine - theirs)
            record["ops_only_more_in_polygraphy"] = dict(theirs - mine)
        record["parity"] = _parity(paths)
        if keep is not None:
            target = keep / name.replace(":", "_")
            target.mkdir(parents=True, exist_ok=True)
            for key, path in paths.items():
                shutil.copy2(path, target / f"{key}.onnx")
    record["stage"] = "done"
    save()


# ---------------------------------------------------------------------------------------------------- driver
def _spawn(name: str, timeout: float, mem_gib: float, tmp: Path, keep: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(tmp / "result.json"),
           "--mem-gib", str(mem_gib), "--timeout", str(timeout)]
    if keep is not None:
        cmd += ["--keep", str(keep)]
    return prune_coverage.spawn_worker(cmd, {"model": name}, timeout, tmp, tail_chars=250)


def verdict(r: dict) -> str:
    """``ok`` (ours <= Polygraphy's nodes, both identical to the export), ``worse``, or ``failed``."""
    nodes, parity = r.get("nodes", {}), r.get("parity", {})
    if r.get("stage") != "done" or "ours" not in nodes or "polygraphy" not in nodes:
        return "failed"
    if not all(parity.get(k, {}).get("identical") for k in ("ours", "polygraphy")):
        return "failed"
    return "ok" if nodes["ours"] <= nodes["polygraphy"] else "worse"


def _cell_parity(p: dict | None) -> str:
    if not p:
        return "—"
    if p.get("error"):
        return "✗ " + p["error"][:60].replace("|", "/")
    return ("✓ " if p["identical"] else f"✗ {p['mismatched']} off, ") + f"{p['max_abs']:.1e}"


def _diff(ops: dict | None) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted((ops or {}).items())) or "—"


def markdown(results: dict, env: dict, command: str) -> str:
    v = env["versions"]
    lines = [
        "# Graph cleaning: trt_prune clean vs Polygraphy sanitize --fold-constants",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores ({env['usable_cores']} usable), {env['platform']}; "
        f"load average at start {env['load_avg'][0]:.1f}. Python {env['python']}, torch {v['torch']}, onnx "
        f"{v['onnx']}, onnxruntime {v['onnxruntime']}, onnx-graphsurgeon {v['onnx_graphsurgeon']}, polygraphy "
        f"{v['polygraphy']}. Commit {env['commit']}, {env['date']}.",
        "",
        f"Each model: pruned with ours (ratio {RATIO}, round_to {ROUND_TO}, random weights), exported "
        "(`export_onnx`, default exporter), then the same file cleaned by `clean_onnx` (default passes) and by "
        "`polygraphy surgeon sanitize --fold-constants`. Nodes: exported / ours / Polygraphy's. Outputs: each "
        f"cleaned graph against the exported one in ONNX Runtime (seeded inputs, batch 1 and 2; atol {ATOL}, "
        f"rtol {RTOL}; ✓ = identical within that, max abs shown). Seconds: ours = the passes (no parity "
        "check), ours+check = with `clean_onnx`'s own ONNX Runtime parity check, Polygraphy = CLI wall time "
        f"(a new process). Command: `{command}`",
        "",
        "| model | exporter | exported | ours | polygraphy | ours ≤ pg | ours outputs | pg outputs | more in ours | "
        "more in pg | ours s | ours+check s | pg s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        nodes, parity = r.get("nodes", {}), r.get("parity", {})
        verdict_cell = {"ok": "yes", "worse": "**no**", "failed": "✗ " + (r.get("error") or (
            r.get("ours", {}).get("error") or r.get("polygraphy", {}).get("error") or "parity"))[:120]}[verdict(r)]
        lines.append("| " + " | ".join([
            name, (r.get("export") or {}).get("exporter", "—"),
            *(str(nodes.get(k, "—")) for k in ("exported", "ours", "polygraphy")),
            verdict_cell.replace("|", "/"), _cell_parity(parity.get("ours")), _cell_parity(parity.get("polygraphy")),
            _diff(r.get("ops_only_more_in_ours")), _diff(r.get("ops_only_more_in_polygraphy")),
            str((r.get("ours") or {}).get("seconds", "—")), str((r.get("ours") or {}).get("seconds_with_parity", "—")),
            str((r.get("polygraphy") or {}).get("seconds", "—"))]) + " |")
    lines += ["", summary(results)]
    return "\n".join(lines) + "\n"


def summary(results: dict) -> str:
    verdicts = Counter(verdict(r) for r in results.values())
    compared = [r for r in results.values() if verdict(r) != "failed"]
    fewer = sum(r["nodes"]["ours"] < r["nodes"]["polygraphy"] for r in compared)
    equal = sum(r["nodes"]["ours"] == r["nodes"]["polygraphy"] for r in compared)
    worse = [f"{r['model']} ({r['nodes']['ours']} vs {r['nodes']['polygraphy']})" for r in compared
             if r["nodes"]["ours"] > r["nodes"]["polygraphy"]]
    failed = [r["model"] for r in results.values() if verdict(r) == "failed"]
    total = {k: sum(r["nodes"][k] for r in compared) for k in ("exported", "ours", "polygraphy")}
    parts = [f"{len(results)} models; ours ≤ Polygraphy on {verdicts['ok']} of {len(compared)} compared "
             f"({fewer} fewer nodes, {equal} equal), outputs identical for all compared",
             f"nodes over the compared models: exported {total['exported']}, ours {total['ours']}, "
             f"Polygraphy {total['polygraphy']}"]
    if worse:
        parts.append("ours more nodes: " + ", ".join(worse))
    if failed:
        parts.append("failed: " + ", ".join(failed))
    return "Summary: " + "; ".join(parts) + "."


def environment() -> dict:
    from importlib import metadata

    env = prune_coverage.environment()
    for dist in ("onnx_graphsurgeon", "polygraphy"):
        try:
            env["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env["versions"][dist] = None
    return env


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
    p.add_argument("--models", help="comma-separated subset (default: all 35); e.g. resnet50,timm:dla34")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    p.add_argument("--mem-gib", type=float, default=12.0, help="address-space cap per model, GiB")
    p.add_argument("--json", type=Path, default=ROOT / "bench/results/clean_vs_polygraphy.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "bench/results/clean_vs_polygraphy.md")
    p.add_argument("--keep", type=Path, help="keep each model's ONNX files under this folder")
    p.add_argument("--update", action="store_true", help="keep the records in --json, replace the models run now")
    args = p.parse_args(argv)
    registry = prune_coverage._registry()
    names = list(registry) if not args.models else [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown:
        p.error(f"unknown model(s) {unknown}; valid: {', '.join(registry)}")

    from trt_prune.artifacts import write_json, write_text

    env = environment()
    command = "python bench/clean_vs_polygraphy.py " + " ".join(argv)
    results: dict[str, dict] = {}
    if args.update:
        try:
            results = json.loads(args.json.read_text())["results"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            p.error(f"--update: cannot read results from {args.json} ({exc})")
    keep = args.keep.resolve() if args.keep else None
    with tempfile.TemporaryDirectory(prefix="clean_vs_pg_") as tmp:
        for name in names:
            record = _spawn(name, args.timeout, args.mem_gib, Path(tmp), keep)
            record["run_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            results[name] = record
            nodes = record.get("nodes", {})
            print(f"{name:32s} {verdict(record):6s} nodes {nodes.get('exported', '—')} / {nodes.get('ours', '—')} / "
                  f"{nodes.get('polygraphy', '—')}  [{record['wall_s']} s] {record.get('error', '')}", flush=True)
            write_json(args.json, {"environment": env, "command": command,
                                   "settings": {"ratio": RATIO, "round_to": ROUND_TO, "atol": ATOL, "rtol": RTOL,
                                                "timeout_s": args.timeout, "mem_gib": args.mem_gib},
                                   "results": results})
    text = markdown(results, env, command)
    write_text(args.markdown, text)
    print()
    print(text)


if __name__ == "__main__":
    main()
