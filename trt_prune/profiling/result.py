"""The record a profile run produces, as stored on disk and read back for comparisons and reports.

On disk a profile is the JSON of :meth:`ProfileResult.to_dict`: every field plus ``"format":
"trt_prune.profile"`` and ``"version"``. :meth:`ProfileResult.from_dict` reads it back and checks every field,
so a wrong or damaged file fails on load with one line naming the file and the field, never later as a
``KeyError`` or ``TypeError`` halfway through a report. Files written before the version field existed read
as version 1; a newer version is refused with the advice to upgrade.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trt_prune.errors import ProfileError

PROFILE_FORMAT = "trt_prune.profile"
PROFILE_VERSION = 1
LATENCY_KEYS = ("p50", "p90", "p95", "p99", "mean", "std", "min", "max", "cv", "n")
REQUIRED_KEYS = ("backend", "onnx", "batch", "input_shapes", "latency_ms", "throughput_ips", "throughput_images_s",
                 "per_layer")
HINT = "pass ProfileResult.to_dict() or a JSON file written by 'trt-prune profile -o FILE.json'"


@dataclass
class ProfileResult:
    """One profiling run. ``latency_ms`` is :func:`~trt_prune.profiling.stats.summarize` of ``samples_ms``;
    ``per_layer`` rows are ``{name, op, module, ms, members}`` sorted by ``ms`` descending;
    ``per_layer_run_ms`` is the backend's own mean run time during the per-layer run (instrumented, so
    larger than ``latency_ms``); ``env`` says where it ran. ``breakdown`` is trtexec's per-phase summary
    (latency, enqueue, H2D, GPU compute, D2H from CUDA events; :func:`~trt_prune.profiling.stats.timing_breakdown`)
    for backends that can time the phases apart (TensorRT), from its own run after the end-to-end one."""

    backend: str
    onnx: str
    batch: int
    input_shapes: dict[str, list[int]]
    latency_ms: dict[str, Any]
    throughput_ips: float
    throughput_images_s: float
    per_layer: list[dict[str, Any]] = field(default_factory=list)
    per_layer_sum_ms: float | None = None
    per_layer_run_ms: float | None = None
    cv_warning: str | None = None
    env: dict[str, Any] = field(default_factory=dict)
    samples_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    breakdown: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, tagged with the format and its version (what :meth:`from_dict`
        reads)."""
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, what: str = "profile") -> ProfileResult:
        """The record in ``data`` (a :meth:`to_dict` dict or its JSON), every field checked.

        Keys other than the fields (``per_layer_vs_e2e``, ``aggregates``... that ``trt-prune profile -o`` adds)
        are ignored. Anything malformed raises :class:`ProfileError` naming ``what`` (say, the file), the field
        and its value.
        """
        return _Reader(what).read(data)


# ---------------------------------------------------------------- reading


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    """A number that is neither NaN nor infinite (nor an integer too large for a float)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:
        return False


class _Reader:
    """Checks one profile dict field by field; every failure is one :class:`ProfileError` line."""

    def __init__(self, what: str):
        self.what = what

    def fail(self, message: str) -> ProfileError:
        return ProfileError(f"{self.what}: {message}; {HINT}")

    def read(self, data: Any) -> ProfileResult:
        if not isinstance(data, Mapping):
            raise ProfileError(f"{self.what} is a {type(data).__name__}, not a profile; {HINT}")
        self.check_format(data)
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            has = sorted(str(k) for k in data)[:12]
            raise ProfileError(f"{self.what} is not a profile: it lacks {missing} (it has {has}); {HINT}")
        latency = self.latency(data["latency_ms"])
        ips = self.throughput(data, "throughput_ips", latency)
        return ProfileResult(
            backend=self.text(data["backend"], "'backend'", empty=False),
            onnx=self.text(data["onnx"], "'onnx'"),
            batch=self.integer(data["batch"], "'batch'", low=1),
            input_shapes=self.shapes(data["input_shapes"]),
            latency_ms=latency,
            throughput_ips=ips,
            throughput_images_s=self.throughput(data, "throughput_images_s", latency),
            per_layer=self.layers(data["per_layer"]),
            per_layer_sum_ms=self.optional_ms(data.get("per_layer_sum_ms"), "'per_layer_sum_ms'"),
            per_layer_run_ms=self.optional_ms(data.get("per_layer_run_ms"), "'per_layer_run_ms'"),
            cv_warning=None if data.get("cv_warning") is None else self.text(data["cv_warning"], "'cv_warning'"),
            env=self.env(data.get("env")),
            samples_ms=self.samples(data.get("samples_ms")),
            notes=self.strings(data.get("notes"), "notes"),
            breakdown=self.breakdown(data.get("breakdown")),
        )

    def check_format(self, data: Mapping) -> None:
        fmt = data.get("format", PROFILE_FORMAT)
        if fmt != PROFILE_FORMAT:
            raise ProfileError(f"{self.what} is a {_short(fmt)} file, not a profile ('format' must be "
                               f"{PROFILE_FORMAT!r}); {HINT}")
        version = data.get("version", 1)  # files from before the version field are version 1
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise self.fail(f"'version' is {_short(version)}, expected a positive integer (this trt_prune writes "
                            f"{PROFILE_VERSION})")
        if version > PROFILE_VERSION:
            from trt_prune import __version__

            raise ProfileError(f"{self.what} is profile format version {version}, written by a newer trt_prune; "
                               f"trt_prune {__version__} reads version {PROFILE_VERSION} and older: upgrade "
                               "trt_prune to read it")

    # ``name`` is the field as the message shows it: 'batch', latency_ms['n'], per_layer[3]['ms']
    def text(self, value: Any, name: str, empty: bool = True) -> str:
        if not isinstance(value, str) or (not empty and not value):
            raise self.fail(f"{name} is {_short(value)}, expected a{'' if empty else ' non-empty'} string")
        return value

    def integer(self, value: Any, name: str, low: int = 0) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self.fail(f"{name} is {_short(value)}, expected an integer >= {low}")
        return value

    def ms(self, value: Any, name: str) -> float:
        if not _is_finite(value) or value < 0:
            raise self.fail(f"{name} is {_short(value)}, expected a finite number >= 0")
        return float(value)

    def optional_ms(self, value: Any, name: str) -> float | None:
        return None if value is None else self.ms(value, name)

    def latency(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(f"'latency_ms' is a {type(value).__name__}, expected a dict of {list(LATENCY_KEYS)}")
        missing = [k for k in LATENCY_KEYS if not _is_number(value.get(k))]
        if missing:
            raise self.fail(f"'latency_ms' lacks numbers for {missing}")
        out: dict[str, Any] = {k: self.ms(value[k], f"latency_ms[{k!r}]") for k in LATENCY_KEYS if k != "n"}
        out["n"] = self.integer(value["n"], "latency_ms['n']", low=1)
        return out

    def throughput(self, data: Mapping, name: str, latency: Mapping[str, Any]) -> float:
        value = data[name]
        # a mean latency of 0 ms gives an infinite rate (what profile_record writes then), nothing else does
        if _is_number(value) and math.isinf(value) and value > 0 and latency["mean"] == 0:
            return float(value)
        return self.ms(value, repr(name))

    def shapes(self, value: Any) -> dict[str, list[int]]:
        if not isinstance(value, Mapping):
            raise self.fail(f"'input_shapes' is {_short(value)}, expected a dict of input name to shape")
        out = {}
        for name, shape in value.items():
            if not isinstance(name, str) or not isinstance(shape, list) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise self.fail(f"input_shapes[{_short(name)}] is {_short(shape)}, expected a list of integers >= 0")
            out[name] = list(shape)
        return out

    def layers(self, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list):
            raise self.fail(f"'per_layer' is a {type(value).__name__}, expected a list of rows")
        rows = []
        for i, row in enumerate(value):
            need = "each row needs 'name' and 'op' (strings) and 'ms' (a finite number >= 0)"
            if not isinstance(row, Mapping) or not isinstance(row.get("name"), str) \
                    or not isinstance(row.get("op"), str) or not _is_number(row.get("ms")):
                raise self.fail(f"per_layer[{i}] is {_short(row)}; {need}")
            module = row.get("module")
            if module is not None and not isinstance(module, str):
                raise self.fail(f"per_layer[{i}]['module'] is {_short(module)}, expected a string or null")
            rows.append({"name": row["name"], "op": row["op"], "module": module,
                         "ms": self.ms(row["ms"], f"per_layer[{i}]['ms']"),
                         "members": self.strings(row.get("members"), f"per_layer[{i}]['members']")})
        return rows

    def strings(self, value: Any, name: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"{name} is {_short(value)}, expected a list of strings")
        return list(value)

    def samples(self, value: Any) -> list[float]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(f"'samples_ms' is a {type(value).__name__}, expected a list of milliseconds")
        return [self.ms(v, f"samples_ms[{i}]") for i, v in enumerate(value)]

    def env(self, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise self.fail(f"'env' is {_short(value)}, expected a dict with string keys")
        if "providers" in value:  # the report joins them
            self.strings(value["providers"], "env['providers']")
        return dict(value)

    def breakdown(self, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise self.fail(f"'breakdown' is {_short(value)}, expected a dict with string keys or null")
        if value.get("warnings") is not None:
            self.strings(value["warnings"], "breakdown['warnings']")
        return dict(value)
