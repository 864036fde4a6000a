"""Structured pruning and 2:4 in one plan: channels first (counts aligned so every layer can still carry the
pattern), 2:4 second, and a per-layer account of what each step did to a layer's 2:4 eligibility."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import SparsifyError
from ..pruning.structured import PruneConfig, PruneResult, prune
from .pattern import GROUP
from .sparsify import DEFAULT_MIN_CHANNELS, SparsifyResult, _layer_kind, eligibility, sparsify


@dataclass
class CombinedResult:
    model: nn.Module
    prune: PruneResult
    sparsify: SparsifyResult
    layers: list[dict]  # per conv/linear: channels before/after, 2:4 eligible dense / after pruning, made 2:4


def _eligibility_table(model: nn.Module, min_channels: int) -> dict[str, tuple[bool, str, list[int]]]:
    table = {}
    for path, module in model.named_modules():
        kind = _layer_kind(module)
        if kind is not None:
            verdict = eligibility(kind, tuple(module.weight.shape), getattr(module, "groups", 1), min_channels)
            table[path] = (verdict.eligible, verdict.reason, list(module.weight.shape[:2]))
    return table


def prune_then_sparsify(model: nn.Module, input_shape=(1, 3, 320, 320), config: PruneConfig | None = None, *,
                        min_channels: int = DEFAULT_MIN_CHANNELS, **overrides) -> CombinedResult:
    """Structured pruning of ``model`` (a copy; see :func:`~trt_prune.pruning.prune`), then 2:4 masks on every
    layer of the pruned model that can and should carry them.

    ``round_to`` must be a multiple of 4 so that no layer loses the pattern to an odd channel count; the
    ``layers`` table says, per layer, whether it was eligible dense, whether it still is after pruning (a layer
    pruned below ``min_channels`` no longer pays) and whether it was made 2:4.

    With ``target_latency`` and a latency table that holds 2:4 times (measured on a GPU backend with sparse
    kernels), the table decides instead of ``min_channels``: a layer is made 2:4 only where its sparse kernel
    is measurably faster at its kept size.
    """
    config = config or PruneConfig()
    round_to = overrides.get("round_to", config.round_to)
    if round_to % GROUP:
        raise SparsifyError(f"round_to={round_to} would leave channel counts that cannot carry 2:4 (input channels "
                            f"must stay multiples of {GROUP}); use 8, 16 or 32")
    before = _eligibility_table(model, min_channels)
    pruned = prune(model, input_shape, config, **overrides)
    choice = (pruned.report.get("latency") or {}).get("sparse24")
    verdicts = {}
    if choice is not None:  # a GPU table: 2:4 where its measured sparse kernel is faster at the kept size
        can_hold = {p for p, (ok, _, _) in _eligibility_table(pruned.model, 0).items() if ok}
        only = [r["module"] for r in choice if r["pays"] and r["module"] in can_hold]
        for r in choice:
            if r["sparse_ms"] is not None:
                verdicts[r["module"]] = (f"table: 2:4 {r['sparse_ms']:.4f} ms vs dense {r['dense_ms']:.4f} ms at the "
                                         f"kept size, {'pays' if r['pays'] else 'does not pay'}")
        if not only:
            raise SparsifyError("the latency table says 2:4 pays on no layer at the kept sizes; keep the pruned "
                                "model dense (trt-prune prune) instead of adding 2:4")
        sparse = sparsify(pruned.model, only=only)
    else:
        sparse = sparsify(pruned.model, min_channels=min_channels)
    after = _eligibility_table(pruned.model, min_channels)
    made = set(sparse.sparse_layers)
    rows = []
    for path, (dense_ok, _, dense_shape) in before.items():
        ok, reason, shape = after[path]
        if path in verdicts:
            ok, reason = path in made, verdicts[path]
        rows.append({"module": path, "out_in_before": dense_shape, "out_in_after": shape,
                     "eligible_dense": dense_ok, "eligible_pruned": ok, "made_24": path in made,
                     "reason": reason if not ok or path in verdicts else "2:4 applied",
                     "lost_to_pruning": dense_ok and not ok})
    return CombinedResult(sparse.model, pruned, sparse, rows)
