import os
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: the workers share the CPUs, one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ahiq.runtime.threads import prepare_environment  # noqa: E402

prepare_environment()  # the command lines' OpenMP waits for the tests too, before torch loads

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

from ahiq.options import load_options  # noqa: E402
from ahiq.runtime.device import ResolvedRuntime, Runtime, set_tf32  # noqa: E402
from ahiq.runtime.memory import CropCost  # noqa: E402

# A reduced AHIQ for fast tests: same structure as the paper's, far fewer channels and a 64-pixel input.
TINY = dict(img_size=64, vit_dim=32, vit_heads=2, cnn_width=8, fusion_hidden=16, head_dim=16, head_hidden=32)


def resolved(device: str | torch.device = "cpu", **settings) -> ResolvedRuntime:
    """``Runtime(**settings)`` resolved for ``device``, as for crops too small to limit a pass (MAX_CHUNK crops
    per pass unless ``crop_chunk`` says)."""
    return Runtime(**settings).resolve(torch.device(device), CropCost(1.0, 1.0))


def ensemble(models, plan, device: str | torch.device = "cpu", **settings):
    """An Ensemble of ``models`` (on ``device``) scoring ``plan``'s crops with ``resolved(device, **settings)``."""
    from ahiq.scoring.ensemble import Ensemble

    return Ensemble(list(models), plan, resolved(device, **settings))


# Where a test is parametrised over devices: the CPU always, CUDA where there is a GPU (CI has none).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    if torch.cuda.is_available():  # tests compare fp32 paths: TF32 only where runtime.tf32 asks for it
        set_tf32(False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny AHIQ checkpoint (this project's format) that holds its backbones: it scores without any
    pretrained weights (--vit-pretrained false --cnn-pretrained false)."""
    from ahiq.nn.model import AHIQ

    path = tmp_path_factory.mktemp("tiny") / "model.pth"
    torch.manual_seed(0)
    AHIQ(8, False, False, **TINY, freeze_backbones=False).save_checkpoint(path)
    return path


def layouts_on_the_way(net, run) -> dict:
    """The tensors where a channels_last run could fall back to NCHW: the ViT map, the deformable convolution's
    output (the fusion's projection input), the head's reduction input and its smoothing input (after the
    concatenation with the broadcast reference). ``run()`` calls ``net``; the same hooks on every device."""
    layouts = {}
    hooks = [net.vit.register_forward_hook(lambda m, i, o: layouts.update(vit=o)),
             net.fusion.project[0].register_forward_pre_hook(lambda m, i: layouts.update(deformed=i[0])),
             net.head.reduce.register_forward_pre_hook(lambda m, i: layouts.update(reduce=i[0])),
             net.head.smooth[0].register_forward_pre_hook(lambda m, i: layouts.update(smooth=i[0]))]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return layouts


def tiny_options(tmp_path, *overrides):
    """The demo options on a smaller synthetic set (5 references: 3 train, 1 val, 1 test) and model."""
    size = [f"model.{k}={v}" for k, v in TINY.items()]
    return load_options(ROOT / "options" / "demo.yaml", [
        f"data.root={tmp_path / 'data'}", "data.options={references: 5, size: 72}", "train.epochs=2",
        "train.batch_size=8", "train.save_interval=2", "train.resume=null", *size, *overrides])


def wait_for_line(process, log: Path, text: str, timeout: float = 300) -> None:
    """Wait until the file ``log`` (which ``process`` writes) holds ``text``; fail with the process's output if
    the process ends first or the time runs out."""
    import time

    end = time.monotonic() + timeout
    while not (log.is_file() and text in log.read_text()):
        assert process.poll() is None and time.monotonic() < end, process.communicate(timeout=60)
        time.sleep(0.2)


# The slowest files first: pytest -n N hands whole files to its workers in this order, and a long file
# handed out last would keep one worker busy while the others idle.
SLOWEST_FIRST = ["test_reliability.py", "test_distributed.py", "test_gpu_check.py", "test_ablations.py", "test_onnx.py",
                 "test_known_answers.py", "test_slurm.py", "test_zoo.py", "test_package.py", "test_runtime.py",
                 "test_training.py", "test_model.py", "test_distortions.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: the rest keep their order
