"""Per-layer rows summed by module, op type or stage: pure functions over row dicts (or ``LayerTime``-like
objects), importable by reports without importing any backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trt_prune.errors import ProfileError

AGGREGATE_KEYS = ("module", "op", "stage")
UNMAPPED = "(unmapped)"
ROOT = "(root)"


def _row_get(row: Any, key: str) -> Any:
    return row.get(key) if isinstance(row, Mapping) else getattr(row, key)


def stage_of(module: str | None) -> str:
    """First component of a module path (``backbone``, ``neck``, ``head``...); ``head.0.cls`` -> ``head``."""
    if module is None:
        return UNMAPPED
    if module == "":
        return ROOT
    return module.split(".", 1)[0]


def aggregate_layers(per_layer: Sequence[Any], by: str = "module"
                     ) -> list[dict[str, Any]]:
    """Sum per-layer times by ``module``, ``op`` or ``stage`` (first component of the module path).

    Returns ``{key, ms, count, share}`` rows sorted by ``ms`` descending; ``share`` is the fraction of the
    summed per-layer time. Layers without a module are grouped under ``"(unmapped)"``.
    """
    if by not in AGGREGATE_KEYS:
        raise ProfileError(f"cannot aggregate by {by!r}; choose one of {list(AGGREGATE_KEYS)}")
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in per_layer:
        module = _row_get(row, "module")
        if by == "module":
            key = UNMAPPED if module is None else (module or ROOT)
        elif by == "op":
            key = str(_row_get(row, "op"))
        else:
            key = stage_of(module)
        totals[key] = totals.get(key, 0.0) + float(_row_get(row, "ms"))
        counts[key] = counts.get(key, 0) + 1
    grand = sum(totals.values())
    rows = [{"key": k, "ms": v, "count": counts[k], "share": (v / grand) if grand > 0 else 0.0}
            for k, v in totals.items()]
    return sorted(rows, key=lambda r: (-r["ms"], r["key"]))
