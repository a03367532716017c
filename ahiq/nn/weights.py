"""Reading weight files and matching them to a module: shared by the backbones and the AHIQ checkpoints."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ahiq.files import atomic_file
from ahiq.messages import listed


class WeightsError(ValueError):
    """A weight file that cannot be used for the module it was given to."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written; the file it would have replaced is untouched."""


_scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
# What the weights-only unpickler may call to rebuild a numpy scalar, by the qualified names in the pickle
# (numpy 1 wrote numpy.core, numpy 2 writes numpy._core), and the dtypes whose state it may set.
NUMPY_SCALARS = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)),
                 (_scalar, "numpy.core.multiarray.scalar"), (_scalar, "numpy._core.multiarray.scalar")]


def read_weight_file(path: str | os.PathLike) -> Any:
    """Load a ``.pth``/``.pt``/``.bin`` (torch.save) or ``.safetensors`` file onto the CPU.

    Torch files are read with ``weights_only=True`` (no arbitrary code runs). Numpy scalars, which the
    official AHIQ training script stores as ``loss``, are allowed under the names numpy 1 and numpy 2 pickle
    them as (the released file says ``numpy.core.multiarray.scalar``).
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"weight file {path} is a folder; give the file itself")
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals(NUMPY_SCALARS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError on bad files
        raise WeightsError(f"{path} is not a readable torch or safetensors weight file ({_load_failure(exc)}); "
                           f"give a file written by torch.save (.pth, .pt, .bin) or a .safetensors file") from exc


def _load_failure(exc: Exception) -> str:
    """The gist of torch.load's message, in one line: its weights_only explanation runs to paragraphs."""
    text = str(exc)
    if "Weights only load failed" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        marker = next((i for i, line in enumerate(lines) if "WeightsUnpickler error" in line), None)
        detail = lines[marker + 1] if marker is not None and marker + 1 < len(lines) else ""
        return f"not a torch.save file of tensors and plain values{': ' + detail if detail else ''}"
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor dict inside a saved object: itself, or nested under ``state_dict`` or ``model``.

    A ``module.`` prefix left by DataParallel/DistributedDataParallel is removed.
    """
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError("no state dict found: expected a dict of tensors, optionally under 'state_dict' or 'model'")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one WeightsError naming every missing, unexpected and wrongly shaped key."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [
        f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected
        if k in given and given[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listed(unexpected)}")
    if wrong_shape:
        problems.append(f"wrongly shaped keys: {listed(wrong_shape)}")
    if problems:
        raise WeightsError(f"{source} does not fit this model; " + "; ".join(problems))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as f:
            torch.save(obj, f)
    except BaseException as exc:
        if isinstance(exc, (OSError, RuntimeError)):  # torch.save reports a full disk as RuntimeError too
            kept = "the previous file is intact" if path.exists() else "nothing was written"
            raise CheckpointWriteError(f"could not write {path} ({exc}); {kept}. Free disk space, then "
                                       f"continue with train.resume=auto") from exc
        raise
