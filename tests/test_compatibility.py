"""What ahiq 0.2.0 wrote loads as it is: tests/data/experiment_0.2.0/ is a real experiment folder that
train.py wrote at commit e2a03c4 (the demo's options with a tiny model, one epoch; its latest.pth, options.yaml
and split.json), before the package's modules moved into subpackages. Its checkpoint must score as it did
then, and the folder must resume."""
import shutil

import cv2
import numpy as np
import pytest

import ahiq
from conftest import ROOT

FROZEN = ROOT / "tests" / "data" / "experiment_0.2.0"
SCORE_THEN = 0.11841432750225067  # Scorer(latest.pth, crops="five") on pair() at e2a03c4, on the CPU


def pair(folder):
    ref = np.random.default_rng(0).integers(0, 256, (40, 44, 3), np.uint8)
    cv2.imwrite(str(folder / "r.png"), ref)
    cv2.imwrite(str(folder / "d.png"), cv2.GaussianBlur(ref, (5, 5), 2))
    return folder / "d.png", folder / "r.png"


def test_a_checkpoint_of_0_2_0_scores_as_it_did(tmp_path):
    scorer = ahiq.Scorer(FROZEN / "latest.pth", vit_pretrained=False, cnn_pretrained=False, crops="five")
    assert scorer.score(*pair(tmp_path)) == pytest.approx(SCORE_THEN, abs=1e-6)


def test_an_experiment_folder_of_0_2_0_resumes(tmp_path):
    from ahiq.engine.training import train
    from ahiq.nn.weights import read_weight_file
    from ahiq.options import load_options

    folder = tmp_path / "checkpoints" / "frozen"
    shutil.copytree(FROZEN, folder)
    opt = load_options(FROZEN / "options.yaml", [f"data.root={tmp_path / 'data'}", "train.epochs=2",
                                                  "train.resume=auto", "data.num_workers=0"])
    before = read_weight_file(folder / "latest.pth")["epoch"]
    train(opt, checkpoints_root=tmp_path / "checkpoints")
    assert read_weight_file(folder / "latest.pth")["epoch"] == before + 1
    assert f"resumed from {folder / 'latest.pth'} after epoch 1" in (folder / "train.log").read_text()
