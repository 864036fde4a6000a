"""Structured (channel) pruning: plan on the channel graph, cut every coupled layer, record a replayable recipe."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import PruneError
from .graph import ChannelGraph, ChannelGroup, trace
from .importance import get_importance
from .surgery import cut_axis, fix_sizes

RECIPE_FORMAT = "trt_prune.recipe"
RECIPE_VERSION = 1
ALLOWED_ROUND_TO = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class PruneConfig:
    """How to prune. ``ratio`` is the fraction of channels removed from every prunable group, unless
    ``target_macs`` (fraction of MACs to keep, e.g. 0.5) is given: then the ratio is searched for."""

    ratio: float = 0.5
    round_to: int = 8
    importance: str = "l1"
    ignore: tuple[str, ...] = ()
    target_macs: float | None = None

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise PruneError(f"ratio must be in (0, 1), got {self.ratio}; e.g. 0.5 removes half the channels")
        if self.round_to not in ALLOWED_ROUND_TO:
            raise PruneError(f"round_to must be one of {ALLOWED_ROUND_TO}, got {self.round_to}")
        if self.target_macs is not None and not 0.0 < self.target_macs < 1.0:
            raise PruneError(f"target_macs is the fraction of MACs to keep, in (0, 1); got {self.target_macs}")
        get_importance(self.importance)


@dataclass
class PruneResult:
    model: nn.Module
    recipe: dict
    report: dict = field(default_factory=dict)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _aligned_keep(n: int, ratio: float, round_to: int) -> int:
    """Channels to keep out of ``n``: a multiple of ``round_to``, at least ``round_to``, at most ``n``."""
    if n <= round_to:
        return n
    keep = int(round(n * (1.0 - ratio) / round_to)) * round_to
    return min(n, max(round_to, keep))


def _is_ignored(group: ChannelGroup, ignore: tuple[str, ...]) -> str | None:
    for producer in group.producers:
        for pattern in ignore:
            if producer == pattern or producer.startswith(pattern + "."):
                return f"ignored ({pattern})"
    return None


def _select(scores: np.ndarray, group: ChannelGroup, ratio: float, round_to: int) -> list[int]:
    """Positions of ``group.classes`` to keep: the highest scores, per split segment when there are segments."""
    segments = group.segments or [list(range(group.size))]
    keep: list[int] = []
    for seg in segments:
        k = _aligned_keep(len(seg), ratio, round_to)
        seg_scores = scores[seg]
        order = np.argsort(-seg_scores, kind="stable")[:k]
        keep.extend(sorted(seg[i] for i in order))
    return sorted(keep)


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


def _kept_classes(graph: ChannelGraph, plan: dict[str, list[int]]) -> set[int]:
    kept = graph.all_classes()
    for g in graph.groups:
        if g.key in plan:
            keep = set(plan[g.key])
            kept -= {c for i, c in enumerate(g.classes) if i not in keep}
    return kept


def _plan(graph: ChannelGraph, config: PruneConfig) -> tuple[dict[str, list[int]], dict[str, str], float]:
    groups, skipped = _prunable(graph, config)
    if not groups:
        raise PruneError("nothing to prune: every channel group is pinned or ignored "
                         f"({'; '.join(sorted(set(skipped.values())))})")
    importance = get_importance(config.importance)
    scores = {g.key: importance(graph, g) for g in groups}

    def plan_for(ratio: float) -> dict[str, list[int]]:
        return {g.key: _select(scores[g.key], g, ratio, config.round_to) for g in groups}

    ratio = config.ratio
    if config.target_macs is not None:
        base = graph.macs()
        def kept_fraction(r: float) -> float:
            return graph.macs(_kept_classes(graph, plan_for(r))) / base

        lo, hi = 0.0, 0.95
        for _ in range(30):  # bisection on the channel ratio; MACs are monotone in it up to rounding
            mid = (lo + hi) / 2
            if kept_fraction(mid) > config.target_macs:
                lo = mid
            else:
                hi = mid
        # rounding makes MACs jump in steps: take whichever side of the step lands nearer the target
        ratio = min((lo, hi), key=lambda r: abs(kept_fraction(r) - config.target_macs))
    return plan_for(ratio), skipped, ratio


def _apply(graph: ChannelGraph, plan: dict[str, list[int]]) -> None:
    kept = _kept_classes(graph, plan)
    modules = dict(graph.model.named_modules())
    for (path, kind), slot in graph.slots.items():
        keep = [i for i, e in enumerate(slot.elements) if graph.cls(e) in kept]
        if len(keep) < len(slot.elements):
            cut_axis(modules[path], kind, torch.tensor(keep, dtype=torch.long), path)
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


def _check_runs(model: nn.Module, example: torch.Tensor, expected) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:
        raise PruneError(f"the pruned model no longer runs ({type(exc).__name__}: {exc}); a module computes "
                         "channel counts from stored sizes: ignore it and prune again") from exc
    finally:
        model.train(was_training)
    shapes = output_shapes(out)
    if shapes != expected:
        raise PruneError(f"pruning changed the output shapes from {expected} to {shapes}; ignore the output "
                         "layers and prune again")


def _layer_report(before: ChannelGraph, plan: dict[str, list[int]], skipped: dict[str, str],
                  ignore: tuple[str, ...] = ()) -> list[dict]:
    kept = _kept_classes(before, plan)
    group_of = {}
    for g in before.groups:
        for p in g.producers:
            group_of[p] = g
    rows = []
    for node in before.compute:
        path = node.module
        if any(r["module"] == path for r in rows):
            continue
        ins = node.in_elements or []
        outs = node.out_elements if node.out_elements is not None else ins
        row = {
            "module": path,
            "in_before": len(ins), "in_after": sum(1 for e in ins if before.cls(e) in kept),
            "out_before": len(outs), "out_after": sum(1 for e in outs if before.cls(e) in kept),
        }
        g = group_of.get(path)
        if g is not None and g.key in skipped:
            row["left_alone"] = skipped[g.key]
        rows.append(row)
    for path, module in before.model.named_modules():
        scope = next((p for p in ignore if path == p or path.startswith(p + ".")), None)
        if scope is not None and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            rows.append({"module": path, "left_alone": f"ignored ({scope})"})
    return rows


def _example(model: nn.Module, input_shape) -> torch.Tensor:
    try:
        param = next(model.parameters())
        device = param.device
    except StopIteration:
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.rand(tuple(input_shape), generator=gen).to(device)


def prune(model: nn.Module, input_shape=(1, 3, 320, 320), config: PruneConfig | None = None,
          **overrides) -> PruneResult:
    """Structured pruning of ``model`` (not modified): returns the pruned copy, its recipe and a report.

    ``overrides`` set :class:`PruneConfig` fields (``ratio=0.3, round_to=16, target_macs=0.5`` …).
    """
    config = config or PruneConfig()
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise PruneError(f"unknown pruning option '{k}'; valid: {sorted(PruneConfig.__dataclass_fields__)}")
        setattr(config, k, v)
    config.ignore = tuple(config.ignore)
    config.validate()
    pruned = copy.deepcopy(model)
    example = _example(pruned, input_shape)
    pruned.eval()
    with torch.no_grad():
        reference = pruned(example)
    graph = trace(pruned, example, config.ignore)
    plan, skipped, ratio = _plan(graph, config)
    macs_before, macs_after = graph.macs(), graph.macs(_kept_classes(graph, plan))
    params_before = count_params(model)
    layers = _layer_report(graph, plan, skipped, config.ignore)
    _apply(graph, plan)
    _check_runs(pruned, example, output_shapes(reference))
    group_sizes = {g.key: g.size for g in graph.groups}
    recipe = {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "input_shape": list(input_shape),
        "config": {"ratio": config.ratio, "effective_ratio": ratio, "round_to": config.round_to,
                   "importance": config.importance, "ignore": list(config.ignore),
                   "target_macs": config.target_macs},
        "groups": [{"key": k, "channels": group_sizes[k], "keep": v} for k, v in sorted(plan.items())],
    }
    report = {
        "params_before": params_before, "params_after": count_params(pruned),
        "macs_before": macs_before, "macs_after": macs_after,
        "effective_ratio": ratio,
        "groups_total": len(graph.groups), "groups_pruned": len(plan),
        "skipped_groups": [{"key": k, "reason": v} for k, v in sorted(skipped.items())],
        "layers": layers,
    }
    return PruneResult(pruned, recipe, report)


def validate_recipe(recipe: dict) -> None:
    """Raise :class:`PruneError` unless ``recipe`` is a recipe this version can replay."""
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        raise PruneError(f"not a pruning recipe (format must be '{RECIPE_FORMAT}')")
    if recipe.get("version") != RECIPE_VERSION:
        raise PruneError(f"recipe version {recipe.get('version')} is not supported; this trt_prune reads "
                         f"version {RECIPE_VERSION}")
    for g in recipe.get("groups", []):
        if not {"key", "channels", "keep"} <= set(g):
            raise PruneError(f"recipe group {g} lacks key/channels/keep")


def apply_recipe(model: nn.Module, recipe: dict) -> nn.Module:
    """Replay ``recipe`` on a freshly built ``model`` (not modified); returns the pruned copy."""
    validate_recipe(recipe)
    pruned = copy.deepcopy(model)
    example = _example(pruned, recipe["input_shape"])
    pruned.eval()
    with torch.no_grad():
        reference = pruned(example)
    graph = trace(pruned, example, tuple(recipe.get("config", {}).get("ignore") or ()))
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
