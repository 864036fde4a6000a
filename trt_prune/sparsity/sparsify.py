"""2:4 sparsification of a torch model: eligibility per layer, magnitude masks on TensorRT's axis.

Eligibility is pure (:func:`eligibility`), so the same verdicts are tested on the CPU and used when planning a
TensorRT build. Masks are kept in :class:`SparseMasks` so fine-tuning can re-apply them after every
optimizer step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SparsifyError
from .pattern import GROUP, holds_2of4, mask_2of4

# NVIDIA's guidance (shared REFERENCE.md §2): sparse kernels rarely win below ~256 input and output channels.
DEFAULT_MIN_CHANNELS = 256


@dataclass
class Eligibility:
    eligible: bool
    reason: str


def eligibility(kind: str, weight_shape: tuple[int, ...], groups: int = 1,
                min_channels: int = DEFAULT_MIN_CHANNELS) -> Eligibility:
    """Can and should a layer run 2:4 sparse in TensorRT?

    ``kind`` is ``conv`` or ``linear``; ``weight_shape`` is PyTorch's (``[K, C/groups, …]`` or ``[out, in]``).
    """
    out_ch, in_per_group = int(weight_shape[0]), int(weight_shape[1])
    in_ch = in_per_group * groups
    if kind == "conv" and groups > 1 and in_per_group == 1:
        return Eligibility(False, "depthwise convolution: no reduction axis to carry the pattern")
    if in_per_group % GROUP:
        return Eligibility(False, f"input channels per group {in_per_group} not a multiple of {GROUP}")
    if min(in_ch, out_ch) < min_channels:
        return Eligibility(False, f"too small to pay: in {in_ch}, out {out_ch} < {min_channels} "
                                  "(TensorRT rarely picks a sparse kernel)")
    return Eligibility(True, "eligible")


def _layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


@dataclass
class SparseMasks:
    """Keep-masks per module path; :meth:`apply` zeroes the pruned weights again (after an optimizer step)."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for path, mask in self.masks.items():
            w = modules[path].weight
            w.mul_(mask.to(w.device, w.dtype))

    @classmethod
    def from_zeros(cls, model: nn.Module, layers: list[str]) -> SparseMasks:
        """Masks read back from a model whose 2:4 zeros are already baked in (a model folder)."""
        modules = dict(model.named_modules())
        return cls({p: (modules[p].weight.detach() != 0) for p in layers})


@dataclass
class SparsifyResult:
    """The 2:4 model, its masks, a row per conv/linear layer, and — from :func:`trt_prune.stages.sparsify` —
    the permutation search's record and the model folder written (if any)."""

    model: nn.Module
    masks: SparseMasks
    layers: list[dict]
    permutation: list[dict] | None = None
    folder: Path | None = None

    @property
    def sparse_layers(self) -> list[str]:
        return [row["module"] for row in self.layers if row["made_24"]]


def sparsify(model: nn.Module, min_channels: int = DEFAULT_MIN_CHANNELS, only: list[str] | None = None,
             exclude: list[str] | None = None) -> SparsifyResult:
    """Return a copy of ``model`` with 2:4 magnitude masks on every eligible conv/linear layer.

    ``only`` names the layers to sparsify: each must be able to hold the pattern (else an error), whatever its
    size (``min_channels`` applies to the automatic choice only). ``exclude`` skips layers. Each row of
    ``layers`` says whether the layer was made 2:4 and why not. No layer made 2:4 at all is an error.
    """
    if min_channels < 0:
        raise SparsifyError(f"min_channels must be >= 0, got {min_channels}")
    sparse = copy.deepcopy(model)
    modules = dict(sparse.named_modules())
    if only:
        unknown = [p for p in only if p not in modules or _layer_kind(modules[p]) is None]
        if unknown:
            raise SparsifyError(f"{unknown[0]!r} is not a Conv/Linear layer of this model; layers look like "
                                f"{[p for p, m in modules.items() if _layer_kind(m)][:3]}")
        for path in only:
            m = modules[path]
            verdict = eligibility(_layer_kind(m), tuple(m.weight.shape), getattr(m, "groups", 1), min_channels=0)
            if not verdict.eligible:
                raise SparsifyError(f"'{path}' cannot hold 2:4: {verdict.reason}; leave it out of the layer list")
    masks = SparseMasks()
    rows = []
    for path, module in modules.items():
        kind = _layer_kind(module)
        if kind is None:
            continue
        w = module.weight
        groups = getattr(module, "groups", 1)
        row = {"module": path, "op": type(module).__name__, "shape": list(w.shape)}
        verdict = eligibility(kind, tuple(w.shape), groups, 0 if only else min_channels)
        if only and path not in only:
            verdict = Eligibility(False, "not selected")
        elif exclude and path in exclude:
            verdict = Eligibility(False, "excluded")
        if verdict.eligible:
            weight = w.detach().cpu().numpy()
            # grouped convs: axis 1 already holds each group's own input channels, so one call covers them
            mask = torch.from_numpy(mask_2of4(weight, axis=1))
            masks.masks[path] = mask
            row.update(made_24=True, reason="2:4 applied",
                       kept_magnitude=float(np.abs(weight)[mask.numpy()].sum() / max(np.abs(weight).sum(), 1e-12)))
        else:
            row.update(made_24=False, reason=verdict.reason)
        rows.append(row)
    if not masks.masks:
        raise SparsifyError(f"no layer of this model is eligible for 2:4 at min_channels={min_channels} "
                            f"({len(rows)} conv/linear layers, reasons: "
                            f"{'; '.join(sorted({r['reason'] for r in rows}))[:300]}); lower --min-channels")
    masks.apply(sparse)
    for path in masks.masks:
        if not holds_2of4(modules[path].weight.detach().cpu().numpy(), axis=1):
            raise SparsifyError(f"internal error: mask did not produce 2:4 in '{path}'")
    return SparsifyResult(sparse, masks, rows)
