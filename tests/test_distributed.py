"""Two-process training with torchrun on the CPU (gloo) gives the single-process result, and one process
resumes a two-process run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def _run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None and
                    shutil.which("torchrun") is None, reason="torchrun not installed")
def test_two_processes_train_like_one(tmp_path):
    # Frozen backbones: BatchNorm uses its running statistics, so no statistic depends on the per-process
    # batch. 75 training pairs in global batches of 8: the last batch (3 pairs) is shared unevenly.
    options = [f"data.root={tmp_path / 'data'}", "data.options={references: 5, size: 72}", "train.epochs=2",
               "train.batch_size=8", "train.save_interval=1", "train.resume=null", "train.device=cpu", "model.freeze_backbones=true",
               "data.num_workers=0", *[f"model.{k}={v}" for k, v in TINY.items()]]
    train = [str(ROOT / "train.py"), "--opt", str(ROOT / "options" / "demo.yaml")]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    _run([sys.executable, *train, "name=one", *options], tmp_path)
    _run([torchrun, "--standalone", "--nproc_per_node", "2", *train, "name=two", *options], tmp_path)
    one_log = (tmp_path / "checkpoints" / "one" / "train.log").read_text()
    two_log = (tmp_path / "checkpoints" / "two" / "train.log").read_text()
    assert "2 process(es)" in two_log and "1 process(es)" in one_log
    a = torch.load(tmp_path / "checkpoints" / "one" / "latest.pth", weights_only=True)
    b = torch.load(tmp_path / "checkpoints" / "two" / "latest.pth", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=1e-5, msg=key)
    first = torch.load(tmp_path / "checkpoints" / "one" / "epoch_1.pth", weights_only=True)["model"]
    moved = max((a["model"][k] - first[k]).abs().max().item() for k in first)
    assert moved > 1e-4  # the second epoch changed the weights: the agreement above is not trivial
    # Validation is sharded over the processes and gathered: every pair counted once, same metrics.
    assert b["best"]["n"] == a["best"]["n"] == 25
    assert b["best"]["srocc"] == pytest.approx(a["best"]["srocc"], abs=1e-3)
    written = sorted(p.name for p in (tmp_path / "checkpoints" / "two").glob("*.pth"))
    assert written == ["best.pth", "epoch_1.pth", "epoch_2.pth", "latest.pth"]  # rank 0 alone, no clashes
    # The two-process run's first epoch resumed by one process: the same second epoch.
    resumed = list(options)
    resumed[resumed.index("train.resume=null")] = f"train.resume={tmp_path / 'checkpoints' / 'two' / 'epoch_1.pth'}"
    _run([sys.executable, *train, "name=resumed", *resumed], tmp_path)
    c = torch.load(tmp_path / "checkpoints" / "resumed" / "latest.pth", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(c["model"][key], a["model"][key], rtol=0, atol=1e-5, msg=key)
