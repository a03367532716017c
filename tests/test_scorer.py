import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ahiq import AHIQ, Scorer
from ahiq.data import DatasetError, read_image
from ahiq.data.crops import eval_crop_positions
from ahiq.data.datasets import to_tensor
from ahiq.data.synthetic import distort, reference_image
from ahiq.data.pairs import pair_files
from conftest import TINY
from trees import touch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tmp_path):
    """A checkpoint with its backbones in it, and image pairs of two sizes in dist/ and ref/ folders."""
    model = AHIQ(8, False, False, **TINY, freeze_backbones=False)
    model.save_checkpoint(tmp_path / "model.pth")
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.png", (80, 100)), ("b.png", (72, 72))):
        ref = reference_image(rng, max(h, w))[:h, :w]
        touch(tmp_path / "ref" / name, ref)
        touch(tmp_path / "dist" / name.upper(), distort(ref, "noise", 3, rng))
    return tmp_path


def test_score_two_files_equals_a_hand_computed_crop_ensemble(setup):
    scorer = Scorer(setup / "model.pth", vit_pretrained=False, cnn_pretrained=False, num_crops=5)
    got = scorer.score(setup / "dist" / "A.PNG", setup / "ref" / "a.png")
    model = AHIQ.from_pretrained(setup / "model.pth", vit_pretrained=False, cnn_pretrained=False).eval()
    dist, ref = read_image(setup / "dist" / "A.PNG"), read_image(setup / "ref" / "a.png")
    positions = eval_crop_positions(80, 100, 64, "random", 5, 0, "a.png")  # seeded by the reference
    crop = lambda im: torch.stack([to_tensor(im[t:t + 64, l:l + 64]) for t, l in positions])
    with torch.no_grad():
        expected = model(crop(dist), crop(ref)).mean().item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_folders_paired_by_name_with_different_sizes(setup):
    pairs = pair_files(setup / "dist", setup / "ref")
    assert [(Path(p.dist).name, Path(p.ref).name) for p in pairs] == [("A.PNG", "a.png"), ("B.PNG", "b.png")]
    scores = Scorer(setup / "model.pth", vit_pretrained=False, cnn_pretrained=False, crops="five").score_pairs(pairs)
    assert scores.shape == (2,) and np.isfinite(scores).all() and scores[0] != scores[1]


def test_unpaired_and_mismatched_images_are_refused(setup):
    touch(setup / "dist" / "c.png", np.zeros((72, 72, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"1 images have no partner of the same name: c.png \(only in .*dist\)"):
        pair_files(setup / "dist", setup / "ref")
    touch(setup / "ref" / "c.png", np.zeros((72, 80, 3), np.uint8))
    scorer = Scorer(setup / "model.pth", vit_pretrained=False, cnn_pretrained=False)
    with pytest.raises(DatasetError, match="c.png is 72x72 but its reference .*c.png is 72x80"):
        scorer.score_pairs(pair_files(setup / "dist", setup / "ref"))
    touch(setup / "small_d.png", np.zeros((40, 40, 3), np.uint8))
    touch(setup / "small_r.png", np.zeros((40, 40, 3), np.uint8))
    with pytest.raises(DatasetError, match="smaller than the 64x64 crop"):
        scorer.score(setup / "small_d.png", setup / "small_r.png")


def test_command_line_csv_in_and_out(setup):
    (setup / "pairs.csv").write_text("dist,ref\ndist/A.PNG,ref/a.png\ndist/B.PNG,ref/b.png\n")
    run = subprocess.run([sys.executable, "-m", "ahiq", "score", "--pairs", str(setup / "pairs.csv"),
                          "--checkpoint", str(setup / "model.pth"), "--vit-pretrained", "false",
                          "--cnn-pretrained", "false", "--crops", "five", "--out", str(setup / "scores.csv"),
                          "--crop-chunk", "3", "--batch-size", "2"],  # scores do not depend on these
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(open(setup / "scores.csv")))
    assert [Path(r["dist"]).name for r in rows] == ["A.PNG", "B.PNG"]
    expected = Scorer(setup / "model.pth", vit_pretrained=False, cnn_pretrained=False, crops="five").score_pairs(
        pair_files(setup / "dist", setup / "ref"))
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected, atol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "ahiq", "score", "--dist", str(setup / "dist"), "--ref",
                          str(setup / "nowhere"), "--checkpoint", str(setup / "model.pth")],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nowhere does not exist" in bad.stderr


def test_a_folder_of_distorted_images_against_one_reference_file(setup):
    pairs = pair_files(setup / "dist", setup / "ref" / "b.png")
    assert [Path(p.dist).name for p in pairs] == ["A.PNG", "B.PNG"] and {Path(p.ref).name for p in pairs} == {"b.png"}
    with pytest.raises(DatasetError, match="got the file .*a.png and the folder"):
        pair_files(setup / "ref" / "a.png", setup / "dist")


def test_help_and_zoo_answer_without_importing_torch():
    """What made `python -m ahiq --help` take 8 s: torch (and timm) imported before argparse ran."""
    script = ("import sys\nfrom ahiq.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              "main(['zoo'])\nprint(sorted(m for m in ('torch', 'timm', 'cv2') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m ahiq" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]"


def test_a_usage_error_is_one_line_naming_the_command(capsys):
    from ahiq.cli import main

    for argv, said in ((["score", "--dist", "x.png"], "give --dist and --ref, or --pairs"),
                       (["compare", "a", "b", "--by", "image"], "argument --by: invalid choice: 'image'"),
                       (["score", "--crops", "ten"], "argument --crops: invalid choice: 'ten'")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and said in err, err
        assert err.startswith(f"error: python -m ahiq {argv[0]}: ") and f"(see python -m ahiq {argv[0]} --help)" in err


def test_every_way_of_scoring_files_is_a_pair_scorer_with_the_same_scores(setup):
    """Scorer, the metric and a baseline implement ahiq.scoring.protocol.PairScorer (the ONNX scorer: test_onnx.py);
    the scorer and the metric, from one checkpoint, score the same files alike."""
    from ahiq import create_metric
    from ahiq.scoring.baselines import BaselineScorer
    from ahiq.scoring.protocol import PairScorer

    pairs = pair_files(setup / "dist", setup / "ref")
    scorer = Scorer(setup / "model.pth", vit_pretrained=False, cnn_pretrained=False, num_crops=3)
    metric = create_metric(setup / "model.pth", vit_pretrained=False, cnn_pretrained=False, num_crops=3, device="cpu")
    baseline = BaselineScorer("psnr", torch.device("cpu"))
    for way in (scorer, metric, baseline):
        assert isinstance(way, PairScorer), type(way)
        way.check(pairs)
        assert way.describe() and way.settings()
    np.testing.assert_allclose(metric.score_pairs(pairs), scorer.score_pairs(pairs), rtol=0, atol=1e-6)
    assert scorer.settings() == metric.settings()
    with pytest.raises(ValueError, match="psnr has no quality maps"):
        baseline.check_maps()
