"""Bad input a run must refuse before its first step, as one line naming the file, line, key or argument
(docs/reliability.md). Each case goes through the command-line entry point and must end with exit status 2,
no traceback, and nothing written."""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ahiq.cli import run
from ahiq.data import load_parts
from ahiq.engine import training
from ahiq.engine.testing import run_test
from ahiq.engine.training import train
from ahiq.nn.official import random_official_setup
from conftest import ROOT, TINY

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


def test_every_parts_bad_images_are_reported_together(tmp_path, monkeypatch, capsys):
    """A truncated image under every reference: the training, validation and test parts' problems in one
    report, each named by its part, not one part per try."""
    root = tmp_path / "pipal"
    pipal_tree(root)
    for r in range(5):
        truncate(distorted_path(root, f"A{r:04d}_00_01.bmp"))
    monkeypatch.chdir(tmp_path)
    args = ["--opt", str(ROOT / "options" / "demo.yaml"), "data.dataset=pipal", f"data.root={root}",
            "data.options={}", "data.split.ratios=[0.6, 0.2, 0.2]", *[f"model.{k}={v}" for k, v in TINY.items()]]
    code, err = run_cli(train, args, monkeypatch, capsys)
    assert code == 2 and err[0] == ("error: 5 problems with the images of 15 pairs in the training, validation, test "
                                    "parts (fix or remove them, then run again):"), err
    parts = sorted(line.strip().split(":")[0] for line in err[1:])
    assert parts == ["test", "training", "training", "training", "validation"], err


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
            (tmp_path / "none.pth", [], "none.pth does not exist (train first, or set test.checkpoint=<path>, a "
                                        "list of paths for an ensemble, or pipal for the released model)")):
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


# ---- second round: probes from a fresh clone (issue 16) -------------------------------------------------

# (override, what the one line must say); every numeric option is checked against its domain before
# anything runs, a name must be a plain folder name, and sizes that must divide are checked together.
BAD_OPTIONS = [
    ("train.batch_size=0", "option 'train.batch_size' must be at least 1, got 0"),
    ("train.batch_size=-4", "option 'train.batch_size' must be at least 1, got -4"),
    ("train.epochs=0", "option 'train.epochs' must be at least 1, got 0"),
    ("train.t_max=0", "option 'train.t_max' must be at least 1, got 0"),
    ("train.lr=-1e-4", "option 'train.lr' must be greater than 0, got -0.0001"),
    ("train.lr=.nan", "option 'train.lr' must be a finite number, got nan"),
    ("train.weight_decay=-1", "option 'train.weight_decay' must be at least 0, got -1"),
    ("train.seed=-1", "option 'train.seed' must be at least 0, got -1"),
    ("train.val_every=0", "option 'train.val_every' must be at least 1, got 0"),
    ("data.num_workers=-1", "option 'data.num_workers' must be at least 0, got -1"),
    ("runtime.crop_chunk=0", "option 'runtime.crop_chunk' must be at least 1, got 0"),
    ("test.num_crops=0", "option 'test.num_crops' must be at least 1, got 0"),
    ("name=../../x", "option 'name' must be a plain folder name"),
    ("model.img_size=100", "model.img_size 100 must be a multiple of model.patch_size 8"),
    ("model.vit_heads=5", "model.vit_dim 32 must be a multiple of model.vit_heads 5"),
    ("data.split.ratios=[0.5]", "data.split.ratios must be 2 (train, test) or 3 (train, val, test) non-negative"),
    ("train.device=gpu", "train.device 'gpu' is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
]


@pytest.mark.parametrize("override,message", BAD_OPTIONS, ids=[o for o, _ in BAD_OPTIONS])
def test_options_outside_their_domain_are_refused_before_anything_runs(override, message, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--opt", str(ROOT / "options" / "demo.yaml"), f"data.root={tmp_path / 'data'}",
            *[f"model.{k}={v}" for k, v in TINY.items()], override]
    code, err = run_cli(train, args, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "x").exists()  # nothing written


def score_cli(args, capsys):
    """(exit status, stderr) of python -m ahiq, in this process."""
    from ahiq.cli import main

    try:
        code = main(args)
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err


@pytest.fixture
def scoring_files(tmp_path):
    """A checkpoint holding its backbones, an official one holding none, and one 72x72 pair."""
    from ahiq.nn.model import AHIQ

    AHIQ(8, False, False, **TINY, freeze_backbones=False).save_checkpoint(tmp_path / "whole.pth")
    _, _, official = random_official_setup(8, tmp_path / "official", **TINY)
    write_image(tmp_path / "d.png")
    write_image(tmp_path / "r.png", seed=1)
    pair = ["--dist", str(tmp_path / "d.png"), "--ref", str(tmp_path / "r.png"), "--vit-pretrained", "false",
            "--cnn-pretrained", "false", "--crops", "five"]
    return tmp_path, official, pair


@pytest.mark.parametrize("argument", ["--num-crops 0", "--num-crops -3", "--crop-chunk 0", "--batch-size 0",
                                      "--seed -1", "--num-crops many"])
def test_command_line_numbers_are_range_checked(argument, scoring_files, capsys):
    folder, _, pair = scoring_files
    code, err = score_cli(["score", *pair, "--checkpoint", str(folder / "whole.pth"), *argument.split()], capsys)
    name = argument.split()[0]
    assert code == 2 and f"error: python -m ahiq score: argument {name}: " in err and "Traceback" not in err, err


@pytest.mark.parametrize("device,message", [("gpu", "error: --device 'gpu' is not a device"),
                                            ("cuda", "error: --device is 'cuda' but no CUDA device is available")])
def test_a_device_that_is_not_there_is_named_as_the_flag(device, message, scoring_files, capsys, monkeypatch):
    folder, _, pair = scoring_files
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = score_cli(["score", *pair, "--checkpoint", str(folder / "whole.pth"), "--device", device], capsys)
    assert code == 2 and err.startswith(message) and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("out,message", [("nowhere/scores.csv", "the folder {}/nowhere does not exist"),
                                         (".", "is a folder; give a file name")])
def test_an_unwritable_output_is_refused_before_the_first_pair(out, message, scoring_files, capsys, monkeypatch):
    folder, _, pair = scoring_files

    def no_scoring(*args, **kwargs):
        raise AssertionError("a pair was scored before the output was checked")

    monkeypatch.setattr("ahiq.scoring.scorer.predict", no_scoring)
    code, err = score_cli(["score", *pair, "--checkpoint", str(folder / "whole.pth"), "--out", str(folder / out)],
                          capsys)
    assert code == 2 and err.startswith("error: ") and message.format(folder) in err, err


def test_images_over_the_decoders_limit_are_refused_upfront(scoring_files, capsys, monkeypatch):
    folder, _, pair = scoring_files
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", "5000")  # 72 x 72 = 5184
    code, err = score_cli(["score", *pair, "--checkpoint", str(folder / "whole.pth")], capsys)
    assert code == 2 and "d.png is 72x72, over OpenCV's limit OPENCV_IO_MAX_IMAGE_PIXELS=5000: set the " \
                         "environment variable OPENCV_IO_MAX_IMAGE_PIXELS=5184 (or more) to read it" in err, err


def test_a_float_tiff_is_named_for_what_it_is(scoring_files, capsys):
    folder, _, pair = scoring_files
    assert cv2.imwrite(str(folder / "d.tif"), np.random.default_rng(0).random((72, 72, 3)).astype(np.float32))
    pair[1] = str(folder / "d.tif")
    code, err = score_cli(["score", *pair, "--checkpoint", str(folder / "whole.pth")], capsys)
    assert code == 2 and "d.tif holds float32 samples (3 channel(s)), which the 8-bit colour reader cannot " \
                         "convert" in err, err


def test_a_decode_failure_in_a_loader_worker_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    """An image that passes the header check and fails to decode mid-run, read in a DataLoader worker:
    the worker's traceback text is not printed, the file is named."""
    root = tmp_path / "pipal"
    pipal_tree(root)
    damaged = distorted_path(root, "A0003_00_01.bmp")
    data = bytearray(damaged.read_bytes())
    data[30:34] = (99).to_bytes(4, "little")  # a compression no decoder knows; size and length still fine
    damaged.write_bytes(bytes(data))
    monkeypatch.chdir(tmp_path)
    args = ["--opt", str(ROOT / "options" / "demo.yaml"), "data.dataset=pipal", f"data.root={root}", "data.options={}",
            "data.num_workers=1", "train.epochs=1", *[f"model.{k}={v}" for k, v in TINY.items()]]
    code = run("test", train, args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # the log prints progress too
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].endswith(f"cannot read image {damaged.resolve()}: truncated, damaged or not an image"), errors


def test_random_backbones_are_refused_unless_allowed(scoring_files, capsys, tmp_path, monkeypatch):
    """An official checkpoint holds no backbone weights: with the hub switched off the scores would come
    from random backbones and change from run to run."""
    from ahiq.nn.model import AHIQ

    folder, official, pair = scoring_files
    AHIQ(8, False, False, **TINY).save_checkpoint(folder / "head_only.pth")  # frozen backbones are not saved
    code, err = score_cli(["score", *pair, "--checkpoint", str(folder / "head_only.pth")], capsys)
    assert code == 2 and "holds no ViT or ResNet50 weights and model.vit_pretrained (--vit-pretrained) and " \
                         "model.cnn_pretrained (--cnn-pretrained) are false" in err, err
    code, err = score_cli(["score", *pair, "--checkpoint", str(folder / "head_only.pth"),
                           "--allow-random-backbones"], capsys)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)  # test.py: the same check, naming the option
    args = ["--opt", str(ROOT / "options" / "demo.yaml"), f"data.root={tmp_path / 'data'}", "model.vit_pretrained=false",
            "model.cnn_pretrained=false", f"test.checkpoint={official}", *[f"model.{k}={v}" for k, v in TINY.items()]]
    code, err = run_cli(run_test, args, monkeypatch, capsys)
    assert code == 2 and len(err) == 1 and "test.allow_random_backbones=true" in err[0], err


def test_a_text_file_as_a_checkpoint_is_one_line(scoring_files, capsys):
    folder, _, pair = scoring_files
    (folder / "notes.pth").write_text("name,score\nA0001_00_00.bmp,1400\n")
    code, err = score_cli(["score", *pair, "--checkpoint", str(folder / "notes.pth")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "notes.pth is not a readable torch" in err, err
    assert "Weights only load failed" not in err


def test_own_pairs_without_a_label_file_is_one_line_naming_the_option(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(train, ["--opt", str(ROOT / "options" / "demo.yaml"), "data.dataset=csv",
                                f"data.root={tmp_path / 'mine'}", "data.options={}"], monkeypatch, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("error: dataset 'csv' needs data.options.labels (for 'csv': the CSV file of ref,dist,mos rows, "
                      "relative to data.root); see options/custom.yaml")


def test_a_run_that_fails_before_training_leaves_no_experiment_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--opt", str(ROOT / "options" / "live.yaml"), f"data.root={tmp_path / 'nowhere'}"]
    code, err = run_cli(train, args, monkeypatch, capsys)
    assert code == 2 and "root folder" in err[0] and "does not exist" in err[0]
    assert not (tmp_path / "checkpoints" / "ahiq_live").exists()
    (tmp_path / "checkpoints" / "ahiq_live").mkdir(parents=True)
    (tmp_path / "checkpoints" / "ahiq_live" / "notes.txt").write_text("mine")
    code, err = run_cli(train, args, monkeypatch, capsys)  # a folder that was there before is left as it was
    assert code == 2 and (tmp_path / "checkpoints" / "ahiq_live" / "notes.txt").read_text() == "mine"


def own_pairs(folder) -> list[str]:
    """Five references with two distorted images each under ``folder``, in options/custom.yaml's layout, and
    the options that train a tiny model on them from random weights."""
    from trees import noisy_pairs

    rows = [f"{ref},{dist},{3.0 + r - d}" for ref, dist, r, d in noisy_pairs(folder, 5, 2, "refs", "r")]
    (folder / "labels.csv").write_text("\n".join(["ref,dist,mos", *rows]) + "\n")
    return ["--opt", str(ROOT / "options" / "custom.yaml"), f"data.root={folder}", "model.vit_pretrained=false",
            "model.cnn_pretrained=false", *[f"model.{k}={v}" for k, v in TINY.items()]]


def test_the_options_for_own_pairs_train_as_they_say(tmp_path, monkeypatch, capsys):
    """options/custom.yaml read as written, on a CSV in its layout: its pairs reach the first step."""
    args = own_pairs(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="a training step ran"):  # every check passed: the first step came
        run_cli(train, args, monkeypatch, capsys)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resume_with_another_architecture_says_which_options_to_use(tmp_path, monkeypatch, capsys):
    args = [*own_pairs(tmp_path / "mine"), "name=mine", "train.epochs=1", "train.batch_size=2"]
    monkeypatch.chdir(tmp_path)
    assert run("test", train, args) == 0
    capsys.readouterr()
    files = snapshot(tmp_path / "checkpoints" / "mine")
    code, err = run_cli(train, [*args, "train.epochs=2", "train.resume=auto", "model.patch_size=8"], monkeypatch,
                        capsys)
    assert code == 2 and err[-1].startswith("error: checkpoint ") and "Traceback" not in "".join(err), err
    assert "was saved for another architecture: patch_size=16 (this model: 8). Resume it with the model options it " \
           f"was trained with (model.* in {Path('checkpoints') / 'mine' / 'options.yaml'}), or start anew under " \
           "another name=" in err[-1], err
    # the refused resume changed nothing on disk: options.yaml (the file the error names) still says patch 16
    assert files == snapshot(tmp_path / "checkpoints" / "mine")
    assert "patch_size: 16" in (tmp_path / "checkpoints" / "mine" / "options.yaml").read_text()
