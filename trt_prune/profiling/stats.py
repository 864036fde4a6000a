"""Latency statistics: pure functions over lists of milliseconds, no I/O and no backend.

Percentiles use numpy's default ``linear`` method: the p-th percentile of ``n`` sorted samples sits at
position ``(n - 1) * p / 100``, interpolating linearly between neighbours (so the p50 of an even count is
the mean of the middle two). ``std`` is the sample standard deviation (``ddof=1``; 0 for a single sample)
and ``cv`` is ``std / mean``, the coefficient of variation trtexec warns about.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from trt_prune.errors import ProfileError

PERCENTILES = (50, 90, 95, 99)
CV_THRESHOLD = 0.025  # trtexec's: it warns when the coefficient of variation exceeds 2.5 %


def summarize(samples_ms: Sequence[float]) -> dict[str, Any]:
    """``p50, p90, p95, p99, mean, std, min, max, cv, n`` of latency samples in ms."""
    values = np.asarray(list(samples_ms), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ProfileError(f"need at least one latency sample, got {values.size}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        bad = values[~np.isfinite(values) | (values < 0)][:5].tolist()
        raise ProfileError(f"latency samples must be finite and >= 0; found {bad}")
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    out: dict[str, Any] = {f"p{p}": float(np.percentile(values, p, method="linear")) for p in PERCENTILES}
    out.update(mean=mean, std=std, min=float(values.min()), max=float(values.max()),
               cv=(std / mean) if mean > 0 else 0.0, n=int(values.size))
    return out


def cv_warning(summary: dict[str, Any], threshold: float = CV_THRESHOLD) -> str | None:
    """A warning when the samples vary more than ``threshold`` (coefficient of variation), else None."""
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ProfileError(f"threshold must be a finite fraction >= 0, got {threshold!r}")
    cv = summary.get("cv")
    if cv is None:
        raise ProfileError(f"summary has no 'cv'; pass the dict summarize() returns (keys: {sorted(summary)})")
    if cv <= threshold:
        return None
    return (f"latency is unstable: coefficient of variation {cv:.1%} over {summary.get('n', '?')} samples "
            f"exceeds {threshold:.1%}. Close other programs, fix the thread count, run longer, or compare "
            f"variants with interleaved runs and medians (p50) rather than means.")
