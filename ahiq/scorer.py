"""Scoring any image pairs with a trained AHIQ: ``ahiq.Scorer`` and ``python -m ahiq score``."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .backbones import Pretrained
from .data import DatasetError, Pair, Pairs, check_images
from .data.images import IMAGE_EXTENSIONS
from .data import Part
from .evaluation import predict
from .model import load_model
from .runtime import Runtime, select_device
from .options import DEFAULTS

PathLike = str | os.PathLike


def pair_files(dist: PathLike, ref: PathLike) -> Pairs:
    """Two files, or two folders whose images are paired by file name (letter case ignored)."""
    dist, ref = Path(dist), Path(ref)
    for path in (dist, ref):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    if dist.is_file() and ref.is_file():
        return Pairs([Pair(str(ref.resolve()), str(dist.resolve()), float("nan"), dist.name)])
    if not (dist.is_dir() and ref.is_dir()):
        raise DatasetError(f"give two files or two folders, got {dist} and {ref}")

    def images(folder: Path) -> dict[str, Path]:
        return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}

    dists, refs = images(dist), images(ref)
    unpaired = sorted(set(dists) ^ set(refs))
    if unpaired:
        where = [f"{n} (only in {dist if n in dists else ref})" for n in unpaired]
        raise DatasetError(f"{len(unpaired)} images have no partner of the same name: {', '.join(where[:5])}"
                           + (" ..." if len(where) > 5 else ""))
    if not dists:
        raise DatasetError(f"no images in {dist}")
    return Pairs([Pair(str(refs[n].resolve()), str(dists[n].resolve()), float("nan"), dists[n].name) for n in dists])


def pairs_from_csv(path: PathLike) -> Pairs:
    """A CSV with ``dist`` and ``ref`` columns (paths relative to the CSV's folder or absolute)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"dist", "ref"} <= set(rows[0]):
        raise DatasetError(f"{path} needs a header with 'dist' and 'ref' columns")
    pairs, missing = [], []
    for number, row in enumerate(rows, start=2):
        dist, ref = (Path(row[k]) if Path(row[k]).is_absolute() else path.parent / row[k] for k in ("dist", "ref"))
        missing += [f"{path}:{number}: {p}" for p in (dist, ref) if not p.is_file()]
        pairs.append(Pair(str(ref.resolve()), str(dist.resolve()), float("nan"), row["dist"]))
    if missing:
        raise DatasetError(f"{len(missing)} listed images not found: {'; '.join(missing[:5])}")
    return Pairs(pairs)


class Scorer:
    """A trained AHIQ (one checkpoint or an ensemble) that scores image pairs of any size at least the crop,
    averaging a crop ensemble (default: the official 20 random crops, seeded by the reference image's name).

        scorer = Scorer("checkpoints/ahiq_pipal/AHIQ_vit_p8_epoch33-da3ea303.pth")
        scorer.score("dist.png", "ref.png")               # one float, higher is better
        scorer.score_pairs(pair_files("dist/", "ref/"))   # numpy array
    """

    def __init__(self, checkpoint: PathLike | Sequence[PathLike], patch_size: int = 8,
                 vit_pretrained: Pretrained = True, cnn_pretrained: Pretrained = True, crops: str = "random",
                 num_crops: int = 20, seed: int = 0, device: str = "auto", batch_size: int = 1,
                 runtime: Runtime = Runtime()):
        paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
        # Official checkpoints take the paper's architecture with this patch size; the project's carry theirs.
        model_opt = {**DEFAULTS["model"], "patch_size": patch_size, "vit_pretrained": vit_pretrained,
                     "cnn_pretrained": cnn_pretrained}
        self.device = select_device(device)
        self.runtime = runtime
        self.models = [runtime.prepare(load_model(p, model_opt), self.device).eval() for p in paths]
        self.crop_size = self.models[0].config["img_size"]
        self.crops, self.num_crops, self.seed, self.batch_size = crops, num_crops, seed, batch_size

    def score_pairs(self, pairs: Pairs, progress: bool = False) -> np.ndarray:
        check_images(pairs, self.crop_size, whole=self.crops == "whole")  # every pair before the first score
        return predict(self.models, Part(pairs, None), self.crop_size, self.crops, self.num_crops, self.seed,
                       self.batch_size, 0, self.device, progress=progress, runtime=self.runtime)

    def score(self, dist: PathLike, ref: PathLike) -> float:
        return float(self.score_pairs(pair_files(dist, ref))[0])


def write_scores(path: PathLike, pairs: Pairs, scores: Sequence[float]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dist", "ref", "score"])
        for pair, score in zip(pairs, scores):
            writer.writerow([pair.dist, pair.ref, f"{score:.6f}"])
