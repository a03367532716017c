import numpy as np
import pytest

from ahiq.data import DatasetError, Pair, Pairs, load_parts, load_split, save_split, split_by_reference
from trees import live_tree, meta


def _pairs(per_ref):
    """Pairs over references r0.. with the given number of distorted images each."""
    return Pairs([Pair(f"/d/r{r}.bmp", f"/d/r{r}_{i}.bmp", float(i), f"r{r}_{i}.bmp")
                  for r, n in enumerate(per_ref) for i in range(n)])


def test_parts_are_reference_disjoint_and_cover_everything():
    pairs = _pairs([3, 5, 4, 4, 6, 2, 3, 4, 4, 5])
    parts = split_by_reference(pairs, (0.6, 0.2, 0.2), seed=3)
    assert sorted(i for part in parts for i in part) == list(range(len(pairs)))
    refs = [{pairs[i].ref for i in part} for part in parts]
    assert not (refs[0] & refs[1] or refs[0] & refs[2] or refs[1] & refs[2])
    assert [len(r) for r in refs] == [6, 2, 2]


def test_ratios_count_references_on_real_live(tmp_path):
    live_tree(tmp_path, meta("live/dmos.mat"), meta("live/refnames_all.mat"))
    from ahiq.data import read_labels

    pairs = read_labels("live", tmp_path)
    parts = split_by_reference(pairs, seed=0)
    assert [len({pairs[i].ref for i in part}) for part in parts] == [17, 6, 6]  # 29 references, 6:2:2


def test_seeded_splits_are_reproducible_and_differ():
    pairs = _pairs([2] * 20)
    assert split_by_reference(pairs, seed=4) == split_by_reference(pairs, seed=4)
    assert split_by_reference(pairs, seed=4) != split_by_reference(pairs, seed=5)
    # The order in which pairs are listed does not change which references go where.
    shuffled = Pairs(reversed(pairs))
    by_ref = lambda ps, parts: [sorted({ps[i].ref for i in p}) for p in parts]
    assert by_ref(pairs, split_by_reference(pairs, seed=4)) == by_ref(shuffled, split_by_reference(shuffled, seed=4))


def test_two_part_split_and_bad_ratios():
    pairs = _pairs([1] * 10)
    train, test = split_by_reference(pairs, (0.8, 0.2), seed=0)
    assert (len(train), len(test)) == (8, 2)
    with pytest.raises(ValueError, match="ratios"):
        split_by_reference(pairs, (1.0,))


def test_split_file_round_trip_and_unknown_names(tmp_path):
    pairs = _pairs([2, 3, 2, 2, 3])
    parts = split_by_reference(pairs, seed=1)
    save_split(tmp_path / "split.json", pairs, parts, dataset="toy", seed=1)
    assert load_split(tmp_path / "split.json", pairs) == parts
    with pytest.raises(DatasetError, match="names 12 images that the dataset does not have"):
        load_split(tmp_path / "split.json", _pairs([0, 0, 0, 0, 0, 2]))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DatasetError, match="bad.json cannot be read"):
        load_split(tmp_path / "bad.json", pairs)


def test_targets_per_dataset_or_per_part_as_the_official_list_files(tmp_path):
    """data.targets: one scale over the whole labelled source (default) or each part on its own (official)."""
    data = {"dataset": "synthetic", "root": str(tmp_path), "options": {"references": 5, "size": 72},
            "split": {"ratios": [0.6, 0.2, 0.2], "seed": 0, "file": None}, "val": None, "test": None}
    by_dataset = load_parts({**data, "targets": "dataset"})
    by_part = load_parts({**data, "targets": "part"})
    everything = np.concatenate([by_dataset[r].targets for r in ("train", "val", "test")])
    assert everything.min() == 0 and everything.max() == 1  # one scale spans the whole source
    for role in ("train", "val", "test"):
        assert by_part[role].pairs == by_dataset[role].pairs
        assert by_part[role].targets.min() == 0 and by_part[role].targets.max() == 1
        mos = np.array([p.mos for p in by_part[role].pairs])  # PSNR, higher is better
        np.testing.assert_allclose(by_part[role].targets, (mos - mos.min()) / np.ptp(mos))
    assert not np.allclose(by_part["test"].targets, by_dataset["test"].targets)
