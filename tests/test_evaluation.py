"""Crop-ensemble prediction and test.py's outputs."""
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ahiq.data import CropPlan, load_parts, read_labels
from ahiq.engine.testing import run_test
from ahiq.engine.training import train
from ahiq.nn.model import build_model
from ahiq.scoring.inference import predict
from conftest import DEVICES, ensemble, tiny_options


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_prediction_equals_scoring_each_pair_alone(tmp_path, device):
    """The fast path (pairs grouped by reference, reference features computed once) against the obvious one."""
    from ahiq.data import eval_crop_positions, read_image
    from ahiq.data.datasets import to_tensor

    opt = tiny_options(tmp_path)
    part = load_parts(opt["data"])["train"]  # 3 references x 25 distorted images
    device = torch.device(device)
    model = build_model(opt["model"]).eval().to(device)
    # Spread the scores and move the sampling, so that agreement to 1e-5 says something (see official.py).
    torch.nn.init.normal_(model.head.score.weight, std=30.0 / model.head.score.in_channels ** 0.5)
    fan_in = model.fusion.offset_conv.in_channels * 9
    torch.nn.init.normal_(model.fusion.offset_conv.weight, std=3.0 / fan_in ** 0.5)
    for crops, count in (("random", 4), ("five", 5)):
        fast = predict(ensemble([model], CropPlan(64, crops, count, seed=3), device), part.pairs, batch_size=7)
        slow = []
        for pair in part.pairs:  # every pair alone: its crops cut by hand, the whole model on them
            dist, ref = read_image(pair.dist), read_image(pair.ref)
            windows = eval_crop_positions(*dist.shape[:2], 64, crops, count, 3, Path(pair.ref).name)
            cut = lambda image: torch.stack([to_tensor(image[t:t + 64, l:l + 64]) for t, l in windows]).to(device)
            with torch.no_grad():
                slow.append(model(cut(dist), cut(ref)).mean().item())
        slow = np.array(slow)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-5)
        assert np.ptp(slow) > 1e-2


def test_predict_keeps_every_pair_and_averages_an_ensemble(tmp_path):
    opt = tiny_options(tmp_path)
    part = load_parts(opt["data"])["test"]
    models = [build_model(opt["model"]) for _ in range(2)]
    single = [predict(ensemble([m], CropPlan(64, "five")), part.pairs, batch_size=4) for m in models]
    both = predict(ensemble(models, CropPlan(64, "five")), part.pairs, batch_size=4)
    assert len(both) == len(part.pairs) == 25  # 25 is not a multiple of the batch size
    np.testing.assert_allclose(both, (single[0] + single[1]) / 2, rtol=1e-6)
    first = ensemble(models[:1], CropPlan(64, "random", 3, seed=5))
    again = predict(first, part.pairs, batch_size=7)
    np.testing.assert_allclose(again, predict(first, part.pairs, batch_size=2), rtol=1e-6)


def test_unlabelled_test_set_gives_a_submission(tmp_path):
    opt = tiny_options(tmp_path, "train.epochs=1")
    train(opt, tmp_path / "ckpt")
    pairs = read_labels("synthetic", tmp_path / "data", references=5, size=72)
    unlabelled = tmp_path / "ntire"
    (unlabelled / "Ref").mkdir(parents=True)
    (unlabelled / "Dis").mkdir()
    for i, pair in enumerate(pairs[:6]):  # PIPAL-style names: A####.bmp references, A####_xx_yy.bmp distorted
        ref_name = f"A{i // 3:04d}"
        (unlabelled / "Ref" / f"{ref_name}.bmp").write_bytes(Path(pair.ref).read_bytes())
        (unlabelled / "Dis" / f"{ref_name}_10_{i % 3:02d}.bmp").write_bytes(Path(pair.dist).read_bytes())
    opt = tiny_options(tmp_path, "train.epochs=1", f"data.test={{dataset: pipal, root: {unlabelled}, "
                       "options: {labels: null, ref_dir: Ref, dist_dirs: [Dis]}}", "test.submission.gpu=false")
    result = run_test(opt, tmp_path / "ckpt")
    with zipfile.ZipFile(result["submission"]) as zf:
        output = zf.read("output.txt").decode().splitlines()
        readme = zf.read("readme.txt").decode()
    assert [line.split(",")[0] for line in output] == sorted(f"A{i // 3:04d}_10_{i % 3:02d}.bmp" for i in range(6))
    assert "CPU[1] / GPU[0] : 1" in readme
    # The test set alone is read: scoring it does not need the training data on disk.
    opt["data"].update(dataset="pipal", root=str(tmp_path / "nowhere"), options={})
    assert Path(run_test(opt, tmp_path / "ckpt")["submission"]).is_file()


def test_evaluation_reads_each_reference_once(tmp_path, monkeypatch):
    from collections import Counter

    import ahiq.data.datasets as datasets

    opt = tiny_options(tmp_path)
    part = load_parts(opt["data"])["train"]  # 3 references x 25 distorted images
    reads = Counter()
    real_read = datasets.read_image
    monkeypatch.setattr(datasets, "read_image", lambda path: reads.update([path]) or real_read(path))
    predict(ensemble([build_model(opt["model"])], CropPlan(64, "five")), part.pairs, batch_size=4)
    refs = {p.ref for p in part.pairs}
    assert len(refs) == 3 and all(reads[r] == 1 for r in refs)
    assert all(reads[p.dist] == 1 for p in part.pairs)
