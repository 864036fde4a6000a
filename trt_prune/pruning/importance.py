"""Channel importance: one score per channel (union-find class) of a :class:`~.graph.ChannelGroup`.

Scores are reduced over the whole coupled group: every layer that reads or writes a channel contributes,
each layer's contributions normalised by their mean so that one wide layer does not drown the others.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import nn

from ..errors import PruneError
from .graph import ChannelGraph, ChannelGroup, Slot

IMPORTANCES: dict[str, type[Importance]] = {}


def register_importance(name: str):
    """Class decorator: make an :class:`Importance` available by ``name`` (CLI ``--importance``)."""

    def deco(cls):
        cls.name = name
        IMPORTANCES[name] = cls
        return cls

    return deco


def get_importance(name: str) -> Importance:
    """The importance criterion called ``name``; an unknown name lists the valid ones."""
    try:
        return IMPORTANCES[name]()
    except KeyError:
        raise PruneError(f"unknown importance '{name}'; choose one of {sorted(IMPORTANCES)}") from None


def slot_tensor(module: nn.Module, slot: Slot) -> torch.Tensor | None:
    """The parameter whose axis ``slot`` indexes, moved so that axis is first (None if it has no weight)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    w = weight.detach().float()
    if slot.kind == "in":
        return w.transpose(0, 1)
    return w


class Importance(ABC):
    name = "base"

    def __call__(self, graph: ChannelGraph, group: ChannelGroup) -> np.ndarray:
        modules = dict(graph.model.named_modules())
        pos = {c: i for i, c in enumerate(group.classes)}
        score = np.zeros(group.size, dtype=np.float64)
        used = False
        for slot in group.slots:
            w = slot_tensor(modules[slot.module], slot)
            if w is None or not self.uses(slot):
                continue
            per_index = self.per_index(w).numpy().astype(np.float64)
            mean = per_index.mean()
            if mean > 0:
                per_index = per_index / mean
            for i, e in enumerate(slot.elements):
                j = pos.get(graph.cls(e))
                if j is not None:
                    score[j] += per_index[i]
                    used = True
        if not used:
            raise PruneError(f"importance '{self.name}' found no parameters to score in group '{group.key}'")
        return score

    def uses(self, slot: Slot) -> bool:
        return True

    @abstractmethod
    def per_index(self, w: torch.Tensor) -> torch.Tensor:
        """Score of each index along axis 0 of ``w``."""


@register_importance("l1")
class L1Importance(Importance):
    def per_index(self, w):
        return w.abs().reshape(w.shape[0], -1).sum(1)


@register_importance("l2")
class L2Importance(Importance):
    def per_index(self, w):
        return w.pow(2).reshape(w.shape[0], -1).sum(1).sqrt()


@register_importance("bn_scale")
class BNScaleImportance(Importance):
    """|gamma| of the normalisation layers in the group (network slimming)."""

    def uses(self, slot):
        return slot.kind == "norm"

    def per_index(self, w):
        return w.abs().reshape(w.shape[0], -1).sum(1)


@register_importance("random")
class RandomImportance(Importance):
    """Seeded random scores: the baseline every other criterion has to beat."""

    def __call__(self, graph, group):
        seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(group.key)) % (2**32)
        return np.random.default_rng(seed).random(group.size)

    def per_index(self, w):  # pragma: no cover - __call__ is overridden
        raise NotImplementedError
