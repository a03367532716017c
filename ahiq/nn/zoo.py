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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

# The backbone weights the released heads were trained with: timm 0.5.4's defaults, which current timm names
# with these tags (its untagged `vit_base_patch8_224` now means augreg2 weights, which are different).
VIT_TAGS = {8: "vit_base_patch8_224.augreg_in21k_ft_in1k", 16: "vit_base_patch16_224.augreg_in21k_ft_in1k"}
RESNET_TAG = "resnet50.a1_in1k"

ENVIRONMENT = "AHIQ_WEIGHTS"


@dataclass(frozen=True)
class WeightFile:
    """One file AHIQ may need."""

    name: str                      # its name in a weights folder or the cache
    urls: tuple[str, ...] = ()     # mirrors, tried in order
    also_named: tuple[str, ...] = ()  # the same weights under their original release's name
    sha256: str | None = None      # full digest and size, verified (the released AHIQ files)
    size: int | None = None
    hf_repo: str | None = None     # a timm repository on the Hugging Face hub: <repo>/model.safetensors

    def mirrors(self) -> list[str]:
        hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return [*self.urls, *([f"{hub}/{self.hf_repo}/resolve/main/model.safetensors"] if self.hf_repo else [])]

    def names(self) -> tuple[str, ...]:
        return (self.name, *self.also_named)

    def described(self) -> str:
        return self.name + (f" (or {' or '.join(self.also_named)})" if self.also_named else "")


def _augreg(patch: int) -> str:
    return (f"B_{patch}-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-"
            f"res_224.npz")


BACKBONES = {
    VIT_TAGS[8]: WeightFile(f"{VIT_TAGS[8]}.safetensors", also_named=(_augreg(8),), hf_repo=f"timm/{VIT_TAGS[8]}"),
    VIT_TAGS[16]: WeightFile(f"{VIT_TAGS[16]}.safetensors", also_named=(_augreg(16),), hf_repo=f"timm/{VIT_TAGS[16]}"),
    RESNET_TAG: WeightFile(f"{RESNET_TAG}.safetensors", also_named=("resnet50_a1_0-14fe96d1.pth",),
                           hf_repo=f"timm/{RESNET_TAG}"),
}
# The other CNN branches of the paper's Table 7 (ahiq.nn.backbones.CNN_BACKBONES): timm 0.5.4's default weights,
# under the name timm 0.5.4 saved them where current timm still records it.
_OTHER_CNNS = {"resnet101.a1h_in1k": ("resnet101_a1h-36d3f2aa.pth",), "resnet152.a1h_in1k": ("resnet152_a1h-dc400468.pth",),
               "hrnet_w18.ms_in1k": (), "inception_resnet_v2.tf_in1k": ()}
BACKBONES.update({tag: WeightFile(f"{tag}.safetensors", also_named=old, hf_repo=f"timm/{tag}")
                  for tag, old in _OTHER_CNNS.items()})

# The weights of the baseline metrics test.py scores beside AHIQ (ahiq.scoring.baselines), under the names piq and
# torchvision download them by: torchvision's ImageNet VGG16 and piq's learned layer weights.
_VGG16 = WeightFile("vgg16-397923af.pth", ("https://download.pytorch.org/models/vgg16-397923af.pth",))
METRIC_WEIGHTS = {
    "lpips": (_VGG16, WeightFile("lpips_weights.pt", ("https://github.com/photosynthesis-team/photosynthesis.metrics/"
                                                      "releases/download/v0.4.0/lpips_weights.pt",))),
    "dists": (_VGG16, WeightFile("dists_weights.pt", ("https://github.com/photosynthesis-team/piq/releases/download/"
                                                      "v0.4.1/dists_weights.pt",))),
}


@dataclass(frozen=True)
class ZooModel:
    file: WeightFile
    patch_size: int
    description: str

    @property
    def backbones(self) -> tuple[str, str]:
        """The timm tags of the backbone weights the head was trained with."""
        return VIT_TAGS[self.patch_size], RESNET_TAG

    def files(self) -> list[WeightFile]:
        return [self.file, *(BACKBONES[tag] for tag in self.backbones)]


PIPAL_FILE = "AHIQ_vit_p8_epoch33-da3ea303.pth"
ZOO = {
    "pipal": ZooModel(
        WeightFile(
            PIPAL_FILE,
            (f"https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/{PIPAL_FILE}",
             f"https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/{PIPAL_FILE}",
             # the authors' Google Drive (file id from their download.sh); confirm=t skips the virus-scan page
             "https://drive.usercontent.google.com/download?id=1Nk-IpjnDNXbWacoh3T69wkSYhYYWip2W&export=download"
             "&confirm=t"),
            # from the Hugging Face LFS pointer (chaofengc/IQA-PyTorch-Weights); the name's suffix is its prefix
            sha256="da3ea303b365ef71f4bbe41eba56f0ab3371c697d9c959649904dc9dd0a08b85", size=326044337),
        8, "ViT-B/8 + ResNet50, trained on PIPAL: the NTIRE 2022 perceptual IQA challenge winner (FR track)"),
}


def is_zoo_name(checkpoint) -> bool:
    return isinstance(checkpoint, str) and checkpoint in ZOO


def zoo_model(name: str) -> ZooModel:
    if name not in ZOO:
        raise ValueError(f"no released model named {name!r}; the zoo has: {', '.join(ZOO)} (or give a file path)")
    return ZOO[name]


def hub_dir() -> Path:
    """torch.hub's folder, ``torch.hub.get_dir()``, found as torch finds it."""
    if "torch" in sys.modules:  # honours torch.hub.set_dir
        return Path(sys.modules["torch"].hub.get_dir())
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(xdg, "torch")))) / "hub"


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
    names = [name for name, model in ZOO.items() if model.file in files]
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
        elif name in ZOO:
            wanted = ZOO[name].files()
        elif name in METRIC_WEIGHTS:
            wanted = list(METRIC_WEIGHTS[name])
        else:
            raise ValueError(f"no released model, backbone or metric named {name!r}; known: "
                             f"{', '.join([*ZOO, *BACKBONES, *METRIC_WEIGHTS])}")
        files += [file for file in wanted if file not in files]
    return files
