"""Two-process training with torchrun on the CPU (gloo) gives the single-process result, and one process
resumes a two-process run; what a GPU machine changes, with CUDA and the collectives simulated."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from ahiq.engine import training
from ahiq.engine.training import train
from ahiq.runtime.distributed import Job, init_distributed
from conftest import TINY, resolved, tiny_options, wait_for_line

ROOT = Path(__file__).resolve().parents[1]


def _run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")


@pytest.mark.slow
@needs_torchrun
def test_two_processes_train_like_one(tmp_path):
    # Frozen backbones: BatchNorm uses its running statistics, so no statistic depends on the per-process
    # batch. 75 training pairs in global batches of 8: the last batch (3 pairs) is shared unevenly. A variant
    # of the paper's ablations (Tables 6 and 8), whose every weight DistributedDataParallel must see used
    # (test_two_nodes_with_fine_tuned_backbones_train_like_one_process trains AHIQ itself).
    options = [f"data.root={tmp_path / 'data'}", "data.options={references: 5, size: 72}", "train.epochs=2",
               "train.batch_size=8", "train.save_interval=1", "train.resume=null", "train.device=cpu", "model.freeze_backbones=true",
               "data.num_workers=0", "model.fusion=concat", "model.pooling=patch+spatial",
               *[f"model.{k}={v}" for k, v in TINY.items()]]
    train = [str(ROOT / "train.py"), "--opt", str(ROOT / "options" / "demo.yaml")]
    _run([sys.executable, *train, "name=one", *options], tmp_path)
    _run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *train, "name=two", *options], tmp_path)
    one_log = (tmp_path / "checkpoints" / "one" / "train.log").read_text()
    two_log = (tmp_path / "checkpoints" / "two" / "train.log").read_text()
    assert "2 process(es)" in two_log and "1 process(es)" in one_log
    a = torch.load(tmp_path / "checkpoints" / "one" / "latest.pth", weights_only=True)
    b = torch.load(tmp_path / "checkpoints" / "two" / "latest.pth", weights_only=True)
    assert b["config"]["fusion"] == "concat" and "head.regress.0.weight" in b["model"]
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=1e-5, msg=key)
    first = torch.load(tmp_path / "checkpoints" / "one" / "epoch_1.pth", weights_only=True)["model"]
    moved = max((a["model"][k] - first[k]).abs().max().item() for k in first)
    assert moved > 1e-4  # the second epoch changed the weights: the agreement above is not trivial
    # Validation is sharded over the processes and gathered: every pair counted once, same metrics.
    assert b["best"]["n"] == a["best"]["n"] == 25
    assert b["best"]["srocc"] == pytest.approx(a["best"]["srocc"], abs=1e-3)
    written = sorted(p.name for p in (tmp_path / "checkpoints" / "two").glob("*.pth"))
    assert written == ["best.pth", "epoch_1.pth", "epoch_2.pth", "latest.pth"]  # rank 0 alone, no clashes
    # The two-process run's first epoch resumed by one process: the same second epoch.
    resumed = list(options)
    resumed[resumed.index("train.resume=null")] = f"train.resume={tmp_path / 'checkpoints' / 'two' / 'epoch_1.pth'}"
    _run([sys.executable, *train, "name=resumed", *resumed], tmp_path)
    c = torch.load(tmp_path / "checkpoints" / "resumed" / "latest.pth", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(c["model"][key], a["model"][key], rtol=0, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def pairs_to_score(tmp_path_factory):
    """A checkpoint holding its backbones and 5 references with 1 to 4 distorted images each (uneven shares
    for two processes), listed in a CSV out of reference order."""
    import numpy as np

    from ahiq.data.synthetic import distort, reference_image
    from ahiq.nn.model import AHIQ
    from trees import touch

    folder = tmp_path_factory.mktemp("pairs")
    torch.manual_seed(0)
    AHIQ(8, False, False, **TINY, freeze_backbones=False).save_checkpoint(folder / "model.pth")
    rng = np.random.default_rng(1)
    rows = []
    for r in range(5):
        ref = reference_image(rng, 72)
        touch(folder / "ref" / f"R{r}.png", ref)
        for d in range(1 + r % 4):
            touch(folder / "dist" / f"R{r}_{d}.png", distort(ref, "blur", d + 1, rng))
            rows.append(f"dist/R{r}_{d}.png,ref/R{r}.png")
    rng.shuffle(rows)
    (folder / "pairs.csv").write_text("dist,ref\n" + "\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
@needs_torchrun
def test_two_processes_score_like_one(pairs_to_score):
    """torchrun -m ahiq score: the processes share the pairs by reference and rank 0 writes one CSV, in
    the input order, equal to one process's to 1e-6; no journal is left behind."""
    import csv

    folder = pairs_to_score
    command = ["-m", "ahiq", "score", "--pairs", str(folder / "pairs.csv"), "--checkpoint", str(folder / "model.pth"),
               "--vit-pretrained", "false", "--cnn-pretrained", "false", "--crops", "random", "--num-crops", "3",
               "--device", "cpu"]
    _run([sys.executable, *command, "--out", str(folder / "one.csv")], ROOT)
    _run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *command, "--out", str(folder / "two.csv")], ROOT)
    one = list(csv.reader((folder / "one.csv").open()))
    two = list(csv.reader((folder / "two.csv").open()))
    listed = list(csv.reader((folder / "pairs.csv").open()))
    listed = [[str((folder / d).resolve()), str((folder / r).resolve())] for d, r in listed[1:]]
    assert [row[:2] for row in one[1:]] == [row[:2] for row in two[1:]] == listed and len(one) == 12
    assert max(abs(float(a[2]) - float(b[2])) for a, b in zip(one[1:], two[1:])) <= 1.01e-6  # 6 decimals
    assert len({row[2] for row in one[1:]}) == 11  # eleven different scores: a real comparison
    assert not list(folder.glob("*.part*"))


@pytest.mark.slow
@needs_torchrun
def test_test_py_under_two_processes_writes_what_one_writes(pairs_to_score, tmp_path):
    """test.py under torchrun: the test part shared by reference, rank 0 writes the same predictions."""
    options = [f"data.root={tmp_path / 'data'}", "data.options={references: 5, size: 72}", "train.device=cpu",
               "data.split.ratios=[0,0,1]", "data.num_workers=0", f"test.checkpoint={pairs_to_score / 'model.pth'}", "test.num_crops=2",
               "model.vit_pretrained=false", "model.cnn_pretrained=false", *[f"model.{k}={v}" for k, v in TINY.items()]]
    test = [str(ROOT / "test.py"), "--opt", str(ROOT / "options" / "demo.yaml")]
    _run([sys.executable, *test, "test.output=one", *options], tmp_path)
    _run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *test, "test.output=two", *options], tmp_path)
    one = (tmp_path / "one" / "results.txt").read_text().splitlines()
    two = (tmp_path / "two" / "results.txt").read_text().splitlines()
    assert len(one) == 125 and [r.split(",")[0] for r in one] == [r.split(",")[0] for r in two]
    assert max(abs(float(a.split(",")[1]) - float(b.split(",")[1])) for a, b in zip(one, two)) <= 1.01e-6


@pytest.mark.slow
@needs_torchrun
def test_a_cpu_run_under_torchrun_on_a_gpu_host_touches_no_cuda(tmp_path):
    """Two gloo processes with train.device=cpu on a machine whose CUDA looks available (tests/gpu_host.py:
    any CUDA context is an error): training, checkpoints with their random state, and a resume. The demo set
    does not exist yet, so both processes generate it at once."""
    options = [f"data.root={tmp_path / 'data'}", "data.options={references: 5, size: 72}", "train.epochs=1",
               "train.batch_size=8", "train.device=cpu", "data.num_workers=0", "train.resume=auto",
               *[f"model.{k}={v}" for k, v in TINY.items()]]
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(ROOT / "tests" / "gpu_host.py"), "--opt",
               str(ROOT / "options" / "demo.yaml"), *options]
    _run(command, tmp_path)
    _run([*command, "train.epochs=2"], tmp_path)  # resumed: the random state restored
    log = (tmp_path / "checkpoints" / "demo" / "train.log").read_text()
    assert "2 process(es)" in log and "resumed from" in log


@pytest.fixture
def gpu_machine(monkeypatch):
    """Process 1 of 2 under torchrun on a machine with two GPUs (simulated: nothing touches a GPU)."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(tdist, "get_rank", lambda: 1)
    return calls


def test_the_device_asked_for_decides_the_backend(gpu_machine):
    job, device = init_distributed("cpu")  # train.device=cpu on a GPU machine: gloo, no GPU touched
    assert (job.rank, job.world, device) == (1, 2, torch.device("cpu"))
    assert gpu_machine == [("gloo", {})]
    gpu_machine.clear()
    job, device = init_distributed("auto")  # each process its own GPU, nccl bound to it
    assert device == torch.device("cuda", 1)
    assert gpu_machine == [("set_device", device), ("nccl", {"device_id": device})]


def test_more_processes_than_gpus_is_refused(gpu_machine, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="the node has 2; start at most that many processes per node"):
        init_distributed("cuda")


def test_a_training_step_holds_one_collective_its_loss_and_stop_vote(tmp_path, monkeypatch):
    """The number of real samples in a global batch comes from the batch plan, not from an all_reduce
    and .item() (a device sync) per step; the ranks' stop votes (a signal on any rank) ride in the same
    all_reduce as the loss. Two processes simulated: every collective is counted."""
    reduced = []

    def all_reduce(tensor, *args, **kwargs):
        reduced.append(tuple(tensor.shape))
        tensor.mul_(2)  # the other process holds the same loss

    monkeypatch.setattr(training, "init_distributed", lambda device: (Job(0, 2, 0), torch.device("cpu")))
    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    monkeypatch.setattr(training, "destroy", lambda dist: None)
    monkeypatch.setattr("torch.nn.parallel.DistributedDataParallel", lambda module, **kwargs: module)
    # validation as one process would share and gather it
    monkeypatch.setattr(training, "score_shared", lambda score, pairs, job, progress=False: score(pairs, progress))
    train(tiny_options(tmp_path, "train.epochs=1", "train.device=cpu"), tmp_path / "ckpt")
    steps = torch.load(tmp_path / "ckpt" / "demo" / "latest.pth", weights_only=True)["scheduler"]["last_epoch"]
    assert steps == 10 and reduced == [(2,)] * steps  # 75 pairs, global batches of 8: (loss, stop vote) a step


@pytest.mark.slow
def test_several_processes_compile_the_wrapped_module(tmp_path, monkeypatch):
    """Under DDP the DistributedDataParallel wrapper itself is compiled (dynamo's DDP graph splitting lets
    gradient all-reduce overlap the backward pass). A one-process gloo group stands in for the job."""
    from torch.nn.parallel import DistributedDataParallel

    from ahiq.engine.training import make_stepper
    from ahiq.nn.official import random_official_setup

    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = random_official_setup(8, tmp_path, **TINY)[1].train()
        stepper = make_stepper(model, Job(0, 2, 0), resolved(compile=backend))
        assert isinstance(stepper._orig_mod, DistributedDataParallel) and stepper._orig_mod.module is model
        dist_img, ref_img = torch.rand(2, 2, 3, 64, 64)
        torch.testing.assert_close(stepper(dist_img, ref_img), model(dist_img, ref_img), rtol=0, atol=1e-6)
        assert graphs
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
@needs_torchrun
def test_two_nodes_with_fine_tuned_backbones_train_like_one_process(tmp_path):
    """The demo's trainable backbones, one process against a two-node job (two torchrun agents, --nnodes 2,
    c10d rendezvous on 127.0.0.1): the same weights and BatchNorm buffers after an epoch whose last global
    batch is shared unevenly (padding copies)."""
    import socket

    options = [f"data.root={tmp_path / 'data'}", "data.options={references: 5, size: 72}", "train.epochs=1",
               "train.batch_size=8", "train.resume=null", "train.device=cpu", "data.num_workers=0",
               *[f"model.{k}={v}" for k, v in TINY.items()]]
    train = [str(ROOT / "train.py"), "--opt", str(ROOT / "options" / "demo.yaml")]  # freeze_backbones: false
    _run([sys.executable, *train, "name=one", *options], tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(rank),
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ahiq",
                               *train, "name=two", *options], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    for node in nodes:
        out, _ = node.communicate(timeout=600)
        assert node.returncode == 0, out[-3000:]
    one = torch.load(tmp_path / "checkpoints" / "one" / "latest.pth", weights_only=True)
    a, b = one["model"], torch.load(tmp_path / "checkpoints" / "two" / "latest.pth", weights_only=True)["model"]
    assert "cnn.stem.1.running_var" in a and a.keys() == b.keys()  # the backbones and their buffers are saved
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=0, atol=1e-5, msg=key)
    assert all(state["step"] == 10 for state in one["optimizer"]["state"].values())  # 75 pairs: 10 steps taken
    first = (tmp_path / "checkpoints" / "two" / "train.log").read_text().splitlines()[0]
    assert first.endswith("CPU threads: 1 (runtime.threads), GOMP_SPINCOUNT=10000; 2 process(es)"), first


@pytest.mark.slow
def test_the_launcher_passes_sigterm_on_and_ends_in_one_line_per_process(tmp_path):
    """python -m ahiq launch, signalled itself as Kubernetes signals a container's first process (its workers,
    in sessions of their own, get no signal but the one it passes on): both workers stop at a step with
    latest.pth written, each says so in one line, the launcher in one more, exit 143, no traceback."""
    import signal

    options = [f"data.root={tmp_path / 'data'}", "data.options={references: 10, size: 72}", "train.epochs=3",
               "train.device=cpu", "data.num_workers=0", "train.resume=null",
               *[f"model.{k}={v}" for k, v in TINY.items()]]
    launcher = subprocess.Popen([sys.executable, "-m", "ahiq", "launch", "--standalone", "--nproc_per_node", "2",
                                 str(ROOT / "train.py"), "--opt", str(ROOT / "options" / "demo.yaml"), *options],
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(launcher, tmp_path / "checkpoints" / "demo" / "train.log", " epoch 1 loss")
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err
    assert len(re.findall(r"^stopped by SIGTERM (at epoch 2, step \d+ of 10|after epoch 1);", err, re.M)) == 2, err
    assert len(re.findall(r"^ahiq launch on .*: stopped by SIGTERM", err, re.M)) == 1, err
    assert torch.load(tmp_path / "checkpoints" / "demo" / "latest.pth", weights_only=True)["epoch"] in (0, 1)
