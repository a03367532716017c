"""AHIQ as a metric and a loss on tensors: the scorer's scores on the same images saved losslessly, the
input gradient against finite differences (float64), and a step of optimising an image lowers its loss."""
import cv2
import numpy as np
import pytest
import torch

from ahiq import AHIQ, AHIQMetric, Scorer, create_metric
from ahiq.data.synthetic import distort, reference_image
from ahiq.registry.released import PIPAL_FILE, Released
from conftest import TINY


def _pair(folder, size=72, seed=0):
    rng = np.random.default_rng(seed)
    ref = reference_image(rng, size)
    dist = distort(ref, "noise", 3, rng)
    for name, image in (("d.png", dist), ("r.png", ref)):
        cv2.imwrite(str(folder / name), image[:, :, ::-1])  # the images are RGB; OpenCV writes BGR
    tensors = [torch.from_numpy(image.transpose(2, 0, 1).copy()).float()[None] / 255 for image in (dist, ref)]
    return folder / "d.png", folder / "r.png", *tensors


@pytest.mark.parametrize("crops", ["random", "five"])
def test_the_metric_gives_the_scorers_scores(crops, tiny_checkpoint, tmp_path):
    d_file, r_file, dist, ref = _pair(tmp_path)
    scorer = Scorer(tiny_checkpoint, crops=crops, num_crops=4, vit_pretrained=False, cnn_pretrained=False)
    expected = scorer.score(d_file, r_file)
    metric = create_metric(tiny_checkpoint, crops=crops, num_crops=4, vit_pretrained=False, cnn_pretrained=False)
    assert metric.lower_better is False and metric.plan.size == 64 and metric.plan.count == 4
    assert metric.device == torch.device("cpu")
    names = ["r.png"] if crops == "random" else None  # random crops are seeded by the reference's name
    got = metric(dist, ref, ref_names=names)
    assert got.shape == (1,) and not got.requires_grad
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert metric(d_file, r_file).item() == pytest.approx(expected, abs=1e-6)  # file paths too
    both = metric(torch.cat((dist, ref)), torch.cat((ref, ref)), ref_names=names and names * 2)
    assert both[0].item() == pytest.approx(expected, abs=1e-6) and both[1].item() != both[0].item()


def test_the_loss_gradient_matches_finite_differences(tiny_checkpoint, tmp_path):
    _, _, dist, ref = _pair(tmp_path, size=64)
    metric = AHIQMetric(tiny_checkpoint, crops="centre", vit_pretrained=False, cnn_pretrained=False).double()
    dist, ref = dist.double().requires_grad_(), ref.double()
    (grad,) = torch.autograd.grad(metric.loss(dist, ref), dist)
    assert all(p.grad is None for p in metric.parameters())  # the weights stay frozen
    rng = np.random.default_rng(1)
    eps = 1e-6
    for c, y, x in zip(rng.integers(0, 3, 6), rng.integers(0, 64, 6), rng.integers(0, 64, 6)):
        with torch.no_grad():
            up, down = dist.clone(), dist.clone()
            up[0, c, y, x] += eps
            down[0, c, y, x] -= eps
            numeric = (metric.loss(up, ref) - metric.loss(down, ref)).item() / (2 * eps)
        assert grad[0, c, y, x].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9)
    assert grad.abs().max() > 0


def test_one_step_of_optimising_an_image_lowers_its_loss(tiny_checkpoint, tmp_path):
    _, _, dist, ref = _pair(tmp_path)
    metric = AHIQMetric(tiny_checkpoint, crops="five", vit_pretrained=False, cnn_pretrained=False, as_loss=True)
    image = dist.clone().requires_grad_()
    before = metric.loss(image, ref)
    before.backward()
    with torch.no_grad():
        image -= 1e-3 * image.grad / image.grad.abs().max()
    assert metric.loss(image, ref).item() < before.item()
    assert metric(image, ref).requires_grad  # as_loss: calling the metric keeps autograd on


def test_the_training_fast_path_keeps_frozen_backbones_out_of_autograd(tiny_checkpoint):
    """Inputs that need no gradient: the backbones' outputs carry no graph, as before the loss existed."""
    model = AHIQ(8, False, False, **TINY)
    vit, cnn = model._backbones(torch.rand(1, 3, 64, 64))
    assert not vit.requires_grad and not cnn.requires_grad
    vit, cnn = model._backbones(torch.rand(1, 3, 64, 64, requires_grad=True))
    assert vit.requires_grad and cnn.requires_grad


def test_the_metric_gives_the_scorers_maps(tiny_checkpoint, tmp_path):
    d_file, r_file, dist, ref = _pair(tmp_path)
    settings = dict(crops="random", num_crops=4, vit_pretrained=False, cnn_pretrained=False)
    expected = Scorer(tiny_checkpoint, **settings).maps(d_file, r_file)
    got = create_metric(tiny_checkpoint, **settings).maps(dist[0], ref[0], ref_name="r.png")
    assert got.windows.tolist() == expected.windows.tolist() and got.image_size == expected.image_size
    np.testing.assert_allclose(got.crop_score_maps, expected.crop_score_maps, atol=1e-5)
    np.testing.assert_allclose(got.crop_weight_maps, expected.crop_weight_maps, atol=1e-6)
    assert got.score == pytest.approx(expected.score, abs=1e-5)


# ---- behaving like the IQA libraries people use (pyiqa) -----------------------------------------------------

@pytest.fixture
def metric(tiny_checkpoint):
    return create_metric(tiny_checkpoint, crops="five", vit_pretrained=False, cnn_pretrained=False)


def test_0_255_input_is_refused_in_one_line_unless_the_check_is_off(metric, tmp_path):
    _, _, dist, ref = _pair(tmp_path)
    with pytest.raises(ValueError, match=r"^dist holds values in \[[\d.]+, [\d.]+\]: AHIQ takes RGB in \[0, 1\]"):
        metric(dist * 255, ref * 255)
    with pytest.raises(ValueError, match="ref is torch.uint8: give floats in"):
        metric(dist, (ref * 255).to(torch.uint8))
    unchecked = create_metric(metric.models[0].source, crops="five", vit_pretrained=False, cnn_pretrained=False,
                              check_input_range=False)
    assert unchecked(dist * 255, ref * 255).shape == (1,)


def test_nan_empty_half_and_too_small_inputs(metric, tmp_path):
    """NaN would give NaN scores silently: refused with the range check; an empty batch gives no scores; half
    and double precision inputs score as fp32; images smaller than the crop name the pair."""
    _, _, dist, ref = _pair(tmp_path)
    nan = dist.clone()
    nan[0, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="^dist holds NaN or infinite values"):
        metric(nan, ref)
    assert metric(dist[:0], ref[:0]).shape == (0,)
    expected = metric(dist, ref)
    torch.testing.assert_close(metric(dist.double(), ref.double()), expected)
    torch.testing.assert_close(metric(dist.half(), ref.half()), metric(dist.half().float(), ref.half().float()))
    with pytest.raises(ValueError, match="^pair 1: the images are 40x72, smaller than the model's 64x64 crop"):
        metric([dist[0], dist[0, :, :40]], [ref[0], ref[0, :, :40]])


def test_the_metric_follows_its_module_to_another_device(metric):
    assert metric.device == torch.device("cpu")
    metric.to("meta")
    assert metric.device == torch.device("meta")


def test_create_metric_ahiq_is_the_released_model_even_from_the_repository_root(tiny_checkpoint, monkeypatch, tmp_path):
    """'ahiq' is what pyiqa calls the metric; the repository root has a folder of that name (the package)."""
    from ahiq import list_models
    from ahiq.nn import downloads, zoo
    from conftest import ROOT

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    planted = cache / PIPAL_FILE
    planted.write_bytes(tiny_checkpoint.read_bytes())
    monkeypatch.setitem(zoo.RELEASED, "pipal", Released(name="pipal", summary="test", patch_size=8, file=zoo.WeightFile(
        PIPAL_FILE, sha256=downloads.sha256_of(planted), size=planted.stat().st_size)))
    monkeypatch.chdir(ROOT)
    by_name = create_metric("ahiq", crops="five", vit_pretrained=False, cnn_pretrained=False)
    assert by_name.models[0].source == planted and "ahiq" in list_models() and "pipal" in list_models()
    _, _, dist, ref = _pair(tmp_path)
    by_path = create_metric(tiny_checkpoint, crops="five", vit_pretrained=False, cnn_pretrained=False)
    assert torch.equal(by_name(dist, ref), by_path(dist, ref))
    assert (by_name.metric_mode, by_name.score_range, by_name.lower_better) == ("FR", "~0, ~1", False)


def test_as_loss_weights_and_reduces_as_pyiqa_does(tiny_checkpoint, metric, tmp_path):
    _, _, d1, r1 = _pair(tmp_path, seed=1)
    _, _, d2, r2 = _pair(tmp_path, seed=2)
    dist, ref = torch.cat((d1, d2)), torch.cat((r1, r2))
    scores = metric(dist, ref)
    settings = dict(crops="five", vit_pretrained=False, cnn_pretrained=False, as_loss=True, loss_weight=2.0)
    for reduction, expected in (("mean", 2 * scores.mean()), ("sum", 2 * scores.sum()), ("none", 2 * scores)):
        loss = create_metric(tiny_checkpoint, loss_reduction=reduction, **settings)(dist.clone().requires_grad_(), ref)
        torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-6)
        assert loss.requires_grad  # the input's gradient: the weights are frozen
    with pytest.raises(ValueError, match="loss_reduction must be one of mean, sum, none"):
        create_metric(tiny_checkpoint, loss_reduction="max", **settings)


def test_grey_pil_files_lists_and_images_of_different_sizes(metric, tmp_path):
    from PIL import Image

    d_file, r_file, dist, ref = _pair(tmp_path, size=72)
    expected = metric(dist, ref)
    assert torch.equal(metric(d_file, r_file), expected) and torch.equal(metric([d_file], [r_file]), expected)
    assert torch.equal(metric(Image.open(d_file), Image.open(r_file)), expected)
    grey_d, grey_r = dist[:, :1], ref[:, :1]
    torch.testing.assert_close(metric(grey_d, grey_r), metric(grey_d.expand(-1, 3, -1, -1), grey_r.expand(-1, 3, -1, -1)))
    _, _, small_d, small_r = _pair(tmp_path, size=64, seed=3)
    ragged = metric([dist[0], small_d[0]], [ref[0], small_r[0]])  # a list of differently sized pairs
    torch.testing.assert_close(ragged, torch.cat((expected, metric(small_d, small_r))), rtol=0, atol=1e-6)


def test_allow_random_backbones_is_an_argument(tmp_path):
    from ahiq.nn.official import random_official_setup

    _, _, official = random_official_setup(8, tmp_path, **TINY)
    with pytest.raises(Exception, match="allow_random_backbones"):
        create_metric(official, vit_pretrained=False, cnn_pretrained=False)
    # an official file holds no sizes: the tiny model's are the default model options' only through from_pretrained
    model = AHIQ.from_pretrained(official, vit_pretrained=False, cnn_pretrained=False, allow_random_backbones=True,
                                 **TINY)
    assert model.config["img_size"] == 64


def test_a_shared_reference_is_computed_once_and_gives_the_scorers_scores(tiny_checkpoint, tmp_path, monkeypatch):
    from ahiq.data.pairs import pair_files

    rng = np.random.default_rng(5)
    ref = reference_image(rng, 72)
    cv2.imwrite(str(tmp_path / "r.png"), ref[:, :, ::-1])
    (tmp_path / "d").mkdir()
    dists = []
    for i, kind in enumerate(("noise", "blur", "jpeg")):
        image = distort(ref, kind, 3, rng)
        cv2.imwrite(str(tmp_path / "d" / f"{i}.png"), image[:, :, ::-1])
        dists.append(torch.from_numpy(image.transpose(2, 0, 1).copy()).float() / 255)
    settings = dict(crops="random", num_crops=4, vit_pretrained=False, cnn_pretrained=False)
    expected = Scorer(tiny_checkpoint, batch_size=3, **settings).score_pairs(pair_files(tmp_path / "d", tmp_path / "r.png"))
    metric = create_metric(tiny_checkpoint, **settings)
    calls = []
    real = AHIQ.reference_features
    monkeypatch.setattr(AHIQ, "reference_features", lambda self, crops: calls.append(len(crops)) or real(self, crops))
    ref_tensor = torch.from_numpy(ref.transpose(2, 0, 1).copy()).float() / 255
    got = metric(torch.stack(dists), ref_tensor.expand(3, -1, -1, -1), ref_names=["r.png"] * 3)
    assert sum(calls) == 4  # one reference, its four crops, each once (in passes of the crops that pay off)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
