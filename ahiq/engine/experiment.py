"""The experiment folder ``checkpoints/<name>/``: its log, its training checkpoints (written atomically,
read back with a fallback to the newest good one), and the random state they carry for an exact resume."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from ahiq.files import TEMPORARY_PATTERN, take_lock
from ahiq.nn.model import AHIQ
from ahiq.nn.weights import WeightsError, read_weight_file

log = logging.getLogger("ahiq")


def setup_logging(experiment_dir: Path) -> None:
    """The ``ahiq`` logger writes to ``train.log`` in the folder and to the console."""
    experiment_dir.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    close_logging()
    file_handler = logging.FileHandler(experiment_dir / "train.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(file_handler)
    log.addHandler(console)
    log.propagate = False


def close_logging() -> None:
    """Detach the ``ahiq`` logger from its files (train.log) and the console."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def remove_stale_temporaries(experiment_dir: Path) -> None:
    for stale in experiment_dir.glob(TEMPORARY_PATTERN):  # a save that was killed halfway
        log.info(f"removing {stale}, left by an interrupted checkpoint write")
        stale.unlink(missing_ok=True)


def resume_path(resume: str | None, experiment_dir: Path) -> Path | None:
    """The checkpoint ``train.resume`` asks for: None (a new run), ``auto`` (latest.pth if any) or a path."""
    latest = experiment_dir / "latest.pth"
    if resume is None:
        if latest.exists():
            raise ValueError(f"{experiment_dir} already holds a run (latest.pth): continue it with "
                             f"train.resume=auto, or choose another name=...")
        return None
    if resume == "auto":
        return latest if latest.exists() else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"train.resume: checkpoint {resume} does not exist")
    return Path(resume)


def rng_state(device: torch.device) -> dict:
    """The random state of the run: torch's, numpy's, Python's, and on a CUDA run its own GPU's. Only the
    run's device is asked: a CPU run on a machine with GPUs creates no CUDA context (under torchrun, one per
    process and GPU), and a GPU run touches no other GPU."""
    # numpy's state as a tensor and plain numbers: checkpoints stay loadable with weights_only=True
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       cached], "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore rng_state's state; the GPU state goes to the run's own GPU (whichever GPU, or however many,
    the run that saved it had), and a run on the CPU ignores it."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_checkpoint(path: Path, model: AHIQ, optimizer, scheduler, epoch: int, best: dict, opt: dict,
                             device: torch.device, **extra) -> None:
    model.save_checkpoint(path, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch,
                          best=best, rng=rng_state(device), options=opt, **extra)


def load_training_checkpoint(path: Path, experiment_dir: Path) -> tuple[Path, dict]:
    """(path, content) of a training checkpoint; a corrupt latest.pth falls back to the newest good epoch_N.pth."""
    candidates = [path]
    if path.name == "latest.pth":
        epochs = sorted(experiment_dir.glob("epoch_*.pth"), key=lambda p: int(p.stem.split("_")[1]), reverse=True)
        candidates += epochs
    for candidate in candidates:
        try:
            saved = read_weight_file(candidate)
            if not isinstance(saved, dict) or "optimizer" not in saved:
                raise WeightsError(f"{candidate} is not a training checkpoint of this project")
            return candidate, saved
        except (WeightsError, OSError) as exc:
            log.warning(f"cannot resume from {candidate}: {exc}")
    raise WeightsError(f"no usable checkpoint to resume from in {experiment_dir}")


def nonfinite_loss_error(what: str, experiment_dir: Path, advice: str) -> FloatingPointError:
    """The error that ends a run which cannot go on, naming the checkpoint it can continue from."""
    latest = experiment_dir / "latest.pth"
    kept = f"the last good checkpoint is {latest}" if latest.exists() else "no checkpoint had been written yet"
    return FloatingPointError(f"{what}; {kept}; {advice}")


def lock_folder(experiment_dir: Path):
    """An exclusive lock on ``experiment_dir`` (its ``.lock`` file) for as long as the returned file stays
    open: a second run on the folder fails at once, naming the process that holds it (ahiq.files)."""
    experiment_dir.mkdir(parents=True, exist_ok=True)
    return take_lock(experiment_dir / ".lock", str(experiment_dir), "choose another name=...")
