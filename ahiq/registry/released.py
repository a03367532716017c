"""The released AHIQ models, by name: what ``python -m ahiq score``, ``ahiq.Scorer``, the metric and
``test.checkpoint`` take instead of a file (where the files are found and fetched: ahiq.nn.zoo). The first is the
default everywhere a model is not named."""
from __future__ import annotations

from dataclasses import dataclass

from ahiq.registry import Choice, Registry
from ahiq.registry.variants import CNNS, VITS
from ahiq.registry.weights import WeightFile


@dataclass(frozen=True, kw_only=True)
class Released(Choice):
    """A released model (the paper's AHIQ variant): its file, verified by size and SHA-256, and the ViT's patch
    size; ``summary`` describes it."""
    file: WeightFile
    patch_size: int

    @property
    def backbones(self) -> tuple[str, str]:
        """The timm tags of the backbone weights the head was trained with."""
        return VITS[self.patch_size].tag, CNNS.default.tag


PIPAL_FILE = "AHIQ_vit_p8_epoch33-da3ea303.pth"
RELEASED: Registry[Released] = Registry("released model", [
    Released(
        name="pipal", patch_size=8,
        summary="ViT-B/8 + ResNet50, trained on PIPAL: the NTIRE 2022 perceptual IQA challenge winner (FR track)",
        file=WeightFile(
            PIPAL_FILE,
            (f"https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/{PIPAL_FILE}",
             f"https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/{PIPAL_FILE}",
             # the authors' Google Drive (file id from their download.sh); confirm=t skips the virus-scan page
             "https://drive.usercontent.google.com/download?id=1Nk-IpjnDNXbWacoh3T69wkSYhYYWip2W&export=download"
             "&confirm=t"),
            # from the Hugging Face LFS pointer (chaofengc/IQA-PyTorch-Weights); the name's suffix is its prefix
            sha256="da3ea303b365ef71f4bbe41eba56f0ab3371c697d9c959649904dc9dd0a08b85", size=326044337)),
])
