"""Training: the experiment folder, exact resume, the official step, the K-split script."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from ahiq.engine import experiment
from ahiq.engine.testing import run_test
from ahiq.engine.training import improves, make_optimizer, train, train_step
from ahiq.nn.checkpoints import official_to_ahiq
from ahiq.nn.official import random_official_setup
from ahiq.options import load_options
from ahiq.runtime.distributed import Job, rank_batches
from conftest import ROOT, TINY, resolved, tiny_options


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_training_writes_the_experiment_folder_and_test_scores_it(tmp_path, capsys):
    opt = tiny_options(tmp_path)
    best = train(opt, tmp_path / "ckpt")
    folder = tmp_path / "ckpt" / "demo"
    for name in ("latest.pth", "best.pth", "epoch_2.pth", "options.yaml", "train.log", "split.json"):
        assert (folder / name).is_file(), name
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    saved = torch.load(folder / "latest.pth", weights_only=True)
    assert saved["epoch"] == 1 and saved["options"]["name"] == "demo" and "optimizer" in saved
    assert math.isfinite(best["srocc"]) and best["epoch"] in (1, 2)
    assert "epoch 2 loss" in (folder / "train.log").read_text()

    metrics = run_test(opt, tmp_path / "ckpt")
    out = capsys.readouterr().out.strip().splitlines()
    summary = next(line for line in out if line.startswith("SROCC "))
    assert summary.startswith(f"SROCC {metrics['srocc']:.4f} PLCC ") and summary.endswith("(25 pairs)")  # 1 reference:
    assert metrics["srocc_ci"] is None  # no interval over references
    assert out[-1] == (f"wrote results.txt, pairs.csv, metrics.json, distortions.csv, groups.csv, scatter.png/.pdf, "
                       f"groups.png/.pdf to {folder / 'test'}")
    assert "num_crops" not in json.loads((folder / "test" / "metrics.json").read_text())  # five crops: no count
    results = (folder / "test" / "results.txt").read_text().splitlines()
    assert len(results) == 25 and all(len(r.split(",")) == 2 for r in results)
    assert json.loads((folder / "test" / "metrics.json").read_text())["n"] == 25
    assert (folder / "test" / "scatter.png").stat().st_size > 1000
    # Cross-dataset use: every pair of a dataset as the test part.
    whole = tiny_options(tmp_path, "data.split.ratios=[0, 0, 1]")
    assert run_test(whole, tmp_path / "ckpt")["n"] == 125


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(tmp_path):
    straight = tiny_options(tmp_path, "name=straight", "train.epochs=3")
    train(straight, tmp_path / "ckpt")
    first = tiny_options(tmp_path, "name=resumed", "train.epochs=2")
    train(first, tmp_path / "ckpt")  # "killed" after epoch 2
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_options(tmp_path, "name=resumed", "train.epochs=3"), tmp_path / "ckpt")
    train(tiny_options(tmp_path, "name=resumed", "train.epochs=3", "train.resume=auto"), tmp_path / "ckpt")
    a = _weights(tmp_path / "ckpt" / "straight" / "latest.pth")
    b = _weights(tmp_path / "ckpt" / "resumed" / "latest.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    c = _weights(tmp_path / "ckpt" / "resumed" / "epoch_2.pth")
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the third epoch did change the weights


def test_one_step_equals_the_official_training_step(tmp_path):
    reference, model, _ = random_official_setup(8, tmp_path, **TINY)
    model.train()
    lr, wd = 1e-4, 1e-5
    # The official optimiser: Adam over two groups (regressor, deform net), cosine schedule per iteration.
    official_opt = torch.optim.Adam([
        {"params": reference.head.parameters(), "lr": lr, "weight_decay": wd},
        {"params": reference.fusion.parameters(), "lr": lr, "weight_decay": wd}])
    official_sched = torch.optim.lr_scheduler.CosineAnnealingLR(official_opt, T_max=50, eta_min=0)
    optimizer, scheduler = make_optimizer(model, {"lr": lr, "weight_decay": wd, "t_max": 50, "eta_min": 0.0})
    for step in range(3):
        dist, ref, labels = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64), torch.rand(4)
        pred = reference(dist, ref)
        loss = torch.nn.functional.mse_loss(torch.squeeze(pred), labels)
        official_opt.zero_grad()
        loss.backward()
        official_opt.step()
        official_sched.step()
        ours = train_step(model, optimizer, scheduler, dist, ref, labels, resolved())
        assert ours == pytest.approx(loss.item(), abs=1e-6)
    expected = official_to_ahiq({"deform_net_model_state_dict": reference.fusion.state_dict(),
                                 "regressor_model_state_dict": reference.head.state_dict()})
    got = model.state_dict()
    # Adam divides by the gradient's running RMS: where a gradient is near zero, float noise (a different
    # summation order) moves the update by a few percent of one step (lr = 1e-4). 5e-6 is 5% of a step; a
    # wrong loss scale, which Adam's update would hide, is caught by the loss comparison above.
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=5e-6)
    assert scheduler.get_last_lr() == official_sched.get_last_lr()[:1] == official_sched.get_last_lr()[1:]


@pytest.mark.slow
def test_run_splits_trains_tests_and_summarises(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import run_splits

    size = [f"model.{k}={v}" for k, v in TINY.items()]
    args = ["--opt", str(ROOT / "options" / "demo.yaml"), "--splits", "2", "--checkpoints", str(tmp_path / "ckpt"),
            f"data.root={tmp_path / 'data'}", "data.options={references: 5, size: 72}", "train.epochs=1",
            "train.batch_size=8", *size]
    assert run_splits.main(args) == 0
    rows = json.loads((tmp_path / "ckpt" / "demo_splits" / "summary.json").read_text())
    assert [r["split"] for r in rows] == [0, 1]
    splits = [json.loads((tmp_path / "ckpt" / f"demo_split{n}" / "split.json").read_text()) for n in (0, 1)]
    assert splits[0]["seed"] == 0 and splits[1]["seed"] == 1 and splits[0]["parts"] != splits[1]["parts"]
    table = (tmp_path / "ckpt" / "demo_splits" / "summary.md").read_text()
    srocc = [r["srocc"] for r in rows]
    assert f"| median | {np.median(srocc):.4f} |" in table
    assert f"| mean +- std | {np.mean(srocc):.4f} +- {np.std(srocc):.4f} |" in table
    assert f"| lowest to highest | {min(srocc):.4f} to {max(srocc):.4f} |" in table  # the spread across splits
    assert table.strip() in capsys.readouterr().out
    assert run_splits.main(args) == 0  # finished splits are tested again, not retrained
    assert (tmp_path / "ckpt" / "demo_split0" / "train.log").read_text().count("epoch 1 loss") == 1


def test_the_random_state_of_the_runs_own_gpu_only(monkeypatch):
    """A GPU run saves and restores the state of the GPU it runs on (process 3's cuda:3, resumed by a run on
    cuda:0); a CPU run on a machine with GPUs asks CUDA nothing (simulated: the test needs no GPU)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: asked.append(("get", device)) or torch.full((8,), 3, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: asked.append(("set", device, state[0].item())))
    for name in ("get_rng_state_all", "set_rng_state_all", "device_count"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: pytest.fail(f"torch.cuda.{name} asked"))
    state = experiment.rng_state(torch.device("cuda", 3))
    experiment.set_rng_state(state, torch.device("cuda", 0))
    assert asked == [("get", torch.device("cuda", 3)), ("set", torch.device("cuda", 0), 3)]
    asked.clear()
    cpu = experiment.rng_state(torch.device("cpu"))
    experiment.set_rng_state(state, torch.device("cpu"))  # a GPU run's checkpoint resumed on the CPU
    assert "cuda" not in cpu and asked == []



def test_official_drop_last_leaves_out_the_short_last_batch(tmp_path):
    """train.drop_last: 75 pairs in batches of 8 give 9 steps (the official loader) instead of 10."""
    train(tiny_options(tmp_path, "train.epochs=1", "train.drop_last=true"), tmp_path / "ckpt")
    assert torch.load(tmp_path / "ckpt" / "demo" / "latest.pth", weights_only=True)["scheduler"]["last_epoch"] == 9
    for world in (1, 2):
        kept = [rank_batches(75, 8, Job(rank, world), torch.Generator().manual_seed(3), drop_last=True)
                for rank in range(world)]
        assert all(len(batches) == 9 for batches in kept)
        indices = [i for batches in kept for batch in batches for i, w in batch if w]
        assert len(indices) == len(set(indices)) == 72
    full = rank_batches(75, 8, Job(0, 1), torch.Generator().manual_seed(3))
    assert len(full) == 10 and len(full[-1]) == 3
    assert rank_batches(75, 8, Job(0, 1), torch.Generator().manual_seed(3), drop_last=True) == full[:9]


def test_official_best_rule_takes_either_correlation():
    best = {"srocc": 0.80, "plcc": 0.90, "main": 1.70}
    srocc_up = {"srocc": 0.81, "plcc": 0.85, "main": 1.66}  # worse sum, better SROCC
    assert improves(srocc_up, best, "official") and not improves(srocc_up, best, "main")
    assert improves({"srocc": 0.85, "plcc": 0.88, "main": 1.73}, best, "main")
    assert not improves({"srocc": 0.79, "plcc": 0.89, "main": 1.68}, best, "official")
    assert improves({"srocc": 0.1, "plcc": 0.1, "main": 0.2}, {"main": -math.inf}, "official")  # the first validation


def test_official_option_file_is_pipal_with_the_quirks_switched_back_on():
    ours, official = load_options(ROOT / "options" / "pipal.yaml"), load_options(ROOT / "options" / "pipal_official.yaml")
    quirks = {("data", "flip"): ("width", "height"), ("data", "random_crop"): ("all", "official"),
              ("data", "targets"): ("dataset", "part"), ("train", "drop_last"): (False, True),
              ("train", "best"): ("main", "official"), ("name",): ("ahiq_pipal", "ahiq_pipal_official")}
    for path, (mine, theirs) in quirks.items():
        a, b = ours, official
        for key in path[:-1]:
            a, b = a[key], b[key]
        assert (a[path[-1]], b[path[-1]]) == (mine, theirs)
        a[path[-1]] = b[path[-1]]
    assert ours == official  # nothing else differs
