"""Input-channel permutation search for 2:4 sparsity: kept magnitudes, efficacy, the search, and that permuting a
consumer's input channels together with its producer's output channels leaves the network's outputs unchanged."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from trt_prune.sparsity.pattern import kept_magnitude, mask_2of4
from trt_prune.sparsity.permutation import (
    apply_permutation,
    efficacy,
    kept_permuted,
    kept_plain,
    kept_unstructured,
    magnitude_rows,
    planned_rounds,
    search_permutation,
    sorted_permutation,
)

ROW = np.array([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0])  # runs (1,2,3,4) keep 7, (5,6,7,8) keep 15


def _is_permutation(perm, n):
    return perm.shape == (n,) and np.array_equal(np.sort(perm), np.arange(n))


def test_kept_magnitudes_and_efficacy_by_hand():
    w = ROW[None, :]
    assert kept_plain(w) == 22.0
    assert kept_unstructured(w) == 26.0  # 5+6+7+8: the largest half of the row
    # runs (1,2,7,8) keep 15 and (3,4,5,6) keep 11: the unstructured bound, efficacy 100
    assert kept_permuted(w, [0, 1, 6, 7, 2, 3, 4, 5]) == 26.0
    assert efficacy(w, [0, 1, 6, 7, 2, 3, 4, 5]) == pytest.approx(100.0)
    assert efficacy(w, [0, 4, 1, 5, 2, 6, 3, 7]) == pytest.approx(100.0)
    # swapping whole runs or reordering inside a run changes nothing
    assert efficacy(w, [4, 5, 6, 7, 0, 1, 2, 3]) == 0.0
    assert efficacy(w, [3, 2, 1, 0, 7, 6, 5, 4]) == 0.0
    # two rows: half of the gain and worse than the identity
    w2 = np.stack([ROW, [9, 9, 0, 0, 9, 9, 0, 0]])  # second row: plain 36 = unstructured 36
    assert kept_plain(w2) == 58.0 and kept_unstructured(w2) == 62.0
    assert kept_permuted(w2, [0, 1, 4, 5, 2, 3, 6, 7]) == 26.0 + 18.0
    assert efficacy(w2, [0, 1, 4, 5, 2, 3, 6, 7]) == pytest.approx(100.0 * (44 - 58) / (62 - 58))
    # runs (1,2,3,8) keep 11, (4,5,6,7) keep 13: 24 of 26 on row 1; row 2 keeps 9+9 and 9+9
    assert kept_permuted(w2, [0, 1, 2, 7, 3, 4, 5, 6]) == 24.0 + 36.0
    assert efficacy(w2, [0, 1, 2, 7, 3, 4, 5, 6]) == pytest.approx(50.0)


def test_no_headroom_is_zero_efficacy():
    w = np.array([[5.0, 4.0, 0.0, 0.0, 3.0, 0.0, 2.0, 0.0]])  # the plain 2:4 mask already keeps every weight
    assert kept_plain(w) == kept_unstructured(w) == 14.0
    assert efficacy(w, np.arange(8)) == 0.0
    result = search_permutation(w, time_budget_s=1.0)
    assert result.efficacy == 0.0 and result.kept_permuted == 14.0


def test_conv_weight_rows_are_k_r_s():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 12, 3, 2))
    rows = magnitude_rows(w)
    assert rows.shape == (6 * 3 * 2, 12)
    np.testing.assert_array_equal(rows[1 * 6 + 2 * 2 + 1], np.abs(w[1, :, 2, 1]))
    # the plain kept magnitude is the existing 2:4 mask's, on the conv and on its [K*R*S, C] view alike
    assert kept_plain(w) == pytest.approx(kept_magnitude(w, axis=1))
    assert kept_plain(rows) == pytest.approx(kept_plain(w))
    perm = rng.permutation(12)
    assert kept_permuted(w, perm) == pytest.approx(kept_magnitude(w[:, perm], axis=1))
    # unstructured: the largest 6 of 12 in every (k, r, s) row
    assert kept_unstructured(w) == pytest.approx(sum(np.sort(np.abs(w[k, :, r, s]))[6:].sum()
                                                    for k in range(6) for r in range(3) for s in range(2)))
    assert kept_unstructured(w) >= kept_permuted(w, perm)


def test_rejects_bad_shapes_and_permutations():
    with pytest.raises(ValueError, match="multiple of 4"):
        kept_plain(np.ones((4, 6)))
    with pytest.raises(ValueError, match="at least 2"):
        kept_plain(np.ones(8))
    with pytest.raises(ValueError, match="not a permutation"):
        kept_permuted(np.ones((2, 8)), [0, 1, 2, 3, 4, 5, 6, 6])
    with pytest.raises(ValueError, match="not a permutation"):
        efficacy(np.ones((2, 8)), np.arange(4))


@pytest.mark.parametrize("shape", [(8, 4), (8, 8), (16, 12), (5, 20), (64, 128), (16, 32, 3, 3), (24, 36, 1, 1)])
def test_search_returns_a_valid_permutation_never_worse(shape):
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    result = search_permutation(w, time_budget_s=0.2, seed=1)
    assert _is_permutation(result.perm, shape[1])
    assert result.kept_permuted >= result.kept_plain
    assert result.kept_plain == pytest.approx(kept_plain(w))
    assert result.kept_unstructured == pytest.approx(kept_unstructured(w))
    assert result.kept_permuted == pytest.approx(kept_permuted(w, result.perm))
    assert result.efficacy == pytest.approx(efficacy(w, result.perm))
    assert result.kept_permuted <= result.kept_unstructured + 1e-6
    if shape[1] >= 8:
        assert result.iterations > 0


def test_zero_budget_returns_identity_or_better():
    w = np.random.default_rng(0).standard_normal((64, 128))
    result = search_permutation(w, time_budget_s=0.0)
    assert _is_permutation(result.perm, 128)
    assert result.kept_permuted >= result.kept_plain
    assert result.iterations == 0


def test_search_finds_dead_channel_layout():
    # the identity puts the 8 live channels together, so half of them are pruned; two live and two dead channels
    # per run of 4 keep everything: the sort start alone reaches the unstructured bound
    rng = np.random.default_rng(5)
    w = np.zeros((16, 16))
    w[:, :8] = rng.uniform(1, 2, (16, 8))
    assert efficacy(w, sorted_permutation(w)) == pytest.approx(100.0)
    result = search_permutation(w, time_budget_s=0.5)
    assert result.efficacy == pytest.approx(100.0)
    assert result.kept_permuted == pytest.approx(np.abs(w).sum())


def test_search_is_deterministic_for_a_seed():
    w = np.random.default_rng(2).standard_normal((32, 64))
    a = search_permutation(w, time_budget_s=30.0, seed=7, rounds=300)
    b = search_permutation(w, time_budget_s=30.0, seed=7, rounds=300)
    np.testing.assert_array_equal(a.perm, b.perm)
    assert a.kept_permuted == b.kept_permuted and a.iterations == b.iterations


def test_greedy_result_is_a_local_optimum_of_stripe_pair_splits():
    # brute force: no way of re-splitting the 8 channels of any two runs of 4 keeps more than the search's result
    w = np.random.default_rng(4).standard_normal((12, 24))
    result = search_permutation(w, time_budget_s=30.0, rounds=0)
    runs = result.perm.reshape(-1, 4)
    for i, j in itertools.combinations(range(len(runs)), 2):
        eight = np.concatenate([runs[i], runs[j]])
        for first in itertools.combinations(range(8), 4):
            perm = runs.copy()
            perm[i], perm[j] = eight[list(first)], np.delete(eight, list(first))
            assert kept_permuted(w, perm.reshape(-1)) <= result.kept_permuted + 1e-9


def test_planned_rounds():
    assert planned_rounds((8, 8), 10.0) == 0  # 2 runs of 4: one greedy round is exact
    assert planned_rounds((64, 128), 1.0) == planned_rounds((64, 128), 1.0) > 0
    assert planned_rounds((64, 128), 2.0) >= planned_rounds((64, 128), 1.0)
    assert planned_rounds((64, 128), 0.0) == 0


def test_search_on_random_64x128_gains_well_above_zero():
    w = np.random.default_rng(0).standard_normal((64, 128))
    result = search_permutation(w, time_budget_s=1.0, seed=0)
    assert result.efficacy > 15.0
    assert result.efficacy > efficacy(w, sorted_permutation(w)) + 10.0


def test_apply_permutation_numpy_and_torch_agree_and_invert():
    w = np.random.default_rng(1).standard_normal((6, 8, 3, 3)).astype(np.float32)
    perm = np.random.default_rng(2).permutation(8)
    moved = apply_permutation(w, perm, axis=1)
    np.testing.assert_array_equal(moved[:, 3], w[:, perm[3]])
    as_tensor = apply_permutation(torch.from_numpy(w), perm, axis=1)
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_array_equal(as_tensor.numpy(), moved)
    np.testing.assert_array_equal(apply_permutation(moved, np.argsort(perm), axis=1), w)
    np.testing.assert_array_equal(apply_permutation(w[:, :, 0, 0].T, perm, axis=0), w[:, perm, 0, 0].T)


def _permute_pair(producer: nn.Module, consumer: nn.Module, perm, between: nn.Module | None = None) -> None:
    """Reorder ``producer``'s output channels and ``consumer``'s input channels (and a BatchNorm between)."""
    with torch.no_grad():
        producer.weight.copy_(apply_permutation(producer.weight, perm, axis=0))
        if producer.bias is not None:
            producer.bias.copy_(apply_permutation(producer.bias, perm, axis=0))
        consumer.weight.copy_(apply_permutation(consumer.weight, perm, axis=1))
        if between is not None:
            for t in (between.weight, between.bias, between.running_mean, between.running_var):
                t.copy_(apply_permutation(t, perm, axis=0))


def test_permuting_linear_pair_leaves_outputs_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.randn(7, 12)
    before = model(x)
    result = search_permutation(model[2].weight, time_budget_s=0.3)
    assert result.kept_permuted > result.kept_plain
    _permute_pair(model[0], model[2], result.perm)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    # and the permuted consumer keeps exactly what the search reported under the 2:4 mask
    weight = model[2].weight.detach().numpy()
    assert np.abs(weight)[mask_2of4(weight, axis=1)].sum() == pytest.approx(result.kept_permuted, rel=1e-5)


def test_permuting_conv_pair_with_batchnorm_leaves_outputs_unchanged():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1, bias=False))
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    before = model(x)
    result = search_permutation(model[3].weight, time_budget_s=0.3)
    assert _is_permutation(result.perm, 16) and result.kept_permuted >= result.kept_plain
    assert not np.array_equal(result.perm, np.arange(16))
    _permute_pair(model[0], model[3], result.perm, between=model[1])
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert kept_plain(model[3].weight) == pytest.approx(result.kept_permuted, rel=1e-5)
