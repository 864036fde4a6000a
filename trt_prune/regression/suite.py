"""Benchmark suites (YAML): models × variants × backends × batch sizes, each with the accuracy to track.

```yaml
name: demo                      # default: the file's stem
backends: [onnxruntime]         # onnxruntime, tensorrt, torch
batches: [1]
threads: 1                      # backend threads (null: the backend's default)
blocks: 8                       # interleaved rounds; every variant of an entry runs once per round
per_block: 10                   # timed calls per variant and round
accuracy_images: 100            # RoadScenes validation scenes for mAP, where the model has it
entries:
  - model: builtin:demo-detector
    input_shape: [1, 3, 320, 320]   # optional: the model's own
    accuracy: auto                  # auto (mAP for the demo detector's family), map, none
    variants:
      dense: {}
      structured: {prune: {ratio: 0.1, round_to: 16, recalibrate_bn: 8}}   # BN statistics re-estimated
      sparse24: {sparsify: {min_channels: 64}}
      recipe: {recipe: recipes/r.json}       # a recipe written by trt-prune prune, relative to the suite
      pruned: {path: out/pruned}             # a model folder or ONNX file, relative to the suite
      slowed: {planted_steps: 200}           # planted work (bench calibration; see trt_prune.regression.planted)
```

:func:`load_suite` validates everything before any work starts and names the first bad value with its place
(``entries[0].variants.structured.prune.ratio``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trt_prune.errors import BenchError

BACKENDS = ("onnxruntime", "tensorrt", "torch")
VARIANT_KINDS = ("prune", "sparsify", "recipe", "path", "planted_steps")


@dataclass
class Variant:
    name: str
    spec: dict[str, Any]

    @property
    def kind(self) -> str:
        return next(iter(self.spec), "dense")


@dataclass
class Entry:
    model: str
    variants: list[Variant]
    input_shape: tuple[int, ...] | None = None
    accuracy: str = "auto"


@dataclass
class Suite:
    name: str
    path: str
    entries: list[Entry]
    backends: list[str] = field(default_factory=lambda: ["onnxruntime"])
    batches: list[int] = field(default_factory=lambda: [1])
    threads: int | None = 1
    blocks: int = 8
    per_block: int = 10
    accuracy_images: int = 100
    raw: dict[str, Any] = field(default_factory=dict)

    def resolve(self, relative: str) -> Path:
        """A path from the suite file, relative to the suite's folder."""
        path = Path(relative)
        return path if path.is_absolute() else Path(self.path).parent / path


def _fail(where: str, message: str):
    raise BenchError(f"suite {where}: {message}")


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: no such file either way
        return False


def _int_list(value, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_int(v, 1) for v in values):
        _fail(where, f"must be a positive integer or a list of them, got {value!r}")
    return values


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file."""
    import yaml

    src = Path(path)
    if not src.is_file():
        raise BenchError(f"suite file {str(src)!r} does not exist; write one (see the README's bench section)")
    try:
        raw = yaml.safe_load(src.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as exc:
        # ValueError: not UTF-8, or an integer too long to convert. A YAML error's text spans lines (the
        # offending line and a caret under it): it is joined into one
        reason = " ".join(str(exc).split()) if not isinstance(exc, RecursionError) else "nested too deeply"
        raise BenchError(f"suite file {str(src)!r} is not readable YAML: {reason[:300]}") from exc
    if not isinstance(raw, dict):
        raise BenchError(f"suite file {str(src)!r} must hold a mapping with 'entries', got {type(raw).__name__}")
    known = {"name", "backends", "batches", "threads", "blocks", "per_block", "accuracy_images", "entries"}
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        _fail("top level", f"unknown key(s) {unknown}; known: {sorted(known)}")
    backends = raw.get("backends", ["onnxruntime"])
    backends = backends if isinstance(backends, list) else [backends]
    for b in backends:
        if b not in BACKENDS:
            _fail("backends", f"unknown backend {b!r}; choose from {list(BACKENDS)}")
    threads = raw.get("threads", 1)
    if threads is not None and not _is_int(threads, 1):
        _fail("threads", f"must be a positive integer or null, got {threads!r}")
    suite = Suite(name=str(raw.get("name") or src.stem), path=str(src), entries=[], backends=list(backends),
                  batches=_int_list(raw.get("batches", [1]), "batches"), threads=threads,
                  blocks=_int_list(raw.get("blocks", 8), "blocks")[0],
                  per_block=_int_list(raw.get("per_block", 10), "per_block")[0],
                  accuracy_images=_int_list(raw.get("accuracy_images", 100), "accuracy_images")[0], raw=raw)
    if suite.blocks < 2:
        _fail("blocks", f"must be at least 2 (the interval needs blocks to resample), got {suite.blocks}")
    entries = raw.get("entries")
    if not isinstance(entries, list) or not entries:
        _fail("entries", "must be a non-empty list of {model, variants}")
    for i, item in enumerate(entries):
        suite.entries.append(_entry(item, f"entries[{i}]", suite))
    return suite


def _entry(item, where: str, suite: Suite) -> Entry:
    if not isinstance(item, dict) or not isinstance(item.get("model"), str):
        _fail(where, f"must be a mapping with a 'model' spec, got {item!r}")
    unknown = sorted(set(item) - {"model", "variants", "input_shape", "accuracy"}, key=str)
    if unknown:
        _fail(where, f"unknown key(s) {unknown}; known: model, variants, input_shape, accuracy")
    shape = item.get("input_shape")
    if shape is not None:
        if not (isinstance(shape, list) and shape and all(_is_int(d, 1) for d in shape)):
            _fail(f"{where}.input_shape", f"must be a list of positive integers like [1, 3, 320, 320], got {shape!r}")
        shape = tuple(shape)
    accuracy = item.get("accuracy", "auto")
    if accuracy not in ("auto", "map", "none"):
        _fail(f"{where}.accuracy", f"must be auto, map or none, got {accuracy!r}")
    raw_variants = item.get("variants", {"dense": {}})
    if not isinstance(raw_variants, dict) or not raw_variants:
        _fail(f"{where}.variants", "must be a mapping of variant name to its recipe ({} for the model as it is)")
    variants = []
    for name, spec in raw_variants.items():
        here = f"{where}.variants.{name if str(name).isprintable() else repr(str(name))}"
        spec = spec or {}
        if not isinstance(spec, dict) or len(spec) > 1:
            _fail(here, f"must be {{}} or one of {list(VARIANT_KINDS)} with its settings, got {spec!r}")
        if spec:
            kind, value = next(iter(spec.items()))
            if kind not in VARIANT_KINDS:
                _fail(here, f"unknown variant kind {kind!r}; choose from {list(VARIANT_KINDS)}")
            if kind in ("prune", "sparsify") and not isinstance(value, dict):
                _fail(f"{here}.{kind}", f"must be a mapping of settings, got {value!r}")
            if kind == "prune":
                ratio = value.get("ratio", value.get("target_macs"))
                if ratio is None or isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0 < ratio < 1):
                    _fail(f"{here}.prune", f"needs ratio (or target_macs) in (0, 1), got {value!r}")
                batches = value.get("recalibrate_bn", 0)
                if not _is_int(batches, 0):
                    _fail(f"{here}.prune.recalibrate_bn", f"must be a number of batches >= 0, got {batches!r}")
            if kind in ("recipe", "path"):
                if not isinstance(value, str) or not _exists(suite.resolve(value)):
                    _fail(f"{here}.{kind}", f"{value!r} does not exist (paths are relative to the suite file)")
            if kind == "planted_steps" and not _is_int(value, 1):
                _fail(f"{here}.planted_steps", f"must be a positive integer, got {value!r}")
        variants.append(Variant(str(name), spec))
    return Entry(item["model"], variants, shape, accuracy)
