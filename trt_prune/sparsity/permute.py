"""Channel permutations for 2:4, applied through the channel graph so the network computes the same function.

For every channel group (see :mod:`trt_prune.pruning.graph`) read by 2:4 layers, the search of
:mod:`.permutation` reorders the group's channels to raise the weight magnitude those layers keep under the
2:4 mask (their weights stacked, so one order serves them all). The order is then applied to *every* tensor
axis that indexes those channels — the producers' output rows and biases, the norms, every consumer's input
columns, free parameters — exactly as structured pruning cuts them, so the outputs are unchanged.

A group is left in place, with the reason, when its channels feed a model output or come from the input
(pinned), when a split or a reshape into heads fixes positions (segments), or when none of its 2:4 readers
sees its channels in the group's own order as one block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import SparsifyError
from ..pruning.graph import ChannelGraph, trace
from ..pruning.structured import _example
from ..pruning.surgery import cut_axis
from .permutation import SCORERS, search_permutation
from .sparsify import DEFAULT_MIN_CHANNELS, _layer_kind, eligibility


@dataclass
class PermuteResult:
    model: nn.Module
    groups: list[dict] = field(default_factory=list)  # per group: consumers, efficacy, kept magnitudes, seconds

    @property
    def permuted(self) -> list[dict]:
        return [g for g in self.groups if g.get("permuted")]


def _sparse_readers(graph: ChannelGraph, min_channels: int) -> dict[str, nn.Module]:
    """Conv/Linear layers (groups=1) that 2:4 would be applied to at ``min_channels``."""
    readers = {}
    for path, module in graph.modules.items():
        kind = _layer_kind(module)
        if kind is None or getattr(module, "groups", 1) != 1 or isinstance(module, nn.modules.conv._ConvTransposeNd):
            continue
        if eligibility(kind, tuple(module.weight.shape), 1, min_channels).eligible:
            readers[path] = module
    return readers


def _reorder_index(slot_classes: np.ndarray, sigma: dict[int, int]) -> np.ndarray | None:
    """For one slot: the source position of every position once each class c is replaced by sigma[c] (the k-th
    occurrence of c takes the k-th occurrence of sigma[c], for slots that repeat classes, e.g. after a flatten)."""
    occurrences: dict[int, list[int]] = {}
    for p, c in enumerate(slot_classes.tolist()):
        occurrences.setdefault(c, []).append(p)
    idx = np.arange(len(slot_classes))
    seen: dict[int, int] = {}
    changed = False
    for p, c in enumerate(slot_classes.tolist()):
        target = sigma.get(c)
        if target is None or target == c:
            continue
        k = seen.get(c, 0)
        seen[c] = k + 1
        idx[p] = occurrences[target][k]
        changed = True
    return idx if changed else None


def permute_for_24(model: nn.Module, input_shape=(1, 3, 320, 320), *, min_channels: int = DEFAULT_MIN_CHANNELS,
                   time_budget_s: float = 1.0, seed: int = 0, inplace: bool = False,
                   scorer: str = "numpy") -> PermuteResult:
    """Reorder channels so that 2:4 masks on the eligible layers keep more weight magnitude.

    Returns a copy of ``model`` (or ``model`` itself with ``inplace``) whose outputs are the same, and per
    group: the 2:4 layers that read it, the magnitude kept without and with the permutation, ASP's efficacy,
    and the search time. Apply :func:`~.sparsify.sparsify` (or a :class:`~.lifecycle.Sparsifier`) afterwards.
    ``scorer="kernel"`` scores the search's candidate splits with the Triton kernel of
    ``trt_prune.kernels.sparse24`` (on a CUDA GPU: layers of thousands of channels within the budget).
    """
    if time_budget_s < 0:
        raise SparsifyError(f"time_budget_s must be >= 0, got {time_budget_s}")
    if scorer not in SCORERS:
        raise SparsifyError(f"the permutation scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    work = model if inplace else copy.deepcopy(model)
    graph = trace(work, _example(work, input_shape))
    readers = _sparse_readers(graph, min_channels)
    if not readers:
        raise SparsifyError(f"no layer of this model is eligible for 2:4 at min_channels={min_channels}: nothing "
                            "to permute for")
    rows = []
    for g in graph.groups:
        classes = np.asarray(g.classes, dtype=np.int64)
        consumers = [s for s in g.slots if s.kind == "in" and s.module in readers]
        if not consumers:
            continue
        row = {"group": g.key, "channels": g.size, "layers": [s.module for s in consumers], "permuted": False}
        rows.append(row)
        if g.pinned:
            row["reason"] = f"pinned: {g.pinned}"
            continue
        if g.segments:
            row["reason"] = "a split or head reshape fixes channel positions"
            continue
        # readers that see exactly this group's channels, in the group's order, as their whole input
        usable = [s for s in consumers if np.array_equal(s.classes, classes)]
        if not usable:
            row["reason"] = "no 2:4 layer reads this group alone and in order"
            continue
        mats = []
        for s in usable:
            w = readers[s.module].weight.detach().float().cpu().numpy()
            mats.append(np.moveaxis(w, 1, -1).reshape(-1, w.shape[1]))  # rows of [.., C]: runs of 4 along C
        stacked = np.concatenate(mats, 0)
        found = search_permutation(stacked, time_budget_s=time_budget_s, seed=seed, scorer=scorer)
        row.update(layers=[s.module for s in usable], kept_plain=found.kept_plain,
                   kept_permuted=found.kept_permuted, kept_unstructured=found.kept_unstructured,
                   efficacy=found.efficacy, seconds=found.seconds)
        perm = np.asarray(found.perm)
        if np.array_equal(perm, np.arange(len(perm))):
            row["reason"] = "the search found nothing better than the current order"
            continue
        # position i of the group now carries the channel that was at position perm[i]
        sigma = {int(c): int(classes[perm[i]]) for i, c in enumerate(classes)}
        for slot in g.slots:
            idx = _reorder_index(slot.classes, sigma)
            if idx is not None:
                cut_axis(graph.modules[slot.module], slot.kind, torch.from_numpy(idx), slot.module)
        row["permuted"] = True
    return PermuteResult(work, rows)
