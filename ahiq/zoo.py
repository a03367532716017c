"""The weight files AHIQ needs, where they are found, and how they are fetched and verified.

The files: the released AHIQ models, by name (``pipal``), and the timm backbone weights their heads were
trained with. The rule that finds any of them (the only one; every message follows it):

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
``.npz`` of the ViTs, timm 0.5.4's ``resnet50_a1_0-14fe96d1.pth``). A released AHIQ file is checked
against its size every time it is used and against its full SHA-256 once per file identity (size,
modification time, inode: remembered in ``.<name>.sha256`` beside it), and on every download.

This module imports neither torch nor timm, so that ``python -m ahiq zoo`` and ``--help`` answer at once.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .files import waiting_for_lock
from .messages import create_folder

# The backbone weights the released heads were trained with: timm 0.5.4's defaults, which current timm names
# with these tags (its untagged `vit_base_patch8_224` now means augreg2 weights, which are different).
VIT_TAGS = {8: "vit_base_patch8_224.augreg_in21k_ft_in1k", 16: "vit_base_patch16_224.augreg_in21k_ft_in1k"}
RESNET_TAG = "resnet50.a1_in1k"

ENVIRONMENT = "AHIQ_WEIGHTS"
DOWNLOAD_LOCK = ".ahiq-download.lock"  # held in the folder downloaded into, while a process downloads
TIMEOUT = 10.0  # seconds without an answer before a server counts as unreachable


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


class DownloadError(RuntimeError):
    """Weight files that are neither on this machine nor obtainable from the network."""


class VerificationError(RuntimeError):
    """A file under a released name whose bytes are not the released file's."""


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


def locate(files: Sequence[WeightFile], weights: str | os.PathLike | None = None, progress: bool = True) -> list[Path]:
    """The local path of each of ``files`` by the rule, downloading into the cache what is missing (no
    weights folder, not offline); released files verified. Every file found nowhere in one DownloadError."""
    folder = weights_folder(weights)
    found = {file: find(file, folder) for file in files}
    if folder is None:
        return _complete(files, found, cache_dir(), _looked_in(cache_dirs()), progress)
    return _complete(files, found, None, f"in the weights folder {folder} ({ENVIRONMENT} or --weights: nothing is "
                                         f"downloaded with one)", progress, put_in=folder)


def download(names: Sequence[str], folder: str | os.PathLike | None = None, progress: bool = True) -> list[Path]:
    """Make the files of ``names`` (files_for) local in ``folder`` (created; by default the weights folder
    in force, else the cache): files already on this machine are copied there, the rest downloaded."""
    files = files_for(names)
    target = Path(folder).expanduser() if folder is not None else weights_folder() or cache_dir()
    created = not target.exists()
    create_folder(target, "weights folder")
    try:
        return _download_into(files, target, progress)
    except DownloadError:
        if created and not any(target.iterdir()):  # a failed download leaves no empty folder behind
            target.rmdir()
        raise


def _download_into(files: list[WeightFile], target: Path, progress: bool) -> list[Path]:
    found = {file: find(file, target) for file in files}
    for file in files:
        source = None if found[file] else find(file, None)
        if source is not None and target == cache_dir():
            found[file] = source  # pyiqa's folder and Hugging Face's cache are part of the cache
        elif source is not None:
            found[file] = _copy(source, target / (source.name if source.name in file.names() else file.name))
    places = cache_dirs() if target == cache_dir() else [target, *cache_dirs()]
    return _complete(files, found, target, _looked_in(places), progress, put_in=target)


def _looked_in(folders: list[Path]) -> str:
    return f"in {', '.join(map(str, folders))} and Hugging Face's cache"


def _complete(files: Sequence[WeightFile], found: dict, into: Path | None, looked: str, progress: bool,
              put_in: Path | None = None) -> list[Path]:
    """Verify the released files ``found``, download the others into ``into`` (None: no download; downloads
    are verified as they arrive), and return every path; or one DownloadError naming every file still
    missing and where it must go (``put_in``, by default ``into``)."""
    for file in files:  # a wrong file is reported first: what it says to do also fetches what is missing
        if found[file] is not None:
            verify(file, found[file])
    failures: list[str] = []
    missing = [file for file in files if found[file] is None]
    if missing and into is not None and not offline():
        create_folder(into, "weights folder")
        # One process per machine downloads (torchrun starts one per GPU); the others wait, then find its files.
        with waiting_for_lock(into / DOWNLOAD_LOCK, f"waiting for another process's download into {into}"):
            arrived = {file: path for file in missing if (path := find(file, into)) is not None}
            for file, path in arrived.items():
                verify(file, path)
            found.update(arrived)
            missing = [file for file in missing if file not in arrived]
            found.update(fetch(missing, into, failures, progress))
        missing = [file for file in files if found[file] is None]
    if missing:
        why = ("" if into is None else "; not downloaded: HF_HUB_OFFLINE is set" if offline()
               else f"; the download failed: {'; '.join(failures)}")
        command = f"python -m ahiq download --dir D {' '.join(download_names(missing))}"
        raise DownloadError(f"missing weight files: {', '.join(f.described() for f in missing)}; looked {looked}{why}. "
                            f"Where there is internet run {command}, then copy D here and set {ENVIRONMENT}=D (or "
                            f"--weights D), or put its files in {put_in or into}")
    return [found[file] for file in files]


def download_names(files: Iterable[WeightFile]) -> list[str]:
    """The ``python -m ahiq download`` arguments that fetch ``files``: zoo names (a model brings its
    backbones) and the backbone tags no named model brings."""
    files = list(files)
    names = [name for name, model in ZOO.items() if model.file in files]
    brought = {file for name in names for file in ZOO[name].files()}
    return names + [tag for tag, file in BACKBONES.items() if file in files and file not in brought]


def files_for(names: Sequence[str]) -> list[WeightFile]:
    """The files of zoo names (each model and its backbones) and backbone tags, without repeats."""
    files: list[WeightFile] = []
    for name in names:
        if name in BACKBONES:
            wanted = [BACKBONES[name]]
        elif name in ZOO:
            wanted = ZOO[name].files()
        else:
            raise ValueError(f"no released model or backbone named {name!r}; known: {', '.join([*ZOO, *BACKBONES])}")
        files += [file for file in wanted if file not in files]
    return files


def _copy(source: Path, path: Path) -> Path:
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        shutil.copyfile(source, part)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


# ---- verification ----------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _memo(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


def verify(file: WeightFile, path: Path) -> None:
    """Raise VerificationError unless ``path`` holds the released bytes of ``file`` (files without a digest
    pass). The size every time; the digest when this file identity has not been verified before."""
    if file.sha256 is None:
        return
    identity = _identity(path)
    if identity["size"] == file.size:
        try:
            if json.loads(_memo(path).read_text()) == {**identity, "sha256": file.sha256}:
                return
        except (OSError, ValueError):
            pass
        actual = sha256_of(path)
        if actual == file.sha256:
            _remember(path, identity, actual)
            return
    else:
        actual = sha256_of(path)
    raise VerificationError(
        f"{path} is not the released {file.name}: SHA-256 {actual} ({identity['size']} bytes), expected "
        f"{file.sha256} ({file.size} bytes); nothing was loaded. Delete it, then run python -m ahiq download "
        f"{' '.join(download_names([file]))} (with --dir for a weights folder)")


def _remember(path: Path, identity: dict, digest: str) -> None:
    """Write the memo of a verified file; a read-only folder just means verifying again next time."""
    try:
        _memo(path).write_text(json.dumps({**identity, "sha256": digest}))
    except OSError:
        pass


# ---- downloads -------------------------------------------------------------------------------------------

def fetch(files: Sequence[WeightFile], folder: Path, failures: list[str], progress: bool = True) -> dict:
    """Download each of ``files`` into ``folder`` from its first mirror that gives it whole (and verified).
    A server that cannot be reached is not asked again; ``failures`` gets one entry per failed attempt.
    Returns {file: path} of the files obtained."""
    folder.mkdir(parents=True, exist_ok=True)
    unreachable: set[str] = set()
    obtained = {}
    for file in files:
        for url in file.mirrors():
            host = urllib.parse.urlsplit(url).netloc
            if host in unreachable:
                continue
            try:
                obtained[file] = _download(url, folder / file.name, file, progress)
                break
            except _Unreachable as exc:
                unreachable.add(host)
                failures.append(f"{host} ({exc})")
            except _Failed as exc:
                failures.append(f"{url} ({exc})")
    return obtained


class _Failed(Exception):
    """One mirror that did not give the file."""


class _Unreachable(_Failed):
    """A server that could not be reached at all (no route, no name, no answer in time)."""


def _download(url: str, path: Path, file: WeightFile, progress: bool) -> Path:
    """``url`` to ``path`` through a temporary file in the same folder, moved into place only when whole
    and verified."""
    from tqdm import tqdm

    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "ahiq"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response, open(part, "wb") as out:
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
            size = out.tell()
        actual = digest.hexdigest()
        if file.sha256 is not None and (actual, size) != (file.sha256, file.size):
            raise _Failed(f"SHA-256 {actual} ({size} bytes), expected {file.sha256} ({file.size} bytes): not the "
                          f"released file")
        os.replace(part, path)
        if file.sha256 is not None:
            _remember(path, _identity(path), actual)
        return path
    except urllib.error.HTTPError as exc:
        raise _Failed(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _Unreachable(str(getattr(exc.reason, "strerror", None) or exc.reason)) from None
    except (socket.timeout, TimeoutError, ConnectionError) as exc:
        raise _Unreachable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
    except (http.client.HTTPException, OSError) as exc:
        raise _Failed(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
    finally:
        part.unlink(missing_ok=True)
