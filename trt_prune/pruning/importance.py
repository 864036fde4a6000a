"""Channel importance: one score per channel (class) of a :class:`~.graph.ChannelGroup`.

Scores are reduced over the whole coupled group: every layer that reads or writes a channel contributes,
each layer's contributions normalised by their mean so that one wide layer does not drown the others.

Criteria: ``l1`` and ``l2`` (weight magnitude), ``bn_scale`` (|gamma| of the group's normalisation layers,
network slimming), ``taylor`` (first-order Taylor expansion of the loss, |w·∂L/∂w| summed over a channel's
weights, gradients accumulated over one or more batches: Molchanov et al., CVPR 2019) and ``random``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import PruneError
from ..registry import Registry
from .graph import ChannelGraph, ChannelGroup, Slot

IMPORTANCES: Registry[str, type[Importance]] = Registry("importance", PruneError)


def register_importance(name: str, replace: bool = False):
    """Class decorator: make an :class:`Importance` available by ``name`` (CLI ``--importance``)."""

    def deco(cls):
        cls.name = name
        return IMPORTANCES.register(name, cls, replace=replace)

    return deco


def get_importance(name: str) -> Importance:
    """The importance criterion called ``name``; an unknown name lists the valid ones."""
    return IMPORTANCES.lookup(name)()


def slot_param(module: nn.Module, slot: Slot) -> tuple[str, int] | None:
    """The name (on ``module``) of the parameter whose axis ``slot`` indexes, and that axis."""
    if slot.kind.startswith("param:"):
        _, name, axis = slot.kind.split(":")
        return name, int(axis)
    if getattr(module, "weight", None) is None:
        return None
    return "weight", 1 if slot.kind == "in" else 0


def _reduce_except(t: torch.Tensor, axis: int, ord: float) -> torch.Tensor:
    """The ``ord``-norm (1 or 2) of ``t`` over every axis but ``axis``. Written as abs/square + sum, not
    ``torch.linalg.vector_norm``: on the CPU that is 2-4× slower for a reduction over several dims."""
    a = t.abs() if ord == 1 else t.square()
    if a.dim() == 1:
        out = a
    elif axis == 0:
        out = a.reshape(a.shape[0], -1).sum(1)
    else:
        out = a.sum(dim=[d for d in range(a.dim()) if d != axis])
    return out if ord == 1 else out.sqrt()


class Importance(ABC):
    name = "base"

    def prepare(self, model: nn.Module, data=None, loss_fn=None) -> None:  # noqa: B027 - optional hook
        """Called once before scoring, on the model about to be pruned (gradient-based criteria use it)."""

    def __call__(self, graph: ChannelGraph, group: ChannelGroup) -> np.ndarray:
        modules = graph.modules
        classes = np.asarray(group.classes, dtype=np.int64)
        order = np.argsort(classes)
        sorted_classes = classes[order]
        score = np.zeros(group.size, dtype=np.float64)
        used = False
        slots = [s for s in group.slots if self.uses(s)]
        found_all = [slot_param(modules[s.module], s) for s in slots]
        # biases only score a group that has nothing else: a conv's bias is not part of its 'out' slot either
        if any(f is not None and "bias" not in f[0] for f in found_all):
            found_all = [None if f is not None and "bias" in f[0] else f for f in found_all]
        for slot, found in zip(slots, found_all, strict=True):
            if found is None:
                continue
            per_index = self.slot_scores(slot.module, modules[slot.module], *found)
            if per_index is None or len(per_index) != len(slot.classes):
                continue
            per_index = per_index.detach().cpu().numpy().astype(np.float64)
            mean = per_index.mean()
            if mean > 0:
                per_index = per_index / mean
            # positions of this slot's classes in the group (a slot may also index other groups' channels)
            at = np.minimum(np.searchsorted(sorted_classes, slot.classes), len(classes) - 1)
            mine = sorted_classes[at] == slot.classes
            if mine.any():
                np.add.at(score, order[at[mine]], per_index[mine])
                used = True
        if not used:
            raise PruneError(f"importance '{self.name}' found no parameters to score in group '{group.key}'")
        return score

    def uses(self, slot: Slot) -> bool:
        return True

    def slot_scores(self, path: str, module: nn.Module, name: str, axis: int) -> torch.Tensor | None:
        t = getattr(module, name, None)
        if not isinstance(t, torch.Tensor) or t.dim() <= axis:
            return None
        return self.per_index(t.detach().float(), axis)

    @abstractmethod
    def per_index(self, w: torch.Tensor, axis: int) -> torch.Tensor:
        """Score of each index along ``axis`` of ``w``."""


@register_importance("l1")
class L1Importance(Importance):
    def per_index(self, w, axis):
        return _reduce_except(w, axis, 1)


@register_importance("l2")
class L2Importance(Importance):
    def per_index(self, w, axis):
        return _reduce_except(w, axis, 2)


@register_importance("bn_scale")
class BNScaleImportance(Importance):
    """|gamma| of the normalisation layers in the group (network slimming)."""

    def uses(self, slot):
        return slot.kind == "norm"

    def per_index(self, w, axis):
        return _reduce_except(w, axis, 1)


LossFn = Callable[[nn.Module, object], torch.Tensor]


@register_importance("taylor")
class TaylorImportance(Importance):
    """First-order Taylor: removing weight w changes the loss by about |w·g|, g the gradient of the loss.
    A channel's score sums that over its weights in every layer of the group.

    Needs ``data`` (an iterable of batches) and ``loss_fn(model, batch) -> scalar loss``. Gradients are taken
    with :func:`torch.autograd.grad` in eval mode, so the model's ``.grad`` fields and BatchNorm statistics are
    left as they were; they are summed over the batches before the product with the weights."""

    def __init__(self):
        self.saliency: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, data: Iterable | None = None, loss_fn: LossFn | None = None) -> None:
        if data is None or loss_fn is None:
            raise PruneError("importance 'taylor' needs gradients: pass data= (batches) and "
                             "loss_fn=(model, batch) -> loss to prune(), or choose l1/l2/bn_scale")
        named = [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]
        params = [p for _, p in named]
        total = [torch.zeros_like(p) for p in params]
        was_training = model.training
        model.eval()
        batches = 0
        try:
            with torch.enable_grad():
                for batch in data:
                    loss = loss_fn(model, batch)
                    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                        raise PruneError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                                         f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                    for acc, g in zip(total, grads, strict=True):
                        if g is not None:
                            acc += g
                    batches += 1
        finally:
            model.train(was_training)
        if batches == 0:
            raise PruneError("importance 'taylor' got no batches from data=")
        self.saliency = {n: (p.detach() * g).abs() for (n, p), g in zip(named, total, strict=True)}

    def slot_scores(self, path, module, name, axis):
        sal = self.saliency.get(f"{path}.{name}" if path else name)
        if sal is None or sal.dim() <= axis:
            return None
        return _reduce_except(sal.float(), axis, 1)

    def per_index(self, w, axis):  # pragma: no cover - slot_scores is overridden
        raise NotImplementedError


@register_importance("random")
class RandomImportance(Importance):
    """Seeded random scores: the baseline every other criterion has to beat."""

    def __call__(self, graph, group):
        seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(group.key)) % (2**32)
        return np.random.default_rng(seed).random(group.size)

    def per_index(self, w, axis):  # pragma: no cover - __call__ is overridden
        raise NotImplementedError
