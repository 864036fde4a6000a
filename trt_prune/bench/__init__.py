"""Regression benchmarks: a verdict on every change, for speed and accuracy (statistics in :mod:`.stats`)."""

from trt_prune.bench.stats import (
    VERDICTS,
    RatioEstimate,
    accuracy_gate,
    decide,
    mann_whitney,
    ratio_ci,
)
from trt_prune.errors import BenchError

__all__ = ["VERDICTS", "BenchError", "RatioEstimate", "accuracy_gate", "decide", "mann_whitney", "ratio_ci"]
