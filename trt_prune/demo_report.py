"""Reports: the terminal table, PNG plots and one self-contained HTML page. Never imports a backend."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .artifacts import atomic_path, write_text


def _fmt(value, spec: str = ".3f", none: str = "–") -> str:
    if value is None:
        return none
    return format(value, spec)


def _int8_layers(int8: dict | None) -> str:
    """``"56 of 63"``: weighted layers an INT8 variant runs in INT8, of all its weighted layers; "–" for float."""
    if not int8:
        return "–"
    return f"{int8['quantized_layers']} of {int8['quantized_layers'] + int8['kept_layers']}"


def variant_rows(report: dict) -> list[dict]:
    """One flat row per variant: what the terminal table and the HTML table show."""
    rows = []
    dense = next((v for v in report["variants"] if v["name"] == "dense"), None)
    for v in report["variants"]:
        lat = v.get("latency_ms") or {}
        speedup = None
        if dense and lat.get("p50") and dense.get("latency_ms", {}).get("p50"):
            speedup = dense["latency_ms"]["p50"] / lat["p50"]
        rows.append({
            "variant": v["name"],
            "params (M)": _fmt(v["params"] / 1e6, ".2f"),
            "GMACs": _fmt(v["macs"] / 1e9, ".3f"),
            "2:4 layers": str(v.get("sparse_layers", 0)),
            "INT8 layers": _int8_layers(v.get("int8")),
            "mAP50-95": _fmt(v.get("map50_95")),
            "mAP50-95 ft": _fmt(v.get("map50_95_finetuned")),
            "mAP50-95 ORT": _fmt(v.get("map50_95_onnx")),
            "p50 ms": _fmt(lat.get("p50"), ".2f"),
            "p99 ms": _fmt(lat.get("p99"), ".2f"),
            "img/s": _fmt(v.get("throughput_ips"), ".1f"),
            "speed-up": _fmt(speedup, ".2f") + ("×" if speedup else ""),
            "max |Δ| ONNX": _fmt((v.get("parity") or {}).get("max_abs"), ".1e"),
        })
    return rows


def rich_table(report: dict, title: str | None = None):
    """The variants as a :class:`rich.table.Table`."""
    from rich.table import Table

    rows = variant_rows(report)
    table = Table(title=title or f"{report['model']} on {report['backend']} (batch 1)")
    for i, col in enumerate(rows[0]):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row.values())
    return table


def _save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_latency(report: dict, path: Path) -> Path:
    """Box plot of every timed iteration per variant (interleaved rounds), p50 annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in report["variants"] if v.get("latency_samples_ms")]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.boxplot([v["latency_samples_ms"] for v in variants], orientation="horizontal", showfliers=False)
    ax.set_yticks(range(1, len(variants) + 1), [v["name"] for v in variants])
    for i, v in enumerate(variants, start=1):
        ax.annotate(f"p50 {v['latency_ms']['p50']:.2f} ms", (v["latency_ms"]["p50"], i + 0.3), fontsize=8)
    ax.set_xlabel(f"latency per inference, ms ({report['backend']}, batch 1, {report['env'].get('threads')} threads)")
    ax.set_title("Latency per variant (interleaved rounds)")
    ax.grid(axis="x", alpha=0.3)
    return _save_png(fig, path)


def plot_slowest_layers(dense: list[dict], other: list[dict], path: Path, other_name: str = "structured",
                        top: int = 15) -> Path:
    """The ``top`` slowest layers of the dense model beside the same layers of ``other`` (matched by name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(dense, key=lambda r: r["ms"], reverse=True)[:top][::-1]
    other_ms = {r["name"]: r["ms"] for r in other}
    labels = [(r.get("module") or r["name"])[-42:] + f" [{r['op']}]" for r in rows]
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2), dpi=110)
    ax.barh([i + 0.2 for i in y], [r["ms"] for r in rows], height=0.4, label="dense")
    ax.barh([i - 0.2 for i in y], [other_ms.get(r["name"], 0.0) for r in rows], height=0.4, label=other_name)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xlabel("ms per inference")
    ax.set_title(f"{len(rows)} slowest layers of dense vs {other_name}")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save_png(fig, path)


def write_html(report: dict, path: Path, images: list[Path]) -> Path:
    """One HTML file with the tables and the plots inlined (viewable with no network)."""
    rows = variant_rows(report)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    pics = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.name)}</figcaption></figure>'
        for p in images
    )
    layer_tables = ""
    for v in report["variants"]:
        top = sorted(v.get("per_layer", []), key=lambda r: r["ms"], reverse=True)[:15]
        trs = "".join(f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['op'])}</td>"
                      f"<td>{html.escape(str(r.get('module') or ''))}</td><td>{r['ms']:.3f}</td></tr>" for r in top)
        layer_tables += (f"<details><summary>{html.escape(v['name'])}: 15 slowest layers "
                         f"(sum of all layers {v.get('per_layer_sum_ms', 0):.2f} ms vs p50 "
                         f"{v['latency_ms']['p50']:.2f} ms end to end)</summary><table><tr><th>node</th><th>op</th>"
                         f"<th>module</th><th>ms</th></tr>{trs}</table></details>")
    int8_section = ""
    for v in report["variants"]:
        q = v.get("int8")
        if not q:
            continue
        kept = "".join(f"<tr><td>{html.escape(k['node'])}</td><td>{html.escape(k['op'])}</td>"
                       f"<td>{html.escape(k['reason'])}</td></tr>" for k in q.get("kept", []))
        agree = "; ".join(f"{html.escape(n)} {a['sqnr_db']:.1f} dB" for n, a in (q.get("agreement") or {}).items())
        int8_section += (
            f"<details><summary>{html.escape(v['name'])}: {q['source']}'s ONNX, {q['quantized_layers']} layers "
            f"INT8, {q['kept_layers']} kept in float, {q['qdq_pairs']} Q/DQ pairs; {html.escape(q['method'])} "
            f"calibration on {q['calib_samples']} samples ({html.escape(q['calib_source'])}) in "
            f"{q['calibration_seconds']:.1f} s; SQNR against fp32: {agree or '–'}; mAP from ONNX Runtime"
            f"</summary><table><tr><th>kept in float</th><th>op</th><th>why</th></tr>{kept}</table></details>")
    if int8_section:
        int8_section = "<h2>INT8 variants</h2>" + int8_section
    env = html.escape(json.dumps(report.get("env", {}), indent=2))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes", []))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>trt_prune demo: {html.escape(report['model'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}}
td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em 1em 0 0}}img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em}}</style>
</head><body>
<h1>trt_prune demo: {html.escape(report['model'])}</h1>
<p>Backend {html.escape(report['backend'])}, batch 1. mAP is COCO mAP@[.5:.95] on {report.get('eval_images')}
validation images; "ft" after a fine-tune of {report.get('finetune_steps')} steps; "ORT" is the fine-tuned
model's ONNX run in ONNX Runtime (for the INT8 rows, which have no torch model, the quantized ONNX's: their only
score).</p>
<table><tr>{head}</tr>{body}</table>
<ul>{notes}</ul>
{pics}
{int8_section}
<h2>Per-layer profiles</h2>{layer_tables}
<h2>Environment</h2><pre>{env}</pre>
</body></html>
"""
    return write_text(path, page)
