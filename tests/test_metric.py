"""AHIQ as a metric and a loss on tensors: the scorer's scores on the same images saved losslessly, the
input gradient against finite differences (float64), and a step of optimising an image lowers its loss."""
import cv2
import numpy as np
import pytest
import torch

from ahiq import AHIQ, AHIQMetric, Scorer, create_metric
from ahiq.data.synthetic import distort, reference_image
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
    assert metric.lower_better is False and metric.crop_size == 64 and metric.num_crops == 4
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
