"""``trt-prune bench run`` and ``bench compare``: record a suite into the store, compare two runs or two live
candidates, and turn a comparison into an exit code.

Recording: for every entry, backend and batch size, all variants are built, then timed together in
interleaved rounds (each variant once per round, order shuffled), scored where the model has an accuracy,
profiled per layer, and stored as one run (:mod:`trt_prune.regression.store`).

Comparing stored runs (``--baseline RUN[:VARIANT] --candidate RUN[:VARIANT]``) pairs the results with the same
entry, backend and batch (and variant, unless one is named on each side) and applies the same statistics to
their stored blocks. Runs recorded at different times were not interleaved with each other, so a drift of
the machine between them counts as a change; the report says so. Live comparison (files, specs, folders)
interleaves and is the fairer test.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from trt_prune.errors import BenchError
from trt_prune.provenance import git_commit
from trt_prune.regression.live import (
    Arm,
    Settings,
    accuracy_entry,
    combine,
    env_differences,
    prepare_arm,
    profile_dict,
    verdict_of,
)
from trt_prune.regression.store import Result, Store
from trt_prune.regression.suite import Entry, Suite, Variant

EXIT_CODES = {"regression": 1, "improvement": 0, "no change": 0, "inconclusive": 0}
SEVERITY = ("regression", "inconclusive", "no change", "improvement")  # worst first


# ------------------------------------------------------------------------------------------------- recording
def _variant_source(entry: Entry, variant: Variant, suite: Suite, backend: str, workdir: Path,
                    trust_code: bool = False):
    """What to build for ``variant``: ``(source, input_shape, family)`` for :func:`prepare_arm`."""
    from trt_prune.backends import backend_class
    from trt_prune.pruning import apply_recipe
    from trt_prune.regression.live import demo_family
    from trt_prune.regression.planted import plant_work
    from trt_prune.stages import load, prune, sparsify, to_onnx

    kind, settings = variant.kind, variant.spec.get(variant.kind)
    family = demo_family(entry.model)
    if kind == "path":
        target = suite.resolve(settings)
        return str(target), entry.input_shape, family or demo_family(str(target))
    if kind == "dense":
        return entry.model, entry.input_shape, family
    loaded = load(entry.model, trust_code=trust_code)
    shape = tuple(entry.input_shape or loaded.input_shape)
    if kind == "prune":
        options = dict(settings)
        recalibrate = options.pop("recalibrate_bn", 0)
        pruned = prune(loaded, shape, **options).model
        if recalibrate:  # BatchNorm statistics re-estimated on road scenes: cheap, recovers most of a light prune
            from trt_prune.finetune import recalibrate_batchnorm

            recalibrate_batchnorm(pruned, batches=int(recalibrate), img_size=shape[-1])
        return pruned, shape, family
    if kind == "sparsify":
        return sparsify(loaded, **settings).model, shape, family
    if kind == "recipe":
        recipe = json.loads(suite.resolve(settings).read_text())
        return apply_recipe(loaded.model, recipe.get("recipe", recipe)), shape, family
    if kind == "planted_steps":
        if "onnx" not in backend_class(backend).builds_from:
            raise BenchError(f"variant {variant.name!r}: planted work is an ONNX graph change; backend {backend!r} "
                             "builds from the model, not ONNX")
        import onnx

        base = to_onnx(loaded, workdir=workdir, input_shape=shape, name=f"{variant.name}_base").path
        planted = workdir / f"{variant.name}_planted.onnx"
        onnx.save(plant_work(onnx.load(str(base)), int(settings)), str(planted))
        return str(planted), shape, family
    raise BenchError(f"variant {variant.name!r}: unknown kind {kind!r}")


def run_suite(suite: Suite, store: Store, name: str, progress=None, settings: Settings | None = None,
              trust_code: bool = False) -> dict[str, Any]:
    """Measure every entry × backend × batch of ``suite`` and store the results as run ``name``.

    A suite file that names a ``file.py:factory`` model would run that file: it needs ``trust_code`` (the
    CLI's ``--trust-code``), as a model folder naming one does."""
    from trt_prune.profiling.profile import interleaved_blocks, machine_info

    if store.has_run(name):
        raise BenchError(f"the store already has a run named {name!r}; choose another --name")
    for index, entry in enumerate(suite.entries):
        file = entry.model.rpartition(":")[0]
        if file.endswith(".py") and not trust_code:
            raise BenchError(f"entries[{index}].model {entry.model!r} in {suite.path} runs {file!r} when loaded; "
                             "pass --trust-code (trust_code=True) if you trust it")
    base = settings or Settings()
    results = []
    say = progress or (lambda text: None)
    with tempfile.TemporaryDirectory(prefix="trt-prune-bench-") as tmp:
        work = Path(tmp)
        for entry in suite.entries:
            for backend in suite.backends:
                for batch in suite.batches:
                    cfg = dataclasses.replace(base, batch=batch, threads=suite.threads, per_block=suite.per_block,
                                              accuracy_images=suite.accuracy_images)
                    arms: dict[str, Arm] = {}
                    try:
                        for variant in entry.variants:
                            say(f"{entry.model} / {variant.name} / {backend} / batch {batch}: building")
                            source, shape, family = _variant_source(entry, variant, suite, backend, work,
                                                                    trust_code)
                            arms[variant.name] = prepare_arm(source, variant.name, backend, cfg, work, shape,
                                                             entry.accuracy, family, trust_code)
                        say(f"{entry.model} / {backend} / batch {batch}: {suite.blocks} interleaved rounds of "
                            f"{len(arms)} variants")
                        blocks = interleaved_blocks({k: a.session for k, a in arms.items()},
                                                    {k: a.feeds for k, a in arms.items()}, suite.blocks,
                                                    suite.per_block, cfg.warmup_s, cfg.seed)
                        for vname, arm in arms.items():
                            say(f"{entry.model} / {vname}: accuracy and per-layer profile")
                            accuracy = arm.score() if arm.score else None
                            profile = profile_dict(arm, blocks[vname], cfg.layer_runs, batch)
                            profile.pop("samples_ms", None)
                            lat = profile["latency_ms"]
                            results.append({"entry": entry.model, "variant": vname, "backend": backend,
                                            "batch": batch, "p50_ms": lat["p50"], "p99_ms": lat["p99"],
                                            "mean_ms": lat["mean"], "images_s": profile["throughput_images_s"],
                                            "accuracy": accuracy,
                                            "accuracy_metric": "map50_95_points" if accuracy is not None else None,
                                            "profile": profile, "env": profile["env"], "blocks": blocks[vname]})
                    finally:
                        for arm in arms.values():
                            arm.session.close()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    commit = git_commit(Path(suite.path).parent)
    store.add_run(name, created, commit, suite.name, suite.raw, machine_info(), results)
    return {"run": name, "store": str(store.path), "created": created, "commit": commit, "suite": suite.name,
            "results": [{k: r[k] for k in ("entry", "variant", "backend", "batch", "p50_ms", "p99_ms", "images_s",
                                           "accuracy")} for r in results]}


# ------------------------------------------------------------------------------------------------ comparing
def parse_ref(ref: str) -> tuple[str, str | None]:
    """``RUN`` or ``RUN:VARIANT``."""
    run, sep, variant = ref.partition(":")
    return run, (variant or None) if sep else None


def is_stored(store: Store, ref: str) -> bool:
    return store.path.is_file() and store.has_run(parse_ref(ref)[0])


def _compare_results(base: Result, cand: Result, settings: Settings) -> dict[str, Any]:
    from trt_prune.profiling.compare import compare_layers

    speed = verdict_of(base.blocks, cand.blocks, settings)
    accuracy = accuracy_entry(base.accuracy, cand.accuracy, settings.max_drop)
    layers = []
    if base.profile.get("per_layer") and cand.profile.get("per_layer"):
        layers = compare_layers(base.profile, cand.profile)[: settings.top_layers]
    return {
        "verdict": combine(speed, accuracy), "speed_verdict": speed["verdict"], "ratio": speed["ratio"],
        "ci": speed["ci"], "p_value": speed["p_value"], "p99": speed["p99"], "latency_ms": speed["latency_ms"],
        "accuracy": accuracy, "layers": layers, "blocks": [len(base.blocks), len(cand.blocks)],
        "entry": base.entry, "backend": base.backend, "batch": base.batch,
        "baseline": f"{base.run}:{base.variant}", "candidate": f"{cand.run}:{cand.variant}",
        "environment": {"baseline": base.env, "candidate": cand.env,
                        "differences": env_differences(base.env, cand.env)},
        "commits": {"baseline": base.commit, "candidate": cand.commit},
    }


def compare_stored(store: Store, baseline: str, candidate: str, settings: Settings,
                   backend: str | None = None) -> dict[str, Any]:
    """Compare two stored runs (or variants of runs), key by key; the worst verdict is the overall one."""
    settings.check()
    (brun, bvar), (crun, cvar) = parse_ref(baseline), parse_ref(candidate)
    base = store.results(brun, bvar)
    cand = store.results(crun, cvar)
    if backend is not None:
        base = [r for r in base if r.backend == backend]
        cand = [r for r in cand if r.backend == backend]

    def key(r: Result, named: bool):
        return (r.entry, r.backend, r.batch) + (() if named else (r.variant,))

    named = bvar is not None or cvar is not None
    by_key = {key(r, named): r for r in cand}
    pairs = [(r, by_key[key(r, named)]) for r in base if key(r, named) in by_key]
    if not pairs:
        raise BenchError(f"{baseline!r} and {candidate!r} share no (entry, variant, backend, batch) to compare"
                         f"{f' on backend {backend!r}' if backend else ''}; name the variants (RUN:VARIANT)")
    comparisons = [_compare_results(b, c, settings) for b, c in pairs]
    worst = min(comparisons, key=lambda c: (SEVERITY.index(c["verdict"]), -abs(c["ratio"] - 1)))
    out = {**worst, "mode": "stored runs (not interleaved with each other)", "min_effect": settings.min_effect,
           "level": settings.level, "comparisons": comparisons}
    out["baseline"], out["candidate"] = baseline, candidate
    return out


def exit_code(comparison: dict[str, Any]) -> int:
    """0 (no regression), 1 (regression): for CI. Errors exit 2 before a comparison exists."""
    return EXIT_CODES[comparison["verdict"]]
