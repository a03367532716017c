"""What a crop costs in memory, and how many crops a forward pass takes: the PyTorch runtime (ahiq.runtime.device)
and the ONNX scorer size their passes by the same rule. No torch."""
from __future__ import annotations

MAX_CHUNK = 64
# Measured per full-size ViT-B/8 crop in fp32 on the CPU (the difference between one and two crops per pass):
# 125 MiB evaluating, 319 MiB under autograd with respect to the distorted input (2.6 times).
FULL_SIZE_CROP_BYTES = 128 * 2 ** 20
GRAD_FACTOR = 3.0
CPU_CHUNK_BUDGET = FULL_SIZE_CROP_BYTES  # one crop: more per pass are no faster on a CPU (benchmark --suite chunk)


def crop_bytes(config: dict) -> float:
    """The memory one crop takes in an evaluation forward pass: FULL_SIZE_CROP_BYTES for the paper's ViT-B/8
    at 224 (patch 16 is counted the same: its CNN branch, the larger part, is the same), scaled by the crop's
    area and the widths."""
    return FULL_SIZE_CROP_BYTES * (config["img_size"] / 224) ** 2 * max(config["vit_dim"] / 768,
                                                                       config["cnn_width"] / 64)


def available_memory() -> float:
    """The memory the system can give without swapping (Linux's MemAvailable); 8 GiB where unknown."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 8.0 * 2 ** 30


def cpu_budget() -> float:
    """The bytes of crops one forward pass may take on the CPU: a quarter of the available memory, at most
    CPU_CHUNK_BUDGET."""
    return min(available_memory() / 4, CPU_CHUNK_BUDGET)


def crops_in_budget(config: dict, budget: float, autograd: bool = False) -> int:
    """How many crops of a model of ``config`` fit in ``budget`` bytes (under ``autograd``, the metric as a
    loss, a crop weighs GRAD_FACTOR times more): between 1 and MAX_CHUNK. bf16 counts as fp32: at twice the
    crops its peak was above fp32's (benchmark)."""
    per_crop = crop_bytes(config) * (GRAD_FACTOR if autograd else 1)
    return int(max(1, min(MAX_CHUNK, budget // per_crop)))
