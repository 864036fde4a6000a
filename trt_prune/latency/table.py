"""Latency tables: measured time of single layers as a function of their kept channel counts.

A *layer signature* (:class:`LayerSig`) is everything about a conv or linear layer that decides its cost except
its kept channel counts: the op, kernel, stride, padding, dilation, groups, the input's spatial size (or token
count), the batch and the dense channel counts (so every grid spans one layer shape). A table holds, per
signature, a rectangular grid of measured times over the kept input and output counts (one axis for depthwise
and grouped convs, whose inputs are their outputs). Grid points are aligned counts only (multiples of
``round_to``, plus the dense count); between them the time is interpolated linearly on each axis (bilinear on
2-D grids), and outside the grid it is clamped to the edge. A plan's counts are multiples of ``round_to``, so a
plan never reads outside the grid it was measured for.

One table is one JSON file measured in one environment (:class:`TableKey`: backend, its version, device,
threads, dtype); a file from another environment is refused, naming both, because latencies do not transfer.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LatencyError

TABLE_FORMAT = "trt_prune.latency_table"
TABLE_VERSION = 1
TABLE_FILE = "latency_table.json"
OPS = ("conv", "depthwise", "grouped", "conv_transpose", "linear")


@dataclass(frozen=True)
class LayerSig:
    """What decides a layer's cost besides its channel counts.

    ``op``: ``conv`` (groups=1), ``depthwise`` (one channel per group: the count is the input's and the
    output's), ``grouped`` (``groups`` groups that keep equal widths), ``conv_transpose`` or ``linear``.
    ``spatial``: the input's spatial size for convs, ``(rows,)`` for linear layers (every leading axis of the
    input but the batch, multiplied out). ``dense``: the unpruned (in, out) counts; layers repeated in a
    network (same geometry, same widths) share one entry.
    """

    op: str
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    spatial: tuple[int, ...] = ()
    batch: int = 1
    bias: bool = True
    dense: tuple[int, int] = (0, 0)

    def key(self) -> str:
        def t(v):
            return "x".join(str(i) for i in v) or "-"
        return (f"{self.op}|c{t(self.dense)}|k{t(self.kernel)}|s{t(self.stride)}|p{t(self.padding)}"
                f"|d{t(self.dilation)}|g{self.groups}|in{t(self.spatial)}|b{self.batch}|bias{int(self.bias)}")

    @property
    def one_axis(self) -> bool:
        """Depthwise and grouped convs have one count: their outputs are their inputs."""
        return self.op in ("depthwise", "grouped")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSig:
        if not isinstance(d, dict) or d.get("op") not in OPS:
            raise LatencyError(f"layer signature {str(d)[:80]} has no known op (one of {OPS})")
        try:
            return cls(op=d["op"], kernel=tuple(int(i) for i in d.get("kernel", ())),
                       stride=tuple(int(i) for i in d.get("stride", ())),
                       padding=tuple(int(i) for i in d.get("padding", ())),
                       dilation=tuple(int(i) for i in d.get("dilation", ())), groups=int(d.get("groups", 1)),
                       spatial=tuple(int(i) for i in d.get("spatial", ())), batch=int(d.get("batch", 1)),
                       bias=bool(d.get("bias", True)), dense=tuple(int(i) for i in d.get("dense", (0, 0))))
        except (TypeError, ValueError) as exc:
            raise LatencyError(f"layer signature {str(d)[:80]} has a non-integer field ({exc})") from exc


@dataclass(frozen=True)
class TableKey:
    """The environment a table was measured in: a table from another one is refused."""

    backend: str
    backend_version: str
    device: str
    threads: int
    dtype: str = "float32"

    def describe(self) -> str:
        return (f"{self.backend} {self.backend_version} on {self.device}, {self.threads} thread"
                f"{'s' if self.threads != 1 else ''}, {self.dtype}")


def axis_points(dense: int, round_to: int, points: int, lowest: int | None = None) -> list[int]:
    """Grid counts for one axis of ``dense`` channels: about ``points`` multiples of ``round_to`` spread evenly
    from ``lowest`` (default ``round_to``) up to the dense count, which is always included."""
    if dense <= round_to:
        return [dense]
    top = dense // round_to
    low = max(1, math.ceil((lowest or round_to) / round_to))
    steps = np.unique(np.round(np.linspace(low, top, max(2, points))).astype(int))
    values = sorted({int(s) * round_to for s in steps if 1 <= s <= top} | {dense})
    return values


@dataclass
class Entry:
    """One signature's grid: ``ins`` × ``outs`` (``outs`` is ``[0]`` for one-axis ops), times in ms."""

    sig: LayerSig
    ins: list[int]
    outs: list[int]
    ms: np.ndarray  # shape (len(ins), len(outs)); NaN where not measured yet
    sparse_ms: np.ndarray | None = None  # the same grid with 2:4 weights on a backend with sparse kernels
    overhead_ms: float = 0.0  # the backend's per-call cost, measured beside the grid and subtracted from it

    def missing(self) -> list[tuple[int, int]]:
        gap = np.isnan(self.ms) if self.sparse_ms is None else np.isnan(self.ms) | np.isnan(self.sparse_ms)
        return [(self.ins[i], self.outs[j]) for i, j in zip(*np.nonzero(gap), strict=False)]

    def extend(self, ins: list[int], outs: list[int]) -> None:
        """Make the grid the union of the current axes and these; new points are NaN until measured."""
        new_ins, new_outs = sorted(set(self.ins) | set(ins)), sorted(set(self.outs) | set(outs))
        if new_ins == self.ins and new_outs == self.outs:
            return
        ii = [new_ins.index(v) for v in self.ins]
        jj = [new_outs.index(v) for v in self.outs]

        def grown(old):
            new = np.full((len(new_ins), len(new_outs)), np.nan)
            new[np.ix_(ii, jj)] = old
            return new
        self.ms = grown(self.ms)
        self.sparse_ms = None if self.sparse_ms is None else grown(self.sparse_ms)
        self.ins, self.outs = new_ins, new_outs

    def set(self, c_in: int, c_out: int, ms: float, sparse: bool = False) -> None:
        (self.sparse_ms if sparse else self.ms)[self.ins.index(c_in), self.outs.index(c_out)] = ms

    def time(self, c_in: float, c_out: float = 0, sparse: bool = False) -> float:
        """Interpolated time (ms) at these counts: linear on each axis between neighbouring grid points,
        clamped at the grid's edges. ``sparse``: the 2:4 grid's time."""
        m = self.sparse_ms if sparse else self.ms
        if m is None:
            raise LatencyError(f"latency table entry {self.sig.key()} has no 2:4 times (measured on a backend "
                               "without sparse kernels)")
        if np.isnan(m).any():
            raise LatencyError(f"latency table entry {self.sig.key()} is incomplete; measure it first")
        return self.interpolate(m, c_in, c_out)

    def interpolate(self, m: np.ndarray, c_in: float, c_out: float) -> float:
        """Bilinear interpolation of grid ``m`` (no checks: the latency model checks entries once)."""
        i0, i1, fi = _bracket(self.ins, c_in)
        j0, j1, fj = _bracket(self.outs, c_out)
        return float((1 - fi) * ((1 - fj) * m[i0, j0] + fj * m[i0, j1]) + fi * ((1 - fj) * m[i1, j0] + fj * m[i1, j1]))

    def to_dict(self) -> dict[str, Any]:
        def grid(m):
            return [[None if math.isnan(v) else round(float(v), 6) for v in row] for row in m]
        out = {"sig": self.sig.to_dict(), "ins": self.ins, "outs": self.outs, "ms": grid(self.ms),
               "overhead_ms": round(float(self.overhead_ms), 6)}
        if self.sparse_ms is not None:
            out["sparse_ms"] = grid(self.sparse_ms)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        if not isinstance(d, dict):
            raise LatencyError(f"latency table entry must be an object, got {type(d).__name__}")
        sig = LayerSig.from_dict(d.get("sig"))
        ins, outs, ms, sparse = d.get("ins"), d.get("outs"), d.get("ms"), d.get("sparse_ms")

        def is_grid(m) -> bool:
            return (isinstance(m, list) and len(m) == len(ins)
                    and all(isinstance(row, list) and len(row) == len(outs) for row in m)
                    and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and math.isfinite(v) and v >= 0) for row in m for v in row))
        ok = (isinstance(ins, list) and isinstance(outs, list) and ins and outs
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ins + outs)
              and ins == sorted(set(ins)) and outs == sorted(set(outs)) and is_grid(ms)
              and (sparse is None or is_grid(sparse)))
        if not ok:
            raise LatencyError(f"latency table entry {sig.key()} is malformed: it needs sorted integer 'ins' and "
                               "'outs' and an 'ms' grid (and optionally 'sparse_ms') of non-negative times of that "
                               "shape")

        def array(m):
            return np.array([[np.nan if v is None else float(v) for v in row] for row in m], dtype=float)
        overhead = d.get("overhead_ms", 0.0)
        if not isinstance(overhead, (int, float)) or isinstance(overhead, bool) or not math.isfinite(overhead):
            raise LatencyError(f"latency table entry {sig.key()} has a non-numeric overhead_ms")
        return cls(sig, list(ins), list(outs), array(ms), None if sparse is None else array(sparse), float(overhead))


def _bracket(axis: list[int], v: float) -> tuple[int, int, float]:
    if len(axis) == 1 or v <= axis[0]:
        return 0, 0, 0.0
    if v >= axis[-1]:
        return len(axis) - 1, len(axis) - 1, 0.0
    hi = bisect.bisect_right(axis, v)  # the planner calls this tens of thousands of times: no numpy here
    lo = hi - 1
    return lo, hi, (v - axis[lo]) / (axis[hi] - axis[lo])


@dataclass
class LatencyTable:
    """Per-signature grids measured in one environment (:class:`TableKey`), plus the measured constant of each
    model the table has been calibrated on (what the layers do not cover: see :mod:`trt_prune.latency.model`)."""

    key: TableKey
    entries: dict[str, Entry] = field(default_factory=dict)
    calibrations: dict[str, dict[str, Any]] = field(default_factory=dict)
    measure_seconds: float = 0.0

    def entry(self, sig: LayerSig) -> Entry | None:
        return self.entries.get(sig.key())

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, "key": asdict(self.key),
                "measure_seconds": round(self.measure_seconds, 3),
                "entries": [e.to_dict() for _, e in sorted(self.entries.items())],
                "calibrations": self.calibrations}

    @classmethod
    def from_dict(cls, d: Any, where: str = "latency table") -> LatencyTable:
        if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
            raise LatencyError(f"{where} is not a trt_prune latency table (format must be '{TABLE_FORMAT}')")
        if d.get("version") != TABLE_VERSION:
            raise LatencyError(f"{where} has version {str(d.get('version'))[:20]}; this trt_prune reads version "
                               f"{TABLE_VERSION}: build the table again")
        k = d.get("key")
        try:
            key = TableKey(backend=str(k["backend"]), backend_version=str(k["backend_version"]),
                           device=str(k["device"]), threads=int(k["threads"]), dtype=str(k.get("dtype", "float32")))
        except (KeyError, TypeError, ValueError) as exc:
            raise LatencyError(f"{where} has no valid environment key (backend, backend_version, device, threads, "
                               f"dtype): {exc}") from exc
        entries_in = d.get("entries")
        calibrations = d.get("calibrations", {})
        if not isinstance(entries_in, list) or not isinstance(calibrations, dict):
            raise LatencyError(f"{where}: 'entries' must be a list and 'calibrations' an object")
        entries = {}
        for raw in entries_in:
            e = Entry.from_dict(raw)
            entries[e.sig.key()] = e
        return cls(key, entries, calibrations, float(d.get("measure_seconds", 0.0) or 0.0))

    def save(self, folder: str | Path) -> Path:
        from ..artifacts import write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return write_json(folder / TABLE_FILE, self.to_dict())


def table_path(location: str | Path) -> Path:
    """The table file of ``location``: a folder holding ``latency_table.json``, or the JSON file itself."""
    p = Path(location)
    return p if p.suffix == ".json" else p / TABLE_FILE


def load_table(location: str | Path, expect: TableKey | None = None) -> LatencyTable:
    """Read a table; with ``expect``, refuse one measured in another environment, naming both."""
    path = table_path(location)
    if not path.is_file():
        raise LatencyError(f"no latency table at '{path}'; build one with `trt-prune latency-table MODEL -o "
                           f"{path.parent}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LatencyError(f"latency table '{path}' is not readable JSON ({type(exc).__name__}: {exc}); delete it "
                           "and build it again") from exc
    table = LatencyTable.from_dict(data, where=f"latency table '{path}'")
    if expect is not None and table.key != expect:
        raise LatencyError(f"latency table '{path}' was measured with {table.key.describe()}, but this run uses "
                           f"{expect.describe()}; latencies do not transfer between them: use another folder "
                           "(one table per environment) or match the environment")
    return table
