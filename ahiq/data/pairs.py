"""A pair of images (``Pair``), a list of them (``Pairs``), the pairs of image files to score (two files, two
folders, a folder against one reference, a CSV of pairs) and the check of every pair's images that runs before
the first step. No torch: the ONNX scorer uses them too."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ahiq.data.images import IMAGE_EXTENSIONS, ImageError, image_size

PathLike = str | os.PathLike


class DatasetError(ValueError):
    """A dataset that cannot be used as given: the message names the file, line or folder."""


@dataclass(frozen=True)
class Pair:
    ref: str      # absolute path of the reference image
    dist: str     # absolute path of the distorted image
    mos: float    # the published score (MOS, DMOS or Elo); NaN where the set is unlabelled
    name: str     # the distorted image's name as labelled, unique in its dataset (e.g. 'jp2k/img1.bmp')
    distortion: str = ""  # the dataset's code of its distortion type (ahiq.registry.datasets); "" when unknown
    mos_ci95: float = math.nan  # half-width of the MOS's 95% confidence interval, where the dataset gives
    #                             the spread of its ratings (TID2013, KADID-10k); NaN elsewhere


class Pairs(list):
    """A list of Pair that knows the direction of its scores."""

    def __init__(self, pairs: Iterable[Pair] = (), higher_is_better: bool = True, dataset: str = ""):
        super().__init__(pairs)
        self.higher_is_better = higher_is_better
        self.dataset = dataset

    @property
    def labelled(self) -> bool:
        return all(not math.isnan(p.mos) for p in self)


def pair_files(dist: PathLike, ref: PathLike) -> Pairs:
    """Two files; two folders whose images are paired by file name (letter case ignored); or a folder of
    distorted images and the one reference file they are all versions of."""
    dist, ref = Path(dist), Path(ref)
    for path in (dist, ref):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
    if dist.is_file() and ref.is_file():
        return Pairs([Pair(str(ref.resolve()), str(dist.resolve()), float("nan"), dist.name)])

    def images(folder: Path) -> dict[str, Path]:
        return {p.name.lower(): p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}

    if dist.is_dir() and ref.is_file():
        found = images(dist)
        if not found:
            raise DatasetError(f"no images in {dist}")
        return Pairs([Pair(str(ref.resolve()), str(p.resolve()), float("nan"), p.name) for p in found.values()])
    if not (dist.is_dir() and ref.is_dir()):
        raise DatasetError(f"give two files, two folders, or a folder of distorted images and their one reference "
                           f"file; got the file {dist} and the folder {ref}")
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


def check_images(pairs: Sequence[Pair], crop_size: int, whole: bool = False, needs: str = "crop") -> None:
    """Every listed image exists, is a complete image file, matches its partner's size and holds a crop.

    Reads headers only (seconds for PIPAL's 23,200 pairs) and raises one DatasetError listing every problem.
    ``whole``: images must be exactly crop_size square (evaluation on whole images). ``needs``: what needs the
    size, for the message.
    """
    check_parts({"": (pairs, whole)}, crop_size, needs)


def check_parts(parts: dict[str, tuple[Sequence[Pair], bool]], crop_size: int, needs: str = "crop") -> None:
    """check_images for several parts at once (name -> (pairs, whole)): one DatasetError with every part's
    problems, each named by its part, so that a run fixes them all before its next try."""
    sizes: dict[str, tuple[int, int] | None] = {}
    problems: list[str] = []
    for name, (pairs, whole) in parts.items():
        label = f"{name}: " if name else ""
        for path in sorted({p for pair in pairs for p in (pair.ref, pair.dist)} - set(sizes)):
            try:
                sizes[path] = image_size(path)
            except ImageError as exc:
                sizes[path] = None
                problems.append(f"{label}{exc}")
        for pair in pairs:
            ref, dist = sizes[pair.ref], sizes[pair.dist]
            if ref is None or dist is None:
                continue
            if ref != dist:
                problems.append(f"{label}{pair.dist} is {dist[0]}x{dist[1]} but its reference {pair.ref} is "
                                f"{ref[0]}x{ref[1]}")
            elif whole and dist != (crop_size, crop_size):
                problems.append(f"{label}{pair.dist} is {dist[0]}x{dist[1]}, whole-image evaluation needs "
                                f"{crop_size}x{crop_size}")
            elif min(dist) < crop_size:
                problems.append(f"{label}{pair.dist} is {dist[0]}x{dist[1]}, smaller than the {crop_size}x{crop_size} "
                                f"{needs}")
    problems = sorted(set(problems))
    if len(problems) == 1:
        raise DatasetError(f"{problems[0]}; fix or remove this pair, then run again")
    if problems:
        named = [name for name in parts if name]
        where = f" in the {', '.join(named)} parts" if len(named) > 1 else f" in the {named[0]} part" if named else ""
        total = len({(p.ref, p.dist) for pairs, _ in parts.values() for p in pairs})
        shown = "\n  ".join(problems[:10])
        raise DatasetError(f"{len(problems)} problems with the images of {total} pairs{where} (fix or remove them, "
                           f"then run again):\n  {shown}" + ("\n  ..." if len(problems) > 10 else ""))


def reference_groups(pairs: Sequence) -> list[list[int]]:
    """Indices of ``pairs`` grouped by reference image, references in sorted order, pairs in their order."""
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair.ref, []).append(i)
    return [groups[ref] for ref in sorted(groups)]


def reference_shares(pairs: Sequence, world: int) -> list[list[int]]:
    """The pair indices of each of ``world`` processes: whole references (each reference's features are
    computed by one process only), balanced by pair count (largest reference first to the least loaded
    process; the same on every process)."""
    shares: list[list[int]] = [[] for _ in range(world)]
    for group in sorted(reference_groups(pairs), key=len, reverse=True):
        min(shares, key=len).extend(group)
    return [sorted(share) for share in shares]
