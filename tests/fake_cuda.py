"""A CUDA machine for tests on one without a GPU.

* ``simulated(gpu, count, free)``: the CUDA driver's answers for named GPUs (is a GPU there, how many, their
  name, compute capability, bf16, free memory, the current device, stream capture), given to torch's own
  functions (torch.cuda.is_bf16_supported, mem_get_info, get_device_name, torch.cuda.device ...), so that the
  decisions ahiq makes from them run as they would on that machine.
* ``fake_cuda(...)``: the same, with tensors on "cuda" that carry device, dtype, shape and strides through
  every operator's meta kernel and hold no data (torch's FakeTensorMode): a CPU tensor mixed into a CUDA
  operation fails as on a GPU. Values cannot be read back (``.item()``, numpy): the code's device parts end at
  a tensor, and the tests trace up to it.

What no simulation reaches: the backward pass (torch's autograd engine asks the real driver for the
device's primary context), NCCL, torch.compile's CUDA kernels, real numerics and speed: tests/test_cuda.py
and scripts/gpu_check.py on a GPU.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from unittest import mock

import torch

try:  # torch's private module: the one place it is imported, so that a torch that moves it fails here
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
except ImportError as exc:
    raise ImportError(f"torch {torch.__version__} has no torch._subclasses.fake_tensor.FakeTensorMode, which "
                      f"tests/fake_cuda.py needs to trace the CUDA paths without a GPU") from exc


@dataclass(frozen=True)
class GPU:
    name: str                   # as torch.cuda.get_device_name gives it
    capability: tuple[int, int]
    memory: int                 # bytes


GiB = 2 ** 30
GPUS = {
    "V100": GPU("Tesla V100-SXM2-32GB", (7, 0), 32 * GiB),    # Volta: bf16 only emulated
    "A100": GPU("NVIDIA A100-SXM4-80GB", (8, 0), 80 * GiB),   # Ampere: native bf16, TF32
    "H100": GPU("NVIDIA H100 80GB HBM3", (9, 0), 80 * GiB),   # Hopper
}


class FakeCUDA(FakeTensorMode):
    """Fake tensors that never initialise a real device (FakeTensorMode would, once the simulated driver
    says CUDA is there)."""

    avoid_device_init = True


@contextlib.contextmanager
def simulated(gpu: str = "A100", count: int = 1, free: int | None = None):
    """``count`` GPUs of the kind ``gpu`` (GPUS), each with ``free`` bytes free (default: 90% of its memory).
    Yields the state: ``current``, the current device's index, as torch.cuda.set_device leaves it."""
    spec = GPUS[gpu]
    state = types.SimpleNamespace(current=0)
    free = int(spec.memory * 0.9) if free is None else free
    properties = types.SimpleNamespace(name=spec.name, major=spec.capability[0], minor=spec.capability[1],
                                       total_memory=spec.memory)

    def exchange(index):
        previous = state.current
        if index >= 0:
            state.current = index
        return previous

    def set_device(device):
        state.current = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index or 0

    driver = types.SimpleNamespace(cudaMemGetInfo=lambda index: (free, spec.memory))
    answers = {"is_available": lambda: True, "device_count": lambda: count, "current_device": lambda: state.current,
               "_exchange_device": exchange, "_maybe_exchange_device": exchange, "set_device": set_device,
               "get_device_properties": lambda device=None: properties, "cudart": lambda: driver,
               "_check_bf16_tensor_supported": lambda device: True,  # emulation works on every CUDA GPU
               "is_current_stream_capturing": lambda: False}
    with contextlib.ExitStack() as patches:
        for name, answer in answers.items():
            patches.enter_context(mock.patch.object(torch.cuda, name, answer))
        yield state


@contextlib.contextmanager
def fake_cuda(gpu: str = "A100", count: int = 1, free: int | None = None):
    """``simulated`` GPUs, and tensors on them faked. Modules built before are moved in with ``.to("cuda")``
    (their parameters become fake); CPU tensors given to ``.to("cuda")`` become fake CUDA tensors."""
    with simulated(gpu, count, free) as state, FakeCUDA(allow_non_fake_inputs=True):
        yield state


def on_fake_cuda(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a fake tensor on the (first) CUDA device."""
    return isinstance(tensor, FakeTensor) and tensor.device == torch.device("cuda", 0)
