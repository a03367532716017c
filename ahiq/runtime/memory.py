"""How many crops a forward pass takes: what the memory a device can give (a quarter of the CPU's available memory)
holds of what a crop costs (``CropCost``, given by the scorer that knows its model), and on a CPU no more than pay
off (``CPU_CROPS``). The PyTorch runtime (ahiq.runtime.device) and the ONNX scorer size their passes by this rule.
No torch."""
from __future__ import annotations

from typing import NamedTuple

MAX_CHUNK = 64
# The most crops per forward pass that pay off on a CPU, by precision (scripts/benchmark.py --suite chunk): fp32's
# matmuls are as fast with one crop's rows as with more; bf16's (AMX, AVX512-BF16) need two to four crops' rows.
CPU_CROPS = {"fp32": 1, "bf16": 4}


class CropCost(NamedTuple):
    """The bytes one crop of a model takes in a forward pass: evaluating, and under autograd with respect to the
    input (the metric as a loss, whose crops keep their activations for the backward pass)."""
    evaluating: float
    with_grad: float


def available_memory() -> float:
    """The memory the system can give without swapping (Linux's MemAvailable); 8 GiB where unknown."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 8.0 * 2 ** 30


def cpu_budget() -> float:
    """The bytes of crops one forward pass may take on the CPU: a quarter of the available memory."""
    return available_memory() / 4


def cpu_crops(crop_bytes: float, precision: str) -> int:
    """Crops per forward pass on the CPU: what cpu_budget holds of crops of ``crop_bytes``, at most CPU_CROPS of
    ``precision`` ("fp32" or "bf16")."""
    return min(CPU_CROPS[precision], crops_in_budget(crop_bytes, cpu_budget()))


def crops_in_budget(crop_bytes: float, budget: float) -> int:
    """How many crops of ``crop_bytes`` each fit in ``budget`` bytes: between 1 and MAX_CHUNK."""
    return int(max(1, min(MAX_CHUNK, budget // crop_bytes)))
