"""Channel pruning inside training: soft masks that tighten along a schedule, then one physical cut.

The lifecycle follows ``torch.ao.pruning`` and this project's 2:4 :class:`~trt_prune.sparsity.Sparsifier`::

    pruner = ChannelPruner(model, example_inputs=(1, 3, 320, 320), target_macs=0.5,
                           schedule=Schedule(steps=900, start=100))
    pruner.prepare()                      # masks on every coupled channel group; shapes unchanged
    for step, (x, y) in enumerate(loader):
        loss = criterion(model(x), y) + pruner.penalty()   # penalty: optional sparse training
        opt.zero_grad(); loss.backward(); opt.step()
        pruner.step()                     # accumulate importance; prune a little more on schedule
    result = pruner.squash(out="pruned/") # cut the masked channels: a smaller model, the recipe, a folder

**Masks.** A channel is masked by zeroing every tensor entry that the structured cut would remove for it (the
producer's filters and bias, its normalisation parameters and statistics, the consumers' input slices, any
``param:`` slot). Which entries those are is not re-derived here: :func:`mask_for_plan` runs the engine's own cut
(:func:`~trt_prune.pruning.structured._apply`) on a copy of the model whose tensors hold their own flat indices,
and reads back which indices survived. So every rule, surgery and fix-up of the engine applies, and the model
``squash`` produces computes what the masked model computed (exactly where the channels reach the rest of the
network only through weights and per-channel ops; a LayerNorm/GroupNorm over the channels, which averages the
zeros in, is the exception). Parameter shapes never change before ``squash``, so the user's optimizer, LR
scheduler, AMP scaler and DDP wrapper keep working.

**Schedule.** :class:`Schedule`: from ``start`` to ``steps`` the removed share of the MACs grows from 0 to
``1 - target_macs`` along a cubic (AGP: Zhu & Gupta 2017, fast early, gentle late) or linear curve, one
pruning step every ``every`` training steps. Each pruning step re-plans from scratch with the engine's planner
(``round_to``, ``max_ratio``, ignored and pinned groups as in one-shot pruning), so a channel masked earlier
comes back if it now ranks higher; the plan at ``steps`` is final. With ``target_latency`` (a fraction of the
dense latency or "4.5ms") and ``latency_table`` instead of ``target_macs``, the latency budget shrinks along the
same curve and every pruning step is planned by the latency knapsack (:mod:`trt_prune.latency.planner`).

**Importance.** ``taylor`` (default) accumulates first-order Taylor importance from the gradients of the
user's own loss between pruning steps: on BatchNorm γ/β where a group has them, |γ·∂L/∂γ + β·∂L/∂β| (HALP,
Shen et al. 2022), else Σ|w·∂L/∂w| over the group's weights (Molchanov et al. 2019). A masked channel has no
gradient, so it keeps the (mean-normalised) score it had when it was masked and competes with that. Any other
registered criterion (``l1``, ``bn_scale``…) scores the dense weights, masked ones included.

**Sparse training.** ``sparsity="bn_l1"`` (network slimming: λ·Σ|γ|) or ``"group_lasso"`` (λ·Σ over channels of
the L2 norm of everything the channel owns, over its whole coupled group) makes :meth:`ChannelPruner.penalty`
return that term to add to the loss; with ``Schedule(start=…)`` it runs alone before pruning begins.

**Distributed.** Wrap the model in ``DistributedDataParallel`` before or after ``prepare()``; give the pruner
the model either way. Gradients are already averaged by DDP; the pruner also all-reduces its scores before each
plan, so every rank computes the same masks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import PruneError
from .graph import ChannelGraph, ChannelGroup, trace
from .importance import TaylorImportance, get_importance
from .structured import (
    RECIPE_FORMAT,
    RECIPE_VERSION,
    PruneConfig,
    PruneResult,
    _apply,
    _check_runs,
    _layer_report,
    _plan,
    _prunable,
    _reference_outputs,
    count_params,
    output_shapes,
)

STATE_FORMAT = "trt_prune.channel_pruner"
STATE_VERSION = 1
SCHEDULE_KINDS = ("cubic", "linear")
SPARSITY_KINDS = (None, "bn_l1", "group_lasso")


@dataclasses.dataclass
class Schedule:
    """When to prune: pruning steps from training step ``start`` to ``steps`` (the final plan), one every
    ``every`` steps (default: about 30 pruning steps, as HALP), the removed share following ``kind``."""

    steps: int
    start: int = 0
    every: int | None = None
    kind: str = "cubic"

    def __post_init__(self):
        if not isinstance(self.steps, int) or not isinstance(self.start, int) or self.start < 0 \
                or self.steps <= self.start:
            raise PruneError(f"schedule needs 0 <= start < steps, got start={self.start}, steps={self.steps}; "
                             "steps is the training step at which the final target is reached")
        if self.kind not in SCHEDULE_KINDS:
            raise PruneError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.every is None:
            self.every = max(1, (self.steps - self.start) // 30)
        if not isinstance(self.every, int) or self.every < 1:
            raise PruneError(f"schedule every must be a positive number of steps, got {self.every}")

    def is_pruning_step(self, t: int) -> bool:
        """Whether training step ``t`` (1-based count of ``step()`` calls) re-plans the masks."""
        return self.start < t <= self.steps and ((t - self.start) % self.every == 0 or t == self.steps)

    def progress(self, t: int) -> float:
        """The share of the final removal reached at step ``t``: 0 before ``start``, 1 from ``steps`` on."""
        x = min(1.0, max(0.0, (t - self.start) / (self.steps - self.start)))
        return 1.0 - (1.0 - x) ** 3 if self.kind == "cubic" else x


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DataParallel/DistributedDataParallel wrapper (masks and surgery act on it)."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(itertools.chain(model.named_parameters(), model.named_buffers()))


def mask_for_plan(graph: ChannelGraph, plan: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Per tensor name, a boolean mask of the entries the structured cut of ``plan`` keeps (tensors the plan does
    not touch are left out): the engine's own cut is run on a copy of the model whose every parameter and buffer
    holds its flat indices, and the surviving indices are read back."""
    model = graph.model
    memo, index_of = {}, {}
    for name, t in _named_tensors(model).items():
        if not t.is_floating_point():
            continue
        probe = torch.arange(t.numel(), dtype=torch.float64).reshape(t.shape)  # exact up to 2**53 entries
        memo[id(t)] = nn.Parameter(probe, requires_grad=False) if isinstance(t, nn.Parameter) else probe
        index_of[name] = t
    clone = copy.deepcopy(model, memo)
    _apply(graph, plan, clone)
    masks = {}
    for name, t in _named_tensors(clone).items():
        original = index_of.get(name)
        if original is None or t.numel() == original.numel():
            continue
        keep = torch.zeros(original.numel(), dtype=torch.bool)
        keep[t.detach().reshape(-1).long()] = True
        masks[name] = keep.reshape(original.shape)
    return masks


class _AccumulatedTaylor(TaylorImportance):
    """Taylor importance from saliencies accumulated over training steps (see the module docstring): scores only
    a group's normalisation layers when it has any (HALP), its weights otherwise."""

    def __init__(self, saliency: dict[str, torch.Tensor], bn_scores: dict[str, torch.Tensor]):
        super().__init__()
        self.saliency = {**saliency, **{f"{path}.weight": s for path, s in bn_scores.items()}}
        self._bn = set(bn_scores)
        self._norm_only = False

    def __call__(self, graph, group):
        self._norm_only = any(s.kind == "norm" and s.module in self._bn for s in group.slots)
        return super().__call__(graph, group)

    def uses(self, slot):
        return slot.kind == "norm" if self._norm_only else slot.kind != "norm"


class ChannelPruner:
    """Gradual channel pruning of ``model`` to ``target_macs`` (fraction of the dense MACs to keep) inside the
    user's training loop; see the module docstring for the lifecycle.

    ``example_inputs``: an input tensor or its shape (batch 1 is enough), used to trace the channel graph and
    count MACs. ``importance``: ``taylor`` or any registered criterion. ``round_to``, ``ignore``, ``max_ratio``,
    ``global_pruning``: as :class:`~trt_prune.pruning.PruneConfig`. ``sparsity`` / ``sparsity_weight``: the
    optional sparse-training penalty. ``regrow=False``: a masked channel never comes back (each plan keeps a
    subset of the previous one), as in HALP.
    """

    def __init__(self, model: nn.Module, example_inputs, *, target_macs: float | None = None,
                 schedule: Schedule | int, importance: str = "taylor", round_to: int = 8,
                 ignore: tuple[str, ...] | list[str] = (), max_ratio: float | None = None,
                 global_pruning: bool = False, sparsity: str | None = None, sparsity_weight: float = 1e-4,
                 regrow: bool = True, target_latency: float | str | None = None, latency_table=None):
        self.target_latency, self.latency_table = target_latency, latency_table
        if target_latency is not None:
            from ..latency import parse_budget

            if target_macs is not None:
                raise PruneError("give target_macs or target_latency, not both")
            parse_budget(target_latency)
            if latency_table is None:
                raise PruneError("target_latency needs latency_table= (a LatencyTable or the folder "
                                 "`trt-prune latency-table MODEL -o DIR` wrote)")
            if global_pruning:
                raise PruneError("target_latency ranks channels across groups by itself; drop global_pruning")
            if max_ratio is None:  # the latency planner's default cap (trt_prune.latency.planner)
                from ..latency.planner import DEFAULT_MAX_RATIO

                max_ratio = DEFAULT_MAX_RATIO
        elif not isinstance(target_macs, (int, float)) or isinstance(target_macs, bool) \
                or not 0.0 < target_macs < 1.0:
            raise PruneError(f"target_macs is the fraction of the dense MACs to keep, in (0, 1); got {target_macs!r} "
                             "(0.5 keeps half), or give target_latency")
        if sparsity not in SPARSITY_KINDS:
            raise PruneError(f"sparsity must be one of {SPARSITY_KINDS}, got {sparsity!r}")
        if not sparsity_weight >= 0:
            raise PruneError(f"sparsity_weight must be >= 0, got {sparsity_weight}")
        self.schedule = schedule if isinstance(schedule, Schedule) else Schedule(steps=int(schedule))
        self.config = PruneConfig(ratio=0.5, round_to=round_to, importance=importance, ignore=tuple(ignore),
                                  target_macs=target_macs, global_pruning=global_pruning, max_ratio=max_ratio)
        self.config.validate()
        self.target_macs = None if target_macs is None else float(target_macs)
        self.latency = self.planner = None
        self.importance = importance
        self.sparsity, self.sparsity_weight = sparsity, float(sparsity_weight)
        self.regrow = bool(regrow)
        self.model = _unwrap(model)
        self._example_inputs = example_inputs
        self.graph: ChannelGraph | None = None
        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}
        self.plan: dict[str, list[int]] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.saved: dict[str, torch.Tensor] = {}  # dense values of masked entries, restored if they come back
        self.scores: dict[str, np.ndarray] = {}  # per group, mean-normalised, as of the last pruning step
        self.saliency: dict[str, torch.Tensor] = {}  # Taylor |w·g| summed since the last pruning step
        self.bn_scores: dict[str, torch.Tensor] = {}  # Taylor |γ·gγ + β·gβ| per norm layer, likewise
        self.accumulated = 0
        self.step_count = 0
        self.history: list[dict[str, Any]] = []
        self.squashed = False

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def prepare(self) -> ChannelPruner:
        """Trace the channel graph, check the target can be reached, and start with every channel kept."""
        if self.graph is not None:
            raise PruneError("prepare() was already called on this ChannelPruner")
        example = self._example()
        self.graph = trace(self.model, example, self.config.ignore)
        self._expected = output_shapes(_reference_outputs(self.graph, example))
        self._example_tensor = example
        self.groups, self.skipped = _prunable(self.graph, self.config)
        if not self.groups:
            raise PruneError("nothing to prune: every channel group is pinned or ignored "
                             f"({'; '.join(sorted(set(self.skipped.values())))})")
        self.dense_macs = self.graph.macs()
        if self.target_latency is not None:
            self._prepare_latency()
        else:
            self._check_reachable()
        self._group_index = self._penalty_index() if self.sparsity == "group_lasso" else None
        return self

    def step(self) -> dict[str, Any] | None:
        """Call once per training step, after ``optimizer.step()``: accumulates importance from the gradients,
        re-plans the masks on pruning steps, and re-applies them (the optimizer may have moved masked entries).
        Returns the pruning step's record (step, target and reached MACs, channels that came back) or None."""
        self._require_prepared("step()")
        self.step_count += 1
        self._accumulate()
        record = None
        if self.schedule.is_pruning_step(self.step_count):
            record = self._reprune()
        self._enforce()
        return record

    def squash(self, out: str | Path | None = None, source: str | None = None) -> PruneResult:
        """Cut the masked channels for good: the model shrinks in place (make a new optimizer for it), and a
        :class:`~trt_prune.pruning.PruneResult` with the recipe (replayable by
        :func:`~trt_prune.pruning.apply_recipe`) and a report comes back. With ``out``, the model folder
        (``model.json``, ``model.safetensors``, ``recipe.json``) is written too; ``source`` names the spec that
        rebuilds the architecture."""
        self._require_prepared("squash()")
        if self.squashed:
            raise PruneError("squash() was already called: the model is cut; prune the result again with a new "
                             "ChannelPruner if it should shrink further")
        meta = None
        if out is not None:
            from ..stages import _folder_meta, load

            meta = _folder_meta(load(self.model), self.graph.input_shape, source, "prune")  # errors before work
        plan = dict(self.plan)
        kept = self.graph.kept_mask(plan) if plan else None
        macs_after = self.graph.macs(kept)
        params_before = count_params(self.model)
        layers = _layer_report(self.graph, plan, self.skipped, self.config.ignore)
        self._enforce()
        _broadcast_buffers(self.model)  # under DDP every rank writes rank 0's statistics: one model, not N
        self.saved.clear()
        if plan:
            _apply(self.graph, plan)
        try:  # the model may have moved since prepare(): check it where it is now
            where = next(self.model.parameters()).device
        except StopIteration:
            where = self._example_tensor.device
        _check_runs(self.model, self._example_tensor.to(where), self._expected)
        self.squashed = True
        sizes = {g.key: g.size for g in self.graph.groups}
        recipe = {
            "format": RECIPE_FORMAT, "version": RECIPE_VERSION, "input_shape": list(self.graph.input_shape),
            "config": {"target_macs": self.target_macs, "target_latency": self.target_latency,
                       "round_to": self.config.round_to,
                       "importance": self.importance, "ignore": list(self.config.ignore),
                       "max_ratio": self.config.max_ratio, "global_pruning": self.config.global_pruning,
                       "gradual": {"steps": self.schedule.steps, "start": self.schedule.start,
                                   "every": self.schedule.every, "kind": self.schedule.kind,
                                   "sparsity": self.sparsity, "sparsity_weight": self.sparsity_weight}},
            "groups": [{"key": k, "channels": sizes[k], "keep": v} for k, v in sorted(plan.items())],
        }
        report = {
            "params_before": params_before, "params_after": count_params(self.model),
            "macs_before": self.dense_macs, "macs_after": macs_after,
            "groups_total": len(self.graph.groups), "groups_pruned": len(plan),
            "skipped_groups": [{"key": k, "reason": v} for k, v in sorted(self.skipped.items())],
            "layers": layers, "steps": self.step_count, "schedule_finished": self.step_count >= self.schedule.steps,
            "history": self.history,
        }
        result = PruneResult(self.model, recipe, report)
        if out is not None:
            from ..artifacts import save_model_folder
            from ..stages import write_json

            folder = save_model_folder(out, self.model, dataclasses.replace(meta, recipe=recipe))
            write_json(folder / "recipe.json", recipe)
            result.folder = folder
        return result

    # ---- the parts users call in their loop ----------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """The sparse-training term to add to the loss (0 without ``sparsity``): λ·Σ|γ| over the prunable
        groups' normalisation layers (``bn_l1``) or λ·Σ per channel of the L2 norm of all it owns (``group_lasso``)."""
        self._require_prepared("penalty()")
        device = next(self.model.parameters()).device
        if self.sparsity is None or self.sparsity_weight == 0:
            return torch.zeros((), device=device)
        if self.sparsity == "bn_l1":
            total = torch.zeros((), device=device)
            for path in self._norm_paths():
                weight = getattr(self.graph.modules[path], "weight", None)
                if isinstance(weight, torch.Tensor):
                    total = total + weight.abs().sum()
            return self.sparsity_weight * total
        total = torch.zeros((), device=device)
        params = dict(self.model.named_parameters())
        for size, parts in self._group_index:
            sq = torch.zeros(size, device=device)
            for name, axis, positions, mine in parts:
                t = params[name]
                per_index = t.square().sum(dim=[d for d in range(t.dim()) if d != axis]) if t.dim() > 1 \
                    else t.square()
                sq = sq.index_add(0, positions.to(device), per_index[mine.to(device)])
            total = total + (sq + 1e-12).sqrt().sum()
        return self.sparsity_weight * total

    def current_macs(self) -> float:
        """MACs of the masked model as a fraction of the dense model's."""
        self._require_prepared("current_macs()")
        if not self.plan:
            return 1.0
        return self.graph.macs(self.graph.kept_mask(self.plan)) / self.dense_macs

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-schedule (with the model's and optimizer's own state dicts)."""
        self._require_prepared("state_dict()")
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "step": self.step_count,
                "accumulated": self.accumulated, "plan": {k: list(v) for k, v in self.plan.items()},
                "scores": {k: v.tolist() for k, v in self.scores.items()},
                "saliency": {k: v.clone() for k, v in self.saliency.items()},
                "bn_scores": {k: v.clone() for k, v in self.bn_scores.items()},
                "saved": {k: v.clone() for k, v in self.saved.items()}, "history": list(self.history),
                "target_macs": self.target_macs, "schedule": dataclasses.asdict(self.schedule)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` on a prepared pruner over the same architecture (load the model's
        weights as usual; the masks are re-derived from the stored plan)."""
        self._require_prepared("load_state_dict()")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise PruneError(f"not a ChannelPruner state (format must be '{STATE_FORMAT}')")
        if state.get("version") != STATE_VERSION:
            raise PruneError(f"ChannelPruner state version {state.get('version')} is not supported "
                             f"(this trt_prune reads {STATE_VERSION})")
        keys = {g.key: g.size for g in self.groups}
        for key, keep in state["plan"].items():
            if key not in keys or any(not 0 <= i < keys[key] for i in keep):
                raise PruneError(f"ChannelPruner state names group '{key}' that this model's prunable groups do not "
                                 "match; it was saved for another architecture or other pruning options")
        self.step_count, self.accumulated = int(state["step"]), int(state["accumulated"])
        self.plan = {k: list(v) for k, v in state["plan"].items()}
        self.scores = {k: np.asarray(v, dtype=np.float64) for k, v in state["scores"].items()}
        self.saliency = {k: v.clone() for k, v in state["saliency"].items()}
        self.bn_scores = {k: v.clone() for k, v in state["bn_scores"].items()}
        self.saved = {k: v.clone() for k, v in state["saved"].items()}
        self.history = list(state["history"])
        self.masks = mask_for_plan(self.graph, self.plan) if self.plan else {}
        self._enforce()

    # ---- internals ---------------------------------------------------------------------------------------
    def _example(self) -> torch.Tensor:
        ex = self._example_inputs
        try:
            device = next(self.model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        if isinstance(ex, torch.Tensor):
            return ex[:1].detach().to(device)
        if isinstance(ex, (tuple, list)) and all(isinstance(d, int) and d > 0 for d in ex) and len(ex) >= 2:
            gen = torch.Generator().manual_seed(0)
            return torch.rand((1, *ex[1:]), generator=gen).to(device)
        raise PruneError(f"example_inputs must be an input tensor or its shape like (1, 3, 320, 320), got "
                         f"{str(ex)[:80]}")

    def _require_prepared(self, what: str) -> None:
        if self.graph is None:
            raise PruneError(f"{what} before prepare(): call pruner.prepare() once, before training starts")
        if self.squashed and what != "squash()":
            raise PruneError(f"{what} after squash(): the model is already cut")

    def _prepare_latency(self) -> None:
        """The latency model and planner for ``target_latency``; an unreachable budget fails here, naming the
        smallest latency the options allow."""
        from ..latency import LatencyModel, LatencyPlanner, budget_ms, load_table
        from ..latency.table import LatencyTable

        table = self.latency_table if isinstance(self.latency_table, LatencyTable) else load_table(self.latency_table)
        self.latency = LatencyModel(self.graph, table)
        self.planner = LatencyPlanner(self.latency, self.groups, self.config.round_to, self.config.max_ratio)
        self.dense_ms = self.planner.dense_ms
        self.budget_ms = budget_ms(self.target_latency, self.dense_ms)
        floor = self.latency.predict(self.graph.kept_mask({g.key: self._min_keep(g) for g in self.groups}))
        if self.budget_ms < floor - 1e-9:
            raise PruneError(f"target_latency={self.target_latency} ({self.budget_ms:.3f} ms) cannot be reached: "
                             f"the smallest model these options allow is predicted at {floor:.3f} ms (dense "
                             f"{self.dense_ms:.3f} ms); raise the budget or lower round_to/max_ratio")

    def _check_reachable(self) -> None:
        """The smallest model the options allow must meet the target, else one error naming why not."""
        floor = {g.key: self._min_keep(g) for g in self.groups}
        least = self.graph.macs(self.graph.kept_mask(floor)) / self.dense_macs
        if least <= self.target_macs:
            return
        whole = sorted(self.skipped.items(), key=lambda kv: -self._group_macs(kv[0]))[:3]
        names = "; ".join(f"'{k[:60]}' ({self._group_macs(k) / self.dense_macs:.0%} of MACs): {why}"
                          for k, why in whole)
        raise PruneError(f"target_macs={self.target_macs} cannot be reached: with round_to={self.config.round_to}"
                         f"{f', max_ratio={self.config.max_ratio}' if self.config.max_ratio else ''} the smallest "
                         f"model keeps {least:.3f} of the MACs. Largest groups left whole: {names or 'none'}. "
                         "Raise target_macs, lower round_to/max_ratio, or un-ignore those modules")

    def _min_keep(self, group: ChannelGroup) -> list[int]:
        from .structured import _aligned_keep

        segments = group.segments or [list(range(group.size))]
        keep = []
        for seg in segments:
            keep.extend(seg[:_aligned_keep(len(seg), 0.999, self.config.round_to, self.config.max_ratio)])
        return sorted(keep)

    def _group_macs(self, key: str) -> float:
        """MACs of the conv/linear layers that read or write this group's channels."""
        group = next(g for g in self.graph.groups if g.key == key)
        classes = set(group.classes)
        total = 0
        for node in self.graph.compute:
            touched = any(node_cls is not None and classes.intersection(node_cls.tolist())
                          for node_cls in (node.in_classes, node.out_classes))
            total += node.macs if touched else 0
        return total

    def _norm_paths(self) -> list[str]:
        paths = []
        for g in self.groups:
            paths.extend(s.module for s in g.slots if s.kind == "norm")
        return list(dict.fromkeys(paths))

    def _penalty_index(self):
        """For group lasso: per prunable group, (size, [(param name, axis, group positions, slot indices)])."""
        from .importance import slot_param

        out = []
        params = dict(self.model.named_parameters())
        for g in self.groups:
            classes = np.asarray(g.classes, dtype=np.int64)
            order = np.argsort(classes)
            sorted_classes = classes[order]
            parts = []
            for slot in g.slots:
                found = slot_param(self.graph.modules[slot.module], slot)
                if found is None:
                    continue
                name = f"{slot.module}.{found[0]}" if slot.module else found[0]
                if name not in params or params[name].dim() <= found[1]:
                    continue
                at = np.minimum(np.searchsorted(sorted_classes, slot.classes), len(classes) - 1)
                mine = sorted_classes[at] == slot.classes
                if mine.any():
                    parts.append((name, found[1], torch.from_numpy(order[at[mine]]),
                                  torch.from_numpy(np.flatnonzero(mine))))
            out.append((g.size, parts))
        return out

    def _accumulate(self) -> None:
        if self.importance != "taylor" or self.step_count > self.schedule.steps:
            return
        with torch.no_grad():
            norm = set(self._norm_paths())
            for name, p in self.model.named_parameters():
                if p.grad is None:
                    continue
                path, _, leaf = name.rpartition(".")
                if path in norm:
                    if leaf == "weight":
                        module = self.graph.modules[path]
                        s = p * p.grad
                        bias = getattr(module, "bias", None)
                        if isinstance(bias, torch.Tensor) and bias.grad is not None:
                            s = s + bias * bias.grad
                        self.bn_scores[path] = self.bn_scores.get(path, 0) + s.abs().float()
                    continue
                self.saliency[name] = self.saliency.get(name, 0) + (p * p.grad).abs().float()
        self.accumulated += 1

    def _group_scores(self) -> dict[str, np.ndarray]:
        if self.importance == "taylor":
            if self.accumulated == 0:
                raise PruneError("importance 'taylor' got no gradients: call loss.backward() and optimizer.step() "
                                 "before pruner.step(), or choose importance='l1'")
            crit = _AccumulatedTaylor(self.saliency, self.bn_scores)
            raw = {g.key: crit(self.graph, g) for g in self.groups}
        else:
            crit = get_importance(self.importance)
            with self._dense_view():
                raw = {g.key: crit(self.graph, g) for g in self.groups}
        raw = _all_reduce_mean(raw)
        scores = {}
        for g in self.groups:
            new = np.asarray(raw[g.key], dtype=np.float64)
            live = np.ones(g.size, dtype=bool)
            if g.key in self.plan:
                live[:] = False
                live[self.plan[g.key]] = True
            mean = new[live].mean() if live.any() else 0.0
            new = new / mean if mean > 0 else np.ones_like(new)
            previous = self.scores.get(g.key)
            if not self.regrow:
                new = np.where(live, new, 0.0)  # masked channels rank last
            elif self.importance == "taylor" and previous is not None:
                new = np.where(live, new, previous)  # a masked channel competes with the score it had
            scores[g.key] = new
        return scores

    def _reprune(self) -> dict[str, Any]:
        scores = self._group_scores()
        self.scores = scores
        final = self.target_macs if self.latency is None else self.budget_ms / self.dense_ms
        removed = (1.0 - final) * self.schedule.progress(self.step_count)
        previous = self.plan
        if removed <= 0:
            plan = {}
        elif self.latency is not None:  # the budget shrinks along the schedule, like the MACs target
            plan, _ = self.planner.plan(scores, self.dense_ms * max(final, 1.0 - removed))
            if not self.regrow:
                for key, keep in previous.items():
                    if key not in plan or not set(plan[key]) <= set(keep):
                        plan[key] = list(keep)
        else:
            config = dataclasses.replace(self.config, target_macs=max(self.target_macs, 1.0 - removed))
            plan, _, _ = _plan(self.graph, config, lambda graph, group: scores[group.key])
            sizes = {g.key: g.size for g in self.groups}
            plan = {k: v for k, v in plan.items() if len(v) < sizes[k]}
            if not self.regrow:  # a group the new plan lets grow keeps its previous channels instead
                for key, keep in previous.items():
                    if key not in plan or not set(plan[key]) <= set(keep):
                        plan[key] = list(keep)
        revived = 0
        for g in self.groups:
            before = set(previous.get(g.key, range(g.size)))
            revived += len(set(plan.get(g.key, range(g.size))) - before)
        self._set_masks(plan)
        self.plan = plan
        self.saliency.clear()
        self.bn_scores.clear()
        self.accumulated = 0
        record = {"step": self.step_count, "target_macs": round(1.0 - removed, 6),
                  "macs": round(self.current_macs(), 6), "revived_channels": revived}
        if self.latency is not None:
            record["target_latency_ms"] = round(self.dense_ms * (1.0 - removed), 5)
            record["predicted_ms"] = round(self.latency.predict(self.graph.kept_mask(plan)), 5)
            del record["target_macs"]
        self.history.append(record)
        return record

    def _set_masks(self, plan: dict[str, list[int]]) -> None:
        tensors = _named_tensors(self.model)
        new = {k: v.to(tensors[k].device) for k, v in mask_for_plan(self.graph, plan).items()} if plan else {}
        with torch.no_grad():
            for name in set(self.masks) | set(new):
                t = tensors[name]
                old_keep = self.masks.get(name)
                new_keep = new.get(name)
                old_keep = torch.ones_like(t, dtype=torch.bool) if old_keep is None else old_keep.to(t.device)
                new_keep = torch.ones_like(t, dtype=torch.bool) if new_keep is None else new_keep.to(t.device)
                going, coming = old_keep & ~new_keep, ~old_keep & new_keep
                if going.any():
                    saved = self.saved.setdefault(name, torch.zeros_like(t))
                    saved[going] = t[going]
                if coming.any():
                    t[coming] = self.saved[name][coming].to(t.dtype)
        self.masks = new
        for name in list(self.saved):
            if name not in new:
                del self.saved[name]

    def _enforce(self) -> None:
        if not self.masks:
            return
        tensors = _named_tensors(self.model)
        with torch.no_grad():
            for name, keep in self.masks.items():
                t = tensors[name]
                t.mul_(keep.to(device=t.device, dtype=t.dtype))

    @contextlib.contextmanager
    def _dense_view(self):
        """Within: masked entries hold their saved dense values (magnitude criteria score them too)."""
        tensors = _named_tensors(self.model)
        with torch.no_grad():
            for name, keep in self.masks.items():
                saved = self.saved.get(name)
                if saved is not None:
                    t = tensors[name]
                    t.copy_(torch.where(keep.to(t.device), t, saved.to(t.dtype)))
        try:
            yield
        finally:
            self._enforce()


def _broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics: DDP syncs them before each forward, so the last local update
    differs) on every rank of an initialised process group; a no-op otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def _all_reduce_mean(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Average the per-group scores over the ranks of an initialised process group (a no-op otherwise), so
    every rank plans from the same numbers."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return scores
    keys = sorted(scores)
    flat = torch.from_numpy(np.concatenate([np.asarray(scores[k], dtype=np.float64) for k in keys]))
    backend = dist.get_backend()
    if backend == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = (flat / dist.get_world_size()).cpu().numpy()
    out, at = {}, 0
    for k in keys:
        n = len(scores[k])
        out[k] = flat[at:at + n]
        at += n
    return out


__all__ = ["ChannelPruner", "Schedule", "mask_for_plan"]
