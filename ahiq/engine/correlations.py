"""PLCC, SROCC, KROCC and RMSE, raw and after the VQEG four-parameter logistic fit; and the one place that decides
when a statistic is undefined for the data (``undefined``: too few pairs, a constant side, a fit that cannot be
made) and how an undefined one is shown: null in JSON (ahiq.files.json_bytes), an empty cell in CSV, ``--`` in
Markdown, LaTeX and printed lines (``shown``). Never a number."""
from __future__ import annotations

import warnings

import numpy as np
from scipy import optimize, special, stats

MIN_PAIRS = 3  # a correlation of two pairs is +-1 whatever the model: fewer than three leave it undefined
EMPTY = "--"  # an undefined statistic in Markdown, LaTeX and printed lines


def undefined(pred: np.ndarray, target: np.ndarray) -> str | None:
    """Why a correlation of ``pred`` with ``target`` is undefined (fewer than MIN_PAIRS pairs, or a side
    without spread), or None where it is defined."""
    if len(pred) < MIN_PAIRS:
        return f"fewer than {MIN_PAIRS} pairs"
    if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(target))):
        return "a value that is not a finite number"
    if np.ptp(pred) == 0:
        return "constant predictions"
    if np.ptp(target) == 0:
        return "constant scores"
    return None


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r, as scipy.stats.pearsonr computes it (here without its overhead: the bootstrap calls it a
    thousand times an interval); NaN where it is undefined."""
    if undefined(a, b):
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    return float(np.clip((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()), -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the ranks (ties get their mean rank), as scipy.stats.spearmanr; NaN where
    undefined."""
    return float("nan") if undefined(a, b) else pearson(stats.rankdata(a), stats.rankdata(b))


def kendall(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (ties counted; scipy.stats.kendalltau); NaN where undefined."""
    return float("nan") if undefined(a, b) else float(stats.kendalltau(a, b)[0])


def defined(value) -> float | None:
    """A statistic as a number, or None where it is undefined (None, NaN or infinite)."""
    return None if value is None or not np.isfinite(value) else float(value)


def shown(value, digits: int = 4) -> str:
    """A statistic in a table or a printed line: ``digits`` decimals, EMPTY where it is undefined."""
    return EMPTY if defined(value) is None else f"{value:.{digits}f}"


def logistic4(x, b1, b2, b3, b4):
    """VQEG's monotonic logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2 (expit: no overflow)."""
    return (b1 - b2) * special.expit((x - b3) / np.abs(b4)) + b2


def fit_logistic(pred: np.ndarray, mos: np.ndarray) -> np.ndarray | None:
    """Parameters of logistic4 mapping predictions onto the scores, or None when it cannot be made: no more points
    than its four parameters, a side without spread (undefined), or a fit that does not converge."""
    if len(pred) <= 4 or undefined(pred, mos):
        return None
    spread = float(np.std(pred)) or 1.0
    p0 = [float(np.max(mos)), float(np.min(mos)), float(np.mean(pred)), spread / 4 if spread else 1.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(logistic4, pred, mos, p0=p0, maxfev=20000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        return None
    return params if np.all(np.isfinite(params)) else None


def correlate(pred, mos) -> dict:
    """Agreement of predictions with scores (same direction: higher is better in both).

    Returns plcc, srocc, krocc, rmse, main (= |plcc| + |srocc|, the NTIRE 2022 score), plcc_fitted and
    rmse_fitted (after the logistic fit, ``logistic``: its parameters), and n. What is undefined is NaN (None for
    the fit), and ``undefined`` says why."""
    pred = np.asarray(pred, dtype=float).ravel()
    mos = np.asarray(mos, dtype=float).ravel()
    if pred.shape != mos.shape:
        raise ValueError(f"{len(pred)} predictions for {len(mos)} scores")
    nan = float("nan")
    out = {"n": int(len(pred)), "rmse": float(np.sqrt(np.mean((pred - mos) ** 2))) if len(pred) else nan}
    out.update(plcc=pearson(pred, mos), srocc=spearman(pred, mos), krocc=kendall(pred, mos))
    out["main"] = abs(out["plcc"]) + abs(out["srocc"])
    params = fit_logistic(pred, mos)
    fitted = logistic4(pred, *params) if params is not None else None
    out["plcc_fitted"] = pearson(fitted, mos) if fitted is not None else nan
    out["rmse_fitted"] = float(np.sqrt(np.mean((fitted - mos) ** 2))) if fitted is not None else nan
    out["logistic"] = params.tolist() if params is not None else None
    why = undefined(pred, mos)  # the correlations'; a fit that cannot be made is ``logistic`` None
    if why:
        out["undefined"] = why
    return out


def bracket(bounds) -> str:
    """An interval after its estimate, `` [low, high]``; nothing where there is none."""
    return f" [{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else ""


def summary_line(metrics: dict) -> str:
    """One line of the metrics, with the 95% intervals of SROCC and PLCC where they have them, and why what is
    undefined is."""
    m = metrics
    why = f" (undefined: {m['undefined']})" if m.get("undefined") else ""
    return (f"SROCC {shown(m['srocc'])}{bracket(m.get('srocc_ci'))} PLCC {shown(m['plcc'])}{bracket(m.get('plcc_ci'))} "
            f"KROCC {shown(m['krocc'])} RMSE {shown(m['rmse'])} main {shown(m['main'])} ({m['n']} pairs){why}")
