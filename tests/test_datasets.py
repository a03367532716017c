import numpy as np
import pytest
import torch

from ahiq.data import CropPlan, EvalPairs, Pair, Pairs, TargetScale, TrainPairs, eval_crop_positions
from trees import touch


def _coordinate_image(h, w, shift=0):
    """Each pixel encodes its own position: R = row, G = column, B = a per-image constant."""
    rows, cols = np.mgrid[0:h, 0:w]
    return np.dstack([rows, cols, np.full((h, w), shift)]).astype(np.uint8)


@pytest.fixture
def pair_files(tmp_path):
    touch(tmp_path / "ref.png", _coordinate_image(10, 13, shift=1))
    touch(tmp_path / "dist.png", _coordinate_image(10, 13, shift=2))
    return Pairs([Pair(str(tmp_path / "ref.png"), str(tmp_path / "dist.png"), 3.0, "dist.png"),
                  Pair(str(tmp_path / "ref.png"), str(tmp_path / "ref.png"), 5.0, "ref.png")])


def test_training_crops_aligned_all_positions_reached_flips_paired(pair_files):
    data = TrainPairs(pair_files, TargetScale(1.0, 5.0, True).to_target([3.0, 5.0]), crop_size=8, flip_axis="width", seed=0)
    corners, flips = set(), 0
    for epoch in range(400):  # 18 positions: missing one in 400 draws has probability < 1e-8
        data.set_epoch(epoch)
        dist, ref, target = data[0]
        assert target == pytest.approx(0.5)
        assert torch.equal(dist[:2], ref[:2])  # same position and same flip in both images
        d = (dist * 255).round().long()
        flipped = bool(d[1, 0, 0] > d[1, 0, -1])
        flips += flipped
        rows, cols = d[0, :, 0], d[1, 0, :]
        assert torch.equal(rows, torch.arange(rows[0], rows[0] + 8))  # whole rows in order: width flip only
        corners.add((int(rows[0]), int(cols.min())))
    assert corners == {(t, l) for t in range(3) for l in range(6)}  # the last row and column included
    assert 140 < flips < 260


def test_official_random_crops_never_reach_the_last_row_and_column(pair_files):
    """data.random_crop=official: np.random.randint(0, size - crop) excludes the last position."""
    data = TrainPairs(pair_files, [0.5, 1.0], crop_size=8, seed=0, crop_positions="official")
    corners = set()
    for epoch in range(400):  # 10 positions: missing one in 400 draws has probability < 1e-17
        data.set_epoch(epoch)
        d = (data[0][0] * 255).round().long()
        corners.add((int(d[0, 0, 0]), int(d[1, 0, :].min())))
    assert corners == {(t, l) for t in range(2) for l in range(5)}  # rows 0..1 of 0..2, columns 0..4 of 0..5
    whole = TrainPairs(pair_files, [0.5, 1.0], crop_size=10, seed=0, crop_positions="official")
    assert whole[0][0].shape == (3, 10, 10)  # the crop's own size: position 0 (the official code fails there)


def test_official_height_flip_and_no_flip(pair_files):
    data = TrainPairs(pair_files, TargetScale(1.0, 5.0, True).to_target([3.0, 5.0]), crop_size=8, flip_axis="height", seed=0)
    seen = set()
    for epoch in range(20):
        data.set_epoch(epoch)
        d = (data[0][0] * 255).round().long()
        assert torch.equal(d[1, 0], torch.sort(d[1, 0]).values)  # columns never reversed
        seen.add(bool(d[0, 0, 0] > d[0, -1, 0]))
    assert seen == {True, False}
    data = TrainPairs(pair_files, TargetScale(1.0, 5.0, True).to_target([3.0, 5.0]), crop_size=8, flip_axis=None)
    d = (data[0][0] * 255).round().long()
    assert d[0, 0, 0] < d[0, -1, 0] and d[1, 0, 0] < d[1, 0, -1]


def test_training_samples_are_reproducible(pair_files):
    a = TrainPairs(pair_files, TargetScale(1.0, 5.0, True).to_target([3.0, 5.0]), crop_size=8, seed=7)
    b = TrainPairs(pair_files, TargetScale(1.0, 5.0, True).to_target([3.0, 5.0]), crop_size=8, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert torch.equal(a[1][0], b[1][0])
    crops = set()  # and other epochs give other crops
    for epoch in range(10):
        a.set_epoch(epoch)
        crops.add(tuple(a[1][0][:2, 0, 0].tolist()))
    assert len(crops) > 3


def test_evaluation_crop_orders():
    five = eval_crop_positions(10, 13, 4, "five")
    assert five == [(0, 0), (0, 9), (6, 0), (6, 9), (3, 4)]
    assert eval_crop_positions(10, 13, 4, "nine") == five + [(3, 0), (3, 9), (0, 4), (6, 4)]
    assert eval_crop_positions(10, 13, 4, "centre") == [(3, 4)]
    assert eval_crop_positions(4, 4, 4, "whole") == [(0, 0)]
    with pytest.raises(ValueError, match="'whole' needs 4x4"):
        eval_crop_positions(10, 13, 4, "whole", name="x.png")
    with pytest.raises(ValueError, match="smaller than the 16x16 crop"):
        eval_crop_positions(10, 13, 16, "five")


def test_random_evaluation_crops_seeded_per_image():
    a = eval_crop_positions(100, 120, 32, "random", count=20, seed=0, name="A0001_00_00.bmp")
    assert len(a) == 20 and a == eval_crop_positions(100, 120, 32, "random", count=20, seed=0, name="A0001_00_00.bmp")
    assert a != eval_crop_positions(100, 120, 32, "random", count=20, seed=0, name="A0001_00_01.bmp")
    assert a != eval_crop_positions(100, 120, 32, "random", count=20, seed=1, name="A0001_00_00.bmp")
    assert all(0 <= t <= 68 and 0 <= l <= 88 for t, l in a)


def test_eval_dataset_and_plan_give_aligned_crops(pair_files):
    plan = CropPlan(4, "five")
    dist, ref, mos, index = EvalPairs(pair_files, plan)[0]
    assert dist.shape == ref.shape == (3, 10, 13) and mos.item() == 3.0 and index == 0
    windows = plan.windows(10, 13)
    assert windows.tolist() == [[0, 0], [0, 9], [6, 0], [6, 9], [3, 4]]
    d = (plan.cut(dist, windows) * 255).round().long()
    assert d.shape == (5, 3, 4, 4)
    assert [(int(c[0, 0, 0]), int(c[1, 0, 0])) for c in d] == [(0, 0), (0, 9), (6, 0), (6, 9), (3, 4)]
    assert torch.equal(d[:, :2], (plan.cut(ref, windows) * 255).round().long()[:, :2]) and int(d[0, 2, 0, 0]) == 2


def test_target_scale_directions():
    up = TargetScale.fit(Pairs([Pair("r", "a", 1.0, "a"), Pair("r", "b", 3.0, "b")], higher_is_better=True))
    down = TargetScale.fit(Pairs([Pair("r", "a", 1.0, "a"), Pair("r", "b", 3.0, "b")], higher_is_better=False))
    assert up.to_target([1.0, 2.0, 3.0]).tolist() == [0.0, 0.5, 1.0]
    assert down.to_target([1.0, 2.0, 3.0]).tolist() == [1.0, 0.5, 0.0]
    assert down.to_mos(down.to_target([1.25])).tolist() == [1.25]
    with pytest.raises(ValueError, match="span no range"):
        TargetScale(2.0, 2.0, True)
