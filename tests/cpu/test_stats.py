import math

import numpy as np
import pytest

from trt_prune.errors import ProfileError
from trt_prune.profiling.stats import cv_warning, summarize


def test_percentiles_of_one_to_ten_by_hand():
    s = summarize([float(x) for x in range(10, 0, -1)])  # order must not matter
    # linear interpolation at position (n - 1) * p / 100 = 9p/100 over 1..10
    assert s["p50"] == pytest.approx(5.5)
    assert s["p90"] == pytest.approx(9.1)
    assert s["p95"] == pytest.approx(9.55)
    assert s["p99"] == pytest.approx(9.91)
    assert s["mean"] == pytest.approx(5.5)
    assert s["std"] == pytest.approx(math.sqrt(82.5 / 9))  # sample std, ddof=1
    assert (s["min"], s["max"], s["n"]) == (1.0, 10.0, 10)
    assert s["cv"] == pytest.approx(math.sqrt(82.5 / 9) / 5.5)


def test_percentiles_of_four_samples_by_hand():
    s = summarize([40.0, 10.0, 30.0, 20.0])
    assert s["p50"] == pytest.approx(25.0)  # mean of the middle two
    assert s["p90"] == pytest.approx(37.0)  # position 2.7: 30 + 0.7 * 10
    assert s["p95"] == pytest.approx(38.5)
    assert s["p99"] == pytest.approx(39.7)


def test_single_sample():
    s = summarize([3.25])
    assert s["p50"] == s["p99"] == s["mean"] == s["min"] == s["max"] == 3.25
    assert s["std"] == 0.0 and s["cv"] == 0.0 and s["n"] == 1


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [1.0, float("inf")], [1.0, -2.0]])
def test_bad_samples_are_rejected(bad):
    with pytest.raises(ProfileError):
        summarize(bad)


def test_cv_warning_on_noisy_sample_and_not_on_flat_one():
    rng = np.random.default_rng(0)
    noisy = list(10.0 + rng.exponential(1.5, size=200))  # cv around 14 %
    msg = cv_warning(summarize(noisy))
    assert msg is not None
    assert "coefficient of variation" in msg and "2.5%" in msg
    flat = [10.0] * 50
    assert cv_warning(summarize(flat)) is None
    steady = list(10.0 + rng.uniform(-0.1, 0.1, size=200))  # cv about 0.6 %
    assert cv_warning(summarize(steady)) is None


def test_cv_warning_threshold_is_exclusive():
    summary = {"cv": 0.025, "n": 10}
    assert cv_warning(summary) is None
    assert cv_warning({"cv": 0.0251, "n": 10}) is not None
    assert cv_warning(summary, threshold=0.01) is not None


def test_cv_warning_needs_a_summary():
    with pytest.raises(ProfileError, match="cv"):
        cv_warning({"mean": 1.0})
    with pytest.raises(ProfileError):
        cv_warning({"cv": 0.1}, threshold=-1)
