"""pip-installable: a wheel built from the checkout, installed into a fresh virtual environment in a
temporary folder, gives the `ahiq` command and the package from outside the checkout. The environment
reuses this one's dependencies (torch and the rest) instead of downloading them."""
import importlib.util
import os
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


def _run(command, cwd):
    """``command``, as from a fresh shell: the caller's PYTHONPATH (a checkout on it would be taken for an
    installed ahiq) is left out."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_a_built_wheel_installs_the_package_and_the_command(tmp_path):
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    # built from a copy of the checkout's sources: a build in place would leave build/ and ahiq.egg-info in it
    source = tmp_path / "source"
    kept = ("ahiq", "pyproject.toml", "README.md", "LICENSE")
    shutil.copytree(ROOT, source, ignore=lambda folder, names: [n for n in names if n == "__pycache__" or (
        folder == str(ROOT) and n not in kept)])
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(tmp_path / "dist"), str(source)],
         tmp_path)
    wheel = next((tmp_path / "dist").glob("ahiq-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"ahiq/nn/zoo.py", "ahiq/engine/training.py", "ahiq/data/labels.py"} <= set(names)
    assert not any(n.startswith("tests/") for n in names)
    env = tmp_path / "env"
    _run([sys.executable, "-m", "venv", str(env)], tmp_path)
    python = env / "bin" / "python"
    packages = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip()
    # This environment's packages after the new one's own (a .pth line is not a site folder, so this one's
    # editable install of the checkout is not seen there).
    (tmp_path / packages / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path)
    assert "usage: ahiq [-h] {score,export,download,compare,app,launch,zoo}" in _run([str(env / "bin" / "ahiq"), "--help"], tmp_path)
    where = _run([str(python), "-c", "import ahiq, ahiq.nn.zoo; print(ahiq.__file__)"], tmp_path).strip()
    assert where.startswith(str(env)), where  # the installed copy, not the checkout


POSIX_ONLY = ("fcntl", "termios", "pwd", "grp", "resource")


def test_without_posix_modules_ahiq_imports_and_scores(tiny_checkpoint, tmp_path):
    """As on Windows (no fcntl, termios, pwd, grp, resource) or macOS (no os.sched_getaffinity): import ahiq,
    score a pair with the Scorer and the metric, and size the threads. The libraries ahiq uses import fcntl
    where it is there (and run without it where it is not): they load first, and ahiq's own imports are
    the ones refused."""
    import cv2
    import numpy as np

    image = np.random.default_rng(0).integers(0, 256, (72, 72, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "ref.png"), image)
    cv2.imwrite(str(tmp_path / "dist.png"), cv2.GaussianBlur(image, (5, 5), 2))
    code = f"""
import os, sys, cv2, numpy, scipy.stats, timm, torch, torchvision, tqdm, yaml
for name in {POSIX_ONLY!r}:
    sys.modules.pop(name, None)
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name in {POSIX_ONLY!r}:
            raise ImportError(f"No module named {{name!r}} (refused by the test)")
sys.meta_path.insert(0, Refuse())
del os.sched_getaffinity
import ahiq, ahiq.files, ahiq.runtime.threads
assert ahiq.files.fcntl is None
scorer = ahiq.Scorer({str(tiny_checkpoint)!r}, vit_pretrained=False, cnn_pretrained=False, crops="five")
a = scorer.score({str(tmp_path / 'dist.png')!r}, {str(tmp_path / 'ref.png')!r})
metric = ahiq.create_metric({str(tiny_checkpoint)!r}, vit_pretrained=False, cnn_pretrained=False, crops="five")
b = float(metric({str(tmp_path / 'dist.png')!r}, {str(tmp_path / 'ref.png')!r})[0])
print(a, b, ahiq.runtime.threads.usable_cpus()[0])
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b, cpus = done.stdout.split()
    assert float(a) == pytest.approx(float(b), abs=1e-6) and int(cpus) == (os.cpu_count() or 1)


@pytest.mark.slow
def test_spawned_loader_workers_train_and_predict_as_in_process(tmp_path):
    """DataLoader workers started by spawn, the default on macOS and Windows, receive the dataset and the
    collate function pickled: a training epoch with loader workers (its validation too) runs, and prediction
    through a spawned worker gives the in-process scores."""
    code = f"""
import multiprocessing, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT / 'tests')!r})
import numpy as np, torch
from ahiq.data import CropPlan, load_parts
from ahiq.engine.training import train
from ahiq.nn.model import build_model
from ahiq.scoring.inference import predict
from conftest import ensemble, tiny_options

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn")
    opt = tiny_options(Path({str(tmp_path)!r}), "train.epochs=1", "data.num_workers=1")
    train(opt, Path({str(tmp_path / 'ckpt')!r}))
    part = load_parts(opt["data"])["test"]
    model = build_model(opt["model"]).eval()
    alone = predict(ensemble([model], CropPlan(64, "five")), part.pairs, batch_size=4)
    spawned = predict(ensemble([model], CropPlan(64, "five")), part.pairs, batch_size=4, num_workers=1)
    print(float(np.abs(alone - spawned).max()), len(spawned))
"""
    (tmp_path / "spawned.py").write_text(code)
    done = subprocess.run([sys.executable, str(tmp_path / "spawned.py")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    difference, pairs = done.stdout.split()[-2:]
    assert float(difference) == 0 and int(pairs) == 25


@pytest.mark.parametrize("script", ["benchmark.py", "gpu_check.py", "run_splits.py", "maps_picture.py", "sharing.py",
                                    "operations.py", "onnx_speed.py", "profile_ops.py"])
def test_a_scripts_help_answers_without_loading_torch(script):
    code = (f"import runpy, sys; sys.argv = ['{script}', '--help']\n"
            f"try:\n    runpy.run_path({str(ROOT / 'scripts' / script)!r}, run_name='__main__')\n"
            f"except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith("False") and "usage:" in done.stdout, done.stdout + done.stderr
