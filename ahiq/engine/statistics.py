"""What a paper prints beside a correlation: per-group correlations, bootstrap intervals over reference images,
ITU-T P.1401's outlier ratio and epsilon-insensitive RMSE, and the significance of a difference between two
models on the same images (Williams' test, the F-test on residuals). Each formula and its source:
docs/evaluation.md."""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from ahiq.engine.correlations import defined, fit_logistic, kendall, logistic4, pearson, spearman

LEVEL = 0.95  # every interval and test here is at 95%
MAPPING_PARAMETERS = 4  # d of P.1401's rmse*: the parameters of the logistic mapping


def fitted(pred: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """The predictions through the VQEG logistic fitted to ``target``; None when the fit cannot be made (what is
    computed after it is then undefined)."""
    params = fit_logistic(pred, target)
    return logistic4(pred, *params) if params is not None else None


def correlations(pred: np.ndarray, target: np.ndarray, mapped: np.ndarray) -> dict:
    """n, SROCC, PLCC (of ``mapped``, the predictions after a logistic fitted elsewhere) and KROCC; None for
    each that is undefined (ahiq.engine.correlations.undefined)."""
    return {"n": len(pred), "srocc": defined(spearman(pred, target)), "plcc": defined(pearson(mapped, target)),
            "krocc": defined(kendall(pred, target))}


def by_group(pred: np.ndarray, target: np.ndarray, codes: Sequence[str], order: Sequence[str],
             logistic: Sequence[float] | None) -> list[dict]:
    """One row per code of ``order`` (the groups present): its pairs' correlations, PLCC after the logistic
    fitted on all the pairs (``logistic``; the raw predictions without one)."""
    codes = np.asarray(codes)
    mapped = logistic4(pred, *logistic) if logistic is not None else pred
    rows = []
    for code in order:
        member = codes == code
        rows.append({"code": code, **correlations(pred[member], target[member], mapped[member])})
    return rows


def interval(statistic: Callable[[np.ndarray, np.ndarray], float], pred: np.ndarray, target: np.ndarray,
             units: Sequence[str], resamples: int, seed: int) -> list[float] | None:
    """The 95% BCa bootstrap interval of ``statistic(pred, target)``, resampling whole units (the reference
    images: pairs that share one are not independent) with scipy.stats.bootstrap, seeded. None when it is
    undefined: fewer than two units, or a statistic undefined on the data or constant over the resamples."""
    members = [np.flatnonzero(np.asarray(units) == unit) for unit in dict.fromkeys(units)]
    if len(members) < 2 or resamples < 1 or not np.isfinite(statistic(pred, target)):
        return None

    def on_units(chosen: np.ndarray) -> float:
        index = np.concatenate([members[int(u)] for u in chosen])
        return statistic(pred[index], target[index])

    with warnings.catch_warnings():  # a degenerate distribution gives NaN, reported as no interval
        warnings.simplefilter("ignore")
        result = stats.bootstrap((np.arange(len(members)),), on_units, n_resamples=resamples, vectorized=False,
                                 confidence_level=LEVEL, method="BCa", rng=np.random.default_rng(seed))
    low, high = (float(v) for v in result.confidence_interval)
    return [low, high] if np.isfinite(low) and np.isfinite(high) else None


def rating_spread_metrics(pred: np.ndarray, mos: np.ndarray, ci95: np.ndarray) -> dict:
    """P.1401's outlier ratio and epsilon-insensitive RMSE (rmse*), on the MOS scale after the logistic mapping
    of the predictions onto the MOS; ``ci95``: each MOS's 95% interval half-width. No keys where a pair has no
    interval (the dataset gives no spreads); None for both where the mapping cannot be fitted."""
    if not len(ci95) or not np.all(np.isfinite(ci95)):
        return {}
    params = fit_logistic(pred, mos)
    if params is None or len(pred) <= MAPPING_PARAMETERS:
        return {"outlier_ratio": None, "rmse_star": None}
    error = np.abs(mos - logistic4(pred, *params))
    beyond = np.maximum(error - ci95, 0.0)
    return {"outlier_ratio": float(np.mean(error > ci95)),
            "rmse_star": float(np.sqrt(np.sum(beyond ** 2) / (len(pred) - MAPPING_PARAMETERS)))}


def williams(r12: float, r13: float, r23: float, n: int) -> tuple[float, float]:
    """Williams' t for the difference of two dependent correlations that share variable 1 (Steiger 1980,
    eq. 7): r12 and r13 of two models' predictions with the same scores, r23 between the predictions; t with
    n - 3 degrees of freedom, and its two-sided p. Undefined (NaN) below 4 pairs or for an undefined correlation;
    predictions that correlate perfectly (r23 = 1) have equal correlations with the scores: t = 0, p = 1."""
    if n < 4 or not np.all(np.isfinite([r12, r13, r23])):
        return float("nan"), float("nan")
    det = 1 - r12 ** 2 - r13 ** 2 - r23 ** 2 + 2 * r12 * r13 * r23
    mean = (r12 + r13) / 2
    denominator = 2 * (n - 1) / (n - 3) * det + mean ** 2 * (1 - r23) ** 3
    if denominator <= 0:
        return 0.0, 1.0
    t = (r12 - r13) * np.sqrt((n - 1) * (1 + r23) / denominator)
    return float(t), float(2 * stats.t.sf(abs(t), n - 3))


def f_test(residuals_a: np.ndarray | None, residuals_b: np.ndarray | None) -> tuple[float, float]:
    """The ratio of two models' residual variances (after each one's logistic fit) and its two-sided p under
    F(n - 1, n - 1) (ITU-T P.1401, Sheikh et al. 2006): below 1 when model a's residuals are smaller. Undefined
    (NaN) without both fits (None), below 2 pairs, or for residuals without spread."""
    if residuals_a is None or residuals_b is None or min(len(residuals_a), len(residuals_b)) < 2:
        return float("nan"), float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):  # residuals without spread: NaN, never significant
        f = float(np.var(residuals_a, ddof=1) / np.var(residuals_b, ddof=1))
    dof_a, dof_b = len(residuals_a) - 1, len(residuals_b) - 1
    if not np.isfinite(f):
        return f, float("nan")
    return f, float(min(1.0, 2 * min(stats.f.cdf(f, dof_a, dof_b), stats.f.sf(f, dof_a, dof_b))))
