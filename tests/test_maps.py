"""Quality maps: the head's score and weight maps, returned by the same forward pass that scores, pooled
back to the score exactly, assembled on the image without inventing uncovered pixels, and written by
python -m ahiq score --maps as arrays and panels."""
import cv2
import numpy as np
import pytest
import torch

from ahiq import AHIQ, Scorer
from ahiq.cli import main
from ahiq.data.synthetic import distort, reference_image


def _pair(folder, height, width, seed=0):
    rng = np.random.default_rng(seed)
    ref = reference_image(rng, max(height, width))[:height, :width]
    for name, image in (("d.png", distort(ref, "blur", 3, rng)), ("r.png", ref)):
        cv2.imwrite(str(folder / name), image[:, :, ::-1])
    return folder / "d.png", folder / "r.png"


def scorer(tiny_checkpoint, **settings):
    return Scorer(tiny_checkpoint, vit_pretrained=False, cnn_pretrained=False, **settings)


def test_the_maps_come_with_the_scores_of_the_same_forward_pass(tiny_checkpoint):
    model = AHIQ.from_pretrained(tiny_checkpoint, vit_pretrained=False, cnn_pretrained=False)
    dist, ref = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        scores, score_map, weight_map = model.score_with_maps(dist, ref)
        expected = model(dist, ref)
    assert score_map.shape == weight_map.shape == (3, 8, 8)  # the ViT grid of a 64-pixel crop, patch 8
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-6)
    # pooled by hand, the maps give the score of a separate forward pass without maps
    pooled = (score_map.double() * weight_map.double()).sum((1, 2)) / weight_map.double().sum((1, 2))
    torch.testing.assert_close(pooled, expected.double(), rtol=0, atol=1e-5)


def test_a_crop_sized_image_scored_whole_is_its_maps_weighted_mean(tiny_checkpoint, tmp_path):
    pair = _pair(tmp_path, 64, 64)
    maps = scorer(tiny_checkpoint, crops="whole").maps(*pair)
    assert maps.crop_score_maps.shape == (1, 8, 8) and maps.windows.tolist() == [[0, 0]]
    separate = scorer(tiny_checkpoint, crops="whole").score(*pair)  # scored without maps
    assert maps.crop_scores()[0] == pytest.approx(separate, abs=1e-5) and maps.score == pytest.approx(separate, abs=1e-6)
    score_map, weight_map, coverage = maps.image_maps()
    assert score_map.shape == (64, 64) and (coverage == 1).all()
    assert (score_map * weight_map).sum() / weight_map.sum() == pytest.approx(separate, abs=1e-5)


def test_a_crop_ensembles_maps_reproduce_its_score_and_leave_uncovered_pixels_nan(tiny_checkpoint, tmp_path):
    d, r = _pair(tmp_path, 100, 90)
    maps = scorer(tiny_checkpoint, crops="random", num_crops=20).maps(d, r)
    separate = scorer(tiny_checkpoint, crops="random", num_crops=20).score(d, r)  # scored without maps
    assert maps.crop_scores().mean() == pytest.approx(separate, abs=1e-5) and len(maps.windows) == 20
    assert maps.score == pytest.approx(separate, abs=1e-6)
    few = scorer(tiny_checkpoint, crops="random", num_crops=2).maps(d, r)
    score_map, weight_map, coverage = few.image_maps()
    assert (coverage == 0).any() and (coverage > 0).any()
    assert np.isnan(score_map[coverage == 0]).all() and np.isfinite(score_map[coverage > 0]).all()
    assert np.isnan(weight_map[coverage == 0]).all()


def test_score_maps_folder_holds_arrays_that_reproduce_the_printed_score_and_panels(tiny_checkpoint, tmp_path, capsys):
    d, r = _pair(tmp_path, 64, 64)
    command = ["score", "--dist", str(d), "--ref", str(r), "--checkpoint", str(tiny_checkpoint), "--crops", "whole",
               "--vit-pretrained", "false", "--cnn-pretrained", "false"]
    assert main(command) == 0
    printed = float(capsys.readouterr().out.strip().split(",")[1])  # a run without maps
    assert main([*command, "--maps", str(tmp_path / "maps")]) == 0
    saved = np.load(tmp_path / "maps" / "d.npz")
    pooled = (saved["score_map"] * saved["weight_map"]).sum() / saved["weight_map"].sum()
    assert pooled == pytest.approx(printed, abs=1e-5) and saved["score_map"].dtype == np.float32
    assert saved["crop_score_maps"].shape == (1, 8, 8) and saved["windows"].tolist() == [[0, 0]]
    picture = cv2.imread(str(tmp_path / "maps" / "d.png"))
    assert picture is not None and picture.shape[1] >= 3 * 64 and picture.shape[0] > 64


def test_maps_of_an_ensemble_are_refused_in_one_line(tiny_checkpoint, tmp_path, capsys):
    d, r = _pair(tmp_path, 64, 64)
    code = main(["score", "--dist", str(d), "--ref", str(r), "--checkpoint", str(tiny_checkpoint), str(tiny_checkpoint),
                 "--vit-pretrained", "false", "--cnn-pretrained", "false", "--maps", str(tmp_path / "maps")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: quality maps come from one model: give one checkpoint, not an ensemble"


def test_test_py_maps_the_worst_and_best_predicted_pairs(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from ahiq.data import load_parts
    from ahiq.engine.correlations import logistic4
    from ahiq.engine.testing import run_test
    from conftest import tiny_options

    from ahiq.engine import testing

    monkeypatch.chdir(tmp_path)
    titles = {}
    real = testing.write_panels
    monkeypatch.setattr(testing, "write_panels", lambda folder, pairs, stems, shown: titles.update(
        zip(stems, shown)) or real(folder, pairs, stems, shown))
    opt = tiny_options(tmp_path, f"test.checkpoint={tiny_checkpoint}", "test.num_crops=2", "test.maps=2",
                       "model.vit_pretrained=false", "model.cnn_pretrained=false", "data.num_workers=0")
    metrics = run_test(opt, tmp_path / "checkpoints")
    assert "2 worst and 2 best" in capsys.readouterr().out
    folder = tmp_path / "checkpoints" / "demo" / "test" / "maps"
    part = load_parts(opt["data"], roles=("test",))["test"]
    predicted = dict(line.split(",") for line in (folder.parent / "results.txt").read_text().splitlines())
    target = {p.name: t for p, t in zip(part.pairs, part.targets)}
    error = {n: abs(logistic4(float(predicted[n]), *metrics["logistic"]) - target[n]) for n in predicted}
    by_stem = {Path(n).stem: n for n in predicted}
    found = {}
    for picture in sorted(folder.glob("*.png")):
        label, rank, stem = picture.stem.split("_", 2)
        saved = np.load(picture.with_suffix(".npz"))
        assert float(predicted[by_stem[stem]]) == pytest.approx(float(saved["score"]), abs=1e-5)  # the same scores
        found[f"{label}{rank}"] = error[by_stem[stem]]
    assert sorted(found) == ["best1", "best2", "worst1", "worst2"]
    ranked = sorted(error.values())
    assert found["best1"] == ranked[0] and found["worst1"] == ranked[-1] and found["worst2"] == ranked[-2]
    # a researcher looking at a failure sees the MOS beside the prediction, and the error after the fit
    worst = next(stem for stem in titles if stem.startswith("worst_1_"))
    name = by_stem[worst.split("_", 2)[2]]
    pair = next(p for p in part.pairs if p.name == name)
    signed = logistic4(float(predicted[name]), *metrics["logistic"]) - target[name]
    assert titles[worst] == (f"{worst}\npredicted {float(predicted[name]):.4f}, MOS {pair.mos:g} (target "
                             f"{target[name]:.4f}), error {signed:+.4f} after the logistic fit")


def test_a_panels_maps_are_the_colours_of_their_values_not_the_image():
    """The maps cover the image almost opaquely: a map tile's pixel is its value's colour up to the faint
    image below, whatever the image (white or black)."""
    import cv2

    from ahiq.scoring.maps import panel

    values = np.zeros((256, 256), np.float32)  # the low end of the range everywhere
    colour = cv2.applyColorMap(np.zeros((1, 1), np.uint8), cv2.COLORMAP_VIRIDIS)[0, 0].astype(int)
    for shade in (0, 255):
        picture = panel(np.full((256, 256, 3), shade, np.uint8), values, values + 0.5, (0.0, 1.0), "t")
        tile = picture[28 + 100, 256 + 8 + 100].astype(int)  # inside the score map's tile
        assert np.abs(tile - colour).max() <= 0.15 * 255 + 1, (shade, tile, colour)


def test_training_shows_the_scatter_plot_and_four_pairs_maps_in_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ahiq.engine.training import train
    from conftest import tiny_options

    monkeypatch.chdir(tmp_path)
    train(tiny_options(tmp_path, "train.epochs=2", "data.num_workers=0"), tmp_path / "checkpoints")
    events = EventAccumulator(str(tmp_path / "checkpoints" / "demo" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert sorted(tags) == ["val/maps_0", "val/maps_1", "val/maps_2", "val/maps_3", "val/scatter"]
    for tag in tags:
        assert [e.step for e in events.Images(tag)] == [1, 2]  # at each validation
    picture = cv2.imdecode(np.frombuffer(events.Images("val/maps_0")[0].encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape[1] >= 3 * 72


def test_a_maps_path_that_is_a_file_is_refused_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    d, r = _pair(tmp_path, 64, 64)
    (tmp_path / "taken").write_text("")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded (or downloaded) before the outputs were checked")

    monkeypatch.setattr("ahiq.nn.model.AHIQ.from_pretrained", no_model)
    code = main(["score", "--dist", str(d), "--ref", str(r), "--maps", str(tmp_path / "taken")])
    assert code == 2 and capsys.readouterr().err.strip() == \
        f"error: --maps {tmp_path / 'taken'} is a file; give a folder (it is created if missing)"


def test_the_weighted_scores_average_to_the_weighted_mean_and_get_their_own_tile():
    """score x weight / mean weight, over the covered pixels, averages to sum(score x weight) / sum(weight) (the
    model's pooling, by hand here); uncovered pixels stay NaN; the panel draws it as a fourth tile."""
    from ahiq.scoring.maps import panel, score_range, weighted_scores

    rng = np.random.default_rng(0)
    score_map, weight_map = rng.normal(0.5, 0.2, (64, 64)), rng.uniform(0, 1, (64, 64))
    score_map[:8], weight_map[:8] = np.nan, np.nan  # rows no crop covered
    product = weighted_scores(score_map, weight_map)
    covered = np.isfinite(score_map)
    by_hand = (score_map[covered] * weight_map[covered]).sum() / weight_map[covered].sum()
    assert np.nanmean(product) == pytest.approx(by_hand, rel=1e-5) and np.isnan(product[:8]).all()
    assert score_range([score_map]) == pytest.approx(tuple(np.percentile(score_map[covered], [1, 99])))
    picture = panel(np.zeros((256, 256, 3), np.uint8), score_map.repeat(4, 0).repeat(4, 1),
                    weight_map.repeat(4, 0).repeat(4, 1), (0.0, 1.0), "t")
    assert picture.shape[1] == 4 * 256 + 3 * 8
