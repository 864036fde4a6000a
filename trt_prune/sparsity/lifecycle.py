"""2:4 sparsity as a training-time lifecycle, in the manner of ``torch.ao.pruning``'s sparsifiers:

``prepare`` → (``step`` to recompute masks) → fine-tune → ``squash``.

- :meth:`Sparsifier.prepare` puts a :class:`Mask24` parametrization on the weight of every eligible layer:
  the dense weight stays (``layer.parametrizations.weight.original``) and the forward sees ``original * mask``,
  so the pruned weights are zero in every forward pass whatever the optimizer does to ``original``, including
  under ``DistributedDataParallel`` (the mask is a buffer, broadcast with the others).
- :meth:`Sparsifier.step` recomputes the masks from the current dense weights (magnitude, TensorRT's axis).
- :meth:`Sparsifier.squash` bakes the zeros into plain weights and removes the parametrizations.

``model.state_dict()`` round-trips at every stage: a freshly built model given the same ``prepare`` loads a
prepared state dict (dense weights and masks), and a squashed one is a plain state dict.

Why ``torch.nn.utils.parametrize`` rather than ``torch.ao.pruning.WeightNormSparsifier``: the ao sparsifier's
block masks run along the output axis by default and its config is per-layer block shapes; TensorRT needs runs
of 4 along the *input* channels, which :func:`~.pattern.mask_2of4` computes, so only the bookkeeping is
shared, and a parametrization is that bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import SparsifyError
from .pattern import holds_2of4, mask_2of4
from .sparsify import DEFAULT_MIN_CHANNELS, _layer_kind, eligibility


class Mask24(nn.Module):
    """Parametrization ``weight = original * mask`` with a 2:4 keep-mask along axis 1 (stored as a buffer)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def _compute_mask(weight: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(mask_2of4(weight.detach().float().cpu().numpy(), axis=1)).to(weight.device)


@dataclass
class Sparsifier:
    """Which layers get 2:4 and the lifecycle over them.

    ``layers``: module paths to sparsify (each must be able to hold the pattern: an explicit request that
    cannot is an error); ``None`` picks every layer :func:`~.sparsify.eligibility` accepts at ``min_channels``.
    """

    layers: list[str] | None = None
    min_channels: int = DEFAULT_MIN_CHANNELS
    report: list[dict] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)

    def _choose(self, model: nn.Module) -> list[str]:
        modules = dict(model.named_modules())
        rows, chosen = [], []
        if self.layers is not None:
            for path in self.layers:
                module = modules.get(path)
                if module is None or _layer_kind(module) is None:
                    raise SparsifyError(f"'{path}' is not a Conv/Linear layer of this model; layers look like "
                                        f"{[p for p, m in modules.items() if _layer_kind(m)][:3]}")
                verdict = eligibility(_layer_kind(module), tuple(module.weight.shape),
                                      getattr(module, "groups", 1), min_channels=0)
                if not verdict.eligible:
                    raise SparsifyError(f"'{path}' cannot hold 2:4: {verdict.reason}; leave it out of layers=")
                chosen.append(path)
                rows.append({"module": path, "made_24": True, "reason": "requested"})
        else:
            for path, module in modules.items():
                kind = _layer_kind(module)
                if kind is None:
                    continue
                verdict = eligibility(kind, tuple(module.weight.shape), getattr(module, "groups", 1),
                                      self.min_channels)
                rows.append({"module": path, "made_24": verdict.eligible, "reason": verdict.reason})
                if verdict.eligible:
                    chosen.append(path)
            if not chosen:
                raise SparsifyError(f"no layer of this model is eligible for 2:4 at min_channels="
                                    f"{self.min_channels}; lower min_channels or name layers explicitly")
        self.report = rows
        return chosen

    def prepare(self, model: nn.Module) -> nn.Module:
        """Register the masks on ``model`` (in place) and return it."""
        if self.prepared:
            raise SparsifyError("this Sparsifier is already prepared; squash it or make a new one")
        chosen = self._choose(model)
        modules = dict(model.named_modules())
        for path in chosen:
            module = modules[path]
            if parametrize.is_parametrized(module, "weight"):
                raise SparsifyError(f"'{path}' already has a weight parametrization; squash it first")
            parametrize.register_parametrization(module, "weight", Mask24(_compute_mask(module.weight)))
        self.prepared = chosen
        return model

    def _masks(self, model: nn.Module):
        modules = dict(model.named_modules())
        for path in self.prepared:
            module = modules[path]
            if not parametrize.is_parametrized(module, "weight"):
                raise SparsifyError(f"'{path}' is not prepared (was the model rebuilt?); call prepare on it")
            yield path, module, module.parametrizations.weight

    @torch.no_grad()
    def step(self, model: nn.Module) -> None:
        """Recompute every mask from the current dense weights."""
        for _, _, param in self._masks(model):
            param[0].mask.copy_(_compute_mask(param.original))

    def masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {path: param[0].mask.clone() for path, _, param in self._masks(model)}

    def squash(self, model: nn.Module) -> nn.Module:
        """Bake the zeros into plain weights, remove the parametrizations, and check the pattern holds."""
        for path, module, _ in list(self._masks(model)):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            if not holds_2of4(module.weight.detach().cpu().numpy(), axis=1):
                raise SparsifyError(f"internal error: '{path}' does not hold 2:4 after squash")
        self.prepared = []
        return model
