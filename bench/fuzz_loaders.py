"""Fuzz every loader a user feeds a file to, with many more examples than the tests, and count the crashes.

The loaders, strategies and valid starting documents are those of ``tests/cpu/test_fuzz_loaders.py``
(:data:`LOADERS` there): ONNX files (``load_onnx`` and ``trt-prune inspect sparsity``), pruning recipes
(``apply_recipe``), ``model.json`` of a model folder (``load_model``), suite YAML (``load_suite``) and profile
JSON (``load_profile`` plus what ``profile --compare`` does with it). Each input either loads, is refused with a
``TrtPruneError`` (the contract), or crashes with anything else. Crashes are grouped by exception type and the
innermost trt_prune ``file:line`` they passed through; for each group the shortest input seen is kept.

Unlike the test, nothing stops at the first crash (and nothing is shrunk): every loader gets its ``--examples``
inputs, drawn by Hypothesis with a fixed seed so a rerun draws the same inputs.

Usage:
    python bench/fuzz_loaders.py [--examples 2000] [--loader load_suite ...] [--no-write]

Writes ``bench/results/fuzz_loaders.{json,md}`` through ``trt_prune.provenance.write_result``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "cpu" / "test_fuzz_loaders.py"
SEED = 20240601
MAX_INPUT_REPR = 400


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_loaders_strategies", TESTS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def fuzz(module, loader, fixtures, examples: int) -> dict[str, Any]:
    """Feed ``examples`` drawn inputs to ``loader``; count outcomes and group the crashes."""
    from hypothesis import HealthCheck, Phase, given, seed, settings

    from trt_prune.errors import TrtPruneError

    counts = {"inputs": 0, "loaded": 0, "refused": 0, "crashes": 0}
    crashes: dict[str, dict[str, Any]] = {}

    @seed(SEED)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(value=loader.strategy(fixtures))
    def run(value):
        counts["inputs"] += 1
        try:
            loader.feed(fixtures, value)
        except TrtPruneError as exc:
            counts["refused"] += 1
            if "\n" in str(exc):  # the CLI prints the message as one line: a multi-line one breaks that contract
                record_crash(f"multi-line {type(exc).__name__}", str(exc), exc, value)
        except Exception as exc:  # the point: anything that is not a TrtPruneError is a crash
            record_crash(type(exc).__name__, str(exc), exc, value)
        else:
            counts["loaded"] += 1

    def record_crash(kind: str, message: str, exc: BaseException, value: Any) -> None:
        counts["crashes"] += 1
        site = module.crash_site(exc)
        key = f"{kind} at {site}"
        text = repr(value)
        group = crashes.setdefault(key, {"exception": kind, "site": site, "count": 0,
                                         "message": "", "input": None, "input_chars": 0})
        group["count"] += 1
        if group["input"] is None or len(text) < group["input_chars"]:
            group["input"], group["input_chars"] = text[:MAX_INPUT_REPR], len(text)
            group["message"] = " ".join(message.split())[:200]

    started = time.perf_counter()
    run()
    return {"loader": loader.name, **counts, "seconds": round(time.perf_counter() - started, 1),
            "crash_groups": sorted(crashes.values(), key=lambda g: -g["count"])}


def markdown(records: list[dict[str, Any]], examples: int) -> str:
    lines = [f"# Loader fuzzing: {examples} drawn inputs per loader", "",
             "Each input loads, is refused with a `TrtPruneError` (the contract), or crashes with anything else. "
             "Inputs: random bytes, truncations and byte flips of a valid file, and valid documents with fields "
             "replaced, removed or added (strategies of `tests/cpu/test_fuzz_loaders.py`, fixed seed).", "",
             "| loader | inputs tried | loaded | refused (TrtPruneError) | crashes | crash sites | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['loader']} | {r['inputs']} | {r['loaded']} | {r['refused']} | {r['crashes']} | "
                     f"{len(r['crash_groups'])} | {r['seconds']} |")
    groups = [(r["loader"], g) for r in records for g in r["crash_groups"]]
    lines += ["", "## Crashes" if groups else "No crashes: every input loaded or was refused with a TrtPruneError."]
    for loader, g in groups:
        text = g["input"].replace("`", "'")
        lines += ["", f"- **{loader}**: `{g['exception']}` at `{g['site']}`, {g['count']} input(s): {g['message']}",
                  f"  - shortest input: `{text}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000, help="drawn inputs per loader (default 2000)")
    parser.add_argument("--loader", action="append", default=None,
                        help="only this loader (repeatable); names as in the table, e.g. load_suite")
    parser.add_argument("--no-write", action="store_true", help="print the table, write no result files")
    args = parser.parse_args()
    if args.examples < 1:
        parser.error(f"--examples must be at least 1, got {args.examples}")

    import tempfile

    module = _fuzz_module()
    chosen = module.LOADERS
    if args.loader:
        unknown = [n for n in args.loader if not any(loader.name.startswith(n) for loader in module.LOADERS)]
        if unknown:
            parser.error(f"unknown loader(s) {unknown}; choose from {[loader.name for loader in module.LOADERS]}")
        chosen = [loader for loader in module.LOADERS if any(loader.name.startswith(n) for n in args.loader)]
    warnings.simplefilter("ignore")  # the inputs are broken on purpose; their warnings are noise here
    records = []
    with tempfile.TemporaryDirectory(prefix="fuzz-loaders-") as tmp:
        fixtures = module.Fixtures(Path(tmp))
        for loader in chosen:
            record = fuzz(module, loader, fixtures, args.examples)
            records.append(record)
            print(f"{loader.name}: {record['inputs']} inputs, {record['crashes']} crashes in "
                  f"{len(record['crash_groups'])} site(s), {record['seconds']} s", flush=True)
    text = markdown(records, args.examples)
    print(text)
    if not args.no_write:
        from trt_prune.provenance import write_result

        data = {"examples_per_loader": args.examples, "seed": SEED, "loaders": records,
                "total": {k: sum(r[k] for r in records) for k in ("inputs", "loaded", "refused", "crashes")}}
        paths = write_result("fuzz_loaders", data, text, folder=ROOT)
        print(f"wrote {', '.join(str(p.relative_to(ROOT)) for p in paths.values())}")


if __name__ == "__main__":
    main()
