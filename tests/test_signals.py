"""ahiq.runtime.signals: the stop flag, and DataLoader workers that survive the job's SIGTERM."""
import os
import signal
import sys
import time

import pytest
import torch

from ahiq.runtime.signals import StopSignals, ignore_in_workers, shut_down_after

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
PID_FILE = "AHIQ_TEST_WORKER_PID"


def slow_to_start(worker_id):
    """A worker that says its pid, then takes a moment before it ignores the signals (the window between
    the fork and worker_init_fn, made wide)."""
    with open(os.environ[PID_FILE], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(1.0)
    ignore_in_workers(worker_id)


def test_a_sigterm_while_loader_workers_start_kills_none(tmp_path, monkeypatch):
    """Slurm signals every process of a job: a worker that gets SIGTERM before its worker_init_fn has run
    (blocked while it starts, dropped once it ignores it) keeps serving; the main process's flag is set."""
    monkeypatch.setenv(PID_FILE, str(tmp_path / "pid"))
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1,
                                         worker_init_fn=slow_to_start, multiprocessing_context="fork")
    with StopSignals() as stop:
        with shut_down_after(loader) as loaded:
            deadline = time.time() + 60
            while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
                assert time.time() < deadline
                time.sleep(0.01)
            worker = int((tmp_path / "pid").read_text())
            os.kill(worker, signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            got = [batch.tolist() for batch in loaded]
        assert stop.requested == signal.SIGTERM
    assert got == [[0, 1], [2, 3], [4, 5], [6, 7]]
