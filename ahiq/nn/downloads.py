"""Making the zoo's files local by its one rule (ahiq.nn.zoo): found, copied or downloaded, and verified.

A released file is checked against its size every time it is used and against its full SHA-256 once per
file identity (size, modification time, inode: remembered in ``.<name>.sha256`` beside it), and on every
download. Downloads go through a temporary file moved into place only when whole and verified; one process
per machine downloads while the others wait for it.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

from ahiq.files import json_bytes, waiting_for_lock, write_atomically
from ahiq.messages import create_folder
from ahiq.nn.zoo import (ENVIRONMENT, WeightFile, cache_dir, cache_dirs, download_names, files_for, find, offline,
                         weights_folder)

DOWNLOAD_LOCK = ".ahiq-download.lock"  # held in the folder downloaded into, while a process downloads
TIMEOUT = 10.0  # seconds without an answer before a server counts as unreachable


class DownloadError(RuntimeError):
    """Weight files that are neither on this machine nor obtainable from the network."""


class VerificationError(RuntimeError):
    """A file under a released name whose bytes are not the released file's."""


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
        write_atomically(_memo(path), json_bytes({**identity, "sha256": digest}))
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
