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
