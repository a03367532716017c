"""train.py with one injected crash or stop, for tests/test_reliability.py: the process sends itself SIGKILL
at a chosen point, as the out-of-memory killer or a power cut would stop it (no exception handler, no
``finally`` runs), or SIGTERM / SIGINT, as a cluster's pre-emption or Ctrl-C would.

    python tests/faults.py FAULT --opt options/demo.yaml [key.path=value ...]
    python tests/faults.py FAULT score --dist ... --ref ... --out ... [...]     (the journal faults)

FAULT is one of
    step:N          before the N-th training step of this process (counting from 1)
    validation:N    inside the N-th validation, after its first scoring batch
    save:NAME:N     halfway through writing the N-th NAME of this process (e.g. save:latest.pth:2): half of
                    the file's bytes are on disk, synced, when the process dies
    signal:NAME:N   the real signal NAME (SIGTERM, SIGINT) during the N-th training step
    journal:N       python -m ahiq score, killed right after the N-th reference's scores reach its journal
    journal:NAME:N  python -m ahiq score, sent the signal NAME right after the N-th journal write
    test-journal:N  test.py (its baselines' scores are journaled as the score command's), killed likewise
"""
from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ahiq.engine import training  # noqa: E402
from ahiq.scoring import inference  # noqa: E402
from ahiq.cli import run  # noqa: E402
from ahiq.nn.model import AHIQ  # noqa: E402


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def on_call(n: int, function, action):
    """``function`` that runs ``action`` (instead of returning) on its n-th call."""
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            action(*args, **kwargs)
        return function(*args, **kwargs)

    return wrapped


def kill_at_step(n: int) -> None:
    training.train_step = on_call(n, training.train_step, lambda *a, **k: die())


def signal_at_step(name: str, n: int) -> None:
    training.train_step = on_call(n, training.train_step, lambda *a, **k: os.kill(os.getpid(), getattr(signal, name)))


def after_journal_write(n: int, action) -> None:
    from ahiq.scoring import journal

    journal.Journal.add = after_call(n, journal.Journal.add, action)


def after_call(n: int, function, action):
    """``function`` that runs ``action`` after its n-th call."""
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        result = function(*args, **kwargs)
        calls += 1
        if calls == n:
            action()
        return result

    return wrapped


def kill_in_validation(n: int) -> None:
    real_score = AHIQ.predict_with_reference

    def arm(*args, **kwargs):  # the second scoring batch of this validation dies
        AHIQ.predict_with_reference = on_call(2, real_score, lambda *a, **k: die())

    inference.predict = on_call(n, inference.predict, arm)


def kill_while_saving(name: str, n: int) -> None:
    real_save = torch.save
    calls = 0

    def save(obj, f, *args, **kwargs):
        nonlocal calls
        # atomic_save hands torch.save the open temporary file ".<name>.XXXX.tmp" (Linux: its path via /proc)
        if Path(os.readlink(f"/proc/self/fd/{f.fileno()}")).name.startswith(f".{name}."):
            calls += 1
            if calls == n:
                data = io.BytesIO()
                real_save(obj, data, *args, **kwargs)
                f.write(data.getvalue()[:len(data.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    kind, _, where = sys.argv[1].partition(":")
    if kind in ("journal", "test-journal"):
        from ahiq.cli import main, test_command

        signal_name, _, count = where.rpartition(":")
        after_journal_write(int(count), (lambda: os.kill(os.getpid(), getattr(signal, signal_name))) if signal_name
                            else die)
        sys.exit((main if kind == "journal" else test_command)(sys.argv[2:]))
    if kind == "step":
        kill_at_step(int(where))
    elif kind == "validation":
        kill_in_validation(int(where))
    elif kind == "signal":
        signal_name, count = where.split(":")
        signal_at_step(signal_name, int(count))
    elif kind == "save":
        file_name, count = where.rsplit(":", 1)
        kill_while_saving(file_name, int(count))
    else:
        sys.exit(f"unknown fault {sys.argv[1]!r}; see {__file__}")
    sys.exit(run("train.py with an injected crash", training.train, sys.argv[2:]))
