"""The benchmarks' operation counts (scripts/measure.py, for scripts/operations.py and scripts/benchmark.py) against hand
computations, and their rows."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from ahiq.nn.fusion import deform_conv2d_bilinear
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from measure import agreement, agreement_text, count_gflop  # noqa: E402


def test_deformable_convolution_counts_as_the_convolution_it_computes():
    x, offset = torch.randn(2, 6, 9, 11, requires_grad=True), 2 * torch.randn(2, 18, 9, 11)
    weight, bias = torch.randn(5, 6, 3, 3, requires_grad=True), torch.randn(5)
    conv = 2 * (2 * 5 * 9 * 11) * (6 * 3 * 3) / 1e9  # a multiply and an add per weight and output element
    assert count_gflop(lambda: deform_conv2d(x, offset, weight, bias, padding=(1, 1))) == pytest.approx(conv)
    assert count_gflop(lambda: deform_conv2d_bilinear(x, offset, weight, bias, padding=1)) == pytest.approx(conv)
    # with the gradients: torchvision's backward counted as two convolutions (input and weight gradients),
    # the bilinear one's two matmuls (weight gradient, column gradient)
    for deform in (lambda: deform_conv2d(x, offset, weight, bias, padding=(1, 1)),
                   lambda: deform_conv2d_bilinear(x, offset, weight, bias, padding=1)):
        assert count_gflop(lambda: deform().sum().backward()) == pytest.approx(3 * conv)


def test_cpu_attention_counts_as_the_gpu_kernels():
    q, k, v = torch.randn(3, 2, 4, 50, 16)
    attention = 2 * 2 * (2 * 4 * 50 * 50 * 16) / 1e9  # Q K^T and (softmax) V, a multiply and an add each
    assert count_gflop(lambda: F.scaled_dot_product_attention(q, k, v)) == pytest.approx(attention)


def test_the_agreement_column_compares_every_row_with_the_official_scores():
    """Not the fp32 row with itself (an echo that printed 0.00e+00): each row against the official pattern,
    a bf16 row also against ahiq's fp32 row."""
    official = np.array([0.5, 0.25])
    scores = {"fp32": np.array([0.5 + 3e-8, 0.25]), "bf16": np.array([0.5, 0.26])}
    assert agreement_text(agreement(scores, official, "fp32")) == "max |diff| 3.00e-08"
    assert agreement_text(agreement(scores, official, "bf16")) == "max |diff| 1.00e-02 (against ahiq fp32 1.00e-02)"
