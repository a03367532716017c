"""Distortion types and groups from each dataset's own naming, and test.py's per-type and per-group tables on
trees laid out as each dataset is distributed: generated label files (every clone), and the real ones from
../shared/iqa-meta (skipped without it). test.py scores them with the PSNR baseline alone (no model: the
tables are what is tested), on generated images."""
import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import stats
from scipy.io import savemat

from ahiq.data import read_labels
from ahiq.registry.datasets import taxonomy
from ahiq.engine.testing import run_test
from ahiq.options import load_options
from trees import LIVE_FOLDERS, META, csiq_tree, kadid_tree, live_tree, meta, pipal_tree, tid_tree

pytest.importorskip("piq", reason="the PSNR baseline needs the optional extra: pip install -e '.[baselines]'")

IMAGES = (".bmp", ".png")


def fill_images(root: Path, kinds: int = 40) -> None:
    """Every empty image file under ``root`` gets one of ``kinds`` random 8 x 8 images (decoded by content,
    whatever the letter case of its name), so that PSNR differs from pair to pair."""
    rng = np.random.default_rng(0)
    encoded = {ext: [cv2.imencode(ext, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))[1].tobytes()
                     for _ in range(kinds)] for ext in IMAGES}
    for i, path in enumerate(sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGES)):
        if path.stat().st_size == 0:
            path.write_bytes(encoded[path.suffix.lower()][(i * 7919) % kinds])


# ---- generated label files in each dataset's format: every type of its taxonomy ------------------------------

def generated_tid(folder: Path, types: int) -> Path:
    rng = np.random.default_rng(1)
    path = folder / "tid_labels.txt"
    path.write_text("".join(f"{rng.uniform(0, 9):.5f} i{r:02d}_{t:02d}_{lvl}.bmp\r\n" for r in range(1, 6)
                            for t in range(1, types + 1) for lvl in (1, 2)))
    return path


def generated_kadid(folder: Path) -> Path:
    rng = np.random.default_rng(2)
    path = folder / "kadid.csv"
    rows = [f"I{r:02d}_{t:02d}_{lvl:02d}.png,I{r:02d}.png,{rng.uniform(1, 5):.2f},{rng.uniform(0, 1.5):.3f}"
            for r in range(1, 6) for t in range(1, 26) for lvl in (1, 2)]
    path.write_text("dist_img,ref_img,dmos,var\n" + "\n".join(rows) + "\n")
    return path


def generated_csiq(folder: Path) -> Path:
    rng = np.random.default_rng(3)
    path = folder / "csiq.txt"
    path.write_text("".join(f"ref{r}.{token}.{lvl}.png {rng.uniform(0, 1):.4f}\n" for r in range(5)
                            for token in ("AWGN", "JPEG", "jpeg2000", "fnoise", "BLUR", "contrast") for lvl in (1, 2)))
    return path


def generated_pipal(folder: Path) -> Path:
    rng = np.random.default_rng(4)
    labels = folder / "Train_Label"
    labels.mkdir()
    for r in range(1, 6):
        (labels / f"A{r:04d}.txt").write_text("".join(f"A{r:04d}_{c:02d}_{i:02d}.bmp,{rng.uniform(1000, 1800):.4f}\n"
                                                      for c in range(7) for i in range(2)))
    return labels


def generated_live(folder: Path) -> tuple[Path, Path]:
    total = sum(n for _, n in LIVE_FOLDERS)
    rng = np.random.default_rng(5)
    orgs = (np.arange(total) % 5 == 0).astype(np.uint8)[None]
    refnames = np.empty((1, total), dtype=object)
    for i in range(total):
        refnames[0, i] = np.array([f"ref{i % 6}.bmp"])
    savemat(folder / "dmos.mat", {"dmos": rng.uniform(10, 80, (1, total)), "orgs": orgs})
    savemat(folder / "refnames_all.mat", {"refnames_all": refnames})
    return folder / "dmos.mat", folder / "refnames_all.mat"


def generated_tree(dataset: str, root: Path, labels: Path) -> None:
    labels.mkdir()
    if dataset in ("tid2013", "tid2008"):
        tid_tree(root, generated_tid(labels, 24 if dataset == "tid2013" else 17), 5)
    elif dataset == "kadid10k":
        kadid_tree(root, generated_kadid(labels))
    elif dataset == "csiq":
        csiq_tree(root, generated_csiq(labels))
    elif dataset == "pipal":
        pipal_tree(root, generated_pipal(labels))
    else:
        live_tree(root, *generated_live(labels))


def real_tree(dataset: str, root: Path) -> None:
    if dataset == "tid2013":
        tid_tree(root, meta("tid2013/mos_with_names.txt"), 25)
        shutil.copy(meta("tid2013/mos_std.txt"), root / "mos_std.txt")
    elif dataset == "tid2008":
        tid_tree(root, meta("tid2008/mos_with_names.txt"), 25)
    elif dataset == "kadid10k":
        kadid_tree(root, meta("kadid10k/dmos.csv"))
    elif dataset == "csiq":
        csiq_tree(root, meta("csiq/csiq_label.txt"))
    elif dataset == "pipal":
        pipal_tree(root, meta("pipal/Train_Label"))
    else:
        live_tree(root, meta("live/dmos.mat"), meta("live/refnames_all.mat"))


EXPECTED = {"live": (5, 5), "csiq": (6, 6), "tid2013": (24, 24), "tid2008": (17, 17), "kadid10k": (25, 7),
            "pipal": (7, 7)}  # (types, groups)


def test_the_named_taxonomies_have_the_datasets_counts():
    for dataset, (types, groups) in EXPECTED.items():
        classes = taxonomy(dataset)
        if dataset != "pipal":  # PIPAL's classes are not named: found by code
            assert len(classes.types) == types and len({classes.group(t) for t in classes.types}) == groups
    kadid = taxonomy("kadid10k")
    assert [kadid.name(c) for c in ("01", "10", "25")] == ["Gaussian blur", "JPEG", "Contrast change"]
    assert kadid.group("13") == "noise" and kadid.group_name("spatial") == "Spatial distortions"
    assert taxonomy("pipal").name("05") == "PIPAL class 05" and taxonomy("tid2013").name("24").startswith("Sparse")


def psnr_test(dataset: str, root: Path, out: Path, *overrides: str) -> Path:
    """test.py on the tree with the PSNR baseline alone (no trained model); its folder."""
    opt = load_options(None, ["name=tables", f"data.dataset={dataset}", f"data.root={root}", f"test.output={out}",
                              "test.baselines=[psnr]", "data.num_workers=0", *overrides])
    run_test(opt, out.parent / "checkpoints")
    return out / "baselines" / "psnr"


def assert_tables(dataset: str, root: Path, folder: Path, tables: Path) -> None:
    """distortions.csv and groups.csv: the expected counts, n adding up to the test part, and each type's and
    group's SROCC equal to scipy's on its rows of results.txt against the labels' scores."""
    types, groups = EXPECTED[dataset]
    by_type = list(csv.DictReader(open(folder / "distortions.csv")))
    by_group = list(csv.DictReader(open(folder / "groups.csv")))
    assert list(by_type[0]) == ["type", "name", "group", "n", "srocc", "plcc", "krocc"]
    assert list(by_group[0]) == ["group", "name", "n", "srocc", "plcc", "krocc"]
    scores = dict(line.split(",") for line in (folder / "results.txt").read_text().splitlines())
    assert len(by_type) == types and len(by_group) == groups
    assert sum(int(r["n"]) for r in by_type) == sum(int(r["n"]) for r in by_group) == len(scores)
    pairs = read_labels(dataset, root)
    labels, sign = {p.name: p for p in pairs}, 1 if pairs.higher_is_better else -1
    classes = taxonomy(dataset)
    for rows, key, of in ((by_type, "type", lambda code: code), (by_group, "group", classes.group)):
        for row in rows:
            names = [n for n in scores if of(labels[n].distortion) == row[key]]
            assert len(names) == int(row["n"])
            expected = stats.spearmanr([float(scores[n]) for n in names], [sign * labels[n].mos for n in names])[0]
            assert float(row["srocc"]) == pytest.approx(expected, abs=1e-6), (row, expected)


@pytest.mark.parametrize("dataset", list(EXPECTED))
def test_tables_on_generated_label_files(tmp_path, dataset):
    generated_tree(dataset, tmp_path / dataset, tmp_path / "labels")
    fill_images(tmp_path / dataset)
    # a 1:1 split by reference: 5 generated references leave 2 or 3 to test, every type in each
    folder = psnr_test(dataset, tmp_path / dataset, tmp_path / "out", "data.split.ratios=[1,1]",
                       "test.bootstrap.resamples=200")
    assert_tables(dataset, tmp_path / dataset, folder, tmp_path)
    metrics = json.loads((folder / "metrics.json").read_text())
    for key in ("srocc", "plcc"):  # the intervals hold the estimates, and repeat with their seed
        assert metrics[f"{key}_ci"][0] <= metrics[key] <= metrics[f"{key}_ci"][1], (key, metrics)
    assert metrics["intervals"]["units"] in (2, 3) and metrics["intervals"]["by"] == "reference"
    again = psnr_test(dataset, tmp_path / dataset, tmp_path / "again", "data.split.ratios=[1,1]",
                      "test.bootstrap.resamples=200")
    assert json.loads((again / "metrics.json").read_text()) == metrics
    assert ("outlier_ratio" in metrics) == (dataset == "kadid10k")  # the one generated set with rating spreads


@pytest.mark.slow
@pytest.mark.skipif(not META.is_dir(), reason=f"{META} not available")
@pytest.mark.parametrize("dataset", list(EXPECTED))
def test_tables_on_the_real_label_files(tmp_path, dataset):
    real_tree(dataset, tmp_path / dataset)
    fill_images(tmp_path / dataset)
    folder = psnr_test(dataset, tmp_path / dataset, tmp_path / "out", "test.bootstrap.resamples=0")
    assert_tables(dataset, tmp_path / dataset, folder, tmp_path)
