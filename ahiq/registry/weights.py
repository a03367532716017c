"""``WeightFile``: one file a model or a metric may need, as the declarations name it (where it is found and
fetched: ahiq.nn.zoo and ahiq.nn.downloads)."""
from __future__ import annotations

import os
from dataclasses import dataclass


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


def timm_weights(tag: str, also_named: tuple[str, ...] = ()) -> WeightFile:
    """The weights of the timm model ``tag`` (``<tag>.safetensors``, from its Hugging Face repository), also found
    under the names of its original release."""
    return WeightFile(f"{tag}.safetensors", also_named=also_named, hf_repo=f"timm/{tag}")
