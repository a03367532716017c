"""The weight files AHIQ needs and where they are found (ahiq.nn.downloads fetches and verifies them).

The files: the released AHIQ models, by name (``pipal``), the timm backbone weights their heads were
trained with, and the weights of the learned baseline metrics (``lpips``, ``dists``). The rule that finds any of them (the only one; every message follows it):

1. A **weights folder**, when one is given (``weights=`` in Python, ``--weights`` on the command lines, the
   option ``model.weights``, or the environment variable ``AHIQ_WEIGHTS``, in that order): the files are
   looked for there and nowhere else, and the network is never used. ``python -m ahiq download --dir D``
   fills such a folder.
2. Otherwise the **cache**: torch's hub folder ``<torch.hub.get_dir()>/checkpoints`` (``TORCH_HOME`` moves
   it), where torch.hub, timm 0.5.4 (which the official code used) and ``python -m ahiq download`` put
   files; then ``<torch.hub.get_dir()>/pyiqa``, where pyiqa (0.1.13 and later) puts the released AHIQ file;
   for the backbones also Hugging Face's cache, where current timm puts them.
3. What is in neither is **downloaded** into the cache, unless ``HF_HUB_OFFLINE`` is set: each server is
   tried once, with a short timeout, and every file still missing is named in one error.

A file is found under its own name or under the name of the same weights' original release (the AugReg
``.npz`` of the ViTs, timm 0.5.4's ``resnet50_a1_0-14fe96d1.pth``).

This module and ahiq.nn.downloads import neither torch nor timm, so that ``python -m ahiq zoo`` and
``--help`` answer at once.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from ahiq.files import hub_dir
from ahiq.registry.baselines import BASELINES
from ahiq.registry.released import RELEASED, Released
from ahiq.registry.variants import CNNS, VITS
from ahiq.registry.weights import WeightFile, timm_weights

ENVIRONMENT = "AHIQ_WEIGHTS"

# The weight files the declarations name (ahiq.registry): every backbone's by timm tag (the ViTs' and the CNN
# branches'), and the learned baseline metrics' by metric.
BACKBONES = {variant.tag: timm_weights(variant.tag, variant.also_named) for variant in (*VITS.values(), *CNNS.values())}
METRIC_WEIGHTS = {name: baseline.weights for name, baseline in BASELINES.items() if baseline.weights}


def released(checkpoint) -> Released | None:
    """The released model ``checkpoint`` names, or None (a file path)."""
    return RELEASED.get(checkpoint) if isinstance(checkpoint, str) else None


def released_files(model: Released) -> list[WeightFile]:
    """A released model's file and its backbones' weights."""
    return [model.file, *(BACKBONES[tag] for tag in model.backbones)]


def cache_dir() -> Path:
    """Where downloads go: torch.hub's folder of checkpoints, ``torch.hub.get_dir()/checkpoints``."""
    return hub_dir() / "checkpoints"


def cache_dirs() -> list[Path]:
    """The cache's folders, in the order looked in: torch.hub's checkpoints, then pyiqa's
    (``torch.hub.get_dir()/pyiqa``, its DEFAULT_CACHE_DIR)."""
    return [cache_dir(), hub_dir() / "pyiqa"]


def weights_folder(weights: str | os.PathLike | None = None) -> Path | None:
    """The weights folder in force: the one given, else ``$AHIQ_WEIGHTS``, else None (the cache and the
    network)."""
    given = weights if weights not in (None, "") else os.environ.get(ENVIRONMENT) or None
    if given is None:
        return None
    folder = Path(given).expanduser()
    if not folder.is_dir():
        source = f"{ENVIRONMENT}={given}" if weights in (None, "") else f"weights folder {given}"
        raise FileNotFoundError(f"{source} is not a folder; create it with python -m ahiq download --dir {given} "
                                f"where there is internet")
    return folder


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def find(file: WeightFile, folder: Path | None) -> Path | None:
    """Where ``file`` is on this machine by the rule (a weights folder, or the caches); None if nowhere."""
    for directory in [folder] if folder is not None else cache_dirs():
        for name in file.names():
            if (directory / name).is_file():
                return directory / name
    if folder is None and file.hf_repo:
        return _in_hugging_face_cache(file.hf_repo)
    return None


def _in_hugging_face_cache(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def download_names(files: Iterable[WeightFile]) -> list[str]:
    """The ``python -m ahiq download`` arguments that fetch ``files``: zoo names (a model brings its
    backbones) and the backbone tags no named model brings."""
    files = list(files)
    names = [name for name, model in RELEASED.items() if model.file in files]
    names += [name for name, weights in METRIC_WEIGHTS.items() if weights[-1] in files]
    brought = {file for name in names for file in files_for([name])}
    return names + [tag for tag, file in BACKBONES.items() if file in files and file not in brought]


def files_for(names: Sequence[str]) -> list[WeightFile]:
    """The files of zoo names (each model and its backbones), backbone tags and baseline metrics (lpips, dists),
    without repeats."""
    files: list[WeightFile] = []
    for name in names:
        if name in BACKBONES:
            wanted = [BACKBONES[name]]
        elif name in RELEASED:
            wanted = released_files(RELEASED[name])
        elif name in METRIC_WEIGHTS:
            wanted = list(METRIC_WEIGHTS[name])
        else:
            raise ValueError(f"no released model, backbone or metric named {name!r}; known: "
                             f"{', '.join([*RELEASED, *BACKBONES, *METRIC_WEIGHTS])}")
        files += [file for file in wanted if file not in files]
    return files
