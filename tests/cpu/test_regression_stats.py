"""The regression verdict's statistics on synthetic samples with known distributions (no timing)."""

from __future__ import annotations

import numpy as np
import pytest

from trt_prune.errors import BenchError
from trt_prune.regression import accuracy_gate, decide, mann_whitney, ratio_ci


def _arm(rng, median_ms: float, blocks: int = 10, per_block: int = 20, noise: float = 0.03, drift: float = 0.02):
    """Blocks of lognormal latencies: a per-block machine state (drift) times per-sample noise, plus rare
    2x outliers, as a noisy CPU gives."""
    out = []
    for _ in range(blocks):
        state = np.exp(rng.normal(0, drift))
        block = median_ms * state * np.exp(rng.normal(0, noise, per_block))
        spikes = rng.random(per_block) < 0.02
        block[spikes] *= 2.0
        out.append(block)
    return out


def _verdict(base, cand, min_effect=0.05, seed=0):
    est = ratio_ci(base, cand, n_boot=500, seed=seed)
    return decide(est, mann_whitney(base, cand), min_effect), est


def test_ratio_and_interval_are_right_on_a_known_shift():
    rng = np.random.default_rng(1)
    base = _arm(rng, 10.0)
    cand = [b * 1.2 for b in base]  # exactly 20 % slower, same noise
    est = ratio_ci(base, cand, n_boot=500)
    assert est.ratio == pytest.approx(1.2, rel=1e-12)
    assert est.ci[0] <= 1.2 <= est.ci[1]
    assert est.baseline == pytest.approx(np.median(np.concatenate(base)))
    p99 = ratio_ci(base, cand, statistic="p99", n_boot=500)
    assert p99.ratio == pytest.approx(1.2, rel=1e-12) and p99.statistic == "p99"


def test_aa_false_regressions_stay_rare():
    """Same distribution both sides, 100 trials: at most 1 in 20 'regression' is the bar; far fewer here."""
    rng = np.random.default_rng(2)
    verdicts = [_verdict(_arm(rng, 5.0), _arm(rng, 5.0), seed=i)[0] for i in range(100)]
    assert verdicts.count("regression") <= 5
    assert verdicts.count("improvement") <= 5
    assert verdicts.count("no change") >= 60  # with 10 blocks of 20 samples, most A/A runs settle


@pytest.mark.parametrize("factor, verdict", [(1.10, "regression"), (1 / 1.10, "improvement")])
def test_planted_ten_percent_changes_are_called(factor, verdict):
    rng = np.random.default_rng(3)
    calls = [_verdict(_arm(rng, 5.0), _arm(rng, 5.0 * factor), seed=i)[0] for i in range(40)]
    assert calls.count(verdict) >= 38  # at least 19 in 20


def test_small_change_within_min_effect_is_not_a_regression():
    rng = np.random.default_rng(4)
    calls = [_verdict(_arm(rng, 5.0, noise=0.005, drift=0.002), _arm(rng, 5.0 * 1.02, noise=0.005, drift=0.002),
                      seed=i)[0] for i in range(20)]
    assert "regression" not in calls  # a clear 2 % change is real but below the 5 % minimum effect
    assert calls.count("no change") >= 18


def test_too_few_blocks_is_inconclusive_not_a_verdict():
    rng = np.random.default_rng(5)
    base, cand = _arm(rng, 5.0, blocks=2, noise=0.2, drift=0.2), _arm(rng, 5.5, blocks=2, noise=0.2, drift=0.2)
    verdict, est = _verdict(base, cand)
    assert verdict == "inconclusive" and est.ci[0] < 1 < est.ci[1] * 1.5


def test_mann_whitney_on_block_medians():
    base = [[1.0, 1.1], [1.05, 1.0], [0.98, 1.02], [1.01, 1.03]]
    assert mann_whitney(base, [[x * 2 for x in b] for b in base]) < 0.05
    assert mann_whitney(base, base) == pytest.approx(1.0)


def test_accuracy_gate_and_bad_inputs():
    assert accuracy_gate(86.2, 85.0, max_drop=1.0) == "regression"
    assert accuracy_gate(86.2, 85.5, max_drop=1.0) is None
    assert accuracy_gate(None, 85.0, max_drop=1.0) is None
    with pytest.raises(BenchError, match="at least 2 non-empty blocks"):
        ratio_ci([[1.0, 2.0]], [[1.0], [2.0]])
    with pytest.raises(BenchError, match="positive finite"):
        ratio_ci([[1.0], [float("nan")]], [[1.0], [2.0]])
    with pytest.raises(BenchError, match="min_effect"):
        decide(ratio_ci([[1.0], [1.1]], [[1.0], [1.1]], n_boot=100), 0.5, min_effect=5)
    with pytest.raises(BenchError, match="unknown statistic"):
        ratio_ci([[1.0], [1.1]], [[1.0], [1.1]], statistic="mode")


def test_no_change_band_is_what_decide_uses():
    from trt_prune.regression.stats import RatioEstimate, no_change_band

    low, high = no_change_band(0.05)
    assert (low, high) == (pytest.approx(1 / 1.05), 1.05)

    def verdict(lo, hi):
        return decide(RatioEstimate("median", 1.0, 1.0, (lo + hi) / 2, (lo, hi), 0.95, 100), 0.5, 0.05)

    assert verdict(low, high) == "no change"  # the band's own edges are inside it
    assert verdict(low * 0.999, high) == verdict(low, high * 1.001) == "inconclusive"
