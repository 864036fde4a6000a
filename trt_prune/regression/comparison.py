"""The records the regression reports are made from, checked: a comparison (what
:func:`~trt_prune.regression.live.compare_arms` and :func:`~trt_prune.regression.runner.compare_stored` return and
``trt-prune bench compare --json`` prints), the two profiles beside it, and the rows of
:meth:`~trt_prune.regression.store.Store.history`.

Pure checks, no drawing and no I/O: each returns its input (as plain dicts) when it is well formed and otherwise
raises one :class:`~trt_prune.errors.BenchError` line naming the key and the value, so a wrong file fails before
any work instead of as a ``KeyError`` halfway through a page or a table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from trt_prune.errors import BenchError
from trt_prune.profiling.compare import as_profile
from trt_prune.profiling.result import ProfileResult
from trt_prune.regression.stats import VERDICTS

REQUIRED_KEYS = ("verdict", "ratio", "ci", "p_value", "p99", "latency_ms", "baseline", "candidate",
                 "environment", "min_effect", "level")
REQUIRED_SUB_KEYS = ("verdict", "ratio", "ci")
HISTORY_KEYS = ("run", "entry", "variant", "backend", "batch", "p50_ms")
EMPTY_HISTORY = "the store has no results yet; record one with trt-prune bench run"
COMPARISON_HINT = "pass the dict that 'trt-prune bench compare --json' prints (compare_live / compare_stored)"


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, else None (None, NaN, inf, a bool, not a number, an integer too large)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _keys(mapping: Mapping) -> list[str]:
    return sorted(str(k) for k in mapping)


def _check_sub(result: Any, what: str, required: Sequence[str]) -> dict[str, Any]:
    if not isinstance(result, Mapping):
        raise BenchError(f"{what} is a {type(result).__name__}, not a comparison; {COMPARISON_HINT}")
    missing = [k for k in required if k not in result]
    if missing:
        raise BenchError(f"{what} is not a comparison: it lacks {missing} (it has {_keys(result)[:14]}); "
                         f"{COMPARISON_HINT}")
    if not isinstance(result["verdict"], str) or result["verdict"] not in VERDICTS:
        raise BenchError(f"{what}: verdict {result['verdict']!r} is not one of {list(VERDICTS)}")
    if finite_number(result["ratio"]) is None:
        raise BenchError(f"{what}: ratio {result['ratio']!r} is not a finite number")
    ci = result["ci"]
    if not isinstance(ci, Sequence) or isinstance(ci, str) or len(ci) != 2:
        raise BenchError(f"{what}: ci {ci!r} is not a [low, high] pair")
    for key in ("layers", "comparisons"):
        if result.get(key) is not None and not isinstance(result[key], list):
            raise BenchError(f"{what}: {key!r} is a {type(result[key]).__name__}, expected a list")
    for i, row in enumerate(result.get("layers") or []):
        if not isinstance(row, Mapping) or "key" not in row:
            raise BenchError(f"{what}: layers[{i}] is {str(row)[:100]!r}; each row needs 'key', 'op', 'base_ms', "
                             "'other_ms', 'delta_ms', 'ratio'")
    return dict(result)


def check_comparison(result: Any) -> dict[str, Any]:
    """Return ``result`` (a copy) if it is a comparison dict, else raise :class:`BenchError` naming what is
    wrong."""
    result = _check_sub(result, "the comparison", REQUIRED_KEYS)
    for key in ("p99", "latency_ms", "environment"):
        if not isinstance(result[key], Mapping):
            raise BenchError(f"the comparison: {key!r} is a {type(result[key]).__name__}, expected a dict")
    differences = result["environment"].get("differences")
    if differences is not None and not isinstance(differences, list):
        raise BenchError(f"the comparison: environment 'differences' is {str(differences)[:80]!r}, expected a list "
                         "of lines")
    if result.get("accuracy") is not None and not isinstance(result["accuracy"], Mapping):
        raise BenchError(f"the comparison: 'accuracy' is a {type(result['accuracy']).__name__}, expected a dict")
    if finite_number(result["min_effect"]) is None or not 0 < result["min_effect"] < 1:
        raise BenchError(f"the comparison: min_effect {result['min_effect']!r} is not a fraction in (0, 1)")
    for i, sub in enumerate(result.get("comparisons") or []):
        _check_sub(sub, f"the comparison's comparisons[{i}]", REQUIRED_SUB_KEYS)
    return result


def check_profiles(profiles: Any) -> list[ProfileResult] | None:
    """``profiles`` as two checked records (baseline, candidate), or None when there are none. Not two of
    anything raises :class:`BenchError`; one that is not a profile raises
    :class:`~trt_prune.errors.ProfileError` naming the side and the field."""
    if profiles is None:
        return None
    if not isinstance(profiles, Sequence) or isinstance(profiles, str) or len(profiles) != 2:
        raise BenchError(f"profiles must be two ProfileResult dicts (baseline, candidate), got {str(profiles)[:100]!r}")
    return [as_profile(p, f"the {side} profile") for p, side in zip(profiles, ("baseline", "candidate"), strict=True)]


def check_history(rows: Any) -> list[dict[str, Any]]:
    """Return ``rows`` (copies) if they are :meth:`Store.history` rows, else raise :class:`BenchError`; no rows
    at all is :data:`EMPTY_HISTORY`."""
    if not isinstance(rows, Sequence) or isinstance(rows, str):
        raise BenchError(f"history rows must be a list of dicts (Store.history()), got a {type(rows).__name__}")
    if not rows:
        raise BenchError(EMPTY_HISTORY)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise BenchError(f"history row {i} is a {type(row).__name__}, not a dict (Store.history() rows)")
        missing = [k for k in HISTORY_KEYS if k not in row]
        if missing:
            raise BenchError(f"history row {i} lacks {missing} (it has {_keys(row)}); pass Store.history() rows")
        for key in ("run", "entry", "variant", "backend"):
            if not isinstance(row[key], str):
                raise BenchError(f"history row {i}: {key} {row[key]!r} is not a string")
        if not isinstance(row["batch"], int) or isinstance(row["batch"], bool):
            raise BenchError(f"history row {i}: batch {row['batch']!r} is not an integer")
        if finite_number(row["p50_ms"]) is None:
            raise BenchError(f"history row {i}: p50_ms {row['p50_ms']!r} is not a finite number")
    return [dict(r) for r in rows]
