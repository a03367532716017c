"""Files a crash or a second process must not spoil.

Atomic writes: a file is written under a temporary name of its own in the same folder, synced, and renamed
into place (the rename synced too where the system allows), so a reader never sees half of it and
processes writing the same file at once do not mix.

Locks held by a process: exclusive, taken at once or refused (``take_lock``: a second run on the same
experiment folder or output file fails at once, naming the process that holds it), or waited for
(``waiting_for_lock``: one download per machine while the others wait). They are the operating system's
locks (flock on POSIX, a byte-range lock on Windows): released when the process ends in any way (SIGKILL
included), so a lock is never stale.

A write that fails (a full disk, a folder that turned read-only) is one ``WriteError`` naming the file, with
the file it would have replaced as it was and no temporary file left. Every JSON file is written strict
(``json_bytes``: an undefined number is null, never NaN). And where torch.hub keeps files (``hub_dir``), found
without loading torch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator

try:
    import fcntl  # POSIX
except ImportError:
    fcntl = None
try:
    import msvcrt  # Windows
except ImportError:
    msvcrt = None

TEMPORARY_PATTERN = ".*.tmp"  # what atomic_file writes before the rename; a killed write leaves one behind
_LOCKED_BYTE = 1 << 30  # Windows locks a byte range; far past the holder's line, which stays readable


def hub_dir() -> Path:
    """torch.hub's folder, ``torch.hub.get_dir()``, found as torch finds it, without loading torch: where weight files
    are cached (ahiq.nn.zoo) and what a CPU measured is remembered (ahiq.runtime.device)."""
    if "torch" in sys.modules:  # honours torch.hub.set_dir
        return Path(sys.modules["torch"].hub.get_dir())
    xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(xdg, "torch")))) / "hub"


def _umask() -> int:
    mask = os.umask(0)  # read by setting it: once, at import, before any thread writes files
    os.umask(mask)
    return mask


UMASK = _umask()


class WriteError(OSError):
    """A file that could not be written: the message names it; the file it would have replaced is as it was,
    and no temporary file is left."""


def _write_error(path: Path, exc: OSError) -> WriteError:
    if isinstance(exc, WriteError):
        return exc
    return WriteError(exc.errno, f"cannot write {path} ({exc.strerror or exc}): the file there, if any, is as it "
                                 f"was; free space or make the folder writable, then run the same command again")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: it replaces ``path`` whole when the block ends, or not at
    all when the block raises (the temporary file is removed). An error of the file system is a WriteError."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        # mkstemp makes the file private (0600); the file it becomes gets what open() would give it
        os.chmod(tmp, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    with atomic_file(path) as f:
        f.write(data)


def json_bytes(value) -> bytes:
    """``value`` as strict JSON, indented, with a final newline: a number that is not finite (an undefined
    statistic) is null, so that every JSON reader takes the file; numpy's numbers as Python's."""
    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:  # a numpy scalar
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v
    return (json.dumps(plain(value), indent=1, allow_nan=False) + "\n").encode()


def _sync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); where a folder cannot be opened (Windows), the rename is still atomic."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Busy(ValueError):
    """Another process holds the lock."""


def _try_lock(handle, blocking: bool) -> bool:
    """Lock the open file ``handle`` for this process; False when another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            return True
        except OSError:
            return False
    if msvcrt is not None:
        while True:
            handle.seek(_LOCKED_BYTE)
            try:
                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not blocking:
                    return False
                time.sleep(0.2)
    raise OSError("locking a file needs fcntl (POSIX) or msvcrt (Windows), and this Python has neither")


def _open_locked(path: Path, blocking: bool):
    """The lock file ``path`` (created if missing), open and locked; None when another process holds it."""
    while True:
        handle = open(path, "a+")
        if not _try_lock(handle, blocking):
            handle.close()
            return None
        if _still_at(handle, path):
            return handle
        handle.close()  # its holder removed it between our open and our lock: lock the file now at path


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


def _sign(handle) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()


def take_lock(path: Path, what: str, advice: str):
    """Lock the file ``path`` for this process, or raise Busy at once naming the process that holds it;
    ``what`` and ``advice`` complete that error. Returns the open lock file: the lock lasts until it is
    closed (release_and_remove)."""
    handle = _open_locked(path, blocking=False)
    if handle is None:
        raise Busy(f"{what} is in use by {_holder(path)}: wait for that run to end (or stop it), or {advice}")
    _sign(handle)
    return handle


@contextlib.contextmanager
def waiting_for_lock(path: Path, waiting: str) -> Iterator[None]:
    """Hold the lock file ``path`` for the block, waiting while another process holds it (``waiting`` is
    printed once, to standard error, if it must wait); the file is removed at the end."""
    handle = _open_locked(path, blocking=False)
    if handle is None:
        print(f"{waiting} ({_holder(path)} holds {path})", file=sys.stderr, flush=True)
        handle = _open_locked(path, blocking=True)
    try:
        _sign(handle)
        yield
    finally:
        release_and_remove(handle, path)


def release_and_remove(handle, path: Path) -> None:
    """Remove the lock file, then release it (in this order, so that no one locks a file on its way out;
    Windows removes no open file: there it is closed first)."""
    try:
        path.unlink(missing_ok=True)
    except PermissionError:
        handle.close()
        path.unlink(missing_ok=True)
    handle.close()


def _still_at(handle, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)
