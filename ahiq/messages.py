"""Shared wording of error messages."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def listed(items: list[str], limit: int = 12) -> str:
    """The first ``limit`` items, comma-separated, and how many there are in all when some are left out."""
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def last_line(text: str) -> str:
    """The last non-empty line of a library's multi-line message (where its gist usually is)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


def for_the_user(exc: BaseException) -> str:
    """The message of an expected error as the command line prints it. An error raised in a DataLoader
    worker arrives re-raised with the worker's whole traceback in its text ("Caught ImageError in
    DataLoader worker process 0. Original Traceback ..."): only the original message is kept."""
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        original = last_line(text)
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        return original[len(prefix):] if original.startswith(prefix) else original.split(": ", 1)[-1]
    return text


def check_folder(path: Path, what: str) -> None:
    """That the folder ``path`` exists or can be made, and a file can be written in it, or the one-line error
    naming it as ``what``; nothing is created: checked before the work whose results go there, not after it."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == path else f": {existing}"
        raise ValueError(f"{what} {path}{where} is a file; give a folder (it is created if missing)")
    try:  # where the folder would be made, or the folder itself
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".ahiq-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot write in {existing} ({exc.strerror or exc}); make it writable or "
                         f"choose another") from None


def create_folder(path: Path, what: str) -> None:
    """Create the folder ``path`` (and its parents) once check_folder has found it can be written."""
    check_folder(path, what)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot create the folder ({exc.strerror or exc})") from None
