"""The profile report: a performance summary, plots, per-layer tables and a side-by-side comparison, rendered.

This module only draws and writes: the numbers come from :mod:`trt_prune.profiling.compare` (reading and checking
profiles, comparing two of them, the per-layer share), which the regression gate and the CLI use without
matplotlib. Every function takes a :class:`~trt_prune.profiling.result.ProfileResult` or its dict
(``ProfileResult.to_dict()``, or a file written by ``trt-prune profile -o`` and read by
:func:`~trt_prune.profiling.compare.load_profile`), so a report can be made long after the run, on a machine
without the backend that produced it. Nothing here imports a backend.

The HTML page is one self-contained file that opens offline: plots are inlined as ``data:`` URIs and there is
no external stylesheet, script or font. Plots are drawn on matplotlib's Agg canvas directly (no ``pyplot``), so
rendering never touches global figure state or needs a display.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trt_prune.artifacts import atomic_path, ensure_output_dir, write_text
from trt_prune.errors import ProfileError
from trt_prune.profiling.aggregate import AGGREGATE_KEYS, ROOT, aggregate_layers
from trt_prune.profiling.compare import (
    DASH,
    as_profile,
    compare_layers,
    compare_totals,
    format_ms,
    format_percent,
    layer_key,
    per_layer_share,
    profile_labels,
)
from trt_prune.profiling.result import ProfileResult

PNG_NAMES = {"histogram": "latency_histogram.png", "layers": "top_layers.png", "compare": "compare_layers.png"}
MAX_LABEL = 48  # characters of a module path on a plot axis; longer ones keep their (more specific) tail
Profile = ProfileResult | Mapping[str, Any]  # what every function here takes: the record or its dict


def _ratio(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


# ---------------------------------------------------------------- summary


BREAKDOWN_PHASES = (("latency", "Latency (H2D + compute + D2H)"), ("enqueue", "Enqueue time"),
                    ("h2d", "H2D"), ("gpu_compute", "GPU compute"), ("d2h", "D2H"))


def _finite(value: Any) -> bool:
    try:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def breakdown_rows(breakdown: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """trtexec's per-phase lines (``min / max / mean / median / p90 / p95 / p99`` in ms) for a TensorRT
    profile's ``breakdown``; no rows when there is none or it is malformed (older files, other backends)."""
    if not isinstance(breakdown, Mapping):
        return []
    rows = []
    qps = breakdown.get("throughput_qps")
    if _finite(qps):
        rows.append(("Throughput (trtexec)", f"{qps:.1f} qps over {breakdown.get('iterations', '?')} iterations "
                                             f"({breakdown.get('throughput_basis', 'host wall time')}"
                                             f"{', CUDA graph' if breakdown.get('cuda_graph') else ''})"))
    for key, label in BREAKDOWN_PHASES:
        phase = breakdown.get(key)
        if not isinstance(phase, Mapping) or not all(_finite(phase.get(k))
                                                     for k in ("min", "max", "mean", "median", "p90", "p95", "p99")):
            continue
        rows.append((label, "min {} / max {} / mean {} / median {} / p90 {} / p95 {} / p99 {} ms".format(
            *(format_ms(phase[k]) for k in ("min", "max", "mean", "median", "p90", "p95", "p99")))))
    warnings = breakdown.get("warnings")
    rows += [("Warning", str(w)) for w in (warnings if isinstance(warnings, list) else [])]
    return rows


def summary_rows(profile: Profile) -> list[tuple[str, str]]:
    """A trtexec-like performance summary as ``(label, value)`` rows: throughput, latency statistics, batch and
    shapes, backend and environment, the stability warning and the per-layer share of the latency."""
    profile = as_profile(profile)
    lat = profile.latency_ms
    env = profile.env
    batch = profile.batch
    ips = profile.throughput_ips
    images = profile.throughput_images_s
    rows: list[tuple[str, str]] = []
    if profile.onnx:
        rows.append(("Model", profile.onnx))
    backend = profile.backend
    if env.get("backend_version"):
        backend += f" {env['backend_version']}"
    details = [", ".join(env["providers"])] if env.get("providers") else []
    details += [str(env[k]) for k in ("graph_optimization_level",) if env.get(k)]
    if details:
        backend += f" ({'; '.join(details)})"
    rows.append(("Backend", backend))
    rows.append(("Batch", str(batch)))
    shapes = profile.input_shapes
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
        ("Coefficient of variation", format_percent(lat["cv"])),
        ("Samples", str(int(lat["n"]))),
    ]
    if profile.cv_warning:
        rows.append(("Warning", profile.cv_warning))
    rows += breakdown_rows(profile.breakdown)
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


def plot_histogram(profile: Profile) -> bytes | None:
    """PNG of the latency samples with the p50 and p99 marked; None when the profile stores no samples
    (files written by ``trt-prune profile -o`` leave them out)."""
    profile = as_profile(profile)
    samples = profile.samples_ms
    if not samples:
        return None
    import numpy as np

    lat = profile.latency_ms
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    bins = min(60, max(10, len(np.histogram_bin_edges(samples, bins="auto")) - 1))
    ax.hist(samples, bins=bins, color="#4c72b0", alpha=0.85)
    ax.axvline(lat["p50"], color="#2a9d8f", linestyle="--", label=f"p50 {format_ms(lat['p50'])} ms")
    ax.axvline(lat["p99"], color="#e76f51", linestyle=":", label=f"p99 {format_ms(lat['p99'])} ms")
    ax.set_xlabel(f"latency per inference call, ms ({profile.backend}, batch {profile.batch})")
    ax.set_ylabel("calls")
    ax.set_title(f"End-to-end latency of {len(samples)} calls")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _png_bytes(fig)


def plot_top_layers(profile: Profile, top: int = 20) -> bytes | None:
    """PNG of the ``top`` slowest layers as horizontal bars labelled by module path; None without layers."""
    rows = sorted(as_profile(profile).per_layer, key=lambda r: r["ms"], reverse=True)[:top]
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


def render_plots(profile: Profile, compare: Profile | None = None, top: int = 20) -> dict[str, bytes]:
    """Every plot of the report as PNG bytes by kind (``histogram``, ``layers``, ``compare``); kinds the data
    cannot support (no samples, no layers, nothing to compare) are left out."""
    profile = as_profile(profile)
    _check_top(top)
    pngs = {"histogram": plot_histogram(profile), "layers": plot_top_layers(profile, top)}
    if compare is not None:
        compare = as_profile(compare, "compare profile")
        pngs["compare"] = plot_comparison(compare_layers(compare, profile), profile_labels(compare, profile), top)
    return {k: v for k, v in pngs.items() if v is not None}


def write_profile_pngs(profile: Profile, out_dir: str | os.PathLike, compare: Profile | None = None, top: int = 20,
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


def _layer_section(profile: ProfileResult, top: int, pngs: Mapping[str, bytes]) -> str:
    rows = sorted(profile.per_layer, key=lambda r: r["ms"], reverse=True)
    if not rows:
        return "<h2>Per-layer times</h2><p>This profile has no per-layer times (profiled without them).</p>"
    total = sum(float(r["ms"]) for r in rows)
    table_rows, running = [], 0.0
    for i, r in enumerate(rows, start=1):
        running += float(r["ms"])
        share = float(r["ms"]) / total if total > 0 else None
        module = DASH if r.get("module") is None else (r["module"] or ROOT)
        table_rows.append([i, r["name"], r["op"], module, format_ms(r["ms"]), format_percent(share),
                           format_percent(running / total if total > 0 else None)])
    parts = [f"<h2>Per-layer times</h2><p>{html.escape(per_layer_share(profile) or '')}.</p>",
             _figure_html(pngs.get("layers"), "slowest layers", f"The {min(top, len(rows))} slowest layers.", ""),
             f"<h3>{min(top, len(rows))} slowest of {len(rows)} layers</h3>",
             _table_top(["#", "layer", "op", "module", "ms", "share", "cumulative"], table_rows, top,
                        numeric=(0, 4, 5, 6))]
    for by in AGGREGATE_KEYS:
        agg = aggregate_layers(profile.per_layer, by=by)
        parts.append(f"<h3>By {by}</h3>")
        parts.append(_table_top([by, "ms", "layers", "share"],
                                [[a["key"], format_ms(a["ms"]), a["count"], format_percent(a["share"])] for a in agg],
                                top, numeric=(1, 2, 3)))
    return "".join(parts)


def _compare_section(profile: ProfileResult, compare: ProfileResult, top: int, pngs: Mapping[str, bytes]) -> str:
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
        if getattr(compare, field) != getattr(profile, field):
            notes.append(f"The two profiles differ in {what}: {getattr(compare, field)} vs {getattr(profile, field)}.")
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


def _env_section(profile: ProfileResult, compare: ProfileResult | None) -> str:
    def env_table(p: ProfileResult) -> str:
        env = p.env
        return _table(["key", "value"], [[k, v if isinstance(v, str) else json.dumps(v)] for k, v in env.items()])

    if compare is None:
        return f"<h2>Environment</h2>{env_table(profile)}"
    base_label, other_label = profile_labels(compare, profile)
    return (f"<h2>Environment</h2><h3>{html.escape(other_label)} (this profile)</h3>{env_table(profile)}"
            f"<h3>{html.escape(base_label)} (baseline)</h3>{env_table(compare)}")


def render_profile_html(profile: Profile, compare: Profile | None = None, top: int = 20,
                        pngs: Mapping[str, bytes] | None = None) -> str:
    """The report page as a string (see :func:`write_profile_html`)."""
    profile = as_profile(profile)
    compare = as_profile(compare, "compare profile") if compare is not None else None
    _check_top(top)
    if pngs is None:
        pngs = render_plots(profile, compare, top)
    lat = profile.latency_ms
    model = Path(profile.onnx or "model").name
    title = f"Profile of {model} on {profile.backend}"
    summary = _table(None, summary_rows(profile))
    warning = f'<p class="warn">{html.escape(profile.cv_warning)}</p>' if profile.cv_warning else ""
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in profile.notes)
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


def write_profile_html(profile: Profile, path: str | os.PathLike, compare: Profile | None = None,
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
    profile = as_profile(profile)
    compare = as_profile(compare, "compare profile") if compare is not None else None
    if pngs is None:
        pngs = render_plots(profile, compare, top)
    page = render_profile_html(profile, compare, top, pngs)
    if png_dir is not None:
        write_profile_pngs(profile, png_dir, compare, top, pngs=pngs)
    return write_text(path, page)
