"""test.py's statistics, its outputs and ``python -m ahiq compare`` under faults and misuse: a statistic undefined for
the data is empty everywhere it appears (null, an empty cell, --), every JSON file is strict, result folders are read
as wholes, outputs that cannot be written are refused before the work and a write that fails midway loses nothing."""
import csv
import errno
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ahiq.cli import main
from ahiq.cli import test_command as run_test_py  # a name pytest does not collect
from ahiq.engine.correlations import correlate, pearson, spearman
from ahiq.engine.results import Results, analyse, write_report
from conftest import ROOT, TINY

N = 40


def strict_json(path: Path):
    """The file parsed by a reader that takes only JSON (no NaN, Infinity)."""
    def refuse(token):
        raise AssertionError(f"{path}: {token} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def write_results(folder: Path, label: str, score, rng=None) -> Path:
    """A test.py result folder of N pairs over 10 references, two distortion types, as test.py writes it."""
    rng = rng or np.random.default_rng(0)
    target = np.linspace(0, 1, N)
    results = Results(label, "csv", [f"d{i:02d}.png" for i in range(N)], [f"/r/r{i // 4}.png" for i in range(N)],
                      ["blur" if i % 2 else "noise" for i in range(N)], 5 * target, target, np.full(N, np.nan),
                      np.asarray(score, float))
    folder.mkdir(parents=True, exist_ok=True)
    results.write(folder)
    write_report(folder, results, analyse(results, 200, "reference", 0))
    return folder


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(1)
    good = write_results(tmp_path / "good", "good", np.linspace(0, 1, N) + rng.normal(0, 0.1, N))
    other = write_results(tmp_path / "other", "other", np.linspace(0, 1, N) + rng.normal(0, 0.3, N))
    constant = write_results(tmp_path / "constant", "collapsed", np.full(N, 0.1))  # an untrained or collapsed model
    return good, other, constant


def test_a_constant_array_has_no_correlation_however_its_mean_rounds():
    x = np.full(7, 0.1)  # 7 x 0.1 / 7 is not 0.1 in floating point: the centred values are not all zero
    assert math.isnan(pearson(x, np.arange(7.0))) and math.isnan(spearman(np.arange(7.0), x))
    metrics = correlate(x, np.arange(7.0))
    assert metrics["undefined"] == "constant predictions" and metrics["logistic"] is None
    assert all(math.isnan(metrics[k]) for k in ("plcc", "srocc", "krocc", "main", "plcc_fitted", "rmse_fitted"))
    assert correlate([1.0, 2.0], [2.0, 1.0])["undefined"] == "fewer than 3 pairs"
    assert correlate([1.0, math.nan, 3.0], [1.0, 2.0, 3.0])["undefined"] == "a value that is not a finite number"


def test_a_collapsed_models_statistics_are_null_and_empty_in_every_file(folders, capsys):
    _, _, constant = folders
    metrics = strict_json(constant / "metrics.json")
    for key in ("srocc", "plcc", "krocc", "main", "plcc_fitted", "rmse_fitted", "srocc_ci", "plcc_ci"):
        assert metrics[key] is None, key
    assert metrics["rmse"] > 0 and metrics["undefined"] == "constant predictions"  # the RMSE is defined
    for name in ("distortions.csv", "groups.csv"):
        rows = list(csv.DictReader(open(constant / name)))
        assert rows and all(row[k] == "" for row in rows for k in ("srocc", "plcc", "krocc")), rows
    write_report(constant, Results.read(constant), analyse(Results.read(constant), 50, "reference", 0))
    out = capsys.readouterr().out
    assert "SROCC -- PLCC -- KROCC -- RMSE" in out and "(undefined: constant predictions)" in out and "nan" not in out


def test_compare_leaves_every_test_of_an_undefined_correlation_empty(folders, tmp_path, capsys):
    good, other, constant = folders
    out = tmp_path / "cmp"
    assert main(["compare", str(good), str(other), str(constant), "--out", str(out), "--resamples", "50"]) == 0
    rows = list(csv.DictReader(open(out / "compare.csv")))
    for row in rows:
        involved = "collapsed" in (row["a"], row["b"])
        undefined = involved and row["test"] in ("williams_srocc", "williams_plcc", "f_residuals")
        assert (row["statistic"] == row["p"] == row["significant"] == "") is undefined, row
    markdown = (out / "compare.md").read_text()
    assert "| collapsed | -- | -- | -- | -- |" in markdown and "nan" not in markdown.lower()
    assert "| good | - |" not in markdown  # the diagonal is blank, the undefined cells --
    collapsed = [line for line in markdown.splitlines() if line.startswith("| collapsed |")]
    assert all(" 0 " not in line and " 1 " not in line for line in collapsed[1:]), collapsed
    assert "collapsed & -- & --" in (out / "compare.tex").read_text()


def test_result_folders_are_read_as_wholes_each_problem_named_with_its_file_and_line(folders, tmp_path, capsys):
    good, other, _ = folders

    def refused(folder: Path, said: str) -> None:
        assert main(["compare", str(good), str(folder), "--out", str(tmp_path / "cmp")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and said in err and "Traceback" not in err, err

    def copy(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file in other.iterdir():
            if file.is_file():
                (folder / file.name).write_bytes(file.read_bytes())
        return folder

    repeated = copy("repeated")
    lines = (repeated / "pairs.csv").read_text().splitlines()
    lines[5] = lines[4]  # pair d03 twice (lines 5 and 6 of the file), pair d04 gone
    (repeated / "pairs.csv").write_text("\n".join(lines) + "\n")
    refused(repeated, f"{repeated / 'pairs.csv'}:6: the pair 'd03.png' is listed twice (first at line 5)")
    damaged = copy("damaged_metrics")
    (damaged / "metrics.json").write_text('{"label": "other", "n": 40, "srocc": 0.9')
    refused(damaged, f"{damaged / 'metrics.json'} cannot be read")
    counted = copy("miscounted")
    metrics = strict_json(counted / "metrics.json")
    (counted / "metrics.json").write_text(json.dumps({**metrics, "n": 39}))
    refused(counted, f"{counted / 'metrics.json'} is of 39 pairs, {counted / 'pairs.csv'} holds 40")
    edited = copy("edited_score")
    lines = (edited / "results.txt").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",0.999999"
    (edited / "results.txt").write_text("\n".join(lines) + "\n")
    refused(edited, f"{edited / 'results.txt'}:3: ")
    word = copy("word_score")
    lines = (word / "pairs.csv").read_text().splitlines()
    lines[3] = ",".join(lines[3].split(",")[:-1] + ["high"])
    (word / "pairs.csv").write_text("\n".join(lines) + "\n")
    refused(word, f"{word / 'pairs.csv'}:4: score 'high' is not a number")
    lost = copy("no_results")
    (lost / "results.txt").unlink()
    refused(lost, f"{lost} is not a test.py result folder: results.txt is missing in {lost}")
    both = copy("both_repeat")  # two folders repeating the same name: still refused, not silently matched
    lines = (both / "pairs.csv").read_text().splitlines()
    lines[5] = lines[4]
    (both / "pairs.csv").write_text("\n".join(lines) + "\n")
    assert main(["compare", str(repeated), str(both), "--out", str(tmp_path / "cmp")]) == 2
    assert "is listed twice" in capsys.readouterr().err


def read_only(folder: Path):
    """Make ``folder`` unwritable for this process, as a read-only mount would: the immutable flag where the tests
    run as root (whom permissions do not stop), else its permissions. None where neither can be had."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if done.returncode:
        return None
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_unwritable_output_is_refused_before_the_work(folders, tmp_path, capsys):
    good, other, _ = folders
    locked = tmp_path / "locked"
    undo = read_only(locked)
    if undo is None:
        pytest.skip("no way to make a folder read-only here (root without chattr)")
    try:
        assert main(["compare", str(good), str(other), "--out", str(locked)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--out {locked}: cannot write in {locked} (" in err, err
        opt_file = ROOT / "options" / "demo.yaml"
        code = run_test_py(["--opt", str(opt_file), f"data.root={tmp_path / 'data'}", "data.options={references: 5}",
                             f"test.output={locked / 'test'}", "test.checkpoint=pipal", "model.weights=" + str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and f"test.output {locked / 'test'}: cannot write in {locked} (" \
            in err, err
        assert not (tmp_path / "torch").exists()  # refused before any model was sought
    finally:
        undo()


def test_a_full_disk_while_writing_loses_nothing_and_leaves_no_temporary_file(folders, tmp_path, capsys, monkeypatch):
    """compare and test.py's report: the write that fails is one line, exit 1; the files written before are whole,
    the one that failed is as it was, and nothing half-written is left beside them."""
    import ahiq.files as files

    good, other, _ = folders
    out = tmp_path / "cmp"
    assert main(["compare", str(good), str(other), "--out", str(out), "--resamples", "20"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = files.os.replace
    written = []

    def full_at_the_third(source, target):
        written.append(target)
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(files.os, "replace", full_at_the_third)
    assert main(["compare", str(good), str(other), "--out", str(out), "--resamples", "20", "--names", "A", "B"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and str(written[2]) in err, err
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before)  # no temporary file
    assert after[Path(written[2]).name] == before[Path(written[2]).name]  # the one that failed: as it was
    assert b"| A |" in after["compare.md"]  # the ones before it: the new, whole


def test_misuse_of_the_bootstrap_maps_and_compare_is_one_line(folders, tmp_path, capsys):
    good, other, _ = folders
    demo = str(ROOT / "options" / "demo.yaml")
    for overrides, said in ((["test.bootstrap.resamples=-5"], "option 'test.bootstrap.resamples' must be at least 0"),
                            (["test.bootstrap.resamples=1000000000"], "must be at most 100000"),
                            (["test.bootstrap.by=image"], "option 'test.bootstrap.by' must be one of reference, pair"),
                            (["test.bootstrap.seed=1.5"], "option 'test.bootstrap.seed' must be int"),
                            (["test.maps=-1"], "option 'test.maps' must be at least 0"),
                            (["test.baselines=psnr"], "option 'test.baselines' must be list"),
                            (["test.baselines=[psnr, psnr]"], "a name repeated")):
        assert run_test_py(["--opt", demo, *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and said in err, (overrides, err)
    for argv, said in ((["--resamples", "1000000000"], "argument --resamples: must be at least 0 and at most 100000"),
                       (["--names", "A"], "--names: give one distinct name per result folder (2)"),
                       (["--names", "A", "A"], "--names: give one distinct name per result folder"),
                       (["--out", str(good / "metrics.json")], "is a file; give a folder")):
        try:
            code = main(["compare", str(good), str(other), *argv])
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and said in err and "Traceback" not in err, (argv, err)


@pytest.mark.slow
def test_maps_of_an_unlabelled_or_baseline_only_test_are_refused_before_scoring(tmp_path, capsys):
    """test.maps needs AHIQ's predictions and labels: refused, in one line, for an NTIRE submission and for the
    baselines alone, before any model is loaded."""
    from ahiq.nn.model import AHIQ

    demo = str(ROOT / "options" / "demo.yaml")
    data = [f"data.root={tmp_path / 'data'}", "data.options={references: 5, size: 72}",
            *(f"model.{k}={v}" for k, v in TINY.items())]
    folder = tmp_path / "ntire"
    (folder / "Ref").mkdir(parents=True)
    (folder / "Dis").mkdir()
    import cv2

    image = np.random.default_rng(0).integers(0, 255, (72, 72, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "Ref" / "A0000.bmp"), image)
    cv2.imwrite(str(folder / "Dis" / "A0000_00_00.bmp"), image)
    checkpoint = tmp_path / "tiny.pth"
    AHIQ(8, False, False, **TINY, freeze_backbones=False).save_checkpoint(checkpoint)
    unlabelled = f"data.test={{dataset: pipal, root: {folder}, options: {{labels: null, ref_dir: Ref, dist_dirs: [Dis]}}}}"
    for overrides, said in (([unlabelled, f"test.checkpoint={checkpoint}"], "is unlabelled (an NTIRE submission)"),
                            (["test.baselines=[psnr]", "name=none_trained"], "no AHIQ model is tested")):
        code = run_test_py(["--opt", demo, *data, "test.maps=2", *overrides])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "test.maps 2: the maps" in err and said in err, err
