"""The figures of a test, drawn with matplotlib as papers draw them: prediction against MOS with the fitted
logistic curve, per-group SROCC with its interval, and several models side by side. Each is saved as PNG and
PDF (fonts embedded as TrueType, as publishers ask)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ahiq.engine.correlations import logistic4, shown
from ahiq.files import atomic_file

STYLE = {"pdf.fonttype": 42, "ps.fonttype": 42, "font.size": 9, "axes.spines.top": False,
         "axes.spines.right": False, "savefig.dpi": 200, "savefig.bbox": "tight"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or a compute node
    import matplotlib.pyplot as plt

    return plt


def _colours(count: int) -> list:
    plt = _pyplot()
    table = plt.get_cmap("tab10" if count <= 10 else "tab20")
    return [table(i % table.N) for i in range(count)]


def scatter_figure(pred: np.ndarray, target: np.ndarray, logistic: Sequence[float] | None, title: str,
                   metrics: dict, groups: Sequence[str] | None = None, group_names: dict[str, str] | None = None):
    """Prediction (x) against the normalised MOS (y), points coloured by group, the fitted logistic curve;
    SROCC and PLCC in the legend. Returns the matplotlib Figure."""
    plt = _pyplot()
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(4.6, 3.6))
        present = list(dict.fromkeys(groups)) if groups is not None and any(groups) else []
        if present:
            codes = np.asarray(groups)
            for i, (code, colour) in enumerate(zip(present, _colours(len(present)))):
                member = codes == code  # past 20 groups the colours repeat: the marker tells them apart
                axes.scatter(pred[member], target[member], s=9, alpha=0.75, color=colour, linewidths=0,
                             marker="o^sD"[i // 20 % 4], label=(group_names or {}).get(code, code))
        else:
            axes.scatter(pred, target, s=9, alpha=0.75, color="#1f77b4", linewidths=0, label="pairs")
        if logistic is not None:
            xs = np.linspace(float(np.min(pred)), float(np.max(pred)), 300)
            axes.plot(xs, logistic4(xs, *logistic), color="black", linewidth=1.2, label="logistic fit")
        axes.set_xlabel("prediction")
        axes.set_ylabel("MOS (normalised, higher is better)")
        axes.set_title(title, fontsize=9)
        handles, labels = axes.get_legend_handles_labels()
        summary = f"SROCC {shown(metrics.get('srocc'))}, PLCC {shown(metrics.get('plcc'))}"
        handles.insert(0, plt.Line2D([], [], linestyle="none"))
        labels.insert(0, summary)
        outside = len(labels) > 8
        axes.legend(handles, labels, fontsize=7, frameon=False, loc="upper left",
                    bbox_to_anchor=(1.02, 1.0) if outside else None, ncol=2 if len(labels) > 16 else 1)
        axes.grid(alpha=0.25, linewidth=0.5)
    return figure


def group_bars_figure(rows: Sequence[dict], title: str):
    """Per-group SROCC as bars with their 95% intervals (``rows``: name, srocc, interval or None)."""
    plt = _pyplot()
    with plt.rc_context(STYLE):
        figure, axes = plt.subplots(figsize=(max(3.2, 0.38 * len(rows) + 1.4), 3.2))
        _bars(axes, [r["name"] for r in rows], [[r] for r in rows], [""], single=True)
        axes.set_ylabel("SROCC")
        axes.set_title(title, fontsize=9)
    return figure


def compare_figure(models: Sequence[str], columns: Sequence[str], cells: Sequence[Sequence[dict]], title: str):
    """Several models side by side: for each column (overall, then each group) one bar per model with its
    interval. ``cells[c][m]``: {"srocc", "interval"} of model m in column c."""
    plt = _pyplot()
    with plt.rc_context(STYLE):
        width = max(4.0, (0.16 * len(models) + 0.25) * len(columns) + 1.6)
        figure, axes = plt.subplots(figsize=(width, 3.4))
        _bars(axes, list(columns), cells, list(models), single=False)
        axes.set_ylabel("SROCC")
        axes.set_title(title, fontsize=9)
        axes.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def _bars(axes, columns: list[str], cells: list[list[dict]], series: list[str], single: bool) -> None:
    """Bars of ``cells[column][series]["srocc"]`` with their intervals; an undefined cell draws no bar."""
    count = len(series)
    width = 0.8 / count
    colours = ["#4c72b0"] if single else _colours(count)
    for s, (label, colour) in enumerate(zip(series, colours)):
        xs, heights, low, high = [], [], [], []
        for c, column in enumerate(cells):
            cell = column[s]
            if cell.get("srocc") is None:
                continue
            value = cell["srocc"]
            xs.append(c - 0.4 + width * (s + 0.5))
            heights.append(value)
            bounds = cell.get("interval")
            low.append(max(0.0, value - bounds[0]) if bounds else 0.0)  # BCa's interval may miss the estimate
            high.append(max(0.0, bounds[1] - value) if bounds else 0.0)
        axes.bar(xs, heights, width * 0.9, color=colour, label=label or None,
                 yerr=np.array([low, high]) if xs else None, capsize=2, error_kw={"linewidth": 0.8})
    axes.set_xticks(range(len(columns)))
    axes.set_xticklabels(columns, rotation=35 if max(map(len, columns), default=0) > 6 else 0, ha="right"
                         if max(map(len, columns), default=0) > 6 else "center", fontsize=7)
    axes.axhline(0, color="black", linewidth=0.6)
    axes.grid(axis="y", alpha=0.25, linewidth=0.5)
    axes.set_xlim(-0.6, len(columns) - 0.4)


def save(figure, stem: Path) -> None:
    """``<stem>.png`` and ``<stem>.pdf``, each written atomically; the figure is closed."""
    plt = _pyplot()
    try:
        with plt.rc_context(STYLE):  # the saving settings (resolution, margins, PDF fonts) are read as it saves
            for suffix in (".png", ".pdf"):
                with atomic_file(stem.with_suffix(suffix)) as handle:
                    figure.savefig(handle, format=suffix[1:])
    finally:
        plt.close(figure)
