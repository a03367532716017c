"""``python -m ahiq compare``: several models' results on the same test images side by side, each with its 95%
intervals, and every pairwise difference tested (Williams' test on SROCC and on PLCC, the F-test on the
residuals), as compare.md, compare.csv, compare.tex (the table as a paper prints it) and a figure."""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Sequence

import numpy as np

from ahiq.engine import figures
from ahiq.engine.correlations import EMPTY, bracket, defined, pearson, shown, spearman
from ahiq.engine.results import Analysis, Results, analyse
from ahiq.engine.statistics import LEVEL, f_test, fitted, williams
from ahiq.files import write_atomically
from ahiq.messages import create_folder, listed

TESTS = ("williams_srocc", "williams_plcc", "f_residuals")
TEST_TITLES = {"williams_srocc": "Williams' test on SROCC", "williams_plcc": "Williams' test on PLCC (after each "
               "logistic fit)", "f_residuals": "F-test on the residuals after each logistic fit"}


@dataclass
class Test:
    a: int
    b: int
    test: str
    statistic: float
    p: float

    @property
    def significant(self) -> int | None:
        """1: model a is significantly better than b; -1: b than a; 0: no significant difference at 95%; None:
        the test is undefined for these data."""
        if defined(self.p) is None or defined(self.statistic) is None:
            return None
        if self.p >= 1 - LEVEL:
            return 0
        better = self.statistic < 1 if self.test == "f_residuals" else self.statistic > 0
        return 1 if better else -1


def aligned(paths: Sequence[Path]) -> list[Results]:
    """The results of each folder, every one in the first one's order of pairs; a ValueError when they are not
    results over the same images with the same scores."""
    seen: dict[Path, Path] = {}
    for path in map(Path, paths):
        folder = (path.parent if path.is_file() else path).resolve()
        if folder in seen:
            raise ValueError(f"{path} and {seen[folder]} are the same result folder: give each model's once")
        seen[folder] = path
    sets = [Results.read(Path(p)) for p in paths]
    first = sets[0]
    for path, other in zip(paths[1:], sets[1:]):
        differ = set(first.names) ^ set(other.names)
        if differ or len(other.names) != len(first.names):
            count = len(differ) or abs(len(other.names) - len(first.names))
            raise ValueError(f"{paths[0]} ({len(first.names)} pairs) and {path} ({len(other.names)} pairs) are not "
                             f"results over the same images: {count} pair names differ (e.g. "
                             f"{listed(sorted(differ), 3) or 'a repeated name'}); compare tests of the same test part")
    out = [first]
    for path, other in zip(paths[1:], sets[1:]):
        order = {name: i for i, name in enumerate(other.names)}
        index = np.array([order[name] for name in first.names])
        if not np.allclose(other.mos[index], first.mos, rtol=1e-9, atol=1e-9, equal_nan=True):
            raise ValueError(f"{paths[0]} and {path} give the same images other scores (MOS): not the same test set")
        out.append(Results(other.label, other.dataset, first.names, first.refs, first.types, first.mos, first.target,
                           first.mos_ci95, other.score[index]))
    return out


def pairwise(results: list[Results]) -> list[Test]:
    """Every pair of models, each of TESTS, on the first one's targets (all share the same images and MOS)."""
    target = results[0].target
    n = len(target)
    mapped = [fitted(r.score, target) for r in results]
    tests = []
    for a, b in combinations(range(len(results)), 2):
        pa, pb = results[a].score, results[b].score
        tests.append(Test(a, b, "williams_srocc", *williams(spearman(pa, target), spearman(pb, target),
                                                             spearman(pa, pb), n)))
        fa, fb = mapped[a], mapped[b]
        both = fa is not None and fb is not None  # after each model's fit: undefined where one cannot be made
        tests.append(Test(a, b, "williams_plcc", *(williams(pearson(fa, target), pearson(fb, target), pearson(fa, fb), n)
                                                   if both else (float("nan"),) * 2)))
        tests.append(Test(a, b, "f_residuals", *f_test(target - fa if both else None, target - fb if both else None)))
    return tests


def compare(paths: Sequence[Path], out: Path | None, resamples: int, by: str, seed: int,
            names: Sequence[str] | None = None) -> Path:
    """Compare the result folders ``paths``, the models called ``names`` (default: each folder's label, the
    experiment's name or the metric's); write into ``out`` (default: ``compare/`` in their common folder);
    returns the folder written."""
    if len(paths) < 2:
        raise ValueError("compare needs at least two result folders")
    if names is not None and (len(names) != len(paths) or len(set(names)) < len(names)):
        raise ValueError(f"--names: give one distinct name per result folder ({len(paths)}), got {len(names)}: "
                         f"{', '.join(names)}")
    results = aligned(paths)
    labels = list(names) if names is not None else _unique_labels(results, paths)
    for result, label in zip(results, labels):
        result.label = label
    out = out or Path(os.path.commonpath([str(Path(p).resolve().parent if Path(p).is_file() else Path(p).resolve())
                                          for p in paths])) / "compare"
    create_folder(out, "--out")
    analyses = [analyse(r, resamples, by, seed) for r in results]
    tests = pairwise(results)
    groups = [(row["code"], row["name"]) for row in analyses[0].groups]
    write_atomically(out / "compare.csv", _csv(results, tests))
    markdown = _markdown(results, analyses, tests, groups)
    write_atomically(out / "compare.md", markdown.encode())
    write_atomically(out / "compare.tex", latex_table(labels, analyses, groups).encode())
    cells = [[{"srocc": defined(a.metrics["srocc"]),
               "interval": a.metrics.get("srocc_ci")} for a in analyses]]
    cells += [[{"srocc": a.groups[g]["srocc"], "interval": a.groups[g].get("interval")} for a in analyses]
              for g in range(len(groups))]
    figures.save(figures.compare_figure(labels, ["overall", *(name for _, name in groups)], cells,
                                        f"SROCC on {results[0].dataset} ({len(results[0].names)} pairs), 95% intervals"),
                 out / "compare")
    print(markdown)
    print(f"wrote compare.md, compare.csv, compare.tex and compare.png/.pdf to {out}")
    return out


def _unique_labels(results: list[Results], paths: Sequence[Path]) -> list[str]:
    labels = [r.label for r in results]
    return [label if labels.count(label) == 1 else f"{label} ({path})" for label, path in zip(labels, paths)]


def _csv(results: list[Results], tests: list[Test]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["a", "b", "test", "statistic", "p", "significant"])
    for t in tests:
        writer.writerow([results[t.a].label, results[t.b].label, t.test, _plain(t.statistic), _plain(t.p),
                         "" if t.significant is None else t.significant])
    return text.getvalue().encode()


def _plain(value: float) -> str:
    return "" if defined(value) is None else repr(float(value))


def _markdown(results: list[Results], analyses: list[Analysis], tests: list[Test], groups) -> str:
    first = analyses[0].metrics
    lines = [f"# {len(results)} models on {results[0].dataset}: {first['n']} pairs",
             "", f"95% BCa bootstrap intervals over {first['intervals']['by']}s ({first['intervals']['units']}, "
                 f"{first['intervals']['resamples']} resamples, seed {first['intervals']['seed']}); PLCC and RMSE "
                 f"after each model's logistic fit.", "",
             "| model | SROCC | PLCC | KROCC | RMSE |", "|---|---|---|---|---|"]
    for r, a in zip(results, analyses):
        m = a.metrics
        lines.append(f"| {_cell(r.label)} | {shown(m['srocc'])}{bracket(m.get('srocc_ci'))} | "
                     f"{shown(m['plcc_fitted'])}{bracket(m.get('plcc_fitted_ci'))} | {shown(m['krocc'])} | "
                     f"{shown(m['rmse_fitted'])} |")
    labels = [_cell(r.label) for r in results]
    for name in TESTS:
        matrix = {(t.a, t.b): t.significant for t in tests if t.test == name}
        lines += ["", f"## {TEST_TITLES[name]}", "",
                  "1: the row's model is significantly better than the column's at 95%; -1: worse; 0: no significant "
                  f"difference; {EMPTY}: the test is undefined for these data.", "", "| | " + " | ".join(labels) + " |",
                  "|---" * (len(labels) + 1) + "|"]
        for i, label in enumerate(labels):
            row = [" " if i == j else _sign(matrix[(i, j)] if i < j else matrix[(j, i)], i < j)
                   for j in range(len(labels))]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    if groups:
        lines += ["", "## SROCC per group", "", "| group | n | " + " | ".join(labels) + " |",
                  "|---|---" + "|---" * len(labels) + "|"]
        for g, (_, name) in enumerate(groups):
            lines.append(f"| {_cell(name)} | {analyses[0].groups[g]['n']} | "
                         + " | ".join(shown(a.groups[g]["srocc"]) for a in analyses) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text in a Markdown table's cell (a model's or a group's name, which a user chose): its pipes escaped."""
    return str(text).replace("|", "\\|")


def _sign(significant: int | None, as_given: bool) -> str:
    """A cell of a significance matrix: the test's 1/0/-1 from the row's side (``as_given``: the row is the test's
    first model), EMPTY where it is undefined."""
    return EMPTY if significant is None else str(significant if as_given else -significant)


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def latex_table(labels: Sequence[str], analyses: list[Analysis], groups) -> str:
    """A LaTeX ``tabular``: one row per model, SROCC and PLCC (after the logistic fit) overall and per group, the
    best of each column in bold (no package needed beyond LaTeX's own)."""
    columns = [[(a.metrics["srocc"], a.metrics["plcc_fitted"]) for a in analyses]]
    columns += [[(a.groups[g]["srocc"], a.groups[g]["plcc"]) for a in analyses] for g in range(len(groups))]
    cells = [[c[m][k] for c in columns for k in (0, 1)] for m in range(len(analyses))]
    best = [max((row[k] for row in cells if defined(row[k]) is not None), default=None)
            for k in range(len(cells[0]))]
    heads = ["Overall", *(name for _, name in groups)]
    lines = [r"\begin{tabular}{l" + "cc" * len(heads) + "}", r"\hline",
             " & " + " & ".join(r"\multicolumn{2}{c}{" + latex_escape(h) + "}" for h in heads) + r" \\",
             "Model & " + " & ".join(["SROCC & PLCC"] * len(heads)) + r" \\", r"\hline"]
    for label, row in zip(labels, cells):
        texts = []
        for value, top in zip(row, best):
            if defined(value) is None:
                texts.append(EMPTY)
            else:
                text = f"{value:.3f}"
                texts.append(r"\textbf{" + text + "}" if top is not None and round(value, 3) == round(top, 3) else text)
        lines.append(latex_escape(label) + " & " + " & ".join(texts) + r" \\")
    lines += [r"\hline", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
