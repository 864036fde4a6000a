"""Reports of the regression benchmarks: the terminal table of a comparison (:func:`comparison_table`), the
comparison as one offline HTML page (:func:`write_comparison_html`) and the history of a result store as one
offline HTML page with a plot per entry (:func:`write_history_html`).

This module only renders. Its input is the dicts that :func:`~trt_prune.regression.live.compare_arms`,
:func:`~trt_prune.regression.runner.compare_stored` and :meth:`~trt_prune.regression.store.Store.history` return
(so a report can be made from their JSON long after the run), checked first by
:mod:`trt_prune.regression.comparison`. The pages follow the profile report (:mod:`trt_prune.profiling.html`):
plots drawn on matplotlib's Agg canvas and inlined as ``data:`` PNGs, no external stylesheet, script or font,
every value escaped, the file written atomically after the whole page has been built (bad input raises
:class:`~trt_prune.errors.BenchError`, or :class:`~trt_prune.errors.ProfileError` for a profile, and leaves no
file).
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trt_prune.artifacts import write_text
from trt_prune.profiling.compare import DASH, format_ms
from trt_prune.profiling.html import CSS, _figure, _figure_html, _label, _png_bytes, _table
from trt_prune.profiling.result import ProfileResult
from trt_prune.regression.comparison import (
    check_comparison,
    check_history,
    check_profiles,
    finite_number,
)
from trt_prune.regression.stats import no_change_band

VERDICT_STYLE = {"regression": "bold red", "improvement": "bold green", "no change": "", "inconclusive": "yellow"}
VERDICT_COLOR = {"regression": "#c0392b", "improvement": "#2a9d8f", "no change": "#555555",
                 "inconclusive": "#d68910"}
TOP_BARS = 15  # per-layer deltas in the bar plot
PAGE_CSS = CSS + """
.verdict{font-size:1.3em;font-weight:bold;padding:.4em .8em;border-left:6px solid;margin:.5em 0}
.v-regression{color:#c0392b;border-color:#c0392b;background:#fdecea}
.v-improvement{color:#1e7d6f;border-color:#2a9d8f;background:#e8f6f3}
.v-no-change{color:#333;border-color:#999;background:#f4f4f4}
.v-inconclusive{color:#9a6300;border-color:#e9a23b;background:#fff4e0}"""


# ---------------------------------------------------------------- formatting


def fmt_ratio(value: Any) -> str:
    """``1.123×``; a dash when unknown."""
    value = finite_number(value)
    return DASH if value is None else f"{value:.3f}×"


def fmt_ci(ci: Any) -> str:
    """``[1.080, 1.170]``."""
    if not isinstance(ci, Sequence) or isinstance(ci, str) or len(ci) != 2:
        return DASH
    low, high = (finite_number(v) for v in ci)
    return f"[{DASH if low is None else f'{low:.3f}'}, {DASH if high is None else f'{high:.3f}'}]"


def fmt_p(value: Any) -> str:
    value = finite_number(value)
    if value is None:
        return DASH
    return f"{value:.2e}" if 0 < value < 0.001 else f"{value:.3f}"


def fmt_change(ratio: Any) -> str:
    """The ratio as a signed change in per cent: ``+12.3 %`` (slower), ``-4.0 %`` (faster)."""
    ratio = finite_number(ratio)
    return DASH if ratio is None else f"{(ratio - 1) * 100:+.1f} %"


def _points(value: Any) -> str:
    value = finite_number(value)
    return DASH if value is None else f"{value:.2f}"


def _delta(value: Any) -> str:
    value = finite_number(value)
    return DASH if value is None else f"{value:+.4g}"


def _level(result: Mapping[str, Any]) -> str:
    level = finite_number(result.get("level"))
    return f"{level * 100:g} %" if level is not None else "95 %"


def _blocks(result: Mapping[str, Any]) -> str:
    blocks = result.get("blocks")
    if isinstance(blocks, (list, tuple)) and len(blocks) == 2:
        text = f"{blocks[0]} baseline / {blocks[1]} candidate blocks"
    elif blocks is not None:
        text = f"{blocks} interleaved blocks"
    else:
        return DASH
    per = result.get("samples_per_block")
    return text + (f" of {per} samples" if per else "")


def _accuracy_verdict(acc: Mapping[str, Any]) -> str:
    if acc.get("verdict") == "regression":
        return "regression"
    if finite_number(acc.get("baseline")) is None or finite_number(acc.get("candidate")) is None:
        return "unknown (one side was not scored)"
    return "within the allowed drop"


def _latency(result: Mapping[str, Any], side: str, stat: str) -> float | None:
    lat = result.get("latency_ms") or {}
    return finite_number((lat.get(side) or {}).get(stat)) if isinstance(lat, Mapping) else None


def _slower(row: Mapping[str, Any]) -> bool:
    """Whether a layer row took more time in the candidate (new layers count: all their time is new)."""
    delta = finite_number(row.get("delta_ms"))
    if delta is not None:
        return delta > 0
    return row.get("base_ms") is None and finite_number(row.get("other_ms")) is not None


def _layers_title(result: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """The title of the layer table, the rows it shows and the rows left for a note (regression: the ones
    that did not get slower)."""
    rows = [dict(r) for r in result.get("layers") or []]
    if result["verdict"] == "regression":
        slower = [r for r in rows if _slower(r)]
        if slower:
            return ("where the time changed: these layers got slower (the regression)", slower,
                    [r for r in rows if not _slower(r)])
        return ("where the time changed: no layer got slower in the per-layer run (the regression shows "
                "end to end or in accuracy only)", rows, [])
    return "where the time changed (biggest per-layer changes first)", rows, []


def _sub_label(sub: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(sub.get("entry", DASH)), str(sub.get("backend", DASH)), str(sub.get("batch", DASH)))


# ---------------------------------------------------------------- terminal


def comparison_table(result: Mapping[str, Any]):
    """The comparison as a ``rich`` renderable: environment differences, the verdict with its ratio, interval,
    p-value and bar, the tail (p99), accuracy, the layers where the time changed and, for stored runs with
    several entries, one row per comparison."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    result = check_comparison(result)
    verdict = result["verdict"]
    style = VERDICT_STYLE[verdict]
    level = _level(result)
    low, high = no_change_band(float(result["min_effect"]))
    parts: list[Any] = []
    title = Text(f"{result['baseline']} → {result['candidate']}", style="bold")
    extra = [str(result[k]) for k in ("backend", "mode") if result.get(k)]
    if extra:
        title.append(f"  ({', '.join(extra)})", style="dim")
    parts.append(title)
    commits = result.get("commits")
    if isinstance(commits, Mapping) and (commits.get("baseline") or commits.get("candidate")):
        parts.append(Text(f"commits: {commits.get('baseline') or DASH} → {commits.get('candidate') or DASH}",
                          style="dim"))
    for line in (result["environment"].get("differences") or []):
        parts.append(Text(f"environment differs: {line}", style="yellow"))

    line = Text("verdict: ")
    line.append(verdict.upper(), style=style)
    line.append(f"  median latency ratio {fmt_ratio(result['ratio'])} ({fmt_change(result['ratio'])}), "
                f"{level} CI {fmt_ci(result['ci'])}, p = {fmt_p(result['p_value'])}")
    parts.append(line)
    parts.append(Text(f"min effect {float(result['min_effect']) * 100:g} % (no change inside [{low:.3f}, "
                      f"{high:.3f}]), {_blocks(result)}"))
    speed = result.get("speed_verdict")
    if speed and speed != verdict:
        parts.append(Text(f"speed alone: {speed}; the accuracy drop decides the verdict", style=style))
    b50, c50 = _latency(result, "baseline", "p50"), _latency(result, "candidate", "p50")
    b99, c99 = _latency(result, "baseline", "p99"), _latency(result, "candidate", "p99")
    parts.append(Text(f"latency p50 {format_ms(b50)} → {format_ms(c50)} ms, p99 {format_ms(b99)} → "
                      f"{format_ms(c99)} ms"))
    p99 = result["p99"]
    tail = Text(f"p99 ratio {fmt_ratio(p99.get('ratio'))}, {level} CI {fmt_ci(p99.get('ci'))}: ")
    tail.append(str(p99.get("verdict", DASH)), style=VERDICT_STYLE.get(p99.get("verdict"), ""))
    parts.append(tail)
    acc = result.get("accuracy")
    if acc:
        line = Text(f"accuracy {acc.get('metric', '')}: baseline {_points(acc.get('baseline'))}, candidate "
                    f"{_points(acc.get('candidate'))}, drop {_points(acc.get('drop'))} (allowed "
                    f"{_points(acc.get('max_drop'))}): ")
        verdict_acc = _accuracy_verdict(acc)
        line.append(verdict_acc, style="bold red" if verdict_acc == "regression" else "")
        parts.append(line)
    else:
        parts.append(Text("accuracy: not scored", style="dim"))

    heading, rows, others = _layers_title(result)
    if rows:
        table = Table(title=heading, title_justify="left")
        for col, right in (("module (or layer)", False), ("op", False), ("base ms", True), ("candidate ms", True),
                           ("delta ms", True), ("ratio", True)):
            table.add_column(col, justify="right" if right else "left")
        for r in rows:
            delta = finite_number(r.get("delta_ms"))
            tone = "red" if _slower(r) else ("green" if delta is not None and delta < 0 else "")
            table.add_row(str(r["key"]), str(r.get("op", "")), format_ms(finite_number(r.get("base_ms"))),
                          format_ms(finite_number(r.get("other_ms"))), Text(_delta(delta), style=tone),
                          Text(fmt_ratio(r.get("ratio")), style=tone))
        parts.append(table)
        if others:
            parts.append(Text(f"{len(others)} other changed layer(s) did not get slower: "
                              + ", ".join(str(r["key"]) for r in others), style="dim"))
    else:
        parts.append(Text("where the time changed: no per-layer times (profiled without them)", style="dim"))

    subs = result.get("comparisons") or []
    if len(subs) > 1:
        table = Table(title=f"{len(subs)} comparisons (the worst decides)", title_justify="left")
        for col in ("entry", "backend", "batch", "baseline", "candidate", "ratio", f"{level} CI", "verdict"):
            table.add_column(col, justify="right" if col in ("batch", "ratio") else "left")
        for sub in subs:
            table.add_row(*_sub_label(sub), str(sub.get("baseline", DASH)), str(sub.get("candidate", DASH)),
                          fmt_ratio(sub["ratio"]), fmt_ci(sub["ci"]),
                          Text(sub["verdict"], style=VERDICT_STYLE[sub["verdict"]]))
        parts.append(table)
    return Group(*parts)


# ---------------------------------------------------------------- plots


def _plain(text: Any) -> str:
    """A label for a matplotlib text: ``$`` would start mathtext (and fail on an odd count)."""
    return _label(str(text)).replace("$", r"\$")


def plot_ratio(result: Mapping[str, Any]) -> bytes:
    """PNG of the median (filled) and p99 (hollow) ratios with their intervals, one row per comparison,
    against the no-change band ``[1 / (1 + min_effect), 1 + min_effect]``."""
    subs = [s for s in result.get("comparisons") or [] if isinstance(s, Mapping)]
    if len(subs) > 1:
        rows = [(" / ".join(_sub_label(s)), s) for s in subs]
    else:
        rows = [(f"{result['baseline']} → {result['candidate']}", result)]
    rows = rows[::-1]  # the first comparison on top
    low, high = no_change_band(float(result["min_effect"]))
    fig = _figure(8, 0.45 * len(rows) + 1.8)
    ax = fig.add_subplot()
    ax.axvspan(low, high, color="#cccccc", alpha=0.45, label=f"no change (±{float(result['min_effect']) * 100:g} %)")
    ax.axvline(1.0, color="black", linewidth=0.8)
    xs: list[float] = [low, high]
    for i, (_, row) in enumerate(rows):
        tail = row.get("p99") if isinstance(row.get("p99"), Mapping) else {}
        for offset, ratio, ci, filled, name, verdict in (
                (0.12, row.get("ratio"), row.get("ci"), True, "median", row.get("verdict")),
                (-0.12, tail.get("ratio"), tail.get("ci"), False, "p99", tail.get("verdict"))):
            color = VERDICT_COLOR.get(verdict, "#555555")
            ratio = finite_number(ratio)
            if ratio is None:
                continue
            lo, hi = (finite_number(v) for v in ci) if isinstance(ci, Sequence) and len(ci) == 2 else (None, None)
            err = [[ratio - lo], [hi - ratio]] if lo is not None and hi is not None and lo <= ratio <= hi else None
            ax.errorbar([ratio], [i + offset], xerr=err, fmt="o", color=color, capsize=4,
                        markerfacecolor=color if filled else "white", label=name if i == 0 else None)
            xs += [ratio] + ([lo, hi] if err else [])
    ax.set_yticks(range(len(rows)), [_plain(label) for label, _ in rows], fontsize=8)
    span = max(xs) - min(xs)
    ax.set_xlim(min(xs) - 0.1 * span, max(xs) + 0.1 * span)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel(f"latency ratio candidate / baseline ({_level(result)} interval; > 1 is slower)")
    ax.set_title("Ratio against the no-change band")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _png_bytes(fig)


def plot_layer_deltas(rows: Sequence[Mapping[str, Any]], top: int = TOP_BARS) -> bytes | None:
    """PNG of the biggest per-layer changes (candidate - baseline, a missing side counts as 0); None without
    rows."""
    rows = list(rows[:top])[::-1]
    if not rows:
        return None
    delta = [(finite_number(r.get("other_ms")) or 0.0) - (finite_number(r.get("base_ms")) or 0.0) for r in rows]
    fig = _figure(8, 0.3 * len(rows) + 1.4)
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    ax.barh(y, delta, color=["#e76f51" if d > 0 else "#2a9d8f" for d in delta])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y, [_plain(r["key"]) + f" [{_plain(r.get('op', ''))}]" for r in rows], fontsize=7)
    ax.set_xlabel("change, ms per inference (candidate - baseline)")
    ax.set_title(f"{len(rows)} biggest per-layer changes: slower (red) / faster (green)")
    ax.grid(axis="x", alpha=0.3)
    return _png_bytes(fig)


def plot_latency_histograms(profiles: Sequence[ProfileResult], labels: tuple[str, str]) -> bytes | None:
    """PNG of both arms' latency samples on shared bins; None when neither stores samples."""
    import numpy as np

    samples = [p.samples_ms for p in profiles]
    if not any(samples):
        return None
    edges = np.histogram_bin_edges(np.concatenate([np.asarray(s) for s in samples if s]), bins="auto")
    if len(edges) > 61:
        edges = np.linspace(edges[0], edges[-1], 61)
    fig = _figure(8, 3.4)
    ax = fig.add_subplot()
    for values, label, color in zip(samples, labels, ("#4c72b0", "#dd8452"), strict=True):
        if not values:
            continue
        ax.hist(values, bins=edges, color=color, alpha=0.55, label=f"{_plain(label)} ({len(values)} calls)")
        ax.axvline(float(np.median(values)), color=color, linestyle="--")
    ax.set_xlabel("latency per inference call, ms (dashed: medians)")
    ax.set_ylabel("calls")
    ax.set_title("End-to-end latency of both arms")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png_bytes(fig)


def plot_history(rows: Sequence[Mapping[str, Any]], runs: Sequence[tuple[str, Any]], title: str) -> bytes:
    """PNG of one (entry, backend, batch): p50 (solid) and p99 (dashed) latency per variant against run order,
    and below it the accuracy where any was scored."""
    order = {run: i for i, (run, _) in enumerate(runs)}
    variants = list(dict.fromkeys(str(r["variant"]) for r in rows))
    scored = any(finite_number(r.get("accuracy")) is not None for r in rows)
    fig = _figure(max(8.5, 0.9 * len(runs) + 4.5), 5.6 if scored else 3.6)
    if scored:
        ax, acc_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    else:
        ax, acc_ax = fig.add_subplot(), None
    colors = [f"C{i % 10}" for i in range(len(variants))]
    for variant, color in zip(variants, colors, strict=True):
        mine = sorted((r for r in rows if str(r["variant"]) == variant), key=lambda r: order[r["run"]])
        x = [order[r["run"]] for r in mine]
        ax.plot(x, [float(r["p50_ms"]) for r in mine], marker="o", color=color, label=f"{_plain(variant)} p50")
        tail = [(order[r["run"]], finite_number(r.get("p99_ms"))) for r in mine]
        tail = [(i, v) for i, v in tail if v is not None]
        if tail:
            ax.plot([i for i, _ in tail], [v for _, v in tail], marker="s", markersize=4, linestyle="--",
                    color=color, alpha=0.8, label=f"{_plain(variant)} p99")
        if acc_ax is not None:
            acc = [(order[r["run"]], finite_number(r.get("accuracy"))) for r in mine]
            acc = [(i, v) for i, v in acc if v is not None]
            if acc:
                acc_ax.plot([i for i, _ in acc], [v for _, v in acc], marker="o", color=color,
                            label=_plain(variant))
    ax.set_ylabel("latency, ms")
    ax.set_title(_plain(title))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the lines
    ax.grid(alpha=0.3)
    last = acc_ax if acc_ax is not None else ax
    if acc_ax is not None:
        acc_ax.set_ylabel("accuracy (mAP points)")
        acc_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        acc_ax.grid(alpha=0.3)
    labels = [f"{_plain(run)[-24:]}\n{_plain(commit or DASH)[:16]}" for run, commit in runs]
    last.set_xticks(range(len(runs)), labels, fontsize=7, rotation=30 if len(runs) > 6 else 0,
                    ha="right" if len(runs) > 6 else "center")
    last.set_xlim(-0.5, len(runs) - 0.5)
    last.set_xlabel("run (oldest first) / commit")
    return _png_bytes(fig)


# ---------------------------------------------------------------- HTML


def _page(title: str, body: Sequence[str]) -> str:
    return "\n".join([
        "<!doctype html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{PAGE_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *[b for b in body if b],
        "</body></html>\n",
    ])


def _verdict_box(verdict: str, text: str) -> str:
    css = "v-" + verdict.replace(" ", "-")
    return f'<p class="verdict {css}">{html.escape(verdict.upper())}: {html.escape(text)}</p>'


def _layer_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[list[str]], list[list[str]]]:
    out, css = [], []
    for r in rows:
        delta = finite_number(r.get("delta_ms"))
        out.append([str(r["key"]), str(r.get("op", "")), format_ms(finite_number(r.get("base_ms"))),
                    format_ms(finite_number(r.get("other_ms"))), _delta(delta), fmt_ratio(r.get("ratio"))])
        tone = "slower" if _slower(r) else ("faster" if delta is not None and delta < 0 else "")
        css.append(["", "", "", "", tone, tone])
    return out, css


LAYER_HEADERS = ["module (or layer)", "op", "baseline ms", "candidate ms", "change ms", "ratio"]


def _summary_rows(result: Mapping[str, Any]) -> list[list[str]]:
    level = _level(result)
    low, high = no_change_band(float(result["min_effect"]))
    p99 = result["p99"]
    rows = [
        ["verdict", result["verdict"]],
        ["speed verdict", str(result.get("speed_verdict") or result["verdict"])],
        ["median latency ratio (candidate / baseline)",
         f"{fmt_ratio(result['ratio'])} ({fmt_change(result['ratio'])})"],
        [f"{level} interval", fmt_ci(result["ci"])],
        ["p-value (Mann-Whitney on block medians)", fmt_p(result["p_value"])],
        ["minimum effect", f"{float(result['min_effect']) * 100:g} % (no change inside [{low:.3f}, {high:.3f}])"],
        ["blocks", _blocks(result)],
        ["p50 latency, ms", f"{format_ms(_latency(result, 'baseline', 'p50'))} → "
                            f"{format_ms(_latency(result, 'candidate', 'p50'))}"],
        ["p99 latency, ms", f"{format_ms(_latency(result, 'baseline', 'p99'))} → "
                            f"{format_ms(_latency(result, 'candidate', 'p99'))}"],
        ["p99 ratio", f"{fmt_ratio(p99.get('ratio'))}, {level} interval {fmt_ci(p99.get('ci'))}: "
                      f"{p99.get('verdict', DASH)}"],
        ["baseline", str(result["baseline"])],
        ["candidate", str(result["candidate"])],
    ]
    if result.get("backend"):
        rows.append(["backend", str(result["backend"])])
    if result.get("mode"):
        rows.append(["mode", str(result["mode"])])
    commits = result.get("commits")
    if isinstance(commits, Mapping):
        rows.append(["commits", f"{commits.get('baseline') or DASH} → {commits.get('candidate') or DASH}"])
    return rows


def _env_value(value: Any) -> str:
    return DASH if value is None else value if isinstance(value, str) else repr(value)


def _environment_section(env: Mapping[str, Any]) -> str:
    diffs = env.get("differences") or []
    notes = ("".join(f'<p class="warn">{html.escape(str(d))}</p>' for d in diffs) if diffs
             else "<p>No difference in the environment fingerprints that matters for timing.</p>")
    base, cand = env.get("baseline") or {}, env.get("candidate") or {}
    keys = list(dict.fromkeys([*base, *cand])) if isinstance(base, Mapping) and isinstance(cand, Mapping) else []
    full = ""
    if keys:
        rows = [[k, _env_value(base.get(k)), _env_value(cand.get(k))] for k in keys]
        table = _table(["key", "baseline", "candidate"], rows)
        full = f"<details><summary>both fingerprints</summary>{table}</details>"
    return f"<h2>Environment</h2>{notes}{full}"


def _accuracy_section(acc: Mapping[str, Any] | None) -> str:
    if not acc:
        return "<h2>Accuracy</h2><p>Not scored (the model has no known accuracy metric).</p>"
    rows = [["metric", str(acc.get("metric", DASH))], ["baseline", _points(acc.get("baseline"))],
            ["candidate", _points(acc.get("candidate"))], ["drop", _points(acc.get("drop"))],
            ["allowed drop", _points(acc.get("max_drop"))], ["verdict", _accuracy_verdict(acc)]]
    warn = ('<p class="warn">The accuracy dropped more than allowed: this alone makes the comparison a '
            "regression.</p>" if acc.get("verdict") == "regression" else "")
    return f"<h2>Accuracy</h2>{warn}{_table(None, rows)}"


def _layers_section(result: Mapping[str, Any], delta_png: bytes | None) -> str:
    heading, rows, others = _layers_title(result)
    if not rows:
        return "<h2>Where the time changed</h2><p>No per-layer times (profiled without them).</p>"
    table_rows, css = _layer_rows(rows)
    parts = [f"<h2>{html.escape(heading[0].upper() + heading[1:])}</h2>",
             "<p>Layers match by PyTorch module path (else layer name); change = candidate - baseline, ratio = "
             "candidate / baseline, from a separate per-layer run of each arm.</p>",
             _table(LAYER_HEADERS, table_rows, numeric=(2, 3, 4, 5), css=css)]
    if others:
        other_rows, other_css = _layer_rows(others)
        parts.append(f"<h3>{len(others)} other changed layer(s) that did not get slower</h3>")
        parts.append(_table(LAYER_HEADERS, other_rows, numeric=(2, 3, 4, 5), css=other_css))
    parts.append(_figure_html(delta_png, "per-layer changes", "The biggest per-layer changes, ms per inference.",
                              ""))
    return "".join(parts)


def _comparisons_section(result: Mapping[str, Any]) -> str:
    subs = result.get("comparisons") or []
    if len(subs) <= 1:
        return ""
    level = _level(result)
    rows = [[*_sub_label(s), str(s.get("baseline", DASH)), str(s.get("candidate", DASH)), fmt_ratio(s["ratio"]),
             fmt_ci(s["ci"]), s["verdict"]] for s in subs]
    css = [["", "", "", "", "", "", "", "slower" if s["verdict"] == "regression" else
            "faster" if s["verdict"] == "improvement" else ""] for s in subs]
    parts = [f"<h2>{len(subs)} comparisons</h2><p>One per (entry, backend, batch); the worst verdict is the "
             "overall one, and the sections above describe it.</p>",
             _table(["entry", "backend", "batch", "baseline", "candidate", "ratio", f"{level} interval", "verdict"],
                    rows, numeric=(2, 5), css=css)]
    for s in subs:
        if s.get("layers"):
            layer_rows, layer_css = _layer_rows(s["layers"])
            label = " / ".join(_sub_label(s))
            parts.append(f"<details><summary>layers of {html.escape(label)} ({html.escape(s['verdict'])})</summary>"
                         f"{_table(LAYER_HEADERS, layer_rows, numeric=(2, 3, 4, 5), css=layer_css)}</details>")
    return "".join(parts)


def render_comparison_html(result: Mapping[str, Any],
                           profiles: Sequence[ProfileResult | Mapping[str, Any]] | None = None) -> str:
    """The comparison page as a string (see :func:`write_comparison_html`)."""
    result = check_comparison(result)
    profiles = check_profiles(profiles)
    verdict = result["verdict"]
    title = f"Benchmark comparison: {result['baseline']} → {result['candidate']}"
    summary = (f"median latency ratio {fmt_ratio(result['ratio'])} ({fmt_change(result['ratio'])}), "
               f"{_level(result)} interval {fmt_ci(result['ci'])}, p = {fmt_p(result['p_value'])}, "
               f"minimum effect {float(result['min_effect']) * 100:g} %")
    diffs = result["environment"].get("differences") or []
    env_warn = (f'<p class="warn">The environments differ ({len(diffs)} difference(s), listed under '
                "Environment): part of the change may be the machine, not the model.</p>" if diffs else "")
    stored = ('<p class="warn">Stored runs were not interleaved with each other: a drift of the machine between '
              "them counts as a change.</p>" if str(result.get("mode", "")).startswith("stored") else "")
    ratio_png = plot_ratio(result)
    delta_png = plot_layer_deltas(result.get("layers") or [])
    histogram = ""
    if profiles is not None:
        png = plot_latency_histograms(profiles, (str(result["baseline"]), str(result["candidate"])))
        histogram = "<h2>Latency distributions</h2>" + _figure_html(
            png, "latency histograms", "Both arms' end-to-end latency samples on shared bins.",
            "No latency histogram: the profiles store no samples.")
    body = [
        "<h2>Verdict</h2>", env_warn, _verdict_box(verdict, summary), stored,
        _table(None, _summary_rows(result)),
        _figure_html(ratio_png, "latency ratio and interval",
                     "Median (filled) and p99 (hollow) ratios with their intervals; grey: the no-change band.", ""),
        _environment_section(result["environment"]),
        _accuracy_section(result.get("accuracy")),
        _layers_section(result, delta_png),
        histogram,
        _comparisons_section(result),
    ]
    return _page(title, body)


def write_comparison_html(result: Mapping[str, Any], path: str | os.PathLike,
                          profiles: Sequence[ProfileResult | Mapping[str, Any]] | None = None) -> Path:
    """Write a comparison (``trt-prune bench compare``) to ``path`` as one self-contained HTML page that opens
    offline: the verdict, environment differences, accuracy, the ratio with its interval against the
    no-change band, the layers where the time changed (table and plot), with ``profiles`` (the baseline and
    candidate ProfileResult dicts with ``samples_ms``) both latency histograms, and for stored runs one row
    per comparison. A ``result`` that is not a comparison raises :class:`BenchError` and writes nothing."""
    page = render_comparison_html(result, profiles)
    return write_text(path, page)


def render_history_html(rows: Sequence[Mapping[str, Any]]) -> str:
    """The history page as a string (see :func:`write_history_html`)."""
    rows = check_history(rows)
    runs: dict[str, Any] = {}
    for r in rows:
        runs.setdefault(r["run"], r.get("commit"))
    groups: dict[tuple[str, str, Any, str], list[dict[str, Any]]] = {}
    for r in rows:  # one history per machine too, as asv keeps: timings of two machines are not one series
        groups.setdefault((str(r["entry"]), str(r["backend"]), r["batch"], str(r.get("machine") or "")),
                          []).append(r)
    figures = []
    for (entry, backend, batch, machine), group in groups.items():
        names = {r["run"] for r in group}
        mine = [(run, commit) for run, commit in runs.items() if run in names]
        title = f"{entry} on {backend}, batch {batch}" + (f", {machine}" if machine else "")
        png = plot_history(group, mine, title)
        variants = sorted({str(r["variant"]) for r in group})
        caption = (f"{len(mine)} run(s), variants {', '.join(variants)}: p50 latency (solid) and p99 (dashed)"
                   + (", accuracy below" if any(finite_number(r.get("accuracy")) is not None for r in group) else ""))
        figures.append(f"<h3>{html.escape(title)}</h3>" + _figure_html(png, title, caption, ""))
    table = _table(
        ["run", "created", "commit", "entry", "variant", "backend", "batch", "p50 ms", "p99 ms", "images/s",
         "accuracy"],
        [[str(r["run"]), str(r.get("created") or DASH), str(r.get("commit") or DASH), str(r["entry"]),
          str(r["variant"]), str(r["backend"]), str(r["batch"]), format_ms(finite_number(r["p50_ms"])),
          format_ms(finite_number(r.get("p99_ms"))),
          DASH if finite_number(r.get("images_s")) is None else f"{float(r['images_s']):.1f}",
          _points(r.get("accuracy"))] for r in rows],
        numeric=(6, 7, 8, 9, 10))
    intro = (f"<p>{len(rows)} results from {len(runs)} run(s), {len(groups)} (entry, backend, batch) "
             "combination(s). Each plot follows one combination over the runs that measured it, oldest first; "
             "stored runs were not interleaved with each other, so part of a step between runs may be the "
             "machine.</p>")
    return _page("Benchmark history", [intro, "<h2>Over runs and commits</h2>", *figures,
                                       f"<h2>All results</h2>{table}"])


def write_history_html(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write the history of a result store (:meth:`~trt_prune.regression.store.Store.history` rows) to ``path`` as
    one self-contained HTML page: per (entry, backend, batch) one plot of p50 (solid) and p99 (dashed) latency
    per variant against run order (ticks ``run / commit``), accuracy below where scored, and a table of every
    row. No rows raises :class:`BenchError` and writes nothing."""
    page = render_history_html(rows)
    return write_text(path, page)
