"""Profiling: latency statistics, per-layer times mapped to modules, and fair comparison of variants.

Names load on first use, so ``import trt_prune.profiling.html`` (reports) imports no backend module.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "ProfileResult": "trt_prune.profiling.result",
    "aggregate_layers": "trt_prune.profiling.aggregate",
    "interleaved_timings": "trt_prune.profiling.profile",
    "make_feeds": "trt_prune.profiling.profile",
    "measure": "trt_prune.profiling.profile",
    "resolve_input_shapes": "trt_prune.profiling.profile",
    "cv_warning": "trt_prune.profiling.stats",
    "summarize": "trt_prune.profiling.stats",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'trt_prune.profiling' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
