"""Baseline metrics scored by test.py on the same test part, and python -m ahiq compare over the result
folders: numbers against independent computations, refusals in one line, a killed run continued."""
import contextlib
import csv
import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from ahiq.cli import main
from ahiq.cli import test_command as run_test_command
from ahiq.data import read_image
from ahiq.engine.compare import latex_escape
from conftest import ROOT, TINY

piq = pytest.importorskip("piq", reason="the baselines need the optional extra: pip install -e '.[baselines]'")

DEMO = [f"model.{k}={v}" for k, v in TINY.items()] + ["data.options={references: 8, size: 72}", "data.num_workers=0",
                                                      "test.bootstrap.resamples=200"]


def run_in(folder: Path, args: list[str]) -> int:
    """test.py's command line run from ``folder``: its checkpoints/ is the folder's, not the clone's (where a
    trained demo would be found and tested)."""
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(folder):
        return run_test_command(args)


def run_test_py(tmp_path, *overrides):
    """test.py's command line on the demo options in ``tmp_path`` (its own data and experiment folders)."""
    return run_in(tmp_path, ["--opt", str(ROOT / "options" / "demo.yaml"), f"data.root={tmp_path / 'data'}",
                             f"test.output={tmp_path / 'test'}", *DEMO, *overrides])


@pytest.fixture(scope="module")
def demo_results(tmp_path_factory):
    """test.baselines=[psnr,ssim] on the demo, no model trained: the baselines alone."""
    folder = tmp_path_factory.mktemp("baselines")
    assert run_test_py(folder, "test.baselines=[psnr,ssim]") == 0
    return folder


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_psnr_is_ten_log10_of_one_over_the_mse(demo_results):
    pairs = rows(demo_results / "test" / "baselines" / "psnr" / "pairs.csv")
    scores = dict(line.split(",") for line in (demo_results / "test" / "baselines" / "psnr" / "results.txt")
                  .read_text().splitlines())
    assert len(pairs) == len(scores) == 50  # 2 test references x 25
    for row in pairs:
        dist = read_image(demo_results / "data" / row["name"]).astype(float) / 255
        ref = read_image(row["ref"]).astype(float) / 255
        assert float(scores[row["name"]]) == pytest.approx(10 * math.log10(1 / np.mean((dist - ref) ** 2)), abs=2e-4)


def test_lower_is_better_metrics_are_negated(tmp_path):
    from ahiq.scoring.baselines import BaselineScorer
    from ahiq.data import Pairs, Pair
    from trees import touch

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    touch(tmp_path / "r.png", ref)
    touch(tmp_path / "d.png", np.clip(ref + rng.normal(0, 20, ref.shape), 0, 255).astype(np.uint8))
    pairs = Pairs([Pair(str(tmp_path / "r.png"), str(tmp_path / "d.png"), float("nan"), "d.png")])
    x, y = (torch.from_numpy(read_image(tmp_path / n)).permute(2, 0, 1)[None].float() / 255 for n in ("d.png", "r.png"))
    got = BaselineScorer("gmsd", torch.device("cpu")).score_pairs(pairs)[0]
    assert got == pytest.approx(-float(piq.gmsd(x, y, data_range=1.0)), rel=1e-6) and got < 0
    assert BaselineScorer("ssim", torch.device("cpu")).score_pairs(pairs)[0] == \
        pytest.approx(float(piq.ssim(x, y, data_range=1.0)), rel=1e-6)


def test_the_baselines_alone_are_scored_without_a_trained_model(demo_results, tmp_path, capsys):
    for name in ("psnr", "ssim"):
        folder = demo_results / "test" / "baselines" / name
        for file in ("results.txt", "pairs.csv", "metrics.json", "distortions.csv", "groups.csv", "scatter.png",
                     "scatter.pdf", "groups.png", "groups.pdf"):
            assert (folder / file).is_file(), (name, file)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["label"] == {"psnr": "PSNR", "ssim": "SSIM"}[name] and metrics["metric"] == name
    low, high = metrics["srocc_ci"]  # SSIM's
    assert low <= metrics["srocc"] <= high
    # the demo's MOS is PSNR (rounded): SROCC 1 nearly, in nearly every resample (so no interval)
    assert json.loads((demo_results / "test" / "baselines" / "psnr" / "metrics.json").read_text())["srocc"] > 0.9999
    assert not (demo_results / "test" / "results.txt").exists()  # no AHIQ was tested, nor the released model
    # a bare python test.py (the released model when nothing is trained) with baselines does not fall back either
    assert run_in(tmp_path, [f"test.output={tmp_path / 'bare'}", f"data.root={tmp_path / 'none'}", "data.dataset=synthetic",
                         "data.val=null", "data.test=null", "test.baselines=[psnr]", "name=bare", *DEMO[-3:]]) == 0
    out = capsys.readouterr().out
    assert "released model" not in out and "scoring the baselines alone (psnr)" in out


def independent_fit(pred, target):
    def f(x, b1, b2, b3, b4):
        return (b1 - b2) / (1 + np.exp(-(x - b3) / abs(b4))) + b2
    params, _ = optimize.curve_fit(f, pred, target, p0=[target.max(), target.min(), pred.mean(), pred.std() / 4],
                                   maxfev=20000)
    return f(pred, *params)


def test_compare_reads_the_folders_and_tests_every_pair(demo_results, tmp_path, capsys):
    folders = [demo_results / "test" / "baselines" / n for n in ("psnr", "ssim")]
    assert main(["compare", str(folders[0]), str(folders[1] / "results.txt"), "--out", str(tmp_path / "cmp"),
                 "--resamples", "200"]) == 0  # a folder, or its results.txt
    for file in ("compare.md", "compare.csv", "compare.tex", "compare.png", "compare.pdf"):
        assert (tmp_path / "cmp" / file).is_file()
    tests = {r["test"]: r for r in rows(tmp_path / "cmp" / "compare.csv")}
    assert list(rows(tmp_path / "cmp" / "compare.csv")[0]) == ["a", "b", "test", "statistic", "p", "significant"]
    assert set(tests) == {"williams_srocc", "williams_plcc", "f_residuals"}
    data = [rows(f / "pairs.csv") for f in folders]
    target = np.array([float(r["target"]) for r in data[0]])
    a, b = (np.array([float(r["score"]) for r in d]) for d in data)
    # Williams' SROCC test: Steiger's formula, computed here from scipy's Spearman correlations
    r12, r13, r23 = stats.spearmanr(a, target)[0], stats.spearmanr(b, target)[0], stats.spearmanr(a, b)[0]
    n = len(target)
    det = np.linalg.det([[1, r12, r13], [r12, 1, r23], [r13, r23, 1]])
    t = (r12 - r13) * math.sqrt((n - 1) * (1 + r23) / (2 * (n - 1) / (n - 3) * det + ((r12 + r13) / 2) ** 2
                                                       * (1 - r23) ** 3))
    assert float(tests["williams_srocc"]["statistic"]) == pytest.approx(t, abs=1e-6)
    assert float(tests["williams_srocc"]["p"]) == pytest.approx(2 * stats.t.sf(abs(t), n - 3), abs=1e-6)
    # the F statistic: the ratio of the residual variances after each model's logistic fit
    ratio = np.var(target - independent_fit(a, target)) / np.var(target - independent_fit(b, target))
    assert float(tests["f_residuals"]["statistic"]) == pytest.approx(ratio, rel=1e-4)
    for row in tests.values():
        assert int(row["significant"]) == (0 if float(row["p"]) >= 0.05 else int(row["significant"])) != 0 or \
            float(row["p"]) >= 0.05
    printed = capsys.readouterr().out
    assert "Williams' test on SROCC" in printed and "| PSNR |   | 1 |" in printed  # the diagonal blank


def test_compare_refuses_results_over_other_images(demo_results, tmp_path, capsys):
    other = tmp_path / "other"
    assert run_test_py(other, "test.baselines=[psnr]", "data.split.seed=1") == 0  # another split: other test images
    code = subprocess.run([sys.executable, "-m", "ahiq", "compare", str(demo_results / "test" / "baselines" / "psnr"),
                           str(other / "test" / "baselines" / "psnr")], capture_output=True, text=True, cwd=tmp_path)
    assert code.returncode == 2 and "Traceback" not in code.stderr
    assert len(code.stderr.strip().splitlines()) == 1 and "pair names differ" in code.stderr, code.stderr
    psnr = demo_results / "test" / "baselines" / "psnr"
    capsys.readouterr()
    for args, said in (([psnr, psnr / "results.txt"], "are the same result folder: give each model's once"),
                       ([psnr, tmp_path], f"{tmp_path} is not a test.py result folder: results.txt, pairs.csv and metrics.json are missing in "
                                    f"{tmp_path} (written by python test.py with a labelled test part)")):
        assert main(["compare", *map(str, args)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, err
    with pytest.raises(SystemExit) as usage:  # one folder: the usage
        main(["compare", str(demo_results / "test" / "baselines" / "psnr")])
    assert usage.value.code == 2 and "give two or more result folders" in capsys.readouterr().err


def test_compare_tex_is_a_tabular_latex_accepts(demo_results, tmp_path):
    assert main(["compare", *(str(demo_results / "test" / "baselines" / n) for n in ("psnr", "ssim")),
                 "--out", str(tmp_path), "--resamples", "0"]) == 0
    tex = (tmp_path / "compare.tex").read_text()
    lines = tex.strip().splitlines()
    assert lines[0].startswith(r"\begin{tabular}{l") and lines[-1] == r"\end{tabular}"
    columns = len(lines[0][len(r"\begin{tabular}{"):-1])
    body = [line for line in lines if line.endswith(r"\\")]
    assert [line.count("&") for line in body[1:]] == [columns - 1] * (len(body) - 1)
    assert tex.count("{") == tex.count("}") and r"\textbf{" in tex
    assert main(["compare", *(str(demo_results / "test" / "baselines" / n) for n in ("psnr", "ssim")), "--out",
                 str(tmp_path / "named"), "--resamples", "0", "--names", "PSNR (dB)", "SSIM_rgb"]) == 0
    assert "\nPSNR (dB) & " in (tmp_path / "named" / "compare.tex").read_text()
    assert "\nSSIM\\_rgb & " in (tmp_path / "named" / "compare.tex").read_text()  # escaped for LaTeX
    assert latex_escape("a_b & 50% #1") == r"a\_b \& 50\% \#1"
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex is not installed here: the table's structure was checked, not compiled")
    (tmp_path / "paper.tex").write_text("\\documentclass{article}\\begin{document}\\input{compare.tex}\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "paper.tex"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0 and (tmp_path / "paper.pdf").is_file(), done.stdout[-2000:]


def test_an_unknown_baseline_is_refused_listing_the_known_ones(tmp_path, capsys):
    assert run_test_py(tmp_path, "test.baselines=[psnr,niqe]") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown 'niqe'" in err and "psnr, ssim, ms_ssim" in err and "dists" in err


def test_missing_learned_weights_offline_end_the_run_before_any_pair(tmp_path, capsys, monkeypatch):
    (tmp_path / "weights").mkdir()
    monkeypatch.setenv("AHIQ_WEIGHTS", str(tmp_path / "weights"))
    assert run_test_py(tmp_path, "test.baselines=[psnr,lpips]") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lpips_weights.pt" in err and "vgg16-397923af.pth" in err
    assert str(tmp_path / "weights") in err and "python -m ahiq download --dir D lpips" in err
    assert not (tmp_path / "test" / "baselines").exists()  # not even PSNR was scored


def test_images_too_small_for_a_metric_are_refused_before_any_pair(tmp_path, capsys):
    assert run_test_py(tmp_path, "test.baselines=[psnr,ms_ssim]") == 2  # the demo's 72-pixel images: MS-SSIM needs 161
    err = capsys.readouterr().err
    assert "smaller than the 161x161 ms_ssim needs" in err and "Traceback" not in err
    assert not (tmp_path / "test" / "baselines").exists()


@pytest.mark.slow
def test_a_killed_baseline_run_continues_where_it_stopped(tmp_path):
    command = [sys.executable, str(ROOT / "tests" / "faults.py"), "test-journal:1", "--opt",
               str(ROOT / "options" / "demo.yaml"), f"data.root={tmp_path / 'data'}", f"test.output={tmp_path / 'test'}",
               *DEMO, "test.baselines=[psnr]"]
    killed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    journal = tmp_path / "test" / "baselines" / "psnr" / "scores.csv.part0"
    kept = journal.read_text().splitlines()
    assert len(kept) == 25  # the first reference's 25 pairs
    done = subprocess.run([sys.executable, str(ROOT / "test.py"), *command[3:]], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming: 25 of 50 pairs already scored" in done.stderr
    scores = rows(tmp_path / "test" / "baselines" / "psnr" / "scores.csv")
    assert len(scores) == 50 and not journal.exists()


def test_the_learned_metrics_weights_are_found_by_the_projects_rule_and_handed_to_piq(tmp_path, monkeypatch):
    """LPIPS's files in a weights folder (AHIQ_WEIGHTS): piq loads its layer weights and torchvision's VGG16 from
    them through torch.hub, nothing downloaded. The weights here are generated: the VGG16 file stands for the
    real one (its loading is torchvision's), the LPIPS layer weights are loaded by piq itself."""
    import piq.perceptual

    from ahiq.nn.zoo import download_names, files_for
    from ahiq.scoring.baselines import BaselineScorer

    files = files_for(["lpips", "dists"])
    assert [f.name for f in files] == ["vgg16-397923af.pth", "lpips_weights.pt", "dists_weights.pt"]
    assert download_names(files) == ["lpips", "dists"]
    weights = tmp_path / "weights"
    weights.mkdir()
    layers = [torch.full((1, c, 1, 1), 0.5) for c in (64, 128, 256, 512, 512)]
    torch.save(layers, weights / "lpips_weights.pt")
    (weights / "vgg16-397923af.pth").write_bytes(b"the VGG16 weights")
    seen = {}

    def vgg16(pretrained, progress):
        hub = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
        seen["vgg16"] = hub.read_bytes()
        import torchvision

        return torchvision.models.vgg16()

    monkeypatch.setattr(piq.perceptual, "vgg16", vgg16)
    monkeypatch.setenv("AHIQ_WEIGHTS", str(weights))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_before = torch.hub.get_dir()
    scorer = BaselineScorer("lpips", torch.device("cpu"))
    assert seen["vgg16"] == b"the VGG16 weights" and torch.hub.get_dir() == hub_before
    assert all(torch.equal(w, torch.full_like(w, 0.5)) for w in scorer.metric.weights)  # piq holds our layer weights
    from ahiq.data import Pair, Pairs
    from trees import touch

    rng = np.random.default_rng(0)
    for name in ("r.png", "d.png"):
        touch(tmp_path / name, rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    score = scorer.score_pairs(Pairs([Pair(str(tmp_path / "r.png"), str(tmp_path / "d.png"), float("nan"), "d")]))[0]
    assert np.isfinite(score) and score < 0  # a distance, negated


def test_every_declared_baseline_is_computed_by_what_it_names():
    """Each declaration's ``compute`` exists where it says (piq's function or class, or this project's), and the
    functions compute a finite score of a pair with the declared arguments."""
    from ahiq.registry.baselines import BASELINES
    from ahiq.scoring.baselines import build

    x, y = torch.rand(2, 1, 3, 192, 192, generator=torch.Generator().manual_seed(0))
    for name, baseline in BASELINES.items():
        module, function = baseline.compute.split(":")
        if baseline.learned:  # built with weights, which only their own test has
            assert module == "piq" and isinstance(getattr(piq, function), type), name
        else:
            assert torch.isfinite(build(baseline)(x, y)).all(), name
