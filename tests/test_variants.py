"""The paper's ablations (Tables 6, 7, 8) as model options: each variant builds only what it runs, trains, and
goes through every path a trained model takes (checkpoint, from_pretrained, the scorer, the score command,
the metric, maps where they mean something); the CNN backbones of Table 7 reach the fusion on the ViT grid;
bad combinations are one line."""
import copy
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from ahiq import AHIQ, Scorer, create_metric
from ahiq.cli import main, train_command
from ahiq.data import CropPlan, read_image
from ahiq.data.datasets import to_tensor
from ahiq.engine.training import make_optimizer, train_step
from ahiq.nn.backbones import CNNFeatures
from ahiq.nn.downloads import DownloadError
from ahiq.nn.model import build_model
from ahiq.nn.weights import WeightsError
from ahiq.nn.zoo import BACKBONES
from ahiq.options import DEFAULTS, OptionsError, load_options
from ahiq.registry.variants import CNNS, POOLINGS
from ahiq.scoring.ensemble import Ensemble
from conftest import ROOT, TINY, resolved
from test_maps import _pair

# (model options, state-dict prefixes it must have, prefixes it must not have)
VARIANTS = {
    "ahiq": ({}, ("vit.", "cnn.", "fusion.offset_conv.", "fusion.deform.", "head.score.", "head.attention."),
             ("head.regress.",)),
    "concat": ({"fusion": "concat"}, ("vit.", "cnn.", "fusion.project."), ("fusion.offset_conv.", "fusion.deform.")),
    "cnn": ({"fusion": "cnn"}, ("cnn.", "fusion.project."), ("vit.", "fusion.offset_conv.", "fusion.deform.")),
    "vit": ({"fusion": "vit"}, ("vit.", "head.reduce."), ("cnn.", "fusion.")),
    "spatial": ({"pooling": "spatial"}, ("head.regress.",), ("head.score.", "head.attention.")),
    "patch+spatial": ({"pooling": "patch+spatial"}, ("head.regress.", "head.score.", "head.attention."), ()),
    "hrnet": ({"cnn": "hrnet_w18"}, ("cnn.layer1.3.",), ()),  # HRNet's stride-4 stage has four blocks
    "inception": ({"cnn": "inception_resnet_v2", "cnn_width": 64}, ("cnn.layer1.1.conv.",), ("cnn.layer1.2.",)),
}


def test_every_cnn_has_its_weight_file_and_the_defaults_are_ahiq():
    assert all(CNNS[name].tag in BACKBONES for name in CNNS)
    assert [DEFAULTS["model"][k] for k in ("fusion", "cnn", "pooling")] == ["deform+concat", "resnet50", "patch"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    d, r = _pair(folder, 72, 80)
    return d, r


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_variant_builds_only_its_parts_trains_and_scores_the_same_after_loading(variant, images, tmp_path):
    options, present, absent = VARIANTS[variant]
    torch.manual_seed(0)
    model = AHIQ(8, False, False, **{**TINY, **options}, freeze_backbones=False)
    keys = list(model.state_dict())
    for prefix in present:
        assert any(k.startswith(prefix) for k in keys), prefix
    for prefix in absent:
        assert not any(k.startswith(prefix) for k in keys), prefix
    # a training step moves the trained weights
    dist, ref = torch.rand(2, 4, 3, 64, 64)
    before = copy.deepcopy(model.head.reduce.weight)
    model.train()
    optimizer, scheduler = make_optimizer(model, DEFAULTS["train"])
    loss = train_step(model, optimizer, scheduler, dist, ref, torch.tensor([0.2, 0.4, 0.6, 0.8]), resolved())
    assert np.isfinite(loss) and not torch.equal(before, model.head.reduce.weight)
    model.eval()
    model.save_checkpoint(tmp_path / "model.pth")
    saved = torch.load(tmp_path / "model.pth", weights_only=True)
    assert {k: saved["config"][k] for k in ("fusion", "cnn", "pooling")} == \
        {"fusion": "deform+concat", "cnn": "resnet50", "pooling": "patch",
         **{k: v for k, v in options.items() if k in ("fusion", "cnn", "pooling")}} | (
            {"cnn": None} if options.get("fusion") == "vit" else {})
    # the options say AHIQ; the checkpoint says what it is
    loaded = AHIQ.from_pretrained(tmp_path / "model.pth", vit_pretrained=False, cnn_pretrained=False)
    assert loaded.config == model.config
    d, r = images
    scorer = Scorer(tmp_path / "model.pth", vit_pretrained=False, cnn_pretrained=False, crops="five")
    got = scorer.score(d, r)
    metric = create_metric(str(tmp_path / "model.pth"), crops="five", vit_pretrained=False, cnn_pretrained=False)
    assert metric(d, r).item() == pytest.approx(got, abs=1e-6)
    with torch.no_grad():  # the same five crops through the in-memory model
        expected = Ensemble([model], CropPlan(64, "five"), resolved(crop_chunk=8)).score_group(
            to_tensor(read_image(r)), [to_tensor(read_image(d))], r.name).scores.item()
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("variant", ["concat", "vit", "spatial"])
def test_the_score_command_takes_a_variant_and_its_maps_where_they_mean_something(variant, images, tmp_path, capsys):
    model = AHIQ(8, False, False, **{**TINY, **VARIANTS[variant][0]}, freeze_backbones=False)
    model.save_checkpoint(tmp_path / "model.pth")
    d, r = images
    command = ["score", "--dist", str(d), "--ref", str(r), "--checkpoint", str(tmp_path / "model.pth"),
               "--vit-pretrained", "false", "--cnn-pretrained", "false", "--crops", "five"]
    assert main(command) == 0
    printed = capsys.readouterr().out.strip()
    scorer = Scorer(tmp_path / "model.pth", vit_pretrained=False, cnn_pretrained=False, crops="five")
    assert printed == f"{d.name},{scorer.score(d, r):.6f}"
    code = main([*command, "--maps", str(tmp_path / "maps")])
    err = capsys.readouterr().err.strip()
    if variant == "spatial":
        assert code == 2 and err == f"error: {POOLINGS['spatial'].no_maps}" and "\n" not in err
        with pytest.raises(ValueError, match="has no quality maps"):
            scorer.maps(d, r)
    else:
        maps = np.load(tmp_path / "maps" / "d.npz")
        assert code == 0 and float(maps["score"]) == pytest.approx(scorer.score(d, r), abs=1e-6)
        assert maps["crop_score_maps"].shape == (5, 8, 8)


def test_an_ensemble_of_variants_averages_their_scores(images, tmp_path):
    paths = []
    for variant in ("cnn", "patch+spatial"):
        AHIQ(8, False, False, **TINY, **VARIANTS[variant][0], freeze_backbones=False).save_checkpoint(
            tmp_path / f"{variant}.pth")
        paths.append(tmp_path / f"{variant}.pth")
    d, r = images
    alone = [Scorer(p, vit_pretrained=False, cnn_pretrained=False, crops="five").score(d, r) for p in paths]
    together = Scorer(paths, vit_pretrained=False, cnn_pretrained=False, crops="five").score(d, r)
    assert together == pytest.approx(np.mean(alone), abs=1e-6) and alone[0] != alone[1]


def test_checkpoints_without_a_variant_are_ahiq_and_a_resume_into_another_is_refused(tmp_path):
    model = AHIQ(8, False, False, **TINY, freeze_backbones=False)
    checkpoint = model.checkpoint()
    for key in ("fusion", "cnn", "pooling"):  # as this project wrote them before the variants existed
        del checkpoint["config"][key]
    torch.save(checkpoint, tmp_path / "old.pth")
    loaded = AHIQ.from_pretrained(tmp_path / "old.pth", vit_pretrained=False, cnn_pretrained=False, fusion="concat")
    assert loaded.config == model.config
    concat = AHIQ(8, False, False, **TINY, fusion="concat")
    with pytest.raises(WeightsError, match=r"old.pth was saved for another architecture: fusion='deform\+concat' "
                                           r"\(this model: 'concat'\)"):
        concat.restore(checkpoint, tmp_path / "old.pth")


def test_the_official_format_is_written_for_ahiq_and_refused_for_a_variant(tmp_path):
    model = AHIQ(8, False, False, **TINY)
    model.save_official_checkpoint(tmp_path / "AHIQ_vit_p8_official.pth")
    saved = torch.load(tmp_path / "AHIQ_vit_p8_official.pth", weights_only=True)
    assert sorted(saved) == ["deform_net_model_state_dict", "regressor_model_state_dict"]
    again = AHIQ(8, False, False, **TINY)
    again.restore(saved, tmp_path / "AHIQ_vit_p8_official.pth")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.trained_state_dict().items())
    for options in ({"fusion": "concat"}, {"pooling": "spatial"}, {"cnn": "resnet101"}):
        with pytest.raises(WeightsError, match=f"official format holds only AHIQ's fusion and head .* this model has "
                                               f"model.{next(iter(options))}="):
            AHIQ(8, False, False, **TINY, **options).save_official_checkpoint(tmp_path / "variant.pth")
    assert not (tmp_path / "variant.pth").exists()


@pytest.mark.parametrize("name", CNNS)
def test_each_cnn_reaches_the_fusion_on_the_vit_grid(name):
    width = 64 if name == "inception_resnet_v2" else 8  # timm's InceptionResNetV2 has no width
    features = CNNFeatures(name, False, width=width).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        cnn = features(x)
    assert cnn.shape == (1, CNNS[name].channels(width), 56, 56)
    model = AHIQ(8, False, False, **{**TINY, "img_size": 224, "cnn_width": width}, cnn=name).eval()
    model.cnn.load_state_dict(features.state_dict())
    with torch.no_grad():
        fused = model.fusion(cnn, model.fusion.offsets(model.vit(x), cnn.shape[-2:]))
    assert fused.shape == (1, CNNS[name].channels(width), 28, 28)  # the ViT-B/8 grid
    if name == "inception_resnet_v2":  # the unpadded stage gives 54 and 52: resampled, not cropped or padded
        with torch.no_grad():
            last = features.layer1(features.stem(x))
        assert last.shape[-2:] == (52, 52)
        expected = torch.nn.functional.interpolate(last, size=(56, 56), mode="bilinear", align_corners=False)
        torch.testing.assert_close(cnn[:, 80:], expected, rtol=0, atol=0)


def test_a_table_7_backbone_comes_from_a_weights_folder_or_is_named_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("AHIQ_WEIGHTS", raising=False)
    tag = CNNS["hrnet_w18"].tag
    hrnet = timm.create_model(tag, pretrained=False)
    (tmp_path / "empty").mkdir()
    opt = {**DEFAULTS["model"], **TINY, "cnn_width": 64, "cnn": "hrnet_w18", "vit_pretrained": False,
           "weights": str(tmp_path / "empty")}
    with pytest.raises(DownloadError) as error:
        build_model({**opt, "vit_pretrained": True, "vit_dim": 768, "vit_heads": 12, "img_size": 224})
    message = str(error.value)
    assert "\n" not in message and f"{tag}.safetensors" in message and "vit_base_patch8_224" in message
    (tmp_path / "weights").mkdir()
    save_file(hrnet.state_dict(), str(tmp_path / "weights" / f"{tag}.safetensors"))
    model = build_model({**opt, "weights": str(tmp_path / "weights")})
    assert torch.equal(model.cnn.layer1[3].conv3.weight, hrnet.layer1[3].conv3.weight)
    assert torch.equal(model.cnn.stem[3].weight, hrnet.conv2.weight)


def test_a_table_names_every_missing_weight_file_of_its_rows_before_training(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import run_ablations

    from test_bad_input import pipal_tree, write_image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    pipal_tree(tmp_path / "PIPAL")  # the data is checked first (in seconds): a small PIPAL that passes
    for image in (tmp_path / "PIPAL").rglob("*.bmp"):
        write_image(image, 224, 224)
    code = run_ablations.main(["--table", "7", "--opt", str(ROOT / "options" / "pipal.yaml"),
                               f"model.weights={tmp_path / 'weights'}", f"data.root={tmp_path / 'PIPAL'}",
                               "data.val=null"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "checkpoints").exists()
    for name in CNNS:
        assert BACKBONES[CNNS[name].tag].name in err
    assert "vit_base_patch8_224" in err and "vit_base_patch16_224" in err


def test_bad_combinations_are_one_line_before_torch(tmp_path, capsys):
    demo = str(ROOT / "options" / "demo.yaml")
    for overrides, expected in (
            (["model.fusion=vit", "model.cnn=hrnet_w18"], "model.cnn hrnet_w18 names a CNN branch, but model.fusion "
                                                          "vit has none"),
            (["model.pooling=average"], "option 'model.pooling' must be one of patch, spatial, patch+spatial, got "
                                        "'average'"),
            (["model.cnn=resnet18"], "option 'model.cnn' must be one of resnet50, resnet101, resnet152, hrnet_w18, "
                                     "inception_resnet_v2"),
            (["model.cnn=inception_resnet_v2", "model.cnn_width=8"], "model.cnn_width 8: timm's InceptionResNetV2 has "
                                                                     "no width to narrow"),
            (["model.cnn=inception_resnet_v2", "model.cnn_width=64", "model.img_size=16", "model.patch_size=16"],
             "model.img_size 16 is too small for model.cnn inception_resnet_v2: its unpadded stem needs crops of at "
             "least 19 pixels; set model.img_size=32 or more")):
        assert train_command(["--opt", demo, *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    with pytest.raises(OptionsError):
        load_options(demo, ["model.fusion=deform"])
