"""Structured (channel) pruning: plan on the channel graph, cut every coupled layer, record a replayable recipe."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import PruneError
from . import record
from .graph import ChannelGraph, ChannelGroup, KeptWhole, trace
from .importance import get_importance
from .surgery import cut_axis, fix_sizes

RECIPE_FORMAT = "trt_prune.recipe"
RECIPE_VERSION = 1
ALLOWED_ROUND_TO = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class PruneConfig:
    """How to prune.

    ``ratio``: fraction of channels removed, from every prunable group (local) or from all of them ranked
    together (``global_pruning``: groups whose channels score low lose more, each capped by ``max_ratio``).
    ``target_macs`` / ``target_params`` (fraction of the dense model's MACs / parameters to keep, e.g. 0.5):
    the ratio is searched for instead, at most one of the two. ``max_ratio``: no group loses more than this
    fraction of its channels (default: any, as long as ``round_to`` channels stay). Every kept count is a
    multiple of ``round_to``. ``target_latency`` (a fraction of the dense latency, or ``"4.5ms"``) plans with
    the latency planner on a measured table (``latency_table``, ``backend``); ``latency_utility`` is how its
    knapsack values the importance a group keeps (``quadratic``, ``log``, ``linear`` as in HALP;
    :mod:`trt_prune.latency.planner`).
    """

    ratio: float = 0.5
    round_to: int = 8
    importance: str = "l1"
    ignore: tuple[str, ...] = ()
    target_macs: float | None = None
    target_params: float | None = None
    global_pruning: bool = False
    max_ratio: float | None = None
    target_latency: float | str | None = None
    latency_table: str | None = None
    backend: str = "onnxruntime"
    latency_utility: str = "quadratic"
    strict: bool = False

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise PruneError(f"ratio must be in (0, 1), got {self.ratio}; e.g. 0.5 removes half the channels")
        if self.round_to not in ALLOWED_ROUND_TO:
            raise PruneError(f"round_to must be one of {ALLOWED_ROUND_TO}, got {self.round_to}")
        for name in ("target_macs", "target_params"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise PruneError(f"{name} is the fraction to keep, in (0, 1); got {value}")
        targets = [n for n in ("target_macs", "target_params", "target_latency") if getattr(self, n) is not None]
        if len(targets) > 1:
            raise PruneError("give one of target_macs, target_params and target_latency, not both "
                             f"{' and '.join(targets)}")
        if self.target_latency is not None:
            from ..latency import parse_budget

            parse_budget(self.target_latency)
            if self.global_pruning:
                raise PruneError("target_latency ranks channels across groups by itself (a knapsack on measured "
                                 "latency); drop global_pruning")
        from ..latency.planner import UTILITIES

        if self.latency_utility not in UTILITIES:
            raise PruneError(f"latency_utility must be one of {', '.join(UTILITIES)}, got {self.latency_utility!r}")
        if self.max_ratio is not None and not 0.0 < self.max_ratio < 1.0:
            raise PruneError(f"max_ratio must be in (0, 1), got {self.max_ratio}; e.g. 0.8 keeps at least a "
                             "fifth of every group")
        get_importance(self.importance)


@dataclass
class PruneResult:
    """The pruned model, its replayable recipe, a report, and the model folder it was written to (if any)."""

    model: nn.Module
    recipe: dict
    report: dict = field(default_factory=dict)
    folder: Path | None = None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _aligned_keep(n: int, ratio: float, round_to: int, max_ratio: float | None = None) -> int:
    """Channels to keep out of ``n``: a multiple of ``round_to``, at least ``round_to`` and at least
    ``(1 - max_ratio)·n`` (rounded up to a multiple), at most ``n``."""
    if n <= round_to or ratio <= 0:  # nothing to remove (a group global pruning spared): leave it whole
        return n
    keep = int(round(n * (1.0 - ratio) / round_to)) * round_to
    if max_ratio is not None:
        keep = max(keep, math.ceil(n * (1.0 - max_ratio) / round_to - 1e-9) * round_to)
    return min(n, max(round_to, keep))


def _is_ignored(group: ChannelGroup, ignore: tuple[str, ...]) -> str | None:
    for producer in group.producers:
        for pattern in ignore:
            if producer == pattern or producer.startswith(pattern + "."):
                return f"ignored ({pattern})"
    return None


def _select(scores: np.ndarray, group: ChannelGroup, ratio: float, round_to: int,
            max_ratio: float | None = None) -> list[int]:
    """Positions of ``group.classes`` to keep: the highest scores, per split segment when there are segments."""
    segments = group.segments or [list(range(group.size))]
    keep: list[int] = []
    for seg in segments:
        k = _aligned_keep(len(seg), ratio, round_to, max_ratio)
        seg_scores = scores[seg]
        order = np.argsort(-seg_scores, kind="stable")[:k]
        keep.extend(sorted(seg[i] for i in order))
    return sorted(keep)


def _global_ratios(scores: dict[str, np.ndarray], ratio: float) -> dict[str, float]:
    """Per-group removal ratios for global pruning: every group's scores are divided by their mean (so a
    group's scale does not matter, only how unevenly its channels score), all channels are ranked together,
    and the lowest ``ratio`` of them go; a group's ratio is the share of its channels that fell."""
    normed = {k: v / v.mean() if v.mean() > 0 else np.ones_like(v) for k, v in scores.items()}
    everything = np.concatenate(list(normed.values()))
    n_drop = int(round(ratio * len(everything)))
    if n_drop == 0:
        return {k: 0.0 for k in normed}
    threshold = np.partition(everything, n_drop - 1)[n_drop - 1]
    return {k: float((v <= threshold).mean()) for k, v in normed.items()}


def _prunable(graph: ChannelGraph, config: PruneConfig) -> tuple[list[ChannelGroup], dict[str, str]]:
    skipped: dict[str, str] = {}
    groups = []
    for g in graph.groups:
        why = g.pinned or _is_ignored(g, config.ignore)
        if why is None and g.size <= config.round_to:
            why = f"{g.size} channels, not above round_to={config.round_to}"
        if why:
            skipped[g.key] = why
        else:
            groups.append(g)
    return groups, skipped


def _plan(graph: ChannelGraph, config: PruneConfig, importance=None, latency=None
          ) -> tuple[dict[str, list[int]], dict[str, str], float]:
    """The plan for ``config``; with ``latency`` (a :class:`~trt_prune.latency.LatencyModel`) and
    ``config.target_latency``, the latency planner's plan (its summary is then in ``latency.last_plan``)."""
    groups, skipped = _prunable(graph, config)
    if not groups:
        reasons = sorted(set(skipped.values()))
        shown = "; ".join(reasons[:6]) + (f"; and {len(reasons) - 6} more" if len(reasons) > 6 else "")
        raise PruneError(f"nothing can be pruned: all {len(skipped)} channel groups are kept whole ({shown}). "
                         "Lower round_to if groups are too small, or prune a model with more convolution "
                         "channels between its input and outputs")
    importance = importance or get_importance(config.importance)
    scores = {g.key: importance(graph, g) for g in groups}
    if config.target_latency is not None:
        from ..latency import LatencyPlanner, budget_ms
        from ..latency.planner import DEFAULT_MAX_RATIO

        if latency is None:
            raise PruneError("target_latency needs a latency model (trt_prune.latency.LatencyModel)")
        cap = config.max_ratio if config.max_ratio is not None else DEFAULT_MAX_RATIO
        planner = LatencyPlanner(latency, groups, config.round_to, cap, utility=config.latency_utility)
        plan, info = planner.plan(scores, budget_ms(config.target_latency, planner.dense_ms))
        latency.last_plan = info
        total = sum(g.size for g in groups)
        kept = sum(len(plan[g.key]) if g.key in plan else g.size for g in groups)
        return plan, skipped, 1.0 - kept / total

    def plan_for(ratio: float) -> dict[str, list[int]]:
        per_group = _global_ratios(scores, ratio) if config.global_pruning else dict.fromkeys(scores, ratio)
        return {g.key: _select(scores[g.key], g, per_group[g.key], config.round_to, config.max_ratio)
                for g in groups}

    ratio = config.ratio
    if config.target_macs is not None or config.target_params is not None:
        if config.target_macs is not None:
            target, base = config.target_macs, graph.macs()
            def kept_fraction(r: float) -> float:
                return graph.macs(graph.kept_mask(plan_for(r))) / base
            steps = 30
        else:
            target, base = config.target_params, count_params(graph.model)
            def kept_fraction(r: float) -> float:
                return _params_after(graph, plan_for(r)) / base
            steps = 14  # each step cuts a shape-only copy of the model: 14 steps reach 1e-4 of the ratio

        lo, hi = 0.0, 0.95
        for _ in range(steps):  # bisection on the channel ratio; MACs/params are monotone in it up to rounding
            mid = (lo + hi) / 2
            if kept_fraction(mid) > target:
                lo = mid
            else:
                hi = mid
        # rounding makes the count jump in steps: take whichever side of the step lands nearer the target
        ratio = min((lo, hi), key=lambda r: abs(kept_fraction(r) - target))
    return plan_for(ratio), skipped, ratio


def _meta_clone(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are shape-only (meta): cheap to cut and count."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _params_after(graph: ChannelGraph, plan: dict[str, list[int]]) -> int:
    """Parameters left after ``plan``, counted by running the real surgery on a shape-only copy."""
    clone = _meta_clone(graph.model)
    _apply(graph, plan, clone)
    return count_params(clone)


def _apply(graph: ChannelGraph, plan: dict[str, list[int]], model: nn.Module | None = None) -> None:
    """Cut every slot of ``model`` (default: the traced model) down to the channels ``plan`` keeps."""
    kept = graph.kept_mask(plan)
    modules = dict((model if model is not None else graph.model).named_modules())
    for (path, kind), slot in graph.slots.items():
        keep = np.flatnonzero(kept[slot.classes])
        if len(keep) < len(slot.elements):
            cut_axis(modules[path], kind, torch.from_numpy(keep), path)
    # sizes stored as attributes live on parents of the cut layers too (an attention block's head_dim): the
    # fix-ups recompute them from the tensors, so running them everywhere is safe
    for path, module in modules.items():
        fix_sizes(module, path)


def output_shapes(out) -> object:
    """The shapes of a model's outputs, keeping their structure (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: output_shapes(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return tuple(output_shapes(v) for v in out)
    return None


class NoLongerRuns(PruneError):
    """The cut model raised: ``modules`` are the model's modules whose ``forward`` was running, innermost first."""

    def __init__(self, message: str, modules: list[str]):
        super().__init__(message)
        self.modules = modules


def _failing_modules(model: nn.Module, exc: BaseException) -> list[str]:
    """Paths of ``model``'s modules whose ``forward`` frames ``exc`` passed through, innermost first."""
    paths = {id(m): p for p, m in model.named_modules()}
    found: list[str] = []
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        path = paths.get(id(owner)) if isinstance(owner, nn.Module) else None
        if path and path not in found:
            found.append(path)
        tb = tb.tb_next
    return found[::-1]


def _check_runs(model: nn.Module, example: torch.Tensor, expected) -> None:
    """The pruned model must run and keep its output shapes; checked on meta tensors (shapes only, which is
    all that is compared) where the model allows, else on the real example."""
    try:
        out = record.run(model, example, meta=True)
    except Exception:
        try:
            out = record.run(model, example, meta=False)
        except Exception as exc:
            where = _failing_modules(model, exc)
            inside = f" in '{where[0]}'" if where else ""
            raise NoLongerRuns(f"the pruned model no longer runs{inside} ({type(exc).__name__}: {exc}); a module "
                                "computes channel counts from stored sizes: ignore it and prune again",
                                where) from exc
    shapes = output_shapes(out)
    if shapes != expected:
        raise PruneError(f"pruning changed the output shapes from {expected} to {shapes}; ignore the output "
                         "layers and prune again")


MAX_RETRIES = 32  # modules kept whole after the cut model failed in them, before giving up


def _retry_scope(exc: NoLongerRuns, config: PruneConfig, inplace: bool, tries: int) -> str | None:
    """The module to keep whole after the cut model failed inside it: the innermost one not already ignored
    (a module reading a size it stored before the cut: a metaformer layer scale, an attention's key_dim). None:
    give up with the error (``strict``, an in-place cut that cannot be redone, too many tries)."""
    if config.strict or inplace or tries >= MAX_RETRIES:
        return None
    for path in exc.modules:
        if not any(path == p or path.startswith(p + ".") for p in config.ignore):
            return path
    return None


def _layer_report(before: ChannelGraph, plan: dict[str, list[int]], skipped: dict[str, str],
                  ignore: tuple[str, ...] = ()) -> list[dict]:
    kept = before.kept_mask(plan)
    group_of = {}
    for g in before.groups:
        for p in g.producers:
            group_of[p] = g
    rows, seen = [], set()
    empty = np.zeros(0, dtype=np.int64)
    for node in before.compute:
        path = node.module
        if path in seen:
            continue
        seen.add(path)
        ins = node.in_classes if node.in_classes is not None else empty
        outs = node.out_classes if node.out_classes is not None else ins
        row = {
            "module": path,
            "in_before": len(ins), "in_after": int(kept[ins].sum()),
            "out_before": len(outs), "out_after": int(kept[outs].sum()),
        }
        g = group_of.get(path)
        if g is not None and g.key in skipped:
            row["left_alone"] = skipped[g.key]
        rows.append(row)
    for path, module in before.model.named_modules():
        scope = next((p for p in ignore if path == p or path.startswith(p + ".")), None)
        if scope is not None and isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)):
            rows.append({"module": path, "left_alone": f"ignored ({scope})"})
    return rows


def _reference_outputs(graph: ChannelGraph, example: torch.Tensor):
    """The dense model's outputs on ``example`` (only their shapes are used): the tracer's own run when it ran
    the model, else one run now."""
    if graph.outputs is not None:
        return graph.outputs
    try:
        return record.run(graph.model, example, meta=True)
    except Exception:
        return record.run(graph.model, example, meta=False)


def _example(model: nn.Module, input_shape) -> torch.Tensor:
    try:
        param = next(model.parameters())
        device = param.device
    except StopIteration:
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.rand(tuple(input_shape), generator=gen).to(device)


def _latency_model(model: nn.Module, graph: ChannelGraph, input_shape, config: PruneConfig, table=None,
                   on_estimate=None, on_progress=None):
    """The latency model for ``config.target_latency``: from ``table`` (a LatencyTable) when given, else the
    table in ``config.latency_table`` measured (what it lacks) and calibrated here."""
    from ..latency import LatencyModel, ensure_table

    if table is None:
        table, _ = ensure_table(model, graph, input_shape, backend=config.backend, location=config.latency_table,
                                round_to=config.round_to, ignore=config.ignore, on_estimate=on_estimate,
                                on_progress=on_progress)
    return LatencyModel(graph, table)


def prune(model: nn.Module, input_shape=(1, 3, 320, 320), config: PruneConfig | None = None, *,
          inplace: bool = False, check: bool = True, data=None, loss_fn=None, latency_table=None,
          on_estimate=None, on_progress=None, **overrides) -> PruneResult:
    """Structured pruning of ``model``: returns the pruned model, its recipe and a report.

    ``overrides`` set :class:`PruneConfig` fields (``ratio=0.3, round_to=16, target_macs=0.5`` …).
    ``inplace``: cut ``model`` itself instead of a copy (saves the copy's memory and time on big models).
    ``check``: run the pruned model once and compare its output shapes with the dense model's (on shape-only
    tensors where the model allows); turning it off saves that run and the fallback: when it fails inside a module
    (one that reshapes by a width it stored), that module is kept whole and the model pruned again from a fresh
    copy (``report["kept_whole"]``, op ``forward``; the recipe's ``ignore`` lists it); with ``strict`` or
    ``inplace`` the failure is the error.
    ``data`` and ``loss_fn(model, batch) -> loss``: the batches and loss gradient-based importance
    (``taylor``) needs.
    ``latency_table``: a :class:`~trt_prune.latency.LatencyTable` for ``target_latency`` (default: the one in
    ``config.latency_table``, measured where it lacks this model); ``on_estimate(points, seconds)`` and
    ``on_progress(n)`` report that measurement.
    """
    config = config or PruneConfig()
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise PruneError(f"unknown pruning option '{k}'; valid: {sorted(PruneConfig.__dataclass_fields__)}")
        setattr(config, k, v)
    config.ignore = tuple(config.ignore)
    config.validate()
    importance = get_importance(config.importance)
    importance.prepare(model, data=data, loss_fn=loss_fn)  # before any copy or cut: the user's model
    retried: list[KeptWhole] = []
    while True:
        pruned = model if inplace else copy.deepcopy(model)
        example = _example(pruned, input_shape)
        graph = trace(pruned, example, config.ignore, strict=config.strict)
        expected = output_shapes(_reference_outputs(graph, example)) if check else None
        latency = None
        if config.target_latency is not None:
            latency = _latency_model(pruned, graph, input_shape, config, latency_table, on_estimate, on_progress)
        plan, skipped, ratio = _plan(graph, config, importance, latency)
        macs_before, macs_after = graph.macs(), graph.macs(graph.kept_mask(plan))
        params_before = count_params(pruned)
        layers = _layer_report(graph, plan, skipped, config.ignore)
        _apply(graph, plan)
        if not check:
            break
        try:
            _check_runs(pruned, example, expected)
            break
        except NoLongerRuns as exc:
            scope = _retry_scope(exc, config, inplace, len(retried))
            if scope is None:
                raise
            retried.append(KeptWhole(scope, "forward", f"the cut module no longer ran ({exc.__cause__}); kept "
                                                       "whole and pruned again"))
            config = dataclasses.replace(config, ignore=(*config.ignore, scope))
    group_sizes = {g.key: g.size for g in graph.groups}
    recipe = {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "input_shape": list(input_shape),
        "config": {"ratio": config.ratio, "effective_ratio": ratio, "round_to": config.round_to,
                   "importance": config.importance, "ignore": list(config.ignore),
                   "target_macs": config.target_macs, "target_params": config.target_params,
                   "global_pruning": config.global_pruning, "max_ratio": config.max_ratio,
                   "target_latency": config.target_latency, "backend": config.backend},
        "groups": [{"key": k, "channels": group_sizes[k], "keep": v} for k, v in sorted(plan.items())],
    }
    report = {
        "params_before": params_before, "params_after": count_params(pruned),
        "macs_before": macs_before, "macs_after": macs_after,
        "effective_ratio": ratio,
        "groups_total": len(graph.groups), "groups_pruned": len(plan),
        "skipped_groups": [{"key": k, "reason": v} for k, v in sorted(skipped.items())],
        "kept_whole": [dataclasses.asdict(k) for k in (*graph.kept_whole, *retried)],
        "layers": layers,
    }
    if latency is not None:
        from ..latency import sparse_choice

        report["latency"] = {**latency.last_plan, "table": latency.table.key.describe(),
                             "uncovered_layers": latency.uncovered,
                             "sparse24": sparse_choice(latency, graph.kept_mask(plan))}
    return PruneResult(pruned, recipe, report)


MAX_RECIPE_ELEMENTS = 1 << 28  # an example input larger than 1 GiB of float32 is not a shape a recipe needs


def _recipe_shape(value) -> tuple[int, ...]:
    ok = (isinstance(value, list) and 2 <= len(value) <= 8
          and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_RECIPE_ELEMENTS for d in value))
    if not ok or math.prod(value) > MAX_RECIPE_ELEMENTS:
        raise PruneError(f"recipe input_shape {str(value)[:80]} is not a shape; it must be a list of 2-8 positive "
                         f"integers (at most {MAX_RECIPE_ELEMENTS} elements), like [1, 3, 320, 320]")
    return tuple(value)


def validate_recipe(recipe: dict) -> None:
    """Raise :class:`PruneError` unless ``recipe`` is a recipe this version can replay: every field the replay
    reads has the right type, so a damaged file is one clear error, never a crash inside the replay."""
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise PruneError(f"not a pruning recipe (format must be '{RECIPE_FORMAT}')")
    if recipe.get("version") != RECIPE_VERSION:
        raise PruneError(f"recipe version {str(recipe.get('version'))[:40]} is not supported; this trt_prune reads "
                         f"version {RECIPE_VERSION}")
    _recipe_shape(recipe.get("input_shape"))
    config = recipe.get("config", {})
    ignore = config.get("ignore") if isinstance(config, dict) else None
    if not isinstance(config, dict) or not (ignore is None or (isinstance(ignore, list)
                                                               and all(isinstance(i, str) for i in ignore))):
        raise PruneError("recipe config must be an object whose 'ignore' (if any) is a list of module paths")
    groups = recipe.get("groups")
    if not isinstance(groups, list):
        raise PruneError(f"recipe groups must be a list, got {type(groups).__name__}")
    for g in groups:
        if not isinstance(g, dict) or not {"key", "channels", "keep"} <= set(g):
            raise PruneError(f"recipe group {str(g)[:80]} lacks key/channels/keep")
        channels, keep = g["channels"], g["keep"]
        if (not isinstance(g["key"], str) or not isinstance(channels, int) or isinstance(channels, bool)
                or channels < 1 or not isinstance(keep, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep)):
            raise PruneError(f"recipe group {str(g)[:80]} must have a text key, a positive channel count and a "
                             "list of channel indices to keep")


def apply_recipe(model: nn.Module, recipe: dict) -> nn.Module:
    """Replay ``recipe`` on a freshly built ``model`` (not modified); returns the pruned copy."""
    validate_recipe(recipe)
    pruned = copy.deepcopy(model)
    example = _example(pruned, recipe["input_shape"])
    try:
        graph = trace(pruned, example, tuple(recipe.get("config", {}).get("ignore") or ()))
    except PruneError:
        raise
    except Exception:
        from trt_prune.models import check_runs  # names the module that rejects the recipe's input shape

        check_runs(model, recipe["input_shape"], PruneError)
        raise
    reference = _reference_outputs(graph, example)
    groups = {g.key: g for g in graph.groups}
    plan = {}
    for entry in recipe["groups"]:
        g = groups.get(entry["key"])
        if g is None or g.size != entry["channels"]:
            found = "missing" if g is None else f"{g.size} channels"
            raise PruneError(f"recipe group '{entry['key']}' ({entry['channels']} channels) does not match this "
                             f"model ({found}); the recipe was made for another architecture")
        keep = entry["keep"]
        if any(not 0 <= i < g.size for i in keep) or len(set(keep)) != len(keep) or not keep:
            raise PruneError(f"recipe group '{entry['key']}' keeps invalid channel indices")
        plan[g.key] = list(keep)
    _apply(graph, plan)
    _check_runs(pruned, example, output_shapes(reference))
    return pruned


def macs_of(model: nn.Module, input_shape=(1, 3, 320, 320)) -> int:
    """MACs per image at ``input_shape``, counted on the traced graph (conv and linear layers)."""
    example = _example(model, input_shape)
    graph = trace(model, example)
    return graph.macs()
