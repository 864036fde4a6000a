"""Statistics of the regression verdict: pure functions over latency samples grouped in blocks.

A *block* is the samples of one arm taken in one turn of an interleaved run (ABAB…, order shuffled per
round), or one stored measurement block. Consecutive samples of a block share the machine's state of that
moment (clock, cache, background load), so they are not independent; resampling whole blocks keeps that
dependence in the confidence interval instead of pretending to have more information than the run holds.

- :func:`ratio_ci`: candidate/baseline ratio of a statistic (median by default, p99 for the tail) with a
  block-bootstrap percentile interval (blocks drawn with replacement within each arm, statistic of the
  pooled draws, ``n_boot`` times).
- :func:`mann_whitney`: two-sided Mann–Whitney U p-value on the block medians (one value per block: the
  independent unit), from SciPy.
- :func:`decide`: the verdict against a minimum effect, in the manner of Chromium's Pinpoint — different,
  same, or unknown (take more blocks):

  * ``regression``: the interval lies above 1 and the ratio is at least ``1 + min_effect`` (and the test
    agrees, ``p < alpha``);
  * ``improvement``: the mirror image, ratio at most ``1 / (1 + min_effect)``;
  * ``no change``: the whole interval lies inside ``[1 / (1 + min_effect), 1 + min_effect]``;
  * ``inconclusive``: anything else; the caller adds blocks up to its limit.

With the interval at 95 % (two-sided), an A/A comparison calls ``regression`` only when the interval's lower
end clears 1 *and* the point estimate is 5 % off, which the calibration in ``bench/`` measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from trt_prune.errors import BenchError

VERDICTS = ("regression", "improvement", "no change", "inconclusive")


def _blocks(blocks: Sequence[Sequence[float]], label: str) -> list[np.ndarray]:
    out = [np.asarray(list(b), dtype=np.float64) for b in blocks]
    out = [b for b in out if b.size]
    if len(out) < 2:
        raise BenchError(f"{label} needs at least 2 non-empty blocks of samples, got {len(out)}")
    for b in out:
        if not np.all(np.isfinite(b)) or np.any(b <= 0):
            raise BenchError(f"{label} holds a latency that is not a positive finite number: "
                             f"{b[~(np.isfinite(b) & (b > 0))][:3].tolist()}")
    return out


def _stat(values: np.ndarray, statistic: str) -> float:
    if statistic == "median":
        return float(np.median(values))
    if statistic.startswith("p") and statistic[1:].isdigit():
        return float(np.percentile(values, int(statistic[1:])))
    if statistic == "mean":
        return float(values.mean())
    raise BenchError(f"unknown statistic {statistic!r}; use median, mean or pNN (e.g. p99)")


@dataclass(frozen=True)
class RatioEstimate:
    """``ratio`` = statistic(candidate) / statistic(baseline), with its ``ci`` at ``level``."""

    statistic: str
    baseline: float
    candidate: float
    ratio: float
    ci: tuple[float, float]
    level: float
    n_boot: int

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ci"] = list(self.ci)
        return data


def ratio_ci(baseline: Sequence[Sequence[float]], candidate: Sequence[Sequence[float]], statistic: str = "median",
             level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> RatioEstimate:
    """Ratio of ``statistic`` (candidate over baseline) with a block-bootstrap percentile interval."""
    if not 0 < level < 1:
        raise BenchError(f"level must be in (0, 1), got {level!r}")
    if not isinstance(n_boot, int) or n_boot < 100:
        raise BenchError(f"n_boot must be an integer >= 100, got {n_boot!r}")
    base, cand = _blocks(baseline, "baseline"), _blocks(candidate, "candidate")
    b_all, c_all = np.concatenate(base), np.concatenate(cand)
    point_b, point_c = _stat(b_all, statistic), _stat(c_all, statistic)
    rng = np.random.default_rng(seed)
    ratios = np.empty(n_boot)
    for i in range(n_boot):
        b = np.concatenate([base[j] for j in rng.integers(0, len(base), len(base))])
        c = np.concatenate([cand[j] for j in rng.integers(0, len(cand), len(cand))])
        ratios[i] = _stat(c, statistic) / _stat(b, statistic)
    tail = (1 - level) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return RatioEstimate(statistic, point_b, point_c, point_c / point_b, (float(low), float(high)), level, n_boot)


def mann_whitney(baseline: Sequence[Sequence[float]], candidate: Sequence[Sequence[float]]) -> float:
    """Two-sided Mann–Whitney U p-value comparing the arms' block medians (SciPy's exact or asymptotic test)."""
    from scipy.stats import mannwhitneyu

    base = [float(np.median(b)) for b in _blocks(baseline, "baseline")]
    cand = [float(np.median(b)) for b in _blocks(candidate, "candidate")]
    if len(set(base + cand)) == 1:
        return 1.0  # identical medians everywhere: no evidence of a difference
    return float(mannwhitneyu(cand, base, alternative="two-sided").pvalue)


def no_change_band(min_effect: float) -> tuple[float, float]:
    """``(1 / (1 + min_effect), 1 + min_effect)``: the ratios that count as no change (symmetric in log space, so
    a 5 % slowdown and its inverse speed-up are the same distance from 1)."""
    return 1 / (1 + min_effect), 1 + min_effect


def decide(estimate: RatioEstimate, p_value: float, min_effect: float = 0.05, alpha: float = 0.05) -> str:
    """The verdict (module docstring) from a ratio estimate and the test's p-value."""
    if not (isinstance(min_effect, (int, float)) and 0 < min_effect < 1):
        raise BenchError(f"min_effect must be a fraction in (0, 1), e.g. 0.05 for 5 %, got {min_effect!r}")
    if not 0 < alpha < 1:
        raise BenchError(f"alpha must be in (0, 1), got {alpha!r}")
    if not (math.isfinite(p_value) and 0 <= p_value <= 1):
        raise BenchError(f"p_value must be in [0, 1], got {p_value!r}")
    down, up = no_change_band(min_effect)
    low, high = estimate.ci
    if low > 1 and estimate.ratio >= up and p_value < alpha:
        return "regression"
    if high < 1 and estimate.ratio <= down and p_value < alpha:
        return "improvement"
    if low >= down and high <= up:
        return "no change"
    return "inconclusive"


def accuracy_gate(baseline: float | None, candidate: float | None, max_drop: float) -> str | None:
    """``"regression"`` when ``candidate`` falls more than ``max_drop`` (same units, e.g. mAP points on a 0–100
    scale or a fraction on 0–1) below ``baseline``; ``None`` when it does not or either is unknown."""
    if baseline is None or candidate is None:
        return None
    if not (isinstance(max_drop, (int, float)) and max_drop >= 0):
        raise BenchError(f"the accuracy drop allowed must be a number >= 0, got {max_drop!r}")
    return "regression" if baseline - candidate > max_drop else None
