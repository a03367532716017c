"""What one crop of an AHIQ model costs in memory in a forward pass, from its config: the PyTorch runtime and the
ONNX scorer size their passes by it (ahiq.runtime.memory). No torch."""
from __future__ import annotations

from ahiq.runtime.memory import CropCost

# Measured per full-size ViT-B/8 crop in fp32 on the CPU (the difference between one and two crops per pass):
# 125 MiB evaluating, 319 MiB under autograd with respect to the distorted input (2.6 times).
FULL_SIZE_CROP_BYTES = 128 * 2 ** 20
GRAD_FACTOR = 3.0


def crop_cost(config: dict) -> CropCost:
    """The memory one crop of a model of ``config`` takes: FULL_SIZE_CROP_BYTES for the paper's ViT-B/8 at 224
    (patch 16 is counted the same: its CNN branch, the larger part, is the same), scaled by the crop's area and
    the widths; GRAD_FACTOR times that under autograd. bf16 counts as fp32: at twice the crops its peak was
    above fp32's (benchmark)."""
    evaluating = FULL_SIZE_CROP_BYTES * (config["img_size"] / 224) ** 2 * max(config["vit_dim"] / 768,
                                                                             config["cnn_width"] / 64)
    return CropCost(evaluating, evaluating * GRAD_FACTOR)
