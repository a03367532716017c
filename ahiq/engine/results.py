"""What test.py writes: for a labelled set per-image predictions, metrics.json and a scatter plot; for an
unlabelled one an NTIRE 2022 Perceptual IQA Challenge (full-reference track) submission for CodaLab."""
from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from ahiq.engine.correlations import logistic4


def write_predictions(path: Path, names: Sequence[str], scores: Sequence[float]) -> None:
    """``name,score`` lines, the official results.txt format."""
    path.write_text(_score_lines(zip(names, scores)))


def _score_lines(named_scores) -> str:
    return "".join(f"{name},{score:f}\n" for name, score in named_scores)


def write_metrics(path: Path, metrics: dict, **info) -> None:
    path.write_text(json.dumps({**info, **metrics}, indent=1, default=float))


def write_ntire_submission(scores: Mapping[str, float], out_dir: str | os.PathLike, runtime: float, gpu: bool,
                           extra_data: bool, description: str) -> Path:
    """Write ``output.txt`` (``name,score`` per image, sorted by name), ``readme.txt`` (CodaLab's five lines)
    and ``submission.zip`` holding just those two files at its root; returns the zip's path."""
    bad = [name for name, score in scores.items() if not math.isfinite(score)]
    if not scores or bad:
        raise ValueError(f"cannot submit: {'no scores' if not scores else f'non-finite scores for {bad[:5]}'}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = _score_lines(sorted(scores.items()))
    readme = (f"runtime per image [s] : {runtime:.4f}\n"
              f"CPU[1] / GPU[0] : {0 if gpu else 1}\n"
              f"Extra Data [1] / No Extra Data [0] : {1 if extra_data else 0}\n"
              f"Other description : {' '.join(description.split())}\n"
              f"Full-Reference [1] / Non-Reference [0] : 1\n")
    (out_dir / "output.txt").write_text(output)
    (out_dir / "readme.txt").write_text(readme)
    path = out_dir / "submission.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme.txt", readme)
        zf.writestr("output.txt", output)
    return path


def scatter_plot(path: Path, pred: np.ndarray, target: np.ndarray, logistic: Sequence[float] | None, title: str) -> None:
    """Prediction (x) against normalised MOS (y) with the fitted logistic curve, as a PNG."""
    cv2.imwrite(str(path), scatter_image(pred, target, logistic, title)[..., ::-1])


def scatter_image(pred: np.ndarray, target: np.ndarray, logistic: Sequence[float] | None, title: str) -> np.ndarray:
    """The scatter plot as an RGB array [H, W, 3]."""
    width, height, margin = 640, 480, 60
    canvas = np.full((height, width, 3), 255, np.uint8)
    x0, x1 = float(np.min(pred)), float(np.max(pred))
    y0, y1 = float(np.min(target)), float(np.max(target))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def to_px(x, y):
        px = margin + (np.asarray(x) - x0) / (x1 - x0) * (width - 2 * margin)
        py = height - margin - (np.asarray(y) - y0) / (y1 - y0) * (height - 2 * margin)
        return np.stack([px, py], -1).round().astype(np.int32)

    black, grey = (0, 0, 0), (90, 90, 90)
    cv2.rectangle(canvas, (margin, margin), (width - margin, height - margin), black, 1)
    for px, py in to_px(pred, target):
        cv2.circle(canvas, (int(px), int(py)), 3, (200, 120, 30), -1, cv2.LINE_AA)
    if logistic is not None:
        xs = np.linspace(x0, x1, 200)
        ys = np.clip(logistic4(xs, *logistic), y0, y1)
        cv2.polylines(canvas, [to_px(xs, ys)], False, (40, 40, 220), 2, cv2.LINE_AA)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(canvas, title, (margin, 35), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, "prediction", (width // 2 - 40, height - 15), font, 0.5, black, 1, cv2.LINE_AA)
    cv2.putText(canvas, "MOS (normalised)", (5, margin - 8), font, 0.45, black, 1, cv2.LINE_AA)
    for value, (px, py) in ((x0, to_px(x0, y0)), (x1, to_px(x1, y0))):
        cv2.putText(canvas, f"{value:.3g}", (int(px) - 15, int(py) + 20), font, 0.4, grey, 1, cv2.LINE_AA)
    for value, (px, py) in ((y0, to_px(x0, y0)), (y1, to_px(x0, y1))):
        cv2.putText(canvas, f"{value:.3g}", (5, int(py) + 4), font, 0.4, grey, 1, cv2.LINE_AA)
    return canvas
