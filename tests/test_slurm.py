"""The Slurm scripts (scripts/slurm/*.sbatch) on a real Slurm cluster: slurmctld and two slurmd on this
machine (scripts/slurm/local_cluster.sh, which .ci/run starts), jobs submitted with sbatch as a user would,
stopped with the signal Slurm sends before a time limit (scancel -s TERM). Without such a cluster these
tests skip, saying why."""
import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY

CLUSTER = "ahiq-local"  # the ClusterName local_cluster.sh writes: jobs go to no other cluster
DEMO = [f"model.{k}={v}" for k, v in TINY.items()] + ["train.epochs=3", "data.options={references: 10, size: 72}",
                                                       "train.device=cpu", "data.num_workers=0"]


def _slurm(*command: str, cwd: Path | None = None) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True, cwd=cwd).stdout


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed: apt-get install slurm-wlm munge, then scripts/slurm/local_cluster.sh up")
    if not os.environ.get("SLURM_CONF"):
        pytest.skip("no test cluster: start one with scripts/slurm/local_cluster.sh up and export the SLURM_CONF it "
                    "prints")
    try:
        config = _slurm("scontrol", "show", "config")
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"the cluster of SLURM_CONF={os.environ['SLURM_CONF']} does not answer ({exc})")
    name = re.search(r"ClusterName\s*=\s*(\S+)", config)
    if name is None or name.group(1) != CLUSTER:
        pytest.skip(f"SLURM_CONF names the cluster {name and name.group(1)}, not scripts/slurm/local_cluster.sh's "
                    f"{CLUSTER}: these tests submit jobs only there")
    if _slurm("sinfo", "-h", "-o", "%D %t").split() != ["2", "idle"]:
        pytest.skip(f"the local cluster's two nodes are not idle: {_slurm('sinfo')}")


@pytest.fixture
def submit_dir(tmp_path):
    """A folder to submit from, as the repository's root: the scripts, train.py and the options."""
    for name in ("scripts", "train.py", "options"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def sbatch(folder: Path, *arguments: str) -> str:
    return _slurm("sbatch", "--parsable", "--time=15", *arguments, cwd=folder).strip().split(";")[0]


def job(job_id: str) -> dict:
    fields = _slurm("scontrol", "show", "job", "-o", job_id).split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def wait_for_log(log: Path, pattern: str, count: int = 1, timeout: float = 240) -> str:
    """The job log once ``pattern`` occurs ``count`` times in it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = log.read_text() if log.is_file() else ""
        if len(re.findall(pattern, text, re.M)) >= count:
            return text
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} x{count} not in {log} after {timeout} s:\n{text[-3000:]}")


def wait_until_done(job_id: str, timeout: float = 300) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = job(job_id)
        if state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} still {job(job_id)['JobState']} after {timeout} s")


def stopped_cleanly(text: str, stops: int, stopping_line: str) -> None:
    """What a signal stop leaves in the job's log: one line from each of the two processes and one from each
    node's launcher per stop, the requeue, and no traceback."""
    assert "Traceback" not in text and "SignalException" not in text and "ChildFailedError" not in text, text
    assert len(re.findall(stopping_line, text, re.M)) == 2 * stops, text
    assert len(re.findall(r"^ahiq launch on n[12]: .*stopped", text, re.M)) == 2 * stops, text
    assert text.count("requeueing job") == stops, text


@pytest.mark.slow
def test_a_training_job_signalled_twice_is_requeued_and_ends_as_if_never_stopped(cluster, submit_dir):
    """Two jobs of the same training on two nodes: one never stopped, one stopped twice mid-epoch."""
    training = ["scripts/slurm/train.sbatch", str(ROOT / "options" / "demo.yaml"), f"data.root={submit_dir / 'data'}",
                *DEMO]
    uninterrupted = sbatch(submit_dir, *training, "name=uninterrupted")
    assert wait_until_done(uninterrupted)["JobState"] == "COMPLETED"
    job_id = sbatch(submit_dir, *training, "name=slurm")
    log = submit_dir / f"slurm-ahiq-train-{job_id}.out"
    wait_for_log(log, r"^epoch 1 loss")  # then mid-epoch 2: 10 steps of about 0.3 s
    subprocess.run(["scancel", "-s", "TERM", job_id], check=True)
    wait_for_log(log, r"^resumed from .*latest.pth", 1)
    time.sleep(1.0)
    subprocess.run(["scancel", "-s", "TERM", job_id], check=True)
    state = wait_until_done(job_id)
    text = log.read_text()
    assert (state["JobState"], state["Restarts"], state["ExitCode"]) == ("COMPLETED", "2", "0:0"), text
    stopped_cleanly(text, 2, r"^stopped by SIGTERM (at epoch \d, step \d+ of 10|after epoch \d)")
    assert len(re.findall(r"^resumed from .*latest.pth", text, re.M)) == 2
    a = torch.load(submit_dir / "checkpoints" / "uninterrupted" / "latest.pth", weights_only=True)
    b = torch.load(submit_dir / "checkpoints" / "slurm" / "latest.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key].float(), a["model"][key].float(), rtol=0, atol=1e-5, msg=key)
    assert not list(submit_dir.glob(".ahiq-stopped-*"))


@pytest.mark.slow
def test_a_scoring_job_signalled_mid_run_is_requeued_and_scores_each_pair_once(cluster, submit_dir):
    from ahiq.nn.model import AHIQ
    from trees import noisy_pairs

    torch.manual_seed(0)
    AHIQ(8, False, False, **TINY, freeze_backbones=False).save_checkpoint(submit_dir / "model.pth")
    rows = noisy_pairs(submit_dir, 12, 4, "ref", "R")
    (submit_dir / "pairs.csv").write_text("dist,ref\n" + "".join(f"{d},{r}\n" for r, d, _, _ in rows))
    options = ["--checkpoint", str(submit_dir / "model.pth"), "--vit-pretrained", "false", "--cnn-pretrained",
               "false", "--num-crops", "40", "--device", "cpu"]
    alone = subprocess.run([sys.executable, "-m", "ahiq", "score", "--pairs", "pairs.csv", "--out", "alone.csv",
                            *options], cwd=submit_dir, capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    job_id = sbatch(submit_dir, "scripts/slurm/score.sbatch", "pairs.csv", "slurm.csv", *options)
    log = submit_dir / f"slurm-ahiq-score-{job_id}.out"
    wait_for_log(log, r"^ahiq score: ")
    end = time.monotonic() + 120
    while not any(p.stat().st_size for p in submit_dir.glob("slurm.csv.part*")) and time.monotonic() < end:
        time.sleep(0.1)  # the first reference journaled: mid-run
    subprocess.run(["scancel", "-s", "TERM", job_id], check=True)
    state = wait_until_done(job_id)
    text = log.read_text()
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), text
    stopped_cleanly(text, 1, r"^stopped by SIGTERM: the pairs scored so far are kept in ")
    assert re.search(r"^resuming: ([1-9]\d*) of 48 pairs already scored", text, re.M), text
    one = list(csv.reader((submit_dir / "alone.csv").open()))
    two = list(csv.reader((submit_dir / "slurm.csv").open()))
    assert len(one) == len(two) == 49 and [r[:2] for r in one] == [r[:2] for r in two]
    assert len({tuple(r[:2]) for r in two[1:]}) == 48  # each pair once
    assert max(abs(float(a[2]) - float(b[2])) for a, b in zip(one[1:], two[1:])) <= 1.01e-6  # 6 decimals
    assert not list(submit_dir.glob("slurm.csv.*")) and not list(submit_dir.glob(".ahiq-stopped-*"))


@pytest.mark.slow
def test_a_job_that_fails_for_a_real_reason_is_not_requeued(cluster, submit_dir):
    job_id = sbatch(submit_dir, "scripts/slurm/train.sbatch", str(ROOT / "options" / "demo.yaml"), "name=bad",
                    *DEMO, "train.epochs=0")
    state = wait_until_done(job_id)
    text = (submit_dir / f"slurm-ahiq-train-{job_id}.out").read_text()
    assert (state["JobState"], state["Restarts"]) == ("FAILED", "0"), text
    assert "option 'train.epochs' must be at least 1" in text and "requeue" not in text
    assert "Traceback" not in text and re.search(r"^ahiq launch on n[12]: 1 worker\(s\) failed", text, re.M), text


@pytest.mark.parametrize("environment, expected", [
    ({}, "1"), ({"SLURM_GPUS_PER_NODE": "0"}, "1"), ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, "2"), ({"SLURM_GPUS_ON_NODE": "8", "AHIQ_PROCS_PER_NODE": "3"}, "3")])
def test_processes_per_node_come_from_what_the_job_was_given(environment, expected):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_GPUS", "AHIQ_PROCS"))}
    done = subprocess.run(["bash", "-c", f". {ROOT / 'scripts' / 'slurm' / 'job.sh'} && procs_per_node"],
                          env={**clean, **environment}, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == expected, done.stderr


def test_the_scripts_ask_slurm_for_the_signal_before_the_limit_and_requeueing():
    import shlex

    for script in ("train.sbatch", "score.sbatch"):
        text = (ROOT / "scripts" / "slurm" / script).read_text()
        directives = [shlex.split(line)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
        assert "--requeue" in directives and any(d.startswith("--signal=TERM@") for d in directives)
        assert not any(d.startswith(("--gpus", "--cpus")) for d in directives)  # given on the command line
