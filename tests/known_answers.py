"""The generated weights and images behind tests/data/official_known_answers.json, the numbers the official
AHIQ code produced (its own modules, full timm backbones with hooks, fp32 on a CPU, TIMM_FUSED_ATTN=0).

Weights: every floating tensor of a state dict comes from a torch generator seeded by the first 15 hex digits
of SHA-256("<seed>:<key>"), a standard normal draw of its shape scaled by the tensor's role, so a key and
shape always get the same values whatever made the state dict. Images: smooth random references (a 16x16
block pattern plus a little noise, scaled to peak 1) and distorted copies with Gaussian noise growing with
the pair's index, as 8-bit RGB."""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def generator(seed: int, key: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16))


def fill_state_dict(state: dict, seed: int, std: float = 0.02) -> dict:
    """The generated values of every tensor of ``state`` (integer tensors kept)."""
    out = {}
    for key in sorted(state):
        tensor = state[key]
        if not torch.is_floating_point(tensor):
            out[key] = tensor.clone()
            continue
        noise = torch.randn(tensor.shape, generator=generator(seed, key), dtype=torch.float32)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "running_var":
            value = 1.0 + 0.1 * noise.abs()
        elif leaf == "running_mean":
            value = 0.1 * noise
        elif leaf == "weight" and tensor.dim() == 1:  # a normalisation's scale
            value = 1.0 + std * noise
        elif leaf == "bias":
            value = std * noise
        elif tensor.dim() == 4:  # a convolution: unit variance per output over its inputs
            value = noise * (1.0 / int(np.prod(tensor.shape[1:]))) ** 0.5  # this rounding, not noise / sqrt(n)
        else:
            value = std * noise
        out[key] = value.to(tensor.dtype)
    return out


def make_images(n: int, size: int = 224, seed: int = 7) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (reference, distorted) uint8 RGB [size, size, 3] pairs."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        blocks = np.kron(rng.random((size // 16, size // 16, 3)), np.ones((16, 16, 1)))
        ref = blocks + 0.15 * rng.random((size, size, 3))
        ref = np.clip(ref / ref.max(), 0, 1)
        dist = np.clip(ref + (0.05 + 0.1 * i) * rng.standard_normal(ref.shape), 0, 1)
        pairs.append(((ref * 255).round().astype(np.uint8), (dist * 255).round().astype(np.uint8)))
    return pairs
