"""The profile report: a performance summary, plots, per-layer tables and a side-by-side comparison.

Everything here is a pure function of the JSON dict of a :class:`~trt_prune.profiling.profile.ProfileResult`
(``ProfileResult.to_dict()``, or a file written by ``trt-prune profile -o``), so a report can be made long after
the run, on a machine without the backend that produced it. Nothing here imports a backend.

The HTML page is one self-contained file that opens offline: plots are inlined as ``data:`` URIs and there is
no external stylesheet, script or font. Plots are drawn on matplotlib's Agg canvas directly (no ``pyplot``), so
rendering never touches global figure state or needs a display.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trt_prune.artifacts import atomic_path, ensure_output_dir, write_text
from trt_prune.errors import ProfileError
from trt_prune.profiling.aggregate import AGGREGATE_KEYS, ROOT, aggregate_layers

REQUIRED_KEYS = ("backend", "batch", "latency_ms", "per_layer", "throughput_ips")
REQUIRED_LATENCY = ("p50", "p90", "p95", "p99", "mean", "std", "min", "max", "cv", "n")
REQUIRED_LAYER = ("name", "op", "ms")
PNG_NAMES = {"histogram": "latency_histogram.png", "layers": "top_layers.png", "compare": "compare_layers.png"}
MAX_LABEL = 48  # characters of a module path on a plot axis; longer ones keep their (more specific) tail
DASH = "–"


# ---------------------------------------------------------------- input


def check_profile(profile: Any, what: str = "profile") -> dict[str, Any]:
    """Return ``profile`` if it looks like a ProfileResult dict, else raise :class:`ProfileError` naming what
    is missing, so a wrong file fails before any work instead of as a ``KeyError`` halfway through a page."""
    hint = "pass ProfileResult.to_dict() or a JSON file written by 'trt-prune profile -o FILE.json'"
    if not isinstance(profile, Mapping):
        raise ProfileError(f"{what} is a {type(profile).__name__}, not a profile; {hint}")
    missing = [k for k in REQUIRED_KEYS if k not in profile]
    if missing:
        raise ProfileError(f"{what} is not a profile: it lacks {missing} (it has {sorted(profile)[:12]}); {hint}")
    latency = profile["latency_ms"]
    if not isinstance(latency, Mapping):
        raise ProfileError(f"{what}: 'latency_ms' is a {type(latency).__name__}, expected a dict; {hint}")
    missing = [k for k in REQUIRED_LATENCY if not isinstance(latency.get(k), (int, float))]
    if missing:
        raise ProfileError(f"{what}: 'latency_ms' lacks numbers for {missing}; {hint}")
    rows = profile["per_layer"]
    if not isinstance(rows, list):
        raise ProfileError(f"{what}: 'per_layer' is a {type(rows).__name__}, expected a list of rows; {hint}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping) or any(k not in row for k in REQUIRED_LAYER) \
                or not isinstance(row["ms"], (int, float)):
            raise ProfileError(f"{what}: per_layer[{i}] is {str(row)[:120]!r}; each row needs "
                               f"{list(REQUIRED_LAYER)} with a number for 'ms'; {hint}")
    return dict(profile)


def load_profile(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a profile JSON file; any problem (missing, unreadable, not JSON, not a profile) is one
    :class:`ProfileError` that names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ProfileError(f"cannot read profile '{path}' ({reason}); give a JSON file written by "
                           f"'trt-prune profile -o FILE.json'") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile '{path}' is not JSON ({exc.msg} at line {exc.lineno}); give a file "
                           f"written by 'trt-prune profile -o FILE.json'") from exc
    return check_profile(data, what=f"profile '{path}'")


# ---------------------------------------------------------------- formatting


def format_ms(value: float | None) -> str:
    """Milliseconds with precision that suits their size: ``5.264``, ``0.0130``, ``1234.5``."""
    if value is None:
        return DASH
    value = float(value)
    if abs(value) >= 1000:
        return f"{value:.1f}"
    if abs(value) >= 1 or value == 0:
        return f"{value:.3f}"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.2e}"


def _percent(fraction: float | None) -> str:
    return DASH if fraction is None else f"{fraction * 100:.1f} %"


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def layer_key(row: Mapping[str, Any]) -> str:
    """What a layer is matched and labelled by: its PyTorch module path, else (no module) the backend's layer
    name. Module paths survive pruning and re-export; backend layer names often do not."""
    module = row.get("module")
    if module is None:
        return str(row["name"])
    return module or ROOT


# ---------------------------------------------------------------- summary


def per_layer_share(profile: Mapping[str, Any]) -> str | None:
    """The sentence comparing the summed per-layer times with the end-to-end mean latency, or None when the
    profile has no per-layer times."""
    rows = profile.get("per_layer") or []
    if not rows:
        return None
    total = profile.get("per_layer_sum_ms")
    total = float(total) if total is not None else sum(float(r["ms"]) for r in rows)
    mean = float(profile["latency_ms"]["mean"])
    share = total / mean if mean > 0 else None
    text = (f"per-layer sum {format_ms(total)} ms = {_percent(share)} of the mean end-to-end latency "
            f"{format_ms(mean)} ms")
    run = profile.get("per_layer_run_ms")
    if share is not None and abs(share - 1) <= 0.10:
        run_note = f" whose mean was {format_ms(run)} ms" if run is not None else ""
        return text + f" (within ±10 %; per-layer times come from a separate instrumented run{run_note})"
    if run is not None and run > 0 and share is not None:
        # outside ±10 %: say which of the two effects it is, with the numbers
        return (text + f": outside ±10 % because the per-layer times come from a separate instrumented run, "
                f"whose mean was {format_ms(run)} ms ({_percent(run / mean)} of the timed run), and the layers "
                f"cover {_percent(total / run)} of that run (the rest: gaps between layers, copies, the runtime)")
    where = "a separate instrumented run" + (f" whose mean was {format_ms(run)} ms" if run is not None else "")
    return (text + f" (per-layer times come from {where}, so the two need not agree: end to end also covers "
            "gaps between layers and copies, per layer carries the instrumentation)")


BREAKDOWN_PHASES = (("latency", "Latency (H2D + compute + D2H)"), ("enqueue", "Enqueue time"),
                    ("h2d", "H2D"), ("gpu_compute", "GPU compute"), ("d2h", "D2H"))


def breakdown_rows(breakdown: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """trtexec's per-phase lines (``min / max / mean / median / p90 / p95 / p99`` in ms) for a TensorRT
    profile's ``breakdown``; no rows when there is none or it is malformed (older files, other backends)."""
    if not isinstance(breakdown, Mapping):
        return []
    rows = []
    qps = breakdown.get("throughput_qps")
    if isinstance(qps, (int, float)):
        rows.append(("Throughput (trtexec)", f"{qps:.1f} qps over {breakdown.get('iterations', '?')} iterations "
                                             f"({breakdown.get('throughput_basis', 'host wall time')}"
                                             f"{', CUDA graph' if breakdown.get('cuda_graph') else ''})"))
    for key, label in BREAKDOWN_PHASES:
        phase = breakdown.get(key)
        if not isinstance(phase, Mapping) or not all(isinstance(phase.get(k), (int, float))
                                                     for k in ("min", "max", "mean", "median", "p90", "p95", "p99")):
            continue
        rows.append((label, "min {} / max {} / mean {} / median {} / p90 {} / p95 {} / p99 {} ms".format(
            *(format_ms(phase[k]) for k in ("min", "max", "mean", "median", "p90", "p95", "p99")))))
    rows += [("Warning", str(w)) for w in breakdown.get("warnings") or []]
    return rows


def summary_rows(profile: Mapping[str, Any]) -> list[tuple[str, str]]:
    """A trtexec-like performance summary as ``(label, value)`` rows: throughput, latency statistics, batch and
    shapes, backend and environment, the stability warning and the per-layer share of the latency."""
    profile = check_profile(profile)
    lat = profile["latency_ms"]
    env = profile.get("env") or {}
    batch = profile["batch"]
    ips = float(profile["throughput_ips"])
    images = profile.get("throughput_images_s", ips * batch)
    rows: list[tuple[str, str]] = []
    if profile.get("onnx"):
        rows.append(("Model", str(profile["onnx"])))
    backend = str(profile["backend"])
    if env.get("backend_version"):
        backend += f" {env['backend_version']}"
    details = [", ".join(env["providers"])] if env.get("providers") else []
    details += [str(env[k]) for k in ("graph_optimization_level",) if env.get(k)]
    if details:
        backend += f" ({'; '.join(details)})"
    rows.append(("Backend", backend))
    rows.append(("Batch", str(batch)))
    shapes = profile.get("input_shapes") or {}
    if shapes:
        rows.append(("Input shapes", ", ".join(f"{n} {_shape(s)}" for n, s in shapes.items())))
    rows.append(("Throughput", f"{ips:.1f} inferences/s = {float(images):.1f} images/s "
                               f"(batch {batch}, one call in flight, from the mean latency)"))
    rows += [
        ("Latency min", f"{format_ms(lat['min'])} ms"),
        ("Latency max", f"{format_ms(lat['max'])} ms"),
        ("Latency mean", f"{format_ms(lat['mean'])} ms"),
        ("Latency median (p50)", f"{format_ms(lat['p50'])} ms"),
        ("Latency p90", f"{format_ms(lat['p90'])} ms"),
        ("Latency p95", f"{format_ms(lat['p95'])} ms"),
        ("Latency p99", f"{format_ms(lat['p99'])} ms"),
        ("Latency std", f"{format_ms(lat['std'])} ms"),
        ("Coefficient of variation", _percent(lat["cv"])),
        ("Samples", str(int(lat["n"]))),
    ]
    if profile.get("cv_warning"):
        rows.append(("Warning", str(profile["cv_warning"])))
    rows += breakdown_rows(profile.get("breakdown"))
    share = per_layer_share(profile)
    rows.append(("Per-layer vs end-to-end", share or "per-layer times were not collected"))
    if env.get("cpu"):
        cores = f" ({env['usable_cores']} of {env['cpu_count']} cores usable)" if env.get("cpu_count") else ""
        rows.append(("CPU", f"{env['cpu']}{cores}"))
    if env.get("gpu"):
        clocks = [f"{label} {env[k]}" for label, k in (("SM", "gpu_sm_clock"), ("memory", "gpu_mem_clock"))
                  if env.get(k)]
        cc = [f"compute capability {env['compute_capability']}"] if env.get("compute_capability") else []
        extra = ", ".join(cc + ([f"clocks {' / '.join(clocks)}"] if clocks else []))
        rows.append(("GPU", f"{env['gpu']}" + (f" ({extra})" if extra else "")))
    if env.get("threads") is not None:
        rows.append(("Threads", str(env["threads"])))
    versions = [f"{name} {env[key]}" for name, key in
                (("trt_prune", "trt_prune"), ("numpy", "numpy"), ("onnxruntime", "onnxruntime"),
                 ("python", "python")) if env.get(key)]
    if versions:
        rows.append(("Versions", ", ".join(versions)))
    if env.get("platform"):
        rows.append(("Platform", str(env["platform"])))
    return rows


# ---------------------------------------------------------------- comparison


def _sum_by_key(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, list[str]]]:
    out: dict[str, tuple[float, list[str]]] = {}
    for row in rows:
        key = layer_key(row)
        ms, ops = out.get(key, (0.0, []))
        if str(row["op"]) not in ops:
            ops = [*ops, str(row["op"])]
        out[key] = (ms + float(row["ms"]), ops)
    return out


def compare_layers(base: Mapping[str, Any], other: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Layer by layer side by side: ``{key, op, base_ms, other_ms, delta_ms, ratio}`` rows.

    Rows match by :func:`layer_key` (module path, else layer name), summing the rows of one profile that share
    a key (a backend may split one module over several kernels). ``delta_ms = other_ms - base_ms`` and
    ``ratio = other_ms / base_ms``; both are None when a side lacks the key (and ``ratio`` when ``base_ms`` is
    0). Sorted by how much each row changes the total: ``|delta_ms|``, or the present side's time for a layer
    only one side has (it vanished or appeared whole), largest first.
    """
    a = _sum_by_key(check_profile(base, "base profile")["per_layer"])
    b = _sum_by_key(check_profile(other, "other profile")["per_layer"])
    rows = []
    for key in list(a) + [k for k in b if k not in a]:
        base_ms, base_ops = a.get(key, (None, []))
        other_ms, other_ops = b.get(key, (None, []))
        ops = base_ops + [o for o in other_ops if o not in base_ops]
        both = base_ms is not None and other_ms is not None
        rows.append({"key": key, "op": "+".join(ops), "base_ms": base_ms, "other_ms": other_ms,
                     "delta_ms": (other_ms - base_ms) if both else None,
                     "ratio": (other_ms / base_ms) if both and base_ms > 0 else None})

    def change(row: dict[str, Any]) -> float:
        if row["delta_ms"] is not None:
            return abs(row["delta_ms"])
        return row["base_ms"] if row["base_ms"] is not None else row["other_ms"]

    return sorted(rows, key=lambda r: (-change(r), r["key"]))


def compare_totals(base: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """End-to-end and per-layer totals of two profiles: ``{metric: {base, other, delta, ratio}}`` for the
    mean, p50 and p99 latency, throughput and the per-layer sum, plus how many layer keys matched."""
    base = check_profile(base, "base profile")
    other = check_profile(other, "other profile")
    rows = compare_layers(base, other)

    def entry(x: float | None, y: float | None) -> dict[str, float | None]:
        both = x is not None and y is not None
        return {"base": x, "other": y, "delta": (y - x) if both else None,
                "ratio": (y / x) if both and x > 0 else None}

    def layer_sum(p: Mapping[str, Any]) -> float | None:
        return sum(float(r["ms"]) for r in p["per_layer"]) if p["per_layer"] else None

    out: dict[str, Any] = {
        f"latency_{k}_ms": entry(float(base["latency_ms"][k]), float(other["latency_ms"][k]))
        for k in ("mean", "p50", "p99")}
    out["throughput_ips"] = entry(float(base["throughput_ips"]), float(other["throughput_ips"]))
    out["per_layer_sum_ms"] = entry(layer_sum(base), layer_sum(other))
    out["layers"] = {"matched": sum(r["delta_ms"] is not None for r in rows),
                     "base_only": sum(r["other_ms"] is None for r in rows),
                     "other_only": sum(r["base_ms"] is None for r in rows)}
    return out


def profile_labels(base: Mapping[str, Any], other: Mapping[str, Any]) -> tuple[str, str]:
    """Short names for two profiles: their ONNX file stems, with the folder when the stems agree, else
    ``baseline`` and ``this profile``."""
    def names(p: Mapping[str, Any]) -> tuple[str, str]:
        path = Path(str(p.get("onnx") or ""))
        return path.stem, f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem

    (a1, a2), (b1, b2) = names(base), names(other)
    if a1 and b1 and a1 != b1:
        return a1, b1
    if a2 and b2 and a2 != b2:
        return a2, b2
    return "baseline", "this profile"


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    # No "Software" tag: the PNGs should carry the plot, not a URL or tool banner.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _label(text: str) -> str:
    return text if len(text) <= MAX_LABEL else "…" + text[-(MAX_LABEL - 1):]


def plot_histogram(profile: Mapping[str, Any]) -> bytes | None:
    """PNG of the latency samples with the p50 and p99 marked; None when the profile stores no samples
    (files written by ``trt-prune profile -o`` leave them out)."""
    samples = [float(s) for s in profile.get("samples_ms") or []]
    if not samples:
        return None
    import numpy as np

    lat = profile["latency_ms"]
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    bins = min(60, max(10, len(np.histogram_bin_edges(samples, bins="auto")) - 1))
    ax.hist(samples, bins=bins, color="#4c72b0", alpha=0.85)
    ax.axvline(lat["p50"], color="#2a9d8f", linestyle="--", label=f"p50 {format_ms(lat['p50'])} ms")
    ax.axvline(lat["p99"], color="#e76f51", linestyle=":", label=f"p99 {format_ms(lat['p99'])} ms")
    ax.set_xlabel(f"latency per inference call, ms ({profile['backend']}, batch {profile['batch']})")
    ax.set_ylabel("calls")
    ax.set_title(f"End-to-end latency of {len(samples)} calls")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _png_bytes(fig)


def plot_top_layers(profile: Mapping[str, Any], top: int = 20) -> bytes | None:
    """PNG of the ``top`` slowest layers as horizontal bars labelled by module path; None without layers."""
    rows = sorted(profile["per_layer"], key=lambda r: float(r["ms"]), reverse=True)[:top]
    if not rows:
        return None
    rows = rows[::-1]  # barh draws bottom-up; the slowest goes on top
    fig = _figure(8, 0.3 * len(rows) + 1.3)
    ax = fig.add_subplot()
    y = range(len(rows))
    ax.barh(list(y), [float(r["ms"]) for r in rows], color="#4c72b0")
    ax.set_yticks(list(y), [_label(layer_key(r)) + f" [{r['op']}]" for r in rows], fontsize=7)
    ax.set_xlabel("ms per inference (instrumented per-layer run)")
    ax.set_title(f"{len(rows)} slowest layers")
    ax.grid(axis="x", alpha=0.3)
    return _png_bytes(fig)


def plot_comparison(rows: Sequence[Mapping[str, Any]], labels: tuple[str, str] = ("base", "other"),
                    top: int = 20) -> bytes | None:
    """PNG of the ``top`` most changed layers of :func:`compare_layers`: grouped bars for both sides and,
    beside them, the change (other - base; a missing side counts as 0). None without rows."""
    rows = list(rows[:top])[::-1]
    if not rows:
        return None
    base = [r["base_ms"] or 0.0 for r in rows]
    other = [r["other_ms"] or 0.0 for r in rows]
    delta = [o - b for b, o in zip(base, other, strict=True)]
    fig = _figure(10, 0.32 * len(rows) + 1.5)
    left, right = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(rows)))
    left.barh([i + 0.2 for i in y], base, height=0.4, label=labels[0], color="#4c72b0")
    left.barh([i - 0.2 for i in y], other, height=0.4, label=labels[1], color="#dd8452")
    left.set_yticks(y, [_label(r["key"]) for r in rows], fontsize=7)
    left.set_xlabel("ms per inference")
    left.set_title(f"{len(rows)} most changed layers")
    left.legend(loc="lower right", fontsize=8)
    left.grid(axis="x", alpha=0.3)
    right.barh(y, delta, color=["#2a9d8f" if d <= 0 else "#e76f51" for d in delta])
    right.axvline(0, color="black", linewidth=0.8)
    right.set_xlabel(f"change, ms ({labels[1]} - {labels[0]})")
    right.set_title("faster (green) / slower (red)")
    right.grid(axis="x", alpha=0.3)
    return _png_bytes(fig)


def render_plots(profile: Mapping[str, Any], compare: Mapping[str, Any] | None = None,
                 top: int = 20) -> dict[str, bytes]:
    """Every plot of the report as PNG bytes by kind (``histogram``, ``layers``, ``compare``); kinds the data
    cannot support (no samples, no layers, nothing to compare) are left out."""
    profile = check_profile(profile)
    _check_top(top)
    pngs = {"histogram": plot_histogram(profile), "layers": plot_top_layers(profile, top)}
    if compare is not None:
        compare = check_profile(compare, "compare profile")
        pngs["compare"] = plot_comparison(compare_layers(compare, profile), profile_labels(compare, profile), top)
    return {k: v for k, v in pngs.items() if v is not None}


def write_profile_pngs(profile: Mapping[str, Any], out_dir: str | os.PathLike,
                       compare: Mapping[str, Any] | None = None, top: int = 20,
                       pngs: Mapping[str, bytes] | None = None) -> list[Path]:
    """Write the report's plots into ``out_dir`` (named as in :data:`PNG_NAMES`), each atomically; returns the
    paths written. ``pngs`` reuses plots already rendered by :func:`render_plots`."""
    out = ensure_output_dir(out_dir)
    if pngs is None:
        pngs = render_plots(profile, compare, top)
    written = []
    for kind, data in pngs.items():
        path = out / PNG_NAMES[kind]
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        written.append(path)
    return written


# ---------------------------------------------------------------- HTML

CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1150px;
padding:0 1em;color:#222}h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f2f2f2}td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4e0;border-left:4px solid #e9a23b;padding:.5em 1em}
.slower{color:#b33}.faster{color:#286}img{max-width:100%}figure{margin:1em 0}
figcaption{font-size:12px;color:#555}details{margin:.5em 0}"""


def _check_top(top: int) -> None:
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ProfileError(f"top must be a positive integer (rows in the layer tables), got {top!r}")


def _cell(value: Any, numeric: bool = False, css: str = "") -> str:
    classes = " ".join(c for c in ("n" if numeric else "", css) if c)
    attr = f' class="{classes}"' if classes else ""
    return f"<td{attr}>{html.escape(str(value))}</td>"


def _table(headers: Sequence[str] | None, rows: Sequence[Sequence[Any]], numeric: Sequence[int] = (),
           css: Sequence[Sequence[str]] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>" if headers else ""
    body = "".join(
        "<tr>" + "".join(_cell(v, i in numeric, css[r][i] if css else "") for i, v in enumerate(row)) + "</tr>"
        for r, row in enumerate(rows))
    return f"<table>{head}{body}</table>"


def _table_top(headers: Sequence[str], rows: Sequence[Sequence[Any]], top: int, numeric: Sequence[int] = (),
               css: Sequence[Sequence[str]] | None = None) -> str:
    """The first ``top`` rows, and all of them behind a ``<details>`` when there are more."""
    shown = _table(headers, rows[:top], numeric, css[:top] if css else None)
    if len(rows) <= top:
        return shown
    full = _table(headers, rows, numeric, css)
    return f"{shown}<details><summary>all {len(rows)} rows</summary>{full}</details>"


def _figure_html(png: bytes | None, alt: str, caption: str, missing: str) -> str:
    if png is None:
        return f"<p>{html.escape(missing)}</p>"
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _layer_section(profile: Mapping[str, Any], top: int, pngs: Mapping[str, bytes]) -> str:
    rows = sorted(profile["per_layer"], key=lambda r: float(r["ms"]), reverse=True)
    if not rows:
        return "<h2>Per-layer times</h2><p>This profile has no per-layer times (profiled without them).</p>"
    total = sum(float(r["ms"]) for r in rows)
    table_rows, running = [], 0.0
    for i, r in enumerate(rows, start=1):
        running += float(r["ms"])
        share = float(r["ms"]) / total if total > 0 else None
        module = DASH if r.get("module") is None else (r["module"] or ROOT)
        table_rows.append([i, r["name"], r["op"], module, format_ms(r["ms"]), _percent(share),
                           _percent(running / total if total > 0 else None)])
    parts = [f"<h2>Per-layer times</h2><p>{html.escape(per_layer_share(profile) or '')}.</p>",
             _figure_html(pngs.get("layers"), "slowest layers", f"The {min(top, len(rows))} slowest layers.", ""),
             f"<h3>{min(top, len(rows))} slowest of {len(rows)} layers</h3>",
             _table_top(["#", "layer", "op", "module", "ms", "share", "cumulative"], table_rows, top,
                        numeric=(0, 4, 5, 6))]
    for by in AGGREGATE_KEYS:
        agg = aggregate_layers(profile["per_layer"], by=by)
        parts.append(f"<h3>By {by}</h3>")
        parts.append(_table_top([by, "ms", "layers", "share"],
                                [[a["key"], format_ms(a["ms"]), a["count"], _percent(a["share"])] for a in agg],
                                top, numeric=(1, 2, 3)))
    return "".join(parts)


def _compare_section(profile: Mapping[str, Any], compare: Mapping[str, Any], top: int,
                     pngs: Mapping[str, bytes]) -> str:
    base_label, other_label = profile_labels(compare, profile)
    rows = compare_layers(compare, profile)
    totals = compare_totals(compare, profile)
    names = {"latency_mean_ms": "latency mean, ms", "latency_p50_ms": "latency p50, ms",
             "latency_p99_ms": "latency p99, ms", "throughput_ips": "throughput, inferences/s",
             "per_layer_sum_ms": "per-layer sum, ms"}
    total_rows = []
    for key, label in names.items():
        t = totals[key]
        fmt = (lambda v: DASH if v is None else f"{v:.1f}") if key == "throughput_ips" else format_ms
        total_rows.append([label, fmt(t["base"]), fmt(t["other"]), fmt(t["delta"]), _ratio(t["ratio"])])
    counts = totals["layers"]
    notes = []
    for field, what in (("backend", "backends"), ("batch", "batches")):
        if compare.get(field) != profile.get(field):
            notes.append(f"The two profiles differ in {what}: {compare.get(field)} vs {profile.get(field)}.")
    layer_rows, css = [], []
    for r in rows:
        delta = r["delta_ms"]
        layer_rows.append([r["key"], r["op"], format_ms(r["base_ms"]), format_ms(r["other_ms"]),
                           DASH if delta is None else f"{delta:+.4g}", _ratio(r["ratio"])])
        tone = "" if delta is None or delta == 0 else ("slower" if delta > 0 else "faster")
        css.append(["", "", "", "", tone, tone])
    intro = (f"Baseline <b>{html.escape(base_label)}</b> (the --compare profile) against <b>"
             f"{html.escape(other_label)}</b> (this profile). Layers match by PyTorch module path (else layer "
             f"name): {counts['matched']} matched, {counts['base_only']} only in the baseline, "
             f"{counts['other_only']} only in this profile. Change = this profile - baseline; ratio = this "
             f"profile / baseline.")
    return "".join([
        f"<h2>Comparison: {html.escape(base_label)} → {html.escape(other_label)}</h2><p>{intro}</p>",
        "".join(f'<p class="warn">{html.escape(n)}</p>' for n in notes),
        _table(["", base_label, other_label, "change", "ratio"], total_rows, numeric=(1, 2, 3, 4)),
        _figure_html(pngs.get("compare"), "most changed layers",
                     f"The {min(top, len(rows))} layers whose time changed most.", "No layers to compare."),
        "<h3>Layer by layer, most changed first</h3>",
        _table_top(["module (or layer)", "op", f"{base_label} ms", f"{other_label} ms", "change ms", "ratio"],
                   layer_rows, top, numeric=(2, 3, 4, 5), css=css),
    ])


def _env_section(profile: Mapping[str, Any], compare: Mapping[str, Any] | None) -> str:
    def env_table(p: Mapping[str, Any]) -> str:
        env = p.get("env") or {}
        return _table(["key", "value"], [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in env.items()])

    if compare is None:
        return f"<h2>Environment</h2>{env_table(profile)}"
    base_label, other_label = profile_labels(compare, profile)
    return (f"<h2>Environment</h2><h3>{html.escape(other_label)} (this profile)</h3>{env_table(profile)}"
            f"<h3>{html.escape(base_label)} (baseline)</h3>{env_table(compare)}")


def render_profile_html(profile: Mapping[str, Any], compare: Mapping[str, Any] | None = None, top: int = 20,
                        pngs: Mapping[str, bytes] | None = None) -> str:
    """The report page as a string (see :func:`write_profile_html`)."""
    profile = check_profile(profile)
    compare = check_profile(compare, "compare profile") if compare is not None else None
    _check_top(top)
    if pngs is None:
        pngs = render_plots(profile, compare, top)
    lat = profile["latency_ms"]
    model = Path(str(profile.get("onnx") or "model")).name
    title = f"Profile of {model} on {profile['backend']}"
    summary = _table(None, summary_rows(profile))
    warning = f'<p class="warn">{html.escape(profile["cv_warning"])}</p>' if profile.get("cv_warning") else ""
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in profile.get("notes") or [])
    histogram = _figure_html(
        pngs.get("histogram"), "latency histogram",
        f"{lat['n']} timed calls; dashed: p50 {format_ms(lat['p50'])} ms, dotted: p99 {format_ms(lat['p99'])} ms.",
        "No latency histogram: this profile stores no samples (files written by 'trt-prune profile -o' "
        "leave them out).")
    sections = [
        "<!doctype html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<h2>Summary</h2>{warning}{summary}",
        f"<ul>{notes}</ul>" if notes else "",
        f"<h2>Latency</h2>{histogram}",
        _layer_section(profile, top, pngs),
        _compare_section(profile, compare, top, pngs) if compare is not None else "",
        _env_section(profile, compare),
        "</body></html>\n",
    ]
    return "\n".join(s for s in sections if s)


def write_profile_html(profile: Mapping[str, Any], path: str | os.PathLike, compare: Mapping[str, Any] | None = None,
                       top: int = 20, png_dir: str | os.PathLike | None = None,
                       pngs: Mapping[str, bytes] | None = None) -> Path:
    """Write the profile report to ``path`` as one self-contained HTML file that opens offline.

    It holds the performance summary, the latency histogram, the ``top`` slowest layers (plot and table), times
    summed by module, op and stage, the environment and, with ``compare`` (a baseline profile dict, e.g. the
    dense model when ``profile`` is the pruned one), a side-by-side table and plot of how each layer changed.
    ``png_dir`` also receives the plots as PNG files; ``pngs`` reuses plots already drawn by
    :func:`render_plots`. The page is written atomically; a ``profile`` or ``compare`` that is not a profile
    raises :class:`ProfileError` before anything is written.
    """
    profile = check_profile(profile)
    compare = check_profile(compare, "compare profile") if compare is not None else None
    if pngs is None:
        pngs = render_plots(profile, compare, top)
    page = render_profile_html(profile, compare, top, pngs)
    if png_dir is not None:
        write_profile_pngs(profile, png_dir, compare, top, pngs=pngs)
    return write_text(path, page)
