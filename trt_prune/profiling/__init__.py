"""Profiling: latency statistics, per-layer times mapped to modules, and fair comparison of variants."""

from trt_prune.profiling.profile import (
                                         ProfileResult,
                                         aggregate_layers,
                                         interleaved_timings,
                                         make_feeds,
                                         profile_onnx,
                                         profile_torch,
                                         resolve_input_shapes,
)
from trt_prune.profiling.stats import cv_warning, summarize

__all__ = ["ProfileResult", "aggregate_layers", "cv_warning", "interleaved_timings", "make_feeds",
           "profile_onnx", "profile_torch", "resolve_input_shapes", "summarize"]
