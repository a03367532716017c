"""Faults a long run must survive and bad input it must refuse before the first step (README "Reliability").

Faults: each crash is a real SIGKILL of a train.py process (tests/faults.py picks the moment); the run is
then continued with train.resume=auto and must end with exactly the weights of an uninterrupted run.
Bad input: each case goes through the command-line entry point and must end with exit status 2 and one
line naming the file, line or key, before any training step.
"""
import errno
import random
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

import ahiq.weights as weights
from ahiq import training
from ahiq.cli import run
from ahiq.data import load_parts
from ahiq.evaluation import predict, run_test
from ahiq.model import AHIQ, build_model
from ahiq.reference import random_official_setup
from ahiq.training import train
from conftest import ROOT, TINY, tiny_options

SIGKILLED = -signal.SIGKILL
# 5 synthetic references (3 train, 1 val, 1 test), 25 distorted images each; 3 epochs of 19 steps.
RUN = ["--opt", str(ROOT / "options" / "demo.yaml"), "data.options={references: 5, size: 72}", "train.epochs=3",
       "train.batch_size=4", "train.save_interval=1", "train.resume=auto", "data.num_workers=0",
       *[f"model.{k}={v}" for k, v in TINY.items()]]
STEPS = 3 * 19


def train_process(folder, name, fault=None, **popen):
    """train.py (or tests/faults.py with ``fault``) in ``folder``, writing checkpoints/<name>/."""
    script = [str(ROOT / "tests" / "faults.py"), fault] if fault else [str(ROOT / "train.py")]
    return subprocess.Popen([sys.executable, *script, *RUN, f"name={name}", f"data.root={folder / 'data'}"],
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
    assert not list(experiment.glob(weights.TEMPORARY_PATTERN))  # a half-written file is cleaned up
    return experiment


def check_like_uninterrupted(experiment, uninterrupted):
    straight = uninterrupted / "checkpoints" / "straight"
    for name in ("latest.pth", "best.pth", "epoch_1.pth", "epoch_2.pth", "epoch_3.pth"):
        assert_same_weights(experiment / name, straight / name)


# ---- crashes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [f"step:{random.Random(6).randint(2, STEPS)}", "validation:2", "save:latest.pth:2"])
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(fault, uninterrupted, tmp_path):
    experiment = kill_and_resume(tmp_path, fault)
    check_like_uninterrupted(experiment, uninterrupted)
    if fault.startswith("save:"):
        assert "removing" in (experiment / "train.log").read_text()  # the half-written temporary file


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
    assert not list(latest.parent.glob(weights.TEMPORARY_PATTERN))  # no temporary file left behind


def test_out_of_memory_at_evaluation_names_the_option(tmp_path, monkeypatch):
    opt = tiny_options(tmp_path)
    part = load_parts(opt["data"])["test"]
    model = build_model(opt["model"])

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "score_with_reference", no_memory)
    with pytest.raises(MemoryError, match=r"scoring 4 pairs x 5 crops, 20 crops per forward pass: lower "
                                          r"runtime.crop_chunk \(now 64\), or the pairs per batch "
                                          r"\(test.batch_size.*now 4\)"):
        predict([model], part, 64, "five", batch_size=4)


# ---- bad input -------------------------------------------------------------------------------------------

def write_image(path, height=72, width=72, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)


def distorted_path(root, name):
    return root / f"Distortion_{int(name[1:5]) % 4 + 1}" / name


def pipal_tree(root, references=5, distorted=3):
    """A small PIPAL training release: Train_Ref/, Distortion_1..4/, Train_Label/A####.txt (name,elo lines)."""
    for r in range(references):
        write_image(root / "Train_Ref" / f"A{r:04d}.bmp", seed=r)
        lines = []
        for d in range(distorted):
            name = f"A{r:04d}_00_{d:02d}.bmp"
            write_image(distorted_path(root, name), seed=100 + 10 * r + d)
            lines.append(f"{name},{1400.5 + 7 * r + d}")
        (root / "Train_Label").mkdir(exist_ok=True)
        (root / "Train_Label" / f"A{r:04d}.txt").write_text("\n".join(lines) + "\n")


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def replace_line(path, old, new):
    path.write_text(path.read_text().replace(old, new))


def png_instead(root):
    label = root / "Train_Label" / "A0002.txt"
    replace_line(label, "A0002_00_01.bmp", "A0002_00_01.png")
    write_image(distorted_path(root, "A0002_00_01.png"), seed=3)
    truncate(distorted_path(root, "A0002_00_01.png"))


# (case, how the dataset is broken, what the one-line message must contain)
BAD_DATA = [
    ("missing image", lambda r: (distorted_path(r, "A0001_00_01.bmp")).unlink(),
     "1 listed images not found: A0001_00_01.bmp (in"),
    ("missing reference", lambda r: (r / "Train_Ref" / "A0003.bmp").unlink(), "reference A0003.bmp of A0003_00_00.bmp"),
    ("zero-byte image", lambda r: (distorted_path(r, "A0001_00_01.bmp")).write_bytes(b""),
     "A0001_00_01.bmp is empty (0 bytes)"),
    ("truncated BMP", lambda r: truncate(distorted_path(r, "A0004_00_02.bmp")),
     "A0004_00_02.bmp is truncated (7803 bytes, the BMP header needs 15606)"),
    ("truncated PNG", png_instead, "A0002_00_01.png is truncated (no IEND chunk at the end of the PNG)"),
    ("not an image", lambda r: (r / "Train_Ref" / "A0000.bmp").write_text("this is not a picture\n"),
     "A0000.bmp is not a BMP image (its first bytes are b'this is ')"),
    ("sizes differ", lambda r: write_image(distorted_path(r, "A0001_00_00.bmp"), 72, 80),
     "A0001_00_00.bmp is 72x80 but its reference"),
    ("smaller than the crop", lambda r: [write_image(p, 48, 48) for p in [r / "Train_Ref" / "A0003.bmp", *(
        distorted_path(r, f"A0003_00_0{d}.bmp") for d in range(3))]], "A0003_00_01.bmp is 48x48, smaller than the 64x64 crop"),
    ("unparsable line", lambda r: replace_line(r / "Train_Label" / "A0001.txt", "A0001_00_01.bmp,", "A0001_00_01.bmp "),
     "A0001.txt:2: expected 'name,score', got 'A0001_00_01.bmp 1408.5'"),
    ("NaN score", lambda r: replace_line(r / "Train_Label" / "A0001.txt", "1408.5", "nan"),
     "A0001.txt:2: score is nan, not a finite number"),
    ("duplicate name", lambda r: replace_line(r / "Train_Label" / "A0002.txt", "A0002_00_02.bmp", "A0002_00_01.bmp"),
     "A0002.txt:3: distorted image 'A0002_00_01.bmp' is listed twice (first at"),
    ("empty label file", lambda r: (r / "Train_Label" / "A0004.txt").write_text(""),
     "A0004.txt: the file holds no labels (empty)"),
]


def run_cli(action, args, monkeypatch, capsys):
    """(exit status, stderr lines) of the command line, with any training step made a test failure."""
    def no_step(*a, **k):
        raise AssertionError("a training step ran before the bad input was found")

    monkeypatch.setattr(training, "train_step", no_step)
    code = run("test", action, args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("case,breakage,message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_refused_before_the_first_step(case, breakage, message, tmp_path, monkeypatch, capsys):
    root = tmp_path / "pipal"
    pipal_tree(root)
    breakage(root)
    monkeypatch.chdir(tmp_path)
    args = ["--opt", str(ROOT / "options" / "demo.yaml"), "data.dataset=pipal", f"data.root={root}",
            "data.options={}", "data.split.ratios=[0.6, 0.2, 0.2]", *[f"model.{k}={v}" for k, v in TINY.items()]]
    code, err = run_cli(train, args, monkeypatch, capsys)
    # one line, or a first line and the list of problems when there are several
    assert code == 2 and err[0].startswith("error: ") and message in "\n".join(err), err
    assert not (tmp_path / "checkpoints" / "demo" / "latest.pth").exists()


def test_label_file_without_a_final_newline_keeps_its_last_digit(tmp_path):
    root = tmp_path / "pipal"
    pipal_tree(root)
    label = root / "Train_Label" / "A0004.txt"
    label.write_text(label.read_text().rstrip("\n"))
    parts = load_parts({"dataset": "pipal", "root": str(root), "options": {}, "val": None, "test": None,
                        "split": {"ratios": [1.0, 0.0, 0.0], "seed": 0, "file": None}}, roles=("train",))
    scores = {p.name: p.mos for p in parts["train"].pairs}
    assert scores["A0004_00_02.bmp"] == 1430.5  # the official loader read 1430.


def test_bad_options_and_checkpoints_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = ["--opt", str(ROOT / "options" / "demo.yaml"), f"data.root={tmp_path / 'data'}"]
    cases = [
        (train, [*demo, "train.epoch=3"], "unknown option 'train.epoch'; did you mean 'train.epochs'?"),
        (train, [*demo, "train.epochs=many"], "train.epochs"),
        (train, [*demo, "train.val_crops=ten"], "train.val_crops"),
        (train, ["--opt", str(tmp_path / "nowhere.yaml")], f"option file {tmp_path / 'nowhere.yaml'} does not exist"),
    ]
    # Checkpoints: a timm ResNet's weights, an official release for other head sizes, an official patch-16
    # release for a patch-8 model, a truncated file, a missing one.
    _, _, official_p8 = random_official_setup(8, tmp_path / "official", **TINY)
    p16 = official_p8.with_name(official_p8.name.replace("_p8_", "_p16_"))
    p16.write_bytes(official_p8.read_bytes())
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(p16.read_bytes()[:500])
    tiny = [f"model.{k}={v}" for k, v in TINY.items()] + ["model.vit_pretrained=false", "model.cnn_pretrained=false"]
    for path, size, message in (
            (tmp_path / "official" / "resnet.pth", [], "resnet.pth is not an AHIQ checkpoint (top level: conv1.weight"),
            (official_p8, ["model.head_dim=24"], "does not fit this model; wrongly shaped keys: head."),
            (p16, [], "p16_epoch33-da3ea303.pth is named for patch size 16, this model has patch_size=8"),
            (corrupt, [], "corrupt.pth is not a readable torch or safetensors weight file"),
            (tmp_path / "none.pth", [], "none.pth does not exist")):
        cases.append((run_test, [*demo, *tiny, *size, f"test.checkpoint={path}"], message))
    for action, args, message in cases:
        code, err = run_cli(action, args, monkeypatch, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)


def test_command_line_errors_are_one_line_without_traceback(tmp_path):
    bad = subprocess.run([sys.executable, "train.py", "--opt", "options/demo.yaml", "train.epoch=3"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: override 'train.epoch=3': unknown option 'train.epoch'; "
                                  "did you mean 'train.epochs'?")
    missing = subprocess.run([sys.executable, "test.py", "--opt", "options/nowhere.yaml"], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "option file options/nowhere.yaml does not exist" in missing.stderr
    debug = subprocess.run([sys.executable, "test.py", "--opt", "options/nowhere.yaml", "--debug"], cwd=ROOT,
                           capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
