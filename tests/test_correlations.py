import warnings

import numpy as np
import pytest

from ahiq.engine.correlations import correlate, fit_logistic, logistic4, summary_line


def test_metrics_by_hand_with_ties():
    """pred has a tie (2, 2); worked out by hand, not by the scipy calls the code makes."""
    pred, mos = [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]
    m = correlate(pred, mos)
    # PLCC: deviations (-1, 0, 0, 1) and (-1.5, .5, -.5, 1.5): 3 / sqrt(2 * 5)
    assert m["plcc"] == pytest.approx(3 / np.sqrt(10), abs=1e-12)
    # SROCC with average ranks: pred ranks (1, 2.5, 2.5, 4), mos ranks (1, 3, 2, 4): 4.5 / sqrt(4.5 * 5).
    # Ordinal ranks (1, 2, 3, 4) would give 0.8.
    assert m["srocc"] == pytest.approx(4.5 / np.sqrt(22.5), abs=1e-12)
    # KROCC tau-b: 5 concordant pairs, 0 discordant, 1 pair tied in pred only, of 6:
    # 5 / sqrt((6 - 1) * (6 - 0)). tau-a would give 5 / 6.
    assert m["krocc"] == pytest.approx(5 / np.sqrt(30), abs=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(0.5), abs=1e-12)  # differences (0, -1, 0, -1)
    assert m["main"] == pytest.approx(3 / np.sqrt(10) + 4.5 / np.sqrt(22.5), abs=1e-12) and m["n"] == 4


def test_logistic_fit_recovers_a_nonlinear_mapping():
    pred = np.linspace(-3, 3, 300)
    mos = logistic4(pred, 5.0, 1.0, 0.5, 0.7)
    params = fit_logistic(pred, mos)
    np.testing.assert_allclose(logistic4(pred, *params), mos, atol=1e-6)
    m = correlate(pred, mos)
    assert m["plcc_fitted"] == pytest.approx(1.0, abs=1e-9) and m["plcc"] < 0.99
    assert m["rmse_fitted"] < 1e-5 and m["srocc"] == pytest.approx(1.0)


def test_undefined_correlations_are_nan_and_say_why():
    """A constant side, or fewer than three pairs (two pairs correlate +-1 whatever the model), leave every
    correlation undefined: NaN, with the reason; RMSE, defined for any pairs, stays."""
    m = correlate([0.5, 0.5, 0.5], [1.0, 2.0, 3.0])
    assert np.isnan(m["srocc"]) and np.isnan(m["plcc"]) and np.isnan(m["krocc"]) and np.isnan(m["main"])
    assert m["undefined"] == "constant predictions" and m["logistic"] is None
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((0.5 - np.array([1.0, 2.0, 3.0])) ** 2)))
    assert correlate([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])["undefined"] == "constant scores"
    two = correlate([1.0, 2.0], [2.0, 1.0])
    assert np.isnan(two["srocc"]) and two["undefined"] == "fewer than 3 pairs"
    assert summary_line(two).endswith("KROCC -- RMSE 1.0000 main -- (2 pairs) (undefined: fewer than 3 pairs)")
    with pytest.raises(ValueError, match="3 predictions for 2 scores"):
        correlate([1, 2, 3], [1, 2])


def test_summary_line_format():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = correlate([0.1, 0.4, 0.2, 0.9], [0.0, 0.5, 0.25, 1.0])
    assert summary_line(m) == (f"SROCC 1.0000 PLCC {m['plcc']:.4f} KROCC 1.0000 RMSE {m['rmse']:.4f} "
                               f"main {m['main']:.4f} (4 pairs)")


def test_too_few_pairs_for_the_logistic_fit_give_nan_fitted_metrics():
    """A validation part of 3 pairs: the correlations exist, the four-parameter fit does not (scipy's
    curve_fit raised TypeError there, ending a training run at its first validation)."""
    m = correlate([0.1, 0.5, 0.3], [0.2, 0.9, 0.4])
    assert m["srocc"] == pytest.approx(1.0) and np.isnan(m["plcc_fitted"]) and m["logistic"] is None
    assert fit_logistic(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) is None
