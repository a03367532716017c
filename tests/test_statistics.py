"""The statistics beside the correlations, each against an independent computation of its published formula."""
import math

import numpy as np
import pytest
from scipy import optimize, stats

from ahiq.engine.correlations import logistic4
from ahiq.engine.statistics import (by_group, correlations, f_test, interval, pearson, rating_spread_metrics, spearman,
                                    williams)


def scores(n=120, refs=12, noise=0.3, seed=0):
    """Predictions, targets and each pair's reference: targets in [0, 1], predictions a noisy monotone map."""
    rng = np.random.default_rng(seed)
    target = rng.uniform(0, 1, n)
    pred = np.tanh(2 * target) + rng.normal(0, noise, n)
    units = np.array([f"ref{i % refs}" for i in range(n)])
    return pred, target, units


def test_spearman_and_pearson_equal_scipys_with_ties():
    pred, target, _ = scores()
    pred = np.round(pred, 1)  # ties
    assert spearman(pred, target) == pytest.approx(stats.spearmanr(pred, target)[0], abs=1e-12)
    assert pearson(pred, target) == pytest.approx(stats.pearsonr(pred, target)[0], abs=1e-12)
    assert math.isnan(pearson(np.ones(5), np.arange(5.0)))


def steiger_williams(r12, r13, r23, n):
    """Steiger (1980), equation 7, written from the paper: Williams' T2 with the determinant of the 3 x 3
    correlation matrix computed as a determinant."""
    R = np.array([[1, r12, r13], [r12, 1, r23], [r13, r23, 1]])
    rbar = (r12 + r13) / 2
    t2 = (r12 - r13) * math.sqrt(((n - 1) * (1 + r23)) /
                                 (2 * ((n - 1) / (n - 3)) * np.linalg.det(R) + rbar ** 2 * (1 - r23) ** 3))
    return t2, 2 * (1 - stats.t.cdf(abs(t2), df=n - 3))


@pytest.mark.parametrize("r12, r13, r23, n", [(0.9, 0.85, 0.8, 120), (0.5, 0.62, 0.3, 40), (-0.2, 0.1, 0.05, 500)])
def test_williams_equals_steigers_formula(r12, r13, r23, n):
    t, p = williams(r12, r13, r23, n)
    expected_t, expected_p = steiger_williams(r12, r13, r23, n)
    assert t == pytest.approx(expected_t, abs=1e-9) and p == pytest.approx(expected_p, abs=1e-9)
    assert williams(r13, r12, r23, n) == pytest.approx((-t, p))  # the order of the two models turns the sign only


def test_f_test_is_the_ratio_of_residual_variances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1.0, 200), rng.normal(0, 1.3, 200)
    f, p = f_test(a, b)
    assert f == pytest.approx(np.var(a, ddof=1) / np.var(b, ddof=1), rel=1e-12)
    cdf = stats.f.cdf(f, 199, 199)
    assert p == pytest.approx(2 * min(cdf, 1 - cdf), rel=1e-9) and p < 0.05  # a's residuals are clearly smaller
    assert f_test(a, a) == pytest.approx((1.0, 1.0))


def test_interval_holds_the_estimate_repeats_with_its_seed_and_moves_with_another():
    pred, target, units = scores()
    for statistic in (spearman, pearson):
        first = interval(statistic, pred, target, units, 500, seed=3)
        assert first[0] <= statistic(pred, target) <= first[1]
        assert interval(statistic, pred, target, units, 500, seed=3) == first
        assert interval(statistic, pred, target, units, 500, seed=4) != first
    # resampling pairs treats the 120 pairs as independent: narrower than over the 12 references here
    by_pair = interval(spearman, pred, target, np.arange(len(pred)).astype(str), 500, seed=3)
    by_reference = interval(spearman, pred, target, units, 500, seed=3)
    assert by_pair[1] - by_pair[0] < by_reference[1] - by_reference[0]


def test_interval_matches_a_percentile_bootstrap_by_hand_in_the_large():
    """The BCa interval over references against a plain resampling of whole references written out here: with
    many references both describe the same spread (centres within a tenth of the width)."""
    pred, target, units = scores(n=400, refs=40, seed=5)
    groups = [np.flatnonzero(units == u) for u in np.unique(units)]
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(2000):
        chosen = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        draws.append(stats.spearmanr(pred[chosen], target[chosen])[0])
    low, high = np.percentile(draws, [2.5, 97.5])
    got = interval(spearman, pred, target, units, 2000, seed=0)
    assert abs((got[0] + got[1]) / 2 - (low + high) / 2) < 0.1 * (high - low)
    assert 0.7 < (got[1] - got[0]) / (high - low) < 1.4


def test_interval_is_none_where_undefined():
    pred, target, units = scores()
    assert interval(spearman, pred, target, np.full(len(pred), "one"), 100, 0) is None  # one reference
    assert interval(spearman, np.ones_like(pred), target, units, 100, 0) is None  # constant predictions
    assert interval(spearman, pred, target, units, 0, 0) is None  # no resamples asked


def test_per_group_correlations_equal_scipys_and_leave_small_groups_empty():
    pred, target, _ = scores(n=60)
    codes = np.array(["a"] * 30 + ["b"] * 28 + ["c"] * 2)
    logistic = [1.0, 0.0, 0.5, 0.2]
    rows = by_group(pred, target, codes, ["a", "b", "c"], logistic)
    mapped = logistic4(pred, *logistic)
    for row, member in zip(rows[:2], (codes == "a", codes == "b")):
        assert row["n"] == member.sum()
        assert row["srocc"] == pytest.approx(stats.spearmanr(pred[member], target[member])[0], abs=1e-12)
        assert row["krocc"] == pytest.approx(stats.kendalltau(pred[member], target[member])[0], abs=1e-12)
        assert row["plcc"] == pytest.approx(stats.pearsonr(mapped[member], target[member])[0], abs=1e-12)
    assert rows[2] == {"code": "c", "n": 2, "srocc": None, "plcc": None, "krocc": None}
    constant = correlations(np.ones(5), np.arange(5.0), np.ones(5))
    assert constant == {"n": 5, "srocc": None, "plcc": None, "krocc": None}


def test_outlier_ratio_and_epsilon_insensitive_rmse_by_hand():
    """P.1401: outliers where |MOS - f(x)| exceeds the MOS's 95% interval; rmse* over the excess, N - 4."""
    rng = np.random.default_rng(2)
    mos = rng.uniform(1, 5, 80)
    pred = mos + rng.normal(0, 0.4, 80)
    ci95 = rng.uniform(0.1, 0.5, 80)
    got = rating_spread_metrics(pred, mos, ci95)

    def f(x, b1, b2, b3, b4):
        return (b1 - b2) / (1 + np.exp(-(x - b3) / abs(b4))) + b2
    params, _ = optimize.curve_fit(f, pred, mos, p0=[5, 1, 3, 1], maxfev=20000)
    error = np.abs(mos - f(pred, *params))
    assert got["outlier_ratio"] == pytest.approx(np.count_nonzero(error > ci95) / 80, abs=1 / 80)
    excess = np.clip(error - ci95, 0, None)
    assert got["rmse_star"] == pytest.approx(math.sqrt((excess ** 2).sum() / (80 - 4)), rel=1e-3)
    assert rating_spread_metrics(pred, mos, np.full(80, np.nan)) == {}  # no spread given: the keys are absent


def test_williams_and_f_where_they_are_undefined_or_degenerate():
    assert williams(0.8, 0.8, 1.0, 100) == (0.0, 1.0)  # identical predictions: no difference, no division by zero
    assert all(math.isnan(v) for v in williams(0.8, 0.7, 0.5, 3))  # n - 3 = 0 degrees of freedom
    assert all(math.isnan(v) for v in williams(float("nan"), 0.7, 0.5, 50))
    assert all(math.isnan(v) for v in f_test(np.zeros(10), np.zeros(10)))  # perfect fits: no ratio
