"""Dataset trees in their distributed layouts, for tests: label files (real ones copied from
../shared/iqa-meta, or small generated ones) and the image files they list."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

META = Path(__file__).resolve().parents[2] / "shared" / "iqa-meta"
LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))
CSIQ_FOLDER = {"awgn": "awgn", "jpeg": "jpeg", "jpeg2000": "jpeg2000", "fnoise": "fnoise", "blur": "blur",
               "contrast": "contrast"}


def meta(path: str) -> Path:
    """A file of the real label collection; skips the test when the collection is absent (a user's clone)."""
    if not (META / path).exists():
        pytest.skip(f"{META / path} not available")
    return META / path


def touch(path: Path, image: np.ndarray | None = None) -> None:
    """An image file: empty (label tests only look for files) or holding ``image`` (RGB)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if image is None:
        path.touch()
    else:
        assert cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]))


def noisy_pairs(folder: Path, references: int, per_reference: int, ref_dir: str, prefix: str) -> list[tuple]:
    """``references`` synthetic 72 x 72 images ``<ref_dir>/<prefix><r>.png`` under ``folder``, each with
    ``per_reference`` noisy versions ``dist/<prefix><r>_<d>.png`` (noise level d + 1): (ref, dist, r, d) with
    the paths relative to ``folder``."""
    from ahiq.data.synthetic import distort, reference_image

    rng = np.random.default_rng(0)
    pairs = []
    for r in range(references):
        ref = reference_image(rng, 72)
        touch(folder / ref_dir / f"{prefix}{r}.png", ref)
        for d in range(per_reference):
            touch(folder / "dist" / f"{prefix}{r}_{d}.png", distort(ref, "noise", d + 1, rng))
            pairs.append((f"{ref_dir}/{prefix}{r}.png", f"dist/{prefix}{r}_{d}.png", r, d))
    return pairs


def tid_tree(root: Path, label_file: Path, n_refs: int) -> None:
    """TID2013/TID2008: names on disk upper-cased where the label file has lower case, and vice versa."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(label_file, root / "mos_with_names.txt")
    for line in label_file.read_text().splitlines():
        if line.strip():
            touch(root / "distorted_images" / line.split()[1].swapcase())
    for i in range(1, n_refs + 1):
        touch(root / "reference_images" / (f"I{i:02d}.BMP" if i < 25 else f"i{i:02d}.bmp"))


def kadid_tree(root: Path, label_file: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(label_file, root / "dmos.csv")
    for row in csv.DictReader(open(label_file)):
        touch(root / "images" / row["dist_img"])
        touch(root / "images" / row["ref_img"])


def live_tree(root: Path, dmos_mat: Path, refnames_mat: Path) -> None:
    from scipy.io import loadmat

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(dmos_mat, root / "dmos.mat")
    shutil.copy(refnames_mat, root / "refnames_all.mat")
    for folder, count in LIVE_FOLDERS:
        for i in range(1, count + 1):
            touch(root / folder / f"img{i}.bmp")
    for name in loadmat(refnames_mat)["refnames_all"].ravel():
        touch(root / "refimgs" / str(np.asarray(name).ravel()[0]))


def csiq_tree(root: Path, label_file: Path) -> None:
    """CSIQ's distorted images in dst_imgs/<folder>/ with the names in the folders' own case."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(label_file, root / "csiq_label.txt")
    for line in label_file.read_text().splitlines():
        if line.strip():
            name = line.split()[0]
            ref, token = name.split(".")[:2]
            touch(root / "dst_imgs" / CSIQ_FOLDER[token.lower()] / name)
            touch(root / "src_imgs" / f"{ref}.png")


def pipal_tree(root: Path, label_dir: Path) -> None:
    """PIPAL's training release: Train_Ref/, the distorted images spread over Distortion_1..4, Train_Label/."""
    shutil.copytree(label_dir, root / "Train_Label")
    for i, file in enumerate(sorted((root / "Train_Label").glob("*.txt"))):
        touch(root / "Train_Ref" / f"{file.stem}.bmp")
        for line in file.read_text().splitlines():
            if line.strip():
                touch(root / f"Distortion_{i % 4 + 1}" / line.split(",")[0])
