"""Each kind of choice is declared once (ahiq/registry/): a dataset, a fusion variant and a baseline added the way
docs/contributing.md says, one entry in one module of a copy of the tree, reach the options, train.py's --help,
docs/training.md's options table and scripts/run_ablations.py's tables, and are built from there."""
import json
import shutil
import subprocess
import sys

import pytest

from ahiq.registry import Choice, Registry
from ahiq.registry.datasets import DATASETS
from ahiq.registry.variants import AHIQ, TABLES
from conftest import ROOT

NEW = {  # module of ahiq/registry/ -> (its registry, the entry a contributor adds)
    "datasets": ("DATASETS", 'Dataset(name="mine", summary="a lab\'s own pairs", reader="ahiq.data.readers:read_custom_csv",'
                             ' taxonomy=Taxonomy({"blur": "Lens blur"}))'),
    "variants": ("FUSIONS", 'Fusion(name="late", summary="concatenation without the deformable convolution, a second '
                            'name", label="late", vit=True, cnn=True, deform=False)'),
    "baselines": ("BASELINES", 'Baseline(name="haarpsi", label="HaarPSI", compute="piq:haarpsi", arguments=_RANGE, '
                               'lower_is_better=False, min_size=2, summary="HaarPSI with piq\'s defaults")'),
}


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    """A copy of the tree with the three entries added, each to its module and nowhere else."""
    tree = tmp_path_factory.mktemp("tree")
    for part in ("ahiq", "scripts", "docs", "options"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "train.py", tree / "train.py")
    for module, (registry, entry) in NEW.items():
        path = tree / "ahiq" / "registry" / f"{module}.py"
        text = path.read_text()
        start = text.index(f"{registry}: Registry[")
        end = text.index("\n])\n", start)  # the end of its list of entries: the new one goes last
        path.write_text(text[:end] + f"\n    {entry}," + text[end:])
    changed = sorted(str(p.relative_to(tree)) for p in (tree / "ahiq").rglob("*.py")
                     if p.read_bytes() != (ROOT / p.relative_to(tree)).read_bytes())
    assert changed == [f"ahiq/registry/{module}.py" for module in sorted(NEW)]
    return tree


def run(tree, code: str) -> str:
    """Python ``code`` run in the copy (its ahiq, not this checkout's): its standard output."""
    done = subprocess.run([sys.executable, "-c", f"import ahiq; assert ahiq.__file__.startswith({str(tree)!r})\n{code}"],
                          cwd=tree, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_new_entries_reach_the_options_and_train_pys_help(extended):
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=extended, capture_output=True, text=True,
                               timeout=120).stdout
    assert "mine (a lab's own pairs)" in help_text and "late (concatenation without" in help_text
    assert "haarpsi" in help_text
    out = run(extended, "from ahiq.options import load_options\n"
                        "opt = load_options('options/demo.yaml', ['data.dataset=mine', 'model.fusion=late', "
                        "'test.baselines=[psnr, haarpsi]'])\n"
                        "print(opt['data']['dataset'], opt['model']['fusion'], opt['test']['baselines'])")
    assert out.split() == ["mine", "late", "['psnr',", "'haarpsi']"]
    # this checkout, without the entries, refuses them in one line naming the option
    refused = subprocess.run([sys.executable, "train.py", "--opt", "options/demo.yaml", "model.fusion=late"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "option 'model.fusion' must be one of" in refused.stderr


def test_the_docs_table_and_the_ablation_table_show_them(extended):
    subprocess.run([sys.executable, "scripts/options_table.py"], cwd=extended, check=True, timeout=120)
    table = (extended / "docs" / "training.md").read_text()
    assert "`mine` (a lab's own pairs)" in table and "`late` (concatenation" in table and "`haarpsi`" in table
    out = run(extended, "import sys; sys.path.insert(0, 'scripts')\n"
                        "from run_ablations import rendered, overrides, TABLES\n"
                        "rows = TABLES[6].rows()\n"
                        "markdown, _ = rendered(TABLES[6], [{'plcc': 0.5, 'srocc': 0.4, 'main': 0.9}] * len(rows), "
                        "'demo', 'a test')\n"
                        "print(markdown); print(overrides(rows[-1]))")
    assert "| 5 | yes | yes | late | -- | -- | 0.5000 | 0.4000 | 0.9000 | demo_late |" in out
    assert "model.fusion=late" in out


def test_the_new_entries_are_built_where_they_are_read(extended, tmp_path):
    """The dataset read by its declared reader (with its taxonomy's names), the variant built and scoring, the
    baseline computed by what its declaration names."""
    (tmp_path / "pairs.csv").write_text("ref,dist,mos,group\nr.png,d.png,3.5,blur\n")
    out = run(extended, f"""
import cv2, numpy as np, torch
from ahiq.data import read_labels
from ahiq.nn.model import AHIQ
from ahiq.registry.datasets import taxonomy
for name in ("r.png", "d.png"):
    cv2.imwrite({str(tmp_path)!r} + "/" + name, np.random.default_rng(0).integers(0, 255, (72, 72, 3), dtype=np.uint8))
pairs = read_labels("mine", {str(tmp_path)!r}, labels="pairs.csv")
model = AHIQ(8, False, False, fusion="late", img_size=64, vit_dim=32, vit_heads=2, cnn_width=8, fusion_hidden=16,
             head_dim=16, head_hidden=32).eval()
with torch.no_grad():
    score = model(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
print(len(pairs), taxonomy(pairs.dataset).name(pairs[0].distortion), hasattr(model.fusion, "deform"), score.shape[0])
""")
    assert out.split() == ["1", "Lens", "blur", "False", "1"]
    pytest.importorskip("piq", reason="the baselines need the optional extra: pip install -e '.[baselines]'")
    out = run(extended, "import torch\nfrom ahiq.scoring.baselines import BaselineScorer\n"
                        "scorer = BaselineScorer('haarpsi', torch.device('cpu'))\n"
                        "x = torch.rand(1, 3, 64, 64)\nprint(float(scorer.metric(x, x)))")
    assert float(out) == pytest.approx(1.0, abs=1e-4)  # an image against itself


def test_a_registry_names_every_choice_in_one_line():
    kind = Registry("data.flip", [Choice(name="width", summary="w"), Choice(name=None, summary="none")])
    assert kind.default.name == "width" and kind.names == ("width", None)
    assert kind.described() == "`width` (w), `null` (none)" and kind.listed() == "`width`, `null`"
    with pytest.raises(ValueError, match=r"^flip must be one of width, null, got 'up'$"):
        kind.choice("up", "flip")
    with pytest.raises(ValueError, match="True"):  # a bool is not a name, though True == 1
        Registry("x", [Choice(name=1, summary="")]).choice(True)
    with pytest.raises(ValueError, match="declared twice"):
        Registry("x", [Choice(name="a", summary=""), Choice(name="a", summary="")])
    with pytest.raises(ValueError, match="registered as"):
        kind["height"] = Choice(name="up", summary="")


def test_every_dataset_reader_is_where_its_declaration_says_and_every_reader_is_declared():
    import importlib
    import inspect

    from ahiq.data import readers

    declared = set()
    for entry in DATASETS.values():
        module, name = entry.reader.split(":")
        assert callable(getattr(importlib.import_module(module), name)), entry.reader
        declared.add(entry.reader)
    public = {f"ahiq.data.readers:{name}" for name, f in inspect.getmembers(readers, inspect.isfunction)
              if name.startswith("read_") and f.__module__ == "ahiq.data.readers"}
    assert public <= declared, public - declared


def test_the_ablation_tables_are_the_papers_rows():
    """Rows, cells, the variant each changes and the paper's figures, as the paper prints Tables 6, 7, 8."""
    expected = json.loads((ROOT / "tests" / "data" / "paper_targets.json").read_text())
    for number, table in TABLES.items():
        rows = table.rows()
        assert [list(row.paper[:2]) for row in rows] == list(expected[f"table{number}"].values())
        assert rows[0].variant == {} and rows[0].slug == "ahiq"
    assert [row.cells for row in TABLES[6].rows()] == [("1", "yes", "yes", "deform+concat"), ("2", "yes", "yes", "concat"),
                                                       ("3", "yes", "", ""), ("4", "", "yes", "")]
    seven = TABLES[7].rows()
    assert seven[3].cells == ("HRNet (W18)", "ViT-B/8") and seven[-1].cells == ("ResNet50", "ViT-B/16")
    assert seven[-1].variant == {"patch_size": 16} and seven[-1].slug == "vit-b16"
    assert seven[4].fixed == (("cnn_width", 64, "timm's InceptionResNetV2 has no width to narrow"),)
    assert [row.slug for row in TABLES[6].rows()] == ["ahiq", "concat", "cnn-only", "vit-only"]
    assert AHIQ == {"fusion": "deform+concat", "cnn": "resnet50", "pooling": "patch", "patch_size": 8}
