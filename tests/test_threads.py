"""The CPU threading policy of the command lines (ahiq.runtime.threads): the threads sized from the CPUs a process
may use, what overrides them, and the OpenMP wait policy set before torch is loaded."""
import os
import subprocess
import sys

import pytest

from ahiq.runtime.threads import choose_threads, usable_cpus
from conftest import ROOT

AFFINITY = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_the_cpus_are_the_fewest_of_affinity_cgroup_quota_and_slurm(tmp_path):
    # cgroup v2's cpu.max at the hierarchy's root: every cgroup path of /proc/self/cgroup reaches it going up
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU: rounded up to one
    cpus, why = usable_cpus({}, tmp_path)
    assert cpus == 1 and "cgroup quota 1" in why and f"affinity {AFFINITY}" in why
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no quota
    assert usable_cpus({}, tmp_path) == (AFFINITY, f"affinity {AFFINITY}")
    assert usable_cpus({"SLURM_CPUS_PER_TASK": "1"}, tmp_path)[0] == 1
    assert usable_cpus({"SLURM_CPUS_ON_NODE": "1", "SLURM_NTASKS_PER_NODE": "1"}, tmp_path) == (1, f"affinity {AFFINITY}, Slurm 1")


@pytest.mark.skipif(AFFINITY < 2, reason="needs two CPUs")
def test_torchruns_processes_on_a_node_share_its_cpus(tmp_path):
    cpus, why = usable_cpus({"LOCAL_WORLD_SIZE": str(AFFINITY)}, tmp_path)
    assert cpus == 1 and why.endswith(f"shared by {AFFINITY} processes on this node")
    assert usable_cpus({"LOCAL_WORLD_SIZE": str(4 * AFFINITY)}, tmp_path)[0] == 1  # never 0


def test_the_option_then_omp_num_threads_override_the_sizing():
    assert choose_threads(3, {"OMP_NUM_THREADS": "5"}) == (3, "runtime.threads")
    assert choose_threads(None, {"OMP_NUM_THREADS": "5"}) == (5, "OMP_NUM_THREADS=5")
    assert choose_threads(None, {"OMP_NUM_THREADS": "junk"})[0] == usable_cpus({})[0]


@pytest.mark.parametrize("given, expected", [({}, "GOMP_SPINCOUNT=10000"), ({"GOMP_SPINCOUNT": "5"}, "GOMP_SPINCOUNT=5"),
                                             ({"OMP_WAIT_POLICY": "ACTIVE"}, "GOMP_SPINCOUNT=None")])
def test_waiting_threads_spin_briefly_unless_the_user_chose_how(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import os, sys; from ahiq.runtime.threads import prepare_environment; prepare_environment(); "
            "assert 'torch' not in sys.modules; print('GOMP_SPINCOUNT=' + str(os.environ.get('GOMP_SPINCOUNT')))")
    done = subprocess.run([sys.executable, "-c", code], env={**env, **given}, capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert done.stdout.strip() == expected, done.stderr


def test_with_torch_already_loaded_the_environment_is_left_alone():
    """OpenMP has read its settings by then: setting the variable would only claim what is not in force."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import os, torch; from ahiq.runtime.threads import prepare_environment; prepare_environment(); "
            "print(os.environ.get('GOMP_SPINCOUNT'))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.strip() == "None", done.stderr


def test_a_command_lines_threads_last_as_long_as_its_run():
    import torch

    from ahiq.runtime.threads import applied, describe

    before = torch.get_num_threads()
    with applied(1):
        assert torch.get_num_threads() == 1 and describe().startswith("CPU threads: 1 (runtime.threads), ")
    assert torch.get_num_threads() == before and "(" not in describe().split(",")[0]
