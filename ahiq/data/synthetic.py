"""A small SYNTHETIC full-reference dataset for the demo, generated on first use.

Procedural reference images (smooth colour fields, shapes, gratings, texture), each distorted by five
types at five levels. The synthetic score of a distorted image is its PSNR in dB against the reference:
a stand-in with no perceptual meaning, chosen because a small model can learn it in minutes on a CPU.
"""
from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from ahiq.data.pairs import Pairs
from ahiq.data.readers import coded, read_custom_csv
from ahiq.files import write_atomically

DISTORTIONS = {  # five levels each, mild to strong
    "noise": [3.0, 6.0, 10.0, 16.0, 26.0],        # Gaussian noise sigma (grey levels)
    "blur": [0.7, 1.2, 1.9, 2.8, 4.0],            # Gaussian blur sigma (pixels)
    "jpeg": [60, 35, 20, 10, 4],                  # JPEG quality
    "contrast": [0.85, 0.7, 0.55, 0.4, 0.28],     # contrast scale about the mean
    "quantise": [48, 24, 12, 7, 4],               # grey levels per channel
}
LABELS = "labels.csv"


def reference_image(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size, 3), np.float32)
    for c in range(3):  # a smooth colour field
        a, b, phase = rng.uniform(-1.5, 1.5, 3)
        image[..., c] = 0.5 + 0.3 * np.sin(2 * np.pi * (a * xx + b * yy) + phase)
    freq, angle = rng.uniform(3, 12), rng.uniform(0, np.pi)  # a grating over part of the image
    grating = 0.2 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    image += grating[..., None] * (xx > rng.uniform(0.2, 0.8))[..., None]
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    for _ in range(rng.integers(3, 8)):  # shapes with sharp edges
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = (int(v) for v in rng.integers(0, size, 2))
        r = int(rng.integers(size // 12, size // 4))
        if rng.random() < 0.5:
            cv2.circle(image, (x, y), r, colour, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(image, (x - r, y - r), (x + r, y + r // 2), colour, -1)
    texture = rng.normal(0, 12, (size // 4, size // 4, 3)).astype(np.float32)
    texture = cv2.resize(texture, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(image + texture, 0, 255).astype(np.uint8)


def distort(image: np.ndarray, kind: str, level: int, rng: np.random.Generator) -> np.ndarray:
    value = DISTORTIONS[kind][level]
    img = image.astype(np.float32)
    if kind == "noise":
        out = img + rng.normal(0, value, img.shape)
    elif kind == "blur":
        out = cv2.GaussianBlur(img, (0, 0), value)
    elif kind == "jpeg":
        ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(value)])
        out = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32)
    elif kind == "contrast":
        out = (img - img.mean()) * value + img.mean()
    else:
        step = 256.0 / value
        out = np.floor(img / step) * step + step / 2
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def make_synthetic_dataset(root: Path, references: int = 24, size: int = 96, seed: int = 0) -> None:
    """Write ``refs/``, ``dist/`` and ``labels.csv`` (``ref,dist,mos``, the custom-CSV layout) under root.

    Every file is written atomically (ahiq.files), so several processes generating the set at once (the
    processes of a torchrun job on a fresh clone) each write the same whole files, and a reader never sees a
    half-written one."""
    rng = np.random.default_rng(seed)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "dist").mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(references):
        ref = reference_image(rng, size)
        ref_name = f"refs/R{r:03d}.png"
        write_atomically(root / ref_name, cv2.imencode(".png", ref[..., ::-1])[1].tobytes())
        for kind in DISTORTIONS:
            for level in range(5):
                dist = distort(ref, kind, level, rng)
                dist_name = f"dist/R{r:03d}_{kind}_{level + 1}.png"
                write_atomically(root / dist_name, cv2.imencode(".png", dist[..., ::-1])[1].tobytes())
                rows.append((ref_name, dist_name, f"{psnr(ref, dist):.4f}"))
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["ref", "dist", "mos"])
    writer.writerows(rows)
    write_atomically(root / LABELS, text.getvalue().encode())  # written last: its presence means the set is complete


def read_synthetic(root: Path, references: int = 24, size: int = 96, seed: int = 0) -> Pairs:
    """The synthetic demo set at ``root`` (a Pairs list), generated there first if it is not."""
    if not (root / LABELS).is_file():
        make_synthetic_dataset(root, references, size, seed)
    pairs = read_custom_csv(root, LABELS, higher_is_better=True)
    return Pairs([replace(p, distortion=coded(p.name)) for p in pairs], True, "synthetic")
