"""How many CPU threads a process computes with, and how its OpenMP threads wait.

Two torch jobs on one machine, each with torch's defaults, slow each other down far more than a fair share:
libgomp's threads spin for about 3 ms (GOMP_SPINCOUNT 300000) each time they wait for work, taking the CPU
time the other job needs, and each job sizes its threads from the whole machine, not from the CPUs it was
given. So the command lines (train.py, test.py, ``python -m ahiq``, the scripts) set, unless the user did:

* ``GOMP_SPINCOUNT=10000``: waiting threads spin about 0.1 ms, then sleep. Measured (scripts/sharing.py,
  docs/performance.md): as fast as libgomp's default for one job alone, and two jobs side by side no longer
  take each other's time. A wait policy the user set (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is kept. It
  must be in the environment before torch is loaded (OpenMP reads it once), so the entry points call
  ``prepare_environment`` first.
* the intra-op threads: the CPUs this process may use (``usable_cpus``), shared with the other processes
  torchrun started on this node. ``OMP_NUM_THREADS``, or the option ``runtime.threads`` (``--threads``),
  overrides it.

In a user's own process (the metric, the Scorer, ``ahiq.engine.training.train`` called from Python) nothing
process-wide is changed: docs/performance.md says what to set there. This module does not import torch
until ``applied`` is entered.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Iterator

SPIN_COUNT = "10000"  # libgomp's spins before a waiting thread sleeps: about 0.1 ms (its default: 300000)
_CHOSEN: dict = {}  # the threads ``applied`` set, and why


def prepare_environment() -> None:
    """GOMP_SPINCOUNT=10000 unless the user chose how OpenMP waits; only before torch is loaded (after,
    OpenMP has read its settings and the variable would claim what is not in force)."""
    if "torch" not in sys.modules and not ({"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ)):
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def _cgroup_quota(root: Path) -> float | None:
    """The CPUs the cgroup quota of this process allows (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), the
    tightest over its cgroup and their parents; None without a quota."""
    limits = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            candidates = [(root / path.lstrip("/"), "v2")]
        elif "cpu" in controllers.split(","):
            candidates = [(root / controllers / path.lstrip("/"), "v1"), (root / "cpu" / path.lstrip("/"), "v1")]
        else:
            continue
        for folder, version in candidates:
            while True:
                limits += [q for q in [_read_quota(folder, version)] if q is not None]
                if folder == root or folder.parent == folder:
                    break
                folder = folder.parent
    return min(limits) if limits else None


def _read_quota(folder: Path, version: str) -> float | None:
    try:
        if version == "v2":
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _slurm_cpus(environ) -> int | None:
    """The CPUs Slurm gave this task: SLURM_CPUS_PER_TASK, else the node's CPUs over its tasks."""
    try:
        if environ.get("SLURM_CPUS_PER_TASK"):
            return int(environ["SLURM_CPUS_PER_TASK"])
        if environ.get("SLURM_CPUS_ON_NODE"):
            return int(environ["SLURM_CPUS_ON_NODE"]) // int(environ.get("SLURM_NTASKS_PER_NODE") or 1) or 1
    except ValueError:
        pass
    return None


def usable_cpus(environ=os.environ, cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """(CPUs this process may compute on, how that was found): the fewest of its affinity mask, its cgroup's
    CPU quota (rounded up) and what Slurm gave its task, shared among the processes torchrun started on this
    node (LOCAL_WORLD_SIZE), at least 1."""
    getaffinity = getattr(os, "sched_getaffinity", None)  # Linux; macOS and Windows have none
    limits = {"affinity": len(getaffinity(0)) if getaffinity else (os.cpu_count() or 1)}
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        limits["cgroup quota"] = max(1, math.ceil(quota - 1e-9))
    slurm = _slurm_cpus(environ)
    if slurm is not None:
        limits["Slurm"] = slurm
    cpus = min(limits.values())
    why = ", ".join(f"{name} {value}" for name, value in limits.items())
    local = int(environ.get("LOCAL_WORLD_SIZE") or 1)
    if local > 1:
        why += f"; shared by {local} processes on this node"
    return max(1, cpus // max(local, 1)), why


def choose_threads(option: int | None = None, environ=os.environ) -> tuple[int, str]:
    """(intra-op threads, why): ``option`` (runtime.threads, --threads) when given, else OMP_NUM_THREADS when
    set, else usable_cpus."""
    if option is not None:
        return option, "runtime.threads"
    given = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if given.isdigit() and int(given) > 0:
        return int(given), f"OMP_NUM_THREADS={given}"
    return usable_cpus(environ)


@contextlib.contextmanager
def applied(option: int | None = None) -> Iterator[None]:
    """While entered, torch computes with the threads of choose_threads (a command line's run); the count it
    had is restored at the end (a test or a user calling the command line's function in-process)."""
    import torch

    before = torch.get_num_threads()
    threads, why = choose_threads(option)
    torch.set_num_threads(threads)
    _CHOSEN.update(threads=threads, why=why)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _CHOSEN.clear()


def describe() -> str:
    """What is in force: the threads (and why, when ``applied`` chose them) and how OpenMP threads wait."""
    import torch

    threads = torch.get_num_threads()
    why = f" ({_CHOSEN['why']})" if _CHOSEN.get("threads") == threads else ""
    if "OMP_WAIT_POLICY" in os.environ:
        waits = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    elif "GOMP_SPINCOUNT" in os.environ:
        waits = f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']}"
    else:
        waits = "OpenMP's default waits"
    return f"CPU threads: {threads}{why}, {waits}"
