"""PLCC, SROCC, KROCC and RMSE, raw and after the VQEG four-parameter logistic fit."""
from __future__ import annotations

import warnings

import numpy as np
from scipy import optimize, special, stats


def logistic4(x, b1, b2, b3, b4):
    """VQEG's monotonic logistic: (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2 (expit: no overflow)."""
    return (b1 - b2) * special.expit((x - b3) / np.abs(b4)) + b2


def fit_logistic(pred: np.ndarray, mos: np.ndarray) -> np.ndarray | None:
    """Parameters of logistic4 mapping predictions onto the scores, or None when the fit fails or has
    fewer points than its four parameters (scipy raises then)."""
    if len(pred) <= 4:
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
    rmse_fitted (after the logistic fit), and n. Correlations of constant inputs are NaN, with a warning.
    """
    pred = np.asarray(pred, dtype=float).ravel()
    mos = np.asarray(mos, dtype=float).ravel()
    if pred.shape != mos.shape:
        raise ValueError(f"{len(pred)} predictions for {len(mos)} scores")
    out = {"n": int(len(pred)), "rmse": float(np.sqrt(np.mean((pred - mos) ** 2))) if len(pred) else float("nan")}
    constant = len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(mos) == 0
    if constant:
        what = "fewer than two samples" if len(pred) < 2 else "constant " + ("predictions" if np.ptp(pred) == 0 else "scores")
        warnings.warn(f"correlations are undefined for {what}: reported as NaN", RuntimeWarning, stacklevel=2)
        nan = float("nan")
        out.update(plcc=nan, srocc=nan, krocc=nan, main=nan, plcc_fitted=nan, rmse_fitted=nan)
        return out
    out["plcc"] = float(stats.pearsonr(pred, mos)[0])
    out["srocc"] = float(stats.spearmanr(pred, mos)[0])
    out["krocc"] = float(stats.kendalltau(pred, mos)[0])  # tau-b: ties counted
    out["main"] = abs(out["plcc"]) + abs(out["srocc"])
    params = fit_logistic(pred, mos)
    fitted = logistic4(pred, *params) if params is not None else None
    if fitted is None or np.ptp(fitted) == 0:
        out["plcc_fitted"] = out["rmse_fitted"] = float("nan")
    else:
        out["plcc_fitted"] = float(stats.pearsonr(fitted, mos)[0])
        out["rmse_fitted"] = float(np.sqrt(np.mean((fitted - mos) ** 2)))
    out["logistic"] = params.tolist() if params is not None else None
    return out


def number(value) -> str:
    """A correlation in a table: 4 decimals; empty where it is undefined (None or NaN)."""
    return "" if value is None or not np.isfinite(value) else f"{value:.4f}"


def bracket(bounds) -> str:
    """An interval after its estimate, `` [low, high]``; nothing where there is none."""
    return f" [{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else ""


def summary_line(metrics: dict) -> str:
    """One line of the metrics, with the 95% intervals of SROCC and PLCC where they have them."""
    return (f"SROCC {metrics['srocc']:.4f}{bracket(metrics.get('srocc_ci'))} PLCC {metrics['plcc']:.4f}"
            f"{bracket(metrics.get('plcc_ci'))} KROCC {metrics['krocc']:.4f} RMSE {metrics['rmse']:.4f} main "
            f"{metrics['main']:.4f} ({metrics['n']} pairs)")
