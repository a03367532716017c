"""Shared wording of error messages."""
from __future__ import annotations

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


def create_folder(path: Path, what: str) -> None:
    """Create the folder ``path`` (and its parents), or raise the one-line error naming it as ``what``."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; give a folder (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot create the folder ({exc.strerror or exc})") from None
