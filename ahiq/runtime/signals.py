"""Stopping cleanly on SIGTERM (what SLURM and Kubernetes send before their SIGKILL) and SIGINT (Ctrl-C):
the signal only raises a flag, and training and scoring look at it at their next step boundary, keep what
they have done, and end with ``Stopped``, whose message says how to continue."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

from ahiq.files import write_atomically

SIGNALS = (signal.SIGTERM, signal.SIGINT)


MARKER = "AHIQ_STOP_MARKER"


class Stopped(Exception):
    """A run stopped on a signal with its work kept. The process exits with 128 + the signal's number.

    When the environment names a file in AHIQ_STOP_MARKER, the stop writes the message there: how a batch
    script learns that the run should be continued (scripts/slurm/job.sh requeues the job), whatever exit
    status the launchers between them report."""

    def __init__(self, message: str, signum: int, logged: bool = False):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.logged = logged  # already printed by the run's log
        marker = os.environ.get(MARKER)
        if marker:
            write_atomically(Path(marker), (message + "\n").encode())


class StopSignals:
    """While entered, SIGTERM and SIGINT set ``requested`` (the signal's number) instead of ending the
    process. A second SIGINT ends it at once (KeyboardInterrupt), for the impatient at the keyboard; a
    second SIGTERM is the same request again (Slurm signals every process of a job step, and torchrun's agent
    passes its own SIGTERM on to its workers) and changes nothing. Outside the main thread, where Python
    cannot handle signals, it does nothing."""

    def __init__(self):
        self.requested = 0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = self.requested or signum

    @property
    def name(self) -> str:
        """The signal's name; "a signal to another process" where another process of the job got it."""
        return signal.Signals(self.requested).name if self.requested else "a signal to another process"


def ignore_in_workers(worker_id: int = 0) -> None:
    """DataLoader workers leave the stop to their main process (SLURM signals every process of a job, and
    Ctrl-C reaches the whole process group). A worker killed by the signal would make PyTorch raise its
    loss in the main process at any moment (from its SIGCHLD handler), possibly in the middle of an
    optimiser step; ignoring the signals, the workers keep serving until the main process stops at a step
    boundary. They must then be shut down explicitly: see ``batches``, which also blocks the signals while
    the workers start, so that one arriving before this function runs stays pending and is dropped here."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextlib.contextmanager
def shut_down_after(loader) -> Iterator:
    """Iterate ``loader``; its worker processes are shut down when the block ends, by an exception too.
    Left to garbage collection, which an exception's reference cycles delay until the interpreter exits,
    workers that ignore SIGTERM would hang that exit (multiprocessing stops leftover workers with it).
    The workers are forked with SIGTERM and SIGINT blocked (POSIX): a signal in the moment before their
    ``ignore_in_workers`` would otherwise kill one; the main process gets it when they have started."""
    masked = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if masked:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        iterator = iter(loader)
    finally:
        if masked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    try:
        yield iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # what the iterator's finaliser calls
        if shutdown is not None:
            shutdown()
