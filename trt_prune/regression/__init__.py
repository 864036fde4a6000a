"""Regression benchmarks: a verdict on every change, for speed and accuracy (statistics in :mod:`.stats`)."""

from trt_prune.errors import BenchError
from trt_prune.regression.stats import (
    VERDICTS,
    RatioEstimate,
    accuracy_gate,
    decide,
    mann_whitney,
    ratio_ci,
)

__all__ = ["VERDICTS", "BenchError", "RatioEstimate", "accuracy_gate", "decide", "mann_whitney", "ratio_ci"]
