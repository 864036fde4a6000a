"""Profiles read, checked and compared: pure functions over :class:`~trt_prune.profiling.result.ProfileResult`.

This is what the regression gate, the CLI and the reports share: :func:`load_profile` (a file, checked field by
field), :func:`compare_layers` and :func:`compare_totals` (two profiles side by side), :func:`per_layer_share`
(per-layer times against the end-to-end latency) and the number formats the reports print. Nothing here draws,
writes HTML or imports a backend; every function takes a ``ProfileResult`` or its dict (checked by
:meth:`ProfileResult.from_dict <trt_prune.profiling.result.ProfileResult.from_dict>`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trt_prune.errors import ProfileError
from trt_prune.profiling.aggregate import ROOT
from trt_prune.profiling.result import ProfileResult

DASH = "–"
WRITE_HINT = "give a JSON file written by 'trt-prune profile -o FILE.json'"


# ---------------------------------------------------------------- input


def as_profile(profile: ProfileResult | Mapping[str, Any], what: str = "profile") -> ProfileResult:
    """``profile`` as a checked record: a :class:`ProfileResult` as it is, a dict through
    :meth:`ProfileResult.from_dict` (which raises :class:`ProfileError` naming ``what`` and the bad field)."""
    if isinstance(profile, ProfileResult):
        return profile
    return ProfileResult.from_dict(profile, what)


def load_profile(path: str | os.PathLike) -> ProfileResult:
    """Read and check a profile JSON file; any problem (missing, unreadable, not JSON, not a profile, a field of
    the wrong type, a newer format) is one :class:`ProfileError` line that names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ProfileError(f"cannot read profile '{path}' ({reason}); {WRITE_HINT}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile '{path}' is not JSON ({exc.msg} at line {exc.lineno}); {WRITE_HINT}") from exc
    except (ValueError, RecursionError) as exc:  # an integer too long to convert; nesting deeper than Python's stack
        raise ProfileError(f"profile '{path}' cannot be read as JSON ({type(exc).__name__}: "
                           f"{str(exc)[:80]}); {WRITE_HINT}") from exc
    return ProfileResult.from_dict(data, what=f"profile '{path}'")


# ---------------------------------------------------------------- numbers as text


def format_ms(value: float | None) -> str:
    """Milliseconds with precision that suits their size: ``5.264``, ``0.0130``, ``1234.5``."""
    if value is None:
        return DASH
    value = float(value)
    if abs(value) >= 1000:
        return f"{value:.1f}"
    if abs(value) >= 1 or value == 0:
        return f"{value:.3f}"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.2e}"


def format_percent(fraction: float | None) -> str:
    """``12.3 %``; a dash when unknown."""
    return DASH if fraction is None else f"{fraction * 100:.1f} %"


# ---------------------------------------------------------------- per-layer against end to end


def per_layer_share(profile: ProfileResult | Mapping[str, Any]) -> str | None:
    """The sentence comparing the summed per-layer times with the end-to-end mean latency, or None when the
    profile has no per-layer times."""
    profile = as_profile(profile)
    rows = profile.per_layer
    if not rows:
        return None
    total = profile.per_layer_sum_ms
    total = float(total) if total is not None else sum(float(r["ms"]) for r in rows)
    mean = float(profile.latency_ms["mean"])
    share = total / mean if mean > 0 else None
    text = (f"per-layer sum {format_ms(total)} ms = {format_percent(share)} of the mean end-to-end latency "
            f"{format_ms(mean)} ms")
    run = profile.per_layer_run_ms
    if share is not None and abs(share - 1) <= 0.10:
        run_note = f" whose mean was {format_ms(run)} ms" if run is not None else ""
        return text + f" (within ±10 %; per-layer times come from a separate instrumented run{run_note})"
    if run is not None and run > 0 and share is not None:
        # outside ±10 %: say which of the two effects it is, with the numbers
        return (text + f": outside ±10 % because the per-layer times come from a separate instrumented run, "
                f"whose mean was {format_ms(run)} ms ({format_percent(run / mean)} of the timed run), and the "
                f"layers cover {format_percent(total / run)} of that run (the rest: gaps between layers, copies, "
                "the runtime)")
    where = "a separate instrumented run" + (f" whose mean was {format_ms(run)} ms" if run is not None else "")
    return (text + f" (per-layer times come from {where}, so the two need not agree: end to end also covers "
            "gaps between layers and copies, per layer carries the instrumentation)")


# ---------------------------------------------------------------- two profiles side by side


def layer_key(row: Mapping[str, Any]) -> str:
    """What a layer is matched and labelled by: its PyTorch module path, else (no module) the backend's layer
    name. Module paths survive pruning and re-export; backend layer names often do not."""
    module = row.get("module")
    if module is None:
        return str(row["name"])
    return module or ROOT


def _sum_by_key(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, list[str]]]:
    out: dict[str, tuple[float, list[str]]] = {}
    for row in rows:
        key = layer_key(row)
        ms, ops = out.get(key, (0.0, []))
        if str(row["op"]) not in ops:
            ops = [*ops, str(row["op"])]
        out[key] = (ms + float(row["ms"]), ops)
    return out


def compare_layers(base: ProfileResult | Mapping[str, Any], other: ProfileResult | Mapping[str, Any]
                   ) -> list[dict[str, Any]]:
    """Layer by layer side by side: ``{key, op, base_ms, other_ms, delta_ms, ratio}`` rows.

    Rows match by :func:`layer_key` (module path, else layer name), summing the rows of one profile that share
    a key (a backend may split one module over several kernels). ``delta_ms = other_ms - base_ms`` and
    ``ratio = other_ms / base_ms``; both are None when a side lacks the key (and ``ratio`` when ``base_ms`` is
    0). Sorted by how much each row changes the total: ``|delta_ms|``, or the present side's time for a layer
    only one side has (it vanished or appeared whole), largest first.
    """
    a = _sum_by_key(as_profile(base, "base profile").per_layer)
    b = _sum_by_key(as_profile(other, "other profile").per_layer)
    rows = []
    for key in list(a) + [k for k in b if k not in a]:
        base_ms, base_ops = a.get(key, (None, []))
        other_ms, other_ops = b.get(key, (None, []))
        ops = base_ops + [o for o in other_ops if o not in base_ops]
        both = base_ms is not None and other_ms is not None
        rows.append({"key": key, "op": "+".join(ops), "base_ms": base_ms, "other_ms": other_ms,
                     "delta_ms": (other_ms - base_ms) if both else None,
                     "ratio": (other_ms / base_ms) if both and base_ms > 0 else None})

    def change(row: dict[str, Any]) -> float:
        if row["delta_ms"] is not None:
            return abs(row["delta_ms"])
        return row["base_ms"] if row["base_ms"] is not None else row["other_ms"]

    return sorted(rows, key=lambda r: (-change(r), r["key"]))


def compare_totals(base: ProfileResult | Mapping[str, Any], other: ProfileResult | Mapping[str, Any]
                   ) -> dict[str, Any]:
    """End-to-end and per-layer totals of two profiles: ``{metric: {base, other, delta, ratio}}`` for the
    mean, p50 and p99 latency, throughput and the per-layer sum, plus how many layer keys matched."""
    base = as_profile(base, "base profile")
    other = as_profile(other, "other profile")
    rows = compare_layers(base, other)

    def entry(x: float | None, y: float | None) -> dict[str, float | None]:
        both = x is not None and y is not None
        return {"base": x, "other": y, "delta": (y - x) if both else None,
                "ratio": (y / x) if both and x > 0 else None}

    def layer_sum(p: ProfileResult) -> float | None:
        return sum(float(r["ms"]) for r in p.per_layer) if p.per_layer else None

    out: dict[str, Any] = {
        f"latency_{k}_ms": entry(float(base.latency_ms[k]), float(other.latency_ms[k])) for k in ("mean", "p50", "p99")}
    out["throughput_ips"] = entry(float(base.throughput_ips), float(other.throughput_ips))
    out["per_layer_sum_ms"] = entry(layer_sum(base), layer_sum(other))
    out["layers"] = {"matched": sum(r["delta_ms"] is not None for r in rows),
                     "base_only": sum(r["other_ms"] is None for r in rows),
                     "other_only": sum(r["base_ms"] is None for r in rows)}
    return out


def profile_labels(base: ProfileResult | Mapping[str, Any], other: ProfileResult | Mapping[str, Any]
                   ) -> tuple[str, str]:
    """Short names for two profiles: their ONNX file stems, with the folder when the stems agree, else
    ``baseline`` and ``this profile``."""
    def names(p: ProfileResult) -> tuple[str, str]:
        path = Path(p.onnx)
        return path.stem, f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem

    (a1, a2), (b1, b2) = names(as_profile(base, "base profile")), names(as_profile(other, "other profile"))
    if a1 and b1 and a1 != b1:
        return a1, b1
    if a2 and b2 and a2 != b2:
        return a2, b2
    return "baseline", "this profile"
