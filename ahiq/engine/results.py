"""What a test writes. For a labelled set: each pair's score (``results.txt``, the official format, and
``pairs.csv`` with what the analysis needs: reference, distortion type and group, MOS, target), the analysis
(``metrics.json`` with 95% intervals, ``distortions.csv``, ``groups.csv``) and its figures. For an unlabelled
one: an NTIRE 2022 Perceptual IQA Challenge (full-reference track) submission for CodaLab. Every file is
written atomically (ahiq.files). ``python -m ahiq compare`` reads the result folders back (``Results.read``)."""
from __future__ import annotations

import csv
import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ahiq.data import Part
from ahiq.registry.datasets import taxonomy
from ahiq.engine import figures
from ahiq.engine.correlations import correlate, defined, logistic4, pearson, shown, spearman, summary_line
from ahiq.engine.statistics import by_group, interval, rating_spread_metrics
from ahiq.files import json_bytes, write_atomically

PAIRS_FILE = "pairs.csv"
PAIRS_HEADER = ("name", "ref", "type", "group", "mos", "target", "mos_ci95", "score")
TYPE_HEADER = ("type", "name", "group", "n", "srocc", "plcc", "krocc")
GROUP_HEADER = ("group", "name", "n", "srocc", "plcc", "krocc")


@dataclass
class Results:
    """One model's scores of a labelled test part, pair by pair, with what the analysis needs."""
    label: str              # the model, as tables and legends name it
    dataset: str
    names: list[str]
    refs: list[str]
    types: list[str]        # the dataset's distortion codes ("" unknown)
    mos: np.ndarray         # the published scores
    target: np.ndarray      # the normalised scores, higher is better
    mos_ci95: np.ndarray    # each MOS's 95% interval half-width (NaN: not given)
    score: np.ndarray

    @classmethod
    def of(cls, part: Part, score: np.ndarray, label: str) -> "Results":
        pairs = part.pairs
        return cls(label, pairs.dataset, [p.name for p in pairs], [p.ref for p in pairs],
                   [p.distortion for p in pairs], np.array([p.mos for p in pairs], float),
                   np.asarray(part.targets, float), np.array([p.mos_ci95 for p in pairs], float),
                   np.asarray(score, float))

    @property
    def groups(self) -> list[str]:
        return taxonomy(self.dataset).groups_of(self.types)

    def write(self, folder: Path) -> None:
        """``results.txt`` (``name,score``, the official format) and ``pairs.csv``."""
        write_atomically(folder / "results.txt", _score_lines(self.names, self.score))
        rows = zip(self.names, self.refs, self.types, self.groups, self.mos, self.target, self.mos_ci95, self.score)
        write_atomically(folder / PAIRS_FILE, _csv([PAIRS_HEADER, *([n, r, t, g, repr(float(m)), repr(float(y)),
                                                                     "" if math.isnan(c) else repr(float(c)),
                                                                     repr(float(s))]
                                                                    for n, r, t, g, m, y, c, s in rows)]))

    @classmethod
    def read(cls, path: Path) -> "Results":
        """The results of a test.py folder (or its results.txt), checked as a whole: its pairs.csv (every row, the
        pair names unique), its results.txt (the same pairs and scores) and its metrics.json (the same count).
        A ValueError names the file and the line of the first problem."""
        folder = path.parent if path.is_file() else path
        files = {name: folder / name for name in ("results.txt", PAIRS_FILE, "metrics.json")}
        missing = [name for name, p in files.items() if not p.is_file()]
        if missing:
            said = ", ".join(missing[:-1]) + " and " * (len(missing) > 1) + missing[-1]
            raise ValueError(f"{path} is not a test.py result folder: {said} {'are' if len(missing) > 1 else 'is'} "
                             f"missing in {folder} (written by python test.py with a labelled test part)")
        info = _read_metrics(files["metrics.json"])
        rows = _read_pairs(files[PAIRS_FILE])
        _check_scores(files["results.txt"], rows)
        if info.get("n") != len(rows):
            raise ValueError(f"{files['metrics.json']} is of {info.get('n')} pairs, {files[PAIRS_FILE]} holds "
                             f"{len(rows)}: not one test's files; run python test.py again")
        column = lambda key: np.array([row[key] for row in rows])  # noqa: E731
        return cls(str(info.get("label") or folder.name), str(info.get("dataset", "")), [r["name"] for r in rows],
                   [r["ref"] for r in rows], [r["type"] for r in rows], column("mos"), column("target"),
                   column("mos_ci95"), column("score"))


def _read_metrics(path: Path) -> dict:
    """metrics.json as written by test.py: an object with its count of pairs."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); run python test.py again to rewrite it") from None
    if not isinstance(info, dict) or not isinstance(info.get("n"), int) or isinstance(info.get("n"), bool):
        raise ValueError(f"{path} is not a test.py metrics file (an object with its count of pairs, n); run python "
                         f"test.py again to rewrite it")
    return info


def _read_pairs(path: Path) -> list[dict]:
    """pairs.csv's rows, each checked: its fields, finite MOS, target and score, a name seen once."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); run python test.py again to rewrite it") from None
    if not lines or tuple(lines[0]) != PAIRS_HEADER:
        raise ValueError(f"{path}:1: the header is not {','.join(PAIRS_HEADER)}; run python test.py again")
    if len(lines) < 2:
        raise ValueError(f"{path} holds no pairs; run python test.py again")
    rows, seen = [], {}
    for number, fields in enumerate(lines[1:], start=2):
        where = f"{path}:{number}"
        if len(fields) != len(PAIRS_HEADER):
            raise ValueError(f"{where}: {len(fields)} fields, the header has {len(PAIRS_HEADER)}")
        row = dict(zip(PAIRS_HEADER, fields))
        if not row["name"]:
            raise ValueError(f"{where}: the pair has no name")
        if row["name"] in seen:
            raise ValueError(f"{where}: the pair {row['name']!r} is listed twice (first at line {seen[row['name']]}): "
                             f"a result folder lists each pair once")
        seen[row["name"]] = number
        for key in ("mos", "target", "mos_ci95", "score"):
            text = row[key]
            try:
                row[key] = float(text) if text else math.nan
            except ValueError:
                raise ValueError(f"{where}: {key} {text!r} is not a number") from None
            if key != "mos_ci95" and not math.isfinite(row[key]):
                raise ValueError(f"{where}: {key} {text!r} is not a finite number")
        rows.append(row)
    return rows


def _check_scores(path: Path, rows: list[dict]) -> None:
    """results.txt lists the pairs of pairs.csv, in its order, with the same scores (as written: 6 decimals)."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); run python test.py again to rewrite it") from None
    if len(lines) != len(rows):
        raise ValueError(f"{path} lists {len(lines)} pairs, {path.with_name(PAIRS_FILE)} {len(rows)}: not one "
                         f"test's files; run python test.py again")
    for number, (line, row) in enumerate(zip(lines, rows), start=1):
        name, _, score = line.rpartition(",")
        try:
            same = name == row["name"] and abs(float(score) - row["score"]) <= 5e-7 + 1e-9 * abs(row["score"])
        except ValueError:
            same = False
        if not same:
            raise ValueError(f"{path}:{number}: {line!r} is not pair {row['name']!r} with score {row['score']:f} "
                             f"of {path.with_name(PAIRS_FILE)}: not one test's files; run python test.py again")


@dataclass
class Analysis:
    metrics: dict            # metrics.json: the correlations, their intervals, P.1401's where it applies
    types: list[dict]        # distortions.csv's rows
    groups: list[dict]       # groups.csv's rows, each with its SROCC's interval


def analyse(results: Results, resamples: int, by: str, seed: int) -> Analysis:
    """Correlations over the whole part and per type and group; 95% bootstrap intervals over ``by``
    (``reference``: whole reference images; ``pair``) with ``resamples`` resamples and ``seed``."""
    pred, target = results.score, results.target
    metrics = correlate(pred, target)
    units = results.refs if by == "reference" else results.names
    classes = taxonomy(results.dataset)
    logistic = metrics.get("logistic")
    statistics = {"srocc": spearman, "plcc": pearson}
    if logistic is not None:  # PLCC after the logistic fitted on the whole part, the mapping held fixed
        statistics["plcc_fitted"] = lambda p, t: pearson(logistic4(p, *logistic), t)
    for key, statistic in statistics.items():
        metrics[f"{key}_ci"] = interval(statistic, pred, target, units, resamples, seed)
    metrics["intervals"] = {"level": 0.95, "method": "BCa bootstrap (scipy.stats.bootstrap)", "by": by,
                            "units": len(set(units)), "resamples": resamples, "seed": seed}
    metrics.update(rating_spread_metrics(pred, results.mos, results.mos_ci95))
    type_rows, group_rows = [], []
    if any(results.types):
        type_rows = by_group(pred, target, results.types, classes.order(t for t in results.types if t), logistic)
        for row in type_rows:
            row.update(name=classes.name(row["code"]), group=classes.group(row["code"]))
        groups = results.groups
        group_rows = by_group(pred, target, groups, classes.order(g for g in groups if g), logistic)
        for row in group_rows:
            member = np.asarray(groups) == row["code"]
            row["name"] = classes.group_name(row["code"])
            row["interval"] = interval(spearman, pred[member], target[member], np.asarray(units)[member], resamples,
                                       seed) if row["srocc"] is not None else None
    return Analysis(metrics, type_rows, group_rows)


def write_report(folder: Path, results: Results, analysis: Analysis, **info) -> None:
    """metrics.json, distortions.csv, groups.csv and the figures into ``folder``; prints the summary."""
    metrics = analysis.metrics
    write_atomically(folder / "metrics.json", json_bytes({"label": results.label, "dataset": results.dataset, **info,
                                                         **metrics}))
    written = ["results.txt", PAIRS_FILE, "metrics.json"]
    if analysis.types:
        write_atomically(folder / "distortions.csv", _csv([TYPE_HEADER, *([r["code"], r["name"], r["group"], r["n"],
                                                                           *_cells(r)] for r in analysis.types)]))
        write_atomically(folder / "groups.csv", _csv([GROUP_HEADER, *([r["code"], r["name"], r["n"], *_cells(r)]
                                                                      for r in analysis.groups)]))
        written += ["distortions.csv", "groups.csv"]
    title = f"{results.label} on {results.dataset} ({len(results.score)} pairs)"
    scatter = figures.scatter_figure(results.score, results.target, metrics.get("logistic"), title, metrics,
                                     results.groups, {r["code"]: r["name"] for r in analysis.groups})
    figures.save(scatter, folder / "scatter")
    written.append("scatter.png/.pdf")
    if analysis.groups:
        figures.save(figures.group_bars_figure(analysis.groups, f"{results.label}: SROCC per group, 95% intervals"),
              folder / "groups")
        written.append("groups.png/.pdf")
    print(summary(results, analysis))
    print(f"wrote {', '.join(written)} to {folder}")


def summary(results: Results, analysis: Analysis) -> str:
    """The printed summary: the overall line with its intervals, then the per-group table."""
    m = analysis.metrics
    lines = [summary_line(m)]
    if "outlier_ratio" in m:
        lines.append(f"outlier ratio {shown(m['outlier_ratio'])}, epsilon-insensitive RMSE {shown(m['rmse_star'])} "
                     f"(ITU-T P.1401, on the MOS scale)")
    if analysis.groups:
        width = max(len(r["name"]) for r in analysis.groups) + 2
        lines.append(f"{'group':<{width}}{'n':>6}  {'SROCC':>7}  {'PLCC':>7}  {'KROCC':>7}")
        lines += [f"{r['name']:<{width}}{r['n']:>6}  " + "  ".join(f"{shown(v):>7}" for v in _cells(r))
                  for r in analysis.groups]
    return "\n".join(lines)


def _cells(row: dict) -> list:
    return [row["srocc"], row["plcc"], row["krocc"]]


def _csv(rows) -> bytes:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([[_csv_cell(v) for v in row] for row in rows])
    return text.getvalue().encode("utf-8")


def _csv_cell(value) -> str:
    """A CSV cell: a float with 6 decimals, empty where it is undefined (None, NaN)."""
    if value is None or isinstance(value, float):
        return "" if defined(value) is None else f"{value:.6f}"
    return value


def write_ntire_submission(scores: Mapping[str, float], out_dir: Path, runtime: float, gpu: bool,
                           extra_data: bool, description: str) -> Path:
    """Write ``output.txt`` (``name,score`` per image, sorted by name), ``readme.txt`` (CodaLab's five lines)
    and ``submission.zip`` holding just those two files at its root; returns the zip's path."""
    bad = [name for name, score in scores.items() if not math.isfinite(score)]
    if not scores or bad:
        raise ValueError(f"cannot submit: {'no scores' if not scores else f'non-finite scores for {bad[:5]}'}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = _score_lines(*zip(*sorted(scores.items()))).decode()
    readme = (f"runtime per image [s] : {runtime:.4f}\n"
              f"CPU[1] / GPU[0] : {0 if gpu else 1}\n"
              f"Extra Data [1] / No Extra Data [0] : {1 if extra_data else 0}\n"
              f"Other description : {' '.join(description.split())}\n"
              f"Full-Reference [1] / Non-Reference [0] : 1\n")
    write_atomically(out_dir / "output.txt", output.encode())
    write_atomically(out_dir / "readme.txt", readme.encode())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme.txt", readme)
        zf.writestr("output.txt", output)
    write_atomically(out_dir / "submission.zip", buffer.getvalue())
    return out_dir / "submission.zip"


def _score_lines(names: Sequence[str], scores: Sequence[float]) -> bytes:
    """``name,score`` lines, the official results.txt format."""
    return "".join(f"{name},{score:f}\n" for name, score in zip(names, scores)).encode()
