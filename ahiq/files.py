"""Files a crash or a second process must not spoil.

Atomic writes: a file is written under a temporary name of its own in the same folder, synced, and renamed
into place, so a reader never sees half of it and processes writing the same file at once do not mix.
Exclusive locks held for as long as a run lasts, so that a second run on the same experiment folder or
output file fails at once, naming the process that holds it. They are flock locks: the operating system
releases them when the process ends in any way (SIGKILL included), so a lock is never stale."""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Busy(ValueError):
    """Another process holds the lock."""


def hold(path: Path, what: str, advice: str):
    """Lock the file ``path`` (created if missing) for this process; ``what`` and ``advice`` complete the
    error when another process holds it. Returns the open lock file: the lock lasts until it is closed."""
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise Busy(f"{what} is in use by {holder}: wait for that run to end (or stop it), or {advice}") from None
        if _still_at(handle, path):
            break
        handle.close()  # its holder removed it between our open and our lock: lock the file now at path
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle


def release_and_remove(handle, path: Path) -> None:
    """Remove the lock file, then release it (in this order, so that no one locks a file on its way out)."""
    path.unlink(missing_ok=True)
    handle.close()


def _still_at(handle, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
