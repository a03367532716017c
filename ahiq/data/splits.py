"""Reference-disjoint random splits, written to and read from JSON files."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ahiq.data.pairs import DatasetError, Pair
from ahiq.files import json_bytes, write_atomically

PART_NAMES = ("train", "val", "test")


def split_by_reference(pairs: Sequence[Pair], ratios: Sequence[float] = (0.6, 0.2, 0.2),
                       seed: int = 0) -> tuple[list[int], ...]:
    """Indices of ``pairs`` in len(ratios) parts such that no reference image is in two parts.

    The references (sorted, then shuffled by ``seed``) are dealt out in proportion to ``ratios``: the split
    is by references, as in the paper's 6:2:2 protocol, and split n of K is simply ``seed=n``.
    """
    ratios = np.asarray(ratios, dtype=float)
    if ratios.ndim != 1 or len(ratios) < 2 or (ratios < 0).any() or ratios.sum() <= 0:
        raise ValueError(f"ratios must be two or more non-negative numbers, got {list(ratios)}")
    refs = sorted({p.ref for p in pairs})
    order = np.random.default_rng(seed).permutation(len(refs))
    bounds = np.round(np.cumsum(ratios) / ratios.sum() * len(refs)).astype(int)
    part_of = {}
    for part, (start, stop) in enumerate(zip(np.r_[0, bounds[:-1]], bounds)):
        for i in order[start:stop]:
            part_of[refs[i]] = part
    parts: tuple[list[int], ...] = tuple([] for _ in ratios)
    for index, pair in enumerate(pairs):
        parts[part_of[pair.ref]].append(index)
    return parts


def save_split(path: str | os.PathLike, pairs: Sequence[Pair], parts: Sequence[Sequence[int]], **info) -> None:
    """Write a split as the distorted-image names of each part (portable across machines and folders)."""
    names = PART_NAMES if len(parts) == 3 else tuple(f"part{i}" for i in range(len(parts)))
    content = {**info, "parts": {name: [pairs[i].name for i in part] for name, part in zip(names, parts)}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(Path(path), json_bytes(content))


def load_split(path: str | os.PathLike, pairs: Sequence[Pair]) -> tuple[list[int], ...]:
    """The parts of a split file written by save_split, as indices into ``pairs``."""
    try:
        content = json.loads(Path(path).read_text())
        parts = content["parts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"split file {path} cannot be read ({exc}); write one with save_split") from None
    index = {p.name: i for i, p in enumerate(pairs)}
    unknown = [n for part in parts.values() for n in part if n not in index]
    if unknown:
        raise DatasetError(f"split file {path} names {len(unknown)} images that the dataset does not have: "
                           f"{', '.join(unknown[:5])}")
    return tuple([index[n] for n in part] for part in parts.values())
