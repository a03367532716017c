"""The documentation stays true to the code: every relative link resolves (anchors included), the options
table of docs/training.md is the one made from the schema, every test a page cites exists, and the README
stays a five-minute page."""
import json
import re
import sys

import pytest

from ahiq.options import SCHEMA
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "options" / "README.md",
         ROOT / "checkpoints" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in page.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target} ({linked} does not exist)"
        if anchor:
            assert anchor in anchors(linked), f"{page.name}: no heading for #{anchor} in {linked.name}"


def test_the_options_table_is_the_generated_one():
    """docs/training.md's table is made from ahiq/options.py's declarations: one row per option, in order."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from options_table import PAGE, with_table

    text = PAGE.read_text()
    assert with_table(text) == text, "docs/training.md's options table is outdated: run python scripts/options_table.py"
    rows = [line.split(" | ")[0].strip("| `") for line in text.splitlines() if line.startswith("| `")]
    assert rows[:len(SCHEMA)] == list(SCHEMA)


def test_cited_tests_exist():
    for page in PAGES:
        for file, name in re.findall(r"(tests/\w+\.py)::(\w+)", page.read_text()):
            assert f"def {name}(" in (ROOT / file).read_text(), f"{page.name} cites {file}::{name}, which does not exist"


def test_readme_is_a_five_minute_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "python train.py --opt" in readme and "python test.py" in readme and "python -m pytest -q tests" in readme


def test_reliability_counts_agree():
    """The README repeats the counts of docs/reliability.md; the fault count is the fault table's rows."""
    page = (ROOT / "docs" / "reliability.md").read_text()
    faults = int(re.search(r"\*\*(\d+) faults survived", page).group(1))
    bad = int(re.search(r"\*\*(\d+) bad inputs rejected", page).group(1))
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| fault |")]
    assert len(rows) == faults
    assert f"{faults} faults survived" in (ROOT / "README.md").read_text()
    assert f"{bad} bad inputs refused" in (ROOT / "README.md").read_text()


# ---- the README as a newcomer reads it; the paper's targets ----------------------------------------------------

def test_the_readme_scores_with_the_released_model_on_its_first_screen_after_the_quick_start():
    lines = (ROOT / "README.md").read_text().splitlines()
    demo = next(i for i, line in enumerate(lines) if "python train.py --opt options/demo.yaml" in line)
    tests = next(i for i, line in enumerate(lines) if line.strip() == "python -m pytest -q tests")
    score = next(i for i, line in enumerate(lines) if line.strip().startswith("python -m ahiq score --dist"))
    assert demo < tests < score < 40, (demo, tests, score)
    offline = next(i for i, line in enumerate(lines) if "python -m ahiq download --dir" in line)
    assert score < offline < 45


def test_the_readme_stays_under_800_words():
    assert len((ROOT / "README.md").read_text().split()) < 800


def paper_numbers(pairs):
    return [f"{a:.3f} / {b:.3f}" for a, b in pairs]


def test_every_target_in_reproducing_is_the_papers():
    """Each of the paper's figures (tests/data/paper_targets.json, copied from its tables) stands in
    docs/reproducing.md, in the row of its dataset, model or variant."""
    targets = json.loads((ROOT / "tests" / "data" / "paper_targets.json").read_text())
    rows = [line for line in (ROOT / "docs" / "reproducing.md").read_text().splitlines() if line.startswith("| ")]

    def row(*words):
        found = [r for r in rows if all(w in r for w in words)]
        assert found, words
        return found[0]

    for dataset, figures in targets["table2"].items():
        assert paper_numbers([figures])[0] in row(f"| {dataset} |", "run_splits.py")
    for model, phases in targets["table4"].items():
        line = row(f"| {model} ")
        assert all(f in line for f in paper_numbers([phases["validation"], phases["test"]]))
    for dataset, figures in targets["table5"].items():
        assert paper_numbers([figures])[0] in row(f"| {dataset} |", "<trained model>")
    for place, (plcc, srocc, main) in targets["table9"].items():
        assert f"| {plcc:.3f} | {srocc:.3f} | {main:.3f} |" in row(f"({place})" if place == "1st" else f"| {place} |")
    ablations = [r for r in rows if r.startswith(("| 6 ", "| 7 ", "| 8 "))]
    for table in ("table6", "table7", "table8"):
        for variant, figures in targets[table].items():
            assert any(paper_numbers([figures])[0] in r for r in ablations if r.startswith(f"| {table[-1]} ")), \
                (table, variant)


def test_every_ablation_row_is_reproducible_with_the_command_of_its_table():
    """Each row of Tables 6-8 in docs/reproducing.md says yes and names the option of the row that
    scripts/run_ablations.py trains; the script's figures are the paper's (tests/data/paper_targets.json)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from run_ablations import AHIQ, TABLES

    targets = json.loads((ROOT / "tests" / "data" / "paper_targets.json").read_text())
    page = (ROOT / "docs" / "reproducing.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith(("| 6 ", "| 7 ", "| 8 "))]
    assert len(rows) == sum(len(table.rows()) for table in TABLES.values())
    for number, table in TABLES.items():
        assert [list(row.paper[:2]) for row in table.rows()] == list(targets[f"table{number}"].values())
        for row in table.rows():
            key = next(iter(row.variant), {6: "fusion", 7: "cnn", 8: "pooling"}[number])
            value = {**AHIQ, **row.variant}[key]
            line = next(r for r in rows if r.startswith(f"| {number} ") and f"`model.{key}={value}`" in r)
            assert f"{row.paper[0]:.3f} / {row.paper[1]:.3f}" in line and "| yes |" in line, line
    assert "python scripts/run_ablations.py --table 6 --opt options/pipal.yaml" in page


def test_the_copied_targets_are_the_posters():
    """tests/data/paper_targets.json against the poster's text in ../shared (skipped in a user's clone)."""
    poster = ROOT.parent / "shared" / "paper" / "001_1e0261913f4c7d95.txt"
    if not poster.is_file():
        pytest.skip(f"{poster} not available")
    text = poster.read_text()
    targets = json.loads((ROOT / "tests" / "data" / "paper_targets.json").read_text())
    assert "AHIQ (ours)\t0.989\t0.984\t0.978\t0.975\t0.968\t0.962" in text  # Table 2, one line
    assert "AHIQ (ours)\t0.845\t0.835\t0.823\t0.813" in text and "AHIQ-C (ours)\t0.865\t0.852\t0.828\t0.822" in text
    assert "AHIQ (ours)\t0.911/0.920\t0.861/0.865\t0.804/0.763" in text
    assert "Ours\t0.828\t0.822\t1.651" in text and "0.827\t0.815\t1.642" in text
    flat = [f"{x:.3f}" for table in ("table6", "table7", "table8") for pair in targets[table].values() for x in pair]
    assert all(number in text for number in flat)
    sys.path.insert(0, str(ROOT / "scripts"))
    from run_ablations import TABLES

    for table in (TABLES[7], TABLES[8]):  # the main scores, as the poster rounds them
        assert all("\t".join(f"{x:.3f}" for x in row.paper) in text for row in table.rows())
    assert targets["table2"] == {"LIVE": [0.989, 0.984], "CSIQ": [0.978, 0.975], "TID2013": [0.968, 0.962]}


def test_the_ensemble_line_of_reproducing_parses_to_a_list_of_checkpoints(tmp_path):
    """The AHIQ-C command as written: its quoted override gives test.checkpoint a list of two paths."""
    from ahiq.options import load_options

    text = (ROOT / "docs" / "reproducing.md").read_text()
    override = re.search(r'"(test\.checkpoint=\[[^\]]+\])"', text).group(1)
    opt = load_options(ROOT / "options" / "ntire2022_test.yaml", [override])
    assert opt["test"]["checkpoint"] == ["checkpoints/ahiq_pipal/best.pth", "checkpoints/ahiq_pipal_2/best.pth"]
    assert opt["name"] == "ntire2022_test"  # the submission is written beside, not into, the training's folder
