"""The Slurm scripts (scripts/slurm/*.sbatch): their torchrun lines parse with torchrun's own parser into a
multi-node c10d job, and a job stopped by a signal is requeued and continues (run with Slurm's commands
replaced by stand-ins that record their calls)."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from conftest import ROOT

SCRIPTS = {"train.sbatch": (["options/pipal.yaml", "name=x"], ["train.py", "--opt", "options/pipal.yaml",
                                                                "train.resume=auto", "name=x"]),
           "score.sbatch": (["pairs.csv", "scores.csv", "--crops", "five"],
                            ["-m", "ahiq", "score", "--pairs", "pairs.csv", "--out", "scores.csv", "--resume", "--crops",
                             "five"])}


def stand_ins(folder: Path, srun_status: int) -> dict:
    """srun and scontrol that record their arguments; srun prints them and exits with ``srun_status``."""
    folder.mkdir()
    (folder / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{folder}/srun.args"\nexit {srun_status}\n')
    (folder / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> "{folder}/scontrol.calls"\n'
                                     '[ "$1 $2" = "show hostnames" ] && printf "gpu07\\ngpu08\\n"\nexit 0\n')
    for name in ("srun", "scontrol"):
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "a100:4", "SLURM_JOB_ID": "4242"}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_torchrun_line_is_a_two_node_c10d_job(script, tmp_path):
    arguments, expected_program = SCRIPTS[script]
    env = stand_ins(tmp_path / "bin", 0)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / script), *arguments], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    srun = (tmp_path / "bin" / "srun.args").read_text().splitlines()
    assert srun[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    args = get_args_parser().parse_args(srun[2:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "4", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id) == ("gpu07:29500", "4242")
    program = ["-m", args.training_script, *args.training_script_args] if args.module else \
        [args.training_script, *args.training_script_args]
    assert program == expected_program
    assert not (tmp_path / "bin" / "scontrol.calls").read_text().count("requeue")


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_job_stopped_by_sigterm_is_requeued_and_others_are_not(script, tmp_path):
    for status, requeued in ((143, True), (1, False)):
        folder = tmp_path / str(status)
        env = stand_ins(folder, status)
        done = subprocess.run(["bash", str(ROOT / "scripts" / "slurm" / script), *SCRIPTS[script][0]], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == status
        assert ("requeue 4242" in (folder / "scontrol.calls").read_text()) is requeued


def test_the_scripts_ask_slurm_for_the_signal_before_the_limit_and_requeueing():
    for script in SCRIPTS:
        text = (ROOT / "scripts" / "slurm" / script).read_text()
        directives = [shlex.split(line)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
        assert "--requeue" in directives and any(d.startswith("--signal=TERM@") for d in directives)
