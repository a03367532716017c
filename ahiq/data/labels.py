"""What the label readers (ahiq.data.readers) share: a labelled pair, a list of them, the image files of
folders looked up by name without regard to letter case, and the collection of every problem of a label file,
reported at once (missing files, unparsable lines, non-finite or duplicate entries).
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

from ahiq.data.images import IMAGE_EXTENSIONS
from ahiq.data.pairs import DatasetError, Pair, Pairs
from ahiq.messages import listed
from ahiq.registry.datasets import dataset as declared


class Folders:
    """The image files of one or more folders, looked up by name without regard to letter case."""

    def __init__(self, root: Path, folders: Iterable[str | os.PathLike], what: str, option: str):
        self.files: dict[str, Path] = {}
        self.description = ", ".join(str(root / f) for f in folders)
        absent = [str(root / f) for f in folders if not (root / f).is_dir()]
        if absent:
            raise DatasetError(f"{what} folder not found: {listed(absent, 5)}. Unpack the dataset as distributed "
                               f"or set the folder with the '{option}' option.")
        for folder in folders:
            for entry in os.scandir(root / folder):
                if entry.is_file():
                    self.files.setdefault(entry.name.lower(), Path(entry.path).resolve())

    def find(self, name: str) -> Path | None:
        return self.files.get(name.lower())

    def images(self) -> list[Path]:
        return sorted((p for p in self.files.values() if p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name)


class Labels:
    """Reads label files line by line and collects every problem, to report them all at once."""

    def __init__(self, path: Path):
        if not path.exists():
            raise DatasetError(f"label file {path} not found")
        self.path = path  # the label file, or the folder of label files
        self.errors: list[str] = []
        self.missing: list[str] = []
        self.seen: dict[str, str] = {}
        self.pairs: list[Pair] = []

    def lines(self, path: Path | None = None) -> Iterator[tuple[int, str]]:
        # Reads every line whole, the last one without a newline too (the official loader cut a character
        # off it), CRLF or LF, a UTF-8 byte-order mark ignored.
        path = path or self.path
        found = False
        with open(path, encoding="utf-8-sig", newline=None) as f:
            for number, line in enumerate(f, start=1):
                line = line.strip()
                if line:
                    found = True
                    yield number, line
        if not found:  # a per-reference file emptied by a failed copy would silently drop a reference
            self.errors.append(f"{path}: the file holds no labels (empty); restore it from the dataset")

    def score(self, text: str, where: str) -> float | None:
        """``where``: 'file:line' of the score, for the message."""
        try:
            value = float(text)
        except ValueError:
            self.errors.append(f"{where}: score '{text}' is not a number")
            return None
        if not math.isfinite(value):
            self.errors.append(f"{where}: score is {text}, not a finite number")
            return None
        return value

    def add(self, where: str, name: str, ref: Path | None, dist: Path | None, mos: float | None,
            ref_name: str, dist_where: str, distortion: str = "", mos_ci95: float = math.nan) -> None:
        if name.lower() in self.seen:
            self.errors.append(f"{where}: distorted image '{name}' is listed twice (first at {self.seen[name.lower()]})")
            return
        self.seen[name.lower()] = where
        if dist is None:
            self.missing.append(f"{name} (in {dist_where})")
        if ref is None:
            self.missing.append(f"reference {ref_name} of {name}")
        if mos is not None and ref is not None and dist is not None:
            self.pairs.append(Pair(str(ref), str(dist), mos, name, distortion, mos_ci95))

    def result(self, higher_is_better: bool, dataset: str) -> Pairs:
        problems = []
        if self.errors:
            problems.append(f"{len(self.errors)} problems in the labels: " + "; ".join(self.errors[:5])
                            + (" ..." if len(self.errors) > 5 else ""))
        if self.missing:
            problems.append(f"{len(self.missing)} listed images not found: {listed(self.missing, 5)}")
        if problems:
            raise DatasetError(f"{dataset} labels {self.path}: " + ". ".join(problems))
        if not self.pairs:
            raise DatasetError(f"label file {self.path} holds no labels (empty?)")
        return Pairs(self.pairs, higher_is_better, dataset)


def read_labels(dataset: str, root: str | os.PathLike, **options) -> Pairs:
    """The pairs of ``dataset`` (a name of ahiq.registry.datasets.DATASETS, in any case) unpacked at ``root``;
    ``options`` are the reader's keyword arguments (label file, folders, direction), defaulting to the
    distributed layout."""
    try:
        entry = declared(dataset, "dataset")
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    module, name = entry.reader.split(":")
    reader = getattr(importlib.import_module(module), name)
    signature = inspect.signature(reader).parameters
    params = [p for p in signature if p != "root"]
    unknown = [k for k in options if k not in params]
    if unknown:
        raise DatasetError(f"unknown option(s) {', '.join(unknown)} for dataset '{entry.name}'; it takes "
                           f"{', '.join(params)}")
    required = [p for p in params if signature[p].default is inspect.Parameter.empty and p not in options]
    if required:
        raise DatasetError(f"dataset '{entry.name}' needs {' and '.join(f'data.options.{p}' for p in required)} "
                           f"(for 'csv': the CSV file of ref,dist,mos rows, relative to data.root); see "
                           f"options/custom.yaml")
    root = Path(root).expanduser()
    if entry.name == "synthetic":  # generated on first use
        root.mkdir(parents=True, exist_ok=True)
    if not root.is_dir():
        raise DatasetError(f"{dataset} root folder {root} does not exist")
    pairs = reader(root.resolve(), **options)
    pairs.dataset = entry.name  # the declared name (a reader may serve several datasets): their taxonomy by it
    return pairs
