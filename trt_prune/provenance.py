"""Where a number came from: git commit, date and machine, stamped on every stored result.

Benchmark scripts write their results through :func:`write_result`, the regression store records
:func:`git_commit` and :func:`machine_info` with every run, and profiles carry :func:`machine_info` in their
``env``. Nothing here imports a backend or a numerical library beyond numpy.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path("bench") / "results"


def git_commit(folder: str | Path = ".") -> str | None:
    """HEAD of the git checkout around ``folder`` (``+dirty`` with uncommitted changes), None outside git.

    Changes under ``bench/results/`` do not count: they are the outputs being written, not the code that
    computed them (a script refreshing its own result file would otherwise mark itself uncommitted).
    ``TRT_PRUNE_COMMIT`` in the environment wins: the lent GPU machine gets a copy of the tree whose ``.git``
    can be older than the files beside it, so the caller names the commit it sent."""
    named = os.environ.get("TRT_PRUNE_COMMIT")
    if named:
        return named
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":(exclude){RESULTS_DIR.as_posix()}"], cwd=top, capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


GPU_QUERY = ("nvidia-smi", "--query-gpu=name,clocks.sm,clocks.mem", "--format=csv,noheader")
GPU_PROBE_TIMEOUT_S = 5.0


def parse_gpu_query(text: str) -> dict[str, str]:
    """``gpu``, ``gpu_sm_clock`` and ``gpu_mem_clock`` from the output of :data:`GPU_QUERY` (its first GPU,
    the one a session uses by default); ``{}`` when the text is not such output."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    parts = [p.strip() for p in first.split(",")]
    if len(parts) != 3 or not parts[0]:
        return {}
    return {"gpu": parts[0], "gpu_sm_clock": parts[1], "gpu_mem_clock": parts[2]}


def gpu_info() -> dict[str, str]:
    """GPU name and current clocks from ``nvidia-smi`` where it exists; ``{}`` on any failure.

    Clocks change with load and power state, so a GPU number without them is hard to compare. The probe must
    never cost a result: no binary, a hang (timeout), an error or odd output all give ``{}``.
    """
    exe = shutil.which(GPU_QUERY[0])
    if exe is None:
        return {}
    try:
        done = subprocess.run([exe, *GPU_QUERY[1:]], capture_output=True, text=True, timeout=GPU_PROBE_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_gpu_query(done.stdout) if done.returncode == 0 else {}


def _dist_version(*names: str) -> str | None:
    """Installed version of the first distribution found, read from metadata without importing it."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, OS, Python and package versions, plus the GPU and its clocks where ``nvidia-smi``
    answers: stored with every result so numbers keep their context."""
    from trt_prune import __version__

    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "usable_cores": usable, "platform": platform.platform(), "python": sys.version.split()[0],
        "numpy": np.__version__, "trt_prune": __version__}
    ort_version = _dist_version("onnxruntime", "onnxruntime-gpu")
    if ort_version:
        info["onnxruntime"] = ort_version
    return {**info, **gpu_info()}


def stamp(folder: str | Path = ".") -> dict[str, Any]:
    """``{commit, uncommitted, date, machine}`` for a result computed now from the checkout around ``folder``.

    ``uncommitted`` is True when tracked files differ from the commit: the numbers then come from code no
    commit holds, and the result says so.
    """
    commit = git_commit(folder)
    return {"commit": commit or "unknown", "uncommitted": bool(commit and commit.endswith("+dirty")),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info()}


def stamp_line(provenance: dict[str, Any]) -> str:
    """One line for the top of a Markdown result: commit (and whether it was uncommitted), date, machine."""
    machine = provenance.get("machine", {})
    where = machine.get("gpu") or machine.get("cpu") or "unknown machine"
    cores = machine.get("usable_cores")
    commit = provenance.get("commit", "unknown")
    if provenance.get("uncommitted"):
        commit = f"{commit} (uncommitted changes)"
    return (f"Commit {commit}, {provenance.get('date', '?')}, {where}"
            + (f" ({cores} cores)" if cores and not machine.get("gpu") else "") + ".")


def write_result(name: str, data: dict[str, Any], markdown: str | None = None,
                 results_dir: str | Path | None = None, folder: str | Path = ".") -> dict[str, Path]:
    """Write ``data`` as ``<results_dir>/<name>.json`` (with a ``provenance`` stamp) and, when given,
    ``markdown`` as ``<name>.md`` under a stamp line. Files are written atomically. Returns the paths.

    ``results_dir`` defaults to ``bench/results`` of the checkout around ``folder``.
    """
    from trt_prune.artifacts import json_default, write_text

    if results_dir is None:
        top = _checkout_root(folder)
        results_dir = (top or Path(folder)) / RESULTS_DIR
    results_dir = Path(results_dir)
    provenance = data.get("provenance") or stamp(folder)
    record = {"provenance": provenance, **{k: v for k, v in data.items() if k != "provenance"}}
    paths = {"json": write_text(results_dir / f"{name}.json",
                                json.dumps(record, indent=1, default=json_default) + "\n")}
    if markdown is not None:
        paths["md"] = write_text(results_dir / f"{name}.md", f"{stamp_line(provenance)}\n\n{markdown.rstrip()}\n")
    return paths


def _checkout_root(folder: str | Path) -> Path | None:
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(top) if top else None
