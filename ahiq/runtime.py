"""How the model runs on its device: fp32 or bf16 autocast, TF32, the channels_last layout and
torch.compile. Shared by train.py, test.py, the scorer and the benchmark (the ``runtime`` options)."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

COMPILED_METHODS = ("forward", "reference_features", "score_with_reference")


@dataclass(frozen=True)
class Runtime:
    """``precision``: "fp32", or "bf16" (autocast: convolutions and matmuls in bf16, the deformable
    sampling positions and the final weighted mean in fp32). ``tf32``: let fp32 matmuls and convolutions
    use TF32 on GPUs that have it (off: strict fp32). ``channels_last``: NHWC weights and inputs, what
    tensor cores want. ``compile``: torch.compile the model's entry points (True: the default inductor
    backend; a string: that backend). ``crop_chunk``: the most crops in one forward pass when evaluating
    (the memory budget)."""

    precision: str = "fp32"
    tf32: bool = False
    channels_last: bool = False
    compile: bool | str | Callable = False
    crop_chunk: int = 64

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"runtime.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.crop_chunk < 1:
            raise ValueError(f"runtime.crop_chunk must be at least 1, got {self.crop_chunk}")

    def autocast(self, device: torch.device):
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` on ``device`` with this runtime's settings; its state_dict keys are unchanged."""
        if self.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"runtime.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                             f"use runtime.precision=fp32")
        if self.precision == "bf16" and device.type == "cpu":
            warnings.warn("runtime.precision=bf16 on the CPU: most CPUs emulate bf16 and run it far slower than "
                          "fp32 (it is meant for GPUs)", stacklevel=2)
        if device.type == "cuda":
            set_tf32(self.tf32)
        model = model.to(device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        if self.compile:
            backend = "inductor" if self.compile is True else self.compile  # a name or a backend function
            for name in COMPILED_METHODS:  # instance attributes: checkpoints keep their keys
                setattr(model, name, torch.compile(getattr(model, name), backend=backend))
        return model

    def inputs(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A batch of images [N, 3, H, W] on ``device`` in this runtime's memory layout."""
        images = images.to(device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def select_device(name: str) -> torch.device:
    """``auto`` (CUDA where there is a GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is '{name}' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def set_tf32(enabled: bool) -> None:
    """Whether fp32 matmuls and convolutions may use TF32 on GPUs that have it (process-wide; off: strict
    fp32, where cuDNN's own default would allow TF32 convolutions)."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
