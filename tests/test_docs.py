"""The documentation stays true to the code: every relative link resolves (anchors included), every option
in the schema is described in docs/training.md, every test a page cites exists, and the README stays a
five-minute page."""
import re

import pytest

from ahiq.options import DEFAULTS, TYPES
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


def leaf_options(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix + key not in TYPES:
            yield from leaf_options(value, prefix + key + ".")
        else:
            yield prefix + key


def test_every_option_is_described_in_the_training_doc():
    text = (ROOT / "docs" / "training.md").read_text()
    table = text[text.index("## Options"):]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    missing = [key for key in leaf_options(DEFAULTS) if not any(f"`{key}`" in row.split(" | ")[0] for row in rows)]
    assert not missing, f"options without a row in docs/training.md: {missing}"


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
