"""Live A/B comparison: two candidates built side by side and timed in interleaved blocks until the verdict
settles (:func:`compare_live`), with the accuracy gate and the layers that changed.

An *arm* is what the user names: an ONNX file, a model spec (``builtin:demo-detector``) or a model folder
(``trt-prune prune`` output), built by :func:`trt_prune.stages.build` (exported and cleaned into a work folder
for a backend that builds from ONNX; given as it is to one that builds from the model). Accuracy is known
for the demo detector's family (the spec, and folders pruned from it): COCO mAP@[.5:.95] of the built session
on RoadScenes validation images, as ``trt-prune demo`` scores it; ``accuracy="map"`` asks for it on an ONNX
file that has the demo detector's output layout.

The sequential loop: ``min_blocks`` interleaved rounds (both arms once per round, order shuffled), then
:func:`~trt_prune.regression.stats.decide`; while the verdict is ``inconclusive`` another ``step_blocks`` rounds are
added, up to ``max_blocks``. Stopping as soon as the interval clears is a form of optional stopping; the
calibration in ``bench/calibrate_regression.py`` measures the false-regression rate it gives.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trt_prune.errors import BenchError
from trt_prune.regression.stats import accuracy_gate, decide, mann_whitney, ratio_ci

ENV_KEYS = ("cpu", "usable_cores", "gpu", "backend", "backend_version", "onnxruntime", "torch", "tensorrt",
            "threads", "device", "precision", "providers", "graph_optimization_level")


@dataclass
class Settings:
    """How a comparison runs and decides. ``min_effect`` and ``max_drop`` are the user's bars: a slowdown
    smaller than ``min_effect`` (fraction) is not a regression, nor is an accuracy drop up to ``max_drop``
    (mAP points on the 0-100 scale)."""

    min_effect: float = 0.05
    alpha: float = 0.05
    level: float = 0.95
    min_blocks: int = 8
    max_blocks: int = 40
    step_blocks: int = 8
    per_block: int = 10
    warmup_s: float = 0.5
    seed: int = 0
    n_boot: int = 2000
    accuracy_images: int = 100
    max_drop: float = 1.0
    layer_runs: int = 10
    top_layers: int = 10
    batch: int = 1
    threads: int | None = None

    def check(self) -> Settings:
        if not (isinstance(self.min_effect, (int, float)) and 0 < self.min_effect < 1):
            raise BenchError(f"--min-effect must be a fraction in (0, 1), e.g. 0.05 for 5 %, got {self.min_effect!r}")
        for label in ("min_blocks", "max_blocks", "step_blocks", "per_block", "batch"):
            value = getattr(self, label)
            if not isinstance(value, int) or value < (2 if label == "min_blocks" else 1):
                raise BenchError(f"{label} must be an integer >= {2 if label == 'min_blocks' else 1}, got {value!r}")
        if self.max_blocks < self.min_blocks:
            raise BenchError(f"max_blocks {self.max_blocks} is below min_blocks {self.min_blocks}")
        if not (isinstance(self.max_drop, (int, float)) and self.max_drop >= 0):
            raise BenchError(f"--max-accuracy-drop must be a number >= 0 (mAP points), got {self.max_drop!r}")
        return self


@dataclass
class Arm:
    """One side of a comparison: a built session, its inputs, and how to score it (None: unknown)."""

    label: str
    backend: str
    session: Any
    feeds: dict[str, np.ndarray]
    onnx: str | None = None
    score: Callable[[], float] | None = None
    notes: list[str] = field(default_factory=list)

    def env(self) -> dict[str, Any]:
        from trt_prune.profiling.profile import machine_info

        return {**machine_info(), **self.session.env()}


def demo_family(source: str) -> bool:
    """Whether ``source`` (spec or model folder) is the demo detector or a model pruned/sparsified from it."""
    if source.startswith("builtin:demo-detector"):
        return True
    folder = Path(source)
    meta = folder / "model.json"
    if folder.is_dir() and meta.is_file():
        import json

        try:
            return str(json.loads(meta.read_text()).get("source", "")).startswith("builtin:demo-detector")
        except (OSError, ValueError):
            return False
    return False


def prepare_arm(source, label: str, backend: str, settings: Settings, workdir: Path, input_shape=None,
                accuracy: str | None = None, family: bool | None = None, trust_code: bool = False) -> Arm:
    """Build ``source`` (ONNX file, spec, folder, or ``nn.Module`` with ``input_shape``) on ``backend`` with
    ``settings.batch`` / ``threads`` (:func:`trt_prune.stages.build`: a model is exported and cleaned into
    ``workdir`` for a backend that needs ONNX), random inputs, and a scorer. ``family`` says whether ``source``
    is of the demo detector's family when it cannot be read from a spec or folder."""
    from trt_prune.backends import BuildConfig
    from trt_prune.profiling.profile import make_feeds, resolve_input_shapes
    from trt_prune.stages import build

    if accuracy not in (None, "auto", "map", "none"):
        raise BenchError(f"accuracy must be auto, map or none, got {accuracy!r}")
    batch = settings.batch
    shape = tuple(input_shape) if input_shape is not None else None
    session = build(source, backend, BuildConfig(threads=settings.threads), batch=batch, input_shape=shape,
                    workdir=workdir, trust_code=trust_code)
    try:
        shapes = resolve_input_shapes(session.inputs, batch, shape)
    except BaseException:
        session.close()
        raise
    feeds = make_feeds(session.inputs, shapes, settings.seed)
    if family is None:
        family = isinstance(source, (str, Path)) and demo_family(str(source))
    wants_map = accuracy == "map" or (accuracy in (None, "auto") and family)
    score = _map_scorer(session, settings.accuracy_images) if wants_map else None
    onnx_path = str(session.artifact.path) if session.artifact is not None else None
    return Arm(label, backend, session, feeds, onnx_path, score)


def _map_scorer(session, images: int) -> Callable[[], float]:
    """COCO mAP@[.5:.95] (0-100) of a demo-detector-layout session on ``images`` RoadScenes validation scenes."""
    def score() -> float:
        from trt_prune.data import RoadScenes
        from trt_prune.detection.metrics import evaluate

        spec = session.inputs[0]
        h, w = int(spec.shape[2]), int(spec.shape[3])
        batch = int(spec.shape[0]) if isinstance(spec.shape[0], int) and spec.shape[0] > 0 else 1
        dataset = RoadScenes("val", length=images, size=(h, w))
        output = session.outputs[0].name

        def predict(x):
            x = x.numpy()
            if x.shape[0] != batch:  # a fixed-batch session: pad the last, short batch
                pad = np.zeros((batch - x.shape[0], *x.shape[1:]), np.float32)
                return session.run({spec.name: np.concatenate([x, pad])})[output][: x.shape[0]]
            return session.run({spec.name: x})[output]

        return 100.0 * evaluate(predict, dataset, batch_size=batch)["map50_95"]

    return score


def env_differences(base: Mapping[str, Any], cand: Mapping[str, Any]) -> list[str]:
    """What differs between two environment fingerprints, in words (empty when nothing that matters does)."""
    out = []
    for key in ENV_KEYS:
        if base.get(key) != cand.get(key) and (key in base or key in cand):
            out.append(f"{key}: {base.get(key)!r} (baseline) vs {cand.get(key)!r} (candidate)")
    return out


def profile_dict(arm: Arm, blocks: list[list[float]], layer_runs: int, batch: int) -> dict[str, Any]:
    """A ProfileResult dict of ``arm``: latency from its interleaved samples, layers from a separate run."""
    from trt_prune.profiling.profile import profile_record

    samples = [s for block in blocks for s in block]
    shapes = {k: v.shape for k, v in arm.feeds.items()}
    result = profile_record(arm.session, arm.backend, arm.onnx or arm.label, batch, shapes, samples, arm.feeds,
                            layer_runs)
    return dataclasses.asdict(result)


def verdict_of(base_blocks, cand_blocks, settings: Settings) -> dict[str, Any]:
    """Median ratio, interval, p-value and verdict, plus the p99 ratio with its own interval and verdict."""
    est = ratio_ci(base_blocks, cand_blocks, "median", settings.level, settings.n_boot, settings.seed)
    p_value = mann_whitney(base_blocks, cand_blocks)
    tail = ratio_ci(base_blocks, cand_blocks, "p99", settings.level, settings.n_boot, settings.seed)
    return {"verdict": decide(est, p_value, settings.min_effect, settings.alpha), "ratio": est.ratio,
            "ci": list(est.ci), "p_value": p_value,
            # the tail has no rank test of its own: its interval alone decides (p_value 0 passes that gate)
            "p99": {"ratio": tail.ratio, "ci": list(tail.ci),
                    "verdict": decide(tail, 0.0, settings.min_effect, settings.alpha)},
            "latency_ms": {"baseline": {"p50": est.baseline, "p99": tail.baseline},
                           "candidate": {"p50": est.candidate, "p99": tail.candidate}}}


def combine(speed: dict[str, Any], accuracy: dict[str, Any] | None) -> str:
    """The overall verdict: an accuracy drop beyond the bar is a regression whatever the speed."""
    if accuracy and accuracy.get("verdict") == "regression":
        return "regression"
    return speed["verdict"]


def accuracy_entry(base: float | None, cand: float | None, max_drop: float) -> dict[str, Any] | None:
    if base is None and cand is None:
        return None
    return {"metric": "mAP@[.5:.95] (points)", "baseline": base, "candidate": cand,
            "drop": (base - cand) if base is not None and cand is not None else None, "max_drop": max_drop,
            "verdict": accuracy_gate(base, cand, max_drop)}


def compare_arms(base: Arm, cand: Arm, settings: Settings, progress: Callable[[str], None] | None = None
                 ) -> dict[str, Any]:
    """Interleave ``base`` and ``cand`` in blocks until the verdict settles; score, profile and report."""
    from trt_prune.profiling.compare import compare_layers
    from trt_prune.profiling.profile import interleaved_blocks

    settings.check()
    env_b, env_c = base.env(), cand.env()
    differences = env_differences(env_b, env_c)
    rng = random.Random(settings.seed)
    sessions = {"baseline": base.session, "candidate": cand.session}
    feeds = {"baseline": base.feeds, "candidate": cand.feeds}
    blocks = interleaved_blocks(sessions, feeds, settings.min_blocks, settings.per_block, settings.warmup_s, rng)
    while True:
        speed = verdict_of(blocks["baseline"], blocks["candidate"], settings)
        n = len(blocks["baseline"])
        if progress:
            progress(f"{n} blocks: ratio {speed['ratio']:.3f} [{speed['ci'][0]:.3f}, {speed['ci'][1]:.3f}], "
                     f"{speed['verdict']}")
        if speed["verdict"] != "inconclusive" or n >= settings.max_blocks:
            break
        more = interleaved_blocks(sessions, feeds, min(settings.step_blocks, settings.max_blocks - n),
                                  settings.per_block, 0.0, rng)
        for name in blocks:
            blocks[name].extend(more[name])
    scores = [arm.score() if arm.score else None for arm in (base, cand)]
    accuracy = accuracy_entry(scores[0], scores[1], settings.max_drop)
    profiles = [profile_dict(arm, blocks[name], settings.layer_runs, settings.batch)
                for arm, name in ((base, "baseline"), (cand, "candidate"))]
    layers = compare_layers(*profiles)[: settings.top_layers] if settings.layer_runs else []
    return {
        "verdict": combine(speed, accuracy), "speed_verdict": speed["verdict"], "ratio": speed["ratio"],
        "ci": speed["ci"], "p_value": speed["p_value"], "p99": speed["p99"], "latency_ms": speed["latency_ms"],
        "accuracy": accuracy, "layers": layers, "blocks": len(blocks["baseline"]),
        "samples_per_block": settings.per_block, "min_effect": settings.min_effect, "level": settings.level,
        "baseline": base.label, "candidate": cand.label, "backend": base.backend,
        "environment": {"baseline": env_b, "candidate": env_c, "differences": differences},
        "mode": "live, interleaved",
        "profiles": profiles,
    }


def compare_live(baseline: str, candidate: str, backend: str = "onnxruntime", settings: Settings | None = None,
                 input_shape=None, accuracy: str | None = None, progress=None, trust_code: bool = False
                 ) -> dict[str, Any]:
    """Build both sources and :func:`compare_arms` them; temporary exports are removed afterwards."""
    settings = (settings or Settings()).check()
    with tempfile.TemporaryDirectory(prefix="trt-prune-bench-") as tmp:
        work = Path(tmp)
        base = prepare_arm(baseline, baseline, backend, settings, work, input_shape, accuracy,
                           trust_code=trust_code)
        try:
            cand = prepare_arm(candidate, candidate, backend, settings, work, input_shape, accuracy,
                               trust_code=trust_code)
            try:
                return compare_arms(base, cand, settings, progress)
            finally:
                cand.session.close()
        finally:
            base.session.close()
