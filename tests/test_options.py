from pathlib import Path

import pytest

from ahiq.options import DEFAULTS, OptionsError, load_options

OPTIONS = Path(__file__).resolve().parents[1] / "options"


@pytest.mark.parametrize("path", sorted(OPTIONS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_option_file_loads(path):
    if path.name.startswith("_"):
        pytest.skip("a base file, used through 'base:'")
    opt = load_options(path)
    assert opt["name"] and opt["data"]["dataset"]


def test_base_file_overrides_and_yaml_values(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ntrain: {epochs: 7, lr: 1e-4}\nmodel: {patch_size: 16}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\ntrain: {epochs: 9}\ndata: {dataset: live, root: /x}\n")
    opt = load_options(tmp_path / "child.yaml", ["train.batch_size=8", "model.vit_pretrained=/w/vit.pth",
                                                 "data.split.ratios=[0.8, 0.2]", "train.lr=3e-4"])
    assert opt["name"] == "child" and opt["train"]["epochs"] == 9 and opt["model"]["patch_size"] == 16
    assert opt["train"]["batch_size"] == 8 and opt["model"]["vit_pretrained"] == "/w/vit.pth"
    assert opt["data"]["split"]["ratios"] == [0.8, 0.2] and opt["train"]["lr"] == 3e-4
    assert opt["train"]["weight_decay"] == DEFAULTS["train"]["weight_decay"]


def test_unknown_key_suggests_the_nearest(tmp_path):
    (tmp_path / "o.yaml").write_text("name: x\ntrain:\n  epoch: 3\n")
    with pytest.raises(OptionsError, match=r"o.yaml: unknown option 'train.epoch'; did you mean 'train.epochs'\?"):
        load_options(tmp_path / "o.yaml")
    with pytest.raises(OptionsError, match=r"override 'model.patchsize=8': unknown option 'model.patchsize'; did you mean 'model.patch_size'"):
        load_options(None, ["name=x", "model.patchsize=8"])
    with pytest.raises(OptionsError, match="unknown option 'data.val.folder'"):
        load_options(None, ["name=x", "data.val={dataset: pipal, folder: y}"])


def test_wrong_types_and_choices():
    with pytest.raises(OptionsError, match="option 'train.epochs' must be int, got 'ten'"):
        load_options(None, ["name=x", "train.epochs=ten"])
    with pytest.raises(OptionsError, match="option 'model.freeze_backbones' must be bool"):
        load_options(None, ["name=x", "model.freeze_backbones=3"])
    with pytest.raises(OptionsError, match="option 'model.patch_size' must be one of 8, 16, got 12"):
        load_options(None, ["name=x", "model.patch_size=12"])
    with pytest.raises(OptionsError, match="option 'train' is a group"):
        load_options(None, ["name=x", "train=5"])
    with pytest.raises(OptionsError, match="must look like key.path=value"):
        load_options(None, ["name=x", "train.epochs"])


def test_missing_file_and_name(tmp_path):
    with pytest.raises(OptionsError, match="option file .*nowhere.yaml does not exist"):
        load_options(tmp_path / "nowhere.yaml")
    (tmp_path / "o.yaml").write_text("train: {epochs: 3}\n")
    with pytest.raises(OptionsError, match="option 'name' .* is not set"):
        load_options(tmp_path / "o.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(OptionsError, match="bad.yaml is not valid YAML"):
        load_options(tmp_path / "bad.yaml")


def test_train_and_test_help_list_every_option_with_its_default_and_meaning():
    """python train.py --help (and test.py's) prints every option as torchvision's references print theirs:
    the key, its default, its meaning (Markdown made plain: links name the docs page)."""
    import subprocess
    import sys

    from ahiq.options import OPTIONS as DECLARED
    from conftest import ROOT

    for script in ("train.py", "test.py"):
        code = (f"import runpy, sys\nsys.argv = [{script!r}, '--help']\ntry:\n    runpy.run_path({script!r}, "
                f"run_name='__main__')\nexcept SystemExit:\n    print('torch' in sys.modules, file=sys.stderr)")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.stderr.strip() == "False", done.stderr  # the help is printed before torch would load
        text = " ".join(done.stdout.split())
        for option in DECLARED:
            shown = option.shown or ("null" if option.default is None else None)
            assert f"{option.key} = " in text, f"{script} --help lacks {option.key}"
            if shown:
                assert f"{option.key} = {shown}" in text
        assert "model.vit_pretrained = true the ViT's weights: true: the released backbone weights, found as " \
               "docs/weights.md says" in text
        assert "train.lr = 1e-4 Adam's learning rate" in text and "`" not in text and "](" not in text


def test_the_declarations_make_the_defaults_and_the_checks():
    from ahiq.options import DEFAULTS, SCHEMA, markdown_table

    assert DEFAULTS["train"]["lr"] == 1e-4 and DEFAULTS["data"]["split"]["ratios"] == [0.6, 0.2, 0.2]
    assert DEFAULTS["data"]["options"] == {} and DEFAULTS["test"]["submission"]["gpu"] is None
    assert SCHEMA["train.lr"].above and SCHEMA["train.eta_min"].at_least == 0 and not SCHEMA["train.eta_min"].above
    rows = markdown_table().splitlines()
    assert len(rows) == 2 + len(SCHEMA)
    assert "| `train.lr` | 1e-4 | Adam's learning rate |" in rows
    assert "| `data.split.ratios` | [0.6, 0.2, 0.2] |" in markdown_table()
    assert "| `name` | (required) |" in markdown_table() and "| `data.options` | {} |" in markdown_table()
    with pytest.raises(OptionsError, match="option 'train.lr' must be greater than 0, got 0"):
        load_options(None, ["name=x", "train.lr=0"])
    with pytest.raises(OptionsError, match=r"option 'data.split' is a group \(ratios, seed, file\), got 3"):
        load_options(None, ["name=x", "data.split=3"])
