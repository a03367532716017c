"""Faults a long run must survive (docs/reliability.md): each crash is a real SIGKILL of a train.py process
(tests/faults.py picks the moment), each stop a real SIGTERM or SIGINT; the run is then continued with
train.resume=auto and must end with exactly the weights of an uninterrupted run. Also: two runs on one
experiment folder, and scoring jobs killed and resumed. Bad input is in test_bad_input.py."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import ahiq.files as files
import ahiq.nn.weights as weights
from ahiq.data import CropPlan, load_parts
from ahiq.engine.training import train
from ahiq.nn.model import AHIQ, build_model
from ahiq.scoring.inference import predict
from conftest import ROOT, TINY, ensemble, tiny_options

SIGKILLED = -signal.SIGKILL
# 5 synthetic references (3 train, 1 val, 1 test), 25 distorted images each; 3 epochs of 19 steps.
RUN = ["--opt", str(ROOT / "options" / "demo.yaml"), "data.options={references: 5, size: 72}", "train.epochs=3",
       "train.batch_size=4", "train.save_interval=1", "train.resume=auto", "data.num_workers=0",
       *[f"model.{k}={v}" for k, v in TINY.items()]]
STEPS = 3 * 19


def train_process(folder, name, fault=None, extra=(), **popen):
    """train.py (or tests/faults.py with ``fault``) in ``folder``, writing checkpoints/<name>/."""
    script = [str(ROOT / "tests" / "faults.py"), fault] if fault else [str(ROOT / "train.py")]
    return subprocess.Popen([sys.executable, *script, *RUN, f"name={name}", f"data.root={folder / 'data'}", *extra],
                            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def finish(job):
    _, err = job.communicate(timeout=600)
    return job.returncode, err


def model_weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    a, b = model_weights(a), model_weights(b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    code, err = finish(train_process(folder, "straight"))
    assert code == 0, err
    return folder


def kill_and_resume(folder, fault):
    """Crash a run with ``fault``, check what is on disk, continue it; returns the experiment folder."""
    experiment = folder / "checkpoints" / "killed"
    code, err = finish(train_process(folder, "killed", fault))
    assert code == SIGKILLED, f"the fault {fault} did not fire (exit {code}): {err[-2000:]}"
    for name in ("latest.pth", "best.pth"):  # whatever is there is whole
        if (experiment / name).exists():
            assert "model" in torch.load(experiment / name, weights_only=True)
    code, err = finish(train_process(folder, "killed"))
    assert code == 0, err
    assert not list(experiment.glob(files.TEMPORARY_PATTERN))  # a half-written file is cleaned up
    return experiment


def check_like_uninterrupted(experiment, uninterrupted):
    straight = uninterrupted / "checkpoints" / "straight"
    for name in ("latest.pth", "best.pth", "epoch_1.pth", "epoch_2.pth", "epoch_3.pth"):
        assert_same_weights(experiment / name, straight / name)


# ---- crashes ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fault", [f"step:{random.Random(6).randint(2, STEPS)}", "validation:2", "save:latest.pth:2"])
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(fault, uninterrupted, tmp_path):
    experiment = kill_and_resume(tmp_path, fault)
    check_like_uninterrupted(experiment, uninterrupted)
    if fault.startswith("save:"):
        assert "removing" in (experiment / "train.log").read_text()  # the half-written temporary file


@pytest.mark.slow
def test_sigkill_while_writing_best_keeps_the_previous_best(uninterrupted, tmp_path):
    log = (uninterrupted / "checkpoints" / "straight" / "train.log").read_text()
    last_best = log.count(" best True")  # the last write of best.pth in the uninterrupted run
    assert last_best >= 2, "pick a run whose validation improves twice"
    experiment = tmp_path / "checkpoints" / "killed"
    code, err = finish(train_process(tmp_path, "killed", f"save:best.pth:{last_best}"))
    assert code == SIGKILLED, err
    kept = torch.load(experiment / "best.pth", weights_only=True)
    assert kept["epoch"] < torch.load(uninterrupted / "checkpoints" / "straight" / "best.pth",
                                      weights_only=True)["epoch"]  # the earlier best, whole
    code, err = finish(train_process(tmp_path, "killed"))
    assert code == 0, err
    check_like_uninterrupted(experiment, uninterrupted)


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(uninterrupted, tmp_path):
    latest = tmp_path / "checkpoints" / "killed" / "latest.pth"
    job = train_process(tmp_path, "killed")
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(7).uniform(0.0, 1.0))  # somewhere in epoch 2
    assert job.poll() is None, "the run ended before it could be killed"
    job.send_signal(signal.SIGKILL)
    assert finish(job)[0] == SIGKILLED
    assert torch.load(latest, weights_only=True)["epoch"] < 2  # killed before the last epoch finished
    code, err = finish(train_process(tmp_path, "killed"))
    assert code == 0, err
    check_like_uninterrupted(latest.parent, uninterrupted)


def test_corrupt_latest_falls_back_to_the_last_good_checkpoint(tmp_path):
    train(tiny_options(tmp_path, "train.epochs=2", "train.save_interval=1"), tmp_path / "ckpt")
    latest = tmp_path / "ckpt" / "demo" / "latest.pth"
    latest.write_bytes(latest.read_bytes()[:1000])
    train(tiny_options(tmp_path, "train.epochs=3", "train.save_interval=1", "train.resume=auto"), tmp_path / "ckpt")
    log = (tmp_path / "ckpt" / "demo" / "train.log").read_text()
    assert f"cannot resume from {latest}" in log and "resumed from" in log and "epoch_2.pth" in log
    assert torch.load(latest, weights_only=True)["epoch"] == 2


def nonfinite_at_steps(monkeypatch, steps, value=float("nan")):
    """The model's output is ``value`` (NaN by default) at the given training steps (counting from 0)."""
    real_forward, calls = AHIQ.forward, [0]

    def forward(self, dist, ref):
        out = real_forward(self, dist, ref)
        calls[0] += 1
        return out * 0 + value if calls[0] - 1 in steps else out

    monkeypatch.setattr(AHIQ, "forward", forward)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nonfinite_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, value):
    nonfinite_at_steps(monkeypatch, {12}, float(value))  # epoch 2 (10 steps of 8 pairs an epoch), its third step
    with pytest.raises(FloatingPointError, match=rf"loss is {value} at epoch 2, step 12: stopping .*the last good "
                                                 r"checkpoint is .*latest.pth.*train.nonfinite_loss=skip"):
        train(tiny_options(tmp_path, "train.save_interval=1"), tmp_path / "ckpt")
    saved = torch.load(tmp_path / "ckpt" / "demo" / "latest.pth", weights_only=True)
    assert saved["epoch"] == 0 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_nan_loss_skipped_when_asked(tmp_path, monkeypatch):
    nonfinite_at_steps(monkeypatch, {3, 4})
    train(tiny_options(tmp_path, "train.nonfinite_loss=skip"), tmp_path / "ckpt")
    folder = tmp_path / "ckpt" / "demo"
    saved = torch.load(folder / "latest.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    # 2 epochs of 10 steps, two skipped: Adam counted 18 updates, the schedule went on for all 20 iterations
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {18}
    assert saved["scheduler"]["last_epoch"] == 20
    log = folder / "train.log"
    assert "loss is nan at epoch 1, step 3: batch skipped" in log.read_text()
    assert "skipped_batches 2" in log.read_text()


def test_every_batch_nan_stops_even_when_skipping(tmp_path, monkeypatch):
    nonfinite_at_steps(monkeypatch, set(range(10)))
    with pytest.raises(FloatingPointError, match="every batch of epoch 1 had a non-finite loss.*no checkpoint"):
        train(tiny_options(tmp_path, "train.nonfinite_loss=skip"), tmp_path / "ckpt")


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    train(tiny_options(tmp_path, "train.epochs=1"), tmp_path / "ckpt")
    latest = tmp_path / "ckpt" / "demo" / "latest.pth"
    before = latest.read_bytes()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights.torch, "save", full_disk)
    with pytest.raises(weights.CheckpointWriteError, match="No space left on device.*previous file is intact.*resume=auto"):
        train(tiny_options(tmp_path, "train.epochs=2", "train.resume=auto"), tmp_path / "ckpt")
    assert latest.read_bytes() == before  # untouched
    assert not list(latest.parent.glob(files.TEMPORARY_PATTERN))  # no temporary file left behind


def test_out_of_memory_at_evaluation_names_the_option(tmp_path, monkeypatch):
    opt = tiny_options(tmp_path)
    part = load_parts(opt["data"])["test"]
    model = build_model(opt["model"])

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "predict_with_reference", no_memory)
    with pytest.raises(MemoryError, match=r"scoring 4 pairs x 5 crops, 20 crops per forward pass: lower "
                                          r"runtime.crop_chunk \(now 64; --crop-chunk\), or the pairs per batch "
                                          r"\(test.batch_size.*now 4\)"):
        predict(ensemble([model], CropPlan(64, "five"), crop_chunk=64), part.pairs, batch_size=4)


# ---- stop signals, two runs on one folder ---------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,status", [("SIGTERM", 128 + signal.SIGTERM), ("SIGINT", 128 + signal.SIGINT)])
def test_stop_signal_writes_latest_and_resume_ends_with_the_uninterrupted_weights(name, status, uninterrupted,
                                                                                  tmp_path):
    """SLURM and Kubernetes send SIGTERM before SIGKILL, a user presses Ctrl-C: the run stops at the next
    step boundary (here the 7th step of epoch 2), writes latest.pth, says how to continue, no traceback."""
    experiment = tmp_path / "checkpoints" / "killed"
    code, err = finish(train_process(tmp_path, "killed", f"signal:{name}:{19 + 7}"))
    assert code == status, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"stopped by {name} at epoch 2, step 7 of 19; checkpoints/killed/latest.pth "
                                           f"holds the run so far: continue it with train.resume=auto")
    saved = torch.load(experiment / "latest.pth", weights_only=True)
    assert saved["epoch"] == 0 and saved["partial"]["steps"] == 7 and len(saved["partial"]["losses"]) == 7
    code, err = finish(train_process(tmp_path, "killed"))
    assert code == 0, err
    assert "resumed from" in (experiment / "train.log").read_text()
    check_like_uninterrupted(experiment, uninterrupted)


@pytest.mark.slow
def test_sigterm_to_the_whole_job_with_loader_workers_then_resume(uninterrupted, tmp_path):
    """SLURM's scancel signals every process of the job step, DataLoader workers included: whether the main
    process or a worker sees it first, the run stops with latest.pth written and resumes exactly."""
    latest = tmp_path / "checkpoints" / "killed" / "latest.pth"
    job = train_process(tmp_path, "killed", extra=["data.num_workers=2"], start_new_session=True)
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(8).uniform(0.0, 1.0))  # somewhere in epoch 2
    assert job.poll() is None, "the run ended before it could be stopped"
    os.killpg(job.pid, signal.SIGTERM)
    code, err = finish(job)
    assert code == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert "holds the run so far: continue it with train.resume=auto" in err.strip().splitlines()[-1]
    code, err = finish(train_process(tmp_path, "killed"))
    assert code == 0, err
    check_like_uninterrupted(latest.parent, uninterrupted)


@pytest.mark.slow
def test_a_second_run_on_a_busy_folder_fails_at_once_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    """Cluster job resubmission starts train.resume=auto while the first run still runs."""
    first = train_process(tmp_path, "busy")
    lock = tmp_path / "checkpoints" / "busy" / ".lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text()) and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run([sys.executable, str(ROOT / "train.py"), *RUN, "name=busy",
                             f"data.root={tmp_path / 'data'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert first.poll() is None, "the first run ended before the second started"
    assert second.returncode == 2 and second.stderr.startswith("error: ") and len(second.stderr.splitlines()) == 1
    assert f"error: checkpoints/busy is in use by process {first.pid} on host " in second.stderr
    first.send_signal(signal.SIGKILL)
    assert finish(first)[0] == SIGKILLED
    code, err = finish(train_process(tmp_path, "busy"))  # the lock died with the process
    assert code == 0, err


# ---- scoring jobs killed and stopped ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scoring(tmp_path_factory):
    """A checkpoint holding its backbones, 6 references x 3 distorted images, and the uninterrupted CSV."""
    from trees import noisy_pairs

    folder = tmp_path_factory.mktemp("scoring")
    AHIQ(8, False, False, **TINY, freeze_backbones=False).save_checkpoint(folder / "model.pth")
    AHIQ(8, False, False, **TINY, freeze_backbones=False).save_checkpoint(folder / "other.pth")  # other weights
    rows = [f"{dist},{ref}" for ref, dist, _, _ in noisy_pairs(folder, 6, 3, "ref", "R")]
    (folder / "pairs.csv").write_text("\n".join(["dist,ref", *rows]) + "\n")
    command = ["score", "--pairs", str(folder / "pairs.csv"), "--checkpoint", str(folder / "model.pth"),
               "--vit-pretrained", "false", "--cnn-pretrained", "false", "--crops", "five"]
    done = subprocess.run([sys.executable, "-m", "ahiq", *command, "--out", str(folder / "straight.csv")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return folder, command


# bf16 asked for on a CPU that emulates it warns (tested in test_runtime.py); here only the refusal counts.
QUIET_BF16 = {**os.environ, "PYTHONWARNINGS": "ignore:runtime.precision=bf16 on a CPU without native bf16"}


def score_process(command, out, fault=None, *extra):
    script = [str(ROOT / "tests" / "faults.py"), fault] if fault else ["-m", "ahiq"]
    return subprocess.run([sys.executable, *script, *command, "--out", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=QUIET_BF16)


@pytest.mark.slow
@pytest.mark.parametrize("fault,status", [("journal:2", SIGKILLED), ("journal:SIGTERM:2", 128 + signal.SIGTERM)],
                         ids=["sigkill", "sigterm"])
def test_killed_scoring_resumes_to_the_same_csv(fault, status, scoring, tmp_path):
    """Two of six references scored, then SIGKILL (nothing runs) or SIGTERM (stops at the next reference):
    the journal keeps them, --resume scores the rest, the CSV is byte for byte the uninterrupted one's."""
    folder, command = scoring
    out = tmp_path / "scores.csv"
    killed = score_process(command, out, fault)
    assert killed.returncode == status, killed.stderr[-2000:]
    assert not out.exists() and len((tmp_path / "scores.csv.part0").read_text().splitlines()) >= 6
    if status != SIGKILLED:
        assert "Traceback" not in killed.stderr and "--resume" in killed.stderr.strip().splitlines()[-1]
    refused = score_process(command, out)  # without --resume the journal is not overwritten
    assert refused.returncode == 2 and "continue it with --resume" in refused.stderr
    changes = ((["--checkpoint", str(folder / "other.pth")], "checkpoints ['model.pth sha256 "),
               (["--crops", "nine"], "crops [64, 'five', None, None] then, [64, 'nine', None, None] now"),
               (["--precision", "bf16"], "precision 'fp32' then, 'bf16' now"))
    for change, named in changes if status == SIGKILLED else ():  # the journals are the same after either stop
        mixed = score_process([*command, *change], out, None, "--resume")  # the CSV would mix two configurations
        assert mixed.returncode == 2 and "were scored with other settings (" in mixed.stderr, mixed.stderr
        assert named in mixed.stderr and len(mixed.stderr.strip().splitlines()) == 1, mixed.stderr
    resumed = score_process(command, out, None, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 6 of 18 pairs already scored" in resumed.stderr  # two references of three pairs
    assert out.read_bytes() == (folder / "straight.csv").read_bytes()
    assert not list(tmp_path.glob("scores.csv.part*")) and not (tmp_path / ".scores.csv.lock").exists()


@pytest.mark.slow
def test_a_second_scoring_run_on_the_same_output_is_refused_at_once(scoring, tmp_path):
    """Two runs on one --out would each take the other's journal for its own (the second, finding the first's
    rows unfinished, would end in 'the journals lack 6 pairs'). This process holds the lock as a first run
    would; the second run is refused naming it, and runs once the lock is released."""
    import os

    from ahiq.files import release_and_remove, take_lock

    folder, command = scoring
    out, lock_path = tmp_path / "scores.csv", tmp_path / ".scores.csv.lock"
    lock = take_lock(lock_path, "the first run", "")
    second = score_process(command, out)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert second.stderr.startswith(f"error: --out {out} is in use by process {os.getpid()} on host "), second.stderr
    assert not out.exists() and not list(tmp_path.glob("scores.csv.part*"))  # nothing of its own written
    release_and_remove(lock, lock_path)
    assert score_process(command, out).returncode == 0
    assert out.read_bytes() == (folder / "straight.csv").read_bytes() and not lock_path.exists()
