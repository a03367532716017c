"""Released AHIQ models by name: verified downloads into torch.hub's cache.

A name (``pipal``) works wherever a checkpoint path does. The file is looked up in
``torch.hub.get_dir()/checkpoints/`` (``TORCH_HOME`` moves it) and, when absent, downloaded from its mirrors
in order; the SHA-256 prefix in its name (torch.hub's convention) is verified before the file is moved
into the cache, so an interrupted or corrupt download never lands there. A path given instead of a name is
loaded as it is, without a hash check.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import RESNET_TAG, VIT_TAGS


@dataclass(frozen=True)
class ZooModel:
    file: str  # the released file name, with its SHA-256 prefix: name-<hex>.pth
    urls: tuple[str, ...]  # mirrors, tried in order
    patch_size: int
    description: str

    @property
    def sha256(self) -> str:
        return re.search(r"-([0-9a-f]{6,})\.", self.file).group(1)

    @property
    def backbones(self) -> tuple[str, str]:
        """The timm tags of the backbone weights the head was trained with."""
        return VIT_TAGS[self.patch_size], RESNET_TAG


PIPAL_FILE = "AHIQ_vit_p8_epoch33-da3ea303.pth"
ZOO = {
    "pipal": ZooModel(
        PIPAL_FILE,
        (f"https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/{PIPAL_FILE}",
         f"https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/{PIPAL_FILE}",
         # the authors' Google Drive (file id from their download.sh); confirm=t skips the virus-scan page
         "https://drive.usercontent.google.com/download?id=1Nk-IpjnDNXbWacoh3T69wkSYhYYWip2W&export=download&confirm=t"),
        8, "ViT-B/8 + ResNet50, trained on PIPAL: the NTIRE 2022 perceptual IQA challenge winner (FR track)"),
}


class DownloadError(RuntimeError):
    """A released model that could not be fetched or verified."""


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_path(name: str) -> Path:
    """Where the model ``name`` is (or would be) in the cache."""
    return cache_dir() / ZOO[name].file


def is_zoo_name(checkpoint) -> bool:
    return isinstance(checkpoint, str) and checkpoint in ZOO


def resolve(checkpoint, patch_size: int) -> tuple[Path, int]:
    """(file, patch size) for a checkpoint argument: a zoo name gives its cached file (fetched if needed)
    and its architecture; a path is taken as it is, with the patch size given."""
    if is_zoo_name(checkpoint):
        return fetch(checkpoint), ZOO[checkpoint].patch_size
    return Path(checkpoint), patch_size


def fetch(name: str, progress: bool = True) -> Path:
    """The cached file of the model ``name``, downloaded and verified first if it is not there."""
    if name not in ZOO:
        raise ValueError(f"no released model named {name!r}; the zoo has: {', '.join(ZOO)} (or give a file path)")
    model, path = ZOO[name], cached_path(name)
    if path.is_file():  # no network at all; only verified downloads (or a file put there by hand) are here
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in model.urls:
        try:
            _download(url, path, model.sha256, progress)
            return path
        except _Failed as exc:
            failures.append(f"{url} ({exc})")
    raise DownloadError(f"could not download {model.file}: tried {'; '.join(failures)}. Put the file at {path} "
                        f"(for example by running python -m ahiq download {name} on a machine with internet and "
                        f"copying it), or give its path instead of '{name}'")


class _Failed(Exception):
    """One mirror that did not give the file."""


def _download(url: str, path: Path, sha256: str, progress: bool) -> None:
    """``url`` to ``path`` through a temporary file in the same folder, moved into place only when whole
    and verified."""
    from tqdm import tqdm

    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "ahiq"})
        with urllib.request.urlopen(request, timeout=60) as response, open(part, "wb") as out:
            if "text/html" in response.headers.get("Content-Type", ""):
                raise _Failed("a web page, not the file")
            total = int(response.headers.get("Content-Length") or 0) or None
            digest = hashlib.sha256()
            with tqdm(total=total, desc=path.name, unit="B", unit_scale=True, disable=None if progress else True,
                      dynamic_ncols=True) as bar:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            if total is not None and out.tell() != total:
                raise _Failed(f"the connection closed after {out.tell()} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if not actual.startswith(sha256):
            raise _Failed(f"SHA-256 {actual}, expected {sha256}...: not the released file")
        os.replace(part, path)
    except urllib.error.HTTPError as exc:
        raise _Failed(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _Failed(str(exc.reason)) from None
    except (http.client.HTTPException, OSError) as exc:
        raise _Failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
    finally:
        part.unlink(missing_ok=True)
