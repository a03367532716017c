"""How a run computes and samples: the precisions (ahiq.runtime), the evaluation crop modes and the training
crops' positions and flips (ahiq.data.crops, ahiq.data.datasets), the deformable convolution's implementations
(ahiq.nn.fusion) and what the bootstrap resamples (ahiq.engine.statistics)."""
from __future__ import annotations

from ahiq.registry import named

PRECISIONS = named("runtime.precision", {
    "fp32": "strict fp32, the reference numbers",
    "bf16": "convolutions and matmuls in bf16 for training and evaluation; the deformable sampling positions and the "
            "final weighted mean in fp32; scores within about 0.01 of fp32",
    "auto": "bf16 where the device has it natively: a GPU with bf16, or a CPU with AVX512-BF16 or AMX where a "
            "first-use measurement finds bf16 faster; fp32 elsewhere"})
EVAL_CROPS = named("crop mode", {
    "five": "the four corners and the centre, in the official order", "nine": "the five, then the middles of the four "
    "sides", "random": "random crops seeded by the seed and the reference image's name", "centre": "the centre crop",
    "whole": "the image itself, which must be exactly the crop size"})
RANDOM_CROPS = named("data.random_crop", {"all": "training crops at every position, the last row and column included",
                                          "official": "as the official `np.random.randint(0, size - 224)`, which "
                                                      "never reaches them"})
FLIPS = named("data.flip", {"width": "a paired horizontal flip",
                            "height": "the official code's flip, which turns the image upside down", None: "none"})
DEFORM_IMPLS = named("model.deform_impl", {"bilinear": "fast, exact", "torchvision": "torchvision's kernel, the reference"})
BOOTSTRAP_UNITS = named("test.bootstrap.by", {"reference": "whole reference images: pairs that share one are not "
                                                           "independent", "pair": "single pairs"})
