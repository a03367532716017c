"""The one list of datasets: name -> label reader, and ``read_labels``, which picks the reader. The readers
(readers.py, synthetic.py) do not import this module."""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Callable

from ahiq.data.labels import DatasetError, Pairs
from ahiq.data.readers import (read_csiq, read_custom_csv, read_kadid10k, read_live, read_pipal, read_tid2008,
                               read_tid2013)
from ahiq.data.synthetic import read_synthetic

READERS: dict[str, Callable[..., Pairs]] = {
    "pipal": read_pipal, "live": read_live, "csiq": read_csiq, "tid2013": read_tid2013, "tid2008": read_tid2008,
    "kadid10k": read_kadid10k, "csv": read_custom_csv, "synthetic": read_synthetic,
}


def read_labels(dataset: str, root: str | os.PathLike, **options) -> Pairs:
    """The pairs of ``dataset`` (one of READERS) unpacked at ``root``; ``options`` are the reader's keyword
    arguments (label file, folders, direction), defaulting to the distributed layout."""
    key = dataset.lower().replace("-", "").replace("_", "")
    if key not in READERS:
        raise DatasetError(f"unknown dataset '{dataset}'; known: {', '.join(READERS)}")
    signature = inspect.signature(READERS[key]).parameters
    params = [p for p in signature if p != "root"]
    unknown = [k for k in options if k not in params]
    if unknown:
        raise DatasetError(f"unknown option(s) {', '.join(unknown)} for dataset '{key}'; it takes {', '.join(params)}")
    required = [p for p in params if signature[p].default is inspect.Parameter.empty and p not in options]
    if required:
        raise DatasetError(f"dataset '{key}' needs {' and '.join(f'data.options.{p}' for p in required)} (for "
                           f"'csv': the CSV file of ref,dist,mos rows, relative to data.root); see options/custom.yaml")
    root = Path(root).expanduser()
    if key == "synthetic":  # generated on first use
        root.mkdir(parents=True, exist_ok=True)
    if not root.is_dir():
        raise DatasetError(f"{dataset} root folder {root} does not exist")
    return READERS[key](root.resolve(), **options)
