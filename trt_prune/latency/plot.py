"""Pictures and summaries of a latency table: latency vs kept channels, one panel per layer shape."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .table import LatencyTable


def table_rows(table: LatencyTable) -> list[dict]:
    """One summary row per layer shape: its grid, the time at the fewest and at the dense counts."""
    rows = []
    for key, e in sorted(table.entries.items()):
        measured = e.ms[~np.isnan(e.ms)]
        rows.append({"layer": key, "op": e.sig.op, "dense": list(e.sig.dense), "grid": [len(e.ins), len(e.outs)],
                     "min_ms": round(float(measured.min()), 4) if measured.size else None,
                     "dense_ms": None if np.isnan(e.ms[-1, -1]) else round(float(e.ms[-1, -1]), 4),
                     "missing": len(e.missing())})
    return rows


def plot_table(table: LatencyTable, path: str | Path, columns: int = 6) -> Path:
    """Write a PNG: per layer shape, measured latency vs kept output channels (one line per measured input
    count; one-axis ops: vs channels). Flat stretches and steps are where pruning buys nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..artifacts import atomic_path

    entries = [e for _, e in sorted(table.entries.items())]
    rows = max(1, math.ceil(len(entries) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.ravel()[len(entries):]:
        ax.axis("off")
    for ax, e in zip(axes.ravel(), entries, strict=False):
        sig = e.sig
        if sig.one_axis or len(e.outs) == 1:
            x = e.ins if sig.one_axis or len(e.ins) > 1 else e.outs
            y = e.ms[:, 0] if sig.one_axis or len(e.ins) > 1 else e.ms[0, :]
            ax.plot(x, y, "o-", ms=3)
            ax.set_xlabel("channels" if sig.one_axis else ("in channels" if len(e.ins) > 1 else "out channels"))
        else:
            picks = sorted({0, len(e.ins) // 2, len(e.ins) - 1})
            for i in picks:
                ax.plot(e.outs, e.ms[i, :], "o-", ms=3, label=f"in {e.ins[i]}")
            ax.set_xlabel("out channels")
            ax.legend(fontsize=6)
        kernel = "x".join(map(str, sig.kernel)) if sig.kernel else ""
        where = "x".join(map(str, sig.spatial))
        ax.set_title(f"{sig.op} {kernel} {sig.dense[0]}→{sig.dense[1]} @{where}", fontsize=7)
        ax.set_ylabel("ms", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"latency table: {table.key.describe()}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
