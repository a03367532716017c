"""How many CPU threads a process computes with, and how its OpenMP threads wait.

Two torch jobs on one machine, each with torch's defaults, slow each other down far more than a fair share:
OpenMP's threads spin while they wait for work, taking the CPU time the other job needs, and each job sizes
its threads from the whole machine, not from the CPUs it was given. So the command lines (train.py, test.py,
``python -m ahiq``, the scripts) set, unless the user did:

* ``OMP_WAIT_POLICY=PASSIVE``: waiting threads sleep. It must be in the environment before torch is loaded
  (OpenMP reads it once), so the entry points call ``prepare_environment`` first.
* the intra-op threads: the CPUs this process may use (``usable_cpus``), shared with the other processes
  torchrun started on this node. ``OMP_NUM_THREADS``, or the option ``runtime.threads`` (``--threads``),
  overrides it.

In a user's own process (the metric, the Scorer) nothing process-wide is changed: docs/performance.md says
what to set there. This module does not import torch until ``apply_threads`` is called.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

WAIT_POLICY = "PASSIVE"


def prepare_environment() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user set a wait policy; only before torch is loaded (after,
    OpenMP has read its settings and the variable would claim what is not in force)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


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


def apply_threads(option: int | None = None) -> str:
    """Set torch's intra-op threads by choose_threads; returns the line that says what is in force."""
    import torch

    threads, why = choose_threads(option)
    torch.set_num_threads(threads)
    policy = os.environ.get("OMP_WAIT_POLICY")
    return f"CPU threads: {threads} ({why}); OpenMP wait policy {policy or 'default (spinning)'}"
