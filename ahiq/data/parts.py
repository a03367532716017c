"""The train, validation and test parts of an experiment, read from its ``data`` options, with their
training-scale targets."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ahiq.data.datasets import TargetScale
from ahiq.data.labels import read_labels
from ahiq.data.pairs import DatasetError, Pairs
from ahiq.data.splits import load_split, save_split, split_by_reference


@dataclass
class Part:
    """Pairs of one role (train, val, test) with their training-scale targets (None when unlabelled)."""
    pairs: Pairs
    targets: np.ndarray | None


def read_source(source: dict) -> Pairs:
    """The pairs of one ``{dataset, root, options}`` source."""
    if not source.get("dataset") or not source.get("root"):
        raise DatasetError(f"a data source needs 'dataset' and 'root', got {source}")
    return read_labels(source["dataset"], source["root"], **(source.get("options") or {}))


def subset(pairs: Pairs, scale: TargetScale | None, indices: Sequence[int] | None = None) -> Part:
    """The pairs at ``indices`` (all when None) as a Part, with targets on ``scale`` (none when unlabelled)."""
    if indices is not None:
        pairs = Pairs([pairs[i] for i in indices], pairs.higher_is_better, pairs.dataset)
    targets = scale.to_target([p.mos for p in pairs]) if scale is not None and pairs.labelled else None
    return Part(pairs, targets)


def whole(pairs: Pairs) -> Part:
    """All of a source, on its own scale when labelled."""
    return subset(pairs, TargetScale.fit(pairs) if pairs.labelled else None)


class Parts(dict):
    """role -> Part, and the split drawn for them (if one was), which ``save_split`` writes: a run writes it
    only once everything is checked."""
    drawn: tuple[Pairs, tuple, dict] | None = None

    def save_split(self, path: Path) -> None:
        if self.drawn is not None:
            pairs, indices, info = self.drawn
            save_split(path, pairs, indices, **info)


def load_parts(data: dict, roles: Sequence[str] = ("train", "val", "test")) -> Parts:
    """train/val/test parts. Each labelled source is normalised over all of its own pairs, before any split
    (``data.targets: dataset``), or each part over its own pairs as the official code normalises each of
    its list files (``data.targets: part``).

    Without ``data.val`` the main source is split by reference (``data.split``: drawn, and kept for
    ``Parts.save_split``, or read from ``data.split.file``); with it, the main source is all training data.
    ``data.test`` (if set) replaces the test part; with ``data.val`` and no ``data.test``, test is val.
    When only the test part is asked for and ``data.test`` is set, the main source is not read at all (an
    NTIRE test set can be scored without the training data).
    """
    parts = Parts()
    if data.get("test") and set(roles) == {"test"}:
        parts["test"] = whole(read_source(data["test"]))
        return parts
    main = read_source(data)
    scale = TargetScale.fit(main)
    if data.get("val"):
        parts["train"] = subset(main, scale)
        parts["val"] = whole(read_source(data["val"]))
        parts["test"] = parts["val"]
    else:
        split = data["split"]
        if split.get("file"):
            indices = load_split(split["file"], main)
        else:
            indices = split_by_reference(main, split["ratios"], split["seed"])
            parts.drawn = (main, indices, {"dataset": main.dataset, "seed": split["seed"], "ratios": split["ratios"]})
        if len(indices) not in (2, 3):
            raise DatasetError(f"data.split must give 2 parts (train, test) or 3 (train, val, test), got {len(indices)}")
        for role, part_indices in zip(("train", "val", "test"), (indices[0], indices[1], indices[-1])):
            own = data.get("targets") == "part" and part_indices
            parts[role] = whole(subset(main, None, part_indices).pairs) if own else subset(main, scale, part_indices)
    if data.get("test"):
        parts["test"] = whole(read_source(data["test"]))
    return parts
